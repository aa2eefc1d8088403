//! Indices of the per-CPU counter array and their names.
//!
//! Layout: a few global counters, then one block per (protocol, address
//! family, outcome), then one counter per malformation reason.

use crate::{
    packet::{Af, Malformed},
    reply::DnsAction,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Proto {
    DnsUdp = 0,
    DnsTcp = 1,
    /// TLS ClientHello server names.
    Tls = 2,
    /// HTTP request Host names.
    Http = 3,
    /// QUIC Initial packets (UDP/443): `inspected` counts those seen,
    /// `blocked` those dropped by the `drop` policy.
    Quic = 4,
}

impl Proto {
    pub const COUNT: usize = 5;
    pub const ALL: [Proto; Self::COUNT] = [Proto::DnsUdp, Proto::DnsTcp, Proto::Tls, Proto::Http, Proto::Quic];
    /// The stream protocols the match stage handles, from their number.
    #[inline(always)]
    pub const fn from_stream(v: u32) -> Proto {
        if v == Proto::Http as u32 {
            Proto::Http
        } else if v == Proto::DnsTcp as u32 {
            Proto::DnsTcp
        } else {
            Proto::Tls
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Proto::DnsUdp => "dns_udp",
            Proto::DnsTcp => "dns_tcp",
            Proto::Tls => "tls",
            Proto::Http => "http",
            Proto::Quic => "quic",
        }
    }
}

impl Af {
    pub const COUNT: usize = 2;
    pub const ALL: [Af; Self::COUNT] = [Af::V4, Af::V6];
    pub const fn name(self) -> &'static str {
        match self {
            Af::V4 => "ipv4",
            Af::V6 => "ipv6",
        }
    }
}

/// What happened to an inspected packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Outcome {
    /// The name was read and matched against the rules.
    Inspected = 0,
    /// Dropped by a block rule.
    Blocked = 1,
    /// Passed because an allow rule matched (whether or not a block rule did).
    Allowed = 2,
    /// The name could not be read from this packet alone (split TCP segment).
    Incomplete = 3,
}

impl Outcome {
    pub const COUNT: usize = 4;
    pub const ALL: [Outcome; Self::COUNT] = [Outcome::Inspected, Outcome::Blocked, Outcome::Allowed, Outcome::Incomplete];
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Inspected => "inspected",
            Outcome::Blocked => "blocked",
            Outcome::Allowed => "allowed",
            Outcome::Incomplete => "incomplete",
        }
    }
}

/// Every packet the program saw.
pub const PACKETS: u32 = 0;
/// Later IP fragments, passed: they carry no transport header.
pub const FRAGMENTS: u32 = 1;
/// Packets passed because the daemon had not configured the program yet.
pub const UNCONFIGURED: u32 = 2;
/// Blocked UDP queries that could not be answered as their list says
/// because the packet has IP options, extension headers or is a fragment
/// (dropped instead).
pub const REPLY_NOT_PLAIN: u32 = 3;
/// Blocked UDP queries whose answer could not be written (dropped instead).
pub const REPLY_FAILED: u32 = 4;
/// ClientHellos without a server_name extension (passed).
pub const TLS_NO_SNI: u32 = 5;
/// ClientHellos carrying an encrypted_client_hello extension.
pub const TLS_ECH: u32 = 6;
/// Segments of a flow with an unfinished ClientHello that arrived ahead of
/// the bytes before them: dropped, so the client resends in order.
pub const TLS_OUT_OF_ORDER: u32 = 7;
/// ClientHellos too complex to read within the per-segment step budget
/// (`MAX_STEPS` * `MAX_ROUNDS`): the flow is blocked (no real client sends
/// one).
pub const TLS_TOO_COMPLEX: u32 = 8;
/// Streams that started like a TLS record but were not a ClientHello.
pub const TLS_NOT_HELLO: u32 = 9;
/// HTTP requests whose head ended without a Host header (HTTP/1.0;
/// passed).
pub const HTTP_NO_HOST: u32 = 10;
/// HTTP requests whose Host (or absolute-form target) is empty or not a
/// domain name, such as an IP literal (passed).
pub const HTTP_BAD_HOST: u32 = 11;
/// Streams to an HTTP port that started like a method but were not a
/// request (passed).
pub const HTTP_NOT_REQUEST: u32 = 12;
/// Requests without a name within `http::MAX_HEAD_BYTES`: the flow is
/// blocked.
pub const HTTP_TOO_LONG: u32 = 13;
/// Segments of a request being read that arrived ahead of the bytes before
/// them: dropped, so the client resends in order.
pub const HTTP_OUT_OF_ORDER: u32 = 14;
/// TCP RSTs sent back to clients of flows blocked by a list whose TCP
/// action is `reset`.
pub const TCP_RESETS: u32 = 15;
/// Segments that were to be answered with a RST but have IP options or
/// IPv6 extension headers (dropped instead).
pub const TCP_RESET_NOT_PLAIN: u32 = 16;
/// Segments whose RST could not be written, or the answer stage not
/// reached (dropped instead).
pub const TCP_RESET_FAILED: u32 = 17;
const PROTO_BASE: u32 = 18;

