//! A pre-copy loop over real DMA: `Tracker` (IOMMU mode on the type1 container) and
//! `DirtLedger` copy a 2 MiB "guest" to a destination buffer while edu DMAs into it between
//! passes; after the device stops, a final pass must leave the destination equal to the
//! source. Only the device writes the guest: the patterns are staged in a page outside it.

use crate::{pattern, DmaBuffer, Edu, Report, EDU_BUF, PAGE, PAGES, XFER};
use iovatrack::device::{Type1Container, VfioDmaLogger};
use iovatrack::layout::{Layout, Section, SectionKind};
use iovatrack::plan::Planner;
use iovatrack::range::IovaRange;
use iovatrack::track::{Container, DirtLedger, Tracker};
use std::sync::Arc;
use vfio_ioctls::VfioContainer;

/// Pre-copy passes before the device stops.
const PASSES: usize = 4;
/// DMA writes into the guest between two passes.
const WRITES_PER_PASS: usize = 2;

/// Copies the ledger's in-flight pages from `src` to `dst`; returns the pages copied.
fn send(ledger: &DirtLedger, src: &DmaBuffer, dst: &mut [u8]) -> u64 {
    let mut pages = 0;
    for (first, len) in ledger.inflight(0).runs() {
        let (off, n) = ((first * PAGE) as usize, (len * PAGE) as usize);
        dst[off..off + n].copy_from_slice(&src.read(off, n));
        pages += len;
    }
    pages
}

/// Runs the loop; `staging` is mapped at `staging_iova`, outside the guest range.
#[allow(clippy::too_many_arguments)]
pub fn run(
    r: &mut Report,
    container: &VfioContainer,
    logger: VfioDmaLogger,
    edu: &Edu,
    guest: &DmaBuffer,
    range: IovaRange,
    staging: &DmaBuffer,
    staging_iova: u64,
) -> Result<(), String> {
    let iommu = Type1Container::from_container(container).map_err(|e| e.to_string())?;
    let c = Container::new("precopy")
        .device(Arc::new(logger))
        .iommu(Arc::new(iommu));
    let layout = Layout::new(
        "memory",
        vec![Section::new(
            range.iova,
            range.iova + range.length - 1,
            SectionKind::Ram,
            "ram",
        )],
    )
    .map_err(|e| e.to_string())?;
    let mut tracker = Tracker::new(c, Planner::new());
    let mode = tracker.start(&layout).map_err(|e| e.to_string())?.name();
    let mut ledger = DirtLedger::new(&[range], PAGE).map_err(|e| e.to_string())?;
    let mut dest = vec![0u8; range.length as usize];
    let mut sent = Vec::new();
    let mut written = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    ledger.mark_all(); // pass 0 sends everything
    let mut after_pass0 = None;
    for pass in 0..=PASSES {
        if pass > 0 {
            tracker.collect(&mut ledger).map_err(|e| e.to_string())?;
        }
        ledger.begin_pass().map_err(|e| e.to_string())?;
        sent.push(send(&ledger, guest, &mut dest));
        ledger.ack();
        if pass == 0 {
            after_pass0 = Some(dest.clone());
        }
        if pass == PASSES {
            break;
        }
        // The device keeps writing while the copy goes on.
        for w in 0..WRITES_PER_PASS {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let page = rng % PAGES;
            let off = (rng >> 32) % (PAGE - XFER as u64);
            staging.write(0, &pattern((pass * WRITES_PER_PASS + w) as u8));
            edu.dma(staging_iova, EDU_BUF, XFER, false)?;
            edu.dma(EDU_BUF, range.iova + page * PAGE + off, XFER, true)?;
            written.push(page);
        }
    }
    // Stop-and-copy: the device is quiet; the last dirt, then stop tracking.
    tracker.finish(&mut ledger).map_err(|e| e.to_string())?;
    ledger.begin_pass().map_err(|e| e.to_string())?;
    sent.push(send(&ledger, guest, &mut dest));
    ledger.ack();

    let same = dest == guest.read(0, range.length as usize);
    // The check has teeth: the DMA after pass 0 changed the guest.
    let moved = after_pass0.is_some_and(|d| d != dest);
    r.check(
        "precopy_real_dma_nothing_lost",
        same && moved,
        format!(
            "{mode} mode; {} DMA writes to pages {written:?} during pre-copy; pages sent per pass {sent:?} (type1: every mapped page, every pass: never converges); destination equals source: {same}; DMA changed the guest after pass 0: {moved}",
            written.len()
        ),
    );
    Ok(())
}
