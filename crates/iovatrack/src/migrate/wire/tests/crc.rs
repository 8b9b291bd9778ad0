//! The checksum: RFC 3720 vectors and agreement with a bit-at-a-time reference.

use super::super::crc::Crc;
use super::*;
use proptest::prelude::*;

/// The reference: CRC-32C one bit at a time, straight from the polynomial.
fn bitwise_crc32c(data: &[u8]) -> u32 {
    const CRC32C_POLY: u32 = 0x82F6_3B78; // Castagnoli, reflected
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn crc32c_known_values() {
    // The standard check value.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 B.4 (the RFC lists each CRC's bytes least significant first).
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    let inc: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c(&inc), 0x46DD_794E);
    let dec: Vec<u8> = (0..32).rev().collect();
    assert_eq!(crc32c(&dec), 0x113F_DB5C);
    let iscsi_read_pdu: [u8; 48] = [
        0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00,
        0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00,
    ];
    assert_eq!(crc32c(&iscsi_read_pdu), 0xD996_3A56);
    // And the running form used for frames gives the same.
    let mut c = Crc::new();
    for piece in iscsi_read_pdu.chunks(7) {
        c.update(piece);
    }
    assert_eq!(c.finish(), 0xD996_3A56);
}

/// The crate switches to 3-way interleaved blocks of 3 × 256 and 3 × 8192 bytes: check
/// lengths and alignments around those against the reference.
#[test]
fn crc32c_long_blocks_match_bitwise() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..3 * 8192 * 2 + 100)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for off in [0usize, 1, 7] {
        for len in [
            767,
            768,
            769,
            3 * 8192 - 1,
            3 * 8192,
            3 * 8192 + 9,
            3 * 8192 * 2,
        ] {
            let d = &data[off..off + len];
            let want = bitwise_crc32c(d);
            assert_eq!(crc32c(d), want, "off {off} len {len}");
            let mut c = Crc::new();
            let (a, b) = d.split_at(len / 3);
            c.update(a);
            c.update(b);
            assert_eq!(c.finish(), want, "off {off} len {len} in two pieces");
        }
    }
}

proptest! {
    #[test]
    fn crc_matches_bitwise_and_runs_in_pieces(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        split in 0usize..200,
    ) {
        let want = bitwise_crc32c(&data);
        prop_assert_eq!(crc32c(&data), want);
        // Running over two pieces equals one pass.
        let split = split.min(data.len());
        let mut c = Crc::new();
        c.update(&data[..split]);
        c.update(&data[split..]);
        prop_assert_eq!(c.finish(), want);
    }
}
