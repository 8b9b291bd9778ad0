//! Unit tests and property tests against brute-force oracles.

use super::words::{mask, tail_mask};
use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Set bits of a bitmap, one by one (the oracle's view).
fn bits_of(words: &[u64], bits: u64) -> BTreeSet<u64> {
    (0..bits)
        .filter(|&k| {
            words
                .get((k / 64) as usize)
                .is_some_and(|w| w >> (k % 64) & 1 == 1)
        })
        .collect()
}

fn tail_clean(b: &DirtyBitmap) -> bool {
    b.words()
        .last()
        .is_none_or(|&w| w & !tail_mask(b.len()) == 0)
}

fn from_set(bits: u64, set: &BTreeSet<u64>) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(bits);
    for &k in set {
        b.set(k).unwrap();
    }
    b
}

/// Runs rebuilt bit by bit; also checks they are sorted, non-empty and maximal.
fn check_runs(words: &[u64], bits: u64) -> Result<(), String> {
    let mut rebuilt = BTreeSet::new();
    let mut prev_end: Option<u64> = None;
    for (first, len) in Runs::new(words, bits) {
        if len == 0 {
            return Err(format!("empty run at {first}"));
        }
        if let Some(e) = prev_end {
            if first <= e {
                return Err(format!(
                    "run at {first} touches or overlaps previous end {e}"
                ));
            }
        }
        prev_end = Some(first + len);
        rebuilt.extend(first..first + len);
    }
    let want = bits_of(words, bits);
    if rebuilt != want {
        return Err(format!(
            "runs give {} bits, bitmap has {}",
            rebuilt.len(),
            want.len()
        ));
    }
    Ok(())
}

/// The regranularisation oracle: destination page j is dirty iff some set source page
/// shares a byte with it.
fn oracle_regranular(dst_geo: &Geometry, src: &[u64], src_geo: &Geometry) -> BTreeSet<u64> {
    let src_set = bits_of(src, src_geo.bits());
    let (sb, sp) = (src_geo.base() as u128, src_geo.page() as u128);
    let (db, dp) = (dst_geo.base() as u128, dst_geo.page() as u128);
    (0..dst_geo.bits())
        .filter(|&j| {
            let (a, b) = (db + j as u128 * dp, db + (j + 1) as u128 * dp);
            src_set.iter().any(|&i| {
                let (c, d) = (sb + i as u128 * sp, sb + (i + 1) as u128 * sp);
                c < b && a < d
            })
        })
        .collect()
}

/// Compare a regranularised destination against the oracle (`before` = its prior bits).
fn check_regranular(
    got: &[u64],
    before: &BTreeSet<u64>,
    dst_geo: &Geometry,
    src: &[u64],
    src_geo: &Geometry,
) -> Result<(), String> {
    let mut want = oracle_regranular(dst_geo, src, src_geo);
    want.extend(before);
    let got_set = bits_of(got, dst_geo.bits());
    if got_set != want {
        let missing: Vec<_> = want.difference(&got_set).take(5).collect();
        let extra: Vec<_> = got_set.difference(&want).take(5).collect();
        return Err(format!("missing {missing:?} extra {extra:?}"));
    }
    let n = dst_geo.words();
    if n > 0 && got[n - 1] & !tail_mask(dst_geo.bits()) != 0 {
        return Err("tail bits set".into());
    }
    if got[n..].iter().any(|&w| w != 0) {
        return Err("words past the geometry touched".into());
    }
    Ok(())
}

// ---------------------------------------------------------------- unit tests

#[test]
fn masks() {
    assert_eq!(mask(0, 64), u64::MAX);
    assert_eq!(mask(3, 3), 0);
    assert_eq!(mask(1, 4), 0b1110);
    assert_eq!(mask(63, 64), 1 << 63);
    assert_eq!(tail_mask(64), u64::MAX);
    assert_eq!(tail_mask(65), 1);
}

