//! The checksum: known vectors and agreement with a bit-at-a-time reference.

use super::super::crc::{crc32c_update_table, Crc, CRC32C_POLY};
use super::*;
use proptest::prelude::*;

fn bitwise_crc32c(data: &[u8]) -> u32 {
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
    // RFC 3720 B.4 / the standard check value.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    assert_eq!(crc32c(b""), 0);
}

proptest! {
    #[test]
    fn crc_table_matches_bitwise_and_hardware(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        split in 0usize..200,
    ) {
        let want = bitwise_crc32c(&data);
        prop_assert_eq!(!crc32c_update_table(!0, &data), want);
        prop_assert_eq!(crc32c(&data), want);
        // Running over two pieces equals one pass.
        let split = split.min(data.len());
        let mut c = Crc::new();
        c.update(&data[..split]);
        c.update(&data[split..]);
        prop_assert_eq!(c.finish(), want);
    }

    #[test]
    fn hand_written_crc_agrees_with_crc32c_crate(
        data in proptest::collection::vec(any::<u8>(), 0..4200),
        split in 0usize..4200,
    ) {
        // The hand-written slice-by-8 table and SSE4.2 paths are about to give way to
        // the `crc32c` crate: both must agree with it on every length and alignment.
        let want = ::crc32c::crc32c(&data);
        prop_assert_eq!(!crc32c_update_table(!0, &data), want);
        prop_assert_eq!(crc32c(&data), want);
        let split = split.min(data.len());
        let appended = ::crc32c::crc32c_append(::crc32c::crc32c(&data[..split]), &data[split..]);
        prop_assert_eq!(appended, want);
        for off in 0..8.min(data.len()) {
            prop_assert_eq!(crc32c(&data[off..]), ::crc32c::crc32c(&data[off..]));
        }
    }

}
