//! Moving dirt between bitmaps of different page sizes and base addresses.

use super::runs::Runs;
use super::words::{fill_range, or_shifted, tail_mask, words_for};
use super::BitmapError;
use crate::range::is_pow2;

/// Smallest page size a bitmap may use (the kernel's REPORT minimum).
pub const MIN_PAGE: u64 = 4096;

/// Where a bitmap sits in the address space: bit k covers
/// `[base + k * page, base + (k + 1) * page)`.
///
/// ```
/// use iovatrack::bitmap::Geometry;
///
/// let g = Geometry::new(1 << 30, 2 << 20, 512)?;
/// assert_eq!(g.end(), 2 << 30);
/// assert!(Geometry::new(0, 3000, 1).is_err());
/// # Ok::<(), iovatrack::bitmap::BitmapError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    base: u64,
    page: u64,
    bits: u64,
}

impl Geometry {
    /// A geometry; `page` must be a power of two ≥ 4096 and the span must end at or below
    /// 2^64. `base` need not be page-aligned.
    pub fn new(base: u64, page: u64, bits: u64) -> Result<Self, BitmapError> {
        if !is_pow2(page) || page < MIN_PAGE {
            return Err(BitmapError::BadPageSize(page));
        }
        if base as u128 + bits as u128 * page as u128 > 1u128 << 64 {
            return Err(BitmapError::SpanOverflow { base, page, bits });
        }
        Ok(Self { base, page, bits })
    }