#[test]
fn errors_not_panics() {
    let mut b = DirtyBitmap::new(100);
    assert_eq!(
        b.set(100),
        Err(BitmapError::OutOfRange {
            first: 100,
            count: 1,
            len: 100
        })
    );
    assert!(b.set_range(u64::MAX, 2).is_err());
    assert!(b.set_range(90, 11).is_err());
    assert!(b.set_range(100, 0).is_ok());
    assert!(b.or_assign(&DirtyBitmap::new(99)).is_err());
    assert!(b.take_into(&mut DirtyBitmap::new(101)).is_err());
    assert!(b.or_words(&[0]).is_err());
    assert!(DirtyBitmap::from_words(vec![0; 3], 100).is_err());
    assert!(!b.is_set(1000));
    assert_eq!(b.count_ones(), 0);
    let a = AtomicDirtyBitmap::new(10);
    assert!(a.set(10).is_err());
    assert!(a.set_range(5, 6).is_err());
    assert!(a.read_and_clear_into(&mut b).is_err());
    assert_eq!(
        Geometry::new(0, 2048, 1),
        Err(BitmapError::BadPageSize(2048))
    );
    assert_eq!(
        Geometry::new(0, 12288, 1),
        Err(BitmapError::BadPageSize(12288))
    );
    assert!(Geometry::new(u64::MAX - 4095, 4096, 2).is_err());
    // Exactly reaching 2^64 is a valid span (the top page).
    assert!(Geometry::new(u64::MAX - 4095, 4096, 1).is_ok());
    let g = Geometry::new(0, 4096, 128).unwrap();
    assert!(or_regranular(&mut [0], &g, &[0, 0], &g).is_err());
}

#[test]
fn empty_bitmap() {
    let mut b = DirtyBitmap::new(0);
    assert!(b.is_empty());
    assert_eq!(b.words().len(), 0);
    assert_eq!(b.runs().count(), 0);
    assert!(b.set(0).is_err());
    b.or_words(&[]).unwrap();
    b.take_into(&mut DirtyBitmap::new(0)).unwrap();
}

#[test]
fn runs_edges() {
    let mut b = DirtyBitmap::new(64 * 5);
    b.set_range(63, 64 * 3 + 2).unwrap(); // 63..=257: crosses full words
    b.set(300).unwrap();
    b.set(319).unwrap();
    assert_eq!(
        b.runs().collect::<Vec<_>>(),
        [(63, 194), (300, 1), (319, 1)]
    );
    b.set_range(0, 320).unwrap();
    assert_eq!(b.runs().collect::<Vec<_>>(), [(0, 320)]);
    let full = DirtyBitmap::from_words(vec![u64::MAX; 3], 130).unwrap();
    assert_eq!(full.runs().collect::<Vec<_>>(), [(0, 130)]);
    assert_eq!(full.count_ones(), 130);
}

#[test]
fn runs_chunk_scan_edges() {
    // Dirty words at chunk edges, a crossing run that ends inside a scanned chunk, a clean
    // remainder shorter than a chunk, and garbage past the length in the last word.
    let mut w = vec![0u64; 27];
    w[0] = 1;
    w[7] = 1 << 63;
    w[8] = 0b111;
    w[9] = 1 << 5;
    w[15] = u64::MAX;
    w[16] = u64::MAX;
    w[17] = 0b1 | 1 << 9;
    w[26] = u64::MAX << 3; // only bits 3.. of the last word; length ends at bit 26*64+5
    let runs: Vec<_> = Runs::new(&w, 26 * 64 + 5).collect();
    assert_eq!(
        runs,
        [
            (0, 1),
            (7 * 64 + 63, 4),
            (9 * 64 + 5, 1),
            (15 * 64, 129),
            (17 * 64 + 9, 1),
            (26 * 64 + 3, 2),
        ]
    );
    assert!(check_runs(&w, 26 * 64 + 5).is_ok());
}

