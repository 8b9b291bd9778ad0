//! Guest RAM: one anonymous private `mmap(MAP_NORESERVE)` per RAM region, made and
//! owned by `vm-memory`'s [`GuestMemoryMmap`] (what a rust-vmm VMM already has; see
//! [`GuestMemory::from_vm_memory`]).
//!
//! All host access to guest RAM goes through relaxed 64-bit atomic loads and stores: the
//! vCPU (KVM or software), a DMA workload and the migration thread touch the same pages
//! concurrently, and plain slices over memory that another thread writes would be a data
//! race. Relaxed atomics compile to ordinary `mov`s on x86-64, so this costs nothing.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::GuestError;
use crate::range::IovaRange;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// Guest page size: one dirty bit per 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// `u64` words in one guest page.
pub const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;

/// One region's view into the memory `vm-memory` mapped (the mapping is owned, and
/// unmapped on drop, by the `GuestMemoryMmap` in [`GuestMemory`]).
struct Mapping {
    range: IovaRange,
    host: NonNull<u8>,
}

impl Mapping {
    /// The words of `[offset, offset + 8 * count)`; caller checked bounds and alignment.
    fn words(&self, offset: u64, count: usize) -> &[AtomicU64] {
        debug_assert!(offset.is_multiple_of(8));
        debug_assert!(offset + 8 * count as u64 <= self.range.length);
        // SAFETY: the range lies inside the live mapping (checked by every caller), is 8-byte
        // aligned (mmap is page aligned, offset is a multiple of 8), and the memory is only
        // ever accessed as atomics by Rust code (the guest and the kernel write it outside
        // Rust's model), so viewing it as `[AtomicU64]` is sound for the borrow of `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.host.as_ptr().add(offset as usize).cast::<AtomicU64>(),
                count,
            )
        }
    }
}

/// Guest physical RAM: sorted, disjoint, page-aligned regions, each backed by its own
/// anonymous mapping. Used by the source (with a vCPU writing it) and by the destination
/// (same constructor) to hold received pages.
pub struct GuestMemory {
    regions: Vec<IovaRange>,
    maps: Vec<Mapping>,
    /// Owns the mappings `maps` views.
    mmap: GuestMemoryMmap,
}

// SAFETY: the mappings are owned by this value (through `mmap`) and freed only on drop; all
// shared access goes through `&[AtomicU64]` views, which are Sync.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`: no interior state besides atomically accessed guest RAM.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("regions", &self.regions)
            .finish()
    }
}

