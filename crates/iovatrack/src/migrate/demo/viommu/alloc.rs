//! An IOVA allocator that behaves like Linux's (`drivers/iommu/iova.c`): sizes rounded up
//! to a power of two and aligned to it, top-down from the DMA limit into the highest free
//! gap, and freed IOVAs kept in per-size caches and handed out again, most recent first
//! (`alloc_iova_fast` and the rcaches; a cached IOVA stays reserved in the tree).

use std::collections::{BTreeMap, VecDeque};

/// Sizes up to `2^(CACHED_ORDERS - 1)` pages are cached (Linux: `IOVA_RANGE_CACHE_MAX_SIZE`).
const CACHED_ORDERS: usize = 6;
/// IOVAs per size cache (Linux: a magazine of 127 per CPU, plus a depot).
const CACHE_DEPTH: usize = 128;

/// Page-granular IOVA allocator.
#[derive(Debug)]
pub struct IovaAllocator {
    /// First page not allocatable (the DMA limit, in pages).
    limit: u64,
    /// Lowest allocatable page (Linux keeps page 0 out).
    start: u64,
    /// Allocated (or cached) ranges: first page → pages.
    tree: BTreeMap<u64, u64>,
    /// Freed IOVAs by order, most recent last.
    cache: Vec<VecDeque<u64>>,
}

impl IovaAllocator {
    /// IOVAs in pages `[1, limit_pages)`.
    pub fn new(limit_pages: u64) -> Self {
        IovaAllocator {
            limit: limit_pages,
            start: 1,
            tree: BTreeMap::new(),
            cache: (0..CACHED_ORDERS).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Allocate `pages` (rounded up to a power of two); returns the first page.
    pub fn alloc(&mut self, pages: u64) -> Option<u64> {
        let size = pages.max(1).next_power_of_two();
        let order = size.trailing_zeros() as usize;
        if let Some(p) = self.cache.get_mut(order).and_then(VecDeque::pop_back) {
            return Some(p);
        }
        // Top-down: the highest gap that fits an aligned block.
        let mut ceiling = self.limit;
        for (&s, &n) in self.tree.iter().rev() {
            let end = s + n;
            if let Some(at) = fit(end, ceiling, size) {
                self.tree.insert(at, size);
                return Some(at);
            }
            ceiling = s;
        }
        let at = fit(self.start, ceiling, size)?;
        self.tree.insert(at, size);
        Some(at)
    }

    /// Free what [`IovaAllocator::alloc`] returned for `pages`: cached for reuse while the
    /// cache has room, else back to the tree.
    pub fn free(&mut self, first: u64, pages: u64) {
        let size = pages.max(1).next_power_of_two();
        let order = size.trailing_zeros() as usize;
        match self.cache.get_mut(order) {
            Some(c) if c.len() < CACHE_DEPTH => c.push_back(first),
            _ => {
                self.tree.remove(&first);
            }
        }
    }

    /// The lowest page allocated or cached (the bottom of the active window).
    pub fn lowest(&self) -> Option<u64> {
        self.tree.keys().next().copied()
    }
}

/// The highest `size`-aligned block in `[lo, hi)`.
fn fit(lo: u64, hi: u64, size: u64) -> Option<u64> {
    let at = hi.checked_sub(size)? & !(size - 1);
    (at >= lo).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_down_aligned_and_reuses_the_last_freed() {
        let mut a = IovaAllocator::new(1 << 20);
        let x = a.alloc(1).unwrap();
        assert_eq!(x, (1 << 20) - 1);
        let y = a.alloc(3).unwrap();
        assert_eq!(y, (1 << 20) - 8);
        assert_eq!(y % 4, 0);
        let z = a.alloc(1).unwrap();
        assert_eq!(z, (1 << 20) - 2);
        a.free(x, 1);
        a.free(z, 1);
        // Most recently freed first.
        assert_eq!(a.alloc(1), Some(z));
        assert_eq!(a.alloc(1), Some(x));
        assert_eq!(a.lowest(), Some(y));
    }

    #[test]
    fn full_space_says_none() {
        let mut a = IovaAllocator::new(5);
        assert_eq!(a.alloc(4), None);
        assert_eq!(a.alloc(2), Some(2));
        assert_eq!(a.alloc(1), Some(4));
        assert_eq!(a.alloc(1), Some(1));
        assert_eq!(a.alloc(1), None);
    }
}
