//! Cloud Hypervisor's dirty-bitmap → ranges path (vm-migration), re-implemented as the
//! baseline the benches compare against.

use std::ops::{Mul, Range};

/// Cloud Hypervisor's `MemoryRange`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

/// Cloud Hypervisor's `BitposIterator` (vm-migration/src/bitpos_iterator.rs, 2025), field
/// types and arithmetic as there: treats the words as one big integer and yields the
/// position of each set bit, one per `next`, resuming inside the current word with a shift
/// and `trailing_zeros`.
struct BitposIterator<I> {
    underlying_it: I,
    /// How many words were consumed (`u32`, as in Cloud Hypervisor).
    word_pos: u32,
    /// The word being worked on and the bit to continue at.
    current_word: Option<(u64, u32)>,
}

impl<I: Iterator<Item = u64>> Iterator for BitposIterator<I> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            if self.current_word.is_none() {
                self.current_word = self.underlying_it.next().map(|w| (w, 0));
            }
            let (word, word_bit) = self.current_word?;
            if word != 0 && word_bit < 64 {
                let shifted_word = word >> word_bit;
                if shifted_word != 0 {
                    let zeroes = shifted_word.trailing_zeros();
                    self.current_word = Some((word, zeroes + word_bit + 1));
                    let next_bitpos = u64::from(self.word_pos)
                        .mul(64)
                        .checked_add(u64::from(word_bit) + u64::from(zeroes))
                        .unwrap();
                    return Some(next_bitpos);
                }
            }
            self.current_word = None;
            self.word_pos += 1;
        }
    }
}

/// `itertools::Itertools::coalesce`: keep the last item, try to merge each new one into
/// it, emit the last when the merge refuses.
struct Coalesce<I: Iterator, F> {
    iter: I,
    last: Option<I::Item>,
    f: F,
}

impl<I, F> Iterator for Coalesce<I, F>
where
    I: Iterator,
    F: FnMut(I::Item, I::Item) -> Result<I::Item, (I::Item, I::Item)>,
{
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let mut last = self.last.take()?;
        for next in self.iter.by_ref() {
            match (self.f)(last, next) {
                Ok(joined) => last = joined,
                Err((done, fresh)) => {
                    self.last = Some(fresh);
                    return Some(done);
                }
            }
        }
        Some(last)
    }
}

fn coalesce<I: Iterator, F>(mut iter: I, f: F) -> Coalesce<I, F> {
    let last = iter.next();
    Coalesce { iter, last, f }
}

/// Cloud Hypervisor's `MemoryRangeTable::dirty_ranges_iter` (vm-migration/src/protocol.rs),
/// which `from_dirty_bitmap` collects: bit positions, as one-page `Range`s, coalesced when
/// adjacent, then mapped to `MemoryRange`s.
pub fn ch_ranges(
    bitmap: impl IntoIterator<Item = u64>,
    start_addr: u64,
    page_size: u64,
) -> impl Iterator<Item = MemoryRange> {
    let bitpos = BitposIterator {
        underlying_it: bitmap.into_iter(),
        word_pos: 0,
        current_word: None,
    };
    coalesce(
        bitpos.map(|b| b..(b + 1)),
        |prev: Range<u64>, curr: Range<u64>| {
            if prev.end == curr.start {
                Ok(prev.start..curr.end)
            } else {
                Err((prev, curr))
            }
        },
    )
    .map(move |r| MemoryRange {
        gpa: start_addr + r.start * page_size,
        length: (r.end - r.start) * page_size,
    })
}

/// Tiny seeded xorshift64 (no extra crate).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
