//! A client Initial encryptor, the inverse of `initial::open`: builds the
//! crafted flows of the tests and the fuzz seeds (hellos cut into shuffled
//! CRYPTO frames over several packets, other versions and DCID lengths).

use ring::aead;

use super::initial::{Keys, Version};

/// A protected Initial packet of `version` to `dcid`, numbered `pn`, with
/// `frames` (padded with PADDING frames to `pad_to` bytes of packet).
pub fn initial(version: Version, dcid: &[u8], scid: &[u8], pn: u32, frames: &[u8], pad_to: usize) -> Vec<u8> {
    initial_with_keys(version, &Keys::client(version, dcid), dcid, scid, pn, frames, pad_to)
}

/// `initial` with the keys given (those of the flow's first DCID, for an
/// Initial sent to another one).
pub fn initial_with_keys(version: Version, keys: &Keys, dcid: &[u8], scid: &[u8], pn: u32, frames: &[u8], pad_to: usize) -> Vec<u8> {
    const PN_LEN: usize = 4;
    let mut head = vec![0xc0 | (version.initial_type() << 4) | (PN_LEN as u8 - 1)];
    head.extend_from_slice(&version.wire().to_be_bytes());
    head.push(dcid.len() as u8);
    head.extend_from_slice(dcid);
    head.push(scid.len() as u8);
    head.extend_from_slice(scid);
    head.push(0); // no token
    let fixed = head.len() + 2 + PN_LEN + 16;
    let mut payload = frames.to_vec();
    // At least 4 bytes of packet number + payload for the HP sample.
    let min = pad_to.saturating_sub(fixed).max(20 - PN_LEN).max(payload.len());
    payload.resize(min, 0);
    let len = PN_LEN + payload.len() + 16;
    assert!(len < 1 << 14, "a 2-byte length field");
    head.extend_from_slice(&(0x4000 | len as u16).to_be_bytes());
    let pn_off = head.len();
    head.extend_from_slice(&pn.to_be_bytes());
    let tag = keys.key.seal_in_place_separate_tag(keys.nonce(u64::from(pn)), aead::Aad::from(&head), &mut payload).expect("a short payload");
    let mut packet = head;
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(tag.as_ref());
    let mask = keys.hp.new_mask(&packet[pn_off + 4..pn_off + 20]).expect("a 16-byte sample");
    packet[0] ^= mask[0] & 0x0f;
    for i in 0..PN_LEN {
        packet[pn_off + i] ^= mask[1 + i];
    }
    packet
}

/// A CRYPTO frame of `data` at stream offset `at`.
pub fn crypto_frame(at: u64, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    varint(&mut f, at);
    varint(&mut f, data.len() as u64);
    f.extend_from_slice(data);
    f
}

fn varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..0x40 => out.push(v as u8),
        0x40..0x4000 => out.extend_from_slice(&(0x4000 | v as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(0x8000_0000 | v as u32).to_be_bytes()),
    }
}

/// A TLS 1.3-shaped ClientHello handshake message (no record header) for
/// `name`, with `ech` an encrypted_client_hello extension after it and
/// `filler` bytes of padding extension (to make it span packets).
pub fn client_hello(name: &str, ech: bool, filler: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut ext = |kind: u16, body: &[u8]| {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
        exts.extend_from_slice(body);
    };
    ext(0x002b, &[0x02, 0x03, 0x04]);
    ext(0x0015, &vec![0; filler]);
    let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    ext(0x0000, &sni);
    if ech {
        ext(0xfe0d, &[0; 40]);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hello = vec![1];
    hello.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hello.extend_from_slice(&body);
    hello
}
