//! Maximal runs of set bits, found a word at a time.

use super::words::{mask, tail_mask, words_for};

/// Words described by one non-zero mask (one bit per word of a `u64`).
const BLOCK: usize = 64;

/// Iterator over the maximal runs of set bits of a bitmap, as `(first_bit, len)`, in
/// increasing order. It allocates nothing.
///
/// It works on words, not bits, and keeps mispredicted branches to about one per block of
/// 64 words rather than one per run or per set bit, since at low dirty rates those
/// mispredictions, not the memory traffic, are what a scan costs:
///
/// * the scan reads 64 words at a time and reduces them, without a branch per word, to a
///   `u64` mask of the non-zero ones (SSE2 packs on x86_64: about one instruction per
///   word, so a clean block costs what an OR over it would);
/// * that mask is walked with `trailing_zeros`, so clean words inside a dirty block cost
///   nothing;
/// * inside a word, `trailing_zeros` / `trailing_ones` find a run's edges and an add clears
///   it; all-ones words are swallowed whole, so a run crossing words is yielded once.
///
/// ```
/// use iovatrack::bitmap::Runs;
///
/// // bits 1..=3 and 62..=65 (crossing into word 1); bit 70 is past the 70-bit length.
/// let words = [0b1110 | (0b11 << 62), 0b11 | (1 << 6)];
/// let runs: Vec<_> = Runs::new(&words, 70).collect();
/// assert_eq!(runs, [(1, 3), (62, 4)]);
/// ```
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    /// Words up to and including the last one holding a valid bit.
    words: &'a [u64],
    /// Valid bits of the last word of `words`.
    last_mask: u64,
    /// Index of the word `cur` came from.
    idx: usize,
    /// Bits of `words[idx]` not yet yielded.
    cur: u64,
    /// Non-zero words of the last scanned block not yet visited: bit k = `words[pbase + k]`.
    pending: u64,
    /// First word of the block `pending` describes.
    pbase: usize,
    /// Next word to scan; every word in `idx + 1..next_scan` not in `pending` is zero.
    next_scan: usize,
}

/// Bit k set iff word k of the slice (at most 64 words) is non-zero, computed without a
/// branch per word: the dirty words of a block are in unpredictable places.
#[inline(always)]
fn nonzero_mask(c: &[u64]) -> u64 {
    c.iter().rev().fold(0, |m, &w| (m << 1) | u64::from(w != 0))
}

/// [`nonzero_mask`] of a whole block, with SSE2 (part of every x86_64 CPU): saturating
/// packs keep zero as zero and non-zero as non-zero, so three rounds of packing narrow
/// 16 words to 16 bytes, each zero iff its word is, and one compare and `movemask` give
/// their bits. About one instruction per word, against four or five for the scalar fold,
/// which made computing the mask cost more than the rest of a sparse scan.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn block_mask(c: &[u64; BLOCK]) -> u64 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_packs_epi16, _mm_packs_epi32,
        _mm_setzero_si128,
    };
    let mut m = 0u64;
    for (q, c16) in c.chunks_exact(16).enumerate() {
        // SAFETY: SSE2 is part of the x86_64 baseline, so the intrinsics are supported by
        // every CPU this code runs on; each load reads words `i` and `i + 1` of the 16-word
        // chunk `c16` (i <= 14), so 16 bytes inside the slice (unaligned loads are allowed).
        let zero_words = unsafe {
            let v = |i: usize| _mm_loadu_si128(c16.as_ptr().add(i).cast());
            // i32 -> i16 -> i8 saturation: each step keeps a lane zero iff it was zero.
            let p0 = _mm_packs_epi32(v(0), v(2)); // words 0..4 as 8 i16 halves
            let p1 = _mm_packs_epi32(v(4), v(6));
            let p2 = _mm_packs_epi32(v(8), v(10));
            let p3 = _mm_packs_epi32(v(12), v(14));
            // Bytes 2k, 2k+1 are word k's halves: as an i16 lane they are zero iff the word
            // is, and the last pack brings that lane down to one byte per word.
            let words = _mm_packs_epi16(_mm_packs_epi16(p0, p1), _mm_packs_epi16(p2, p3));
            _mm_movemask_epi8(_mm_cmpeq_epi8(words, _mm_setzero_si128())) as u32 as u64
        };
        m |= (!zero_words & 0xffff) << (16 * q);
    }
    m
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn block_mask(c: &[u64; BLOCK]) -> u64 {
    nonzero_mask(c)
}

