//! The concurrent dirty bitmap, set from DMA threads or a software vCPU.

use super::plain::DirtyBitmap;
use super::words::{word_masks, words_for};
use super::BitmapError;
use std::sync::atomic::{AtomicU64, Ordering};

/// A dirty bitmap many threads may set while one reader drains it. Same bit layout as
/// [`DirtyBitmap`].
///
/// Ordering: a writer stores to guest memory, then sets the bit; the reader swaps the word
/// to zero, then reads the pages. A page the reader saw dirty is read with the writer's
/// data; a write racing with the drain leaves its bit set for the next pass, so no write is
/// ever lost. Every read-modify-write is `SeqCst`: free on x86 (a locked RMW anyway), and
/// it lets a user order a set against a drain with its own `SeqCst` counter (the emulated
/// device and IOMMU prove "a write racing a REPORT lands in that report or the next" so).
///
/// ```
/// use iovatrack::bitmap::{AtomicDirtyBitmap, DirtyBitmap};
/// use std::sync::Arc;
///
/// let log = Arc::new(AtomicDirtyBitmap::new(4096));
/// let writer = { let log = log.clone(); std::thread::spawn(move || log.set_range(100, 300)) };
/// writer.join().unwrap()?;
/// let mut pass = DirtyBitmap::new(4096);
/// log.read_and_clear_into(&mut pass)?;
/// assert_eq!(pass.runs().collect::<Vec<_>>(), [(100, 300)]);
/// assert_eq!(log.count_ones(), 0);
/// # Ok::<(), iovatrack::bitmap::BitmapError>(())
/// ```
#[derive(Debug, Default)]
pub struct AtomicDirtyBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicDirtyBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        Self {
            words: (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// An all-clear bitmap of `bits` bits, or the allocation failure (a driver's ENOMEM)
    /// instead of an abort.
    pub fn try_new(bits: u64) -> Result<Self, std::collections::TryReserveError> {
        let mut words = Vec::new();
        words.try_reserve_exact(words_for(bits))?;
        words.extend((0..words_for(bits)).map(|_| AtomicU64::new(0)));
        Ok(Self { words, bits })
    }

    /// Number of bits (pages).
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn check(&self, first: u64, count: u64) -> Result<(), BitmapError> {
        match first.checked_add(count) {
            Some(end) if end <= self.bits => Ok(()),
            _ => Err(BitmapError::OutOfRange {
                first,
                count,
                len: self.bits,
            }),
        }
    }

    /// OR `m` into word `i`. Always a read-modify-write: skipping it when a plain load sees
    /// the bits already set would race with a concurrent drain (the load may return the
    /// pre-swap value, or on x86 pass the writer's pending data store) and lose the write.
    #[inline]
    fn or_word(&self, i: usize, m: u64) {
        self.words[i].fetch_or(m, Ordering::SeqCst);
    }

    /// Set one bit.
    pub fn set(&self, bit: u64) -> Result<(), BitmapError> {
        self.check(bit, 1)?;
        self.or_word((bit / 64) as usize, 1 << (bit % 64));
        Ok(())
    }

    /// Set bits `first..first + count` with one masked `fetch_or` per word.
    pub fn set_range(&self, first: u64, count: u64) -> Result<(), BitmapError> {
        self.check(first, count)?;
        for (i, m) in word_masks(first, count) {
            self.or_word(i, m);
        }
        Ok(())
    }

    /// Set bits `first..first + count` and return how many of them were set already (one
    /// `fetch_or` per word, so of several threads setting the same bit exactly one sees it
    /// clear): a receiver's "no page twice in a pass" over many streams.
    pub fn set_range_counting(&self, first: u64, count: u64) -> Result<u64, BitmapError> {
        self.check(first, count)?;
        Ok(word_masks(first, count)
            .map(|(i, m)| {
                let old = self.words[i].fetch_or(m, Ordering::SeqCst);
                u64::from((old & m).count_ones())
            })
            .sum())
    }

    /// Whether `bit` is set now; `false` past the end.
    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits
            && self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    /// Number of bits set at the time each word is read (a snapshot only if writers are
    /// quiet).
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// Drain: OR every set bit into `dst` and clear it here. A clean word costs one plain
    /// load (no read-modify-write); a dirty one is swapped to zero. Lengths must be equal.
    pub fn read_and_clear_into(&self, dst: &mut DirtyBitmap) -> Result<(), BitmapError> {
        if dst.len() != self.bits {
            return Err(BitmapError::LengthMismatch {
                left: self.bits,
                right: dst.len(),
            });
        }
        let mut out = dst.words_mut();
        for (d, w) in out.iter_mut().zip(&self.words) {
            if w.load(Ordering::Relaxed) != 0 {
                *d |= w.swap(0, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Call `f` with each set bit of `first..first + count`, ascending, clearing them when
    /// `clear` (one `fetch_and` per word, so a bit set concurrently outside the range, or
    /// after its word was read, survives). A REPORT's or GET_DIRTY_BITMAP's read.
    pub fn visit_range(
        &self,
        first: u64,
        count: u64,
        clear: bool,
        mut f: impl FnMut(u64),
    ) -> Result<(), BitmapError> {
        self.check(first, count)?;
        for (i, m) in word_masks(first, count) {
            let old = if clear {
                self.words[i].fetch_and(!m, Ordering::SeqCst)
            } else {
                self.words[i].load(Ordering::SeqCst)
            };
            let mut dirty = old & m;
            while dirty != 0 {
                f(i as u64 * 64 + u64::from(dirty.trailing_zeros()));
                dirty &= dirty - 1;
            }
        }
        Ok(())
    }

    /// Read and clear bits `first..first + count`, OR-ing them into `dst` from bit `at` on
    /// (bit `first + j` to `dst` bit `at + j`). `dst` must hold bit `at + count - 1`.
    pub fn read_and_clear_range_into(
        &self,
        first: u64,
        count: u64,
        dst: &mut [u64],
        at: u64,
    ) -> Result<(), BitmapError> {
        let dst_bits = dst.len() as u64 * 64;
        if at.checked_add(count).is_none_or(|end| end > dst_bits) {
            return Err(BitmapError::OutOfRange {
                first: at,
                count,
                len: dst_bits,
            });
        }
        self.visit_range(first, count, true, |b| {
            let t = b - first + at;
            dst[(t / 64) as usize] |= 1 << (t % 64);
        })
    }

    /// Clear every bit (a tracker re-armed on a clean snapshot). Not atomic as a whole: a
    /// bit set concurrently may survive.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }
}
