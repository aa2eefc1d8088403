//! The CRYPTO stream of a client's Initials: the frames of a decrypted
//! Initial (RFC 9000 12.4, 19), and their data reassembled in stream order
//! whatever order the frames came in, within and across packets (Chromium
//! cuts its hello into many small CRYPTO frames, shuffles them and mixes
//! PING and PADDING between them; its ~2 KB ML-KEM hello takes two Initials).

/// Longest CRYPTO stream read: a ClientHello this long would take over a
/// dozen Initials. Data past it gives up on the flow.
pub const MAX_STREAM: usize = 16 * 1024;

/// Why a payload's frames were not all taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame is cut short or is not allowed in an Initial")]
    Malformed,
    #[error("CRYPTO data past {MAX_STREAM} bytes")]
    TooLong,
}

/// The stream's bytes received so far, and which.
#[derive(Default)]
pub struct CryptoStream {
    data: Vec<u8>,
    /// One bit per byte of `data`: received.
    have: Vec<u64>,
    /// Bytes from offset 0 received without a gap.
    contiguous: usize,
}

impl CryptoStream {
    /// The stream's start, received without a gap.
    pub fn contiguous(&self) -> &[u8] {
        &self.data[..self.contiguous]
    }

    /// Takes CRYPTO data at stream offset `at`; bytes received already keep
    /// their first value (RFC 9000 2.2: a peer must not change them).
    pub fn insert(&mut self, at: u64, bytes: &[u8]) -> Result<(), FrameError> {
        let end = at.checked_add(bytes.len() as u64).filter(|e| *e <= MAX_STREAM as u64).ok_or(FrameError::TooLong)? as usize;
        let at = at as usize;
        if end > self.data.len() {
            self.data.resize(end, 0);
            self.have.resize(end.div_ceil(64), 0);
        }
        for (i, b) in bytes.iter().enumerate() {
            let j = at + i;
            if self.have[j / 64] & (1 << (j % 64)) == 0 {
                self.data[j] = *b;
                self.have[j / 64] |= 1 << (j % 64);
            }
        }
        while self.contiguous < self.data.len() && self.have[self.contiguous / 64] & (1 << (self.contiguous % 64)) != 0 {
            self.contiguous += 1;
        }
        Ok(())
    }

    /// Takes the CRYPTO frames of a decrypted Initial payload, skipping
    /// PADDING, PING, ACK and CONNECTION_CLOSE (the other frames an Initial
    /// may carry, RFC 9000 12.4); any other frame breaks the payload.
    pub fn take_frames(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        use super::initial::varint;
        let mut pos = 0;
        let v = |pos: &mut usize| varint(payload, pos).ok_or(FrameError::Malformed);
        while pos < payload.len() {
            let kind = v(&mut pos)?;
            match kind {
                0x00 | 0x01 => {}
                0x02 | 0x03 => {
                    let (_largest, _delay, ranges, _first) = (v(&mut pos)?, v(&mut pos)?, v(&mut pos)?, v(&mut pos)?);
                    for _ in 0..ranges.min(payload.len() as u64) {
                        v(&mut pos)?;
                        v(&mut pos)?;
                    }
                    if kind == 0x03 {
                        for _ in 0..3 {
                            v(&mut pos)?;
                        }
                    }
                }
                0x06 => {
                    let at = v(&mut pos)?;
                    let len = usize::try_from(v(&mut pos)?).map_err(|_| FrameError::Malformed)?;
                    let data = payload.get(pos..pos.checked_add(len).ok_or(FrameError::Malformed)?).ok_or(FrameError::Malformed)?;
                    self.insert(at, data)?;
                    pos += len;
                }
                0x1c => {
                    let (_code, _frame) = (v(&mut pos)?, v(&mut pos)?);
                    let reason = usize::try_from(v(&mut pos)?).map_err(|_| FrameError::Malformed)?;
                    pos = pos.checked_add(reason).filter(|p| *p <= payload.len()).ok_or(FrameError::Malformed)?;
                }
                _ => return Err(FrameError::Malformed),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_in_any_order_and_keeps_first_bytes() {
        let mut s = CryptoStream::default();
        s.insert(5, b"fgh").unwrap();
        assert_eq!(s.contiguous(), b"");
        s.insert(0, b"abc").unwrap();
        assert_eq!(s.contiguous(), b"abc");
        // Overlapping, with other bytes where some were read: first wins.
        s.insert(2, b"XdeYY").unwrap();
        assert_eq!(s.contiguous(), b"abcdefgh");
        assert_eq!(s.insert(MAX_STREAM as u64 - 1, b"ab"), Err(FrameError::TooLong));
        assert_eq!(s.insert(u64::MAX, b"a"), Err(FrameError::TooLong));
    }

    #[test]
    fn frames_of_an_initial() {
        let mut s = CryptoStream::default();
        // PADDING, PING, CRYPTO(3, "def"), ACK with one range, CRYPTO(0, "abc"),
        // ACK_ECN, CONNECTION_CLOSE with a reason, PADDING.
        let payload = [
            &[0x00, 0x01, 0x06, 0x03, 0x03][..],
            b"def",
            &[0x02, 0x05, 0x00, 0x01, 0x00, 0x01, 0x01, 0x06, 0x00, 0x03],
            b"abc",
            &[0x03, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x02, b'n', b'o', 0x00, 0x00],
        ]
        .concat();
        s.take_frames(&payload).unwrap();
        assert_eq!(s.contiguous(), b"abcdef");
        // A STREAM frame has no place in an Initial; a CRYPTO frame cut short.
        assert_eq!(CryptoStream::default().take_frames(&[0x08, 0x00]), Err(FrameError::Malformed));
        assert_eq!(CryptoStream::default().take_frames(&[0x06, 0x00, 0x05, b'a']), Err(FrameError::Malformed));
    }
}