impl<'a> Runs<'a> {
    /// Runs of the first `bits` bits of `words` (bits past the end of `words` count as
    /// clear, bits at or past `bits` are ignored).
    pub fn new(words: &'a [u64], bits: u64) -> Self {
        Self::range(words, 0, bits)
    }

    /// Runs within bits `lo..hi` only (clipped to `words`); runs are cut at both ends.
    pub(crate) fn range(words: &'a [u64], lo: u64, hi: u64) -> Self {
        let hi = hi.min(words.len() as u64 * 64);
        if lo >= hi {
            return Self {
                words: &[],
                last_mask: 0,
                idx: 0,
                cur: 0,
                pending: 0,
                pbase: 0,
                next_scan: 0,
            };
        }
        let n = words_for(hi);
        let words = &words[..n];
        let last_mask = tail_mask(hi);
        let idx = (lo / 64) as usize;
        let mut cur = words[idx] & mask((lo % 64) as u32, 64);
        if idx == n - 1 {
            cur &= last_mask;
        }
        Self {
            words,
            last_mask,
            idx,
            cur,
            pending: 0,
            pbase: 0,
            next_scan: idx + 1,
        }
    }

    /// Describe the next dirty block at or after `next_scan` in `pending`; `false` when the
    /// rest of the bitmap is clean. Out of line: it runs once per block, and keeping it
    /// out of `next` lets `next` inline into the caller's loop.
    #[inline]
    fn scan(&mut self) -> bool {
        let n = self.words.len();
        let mut i = self.next_scan;
        while let Some(c) = self.words.get(i..).and_then(|s| s.first_chunk::<BLOCK>()) {
            let m = block_mask(c);
            if m != 0 {
                self.pending = m;
                self.pbase = i;
                self.next_scan = i + BLOCK;
                return true;
            }
            i += BLOCK;
        }
        // Fewer than a block left: described in one go (the masked last word may read as
        // zero later; `next` skips it).
        self.pending = nonzero_mask(self.words.get(i..).unwrap_or(&[]));
        self.pbase = i;
        self.next_scan = n;
        self.pending != 0
    }

    #[inline]
    fn load(&self, i: usize) -> u64 {
        let w = self.words[i];
        if i + 1 == self.words.len() {
            w & self.last_mask
        } else {
            w
        }
    }