#[test]
fn runs_fold_block_edges() {
    // A run crossing from the last word of one 64-word block into the next, one crossing
    // a whole clean-looking block of all-ones words, one ending exactly at a block edge,
    // and a run reaching the masked last word.
    let mut w = vec![0u64; 64 * 3 + 2];
    w[63] = 1 << 63;
    w[64] = 0b11;
    w[100] = 1 << 63;
    w[101..=190].fill(u64::MAX);
    w[191] = 1;
    w[192] = 1 << 63;
    w[193] = u64::MAX;
    let bits = 193 * 64 + 10;
    let want = oracle_runs(&w, 0, bits);
    assert_eq!(
        want,
        [
            (63 * 64 + 63, 3),
            (100 * 64 + 63, 1 + 90 * 64 + 1),
            (192 * 64 + 63, 11)
        ]
    );
    assert_eq!(Runs::new(&w, bits).collect::<Vec<_>>(), want);
    let folded = Runs::new(&w, bits).fold(Vec::new(), |mut v, r| {
        v.push(r);
        v
    });
    assert_eq!(folded, want);
    assert_eq!(Runs::new(&w, bits).count(), 3);
}

#[test]
fn words_mut_guard_keeps_tail_clear() {
    let mut b = DirtyBitmap::new(70);
    b.words_mut().fill(u64::MAX); // as a careless ioctl might
    assert!(tail_clean(&b));
    assert_eq!(b.count_ones(), 70);
    assert_eq!(b.runs().collect::<Vec<_>>(), [(0, 70)]);
}

#[test]
fn regranular_partial_overlap_marks_every_page() {
    // 2 MiB device page at [2 MiB, 4 MiB); 4 KiB destination at [3 MiB, 3 MiB + 8 KiB).
    let src_geo = Geometry::new(2 << 20, 2 << 20, 1).unwrap();
    let dst_geo = Geometry::new(3 << 20, 4096, 2).unwrap();
    let mut dst = [0u64];
    or_regranular(&mut dst, &dst_geo, &[1], &src_geo).unwrap();
    assert_eq!(dst[0], 0b11);
    // A 4 KiB page straddling no coarse boundary still sets the coarse page it lies in,
    // even when the coarse bitmap starts mid-page relative to the fine one.
    let fine = Geometry::new(4096, 4096, 1024).unwrap();
    let coarse = Geometry::new(1 << 20, 2 << 20, 2).unwrap();
    let mut src = [0u64; 16];
    src[0] = 1 << 10; // [44 KiB, 48 KiB): before the coarse bitmap starts
    src[15] = 1 << 63; // page 1023 = [4 MiB, 4 MiB + 4 KiB): inside coarse bit 1
    let mut out = [0u64];
    or_regranular(&mut out, &coarse, &src, &fine).unwrap();
    assert_eq!(out[0], 0b10);
    assert!(check_regranular(&out, &BTreeSet::new(), &coarse, &src, &fine).is_ok());
}

#[test]
fn regranular_top_of_address_space() {
    let base = u64::MAX - (8 << 20) + 1; // last 8 MiB
    let src_geo = Geometry::new(base, 2 << 20, 4).unwrap();
    let dst_geo = Geometry::new(base, 4096, 2048).unwrap();
    let mut dst = vec![0u64; 32];
    or_regranular(&mut dst, &dst_geo, &[0b1000], &src_geo).unwrap();
    let runs: Vec<_> = Runs::new(&dst, 2048).collect();
    assert_eq!(runs, [(1536, 512)]);
}

