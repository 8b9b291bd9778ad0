//! Dirty bitmaps in the kernel's native format.
//!
//! One bit per page, `u64` words, LSB-first: bit k stands for page k of the bitmap's base
//! address and lives in word k/64, bit k%64 — the format of KVM `GET_DIRTY_LOG`, VFIO DMA
//! logging `REPORT`, iommufd `GET_DIRTY_BITMAP` and vm-memory. Buffers are plain `u64`
//! slices, so they go to ioctls without copies, and every operation reuses the caller's
//! buffers: a pre-copy pass allocates nothing once its bitmaps exist.
//!
//! * [`DirtyBitmap`]: owned, single writer; OR-merge, read-and-clear, runs, count.
//! * [`AtomicDirtyBitmap`]: set concurrently (DMA threads, a software vCPU), drained by one
//!   reader.
//! * [`or_regranular`] with [`Geometry`]: OR a bitmap of any page size and base into
//!   another (a 2 MiB device page marks 512 pages of a 4 KiB bitmap; 4 KiB pages fold into
//!   2 MiB ones).
//! * [`Runs`]: maximal runs of set bits, a word at a time.
//!
//! # One bitmap per RAM region: CPU dirt ∪ device dirt
//!
//! Each pass, OR the KVM log and every device REPORT covering the region into one 4 KiB
//! bitmap for that region, then send its runs: a page dirtied by both the CPU and a device
//! is listed once (Cloud Hypervisor concatenates the two lists and sends it twice).
//!
//! ```
//! use iovatrack::bitmap::{DirtyBitmap, Geometry};
//!
//! const PAGE: u64 = 4096;
//! let region_base = 1 << 30; // a 64 MiB RAM region at 1 GiB
//! let pages = (64 << 20) / PAGE;
//!
//! // Buffers made once, reused every pass.
//! let mut kvm_log = DirtyBitmap::new(pages);
//! let mut region = DirtyBitmap::new(pages);
//!
//! // CPU dirt (in reality: KVM_GET_DIRTY_LOG into kvm_log.words_mut()).
//! kvm_log.set_range(0, 4)?;
//! // Device dirt: a REPORT at the device's 2 MiB page size for its tracked range
//! // [1 GiB, 1 GiB + 32 MiB); bit 0 overlaps the CPU's pages 0..4.
//! let report = [0b1u64 | 1 << 15];
//! let report_geo = Geometry::new(1 << 30, 2 << 20, 16)?;
//!
//! region.clear();
//! region.or_assign(&kvm_log)?;
//! region.or_regranular(region_base, PAGE, &report, &report_geo)?;
//!
//! let ranges: Vec<(u64, u64)> = region
//!     .runs()
//!     .map(|(first, len)| (region_base + first * PAGE, len * PAGE))
//!     .collect();
//! assert_eq!(ranges, [(1 << 30, 2 << 20), ((1 << 30) + (30 << 20), 2 << 20)]);
//! assert_eq!(region.count_ones(), 1024); // pages 0..4 counted once
//! # Ok::<(), iovatrack::bitmap::BitmapError>(())
//! ```

mod atomic;
mod plain;
mod regranular;
mod runs;
mod words;

#[cfg(test)]
mod range_tests;
#[cfg(test)]
mod tests;

pub use atomic::AtomicDirtyBitmap;
pub use plain::{DirtyBitmap, WordsMut};
pub use regranular::{or_regranular, Geometry, MIN_PAGE};
pub use runs::Runs;
// The word-level helpers the devices' logs and REPORT outputs share with the bitmaps, so
// that no other module computes a mask or a word count by hand.
pub(crate) use words::{fill_range, words_for};

/// Why a bitmap operation was refused. Nothing is modified when one is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// Bits `first..first + count` do not fit a bitmap of `len` bits.
    #[error("bits {first}..{first}+{count} exceed the bitmap's {len} bits")]
    OutOfRange {
        /// First bit asked for.
        first: u64,
        /// Number of bits asked for.
        count: u64,
        /// The bitmap's length in bits.
        len: u64,
    },
    /// Two bitmaps that must have the same length do not.
    #[error("bitmap lengths differ: {left} vs {right} bits")]
    LengthMismatch {
        /// Length of the bitmap operated on.
        left: u64,
        /// Length of the other bitmap.
        right: u64,
    },
    /// A word slice has the wrong number of words for its bit length.
    #[error("{words} words do not fit a {bits}-bit bitmap")]
    WordCount {
        /// Words given.
        words: usize,
        /// Bits the slice must hold.
        bits: u64,
    },
    /// A page size that is not a power of two ≥ 4096.
    #[error("page size {0:#x} is not a power of two of at least 4 KiB")]
    BadPageSize(u64),
    /// A geometry whose span ends past 2^64.
    #[error("bitmap of {bits} pages of {page:#x} at {base:#x} ends past 2^64")]
    SpanOverflow {
        /// Base address.
        base: u64,
        /// Page size.
        page: u64,
        /// Number of bits.
        bits: u64,
    },
}
