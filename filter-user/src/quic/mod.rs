//! The server names of HTTP/3 (QUIC) flows, read by the daemon from the
//! client Initials the kernel hands up: XDP cannot derive per-connection
//! keys nor run AES-GCM (the `bpf_crypto` kfuncs have no AEAD), so the
//! kernel passes each Initial on and copies it to the daemon, which opens it
//! (`initial`), reassembles the CRYPTO stream (`stream`), reads the hello
//! with the kernel's own parser (`reader`) and decides with the same rules
//! as for TLS over TCP.

pub mod counts;
pub mod handoff;
pub mod initial;
pub mod reader;
pub mod seal;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod verdict;

pub use reader::{Event, Reader};