/// The oracle comparison is not vacuous: dropping or adding one bit is caught.
#[test]
fn oracle_catches_broken_results() {
    let src_geo = Geometry::new(0, 2 << 20, 3).unwrap();
    let dst_geo = Geometry::new(1 << 20, 4096, 1024).unwrap();
    let src = [0b101u64];
    let mut dst = vec![0u64; 16];
    or_regranular(&mut dst, &dst_geo, &src, &src_geo).unwrap();
    let none = BTreeSet::new();
    assert!(check_regranular(&dst, &none, &dst_geo, &src, &src_geo).is_ok());
    let mut dropped = dst.clone();
    dropped[12] &= !(1 << 7); // a page under source bit 2
    let err = check_regranular(&dropped, &none, &dst_geo, &src, &src_geo).unwrap_err();
    assert!(err.contains("missing [775]"), "{err}");
    let mut extra = dst.clone();
    extra[5] |= 1; // page 320: under clean source bit 1
    assert!(check_regranular(&extra, &none, &dst_geo, &src, &src_geo).is_err());
    // And the runs check catches a run iterator that would lose a bit.
    let words = [0b1011u64];
    assert!(check_runs(&words, 64).is_ok());
    assert_ne!(bits_of(&words, 64), bits_of(&[0b1001], 64));
}