    /// Forget scan state for words up to and including `j`, which a crossing run consumed.
    #[inline]
    fn consumed_through(&mut self, j: usize) {
        if j >= self.next_scan {
            self.pending = 0;
            self.next_scan = j + 1;
        } else {
            // Keep only the pending words after `j` (`j - pbase` < 64 here).
            self.pending &= u64::MAX
                .checked_shl((j - self.pbase + 1) as u32)
                .unwrap_or(0);
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    #[inline]
    fn next(&mut self) -> Option<(u64, u64)> {
        while self.cur == 0 {
            if self.pending == 0 && !self.scan() {
                return None;
            }
            let k = self.pending.trailing_zeros() as usize;
            self.pending &= self.pending - 1;
            self.idx = self.pbase + k;
            // Non-zero unless it is the masked last word.
            self.cur = self.load(self.idx);
        }
        let cur = self.cur;
        let tz = cur.trailing_zeros();
        let start = self.idx as u64 * 64 + u64::from(tz);
        let ones = (cur >> tz).trailing_ones();
        if tz + ones < 64 {
            // The run ends inside this word. Clear it without branches: adding its lowest
            // bit carries through the run, and the AND drops the carry-out bit.
            self.cur = cur & cur.wrapping_add(cur & cur.wrapping_neg());
            return Some((start, u64::from(ones)));
        }
        // The run reaches the word's top bit: swallow all-ones words, then finish in the
        // first word that is not all ones.
        let n = self.words.len();
        let mut j = self.idx + 1;
        while j < n && self.load(j) == u64::MAX {
            j += 1;
        }
        if j == n {
            self.idx = n - 1;
            self.cur = 0;
            self.pending = 0;
            self.next_scan = n;
            return Some((start, n as u64 * 64 - start));
        }
        let w = self.load(j);
        let t = w.trailing_ones(); // < 64 since w != MAX
        self.idx = j;
        self.cur = w & w.wrapping_add(1); // clear the run at bit 0
        self.consumed_through(j);
        Some((start, j as u64 * 64 + u64::from(t) - start))
    }

    /// Internal iteration (what `for_each`, `sum`, `count` and adapters such as `map`
    /// consume through): the same runs, with the scan state in registers. Words are handled
    /// one at a time; a run that reaches a word's top bit stays open and is closed by the
    /// next non-zero word (if it continues at bit 0) or yielded where it ended.
    fn fold<B, F>(mut self, init: B, mut f: F) -> B
    where
        F: FnMut(B, Self::Item) -> B,
    {
        let mut acc = init;
        // Finish the word and block `next` may have started: what is left then starts at
        // `next_scan`, with nothing pending.
        while self.cur != 0 || self.pending != 0 {
            match self.next() {
                Some(r) => acc = f(acc, r),
                None => return acc,
            }
        }
        let (words, n) = (self.words, self.words.len());
        let mut i = self.next_scan;
        if i >= n {
            return acc;
        }
        let mut open = None;
        // Whole blocks that stop short of the last word, which alone needs masking.
        while n - 1 - i >= BLOCK {
            let Some(c) = words[i..].first_chunk::<BLOCK>() else {
                break; // unreachable: at least BLOCK + 1 words remain
            };
            let mut m = block_mask(c);
            while m != 0 {
                let k = m.trailing_zeros() as usize;
                m &= m - 1;
                acc = word_runs(i + k, c[k], &mut open, acc, &mut f);
            }
            i += BLOCK;
        }
        // The rest, at most a block, the last word masked to the valid bits.
        let last = words[n - 1] & self.last_mask;
        let rest = &words[i..n - 1];
        let mut m = nonzero_mask(rest) | (u64::from(last != 0) << rest.len());
        while m != 0 {
            let k = m.trailing_zeros() as usize;
            m &= m - 1;
            let w = rest.get(k).copied().unwrap_or(last);
            acc = word_runs(i + k, w, &mut open, acc, &mut f);
        }
        if let Some((start, end_word)) = open {
            acc = f(acc, (start, end_word as u64 * 64 - start));
        }
        acc
    }
}

/// The runs of non-zero word `j` (value `w`) for [`Runs::fold`]. `open` is a run that
/// reached the top bit of an earlier word, as (first bit, index of the word it would
/// continue in); it is closed here or extended past `j`.
#[inline(always)]
fn word_runs<B, F>(
    j: usize,
    mut w: u64,
    open: &mut Option<(u64, usize)>,
    mut acc: B,
    f: &mut F,
) -> B
where
    F: FnMut(B, (u64, u64)) -> B,
{
    let base = j as u64 * 64;
    if let Some((start, next_word)) = open.take() {
        if next_word == j && w & 1 != 0 {
            let t = w.trailing_ones();
            if t == 64 {
                *open = Some((start, j + 1));
                return acc;
            }
            acc = f(acc, (start, base + u64::from(t) - start));
            w &= w.wrapping_add(1); // clear the run at bit 0
        } else {
            acc = f(acc, (start, next_word as u64 * 64 - start));
        }
    }
    while w != 0 {
        let tz = w.trailing_zeros();
        let ones = (w >> tz).trailing_ones();
        if tz + ones == 64 {
            *open = Some((base + u64::from(tz), j + 1));
            break;
        }
        acc = f(acc, (base + u64::from(tz), u64::from(ones)));
        // Adding the run's lowest bit carries through it; the AND drops the carry-out.
        w &= w.wrapping_add(w & w.wrapping_neg());
    }
    acc
}

impl std::iter::FusedIterator for Runs<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The SSE2 block mask is the scalar one, for words non-zero in either half only.
        #[test]
        fn block_mask_is_the_scalar_mask(words in proptest::collection::vec(prop_oneof![
            3 => Just(0u64),
            1 => any::<u64>(),
            2 => (0u32..64).prop_map(|b| 1u64 << b),
        ], BLOCK)) {
            let c: &[u64; BLOCK] = words.as_slice().try_into().unwrap();
            prop_assert_eq!(block_mask(c), nonzero_mask(c));
        }
    }
}
