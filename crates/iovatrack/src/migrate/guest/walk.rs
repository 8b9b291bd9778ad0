//! The page walk both guests perform, and the region table the KVM guest program reads.
//!
//! The walk visits global page index `idx` over the concatenation of the table's regions,
//! starting at 0 and stepping `idx = (idx + stride) mod total`. The host picks `stride`
//! coprime with `total` (near `0.618 · total`), so the walk visits every page once per
//! `total` steps while spreading consecutive writes across all of RAM, which is what a real
//! workload's dirtying looks like to pre-copy.
//!
//! With a working set ([`WalkTable::slices`]) only its first pages (in address order) are
//! walked, split into one contiguous slice per vCPU, each with its own table and stride.
//!
//! In-guest table layout (little-endian `u64`s, one page):
//! `[stride, total, batch, count, progress, 0, 0, 0]` then `count` entries `[gpa, pages]`
//! (at [`super::program::ENTRIES_OFFSET`]).

use super::memory::{GuestMemory, PAGE_SIZE};
use super::GuestError;
use crate::range::IovaRange;

/// Header words before the entries.
pub(crate) const HEADER_WORDS: u64 = super::program::ENTRIES_OFFSET / 8;
/// Most entries that fit in one 4 KiB table page.
pub(crate) const MAX_ENTRIES: usize = ((PAGE_SIZE / 8 - HEADER_WORDS) / 2) as usize;

/// The walk's regions (RAM minus the reserved setup area) and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkTable {
    /// `(gpa, pages)` of each walked span, in address order.
    pub entries: Vec<(u64, u64)>,
    /// Sum of `pages`.
    pub total: u64,
    /// Step of the walk, coprime with `total`, `1 ..= total`.
    pub stride: u64,
    /// Pages written between two progress reports.
    pub batch: u64,
    /// Gpa of the vCPU's progress words (KVM guest; 0 when unused).
    pub progress: u64,
}

impl WalkTable {
    /// Table over `regions` minus `reserved` (a byte range inside them, page aligned).
    pub fn new(regions: &[IovaRange], reserved: IovaRange, batch: u64) -> Result<Self, GuestError> {
        let mut entries = Vec::new();
        for r in regions {
            let (start, end) = (r.iova as u128, r.end());
            let (rs, re) = (reserved.iova as u128, reserved.end());
            // Up to two pieces: before and after the reserved range.
            let pieces = [(start, end.min(rs)), (start.max(re), end)];
            for (a, b) in pieces {
                if a < b {
                    entries.push((a as u64, ((b - a) / PAGE_SIZE as u128) as u64));
                }
            }
        }
        entries.retain(|e| e.1 > 0);
        if entries.len() > MAX_ENTRIES {
            return Err(GuestError::TooManyRegions {
                count: entries.len(),
                max: MAX_ENTRIES,
            });
        }
        let total: u64 = entries.iter().map(|e| e.1).sum();
        if total == 0 {
            return Err(GuestError::NoWalkPages);
        }
        Ok(Self::over(entries, batch))
    }

    fn over(entries: Vec<(u64, u64)>, batch: u64) -> Self {
        let total = entries.iter().map(|e| e.1).sum();
        Self {
            entries,
            total,
            stride: pick_stride(total),
            batch: batch.max(1),
            progress: 0,
        }
    }

    /// The table over the first `working_set` bytes (0 = all; rounded up to whole pages)
    /// of `regions` minus `reserved`, cut into `n` contiguous slices of nearly equal size,
    /// one per vCPU or writer thread.
    pub fn slices(
        regions: &[IovaRange],
        reserved: IovaRange,
        batch: u64,
        working_set: u64,
        n: usize,
    ) -> Result<Vec<Self>, GuestError> {
        let all = Self::new(regions, reserved, batch)?;
        let want = if working_set == 0 {
            all.total
        } else {
            working_set.div_ceil(PAGE_SIZE).min(all.total)
        };
        let n = n.max(1) as u64;
        if want < n {
            return Err(GuestError::NoWalkPages);
        }
        (0..n)
            .map(|k| {
                let (a, z) = (k * want / n, (k + 1) * want / n);
                let t = Self::over(all.span(a, z), batch);
                if t.entries.len() > MAX_ENTRIES {
                    return Err(GuestError::TooManyRegions {
                        count: t.entries.len(),
                        max: MAX_ENTRIES,
                    });
                }
                Ok(t)
            })
            .collect()
    }

