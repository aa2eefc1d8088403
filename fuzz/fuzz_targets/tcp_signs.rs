//! `packet::fake_signs` (the stream stages' signs of a fake segment or
//! urgent bytes) on arbitrary TCP headers, against a reference written from
//! Linux's `tcp_parse_options` as a plain loop.
//!
//! Input: the TCP flags byte, then up to 40 bytes of options (the header is
//! padded with EOL to a multiple of 4), then the payload.
//!
//! Checked: URGENT iff URG is set, NO_ACK iff neither ACK nor SYN is set,
//! SIGNED iff the walk (EOL ends it; NOP is one byte; an option shorter than
//! 2 or overrunning the header ends it) meets kind 19 or 29 within the first
//! 10 options, or finds more than 10; and no signs at all without payload.
#![no_main]

use filter_common::{
    flow::sign,
    packet::{TCP_ACK, TCP_OPTION_SLOTS, TCP_SYN, TCP_URG, fake_signs},
};
use libfuzzer_sys::fuzz_target;

fn reference_signed(opts: &[u8]) -> bool {
    let (mut i, mut walked) = (0, 0);
    while i < opts.len() {
        if walked == TCP_OPTION_SLOTS {
            return true;
        }
        walked += 1;
        match opts[i] {
            0 => return false,
            1 => i += 1,
            19 | 29 => return true,
            _ => {
                let Some(&len) = opts.get(i + 1) else { return false };
                if len < 2 {
                    return false;
                }
                i += len as usize;
            }
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let n = rest.len().min(40);
    let (opts, payload) = rest.split_at(n);
    let opts_len = n.div_ceil(4) * 4;
    let mut header = vec![0u8; 20 + opts_len];
    header[20..20 + n].copy_from_slice(opts);
    header[12] = ((header.len() / 4) as u8) << 4;
    header[13] = flags;
    let off = header.len();
    header.extend_from_slice(payload);
    let got = fake_signs(&header[..], flags, 0, off, header.len());
    if payload.is_empty() {
        assert_eq!(got, 0);
        return;
    }
    let mut want = 0;
    if flags & TCP_URG != 0 {
        want |= sign::URGENT;
    }
    if flags & (TCP_ACK | TCP_SYN) == 0 {
        want |= sign::NO_ACK;
    }
    if reference_signed(&header[20..off]) {
        want |= sign::SIGNED;
    }
    assert_eq!(got, want, "flags {flags:#x}, options {:02x?}", &header[20..off]);
});