/// ClientHello events by their `/metrics` label.
pub const TLS_EVENTS: [(&str, u32); 6] = [
    ("no_sni", TLS_NO_SNI),
    ("ech", TLS_ECH),
    ("out_of_order", TLS_OUT_OF_ORDER),
    ("too_complex", TLS_TOO_COMPLEX),
    ("not_hello", TLS_NOT_HELLO),
    ("ech_outer_blocked", TLS_ECH_OUTER_BLOCKED),
];
/// HTTP request events by their `/metrics` label.
pub const HTTP_EVENTS: [(&str, u32); 5] = [
    ("no_host", HTTP_NO_HOST),
    ("bad_host", HTTP_BAD_HOST),
    ("not_request", HTTP_NOT_REQUEST),
    ("too_long", HTTP_TOO_LONG),
    ("out_of_order", HTTP_OUT_OF_ORDER),
];
/// TCP connection events by their `/metrics` label.
pub const TCP_EVENTS: [(&str, u32); 4] =
    [("early_segment", TCP_EARLY), ("server_reset", TCP_SERVER_RESETS), ("dns_out_of_order", DNS_TCP_OUT_OF_ORDER), ("dns_too_many", DNS_TCP_TOO_MANY)];
/// Why blocked UDP queries were dropped instead of answered, by label.
pub const ANSWER_FALLBACKS: [(&str, u32); 2] = [("not_plain", REPLY_NOT_PLAIN), ("failed", REPLY_FAILED)];
/// Why segments of reset flows were dropped instead, by label.
pub const RESET_FALLBACKS: [(&str, u32); 2] = [("not_plain", TCP_RESET_NOT_PLAIN), ("failed", TCP_RESET_FAILED)];
const MALFORMED_BASE: u32 = PROTO_BASE + (Proto::COUNT * Af::COUNT * Outcome::COUNT) as u32;
const ACTION_BASE: u32 = MALFORMED_BASE + Malformed::COUNT as u32;
/// ClientHellos blocked by an ECH-outer rule (`--ech-outer-list`): the name
/// is on such a list and the hello carries ECH (also counted as blocked).
pub const TLS_ECH_OUTER_BLOCKED: u32 = ACTION_BASE + DnsAction::COUNT as u32;
/// Data segments of a new connection that came before its first data
/// segment (`flow::Start::Early`): dropped, so the client resends them in
/// order.
pub const TCP_EARLY: u32 = TLS_ECH_OUTER_BLOCKED + 1;
/// SYNs on the addresses and ports of a blocked flow turned into a RST that
/// closes the server's end of the blocked connection (the client's next SYN
/// starts afresh).
pub const TCP_SERVER_RESETS: u32 = TCP_EARLY + 1;
/// First IP fragments of datagrams blokir reads (`inspect::Fragmented`):
/// dropped under the `drop` fragment policy, else passed unread.
pub const EVASION_FRAGMENT: u32 = TCP_SERVER_RESETS + 1;
/// HTTP requests with a second Host header (`http::Progress::HostRepeat`):
/// the flow is blocked.
pub const EVASION_HOST_REPEAT: u32 = EVASION_FRAGMENT + 1;
/// Urgent data (URG) on a TCP flow being read (`flow::sign::URGENT`).
pub const EVASION_URGENT: u32 = EVASION_HOST_REPEAT + 1;
/// Fake segments on a TCP flow being read: ones the receiver discards
/// (`flow::sign::NO_ACK`, `SIGNED`).
pub const EVASION_FAKE: u32 = EVASION_URGENT + 1;
/// QUIC client Initials handed to the daemon (`--quic read`), and those
/// not handed up: past the per-flow cap, over the per-CPU budget, or not
/// taken by the daemon's buffer (full, or no daemon reading).
pub const QUIC_HANDED_UP: u32 = EVASION_FAKE + 1;
pub const QUIC_OVER_CAP: u32 = QUIC_HANDED_UP + 1;
pub const QUIC_OVER_BUDGET: u32 = QUIC_OVER_CAP + 1;
pub const QUIC_UNDELIVERED: u32 = QUIC_OVER_BUDGET + 1;
/// `blokir_quic_initials_total{fate=...}`.
pub const QUIC_FATES: [(&str, u32); 4] =
    [("handed_up", QUIC_HANDED_UP), ("over_flow_cap", QUIC_OVER_CAP), ("over_budget", QUIC_OVER_BUDGET), ("undelivered", QUIC_UNDELIVERED)];