    /// Entries covering global page indices `a .. z`.
    fn span(&self, a: u64, z: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut base = 0;
        for &(gpa, pages) in &self.entries {
            let (lo, hi) = (a.max(base), z.min(base + pages));
            if lo < hi {
                out.push((gpa + (lo - base) * PAGE_SIZE, hi - lo));
            }
            base += pages;
        }
        out
    }

    /// The walked byte ranges, in address order.
    pub fn ranges(&self) -> Vec<IovaRange> {
        self.entries
            .iter()
            .map(|&(g, p)| IovaRange::new(g, p * PAGE_SIZE))
            .collect()
    }

    /// Guest physical address of global page index `idx` (`idx < total`).
    pub fn page_gpa(&self, mut idx: u64) -> Option<u64> {
        for &(gpa, pages) in &self.entries {
            if idx < pages {
                return Some(gpa + idx * PAGE_SIZE);
            }
            idx -= pages;
        }
        None
    }

    /// Next index of the walk.
    pub fn step(&self, idx: u64) -> u64 {
        // stride <= total and idx < total, so one subtraction suffices (as in the guest code)
        // and the sum cannot overflow for total < 2^63.
        let n = idx + self.stride;
        if n >= self.total {
            n - self.total
        } else {
            n
        }
    }

    /// Write the table into guest memory at `gpa` (page aligned) in the layout above.
    pub(crate) fn write_to(&self, mem: &GuestMemory, gpa: u64) -> Result<(), GuestError> {
        mem.write_page(gpa, &[0u8; PAGE_SIZE as usize])?;
        let header = [
            self.stride,
            self.total,
            self.batch,
            self.entries.len() as u64,
            self.progress,
        ];
        for (i, v) in header.iter().enumerate() {
            mem.write_u64(gpa + 8 * i as u64, *v)?;
        }
        for (i, &(g, p)) in self.entries.iter().enumerate() {
            let at = gpa + 8 * HEADER_WORDS + 16 * i as u64;
            mem.write_u64(at, g)?;
            mem.write_u64(at + 8, p)?;
        }
        Ok(())
    }

