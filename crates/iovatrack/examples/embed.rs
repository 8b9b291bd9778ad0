//! A small VMM-style program embedding iovatrack: guest memory from `vm-memory`, ranges
//! planned from it, DMA logging started on a container, pre-copy passes over the VMM's
//! own transport, and a verified copy at the end.
//!
//! The device here is the emulated mlx5 VF. With real hardware the container takes a
//! `VfioDmaLogger` built on the `vfio_ioctls::VfioDevice` the VMM already opened:
//!
//! ```ignore
//! let logger = iovatrack::device::VfioDmaLogger::new("nic0", vfio_device.clone())?;
//! let container = Container::new("c0").device(Arc::new(logger));
//! ```
//!
//! and the rest of this program is unchanged. The "vCPU" below logs its writes into an
//! atomic bitmap where a KVM VMM reads `KVM_GET_DIRTY_LOG`; the transport is a channel
//! where a VMM has its socket. The transport has no per-pass acknowledgement: a pass
//! counts as delivered when the channel took it (see `iovatrack::migrate::vm_memory`).
//!
//! Run: `cargo run --release --example embed`.

use iovatrack::bitmap::{AtomicDirtyBitmap, DirtyBitmap};
use iovatrack::device::EmulatedDevice;
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::vm_memory::{layout_from, MemoryRangeTable};
use iovatrack::plan::limits::DeviceProfile;
use iovatrack::plan::Planner;
use iovatrack::track::{Container, DirtLedger, Tracker};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
const RAM: [(u64, u64); 2] = [(0, 64 << 20), (1 << 32, 64 << 20)];

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One pass on the wire: the table, then the pages it names, in order.
struct Pass {
    table: MemoryRangeTable,
    data: Vec<u8>,
}

