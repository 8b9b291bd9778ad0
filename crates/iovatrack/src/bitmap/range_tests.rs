//! The range operations the emulated devices use (`word_masks`, `AtomicDirtyBitmap`'s
//! `visit_range`, `read_and_clear_range_into`, `try_new`, `clear_all`), against a
//! brute-force oracle of one `bool` per bit.

use super::words::word_masks;
use super::*;
use proptest::prelude::*;

/// The masks of bits `first..first + count`, one bit at a time.
fn masks_oracle(first: u64, count: u64) -> Vec<(usize, u64)> {
    let mut out: Vec<(usize, u64)> = Vec::new();
    for b in first..first + count {
        let w = (b / 64) as usize;
        match out.last_mut() {
            Some((lw, m)) if *lw == w => *m |= 1 << (b % 64),
            _ => out.push((w, 1 << (b % 64))),
        }
    }
    out
}

#[test]
fn word_masks_edges() {
    assert_eq!(word_masks(5, 0).count(), 0);
    assert_eq!(word_masks(0, 64).collect::<Vec<_>>(), [(0, u64::MAX)]);
    assert_eq!(
        word_masks(63, 2).collect::<Vec<_>>(),
        [(0, 1 << 63), (1, 1)]
    );
    assert_eq!(
        word_masks(60, 70).collect::<Vec<_>>(),
        [(0, 0xF << 60), (1, u64::MAX), (2, 0b11)]
    );
    // The last word of the u64 bit space: no overflow past it.
    let top = u64::MAX - 63;
    assert_eq!(
        word_masks(top, 64).collect::<Vec<_>>(),
        [((top / 64) as usize, u64::MAX)]
    );
}

#[test]
fn visit_range_reads_clears_and_bounds() {
    let a = AtomicDirtyBitmap::try_new(200).unwrap();
    a.set_range(10, 5).unwrap();
    a.set(130).unwrap();
    let mut seen = Vec::new();
    a.visit_range(0, 200, false, |b| seen.push(b)).unwrap();
    assert_eq!(seen, [10, 11, 12, 13, 14, 130]);
    assert_eq!(a.count_ones(), 6, "a read without clear keeps the bits");
    seen.clear();
    a.visit_range(12, 120, true, |b| seen.push(b)).unwrap();
    assert_eq!(seen, [12, 13, 14, 130]);
    assert_eq!(a.count_ones(), 2, "bits outside the range survive");
    assert!(a.is_set(10) && a.is_set(11));
    assert_eq!(
        a.visit_range(150, 51, true, |_| ()),
        Err(BitmapError::OutOfRange {
            first: 150,
            count: 51,
            len: 200
        })
    );
    a.clear_all();
    assert_eq!(a.count_ones(), 0);
}

#[test]
fn read_and_clear_range_into_places_bits_at_offset() {
    let a = AtomicDirtyBitmap::new(100);
    a.set_range(40, 30).unwrap();
    let mut dst = [1u64 << 63, 0];
    a.read_and_clear_range_into(50, 10, &mut dst, 60).unwrap();
    // Bits 50..60 land on dst bits 60..70; the caller's bit 63 stays.
    assert_eq!(dst, [(0xF << 60) | (1 << 63), 0x3F]);
    assert_eq!(a.count_ones(), 20);
    assert!(!a.is_set(55) && a.is_set(49) && a.is_set(60));
    // A destination too small is refused before anything is cleared.
    assert!(a
        .read_and_clear_range_into(40, 10, &mut [0u64; 1], 60)
        .is_err());
    assert!(a.is_set(40));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn word_masks_match_oracle(first in 0u64..400, count in 0u64..400) {
        prop_assert_eq!(word_masks(first, count).collect::<Vec<_>>(), masks_oracle(first, count));
    }

    /// Any sequence of set_range / visit_range (clearing or not) / read_and_clear_range_into
    /// leaves the bitmap, the visited bits and the destination exactly as the oracle does.
    #[test]
    fn range_ops_match_oracle(
        bits in 1u64..500,
        ops in proptest::collection::vec((0u8..4, 0u64..520, 0u64..300, 0u64..200), 0..24),
    ) {
        let a = AtomicDirtyBitmap::new(bits);
        let mut model = vec![false; bits as usize];
        let mut dst = vec![0u64; 8];
        let mut dst_model = vec![false; 8 * 64];
        for (op, first, count, at) in ops {
            let fits = first + count <= bits;
            match op {
                0 => {
                    prop_assert_eq!(a.set_range(first, count).is_ok(), fits);
                    if fits {
                        model[first as usize..(first + count) as usize].fill(true);
                    }
                }
                1 | 2 => {
                    let clear = op == 2;
                    let mut seen = Vec::new();
                    prop_assert_eq!(a.visit_range(first, count, clear, |b| seen.push(b)).is_ok(), fits);
                    let mut want = Vec::new();
                    if fits {
                        for b in first..first + count {
                            if model[b as usize] {
                                want.push(b);
                                if clear {
                                    model[b as usize] = false;
                                }
                            }
                        }
                    }
                    prop_assert_eq!(seen, want);
                }
                _ => {
                    let ok = fits && at + count <= 8 * 64;
                    prop_assert_eq!(a.read_and_clear_range_into(first, count, &mut dst, at).is_ok(), ok);
                    if ok {
                        for j in 0..count {
                            let b = (first + j) as usize;
                            if std::mem::take(&mut model[b]) {
                                dst_model[(at + j) as usize] = true;
                            }
                        }
                    }
                }
            }
            for (b, &m) in model.iter().enumerate() {
                prop_assert_eq!(a.is_set(b as u64), m, "bit {}", b);
            }
            for (t, &m) in dst_model.iter().enumerate() {
                prop_assert_eq!(dst[t / 64] >> (t % 64) & 1 == 1, m, "dst bit {}", t);
            }
        }
    }
}
