//! Keyed polynomial hashing of canonical names modulo the Mersenne prime
//! 2^61 - 1, in two independent lanes.
//!
//! Bytes are packed seven to a "digit" (bit 56 marks a full digit; a final
//! partial digit of `n` bytes carries its marker at bit `8n`), so the digit
//! sequence of a string is injective. For two different strings of at most
//! 254 bytes (at most 37 digits) and a secret random multiplier `r`, the two
//! lane values collide with probability at most 37 / (2^61 - 1); the two lanes
//! use independent multipliers, so a false match costs at most ~2^-112 per
//! pair — a collision cannot be steered without knowing the secret, and the
//! daemon never reveals it.

/// The Mersenne prime 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
/// Bytes packed into one digit.
pub const DIGIT_BYTES: u32 = 7;
const FULL_DIGIT_MARK: u64 = 1 << 56;

/// `x mod P` for `x < 2^64`, without a branch: a branch on hash values would
/// make the BPF verifier explore both outcomes at every step.
#[inline(always)]
const fn reduce(x: u64) -> u64 {
    // r <= P + 7; r >= P exactly when r + 1 reaches 2^61.
    let r = (x & P) + (x >> 61);
    r - ((r + 1) >> 61) * P
}

/// `a * b mod P` for `a, b < P`, with 32-bit halves: BPF has no 64x64->128
/// multiply.
#[inline(always)]
pub const fn mulmod(a: u64, b: u64) -> u64 {
    let (ah, al) = (a >> 32, a & 0xffff_ffff);
    let (bh, bl) = (b >> 32, b & 0xffff_ffff);
    let hh = ah * bh; // < 2^58; weight 2^64 = 8 (mod P)
    let mid = ah * bl + al * bh; // < 2^62; weight 2^32
    let ll = al * bl; // < 2^64
    // mid * 2^32 = (mid >> 29) * 2^61 + (mid & (2^29 - 1)) * 2^32, and 2^61 = 1.
    let sum = (hh << 3) + (mid >> 29) + ((mid & ((1 << 29) - 1)) << 32) + (ll >> 61) + (ll & P);
    reduce(sum)
}

/// One Horner step: `state * r + digit (mod P)`.
#[inline(always)]
pub const fn horner(state: u64, r: u64, digit: u64) -> u64 {
    reduce(mulmod(state, r) + digit)
}

/// Streaming state for both lanes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hasher {
    state: [u64; 2],
    tail: u64,
    n: u32,
}

impl Hasher {
    #[inline(always)]
    pub const fn new() -> Self {
        Self { state: [0, 0], tail: 0, n: 0 }
    }

    #[inline(always)]
    pub fn push(&mut self, r: &[u64; 2], b: u8) {
        self.tail |= (b as u64) << (8 * self.n);
        self.n += 1;
        if self.n == DIGIT_BYTES {
            let d = self.tail | FULL_DIGIT_MARK;
            self.state[0] = horner(self.state[0], r[0], d);
            self.state[1] = horner(self.state[1], r[1], d);
            self.tail = 0;
            self.n = 0;
        }
    }

    /// The hash of everything pushed so far; the state is left untouched so
    /// that longer prefixes can be hashed on from here.
    #[inline(always)]
    pub fn finish(&self, r: &[u64; 2]) -> [u64; 2] {
        let d = self.tail | (1u64 << (8 * self.n));
        [horner(self.state[0], r[0], d), horner(self.state[1], r[1], d)]
    }
}

/// A valid lane multiplier: in `[2, P - 1)`, derived from 64 random bits.
pub const fn lane_multiplier(random: u64) -> u64 {
    2 + (random % (P - 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mulmod_ref(a: u64, b: u64) -> u64 {
        ((a as u128 * b as u128) % P as u128) as u64
    }

    #[test]
    fn mulmod_matches_u128() {
        let samples = [0, 1, 2, 3, P - 1, P - 2, 1 << 32, (1 << 32) - 1, 1 << 60, 0x1234_5678_9abc_def0 % P, 0x0fff_ffff_ffff_ffff % P];
        for &a in &samples {
            for &b in &samples {
                assert_eq!(mulmod(a, b), mulmod_ref(a, b), "{a} * {b}");
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % P;
            let b = x.rotate_left(29) % P;
            assert_eq!(mulmod(a, b), mulmod_ref(a, b));
        }
    }

    #[test]
    fn digit_encoding_separates_lengths_and_zero_bytes() {
        let r = [lane_multiplier(12345), lane_multiplier(67890)];
        let hash = |s: &[u8]| {
            let mut h = Hasher::new();
            for &b in s {
                h.push(&r, b);
            }
            h.finish(&r)
        };
        let inputs: [&[u8]; 7] = [b"", b"\0", b"\0\0", b"\0\0\0\0\0\0\0", b"\0\0\0\0\0\0\0\0", b"a", b"a\0"];
        for (i, a) in inputs.iter().enumerate() {
            for b in &inputs[i + 1..] {
                assert_ne!(hash(a), hash(b), "{a:?} vs {b:?}");
            }
        }
    }
}