fn main() -> Result<(), Error> {
    // The VMM's guest memory, and the destination's.
    let ranges: Vec<(GuestAddress, usize)> = RAM
        .iter()
        .map(|&(a, n)| (GuestAddress(a), n as usize))
        .collect();
    let src_mmap = GuestMemoryMmap::<()>::from_ranges(&ranges)?;
    let dst = GuestMemoryMmap::<()>::from_ranges(&ranges)?;
    // iovatrack shares the mappings (no copy): what the guest writes is what is sent.
    let memory = Arc::new(GuestMemory::from_vm_memory(src_mmap.clone())?);
    let regions = memory.regions().to_vec();

    // Plan from the memory map and start DMA logging on the container.
    let layout = layout_from(&src_mmap)?;
    let limits = DeviceProfile::Mlx5.limits();
    let device = Arc::new(EmulatedDevice::new(limits).named("nic0"));
    let mut tracker = Tracker::new(
        Container::new("c0").device(device.clone()),
        Planner::new().device(limits),
    );
    let mode = tracker.start(&layout)?;
    println!(
        "tracking: {} mode, {} range(s) for {} region(s)",
        mode.name(),
        mode.ranges().len(),
        regions.len()
    );

    // The guest: a vCPU writing pages (logged as KVM would) and the device's DMA
    // (logged only by the device), both until the VMM stops them.
    let cpu_log: Arc<Vec<AtomicDirtyBitmap>> = Arc::new(
        regions
            .iter()
            .map(|r| AtomicDirtyBitmap::new(r.length / PAGE))
            .collect(),
    );
    let running = Arc::new(AtomicBool::new(true));
    let guest = {
        let (memory, cpu_log, running, device) = (
            memory.clone(),
            cpu_log.clone(),
            running.clone(),
            device.clone(),
        );
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0u64;
            while running.load(Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let region = (x % 2) as usize;
                let r = memory.regions()[region];
                let page = (x >> 8) % (r.length / PAGE);
                let gpa = r.iova + page * PAGE + 8 * ((x >> 40) % 512);
                memory.write_u64(gpa, x).expect("inside RAM");
                if x & 1 == 0 {
                    // A CPU store: in KVM's dirty log.
                    let _ = cpu_log[region].set(page);
                } else {
                    // A DMA write: the data lands first, then the device logs it.
                    device.dma_write(gpa, 8);
                }
                n += 1;
                if n.is_multiple_of(64) {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        })
    };

    // The destination: writes each pass into its memory.
    let (tx, rx) = mpsc::sync_channel::<Pass>(1);
    let receiver = {
        let dst = dst.clone();
        std::thread::spawn(move || -> Result<u64, Error> {
            let mut pages = 0;
            for pass in rx {
                let mut at = 0usize;
                for r in &pass.table.data {
                    let n = r.length as usize;
                    dst.write_slice(&pass.data[at..at + n], GuestAddress(r.gpa))?;
                    at += n;
                    pages += r.length / PAGE;
                }
            }
            Ok(pages)
        })
    };

    // Pre-copy: pass 0 sends everything; later passes the union of CPU and device dirt.
    let mut ledger = DirtLedger::new(&regions, PAGE)?;
    ledger.mark_all();
    let mut scratch: Vec<DirtyBitmap> = regions
        .iter()
        .map(|r| DirtyBitmap::new(r.length / PAGE))
        .collect();
    let send = |ledger: &mut DirtLedger| -> Result<u64, Error> {
        ledger.begin_pass()?;
        let table = MemoryRangeTable::from_ledger(ledger, &regions, PAGE);
        let mut data = Vec::with_capacity(table.bytes() as usize);
        let mut page = vec![0u8; PAGE as usize];
        for r in &table.data {
            for p in 0..r.length / PAGE {
                memory.read_page(r.gpa + p * PAGE, &mut page)?;
                data.extend_from_slice(&page);
            }
        }
        let pages = table.bytes() / PAGE;
        match tx.send(Pass { table, data }) {
            // Taken by the transport: delivered.
            Ok(()) => ledger.ack(),
            Err(e) => {
                // Not delivered: the dirt goes back for a retry.
                ledger.rollback();
                return Err(e.to_string().into());
            }
        }
        Ok(pages)
    };
    let mut collect = |ledger: &mut DirtLedger, tracker: &mut Tracker| -> Result<(), Error> {
        for (i, log) in cpu_log.iter().enumerate() {
            log.read_and_clear_into(&mut scratch[i])?;
            ledger.or_region_words(i, scratch[i].words())?;
        }
        tracker.collect(ledger)?;
        Ok(())
    };
    let mut passes = 0;
    let mut sent = send(&mut ledger)?;
    passes += 1;
    loop {
        collect(&mut ledger, &mut tracker)?;
        let pending = ledger.pending_pages();
        if pending < 256 || passes >= 10 {
            break;
        }
        sent += send(&mut ledger)?;
        passes += 1;
    }

    // Stop-and-copy: stop the guest and its device, take the last dirt, send it.
    running.store(false, Relaxed);
    guest.join().map_err(|_| "guest thread panicked")?;
    collect(&mut ledger, &mut tracker)?;
    sent += send(&mut ledger)?;
    passes += 1;
    tracker.stop();
    drop(tx);
    let received = receiver.join().map_err(|_| "receiver panicked")??;

    // Verify: every page of the destination equals the source's.
    let mut a = vec![0u8; PAGE as usize];
    let mut b = vec![0u8; PAGE as usize];
    let mut mismatched = 0u64;
    for r in &regions {
        for p in 0..r.length / PAGE {
            let gpa = r.iova + p * PAGE;
            memory.read_page(gpa, &mut a)?;
            dst.read_slice(&mut b, GuestAddress(gpa))?;
            mismatched += u64::from(a != b);
        }
    }
    println!(
        "passes: {passes}, pages sent: {sent} (received {received}), untracked DMA writes: {}, mismatched pages: {mismatched}",
        device.untracked_writes()
    );
    if mismatched != 0 || device.untracked_writes() != 0 {
        return Err(format!("NOT VERIFIED: {mismatched} page(s) differ").into());
    }
    println!("VERIFIED: the destination's memory equals the source's");
    Ok(())
}
