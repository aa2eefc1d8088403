//! TCP resets built in XDP from a client's segment of a flow blocked by name
//! (TLS server name, HTTP Host): a RST|ACK back to the client (XDP_TX), so
//! that it fails at once instead of waiting for a timeout (Ethernet
//! addresses, IP addresses and ports swapped); or a RST on to the server
//! (XDP_PASS), which closes its end of the blocked connection. VLAN tags
//! kept, the payload and TCP options cut, correct IPv4 header and TCP
//! checksums.

use crate::{
    packet::{IPPROTO_TCP, PacketMut, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse_l3, parse_tcp},
    reply::{NoReply, fold, rewrite_ip, sum_words, swap},
};

/// What happens to a TCP flow blocked by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum TcpAction {
    /// Its segments are dropped: the client waits for its timeout.
    Drop = 0,
    /// Its client segments are answered with a TCP RST.
    Reset = 1,
}

impl TcpAction {
    pub const COUNT: usize = 2;
    pub const ALL: [TcpAction; Self::COUNT] = [TcpAction::Drop, TcpAction::Reset];
    pub const fn name(self) -> &'static str {
        match self {
            TcpAction::Drop => "drop",
            TcpAction::Reset => "reset",
        }
    }
}

/// The bit of a list's `LIST_ACTIONS` word (whose low byte is its
/// `DnsAction`) that says its TCP action is `Reset`.
pub const LIST_TCP_RESET: u32 = 1 << 9;

/// A list's `LIST_ACTIONS` word.
pub const fn list_action_word(dns: crate::reply::DnsAction, tcp: TcpAction) -> u32 {
    dns as u32 | if matches!(tcp, TcpAction::Reset) { LIST_TCP_RESET } else { 0 }
}

const TCP_HLEN: usize = 20;

/// Where a RST made of a client's segment goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toward {
    /// Back to the client (XDP_TX), a RST|ACK: addresses and ports swapped,
    /// sequence number the segment's acknowledgment number, acknowledging
    /// everything it carried.
    Client,
    /// On to the server (XDP_PASS), a RST at this sequence number, its
    /// addresses, ports and hop count as they were: it closes the server's
    /// end of a blocked connection if the number is the next the server
    /// expects (RFC 5961 3.2; any other draws a challenge ACK at most).
    Server(u32),
}

/// Rewrites the TCP segment in `p` into a RST `to` its client or server.
/// Packets with IPv4 options or IPv6 extension headers (or fragments) are
/// `NotPlain`: the caller drops them. `opaque` is `Env::opaque`: the header
/// offsets go through it so that the verifier checks the writes and sums
/// once, not once per header layout (and LLVM cannot fold them into pointer
/// arithmetic the verifier refuses).
#[inline(always)]
pub fn build_reset<P: PacketMut + ?Sized>(p: &mut P, to: Toward, opaque: impl Fn(usize) -> usize) -> Result<(), NoReply> {
    const E: NoReply = NoReply::Packet;
    let l3 = parse_l3(p).map_err(|_| E)?;
    if l3.proto != IPPROTO_TCP {
        return Err(E);
    }
    if !l3.plain {
        return Err(NoReply::NotPlain);
    }
    let l4 = parse_tcp(p, &l3).map_err(|_| E)?;
    let t = opaque(l3.l4_off);
    let (seq, ack, flags) = match to {
        Toward::Client => {
            let payload = l4.payload_end.saturating_sub(l4.payload_off);
            let ack = (u32::from(p.be16_at(t + 8).ok_or(E)?) << 16) | u32::from(p.be16_at(t + 10).ok_or(E)?);
            let ctl = u32::from(l4.flags & TCP_SYN != 0) + u32::from(l4.flags & TCP_FIN != 0);
            let ack_of = l4.seq.wrapping_add(payload as u32).wrapping_add(ctl);
            // Without an ACK the sender has no number for us to use (RFC 9293 3.10.7.1).
            (if l4.flags & TCP_ACK != 0 { ack } else { 0 }, ack_of, TCP_RST | TCP_ACK)
        }
        Toward::Server(seq) => (seq, 0, TCP_RST),
    };

    if !p.resize(t + TCP_HLEN) {
        return Err(E);
    }
    let back = to == Toward::Client;
    if back {
        swap(p, 0, 6, 6)?;
        swap(p, t, t + 2, 2)?;
    }
    p.set_be16(t + 4, (seq >> 16) as u16).ok_or(E)?;
    p.set_be16(t + 6, seq as u16).ok_or(E)?;
    p.set_be16(t + 8, (ack >> 16) as u16).ok_or(E)?;
    p.set_be16(t + 10, ack as u16).ok_or(E)?;
    p.set_u8(t + 12, (TCP_HLEN as u8 / 4) << 4).ok_or(E)?;
    p.set_u8(t + 13, flags).ok_or(E)?;
    // Window, checksum (below), urgent pointer.
    p.set_be16(t + 14, 0).ok_or(E)?;
    p.set_be16(t + 16, 0).ok_or(E)?;
    p.set_be16(t + 18, 0).ok_or(E)?;
    let pseudo = rewrite_ip(p, l3.af, opaque(l3.l3_off), TCP_HLEN, back)?;
    let sum = pseudo + u64::from(IPPROTO_TCP) + TCP_HLEN as u64 + sum_words(p, t, TCP_HLEN / 2, TCP_HLEN / 2);
    p.set_be16(t + 16, !fold(sum)).ok_or(E)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_keeps_the_dns_action_in_the_low_byte() {
        use crate::reply::DnsAction;
        for d in DnsAction::ALL {
            for t in TcpAction::ALL {
                let w = list_action_word(d, t);
                assert_eq!(DnsAction::from_u32(w), d);
                assert_eq!(w & LIST_TCP_RESET != 0, t == TcpAction::Reset);
            }
        }
    }
}
