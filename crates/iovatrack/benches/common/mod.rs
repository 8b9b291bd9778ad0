//! Cloud Hypervisor's dirty-bitmap → ranges path (vm-migration), re-implemented as the
//! baseline the benches compare against.

/// Cloud Hypervisor's `MemoryRange`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

/// Cloud Hypervisor's `BitposIterator` (vm-migration, 2025): treats the words as one big
/// integer and yields the position of each set bit, one per `next`, resuming inside the
/// current word with a shift and `trailing_zeros`.
struct BitposIterator<I> {
    words: I,
    word_pos: u64,
    current: Option<(u64, u32)>,
}

impl<I: Iterator<Item = u64>> Iterator for BitposIterator<I> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            if self.current.is_none() {
                self.current = self.words.next().map(|w| (w, 0));
            }
            let (word, bit) = self.current?;
            if word != 0 && bit < 64 {
                let rest = word >> bit;
                if rest != 0 {
                    let tz = rest.trailing_zeros();
                    self.current = Some((word, bit + tz + 1));
                    return Some(self.word_pos * 64 + u64::from(bit + tz));
                }
            }
            self.current = None;
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

/// Cloud Hypervisor's `MemoryRangeTable::from_dirty_bitmap`, minus the final `collect`.
pub fn ch_ranges(
    words: impl IntoIterator<Item = u64>,
    start_addr: u64,
    page_size: u64,
) -> impl Iterator<Item = MemoryRange> {
    let bitpos = BitposIterator {
        words: words.into_iter(),
        word_pos: 0,
        current: None,
    };
    coalesce(
        bitpos.map(move |p| MemoryRange {
            gpa: start_addr + p * page_size,
            length: page_size,
        }),
        |prev: MemoryRange, cur: MemoryRange| {
            if prev.gpa + prev.length == cur.gpa {
                Ok(MemoryRange {
                    gpa: prev.gpa,
                    length: prev.length + cur.length,
                })
            } else {
                Err((prev, cur))
            }
        },
    )
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
