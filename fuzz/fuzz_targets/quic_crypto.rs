//! The CRYPTO stream of the daemon's QUIC reader against a plain reference
//! (a byte array where the first value written to each offset stays):
//! CRYPTO data in any order, overlapping, with gaps, near and past the
//! 16 KB cap, inserted directly and as CRYPTO frames mixed with PING and
//! PADDING. The contiguous start always equals the reference's; data past
//! the cap is refused exactly when it ends past it, and changes nothing.
//! Odd mode bytes: arbitrary frame payloads (never a panic, never past the
//! cap).
//!
//! Input (even mode): pieces of a 16-bit offset (its top bit: moved up to
//! just under the cap), a length byte, then up to that many data bytes.

#![no_main]

use blokir_fuzz::quic::{
    seal::crypto_frame,
    stream::{CryptoStream, FrameError, MAX_STREAM},
};
use libfuzzer_sys::fuzz_target;

fn reference_contiguous(r: &[Option<u8>]) -> Vec<u8> {
    r.iter().map_while(|b| *b).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    if mode & 1 == 1 {
        let mut s = CryptoStream::default();
        let _ = s.take_frames(rest);
        assert!(s.contiguous().len() <= MAX_STREAM);
        return;
    }
    let mut direct = CryptoStream::default();
    let mut framed = CryptoStream::default();
    let mut reference: Vec<Option<u8>> = Vec::new();
    let mut payload = Vec::new();
    let mut framed_ok = true;
    while let [hi, lo, len, tail @ ..] = rest {
        let raw = u16::from_be_bytes([*hi, *lo]);
        let at = if raw & 0x8000 != 0 { (MAX_STREAM - 600) as u64 + u64::from(raw & 0x3ff) } else { u64::from(raw) };
        let bytes = &tail[..usize::from(*len).min(tail.len())];
        rest = &tail[bytes.len()..];
        let end = at as usize + bytes.len();
        let got = direct.insert(at, bytes);
        if end > MAX_STREAM {
            assert_eq!(got, Err(FrameError::TooLong), "{at}+{}", bytes.len());
        } else {
            assert_eq!(got, Ok(()));
            if reference.len() < end {
                reference.resize(end, None);
            }
            for (i, b) in bytes.iter().enumerate() {
                reference[at as usize + i].get_or_insert(*b);
            }
        }
        assert_eq!(direct.contiguous(), &reference_contiguous(&reference)[..]);
        // The same data as a frame in one payload, PING or PADDING between.
        payload.extend(crypto_frame(at, bytes));
        payload.push(if raw & 0x4000 != 0 { 0x01 } else { 0x00 });
        if framed_ok {
            let mut one = Vec::new();
            one.extend(crypto_frame(at, bytes));
            one.push(0x01);
            match framed.take_frames(&one) {
                Ok(()) => assert_eq!(framed.contiguous(), direct.contiguous()),
                Err(e) => {
                    assert_eq!(e, FrameError::TooLong);
                    framed_ok = false;
                }
            }
        }
    }
    // All the frames in one payload: the same stream, or TooLong if any
    // piece ended past the cap.
    let mut whole = CryptoStream::default();
    match whole.take_frames(&payload) {
        Ok(()) => assert_eq!(whole.contiguous(), direct.contiguous()),
        Err(e) => assert_eq!((e, framed_ok), (FrameError::TooLong, false)),
    }
});
