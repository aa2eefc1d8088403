//! The packet-level suites in one binary, for the kernel matrix's guests:
//! one process verifies the program once for all of them
//! (`BLOKIR_SHARE_PROGRAM=1`), where each verification takes emulated
//! minutes on 6.1. Not run on the host (`test = false`), where each suite
//! runs as its own binary.

#[path = "dns_reply.rs"]
mod dns_reply;
#[path = "dns_tcp.rs"]
mod dns_tcp;
#[path = "evasion_stream.rs"]
mod evasion_stream;
#[path = "fragments.rs"]
mod fragments;
#[path = "http.rs"]
mod http;
#[path = "http_hosts.rs"]
mod http_hosts;
#[path = "quic.rs"]
mod quic;
#[path = "rst.rs"]
mod rst;
#[path = "tls.rs"]
mod tls;
#[path = "xdp.rs"]
mod xdp;