    /// Address of bit 0.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes per bit.
    pub fn page(&self) -> u64 {
        self.page
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Exclusive end address (may be 2^64).
    pub fn end(&self) -> u128 {
        self.base as u128 + self.bits as u128 * self.page as u128
    }

    /// Words needed to hold the bits.
    pub fn words(&self) -> usize {
        words_for(self.bits)
    }
}

/// OR the source bitmap `src` (laid out as `src_geo`) into `dst` (laid out as `dst_geo`),
/// clipped to the address overlap of the two. A destination bit is set iff any set source
/// bit's page shares at least one byte with the destination bit's page — so a coarse
/// source page that only partly overlaps the destination marks every destination page it
/// touches, and a coarse destination bit is set iff any fine source bit under it is.
///
/// Page sizes are any powers of two ≥ 4096, on either side; bases are arbitrary. Fast
/// paths: same page size with a word-aligned bit shift is a slice OR; same page size with
/// any other page-aligned shift is a two-word shifted OR; fine → coarse with the source
/// aligned to the coarse page and ≥ 64 fine bits per coarse bit folds whole words; anything
/// else walks the source's runs and sets whole destination ranges.
///
/// Bits of `src` at or past `src_geo.bits()` are ignored; `dst` bits at or past
/// `dst_geo.bits()` are never set. Returns nothing on success (callers that want the
/// number of dirty pages count the destination afterwards). Errors: a slice shorter than
/// its geometry needs.
///
/// ```
/// use iovatrack::bitmap::{or_regranular, DirtyBitmap, Geometry};
///
/// // A device reports at 2 MiB for the range [2 MiB, 6 MiB); the RAM region's 4 KiB
/// // bitmap starts at 1 MiB. Device bit 1 = [4 MiB, 6 MiB) → region pages 768..1280.
/// let dev = [0b10u64];
/// let dev_geo = Geometry::new(2 << 20, 2 << 20, 2)?;
/// let mut ram = DirtyBitmap::new(2048);
/// ram.or_regranular(1 << 20, 4096, &dev, &dev_geo)?;
/// assert_eq!(ram.runs().collect::<Vec<_>>(), [(768, 512)]);
///
/// // And back: fold the 4 KiB region into 2 MiB pages based at 0.
/// let mut coarse = [0u64];
/// let ram_geo = Geometry::new(1 << 20, 4096, 2048)?;
/// or_regranular(&mut coarse, &Geometry::new(0, 2 << 20, 5)?, ram.words(), &ram_geo)?;
/// assert_eq!(coarse[0], 0b100);
/// # Ok::<(), iovatrack::bitmap::BitmapError>(())
/// ```
pub fn or_regranular(
    dst: &mut [u64],
    dst_geo: &Geometry,
    src: &[u64],
    src_geo: &Geometry,
) -> Result<(), BitmapError> {
    for (words, geo) in [(dst.len(), dst_geo), (src.len(), src_geo)] {
        if words < geo.words() {
            return Err(BitmapError::WordCount {
                words,
                bits: geo.bits,
            });
        }
    }
    let lo = (dst_geo.base as u128).max(src_geo.base as u128);
    let hi = dst_geo.end().min(src_geo.end());
    if lo >= hi {
        return Ok(());
    }
    let (sb, sp) = (src_geo.base as u128, src_geo.page as u128);
    let (db, dp) = (dst_geo.base as u128, dst_geo.page as u128);

    if sp == dp && (sb.abs_diff(db)) % sp == 0 {
        // Same pages, bit-aligned: lo and hi are boundaries on both sides.
        let s0 = ((lo - sb) / sp) as u64;
        let t0 = ((lo - db) / dp) as u64;
        let n = ((hi - lo) / sp) as u64;
        or_shifted(dst, t0, src, s0, n);
        return Ok(());
    }

    if sp < dp && sb.abs_diff(db) % dp == 0 && dp / sp >= 64 {
        fold_words(dst, dst_geo, src, src_geo, lo, hi);
        return Ok(());
    }

    // General: each source run becomes one byte interval, clipped, then rounded outward
    // to destination pages.
    let s_lo = ((lo - sb) / sp) as u64;
    let s_hi = (hi - sb).div_ceil(sp) as u64;
    for (first, len) in Runs::range(src, s_lo, s_hi) {
        let a = (sb + first as u128 * sp).max(lo);
        let b = (sb + (first + len) as u128 * sp).min(hi);
        let j0 = ((a - db) / dp) as u64;
        let j1 = (b - db).div_ceil(dp) as u64;
        fill_range(dst, j0, j1 - j0);
    }
    Ok(())
}

/// Fine → coarse where every coarse page starts on a source word boundary: a coarse bit is
/// the OR of its `dp / sp` (a multiple of 64) source bits, i.e. of whole words.
fn fold_words(
    dst: &mut [u64],
    dst_geo: &Geometry,
    src: &[u64],
    src_geo: &Geometry,
    lo: u128,
    hi: u128,
) {
    let (sb, sp) = (src_geo.base as u128, src_geo.page as u128);
    let (db, dp) = (dst_geo.base as u128, dst_geo.page as u128);
    let group = (dp / sp / 64) as usize; // source words per destination bit
    let src_words = src_geo.words();
    let last_mask = tail_mask(src_geo.bits);
    let j_lo = ((lo - db) / dp) as u64;
    let j_hi = (hi - db).div_ceil(dp) as u64;
    for j in j_lo..j_hi {
        // Source word range of destination page j, clipped to the source.
        let start = db + j as u128 * dp;
        let w0 = if start <= sb {
            0
        } else {
            ((start - sb) / sp / 64) as usize
        };
        let w_end = if start + dp <= sb {
            0
        } else {
            (((start + dp - sb) / sp / 64) as usize).min(src_words)
        };
        let w_end = w_end.max(w0).min(w0 + group);
        let ws = &src[w0..w_end];
        let acc = match ws.split_last() {
            // The source's last word: drop bits past its length.
            Some((&tail, body)) if w_end == src_words => {
                body.iter().fold(tail & last_mask, |a, &w| a | w)
            }
            _ => ws.iter().fold(0, |a, &w| a | w),
        };
        if acc != 0 {
            dst[(j / 64) as usize] |= 1 << (j % 64);
        }
    }
}