/// Segments of a DNS-over-TCP connection that arrived ahead of bytes not
/// yet read (after a message, or after the connection's start): dropped,
/// so the client resends in order.
pub const DNS_TCP_OUT_OF_ORDER: u32 = QUIC_UNDELIVERED + 1;
/// DNS-over-TCP segments holding more queries than one pass reads (the
/// tail-call chain's limit): dropped, the connection's state unchanged.
pub const DNS_TCP_TOO_MANY: u32 = DNS_TCP_OUT_OF_ORDER + 1;
/// Copies of name bytes a TCP stream stage read that differ from them
/// (`flow::sign::REWRITE`): fakes fooled by a bad checksum, a TTL that dies
/// before the server, or a wrong ACK number.
pub const EVASION_REWRITE: u32 = DNS_TCP_TOO_MANY + 1;
/// SYNs that the connection's data could not be placed against
/// (`flow::sign::SYN`): one with another ISN than the SYN passed before it
/// (dropped), or one on a flow being read (its TLS or HTTP flow blocked
/// under `--on-tamper block`; a DNS reader keeps reading).
pub const EVASION_SYN: u32 = EVASION_REWRITE + 1;
/// Entries in the counter array.
pub const COUNTERS: u32 = EVASION_SYN + 1;

/// Circumvention attempts seen, by their `/metrics` label
/// (`blokir_evasions_total{kind}`).
pub const EVASIONS: [(&str, u32); 6] = [
    ("fragment", EVASION_FRAGMENT),
    ("host_repeat", EVASION_HOST_REPEAT),
    ("urgent", EVASION_URGENT),
    ("fake", EVASION_FAKE),
    ("rewrite", EVASION_REWRITE),
    ("syn", EVASION_SYN),
];

#[inline(always)]
pub const fn proto_index(proto: Proto, af: Af, outcome: Outcome) -> u32 {
    PROTO_BASE + ((proto as u32 * Af::COUNT as u32 + af as u32) * Outcome::COUNT as u32 + outcome as u32)
}

#[inline(always)]
pub const fn malformed_index(reason: Malformed) -> u32 {
    MALFORMED_BASE + reason as u32
}

/// Blocked queries by what was done with them (dropped, or answered so).
#[inline(always)]
pub const fn action_index(action: DnsAction) -> u32 {
    ACTION_BASE + action as u32
}

/// Per-list counters (`LIST_HITS`, per CPU): list `l`'s kind `k` at
/// `l * LIST_COUNTERS + k`, counted by the kernel, and again at
/// `user_list_index(l, k)` in the second half, counted by the daemon (its
/// QUIC verdicts). The daemon is that half's only writer (CPU 0's slot, read
/// and written back), so it needs no atomics, and both halves carry over
/// restarts in the same pinned map.
pub const LIST_BLOCKED: u32 = 0;
pub const LIST_ALLOWED: u32 = 1;
pub const LIST_COUNTERS: u32 = 2;
pub const LIST_HITS_ENTRIES: u32 = 2 * crate::rules::MAX_LISTS * LIST_COUNTERS;

/// Where the daemon counts kind `kind` of list `list` in `LIST_HITS`.
#[inline(always)]
pub const fn user_list_index(list: u32, kind: u32) -> u32 {
    crate::rules::MAX_LISTS * LIST_COUNTERS + list * LIST_COUNTERS + kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_distinct_and_in_range() {
        let mut seen = [false; COUNTERS as usize];
        let mut mark = |i: u32| {
            assert!(i < COUNTERS && !seen[i as usize], "index {i}");
            seen[i as usize] = true;
        };
        mark(PACKETS);
        mark(FRAGMENTS);
        mark(UNCONFIGURED);
        for (_, i) in ANSWER_FALLBACKS.iter().chain(&RESET_FALLBACKS) {
            mark(*i);
        }
        mark(TCP_RESETS);
        for (_, i) in TLS_EVENTS.iter().chain(&HTTP_EVENTS).chain(&TCP_EVENTS).chain(&EVASIONS).chain(&QUIC_FATES) {
            mark(*i);
        }
        for a in DnsAction::ALL {
            mark(action_index(a));
        }
        for p in Proto::ALL {
            for a in Af::ALL {
                for o in Outcome::ALL {
                    mark(proto_index(p, a, o));
                }
            }
        }
        for m in Malformed::ALL {
            mark(malformed_index(m));
        }
        assert!(seen.iter().all(|s| *s));
    }
}
