//! Maximal runs of set bits, found a word at a time.

use super::words::{mask, tail_mask, words_for};

/// Iterator over the maximal runs of set bits of a bitmap, as `(first_bit, len)`, in
/// increasing order.
///
/// It works on words, not bits: clean words are skipped eight at a time, all-ones words are
/// swallowed whole, and `trailing_zeros` / `trailing_ones` find run edges inside a word. A
/// run that crosses word boundaries is yielded once.
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
    /// Valid bits of `words[last]`.
    last_mask: u64,
    /// Index of the word `cur` came from.
    idx: usize,
    /// Bits of `words[idx]` not yet yielded.
    cur: u64,
    /// Non-zero words of the last scanned chunk not yet visited: bit k = `words[pbase + k]`.
    /// Kept so a chunk is reduced once, not once per run inside it.
    pending: u32,
    /// First word of the chunk `pending` describes.
    pbase: usize,
    /// Next word to scan; every word in `idx + 1..next_scan` not in `pending` is zero.
    next_scan: usize,
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

    /// Move to the next non-zero word after `idx`; `false` when there is none. Clean
    /// 8-word chunks cost one OR reduction; a dirty chunk's non-zero words become the
    /// `pending` mask, walked with `trailing_zeros`.
    #[inline]
    fn advance(&mut self) -> bool {
        let n = self.words.len();
        loop {
            if self.pending != 0 {
                let k = self.pending.trailing_zeros() as usize;
                self.pending &= self.pending - 1;
                self.idx = self.pbase + k;
                self.cur = self.load(self.idx);
                if self.cur != 0 {
                    return true;
                }
                continue; // only the masked last word can read as zero here
            }
            // Tight skip over clean chunks, then describe the first dirty one.
            let mut i = self.next_scan;
            while let Some(c) = self.words.get(i..).and_then(|s| s.first_chunk::<8>()) {
                if c.iter().fold(0, |a, &w| a | w) != 0 {
                    break;
                }
                i += 8;
            }
            if i >= n {
                self.cur = 0;
                self.next_scan = n;
                return false;
            }
            let end = (i + 8).min(n);
            let nonzero = |m: u32, (k, &w): (usize, &u64)| m | (u32::from(w != 0) << k);
            // Fixed-size chunk: unrolled, branch-free compares; the tail chunk is rare.
            let m = match self.words[i..].first_chunk::<8>() {
                Some(c) => c.iter().enumerate().fold(0u32, nonzero),
                None => self.words[i..end].iter().enumerate().fold(0u32, nonzero),
            };
            self.pbase = i;
            self.pending = m;
            self.next_scan = end;
        }
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
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    #[inline]
    fn next(&mut self) -> Option<(u64, u64)> {
        if self.cur == 0 && !self.advance() {
            return None;
        }
        let n = self.words.len();
        let cur = self.cur;
        let tz = cur.trailing_zeros();
        let start = self.idx as u64 * 64 + tz as u64;
        let ones = (cur >> tz).trailing_ones();
        if tz + ones < 64 {
            // The run ends inside this word. Clear it without branches: adding its lowest
            // bit carries through the run, and the AND drops the carry-out bit.
            self.cur = cur & cur.wrapping_add(cur & cur.wrapping_neg());
            return Some((start, ones as u64));
        }
        // The run reaches the word's top bit: swallow all-ones words, then finish in the
        // first word that is not all ones.
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
                                          // Words up to j are consumed: drop them from the scan state.
        if j >= self.next_scan {
            self.pending = 0;
            self.next_scan = j + 1;
        } else {
            self.pending &= !((1u32 << (j + 1 - self.pbase)) - 1);
        }
        Some((start, j as u64 * 64 + t as u64 - start))
    }
}

impl std::iter::FusedIterator for Runs<'_> {}
