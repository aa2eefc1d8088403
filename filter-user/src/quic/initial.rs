//! Opening client Initial packets: key derivation from the destination
//! connection ID (RFC 9001 5.2, RFC 9369 3.3 for version 2), header
//! protection removal (RFC 9001 5.4) and AES-128-GCM decryption (5.3).
//! The crypto is `ring`'s (already in the tree through rustls).

use filter_common::quic::{MAX_CID_LEN, VERSION_1, VERSION_2};
use ring::{aead, hkdf};

const SALT_V1: [u8; 20] = [0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a];
const SALT_V2: [u8; 20] = [0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9];
const TAG_LEN: usize = 16;
const SAMPLE_LEN: usize = 16;

/// Why a datagram (or a packet in it) could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a QUIC long-header packet of version 1 or 2")]
    NotQuic,
    #[error("the header is cut short or its lengths disagree")]
    Truncated,
    #[error("the packet does not authenticate with the Initial keys")]
    Undecryptable,
}

/// A QUIC version whose Initials are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn of(wire: u32) -> Option<Self> {
        match wire {
            VERSION_1 => Some(Version::V1),
            VERSION_2 => Some(Version::V2),
            _ => None,
        }
    }

    pub fn wire(self) -> u32 {
        match self {
            Version::V1 => VERSION_1,
            Version::V2 => VERSION_2,
        }
    }

    /// The long-header packet type of Initials (v2 renumbered them).
    pub fn initial_type(self) -> u8 {
        match self {
            Version::V1 => 0,
            Version::V2 => 1,
        }
    }

    /// The long-header type of Retry, which has no length field.
    fn retry_type(self) -> u8 {
        match self {
            Version::V1 => 3,
            Version::V2 => 0,
        }
    }

    fn salt(self) -> &'static [u8] {
        match self {
            Version::V1 => &SALT_V1,
            Version::V2 => &SALT_V2,
        }
    }

    fn labels(self) -> [&'static [u8]; 3] {
        match self {
            Version::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Version::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }
}

/// The client's Initial keys for one destination connection ID.
pub struct Keys {
    pub(crate) key: aead::LessSafeKey,
    pub(crate) iv: [u8; 12],
    pub(crate) hp: aead::quic::HeaderProtectionKey,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 7.1) with an empty context.
fn expand_label(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    // Lengths are constants far below HKDF's limit of 255 hash lengths.
    prk.expand(&info, Len(out.len())).and_then(|okm| okm.fill(out)).expect("HKDF-Expand-Label of a short output");
}

