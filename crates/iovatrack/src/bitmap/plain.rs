//! The owned, single-writer dirty bitmap.

use super::regranular::{or_regranular, Geometry};
use super::runs::Runs;
use super::words::{fill_range, or_slices, tail_mask, take_slices, word_masks, words_for};
use super::BitmapError;
use std::ops::{Deref, DerefMut};

/// A dirty bitmap in the kernel's native format: `u64` words, LSB-first, one bit per page
/// (bit k = word k/64, bit k%64). It is a pure bit container: the caller knows which base
/// address and page size bit 0 stands for.
///
/// Invariant: bits at or past [`len`](Self::len) in the last word are always zero, so word
/// operations (count, OR, runs) never see phantom pages.
///
/// ```
/// use iovatrack::bitmap::DirtyBitmap;
///
/// let mut cpu = DirtyBitmap::new(1000);
/// cpu.set_range(10, 5)?;
/// let mut dev = DirtyBitmap::new(1000);
/// dev.set(12)?;
/// dev.set(999)?;
/// cpu.or_assign(&dev)?;
/// assert_eq!(cpu.count_ones(), 6);
/// assert_eq!(cpu.runs().collect::<Vec<_>>(), [(10, 5), (999, 1)]);
///
/// // Read-and-clear into a reused buffer: no allocation per pass.
/// let mut pass = DirtyBitmap::new(1000);
/// cpu.take_into(&mut pass)?;
/// assert_eq!(cpu.count_ones(), 0);
/// assert_eq!(pass.count_ones(), 6);
/// # Ok::<(), iovatrack::bitmap::BitmapError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
}

impl DirtyBitmap {
    /// An all-clear bitmap of `bits` bits (`ceil(bits / 64)` words, allocated once; like
    /// any `Vec`, a size the allocator cannot satisfy aborts).
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; words_for(bits)],
            bits,
        }
    }

    /// Wrap existing words (e.g. filled by an ioctl) as a `bits`-bit bitmap. The word count
    /// must be exactly `ceil(bits / 64)`; bits past `bits` are cleared.
    pub fn from_words(mut words: Vec<u64>, bits: u64) -> Result<Self, BitmapError> {
        if words.len() != words_for(bits) {
            return Err(BitmapError::WordCount {
                words: words.len(),
                bits,
            });
        }
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(bits);
        }
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

    /// The words, for reading or for handing to an ioctl as input.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, writable (e.g. as the output buffer of KVM `GET_DIRTY_LOG` or a VFIO
    /// `REPORT`, which OR into it). The guard clears any tail bits past `len` when dropped,
    /// so the invariant holds whatever the writer did.
    pub fn words_mut(&mut self) -> WordsMut<'_> {
        WordsMut {
            words: &mut self.words,
            tail: tail_mask(self.bits),
        }
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

    fn check_same(&self, other_bits: u64) -> Result<(), BitmapError> {
        if self.bits == other_bits {
            Ok(())
        } else {
            Err(BitmapError::LengthMismatch {
                left: self.bits,
                right: other_bits,
            })
        }
    }

    /// Set one bit.
    pub fn set(&mut self, bit: u64) -> Result<(), BitmapError> {
        self.check(bit, 1)?;
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        Ok(())
    }

    /// Set bits `first..first + count`, a word at a time (masked ends, filled middle).
    pub fn set_range(&mut self, first: u64, count: u64) -> Result<(), BitmapError> {
        self.check(first, count)?;
        fill_range(&mut self.words, first, count);
        Ok(())
    }

    /// Set bits `first..first + count` and return how many of them were set already.
    pub fn set_range_counting(&mut self, first: u64, count: u64) -> Result<u64, BitmapError> {
        self.check(first, count)?;
        Ok(word_masks(first, count)
            .map(|(i, m)| {
                let old = self.words[i];
                self.words[i] |= m;
                u64::from((old & m).count_ones())
            })
            .sum())
    }

    /// Whether `bit` is set; `false` past the end.
    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Clear every bit (keeps the buffer).
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Clear every bit set in `other` (`self &= !other`), same length.
    pub fn and_not_assign(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        self.check_same(other.bits)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
        Ok(())
    }

    /// `self |= other`, word by word at memory bandwidth. Lengths must be equal.
    pub fn or_assign(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        self.check_same(other.bits)?;
        or_slices(&mut self.words, &other.words);
        Ok(())
    }

    /// [`DirtyBitmap::or_words`], returning how many bits were newly set. One pass that
    /// skips clean source words: a mostly clean KVM log costs a read of itself, not two
    /// popcounts of the destination.
    pub fn or_words_counting(&mut self, words: &[u64]) -> Result<u64, BitmapError> {
        if words.len() != self.words.len() {
            return Err(BitmapError::WordCount {
                words: words.len(),
                bits: self.bits,
            });
        }
        let last = self.words.len().saturating_sub(1);
        let mut new = 0u64;
        for (i, (d, &s)) in self.words.iter_mut().zip(words).enumerate() {
            if s == 0 {
                continue;
            }
            let s = if i == last {
                s & tail_mask(self.bits)
            } else {
                s
            };
            let fresh = s & !*d;
            new += u64::from(fresh.count_ones());
            *d |= fresh;
        }
        Ok(new)
    }

    /// `self |= words` for raw words of the same bitmap shape (exactly `words().len()`
    /// words); bits of `words` past `len` are ignored.
    pub fn or_words(&mut self, words: &[u64]) -> Result<(), BitmapError> {
        if words.len() != self.words.len() {
            return Err(BitmapError::WordCount {
                words: words.len(),
                bits: self.bits,
            });
        }
        or_slices(&mut self.words, words);
        if let Some(last) = self.words.last_mut() {
            *last &= tail_mask(self.bits);
        }
        Ok(())
    }

    /// Read-and-clear: OR every bit into `dst` and clear `self`, without allocating.
    /// Lengths must be equal.
    pub fn take_into(&mut self, dst: &mut DirtyBitmap) -> Result<(), BitmapError> {
        self.check_same(dst.bits)?;
        take_slices(&mut dst.words, &mut self.words);
        Ok(())
    }

    /// Maximal runs of set bits as `(first_bit, len)`, in order; see [`Runs`].
    pub fn runs(&self) -> Runs<'_> {
        Runs::new(&self.words, self.bits)
    }

    /// OR a bitmap of another page size and/or base into this one, which covers
    /// `[base, base + len * page)`; see [`or_regranular`](super::or_regranular).
    pub fn or_regranular(
        &mut self,
        base: u64,
        page: u64,
        src: &[u64],
        src_geo: &Geometry,
    ) -> Result<(), BitmapError> {
        let geo = Geometry::new(base, page, self.bits)?;
        or_regranular(&mut self.words, &geo, src, src_geo)
    }
}

/// Writable view of a [`DirtyBitmap`]'s words; clears tail bits past `len` on drop.
#[derive(Debug)]
pub struct WordsMut<'a> {
    words: &'a mut Vec<u64>,
    tail: u64,
}

impl Deref for WordsMut<'_> {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        self.words
    }
}

impl DerefMut for WordsMut<'_> {
    fn deref_mut(&mut self) -> &mut [u64] {
        self.words
    }
}

impl Drop for WordsMut<'_> {
    fn drop(&mut self) {
        if let Some(last) = self.words.last_mut() {
            *last &= self.tail;
        }
    }
}