impl GuestMemory {
    /// Map RAM regions given as `(gpa, size)`: page-aligned, non-empty, sorted, disjoint,
    /// ending at or below 2^64 − 1.
    pub fn new(regions: &[(u64, u64)]) -> Result<Self, GuestError> {
        if regions.is_empty() {
            return Err(GuestError::NoRegions);
        }
        let mut out = Vec::with_capacity(regions.len());
        for (index, &(gpa, size)) in regions.iter().enumerate() {
            let r = IovaRange::new(gpa, size);
            if size == 0 {
                return Err(GuestError::RegionEmpty { gpa });
            }
            if !r.is_aligned(PAGE_SIZE) {
                return Err(GuestError::RegionUnaligned { gpa, size });
            }
            if !r.fits_u64() {
                return Err(GuestError::RegionOverflow { gpa, size });
            }
            if let Some(prev) = out.last() {
                let prev: &IovaRange = prev;
                if prev.end() > gpa as u128 {
                    return Err(GuestError::RegionsOverlapOrUnsorted { index });
                }
            }
            out.push(r);
        }
        let ranges: Vec<(GuestAddress, usize)> = out
            .iter()
            .map(|r| {
                usize::try_from(r.length)
                    .map(|len| (GuestAddress(r.iova), len))
                    .map_err(|_| GuestError::RegionOverflow {
                        gpa: r.iova,
                        size: r.length,
                    })
            })
            .collect::<Result<_, _>>()?;
        // vm-memory maps each region MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, so a
        // large sparse layout costs only the pages touched.
        let mmap = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| GuestError::Mmap {
            size: out.iter().map(|r| r.length).sum(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Self::from_vm_memory(mmap)
    }

    /// Use a VMM's own `vm-memory` guest memory (regions 4 KiB aligned). Its mappings are
    /// shared, not copied: what the VMM's vCPUs write is what the engine reads.
    pub fn from_vm_memory(mmap: GuestMemoryMmap) -> Result<Self, GuestError> {
        let mut maps = Vec::with_capacity(mmap.num_regions());
        for r in mmap.iter() {
            let range = IovaRange::new(r.start_addr().0, r.len());
            if !range.is_aligned(PAGE_SIZE) {
                return Err(GuestError::RegionUnaligned {
                    gpa: range.iova,
                    size: range.length,
                });
            }
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .ok()
                .and_then(NonNull::new)
                .ok_or(GuestError::Mmap {
                    size: range.length,
                    source: std::io::Error::from(std::io::ErrorKind::AddrNotAvailable),
                })?;
            maps.push(Mapping { range, host });
        }
        if maps.is_empty() {
            return Err(GuestError::NoRegions);
        }
        maps.sort_unstable_by_key(|m| m.range.iova);
        let regions = maps.iter().map(|m| m.range).collect();
        Ok(Self {
            regions,
            maps,
            mmap,
        })
    }

    /// Ask for transparent huge pages (`MADV_HUGEPAGE`), as QEMU (`ram_block_add`) and
    /// Cloud Hypervisor (`thp`, on by default) do for guest RAM: with THP in `madvise` mode
    /// (Debian's default) one fault then maps 2 MiB. Right before
    /// [`GuestMemory::prefault`]; wrong for a destination filled by scattered first
    /// writes, where each would zero a whole 2 MiB. Measured here, the demo's KVM guest
    /// does not take it either: on this PVM host (a shadow MMU) its vCPU stalled for over
    /// 200 ms after dirty logging stopped, one run in two. Advice only: where THP is off it
    /// is ignored.
    pub fn advise_huge_pages(&self) {
        if let Err((r, e)) = self.advise(libc::MADV_HUGEPAGE) {
            log::debug!("MADV_HUGEPAGE on [{:#x}, +{:#x}): {e}", r.iova, r.length);
        }
    }

    /// Allocate every page of guest RAM now, as a VFIO destination's `VFIO_IOMMU_MAP_DMA`
    /// pins it (or QEMU's `-mem-prealloc`): received pages then land in memory that is
    /// already there instead of each first write taking a fault and a zeroing.
    /// `MADV_POPULATE_WRITE` (Linux 5.14) faults the ranges in writable without touching
    /// the contents from user space.
    pub fn prefault(&self) -> Result<(), GuestError> {
        self.advise(libc::MADV_POPULATE_WRITE)
            .map_err(|(r, source)| GuestError::Prefault {
                gpa: r.iova,
                size: r.length,
                source,
            })
    }

    /// `madvise(advice)` over every region's mapping; the first region it failed on.
    /// Only advice that keeps contents and protections comes here (MADV_HUGEPAGE,
    /// MADV_POPULATE_WRITE).
    fn advise(&self, advice: libc::c_int) -> Result<(), (IovaRange, std::io::Error)> {
        for m in &self.maps {
            // SAFETY: the range is exactly one live mapping this value owns, and the
            // advice (see above) changes neither what it holds nor how it may be accessed:
            // MADV_POPULATE_WRITE only faults pages in (zero-filled, contents kept where
            // present).
            let rc =
                unsafe { libc::madvise(m.host.as_ptr().cast(), m.range.length as usize, advice) };
            if rc != 0 {
                return Err((m.range, std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// The `vm-memory` guest memory behind this (for a VMM's devices, or vfio-ioctls'
    /// `vfio_dma_map` of guest memory).
    pub fn vm_memory(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// The RAM regions, in address order; region `i` is KVM memslot `i`.
    pub fn regions(&self) -> &[IovaRange] {
        &self.regions
    }

    /// Total RAM bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.length).sum()
    }

    /// Pages in region `index`.
    pub fn region_pages(&self, index: usize) -> Result<u64, GuestError> {
        self.regions
            .get(index)
            .map(|r| r.length / PAGE_SIZE)
            .ok_or(GuestError::NoSuchRegion { index })
    }

    /// `u64` words a dirty bitmap of region `index` needs (one bit per 4 KiB page).
    pub fn bitmap_words(&self, index: usize) -> Result<usize, GuestError> {
        Ok(self.region_pages(index)?.div_ceil(64) as usize)
    }

    /// Index of the region holding `gpa`.
    pub fn region_of(&self, gpa: u64) -> Option<usize> {
        // Regions are sorted: the candidate is the last one starting at or below gpa.
        let i = self.regions.partition_point(|r| r.iova <= gpa);
        let i = i.checked_sub(1)?;
        self.regions[i].contains(gpa).then_some(i)
    }

    /// Host address of region `index`'s first byte (for KVM memslots).
    pub(crate) fn host_addr(&self, index: usize) -> Option<u64> {
        self.maps.get(index).map(|m| m.host.as_ptr() as u64)
    }

    /// The words of `[gpa, gpa + len)`, which must be 8-byte aligned and inside one region.
    pub fn words(&self, gpa: u64, len: u64) -> Result<&[AtomicU64], GuestError> {
        if !gpa.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(GuestError::Unaligned { gpa, align: 8 });
        }
        let i = self
            .region_of(gpa)
            .ok_or(GuestError::OutOfRange { gpa, len })?;
        let m = &self.maps[i];
        let off = gpa - m.range.iova;
        if len > m.range.length - off {
            return Err(GuestError::OutOfRange { gpa, len });
        }
        Ok(m.words(off, (len / 8) as usize))
    }

    /// The 512 words of the 4 KiB page at `gpa` (page aligned).
    pub fn page_words(&self, gpa: u64) -> Result<&[AtomicU64], GuestError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(GuestError::Unaligned {
                gpa,
                align: PAGE_SIZE,
            });
        }
        self.words(gpa, PAGE_SIZE)
    }

    /// Read the 8-byte word at `gpa` (8-byte aligned).
    pub fn read_u64(&self, gpa: u64) -> Result<u64, GuestError> {
        Ok(self.words(gpa, 8)?[0].load(Ordering::Relaxed))
    }

    /// Write the 8-byte word at `gpa` (8-byte aligned). Host writes are not in KVM's dirty log.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), GuestError> {
        self.words(gpa, 8)?[0].store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Store `f(word_gpa)` into every 8-byte word of `[gpa, gpa + len)` (8-byte aligned,
    /// inside one region) in one pass: the range is resolved and bounds-checked once, and
    /// the relaxed stores compile to plain `mov`s, so this runs at memory speed. Host
    /// writes are not in KVM's dirty log.
    pub fn fill_with(&self, gpa: u64, len: u64, f: impl Fn(u64) -> u64) -> Result<(), GuestError> {
        for (i, w) in self.words(gpa, len)?.iter().enumerate() {
            w.store(f(gpa + 8 * i as u64), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copy the page at `gpa` into `buf` (exactly 4096 bytes).
    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        check_page_buf(buf.len())?;
        let words = self.page_words(gpa)?;
        for (w, chunk) in words.iter().zip(buf.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        Ok(())
    }

    /// Overwrite the page at `gpa` with `buf` (exactly 4096 bytes). Host writes are not in
    /// KVM's dirty log.
    pub fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestError> {
        check_page_buf(buf.len())?;
        let words = self.page_words(gpa)?;
        for (w, chunk) in words.iter().zip(buf.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether the page at `gpa` is all zero bytes.
    pub fn is_zero_page(&self, gpa: u64) -> Result<bool, GuestError> {
        Ok(self
            .page_words(gpa)?
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0))
    }

    /// Pages of region `index` that were never written, as a bitmap (bit k = page k):
    /// neither present nor swapped in `/proc/self/pagemap`, so they read as zero (the
    /// mapping is private and anonymous). `None` when pagemap cannot be read; callers then
    /// look at every page. A page merely read maps the shared zero page and shows as
    /// present: it is not reported here, which is safe.
    pub fn never_written(&self, index: usize) -> Option<Vec<u64>> {
        let pages = self.maps.get(index)?.range.length / PAGE_SIZE;
        self.never_written_in(index, 0, pages)
    }

    /// [`GuestMemory::never_written`] for pages `first..first + count` of region `index`
    /// (bit k = page `first + k`); `None` also when the run is outside the region.
    pub fn never_written_in(&self, index: usize, first: u64, count: u64) -> Option<Vec<u64>> {
        use std::io::{Read, Seek, SeekFrom};
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let m = self.maps.get(index)?;
        if first.checked_add(count)? > m.range.length / PAGE_SIZE {
            return None;
        }
        let host_page = self.host_page_index(index)?.checked_add(first)?;
        let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
        f.seek(SeekFrom::Start(host_page.checked_mul(8)?)).ok()?;
        let mut out = vec![0u64; count.div_ceil(64) as usize];
        let mut buf = vec![0u8; 8 * 4096];
        let mut page = 0u64;
        while page < count {
            let n = ((count - page) as usize).min(4096);
            f.read_exact(&mut buf[..n * 8]).ok()?;
            for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().ok()?);
                if entry & (PRESENT | SWAPPED) == 0 {
                    let k = page + i as u64;
                    out[(k / 64) as usize] |= 1 << (k % 64);
                }
            }
            page += n as u64;
        }
        Some(out)
    }

    /// Index of the first host page of region `index` in this process's address space.
    fn host_page_index(&self, index: usize) -> Option<u64> {
        // SAFETY: sysconf reads a constant of the running system; no memory is touched.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // pagemap has one entry per host page; the bitmap is per 4 KiB guest page.
        if host_page != PAGE_SIZE as libc::c_long {
            return None;
        }
        Some(self.maps.get(index)?.host.as_ptr() as u64 / PAGE_SIZE)
    }

    /// 64-bit hash of the page at `gpa` (four FNV-1a lanes over its 512 little-endian
    /// words; see [`hash_page_bytes`]).
    pub fn hash_page(&self, gpa: u64) -> Result<u64, GuestError> {
        Ok(hash_page_atomic(self.page_words(gpa)?))
    }

    /// Hashes of every page of region `index`, in page order.
    pub fn page_hashes(&self, index: usize) -> Result<Vec<u64>, GuestError> {
        let pages = self.region_pages(index)?;
        self.page_hashes_in(index, 0, pages)
    }

    /// Hashes of pages `first..first + count` of region `index`, in page order (a run,
    /// so a large region is hashed in bounded memory).
    pub fn page_hashes_in(
        &self,
        index: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, GuestError> {
        let r = *self
            .regions
            .get(index)
            .ok_or(GuestError::NoSuchRegion { index })?;
        if first
            .checked_add(count)
            .is_none_or(|end| end > r.length / PAGE_SIZE)
        {
            return Err(GuestError::OutOfRange {
                gpa: r.iova.saturating_add(first.saturating_mul(PAGE_SIZE)),
                len: count.saturating_mul(PAGE_SIZE),
            });
        }
        let m = &self.maps[index];
        // A never-written page is zero: its hash is known without faulting it in.
        let never = self.never_written_in(index, first, count);
        let zero = hash_page_bytes(&[0u8; PAGE_SIZE as usize]);
        Ok((0..count)
            .map(|k| {
                if never
                    .as_ref()
                    .is_some_and(|w| w[(k / 64) as usize] >> (k % 64) & 1 == 1)
                {
                    return zero;
                }
                hash_page_atomic(m.words((first + k) * PAGE_SIZE, PAGE_WORDS))
            })
            .collect())
    }
}

fn check_page_buf(len: usize) -> Result<(), GuestError> {
    if len as u64 != PAGE_SIZE {
        return Err(GuestError::BufferSize {
            expected: PAGE_SIZE as usize,
            got: len,
        });
    }
    Ok(())
}

/// FNV-1a (64-bit) over whole words: one xor and one multiply per 8 bytes.
pub fn hash_words(words: impl IntoIterator<Item = u64>) -> u64 {
    hash_words_from(HASH_SEED, words)
}

/// Where [`hash_words`] starts (the FNV-1a offset basis).
pub const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// [`hash_words`] continued from `h` ([`HASH_SEED`], or the hash of the words before), so
/// a long run of words is hashed in pieces.
pub fn hash_words_from(h: u64, words: impl IntoIterator<Item = u64>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    words
        .into_iter()
        .fold(h, |h, w| (h ^ w).wrapping_mul(PRIME))
}

/// Independent FNV-1a lanes in a page hash: one FNV chain is one multiply after another
/// (about 1.4 GB/s here, so verifying a 4 GiB guest took longer than sending it); four
/// chains over interleaved words keep four multiplies in flight.
const LANES: usize = 4;

/// Hash of one page's words: FNV-1a lane `l` over words `l, l + 4, ...`, then FNV-1a over
/// the four lane hashes. Every page hash (guest memory or a byte buffer) is this function.
fn hash_page_lanes(words: impl Iterator<Item = [u64; LANES]>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let lanes = words.fold([HASH_SEED; LANES], |mut h, w| {
        for l in 0..LANES {
            h[l] = (h[l] ^ w[l]).wrapping_mul(PRIME);
        }
        h
    });
    hash_words(lanes)
}

/// Hash of a page of guest memory (512 words).
fn hash_page_atomic(words: &[AtomicU64]) -> u64 {
    hash_page_lanes(
        words
            .chunks_exact(LANES)
            .map(|c| std::array::from_fn(|l| c[l].load(Ordering::Relaxed))),
    )
}

/// Hash of a 4096-byte page held in a byte buffer; equals [`GuestMemory::hash_page`] of a
/// guest page with the same contents.
pub fn hash_page_bytes(page: &[u8]) -> u64 {
    hash_page_lanes(page.chunks_exact(8 * LANES).map(|c| {
        std::array::from_fn(|l| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&c[8 * l..8 * l + 8]);
            u64::from_le_bytes(b)
        })
    }))
}

#[cfg(test)]
mod tests {

    #[test]
    fn never_written_pages() {
        let m = GuestMemory::new(&[(0, 1 << 20), (1 << 32, 64 << 10)]).unwrap();
        m.write_u64(0x3000, 7).unwrap();
        m.write_u64((1 << 32) + 0x1000, 9).unwrap();
        for (region, written) in [(0usize, 3u64), (1, 1)] {
            let Some(bits) = m.never_written(region) else {
                return; // no pagemap here: callers fall back to reading every page
            };
            let pages = m.region_pages(region).unwrap();
            for k in 0..pages {
                let never = bits[(k / 64) as usize] >> (k % 64) & 1 == 1;
                assert_eq!(never, k != written, "region {region} page {k}");
            }
        }
    }
    use super::*;

    /// Allocating up front keeps what was written and leaves no page unbacked (a page
    /// that was never written reads as present afterwards).
    #[test]
    fn prefault_keeps_contents_and_backs_every_page() {
        let m = GuestMemory::new(&[(0, 4 << 20), (1 << 32, 64 << 10)]).unwrap();
        m.write_u64(0x1238, 77).unwrap();
        let before = m.never_written(0);
        m.prefault().unwrap();
        assert_eq!(m.read_u64(0x1238).unwrap(), 77);
        assert!(m.is_zero_page(0x2000).unwrap());
        if let Some(before) = before {
            assert!(
                before.iter().any(|w| *w != 0),
                "nothing was unbacked before"
            );
            for region in 0..2 {
                let after = m.never_written(region).unwrap();
                assert!(after.iter().all(|w| *w == 0), "region {region}: {after:x?}");
            }
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(GuestMemory::new(&[]), Err(GuestError::NoRegions)));
        assert!(matches!(
            GuestMemory::new(&[(0, 0)]),
            Err(GuestError::RegionEmpty { .. })
        ));
        assert!(matches!(
            GuestMemory::new(&[(0x800, 0x1000)]),
            Err(GuestError::RegionUnaligned { .. })
        ));
        assert!(matches!(
            GuestMemory::new(&[(u64::MAX - 0xfff, 0x1000)]),
            Err(GuestError::RegionOverflow { .. })
        ));
        assert!(matches!(
            GuestMemory::new(&[(0x2000, 0x1000), (0x1000, 0x1000)]),
            Err(GuestError::RegionsOverlapOrUnsorted { index: 1 })
        ));
        assert!(matches!(
            GuestMemory::new(&[(0, 0x2000), (0x1000, 0x1000)]),
            Err(GuestError::RegionsOverlapOrUnsorted { index: 1 })
        ));
    }

    #[test]
    fn sparse_large_layout_and_access() {
        // 1 GiB + 1 GiB at 4 GiB: NORESERVE keeps this cheap.
        let m = GuestMemory::new(&[(0, 1 << 30), (4 << 30, 1 << 30)]).unwrap();
        assert_eq!(m.total_bytes(), 2 << 30);
        assert_eq!(m.region_of(0), Some(0));
        assert_eq!(m.region_of((1 << 30) - 1), Some(0));
        assert_eq!(m.region_of(1 << 30), None);
        assert_eq!(m.region_of(4 << 30), Some(1));
        assert_eq!(m.region_of(5 << 30), None);
        assert_eq!(m.bitmap_words(0).unwrap(), (1 << 18) / 64);

        let gpa = (4 << 30) + 7 * PAGE_SIZE;
        assert!(m.is_zero_page(gpa).unwrap());
        let page: Vec<u8> = (0..4096).map(|i| (i * 7) as u8).collect();
        m.write_page(gpa, &page).unwrap();
        let mut back = vec![0u8; 4096];
        m.read_page(gpa, &mut back).unwrap();
        assert_eq!(back, page);
        assert!(!m.is_zero_page(gpa).unwrap());
        assert_eq!(m.hash_page(gpa).unwrap(), hash_page_bytes(&page));
        assert_ne!(
            m.hash_page(gpa).unwrap(),
            m.hash_page(gpa + PAGE_SIZE).unwrap()
        );
        m.write_u64(gpa + 8, 42).unwrap();
        assert_eq!(m.read_u64(gpa + 8).unwrap(), 42);
    }

    #[test]
    fn bounds_are_errors() {
        let m = GuestMemory::new(&[(0, 0x4000), (0x10000, 0x1000)]).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            m.read_page(0x4000, &mut buf),
            Err(GuestError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read_page(0x100, &mut buf),
            Err(GuestError::Unaligned { .. })
        ));
        assert!(matches!(
            m.read_page(0, &mut buf[..100]),
            Err(GuestError::BufferSize { .. })
        ));
        assert!(matches!(
            m.words(0x3ff8, 16),
            Err(GuestError::OutOfRange { .. })
        ));
        assert!(m.words(0x3ff8, 8).is_ok());
        assert!(matches!(m.read_u64(3), Err(GuestError::Unaligned { .. })));
        assert!(matches!(
            m.read_u64(u64::MAX - 7),
            Err(GuestError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.page_hashes(2),
            Err(GuestError::NoSuchRegion { .. })
        ));
        assert_eq!(m.page_hashes(1).unwrap().len(), 1);
    }

    #[test]
    fn hash_detects_single_bit() {
        let mut page = vec![0u8; 4096];
        let h0 = hash_page_bytes(&page);
        page[4095] = 1;
        assert_ne!(hash_page_bytes(&page), h0);
    }
}