/// Threads setting overlapping ranges at once: every bit set more than once is counted as
/// already set exactly (sets − distinct bits), whoever came first.
#[test]
fn atomic_counting_sets_race_exactly() {
    const BITS: u64 = 64 * 40 + 5;
    let log = AtomicDirtyBitmap::new(BITS);
    let counted: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let log = &log;
                s.spawn(move || {
                    (0..BITS / 7)
                        .map(|k| log.set_range_counting((k * 7 + t) % (BITS - 9), 9).unwrap())
                        .sum::<u64>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let sets = 4 * (BITS / 7) * 9;
    assert_eq!(counted, sets - log.count_ones());
}

#[test]
fn atomic_concurrent_writers_and_drainer() {
    const BITS: u64 = 64 * 97 + 13;
    const WRITERS: u64 = 3;
    let log = Arc::new(AtomicDirtyBitmap::new(BITS));
    let written = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let drainer = {
        let (log, done) = (log.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = DirtyBitmap::new(BITS);
            let mut pass = DirtyBitmap::new(BITS);
            let mut passes = 0u32;
            loop {
                let finished = done.load(Ordering::Acquire);
                pass.clear();
                log.read_and_clear_into(&mut pass).unwrap();
                pass.take_into(&mut seen).unwrap();
                passes += 1;
                if finished {
                    return (seen, passes);
                }
                std::thread::yield_now();
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (log, written) = (log.clone(), written.clone());
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                let mut mine = BTreeSet::new();
                for _ in 0..2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let first = x % BITS;
                    let count = (x >> 40) % 150 % (BITS - first) + 1;
                    log.set_range(first, count).unwrap();
                    mine.extend(first..first + count);
                }
                written.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let (seen, passes) = drainer.join().unwrap();
    assert!(passes >= 1);
    assert_eq!(bits_of(seen.words(), BITS), *written.lock().unwrap());
    assert_eq!(log.count_ones(), 0);
    assert!(tail_clean(&seen));
}

// ---------------------------------------------------------------- property tests

fn arb_bitmap(max_bits: u64) -> impl Strategy<Value = (Vec<u64>, u64)> {
    (0..=max_bits).prop_flat_map(|bits| {
        let n = bits.div_ceil(64) as usize;
        // Mix dense, sparse and all-ones words so runs cross words.
        let word = prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            any::<u64>(),
            any::<u64>().prop_map(|w| w & (w >> 1) & (w >> 2)),
        ];
        (proptest::collection::vec(word, n), Just(bits))
    })
}

/// Maximal runs of set bits in `lo..hi`, bit by bit: the oracle for [`Runs`].
fn oracle_runs(words: &[u64], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for k in bits_of(words, hi).into_iter().filter(|&k| k >= lo) {
        match out.last_mut() {
            Some((f, l)) if *f + *l == k => *l += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

/// Bitmaps of up to `max_words` words, mostly clean (so whole 64-word blocks are skipped),
/// with single bits, words' top and bottom bits (runs crossing words and blocks), all-ones
/// streaks and random words; `bits` may end inside the last word.
fn arb_sparse_bitmap(max_words: usize) -> impl Strategy<Value = (Vec<u64>, u64)> {
    let word = prop_oneof![
        12 => Just(0u64),
        2 => Just(u64::MAX),
        1 => Just(1u64 << 63),
        1 => Just(1u64),
        1 => Just(1u64 << 63 | 1),
        1 => (0u32..64).prop_map(|b| 1u64 << b),
        1 => any::<u64>(),
    ];
    (proptest::collection::vec(word, 0..=max_words), 0u64..64).prop_map(|(words, cut)| {
        let bits = (words.len() as u64 * 64).saturating_sub(cut);
        (words, bits)
    })
}

/// Power-of-two page sizes from 4 KiB to 4 MiB, weighted to the interesting ones.
fn arb_page() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(4096u64),
        Just(8192),
        Just(64 << 10),
        Just(256 << 10),
        Just(2 << 20),
        (12u32..=22).prop_map(|s| 1u64 << s),
    ]
}

/// A geometry with a base that is either any 4 KiB multiple in the first 16 MiB or a
/// multiple of its own page (to reach the aligned fast paths).
fn arb_geo(max_bits: u64) -> impl Strategy<Value = Geometry> {
    (arb_page(), 0..=max_bits, 0u64..4096, any::<bool>()).prop_map(|(page, bits, k, own)| {
        let base = if own { (k % 16) * page } else { k * 4096 };
        Geometry::new(base, page, bits).unwrap()
    })
}

#[derive(Clone, Debug)]
enum Op {
    Set(u64),
    SetRange(u64, u64),
    OrWords(Vec<u64>),
    ScribbleWordsMut,
    TakeInto,
    Clear,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn or_words_counting_counts_new_bits((a, bits) in arb_bitmap(700), seed in any::<u64>()) {
        let mut dst = DirtyBitmap::from_words(a, bits).unwrap();
        // a source of the same length, garbage tail included
        let src: Vec<u64> = (0..dst.words().len() as u64).map(|i| (seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(i as u32 % 64)).collect();
        let mut want = dst.clone();
        want.or_words(&src).unwrap();
        let before = dst.count_ones();
        let new = dst.or_words_counting(&src).unwrap();
        prop_assert_eq!(&dst, &want);
        prop_assert_eq!(new, want.count_ones() - before);
    }


    #[test]
    fn set_range_matches_oracle(bits in 1u64..700, ranges in proptest::collection::vec((0u64..700, 0u64..300), 0..12)) {
        let mut b = DirtyBitmap::new(bits);
        let mut want = BTreeSet::new();
        for (first, count) in ranges {
            let ok = first.checked_add(count).is_some_and(|e| e <= bits);
            prop_assert_eq!(b.set_range(first, count).is_ok(), ok);
            if ok {
                want.extend(first..first + count);
            }
        }
        prop_assert_eq!(bits_of(b.words(), bits), want.clone());
        prop_assert_eq!(b.count_ones(), want.len() as u64);
        prop_assert!(tail_clean(&b));
        for k in 0..bits {
            prop_assert_eq!(b.is_set(k), want.contains(&k));
        }
    }

    #[test]
    fn runs_round_trip((words, bits) in arb_bitmap(1200)) {
        prop_assert!(check_runs(&words, bits).is_ok(), "{:?}", check_runs(&words, bits));
        let b = DirtyBitmap::from_words(words, bits).unwrap();
        let mut rebuilt = DirtyBitmap::new(bits);
        for (first, len) in b.runs() {
            rebuilt.set_range(first, len).unwrap();
        }
        prop_assert_eq!(rebuilt, b);
    }

    #[test]
    fn runs_next_and_fold_match_the_oracle(
        (words, bits) in arb_sparse_bitmap(400),
        a in 0u64..26_000,
        b in 0u64..26_000,
        taken in 0usize..4,
    ) {
        let (lo, hi) = (a.min(b), a.max(b).min(bits));
        let want = oracle_runs(&words, lo, hi);
        let by_next: Vec<_> = Runs::range(&words, lo, hi).collect();
        prop_assert_eq!(&by_next, &want);
        let by_fold = Runs::range(&words, lo, hi).fold(Vec::new(), |mut v, r| { v.push(r); v });
        prop_assert_eq!(&by_fold, &want);
        // A partly consumed iterator folds the rest.
        let mut it = Runs::range(&words, lo, hi);
        let mut mixed: Vec<_> = it.by_ref().take(taken).collect();
        it.for_each(|r| mixed.push(r));
        prop_assert_eq!(&mixed, &want);
        let whole = Runs::new(&words, bits).fold(Vec::new(), |mut v, r| { v.push(r); v });
        prop_assert_eq!(whole, oracle_runs(&words, 0, bits));
    }

    #[test]
    fn runs_in_subrange((words, bits) in arb_bitmap(700), a in 0u64..800, b in 0u64..800) {
        let (lo, hi) = (a.min(b), a.max(b).min(bits));
        let got: BTreeSet<u64> = Runs::range(&words, lo, hi).flat_map(|(f, l)| f..f + l).collect();
        let want: BTreeSet<u64> = bits_of(&words, bits).into_iter().filter(|&k| k >= lo && k < hi).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn or_assign_and_take_into((wa, bits) in arb_bitmap(700), seed in any::<u64>()) {
        let mut x = seed | 1;
        let wb: Vec<u64> = wa.iter().map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x & x.rotate_left(7) }).collect();
        let mut a = DirtyBitmap::from_words(wa.clone(), bits).unwrap();
        let b = DirtyBitmap::from_words(wb.clone(), bits).unwrap();
        let mut want = bits_of(&wa, bits);
        want.extend(bits_of(&wb, bits));
        let mut or_words = a.clone();
        or_words.or_words(&wb).unwrap();
        a.or_assign(&b).unwrap();
        prop_assert_eq!(bits_of(a.words(), bits), want.clone());
        prop_assert_eq!(&or_words, &a);
        prop_assert!(tail_clean(&or_words));
        // take_into: dst gets the union, src ends empty.
        let mut src = b.clone();
        let mut dst = from_set(bits, &bits_of(&wa, bits));
        src.take_into(&mut dst).unwrap();
        prop_assert_eq!(bits_of(dst.words(), bits), want);
        prop_assert_eq!(src.count_ones(), 0);
    }

    #[test]
    fn atomic_matches_plain(bits in 1u64..600, ops in proptest::collection::vec((any::<bool>(), 0u64..600, 0u64..200), 0..30)) {
        let a = AtomicDirtyBitmap::new(bits);
        let mut p = DirtyBitmap::new(bits);
        for (single, first, count) in ops {
            if single {
                prop_assert_eq!(a.set(first).is_ok(), p.set(first).is_ok());
            } else if count % 2 == 0 {
                prop_assert_eq!(a.set_range(first, count).is_ok(), p.set_range(first, count).is_ok());
            } else {
                // The oracle: the bits of the range already set, counted one by one.
                let before = (first..first.saturating_add(count)).filter(|&k| p.is_set(k)).count() as u64;
                let got = a.set_range_counting(first, count);
                let plain = p.set_range_counting(first, count);
                prop_assert_eq!(got.is_ok(), plain.is_ok());
                if let (Ok(n), Ok(m)) = (got, plain) {
                    prop_assert_eq!(n, before);
                    prop_assert_eq!(m, before);
                }
            }
        }
        prop_assert_eq!(a.count_ones(), p.count_ones());
        for k in 0..bits {
            prop_assert_eq!(a.is_set(k), p.is_set(k));
        }
        let mut drained = DirtyBitmap::new(bits);
        a.read_and_clear_into(&mut drained).unwrap();
        prop_assert_eq!(&drained, &p);
        prop_assert_eq!(a.count_ones(), 0);
    }

    #[test]
    fn tail_bits_stay_zero(bits in 0u64..300, ops in proptest::collection::vec(
        prop_oneof![
            (0u64..320).prop_map(Op::Set),
            (0u64..320, 0u64..320).prop_map(|(f, c)| Op::SetRange(f, c)),
            proptest::collection::vec(any::<u64>(), 0..6).prop_map(Op::OrWords),
            Just(Op::ScribbleWordsMut),
            Just(Op::TakeInto),
            Just(Op::Clear),
        ], 0..20)) {
        let mut b = DirtyBitmap::new(bits);
        let mut other = DirtyBitmap::new(bits);
        for op in ops {
            match op {
                Op::Set(k) => { let _ = b.set(k); }
                Op::SetRange(f, c) => { let _ = b.set_range(f, c); }
                Op::OrWords(w) => { let _ = b.or_words(&w); }
                Op::ScribbleWordsMut => b.words_mut().iter_mut().for_each(|w| *w = !*w),
                Op::TakeInto => { b.take_into(&mut other).unwrap(); std::mem::swap(&mut b, &mut other); }
                Op::Clear => b.clear(),
            }
            prop_assert!(tail_clean(&b));
            prop_assert!(tail_clean(&other));
            prop_assert_eq!(b.runs().map(|(_, l)| l).sum::<u64>(), b.count_ones());
        }
    }

    #[test]
    fn regranular_matches_oracle(
        src_geo in arb_geo(300),
        dst_geo in arb_geo(300),
        seed in any::<u64>(),
        density in 0u32..4,
    ) {
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        // Source words are fully random, tail included: bits past its length must be ignored.
        let src: Vec<u64> = (0..src_geo.words()).map(|_| match density {
            0 => next() & next() & next() & next(),
            1 => next() & next(),
            2 => next(),
            _ => !(next() & next() & next()),
        }).collect();
        // The destination already holds some dirt; OR semantics must keep it. One spare
        // word past its length checks nothing is written beyond the geometry.
        let mut dst = vec![0u64; dst_geo.words() + 1];
        let before: BTreeSet<u64> = (0..dst_geo.bits()).filter(|_| next() % 16 == 0).collect();
        for &k in &before { dst[(k / 64) as usize] |= 1 << (k % 64); }
        or_regranular(&mut dst, &dst_geo, &src, &src_geo).unwrap();
        let r = check_regranular(&dst, &before, &dst_geo, &src, &src_geo);
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    /// Both directions with overlapping spans guaranteed (random geometries often miss).
    #[test]
    fn regranular_both_ways_overlapping(
        fine_shift in 12u32..16, coarse_shift in 16u32..23, fine_bits in 1u64..2000,
        off_pages in 0u64..600, coarse_bits in 1u64..40, seed in any::<u64>(), sparse in any::<bool>(),
    ) {
        let (fp, cp) = (1u64 << fine_shift, 1u64 << coarse_shift);
        let fine = Geometry::new(16 << 20, fp, fine_bits).unwrap();
        let coarse = Geometry::new((16 << 20) + off_pages * 4096 - (off_pages * 4096) % fp, cp, coarse_bits).unwrap();
        let coarse_down = Geometry::new((16 << 20) - cp, cp, coarse_bits).unwrap();
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        // Sparse: a lone bit in one word of eight, so a coarse bit can hinge on one word.
        let fine_src: Vec<u64> = (0..fine.words())
            .map(|_| if !sparse { next() & next() & next() } else if next() % 8 == 0 { 1 << (next() % 64) } else { 0 })
            .collect();
        let coarse_src: Vec<u64> = (0..coarse.words()).map(|_| next()).collect();
        let none = BTreeSet::new();
        for cg in [coarse, coarse_down] {
            let mut c = vec![0u64; cg.words()];
            or_regranular(&mut c, &cg, &fine_src, &fine).unwrap();
            let r = check_regranular(&c, &none, &cg, &fine_src, &fine);
            prop_assert!(r.is_ok(), "fold {:?}", r);
            let mut f = vec![0u64; fine.words()];
            or_regranular(&mut f, &fine, &coarse_src, &cg).unwrap();
            let r = check_regranular(&f, &none, &fine, &coarse_src, &cg);
            prop_assert!(r.is_ok(), "expand {:?}", r);
        }
    }
}