    /// Read a table back from guest memory (the inverse of writing it at setup).
    pub fn read_from(mem: &GuestMemory, gpa: u64) -> Result<Self, GuestError> {
        let stride = mem.read_u64(gpa)?;
        let total = mem.read_u64(gpa + 8)?;
        let batch = mem.read_u64(gpa + 16)?;
        let count = mem.read_u64(gpa + 24)?;
        let progress = mem.read_u64(gpa + 32)?;
        if count as usize > MAX_ENTRIES {
            return Err(GuestError::TooManyRegions {
                count: count as usize,
                max: MAX_ENTRIES,
            });
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            let at = gpa + 8 * HEADER_WORDS + 16 * i;
            entries.push((mem.read_u64(at)?, mem.read_u64(at + 8)?));
        }
        Ok(Self {
            entries,
            total,
            stride,
            batch,
            progress,
        })
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A stride near `0.618 · total`, coprime with `total`. `total - 1` is always coprime with
/// `total`, so the search ends below `total` (for `total >= 2`).
fn pick_stride(total: u64) -> u64 {
    let mut s = ((total as u128 * 618) / 1000).max(1) as u64;
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn excludes_reserved_area() {
        let regions = [
            IovaRange::new(0, 64 << 20),
            IovaRange::new(4 << 30, 64 << 20),
        ];
        let t = WalkTable::new(&regions, IovaRange::new(0, 1 << 20), 64).unwrap();
        assert_eq!(
            t.entries,
            vec![(1 << 20, (63 << 20) / 4096), (4 << 30, (64 << 20) / 4096)]
        );
        assert_eq!(t.total, (127 << 20) / 4096);
        assert_eq!(t.page_gpa(0), Some(1 << 20));
        assert_eq!(t.page_gpa((63 << 20) / 4096), Some(4 << 30));
        assert_eq!(t.page_gpa(t.total), None);
        // Reserved range in the middle of a region splits it.
        let t = WalkTable::new(
            &[IovaRange::new(0, 0x10000)],
            IovaRange::new(0x4000, 0x2000),
            1,
        )
        .unwrap();
        assert_eq!(t.entries, vec![(0, 4), (0x6000, 10)]);
        assert!(matches!(
            WalkTable::new(&[IovaRange::new(0, 0x1000)], IovaRange::new(0, 0x1000), 1),
            Err(GuestError::NoWalkPages)
        ));
    }

    #[test]
    fn table_round_trips_through_memory() {
        let mem = GuestMemory::new(&[(0, 1 << 20), (1 << 30, 1 << 20)]).unwrap();
        let mut t = WalkTable::new(mem.regions(), IovaRange::new(0, 0x10000), 64).unwrap();
        t.progress = 0x5000;
        t.write_to(&mem, 0x2000).unwrap();
        assert_eq!(WalkTable::read_from(&mem, 0x2000).unwrap(), t);
    }

    #[test]
    fn slices_cover_the_working_set_once() {
        let regions = [
            IovaRange::new(0, 64 << 20),
            IovaRange::new(4 << 30, 64 << 20),
        ];
        let reserved = IovaRange::new(0, 1 << 20);
        // 100 MiB working set over 3 slices: crosses from the first region into the second.
        let s = WalkTable::slices(&regions, reserved, 64, 100 << 20, 3).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(|t| t.total).sum::<u64>(), (100 << 20) / 4096);
        let mut flat: Vec<u64> = s
            .iter()
            .flat_map(|t| (0..t.total).map(|i| t.page_gpa(i).unwrap()))
            .collect();
        let n = flat.len();
        flat.dedup();
        assert_eq!(flat.len(), n, "slices overlap");
        assert_eq!(flat[0], 1 << 20);
        assert_eq!(*flat.last().unwrap(), (4 << 30) + (37 << 20) - 4096);
        // 0 = everything; more than RAM = everything.
        let all = WalkTable::new(&regions, reserved, 64).unwrap().total;
        for ws in [0, 1 << 40] {
            let s = WalkTable::slices(&regions, reserved, 64, ws, 2).unwrap();
            assert_eq!(s[0].total + s[1].total, all);
        }
        assert!(matches!(
            WalkTable::slices(&regions, reserved, 64, 4096, 2),
            Err(GuestError::NoWalkPages)
        ));
    }

    proptest! {
        // The walk is a permutation: `total` steps from 0 visit every index exactly once,
        // checked against a brute-force visited set.
        #[test]
        fn walk_visits_every_page(total in 1u64..5000) {
            let t = WalkTable {
                entries: vec![(0, total)],
                total,
                stride: pick_stride(total),
                batch: 1,
                progress: 0,
            };
            prop_assert!(t.stride >= 1 && t.stride <= total);
            let mut seen = vec![false; total as usize];
            let mut idx = 0;
            for _ in 0..total {
                prop_assert!(!seen[idx as usize]);
                seen[idx as usize] = true;
                idx = t.step(idx);
            }
            prop_assert_eq!(idx, 0);
            prop_assert!(seen.iter().all(|&s| s));
        }

        // page_gpa maps the concatenation of entries onto their pages, in order.
        #[test]
        fn page_gpa_matches_flat_list(sizes in proptest::collection::vec(1u64..20, 1..6)) {
            let mut regions = Vec::new();
            let mut gpa = 0u64;
            for s in &sizes {
                regions.push(IovaRange::new(gpa, s * PAGE_SIZE));
                gpa += (s + 3) * PAGE_SIZE; // leave holes
            }
            let t = WalkTable::new(&regions, IovaRange::new(u64::MAX - 0xfff, 0x1000), 1).unwrap();
            let flat: Vec<u64> = regions
                .iter()
                .flat_map(|r| (0..r.length / PAGE_SIZE).map(move |p| r.iova + p * PAGE_SIZE))
                .collect();
            prop_assert_eq!(t.total as usize, flat.len());
            for (i, g) in flat.iter().enumerate() {
                prop_assert_eq!(t.page_gpa(i as u64), Some(*g));
            }
        }
    }
}
