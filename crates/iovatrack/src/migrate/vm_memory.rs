//! `vm-memory` at the seams: a VMM's `GuestMemoryMmap` (or any
//! [`GuestMemoryBackend`]) as the engine's [`GuestRam`], a [`Layout`] from it for the
//! planner, and dirt out as a [`MemoryRangeTable`] in the shape VMMs send (Cloud
//! Hypervisor's `MemoryRangeTable`: gpa + length runs).
//!
//! # The ledger with a protocol that has no per-pass acknowledgement
//!
//! [`crate::track::DirtLedger`] keeps a pass's dirt "in flight" until [`ack`] so a failed
//! pass can be [`rollback`]ed into the pending dirt. A protocol without per-pass
//! acknowledgements (Cloud Hypervisor's sends a table, then the pages, and fails the whole
//! migration on any error) uses it like this, per pass:
//!
//! 1. collect the CPU log and the trackers into the ledger;
//! 2. [`begin_pass`], then [`MemoryRangeTable::from_ledger`] for what to send;
//! 3. send the table and the pages; when the transport has taken every byte, [`ack`]
//!    (the transport's success is the acknowledgement); on an error, [`rollback`] before
//!    the retry or the abort, so a retry resends that dirt.
//!
//! `examples/embed.rs` does exactly this with its own transport.
//!
//! [`ack`]: crate::track::DirtLedger::ack
//! [`rollback`]: crate::track::DirtLedger::rollback
//! [`begin_pass`]: crate::track::DirtLedger::begin_pass

use crate::layout::{Layout, LayoutError, Section, SectionKind};
use crate::migrate::seams::{GuestRam, VmError};
use crate::range::IovaRange;
use crate::track::DirtLedger;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Any `vm-memory` guest memory as [`GuestRam`].
pub struct VmMemory<M> {
    memory: M,
    regions: Vec<IovaRange>,
}

impl<M: GuestMemoryBackend> VmMemory<M> {
    /// Wrap `memory`; its regions must be 4 KiB aligned (they are the dirty-log slots).
    pub fn new(memory: M) -> Result<Self, VmError> {
        let regions: Vec<IovaRange> = memory
            .iter()
            .map(|r| IovaRange::new(r.start_addr().0, r.len()))
            .collect();
        if let Some(r) = regions.iter().find(|r| !r.is_aligned(4096)) {
            return Err(VmError::Memory(
                format!("region {:#x}+{:#x} is not 4 KiB aligned", r.iova, r.length).into(),
            ));
        }
        let mut regions = regions;
        regions.sort_unstable();
        Ok(Self { memory, regions })
    }

    /// The wrapped memory.
    pub fn inner(&self) -> &M {
        &self.memory
    }
}

impl<M: GuestMemoryBackend + Send + Sync> GuestRam for VmMemory<M> {
    fn regions(&self) -> &[IovaRange] {
        &self.regions
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmError::Memory(Box::new(e)))
    }
    fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
        self.memory
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmError::Memory(Box::new(e)))
    }
}

/// A layout of one RAM section per region of `memory`, in the address space `memory`,
/// for the planner: what a VMM without a QEMU-style memory map plans from.
pub fn layout_from<M: GuestMemoryBackend>(memory: &M) -> Result<Layout, LayoutError> {
    let sections = memory
        .iter()
        .enumerate()
        .filter(|(_, r)| r.len() > 0)
        .map(|(i, r)| {
            let start = r.start_addr().0;
            // Inclusive last byte: a region may end at 2^64 - 1.
            let last = start.saturating_add(r.len() - 1);
            Section::new(start, last, SectionKind::Ram, format!("ram{i}"))
        })
        .collect::<Vec<_>>();
    Layout::new("memory", sections)
}

/// A guest-physical range to send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Dirty memory as gpa + length runs, in address order (Cloud Hypervisor's shape).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    /// The runs.
    pub data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// The ledger's in-flight pages (after [`DirtLedger::begin_pass`]) as runs, one run
    /// per maximal stretch of dirty pages within a region.
    pub fn from_ledger(ledger: &DirtLedger, regions: &[IovaRange], page: u64) -> Self {
        let mut data = Vec::new();
        for (i, r) in regions.iter().enumerate() {
            for (first, len) in ledger.inflight(i).runs() {
                data.push(MemoryRange {
                    gpa: r.iova + first * page,
                    length: len * page,
                });
            }
        }
        Self { data }
    }

    /// Every byte of `regions` (pass 0).
    pub fn full(regions: &[IovaRange]) -> Self {
        Self {
            data: regions
                .iter()
                .map(|r| MemoryRange {
                    gpa: r.iova,
                    length: r.length,
                })
                .collect(),
        }
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.data.iter().map(|r| r.length).sum()
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn vm_memory_is_guest_ram() {
        let m = VmMemory::new(mem()).unwrap();
        assert_eq!(m.regions().len(), 2);
        let page = [7u8; 4096];
        m.write_page((1 << 32) + 4096, &page).unwrap();
        let mut back = [0u8; 4096];
        m.read_page((1 << 32) + 4096, &mut back).unwrap();
        assert_eq!(back, page);
        assert!(m.is_zero_page(0).unwrap());
        assert!(!m.is_zero_page((1 << 32) + 4096).unwrap());
        assert!(m.read_page(3 << 30, &mut back).is_err(), "outside RAM");
    }

    #[test]
    fn layout_and_range_table_from_vm_memory() {
        let m = mem();
        let l = layout_from(&m).unwrap();
        assert_eq!(l.sections().len(), 2);
        let regions = VmMemory::new(m).unwrap().regions().to_vec();
        let mut ledger = DirtLedger::new(&regions, 4096).unwrap();
        ledger.mark_range(IovaRange::new(0x3000, 0x2000));
        ledger.mark_range(IovaRange::new((1 << 32) + 0x10000, 0x1000));
        ledger.begin_pass().unwrap();
        let t = MemoryRangeTable::from_ledger(&ledger, &regions, 4096);
        assert_eq!(
            t.data,
            vec![
                MemoryRange {
                    gpa: 0x3000,
                    length: 0x2000
                },
                MemoryRange {
                    gpa: (1 << 32) + 0x10000,
                    length: 0x1000
                }
            ]
        );
        assert_eq!(t.bytes(), 0x3000);
        assert_eq!(MemoryRangeTable::full(&regions).bytes(), 3 << 20);
    }
}
