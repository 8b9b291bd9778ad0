//! Word-level primitives on raw `u64` bitmaps (LSB-first, bit k = word k/64, bit k%64).
//!
//! Every routine is bounds-safe: callers pass ranges already validated against the bitmap
//! length, and the slicing below would panic only on an internal bug, never on user input.

/// Mask of bits `lo..hi` of one word (`0 <= lo <= hi <= 64`).
#[inline]
pub(crate) const fn mask(lo: u32, hi: u32) -> u64 {
    if lo >= hi {
        return 0;
    }
    let top = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    top & !((1u64 << lo) - 1)
}

/// Mask of the valid bits of the last word of a `bits`-bit bitmap.
#[inline]
pub(crate) const fn tail_mask(bits: u64) -> u64 {
    match bits % 64 {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}

/// Number of words holding `bits` bits.
#[inline]
pub(crate) fn words_for(bits: u64) -> usize {
    usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX)
}

/// The words covering bits `first..=last` (`first <= last`), each with the mask of those
/// bits in it: what a per-word atomic operation on a bit range iterates over.
#[derive(Clone, Debug)]
pub(crate) struct WordMasks {
    next: u64,
    last: u64,
    done: bool,
}

/// [`WordMasks`] of bits `first..first + count`; empty when `count` is 0.
#[inline]
pub(crate) fn word_masks(first: u64, count: u64) -> WordMasks {
    WordMasks {
        next: first,
        last: first.wrapping_add(count).wrapping_sub(1),
        done: count == 0,
    }
}

impl Iterator for WordMasks {
    type Item = (usize, u64);

    #[inline]
    fn next(&mut self) -> Option<(usize, u64)> {
        if self.done {
            return None;
        }
        let w = self.next / 64;
        let lo = (self.next % 64) as u32;
        let hi = if self.last / 64 == w {
            self.done = true;
            (self.last % 64) as u32 + 1
        } else {
            64
        };
        // Cannot overflow: a word past `w` exists only when `last` lies in it.
        self.next = (w + 1).wrapping_mul(64);
        Some((w as usize, mask(lo, hi)))
    }
}

/// Set bits `first..first + count`: masked first and last words, a `fill` in between.
/// The range must lie within `words`.
pub(crate) fn fill_range(words: &mut [u64], first: u64, count: u64) {
    if count == 0 {
        return;
    }
    let last = first + count - 1;
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    let (fb, lb) = ((first % 64) as u32, (last % 64) as u32);
    if fw == lw {
        words[fw] |= mask(fb, lb + 1);
        return;
    }
    words[fw] |= mask(fb, 64);
    words[fw + 1..lw].fill(u64::MAX);
    words[lw] |= mask(0, lb + 1);
}

/// `dst[i] |= src[i]` over equal-length slices, in fixed chunks so the compiler emits wide
/// vector ORs without bounds checks.
#[inline]
pub(crate) fn or_slices(dst: &mut [u64], src: &[u64]) {
    debug_assert_eq!(dst.len(), src.len());
    const LANES: usize = 8;
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (dc, sc) in (&mut d).zip(&mut s) {
        for i in 0..LANES {
            dc[i] |= sc[i];
        }
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a |= *b;
    }
}

/// Move `src` into `dst` by OR and zero `src`. Clean 8-word chunks are only read, so a
/// sparse bitmap does not dirty its whole buffer on every pass.
pub(crate) fn take_slices(dst: &mut [u64], src: &mut [u64]) {
    debug_assert_eq!(dst.len(), src.len());
    const LANES: usize = 8;
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact_mut(LANES);
    for (dc, sc) in (&mut d).zip(&mut s) {
        if sc.iter().fold(0, |a, &w| a | w) == 0 {
            continue;
        }
        for i in 0..LANES {
            dc[i] |= sc[i];
            sc[i] = 0;
        }
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.into_remainder()) {
        *a |= std::mem::take(b);
    }
}

/// Read 64 bits of `src` starting at (possibly negative) bit `q`; bits outside `src` are 0.
#[inline]
fn window(src: &[u64], q: i128) -> u64 {
    let lo = q.div_euclid(64);
    let sh = q.rem_euclid(64) as u32;
    let get = |i: i128| -> u64 {
        if i < 0 || i >= src.len() as i128 {
            0
        } else {
            src[i as usize]
        }
    };
    if sh == 0 {
        get(lo)
    } else {
        (get(lo) >> sh) | (get(lo + 1) << (64 - sh))
    }
}

/// OR source bits `s0..s0 + n` into destination bits `t0..t0 + n` (same page size, any bit
/// shift). Word-aligned shifts are a plain slice OR; other shifts combine two source words
/// per destination word. Both ranges must lie within their slices.
pub(crate) fn or_shifted(dst: &mut [u64], t0: u64, src: &[u64], s0: u64, n: u64) {
    if n == 0 {
        return;
    }
    let t_last = t0 + n - 1;
    let (fw, lw) = ((t0 / 64) as usize, (t_last / 64) as usize);
    // Source bit q(w) that lands on bit 0 of destination word w.
    let q_of = |w: usize| -> i128 { w as i128 * 64 - t0 as i128 + s0 as i128 };
    let edge = |dst: &mut [u64], w: usize| {
        let lo = if w == fw { (t0 % 64) as u32 } else { 0 };
        let hi = if w == lw {
            (t_last % 64) as u32 + 1
        } else {
            64
        };
        dst[w] |= window(src, q_of(w)) & mask(lo, hi);
    };
    edge(dst, fw);
    if lw == fw {
        return;
    }
    // Middle words: every bit maps inside s0..s0+n, so no masks and no bounds juggling.
    let (a, m) = (fw + 1, lw - fw - 1);
    if m > 0 {
        let q = q_of(a) as u64; // >= s0 >= 0 for a middle word
        let (lo, sh) = ((q / 64) as usize, (q % 64) as u32);
        let d = &mut dst[a..a + m];
        if sh == 0 {
            or_slices(d, &src[lo..lo + m]);
        } else {
            let s = &src[lo..lo + m + 1];
            for i in 0..m {
                d[i] |= (s[i] >> sh) | (s[i + 1] << (64 - sh));
            }
        }
    }
    edge(dst, lw);
}
