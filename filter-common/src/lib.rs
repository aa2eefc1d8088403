//! Code shared by blokir's XDP program and its userspace: packet parsers, the
//! canonical name form, the keyed name hash, rule-map layouts and counter
//! indices. Everything here is `no_std`, allocation-free and written for the
//! BPF verifier (bounded loops, explicit bounds), so the same source runs in the
//! kernel, in host unit tests and in fuzzers.
#![no_std]
// `hide` (below): inline asm is still unstable on the BPF target.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(feature = "std")]
extern crate std;

pub mod counters;
pub mod dns;
pub mod dns_tcp;
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

/// Returns `x` unchanged, hiding from LLVM how it was computed (like
/// libbpf's `barrier_var`). A bounds check or mask applied to the result then
/// stays on the very register that is used afterwards: without it LLVM may
/// drop a mask it can prove redundant, or check a copy (or a strength-reduced
/// pointer) instead, and older verifiers (6.12) do not carry a bound from a
/// copy back to the register that indexes.
#[inline(always)]
pub fn hide(mut x: usize) -> usize {
    #[cfg(target_arch = "bpf")]
    // SAFETY: a register move to itself. (An empty asm block would leave two
    // line-info records on one instruction, which the kernel rejects.)
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) x, options(nomem, nostack, preserves_flags))
    };
    #[cfg(not(target_arch = "bpf"))]
    {
        x = core::convert::identity(x);
    }
    x
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain-old-data without padding holes
    // that the kernel would reject.
    unsafe impl aya::Pod for crate::rules::NameKey {}
    unsafe impl aya::Pod for crate::rules::NodeRules {}
    unsafe impl aya::Pod for crate::rules::Config {}
    unsafe impl aya::Pod for crate::name::CanonBuf {}
    unsafe impl aya::Pod for crate::tls::FlowKey {}
    unsafe impl aya::Pod for crate::quic::BlockedFlow {}
    unsafe impl aya::Pod for crate::tls::Hello {}
    unsafe impl aya::Pod for crate::flow::Flow {}
    unsafe impl aya::Pod for crate::flow::SynRecord {}
    unsafe impl aya::Pod for crate::inspect::DnsAt {}
    unsafe impl aya::Pod for crate::rules::BlockEvent {}
}
