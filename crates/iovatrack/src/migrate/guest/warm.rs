//! Warm memory: before a migration starts, fill a share of guest RAM with non-zero data,
//! as a booted OS's page cache and heap would have left it, so pass 0 has real work
//! instead of skipping never-touched zero pages.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::memory::{GuestMemory, PAGE_SIZE};
use super::walk::WalkTable;
use super::GuestError;
use crate::range::IovaRange;

/// Bytes one fill job covers: large enough that the job queue costs nothing, small
/// enough to balance threads across regions of different sizes.
const CHUNK: u64 = 32 << 20;

/// The warm data of the word at `gpa`: never zero, different per word and per page.
pub fn warm_pattern(gpa: u64) -> u64 {
    let mut x = gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x | 1
}

/// Fill `pct`% (capped at 100) of the pages of every RAM region outside `reserved` (the
/// guest's setup area) with [`warm_pattern`]: the first `pct`% of each such span, so the
/// data is spread over all regions. `threads` host threads (at least 1) share the work.
/// Host writes: not in KVM's dirty log (a migration's pass 0 sends them). Returns the
/// pages filled.
pub fn warm_fill(
    memory: &GuestMemory,
    reserved: IovaRange,
    pct: u8,
    threads: usize,
) -> Result<u64, GuestError> {
    let pct = u64::from(pct.min(100));
    if pct == 0 {
        return Ok(0);
    }
    let spans = WalkTable::new(memory.regions(), reserved, 1)?.entries;
    let mut jobs = Vec::new();
    let mut pages = 0;
    for (gpa, n) in spans {
        let fill = n * pct / 100;
        pages += fill;
        let end = gpa + fill * PAGE_SIZE;
        let mut a = gpa;
        while a < end {
            let z = (a + CHUNK).min(end);
            jobs.push((a, z - a));
            a = z;
        }
    }
    let next = AtomicUsize::new(0);
    let work = || -> Result<(), GuestError> {
        while let Some(&(gpa, len)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
            memory.fill_with(gpa, len, warm_pattern)?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads.max(1)).map(|_| s.spawn(work)).collect();
        let mut result = work();
        for h in helpers {
            let r = h.join().map_err(|_| GuestError::ThreadPanicked)?;
            result = result.and(r);
        }
        result
    })?;
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_the_share_outside_the_reserved_area() {
        let mem = GuestMemory::new(&[(0, 8 << 20), (1 << 30, 4 << 20)]).unwrap();
        let reserved = IovaRange::new(0, 1 << 20);
        let pages = warm_fill(&mem, reserved, 50, 3).unwrap();
        assert_eq!(pages, (7 << 20) / 4096 / 2 + (4 << 20) / 4096 / 2);
        let mut filled = 0;
        for r in mem.regions() {
            for gpa in (r.iova..r.iova + r.length).step_by(4096) {
                if !mem.is_zero_page(gpa).unwrap() {
                    assert!(!reserved.contains(gpa), "reserved page {gpa:#x} filled");
                    assert_eq!(mem.read_u64(gpa + 8).unwrap(), warm_pattern(gpa + 8));
                    filled += 1;
                }
            }
        }
        assert_eq!(filled, pages);
        assert_eq!(warm_fill(&mem, reserved, 0, 2).unwrap(), 0);
    }
}