impl Keys {
    /// The keys protecting a client's Initials sent to `dcid` (the one of
    /// its first Initial, or the one a Retry gave it).
    pub fn client(version: Version, dcid: &[u8]) -> Self {
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, version.salt()).extract(dcid);
        let mut secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut secret);
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret);
        let [key_label, iv_label, hp_label] = version.labels();
        let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&client, key_label, &mut key);
        expand_label(&client, iv_label, &mut iv);
        expand_label(&client, hp_label, &mut hp);
        Keys {
            key: aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).expect("a 16-byte AES key")),
            iv,
            hp: aead::quic::HeaderProtectionKey::new(&aead::quic::AES_128, &hp).expect("a 16-byte AES key"),
        }
    }

    pub(crate) fn nonce(&self, pn: u64) -> aead::Nonce {
        let mut n = self.iv;
        for (b, p) in n[4..].iter_mut().zip(pn.to_be_bytes()) {
            *b ^= p;
        }
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// QUIC's variable-length integer (RFC 9000 16) at `*pos`, which it moves past.
pub fn varint(d: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *d.get(*pos)?;
    let len = 1usize << (first >> 6);
    let bytes = d.get(*pos..*pos + len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    *pos += len;
    Some(v)
}

/// A long-header packet's cleartext fields, at `off` in a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    pub version: Version,
    pub initial: bool,
    /// The destination connection ID's range in the datagram.
    pub dcid: (usize, usize),
    /// Where the (protected) packet number starts.
    pub pn_off: usize,
    /// Where the packet ends (the next coalesced one starts).
    pub end: usize,
}

/// Reads the long header at `off`: `None` past the last packet of the
/// datagram (a short header, padding, a Retry or a version other than 1
/// and 2 end the walk).
pub fn long_header(d: &[u8], off: usize) -> Result<LongHeader, OpenError> {
    let first = *d.get(off).ok_or(OpenError::Truncated)?;
    if first & 0xc0 != 0xc0 {
        return Err(OpenError::NotQuic);
    }
    let wire = u32::from_be_bytes(d.get(off + 1..off + 5).ok_or(OpenError::Truncated)?.try_into().expect("4 bytes"));
    let version = Version::of(wire).ok_or(OpenError::NotQuic)?;
    let kind = (first >> 4) & 3;
    if kind == version.retry_type() {
        return Err(OpenError::NotQuic);
    }
    let mut pos = off + 5;
    let dcid_len = *d.get(pos).ok_or(OpenError::Truncated)?;
    if dcid_len > MAX_CID_LEN {
        return Err(OpenError::NotQuic);
    }
    let dcid = (pos + 1, pos + 1 + usize::from(dcid_len));
    pos = dcid.1;
    let scid_len = *d.get(pos).ok_or(OpenError::Truncated)?;
    if scid_len > MAX_CID_LEN {
        return Err(OpenError::NotQuic);
    }
    pos += 1 + usize::from(scid_len);
    let initial = kind == version.initial_type();
    if initial {
        let token = varint(d, &mut pos).ok_or(OpenError::Truncated)?;
        pos = pos.checked_add(usize::try_from(token).map_err(|_| OpenError::Truncated)?).ok_or(OpenError::Truncated)?;
    }
    let len = varint(d, &mut pos).ok_or(OpenError::Truncated)?;
    let end = pos.checked_add(usize::try_from(len).map_err(|_| OpenError::Truncated)?).ok_or(OpenError::Truncated)?;
    if end > d.len() {
        return Err(OpenError::Truncated);
    }
    Ok(LongHeader { version, initial, dcid, pn_off: pos, end })
}

/// Removes the header protection of the packet `h` (in a copy of the
/// datagram) and decrypts its payload in place: returns the packet number
/// and the frames' range.
pub fn open(d: &mut [u8], off: usize, h: &LongHeader, keys: &Keys) -> Result<(u64, (usize, usize)), OpenError> {
    let sample = d.get(h.pn_off + 4..h.pn_off + 4 + SAMPLE_LEN).ok_or(OpenError::Truncated)?;
    if h.pn_off + 4 + SAMPLE_LEN > h.end {
        return Err(OpenError::Truncated);
    }
    let mask = keys.hp.new_mask(sample).map_err(|_| OpenError::Undecryptable)?;
    let first = d[off] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 3) + 1;
    let mut pn = 0u64;
    let mut header = Vec::with_capacity(h.pn_off + pn_len - off);
    header.push(first);
    header.extend_from_slice(&d[off + 1..h.pn_off]);
    for i in 0..pn_len {
        let b = d[h.pn_off + i] ^ mask[1 + i];
        header.push(b);
        pn = (pn << 8) | u64::from(b);
    }
    let body = h.pn_off + pn_len;
    if body + TAG_LEN > h.end {
        return Err(OpenError::Truncated);
    }
    // Client Initials number from 0: the truncated number is the full one
    // for the few a flow is read for (RFC 9000 A.3 would need the largest
    // number acknowledged, which only the endpoints know).
    let plain = keys.key.open_in_place(keys.nonce(pn), aead::Aad::from(&header), &mut d[body..h.end]).map_err(|_| OpenError::Undecryptable)?;
    let len = plain.len();
    Ok((pn, (body, body + len)))
}
