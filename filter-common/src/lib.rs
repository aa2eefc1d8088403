//! Code shared by blokir's XDP program and its userspace: packet parsers, the
//! canonical name form, the keyed name hash, rule-map layouts and counter
//! indices. Everything here is `no_std`, allocation-free and written for the
//! BPF verifier (bounded loops, explicit bounds), so the same source runs in the
//! kernel, in host unit tests and in fuzzers.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod counters;
pub mod dns;
pub mod flow;
pub mod hash;
pub mod http;
pub mod inspect;
pub mod name;
pub mod packet;
pub mod quic;
pub mod reply;
pub mod reset;
pub mod rules;
pub mod tls;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain-old-data without padding holes
    // that the kernel would reject.
    unsafe impl aya::Pod for crate::rules::NameKey {}
    unsafe impl aya::Pod for crate::rules::NodeRules {}
    unsafe impl aya::Pod for crate::rules::Config {}
    unsafe impl aya::Pod for crate::name::CanonBuf {}
    unsafe impl aya::Pod for crate::tls::FlowKey {}
    unsafe impl aya::Pod for crate::tls::Hello {}
    unsafe impl aya::Pod for crate::flow::Flow {}
    unsafe impl aya::Pod for crate::inspect::DnsAt {}
    unsafe impl aya::Pod for crate::rules::BlockEvent {}
}
