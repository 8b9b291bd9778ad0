//! IOVA ranges and page arithmetic.
//!
//! Guest physical / IO virtual addresses are `u64`, and a section may end at the very last
//! byte (2^64 − 1), so exclusive ends are computed in `u128` and never overflow.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One contiguous IOVA range `[iova, iova + length)`, as handed to
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (`struct vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IovaRange {
    /// First byte.
    pub iova: u64,
    /// Length in bytes; a well-formed range has `length > 0`.
    pub length: u64,
}

impl IovaRange {
    /// A range from its first byte and its length.
    pub const fn new(iova: u64, length: u64) -> Self {
        Self { iova, length }
    }

    /// A range from its first and last (inclusive) byte; `None` if it would not fit a `u64`
    /// length (the whole 2^64 space).
    pub fn from_inclusive(first: u64, last: u64) -> Option<Self> {
        if last < first {
            return None;
        }
        let len = (last - first).checked_add(1)?;
        Some(Self::new(first, len))
    }

    /// Exclusive end, exact (may be 2^64).
    pub const fn end(&self) -> u128 {
        self.iova as u128 + self.length as u128
    }

    /// Last byte (inclusive); `None` for an empty range.
    pub fn last(&self) -> Option<u64> {
        if self.length == 0 {
            None
        } else {
            Some((self.end() - 1) as u64)
        }
    }

    /// Whether `iova + length` stays below 2^64, as the kernel's START requires.
    pub const fn fits_u64(&self) -> bool {
        self.end() <= u64::MAX as u128
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        (self.iova as u128) < other.end() && (other.iova as u128) < self.end()
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.iova && (addr as u128) < self.end()
    }

    /// Whether both ends are multiples of `page` (a power of two).
    pub fn is_aligned(&self, page: u64) -> bool {
        let mask = page.wrapping_sub(1);
        self.iova & mask == 0 && self.length & mask == 0
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.last() {
            Some(last) => write!(f, "[{:#x}, {:#x}]", self.iova, last),
            None => write!(f, "[{:#x}, empty]", self.iova),
        }
    }
}

/// Round `x` down to a multiple of the power of two `page`.
pub const fn align_down(x: u128, page: u64) -> u128 {
    x & !(page as u128 - 1)
}

/// Round `x` up to a multiple of the power of two `page` (exact in `u128`).
pub const fn align_up(x: u128, page: u64) -> u128 {
    (x + page as u128 - 1) & !(page as u128 - 1)
}

/// Number of `page`-sized units needed to cover `bytes`.
pub const fn pages_for(bytes: u64, page: u64) -> u64 {
    bytes.div_ceil(page)
}

/// Number of `u64` words of a one-bit-per-page bitmap covering `bytes`.
pub const fn bitmap_words(bytes: u64, page: u64) -> usize {
    pages_for(bytes, page).div_ceil(64) as usize
}

/// Whether `x` is a power of two (and non-zero).
pub const fn is_pow2(x: u64) -> bool {
    x != 0 && x & (x - 1) == 0
}

/// Human-readable binary size: `16 GiB`, `4 KiB`, `1.5 MiB`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_of_space() {
        let r = IovaRange::from_inclusive(u64::MAX - 4095, u64::MAX).unwrap();
        assert_eq!(r.length, 4096);
        assert_eq!(r.end(), 1u128 << 64);
        assert!(!r.fits_u64());
        assert_eq!(r.last(), Some(u64::MAX));
        assert!(IovaRange::from_inclusive(0, u64::MAX).is_none());
        assert!(IovaRange::new(0, 4096).fits_u64());
    }

    #[test]
    fn overlap_and_align() {
        let a = IovaRange::new(0, 4096);
        let b = IovaRange::new(4096, 4096);
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&IovaRange::new(4095, 2)));
        assert!(a.is_aligned(4096));
        assert!(!IovaRange::new(1, 4096).is_aligned(4096));
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_down(8191, 4096), 4096);
        assert_eq!(align_up(u64::MAX as u128, 4096), 1u128 << 64);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(16 << 30), "16 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 19), "1.50 MiB");
    }
}
