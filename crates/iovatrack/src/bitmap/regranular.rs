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
    // Pages are powers of two: divide by shifting (u128 division is a libcall).
    let (sb, ss) = (src_geo.base as u128, src_geo.page.trailing_zeros());
    let (db, ds) = (dst_geo.base as u128, dst_geo.page.trailing_zeros());
    let up = |x: u128, s: u32| ((x + (1u128 << s) - 1) >> s) as u64;

    if ss == ds && (sb.abs_diff(db) >> ss) << ss == sb.abs_diff(db) {
        // Same pages, bit-aligned: lo and hi are boundaries on both sides.
        let s0 = ((lo - sb) >> ss) as u64;
        let t0 = ((lo - db) >> ds) as u64;
        let n = ((hi - lo) >> ss) as u64;
        or_shifted(dst, t0, src, s0, n);
        return Ok(());
    }

    if ds >= ss + 6 && (sb.abs_diff(db) >> ds) << ds == sb.abs_diff(db) {
        fold_words(
            dst,
            src,
            src_geo,
            ((lo - sb) >> ss) as u64,
            ((lo - db) >> ds) as u64,
            up(hi - db, ds),
            ds - ss - 6,
        );
        return Ok(());
    }

    // General: each source run becomes one byte interval, clipped, then rounded outward
    // to destination pages.
    let s_lo = ((lo - sb) >> ss) as u64;
    let s_hi = up(hi - sb, ss);
    // `for_each`, not `for`: it runs on `Runs::fold`, which keeps the scan in registers.
    Runs::range(src, s_lo, s_hi).for_each(|(first, len)| {
        let a = (sb + ((first as u128) << ss)).max(lo);
        let b = (sb + (((first + len) as u128) << ss)).min(hi);
        let j0 = ((a - db) >> ds) as u64;
        let j1 = up(b - db, ds);
        fill_range(dst, j0, j1 - j0);
    });
    Ok(())
}

/// Fine → coarse where every coarse page starts on a source word boundary: a coarse bit is
/// the OR of its `2^group_shift` source words. Destination bits `j_lo..j_hi`; the first
/// starts at source bit `s_lo` (a multiple of 64).
fn fold_words(
    dst: &mut [u64],
    src: &[u64],
    src_geo: &Geometry,
    s_lo: u64,
    j_lo: u64,
    j_hi: u64,
    group_shift: u32,
) {
    let group = 1usize << group_shift;
    let n = src_geo.words();
    let w_lo = (s_lo / 64) as usize;
    if n == 0 || w_lo >= n {
        return;
    }
    // Only the source's last word may hold bits past its length: mask a copy.
    let last = src[n - 1] & tail_mask(src_geo.bits);
    let body = &src[w_lo..n - 1];
    let mut j = j_lo;
    let mut chunks = body.chunks(group);
    while j < j_hi {
        let Some(chunk) = chunks.next() else { break };
        let acc = chunk.iter().fold(0, |a, &w| a | w);
        // The final word belongs to this group if the group is cut short by it.
        let acc = if chunk.len() < group { acc | last } else { acc };
        // Branch-free: at low density a group is dirty about half the time.
        dst[(j / 64) as usize] |= u64::from(acc != 0) << (j % 64);
        j += 1;
    }
    // A group made of the last word alone (body ended exactly on a group boundary).
    if j < j_hi && body.len().is_multiple_of(group) && last != 0 {
        dst[(j / 64) as usize] |= 1 << (j % 64);
    }
}
