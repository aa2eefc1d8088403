//! blokir's userspace: the daemon that loads the XDP program and the rules,
//! the control socket the CLI talks to, and the Prometheus endpoint.

pub mod config;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod ebpf;
pub mod events;
pub mod excerpt;
pub mod lists;
pub mod metrics;
pub mod model;
pub mod pin;
pub mod policy;
pub mod quic;
pub mod replay;
pub mod rules;
pub mod socket;
pub mod support;
