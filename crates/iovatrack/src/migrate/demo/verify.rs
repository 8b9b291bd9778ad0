//! Page-level verification: one hash per page, or per region for guests too large for a
//! frame of page hashes (then the engine compares the pages of the regions that differ).

use crate::migrate::engine::Verifier;
use crate::migrate::guest;
use crate::migrate::seams::{GuestRam, VmError};
use std::sync::{Mutex, PoisonError};

/// FNV-1a page hashes, folded per region when there are more than fit a frame.
pub struct PageHashes;

/// Pages hashed at a time when folding a region (bounds memory on a large guest).
const RUN_PAGES: u64 = 1 << 20;

impl Verifier for PageHashes {
    fn hashes(&self, memory: &dyn GuestRam, max_hashes: usize) -> Result<Vec<u64>, VmError> {
        let total: u64 = memory
            .regions()
            .iter()
            .map(|r| r.length / guest::PAGE_SIZE)
            .sum();
        if total <= max_hashes as u64 {
            return page_hashes(memory);
        }
        (0..memory.regions().len())
            .map(|i| region_hash(memory, i))
            .collect()
    }

    fn digest(&self, hashes: &[u64]) -> u64 {
        guest::hash_words(hashes.iter().copied())
    }
}

/// One hash per page, regions in order.
pub fn page_hashes(memory: &dyn GuestRam) -> Result<Vec<u64>, VmError> {
    let mut out = Vec::new();
    for (i, r) in memory.regions().iter().enumerate() {
        let at = out.len();
        out.resize(at + (r.length / guest::PAGE_SIZE) as usize, 0);
        hash_into(memory, i, 0, &mut out[at..])?;
    }
    Ok(out)
}

/// One hash per region: each is the hash of that region's run in `pages` (from
/// [`page_hashes`]), so no memory is read twice.
pub fn region_hashes(memory: &dyn GuestRam, pages: &[u64]) -> Vec<u64> {
    let mut at = 0;
    memory
        .regions()
        .iter()
        .map(|r| {
            let n = (r.length / guest::PAGE_SIZE) as usize;
            let h = guest::hash_words(pages[at..at + n].iter().copied());
            at += n;
            h
        })
        .collect()
}

/// The hash of region `index`: [`guest::hash_words`] over its page hashes, folded a run
/// at a time.
pub fn region_hash(memory: &dyn GuestRam, index: usize) -> Result<u64, VmError> {
    let pages = memory.regions()[index].length / guest::PAGE_SIZE;
    let mut h = guest::HASH_SEED;
    let mut run = vec![0u64; pages.min(RUN_PAGES) as usize];
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(RUN_PAGES) as usize;
        hash_into(memory, index, first, &mut run[..n])?;
        h = guest::hash_words_from(h, run[..n].iter().copied());
        first += n as u64;
    }
    Ok(h)
}

/// Pages one hashing thread takes at a time.
const CHUNK_PAGES: usize = 1 << 15;

/// The hashes of pages `first..first + out.len()` of region `index`, into `out`, on every
/// core: the guest is paused while both sides verify, so this is downtime.
fn hash_into(
    memory: &dyn GuestRam,
    index: usize,
    first: u64,
    out: &mut [u64],
) -> Result<(), VmError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(out.len().div_ceil(CHUNK_PAGES));
    let chunks = Mutex::new(out.chunks_mut(CHUNK_PAGES).enumerate());
    let work = || -> Result<(), VmError> {
        loop {
            let next = chunks.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((i, chunk)) = next else {
                return Ok(());
            };
            let at = first + (i * CHUNK_PAGES) as u64;
            chunk.copy_from_slice(&memory.page_hashes_in(index, at, chunk.len() as u64)?);
        }
    };
    if threads <= 1 {
        return work();
    }
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mine = work();
        helpers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .fold(mine, Result::and)
    })
}

/// FNV-1a over arbitrary bytes (device state has any length).
pub fn hash_bytes(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::guest::GuestMemory;

    /// Hashing on every core gives each page the hash it has alone, across chunk
    /// boundaries and a short last chunk, and a region folded a run at a time the fold of
    /// those.
    #[test]
    fn parallel_hashes_equal_page_by_page_hashes() {
        let pages = 2 * CHUNK_PAGES as u64 + 5;
        let m = GuestMemory::new(&[(0, pages * 4096), (1 << 40, 8 << 12)]).unwrap();
        let c = CHUNK_PAGES as u64;
        for p in [0, 1, c - 1, c, 2 * c + 4] {
            m.write_u64(p * 4096 + 8 * (p % 512), p ^ 0x5a5a).unwrap();
        }
        m.write_u64((1 << 40) + 4096, 3).unwrap();
        let alone: Vec<u64> = m
            .regions()
            .iter()
            .flat_map(|r| (0..r.length / 4096).map(move |k| r.iova + k * 4096))
            .map(|gpa| m.hash_page(gpa).unwrap())
            .collect();
        assert_eq!(page_hashes(&m).unwrap(), alone);
        assert_eq!(
            region_hash(&m, 0).unwrap(),
            guest::hash_words(alone[..pages as usize].iter().copied())
        );
        // The written pages differ from a zero page: the hashes saw them.
        let zero = alone[2];
        for p in [0, 1, c - 1, c, 2 * c + 4] {
            assert_ne!(alone[p as usize], zero, "page {p}");
        }
    }

    #[test]
    fn region_hashes_fold_the_page_hashes_per_region() {
        let m = GuestMemory::new(&[(0, 64 << 10), (1 << 32, 16 << 10)]).unwrap();
        m.write_u64(0x2000, 5).unwrap();
        m.write_u64((1 << 32) + 0x1000, 6).unwrap();
        let pages = page_hashes(&m).unwrap();
        let want: Vec<u64> = (0..2)
            .map(|i| guest::hash_words(m.page_hashes(i).unwrap()))
            .collect();
        assert_eq!(region_hashes(&m, &pages), want);
        let folded: Vec<u64> = (0..2).map(|i| region_hash(&m, i).unwrap()).collect();
        assert_eq!(folded, want);
        // a change in the second region changes only its hash
        m.write_u64((1 << 32) + 0x3000, 7).unwrap();
        let again = region_hashes(&m, &page_hashes(&m).unwrap());
        assert_eq!(again[0], want[0]);
        assert_ne!(again[1], want[1]);
        // a frame too small for page hashes gets region hashes
        assert_eq!(PageHashes.hashes(&m, 4).unwrap().len(), 2);
        assert_eq!(PageHashes.hashes(&m, 1 << 20).unwrap().len(), 20);
    }
}
