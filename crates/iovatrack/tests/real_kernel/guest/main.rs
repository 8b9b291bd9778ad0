//! The program the `real_kernel` integration test runs inside a nested VM (Debian's kernel
//! under QEMU, q35 + `intel-iommu`, QEMU's `edu` PCI device). It drives the project's real
//! VFIO backends against a real kernel and a device that really DMAs, and prints one line
//! per check on the serial console:
//!
//! ```text
//! RESULT <name> ok|fail <detail>
//! SKIP <name> <reason>
//! INFO <name> <detail>
//! DONE failed=<n>
//! ```
//!
//! It needs root, `vfio`, `vfio_iommu_type1` and `vfio-pci` loaded, and one `edu` device
//! (1234:11e8) behind an IOMMU. Run anywhere else it says what is missing and fails.
//!
//! `edu` (qemu hw/misc/edu.c): BAR0 register 0x00 = 0x010000ed, 0x04 = the complement of
//! what was written; DMA registers 0x80 source, 0x88 destination, 0x90 count, 0x98 command
//! (bit 0 start, cleared when done; bit 1 direction: 1 = from the device's 4 KiB buffer at
//! device address 0x40000 to RAM). DMA addresses are masked to 28 bits, and QEMU 7.2 aborts
//! on a transfer ending exactly at the buffer's end, so every transfer is shorter.

mod precopy;

use iovatrack::device::{DmaLogger, Errno, IommuDirtyTracker, Type1Container, VfioDmaLogger};
use iovatrack::layout::{Layout, Section, SectionKind};
use iovatrack::plan::Planner;
use iovatrack::range::IovaRange;
use iovatrack::track::{Container, DirtLedger, FallbackReason, Tracker, TrackingMode};
use std::fmt::Display;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio_bindings::bindings::vfio::{
    vfio_device_feature, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

/// Where the test buffer is mapped: below edu's 28-bit DMA mask.
const IOVA: u64 = 0x100_0000;
/// 2 MiB: 512 pages of 4 KiB.
const LEN: usize = 2 << 20;
const PAGE: u64 = 4096;
const PAGES: u64 = LEN as u64 / PAGE;
/// An IOVA below the DMA mask that is never mapped.
const UNMAPPED_IOVA: u64 = 0x800_0000;
/// A page outside the migrated range, where DMA patterns are staged.
const STAGING_IOVA: u64 = 0x300_0000;
/// Bytes per edu transfer (less than its 4 KiB buffer; see the module docs).
const XFER: usize = 256;
/// edu's buffer, in device address space.
const EDU_BUF: u64 = 0x40000;

/// Prints the protocol lines and counts failures.
#[derive(Default)]
struct Report {
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl Display) -> bool {
        if !ok {
            self.failed += 1;
        }
        println!(
            "RESULT {name} {} {}",
            if ok { "ok" } else { "fail" },
            one_line(detail)
        );
        ok
    }

    fn skip(&self, name: &str, reason: impl Display) {
        println!("SKIP {name} {}", one_line(reason));
    }

    fn info(&self, name: &str, detail: impl Display) {
        println!("INFO {name} {}", one_line(detail));
    }
}

fn one_line(d: impl Display) -> String {
    d.to_string().replace('\n', " | ")
}

/// Anonymous memory the device DMAs into; touched only through raw pointers (volatile), as
/// vfio-ioctls' `vfio_dma_map` contract requires while it is mapped.
struct DmaBuffer {
    ptr: *mut u8,
    len: usize,
}

impl DmaBuffer {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; the result
        // is checked before use and owned (unmapped in Drop) by the returned value.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: in bounds (asserted); volatile because the device may access the page.
            unsafe { self.ptr.add(off + i).write_volatile(*b) };
        }
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        let mut out = Vec::with_capacity(len);
        let mut i = 0;
        // Whole aligned u64 words where possible: byte by byte is slow in an unoptimised
        // build under TCG.
        while i < len {
            let p = self.ptr.wrapping_add(off + i);
            if (p as usize).is_multiple_of(8) && len - i >= 8 {
                // SAFETY: 8 in-bounds bytes (asserted above), aligned to 8; volatile because
                // the device may write the page.
                let w = unsafe { p.cast::<u64>().read_volatile() };
                out.extend_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: in bounds (asserted); volatile, as above.
                out.push(unsafe { p.read_volatile() });
                i += 1;
            }
        }
        out
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the IOMMU mapping was removed
        // (or the container closed) before this runs.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The edu device behind its VFIO device fd.
struct Edu<'a>(&'a VfioDevice);

impl Edu<'_> {
    fn read32(&self, off: u64) -> u32 {
        let mut b = [0xffu8; 4];
        self.0.region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut b, off);
        u32::from_le_bytes(b)
    }

    fn write32(&self, off: u64, v: u32) {
        self.0
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, &v.to_le_bytes(), off);
    }

    /// One DMA transfer; waits for the device to clear its start bit.
    fn dma(&self, src: u64, dst: u64, count: usize, to_ram: bool) -> Result<Duration, String> {
        let (src, dst) = (
            u32::try_from(src).map_err(|_| "src above 4 GiB")?,
            u32::try_from(dst).map_err(|_| "dst above 4 GiB")?,
        );
        self.write32(0x80, src);
        self.write32(0x88, dst);
        self.write32(0x90, count as u32);
        self.write32(0x98, 1 | if to_ram { 2 } else { 0 });
        let t = Instant::now();
        while self.read32(0x98) & 1 != 0 {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("DMA still running after {:?}", t.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(t.elapsed())
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..XFER)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn bit(words: &[u64], k: u64) -> bool {
    words[(k / 64) as usize] >> (k % 64) & 1 == 1
}

/// The edu device's sysfs directory (vendor 1234, device 11e8).
fn find_edu() -> Option<PathBuf> {
    let rd = |p: &Path, f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
    fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| rd(p, "vendor").trim() == "0x1234" && rd(p, "device").trim() == "0x11e8")
}

/// Bind `dev` to vfio-pci through `driver_override`; returns the driver now bound.
fn bind_vfio_pci(dev: &Path) -> std::io::Result<String> {
    let bdf = dev.file_name().unwrap().to_string_lossy().to_string();
    fs::write(dev.join("driver_override"), "vfio-pci")?;
    if dev.join("driver").exists() {
        fs::write(dev.join("driver/unbind"), &bdf)?;
    }
    fs::write("/sys/bus/pci/drivers_probe", &bdf)?;
    let drv = fs::read_link(dev.join("driver"))?;
    Ok(drv.file_name().unwrap().to_string_lossy().to_string())
}

/// A `VFIO_DEVICE_FEATURE` call with an 8-byte payload; the errno it fails with, if any.
fn feature_errno(dev: &VfioDevice, flags: u32) -> Option<Errno> {
    #[repr(C)]
    struct Buf {
        hdr: vfio_device_feature,
        payload: [u64; 1],
    }
    let mut buf = Buf {
        hdr: vfio_device_feature {
            argsz: std::mem::size_of::<Buf>() as u32,
            flags,
            ..Default::default()
        },
        payload: [0],
    };
    // SAFETY: a complete feature buffer (header + 8-byte payload, argsz = its size) on a
    // VFIO device fd we hold; the kernel writes at most argsz bytes into it.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            iovatrack::device::vfio::VFIO_DEVICE_FEATURE as _,
            &mut buf,
        )
    };
    (ret < 0).then(Errno::last)
}

/// Kernel log lines printed from now on (`/dev/kmsg`, positioned at its end).
struct Kmsg(fs::File);

impl Kmsg {
    fn open() -> std::io::Result<Self> {
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        // SAFETY: plain lseek on our fd; SEEK_END on /dev/kmsg skips the old records.
        unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
        Ok(Self(f))
    }

    /// The records printed since, one per read (EAGAIN ends them).
    fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = self.0.read(&mut buf) {
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n]).to_string();
            // "prio,seq,time,flags;message"
            out.push(
                rec.split_once(';')
                    .map_or(rec.clone(), |(_, m)| m.trim().into()),
            );
        }
        out
    }
}

fn main() {
    let mut r = Report::default();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.info("kernel", release.trim());
    if let Err(e) = run(&mut r) {
        r.check("guest_program", false, e);
    }
    println!("DONE failed={}", r.failed);
}

fn run(r: &mut Report) -> Result<(), String> {
    // The device, its IOMMU group, vfio-pci.
    let dev = find_edu().ok_or("no edu device (1234:11e8) in /sys/bus/pci/devices")?;
    let bdf = dev.file_name().unwrap().to_string_lossy().to_string();
    r.check("edu_found", true, &bdf);
    let group = fs::read_link(dev.join("iommu_group"))
        .map_err(|e| format!("{bdf} has no IOMMU group ({e}): is the vIOMMU on?"))?;
    let group_id = group.file_name().unwrap().to_string_lossy().to_string();
    let members = fs::read_dir(
        Path::new("/sys/kernel/iommu_groups")
            .join(&group_id)
            .join("devices"),
    )
    .map_or(0, |d| d.count());
    r.check(
        "iommu_group_alone",
        members == 1,
        format!("group {group_id} has {members} device(s)"),
    );
    let driver = bind_vfio_pci(&dev).map_err(|e| format!("binding to vfio-pci: {e}"))?;
    let node = Path::new("/dev/vfio").join(&group_id);
    if !r.check(
        "bind_vfio_pci",
        driver == "vfio-pci" && node.exists(),
        format!(
            "driver {driver}, {} exists: {}",
            node.display(),
            node.exists()
        ),
    ) {
        return Err("edu is not on vfio-pci".into());
    }

    // Container, group, device through vfio-ioctls.
    let container = Arc::new(VfioContainer::new(None).map_err(|e| format!("container: {e}"))?);
    r.check("vfio_container", true, "API version ok, TYPE1v2 supported");
    let ops: Arc<dyn VfioOps> = container.clone();
    let device = VfioDevice::new(&dev, ops, false).map_err(|e| format!("device: {e}"))?;
    let bar0 = device.get_region_size(VFIO_PCI_BAR0_REGION_INDEX);
    r.check(
        "vfio_device",
        bar0 == 1 << 20,
        format!("group {group_id} set to the container, type1v2, BAR0 {bar0} bytes"),
    );

    // Bus mastering (and memory decoding) through the config region.
    let mut cmd = [0u8; 2];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, 4);
    let c = u16::from_le_bytes(cmd) | 0x6;
    device.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &c.to_le_bytes(), 4);
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, 4);
    let c = u16::from_le_bytes(cmd);
    r.check(
        "bus_master",
        c & 0x6 == 0x6,
        format!("PCI command {c:#06x}"),
    );
    let edu = Edu(&device);
    let id = edu.read32(0);
    edu.write32(4, 0x1234_5678);
    let live = edu.read32(4);
    r.check(
        "edu_bar0",
        id == 0x0100_00ed && live == !0x1234_5678,
        format!("id {id:#010x}, liveness {live:#010x}"),
    );

    // MAP_DMA of 2 MiB.
    let buf = DmaBuffer::new(LEN).map_err(|e| format!("mmap: {e}"))?;
    // SAFETY: `buf` stays mapped until after the unmap below (or until the container is
    // closed); it is only accessed through volatile raw-pointer reads and writes.
    let mapped = unsafe { container.vfio_dma_map(IOVA, LEN, buf.ptr) };
    r.check(
        "type1_map_dma",
        mapped.is_ok(),
        format!("{LEN} bytes at IOVA {IOVA:#x}: {mapped:?}"),
    );
    mapped.map_err(|e| format!("MAP_DMA: {e}"))?;

    let range = IovaRange::new(IOVA, LEN as u64);
    let type1 = Type1Container::from_container(&container).map_err(|e| e.to_string())?;
    let mut bm = vec![0u64; (PAGES / 64) as usize];
    let get = |bm: &mut Vec<u64>| {
        bm.iter_mut().for_each(|w| *w = 0);
        type1.read_dirty(range, PAGE, bm, true).map(|()| ones(bm))
    };

    // VFIO_IOMMU_DIRTY_PAGES START, GET_BITMAP before any DMA.
    let started = type1.set_tracking(true);
    r.check("type1_dirty_start", started.is_ok(), format!("{started:?}"));
    let before = get(&mut bm);
    r.check(
        "type1_dirty_all_before_dma",
        before == Ok(PAGES),
        format!("{before:?} of {PAGES} pages dirty with no DMA at all"),
    );

    // Real DMA: a pattern from page 1 into edu's buffer, then from the buffer to page 3.
    let pat = pattern(0x5a);
    buf.write(PAGE as usize, &pat);
    let t_in = edu.dma(IOVA + PAGE, EDU_BUF, XFER, false)?;
    let t_out = edu.dma(EDU_BUF, IOVA + 3 * PAGE, XFER, true)?;
    let landed = buf.read(3 * PAGE as usize, XFER + 16);
    let ok = landed[..XFER] == pat[..] && landed[XFER..].iter().all(|&b| b == 0);
    r.check(
        "edu_dma_lands",
        ok,
        format!(
            "{XFER} bytes RAM->edu ({t_in:?}) then edu->RAM at IOVA {:#x} ({t_out:?}); first bytes {:02x?}",
            IOVA + 3 * PAGE,
            &landed[..8]
        ),
    );
    let after = get(&mut bm);
    r.check(
        "type1_dirty_all_after_dma",
        after == Ok(PAGES) && bit(&bm, 3),
        format!("{after:?} of {PAGES} pages dirty, DMA'd page 3 among them"),
    );
    let again = get(&mut bm);
    r.check(
        "type1_dirty_never_converges",
        again == Ok(PAGES),
        format!("{again:?} of {PAGES} pages dirty on a GET right after a GET"),
    );

    type1_rules(r, &container, &type1, &mut bm)?;

    // DMA to an IOVA that is not mapped: the IOMMU blocks it.
    let snapshot = buf.read(0, LEN);
    let (t, fault) = blocked_dma(&edu, UNMAPPED_IOVA)?;
    let untouched = buf.read(0, LEN) == snapshot;
    r.check(
        "unmapped_dma_blocked",
        fault.is_some() && untouched,
        format!(
            "DMA to IOVA {UNMAPPED_IOVA:#x} ({t:?}): kernel says {:?}; mapped buffer untouched: {untouched}",
            fault.as_deref().unwrap_or("nothing")
        ),
    );

    // STOP; a GET after STOP is refused.
    let stopped = type1.set_tracking(false);
    r.check("type1_dirty_stop", stopped.is_ok(), format!("{stopped:?}"));
    let after_stop = type1.read_dirty(range, PAGE, &mut bm, true);
    let errno = after_stop.as_ref().err().map(|e| e.errno);
    r.check(
        "type1_get_after_stop_einval",
        errno == Some(Errno::EINVAL),
        match &after_stop {
            Ok(()) => "GET_BITMAP succeeded after STOP".to_string(),
            Err(e) => e.to_string(),
        },
    );

    // Device features on vfio-pci: no DMA logging, no migration.
    let logger = VfioDmaLogger::from_vfio_device(&device, format!("edu {bdf}"))
        .map_err(|e| e.to_string())?;
    let probe = logger.probe();
    r.check(
        "dma_logging_probe_enotty",
        probe.as_ref().err().map(|e| e.errno) == Some(Errno::ENOTTY),
        match &probe {
            Ok(()) => "PROBE succeeded".to_string(),
            Err(e) => e.to_string(),
        },
    );
    let mig = feature_errno(
        &device,
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
    );
    let mig_probe = feature_errno(
        &device,
        VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
    );
    let query = device.query_migration_support();
    r.check(
        "migration_feature_enotty",
        mig == Some(Errno::ENOTTY) && mig_probe == Some(Errno::ENOTTY) && matches!(query, Ok(None)),
        format!("GET {mig:?}, PROBE {mig_probe:?}, vfio-ioctls query_migration_support {query:?}"),
    );
    let state = feature_errno(
        &device,
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    );
    r.check(
        "mig_device_state_enotty",
        state == Some(Errno::ENOTTY),
        format!("MIG_DEVICE_STATE GET {state:?}"),
    );

    // The project's tracker over the real backends: device logging refused, IOMMU mode.
    tracker(r, &container, logger, &edu, &buf, range)?;

    // A pre-copy loop with the device writing: nothing the device wrote may be lost.
    let staging = DmaBuffer::new(PAGE as usize).map_err(|e| format!("mmap: {e}"))?;
    // SAFETY: as for `buf`: `staging` outlives its mapping (unmapped just below) and is
    // only accessed through volatile raw-pointer reads and writes.
    unsafe { container.vfio_dma_map(STAGING_IOVA, PAGE as usize, staging.ptr) }
        .map_err(|e| format!("MAP_DMA of the staging page: {e}"))?;
    let logger = VfioDmaLogger::from_vfio_device(&device, format!("edu {bdf}"))
        .map_err(|e| e.to_string())?;
    let res = precopy::run(
        r,
        &container,
        logger,
        &edu,
        &buf,
        range,
        &staging,
        STAGING_IOVA,
    );
    container
        .vfio_dma_unmap(STAGING_IOVA, PAGE as usize)
        .map_err(|e| format!("UNMAP_DMA of the staging page: {e}"))?;
    res?;

    // iommufd: needs CONFIG_IOMMUFD (/dev/iommu) and the vfio cdev (/dev/vfio/devices).
    if Path::new("/dev/iommu").exists() {
        r.info(
            "iommufd",
            "/dev/iommu exists but this program drives only the type1 container",
        );
    } else {
        r.skip(
            "iommufd",
            format!(
                "kernel {} has no iommufd (no /dev/iommu, no /dev/vfio/devices: CONFIG_IOMMUFD is not set); iommufd HWPT dirty tracking not exercised",
                fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
            ),
        );
    }

    let unmapped = container.vfio_dma_unmap(IOVA, LEN);
    r.check("type1_unmap_dma", unmapped.is_ok(), format!("{unmapped:?}"));
    // After UNMAP_DMA the same IOVA faults, and the process memory behind it stays as it was.
    let page3 = buf.read(3 * PAGE as usize, XFER);
    let (t, fault) = blocked_dma(&edu, IOVA + 3 * PAGE)?;
    let untouched = buf.read(3 * PAGE as usize, XFER) == page3;
    r.check(
        "dma_after_unmap_blocked",
        fault.is_some() && untouched,
        format!(
            "DMA to IOVA {:#x} after its unmap ({t:?}): kernel says {:?}; memory untouched: {untouched}",
            IOVA + 3 * PAGE,
            fault.as_deref().unwrap_or("nothing")
        ),
    );
    drop(device);
    Ok(())
}

fn show(res: &Result<(), iovatrack::device::DeviceError>) -> String {
    match res {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// A DMA from edu's buffer to `iova`, which the IOMMU must block: returns how long the
/// transfer took and the kernel's DMAR fault line for that address, if one came.
fn blocked_dma(edu: &Edu, iova: u64) -> Result<(Duration, Option<String>), String> {
    let mut kmsg = Kmsg::open().map_err(|e| format!("/dev/kmsg: {e}"))?;
    let t = edu.dma(EDU_BUF, iova, XFER, true)?;
    // e.g. "DMAR: [DMA Write NO_PASID] Request device [00:01.0] fault addr 0x8000000 ..."
    let want = format!("fault addr {iova:#x}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fault = None;
    while fault.is_none() && Instant::now() < deadline {
        fault = kmsg
            .drain()
            .into_iter()
            .find(|l| l.contains("DMAR") && l.contains(&want));
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((t, fault))
}

/// type1 GET_BITMAP's argument rules, while tracking is on, and its migration capability.
fn type1_rules(
    r: &mut Report,
    container: &VfioContainer,
    type1: &Type1Container,
    bm: &mut [u64],
) -> Result<(), String> {
    let errno = |res: Result<(), iovatrack::device::DeviceError>| res.err().map(|e| e.errno);
    let half = type1.read_dirty(IovaRange::new(IOVA, LEN as u64 / 2), PAGE, bm, true);
    r.check(
        "type1_get_bisect_einval",
        errno(half.clone()) == Some(Errno::EINVAL),
        format!("GET of the first half of the mapping: {}", show(&half)),
    );
    let big = type1.read_dirty(IovaRange::new(IOVA, LEN as u64), 2 * PAGE, bm, true);
    r.check(
        "type1_get_pgsize_einval",
        errno(big.clone()) == Some(Errno::EINVAL),
        format!(
            "GET at 8 KiB pages (the IOMMU's smallest is 4 KiB): {}",
            show(&big)
        ),
    );
    // A range wider than the mapping, with unmapped space on both sides, is accepted: bits
    // for the mapped pages only.
    let wide = IovaRange::new(IOVA - LEN as u64, 3 * LEN as u64);
    let mut wbm = vec![0u64; (3 * PAGES / 64) as usize];
    let res = type1.read_dirty(wide, PAGE, &mut wbm, true);
    let set: Vec<u64> = (0..3 * PAGES).filter(|&k| bit(&wbm, k)).collect();
    let exact = set.len() as u64 == PAGES && set.first() == Some(&PAGES);
    r.check(
        "type1_get_across_holes",
        res.is_ok() && exact,
        format!(
            "GET of {:#x}+{:#x} around the mapping: {}, {} bits set, bits {:?}..={:?}",
            wide.iova,
            wide.length,
            show(&res),
            set.len(),
            set.first(),
            set.last()
        ),
    );

    let (pgsizes, max_bitmap) = type1_migration_cap(container)?;
    r.check(
        "type1_migration_cap",
        pgsizes == PAGE && max_bitmap == 256 << 20,
        format!(
            "VFIO_IOMMU_GET_INFO migration capability: pgsize_bitmap {pgsizes:#x}, max_dirty_bitmap_size {max_bitmap}"
        ),
    );
    Ok(())
}

/// `VFIO_IOMMU_GET_INFO`'s `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`: (pgsize_bitmap,
/// max_dirty_bitmap_size).
fn type1_migration_cap(container: &VfioContainer) -> Result<(u64, u64), String> {
    const GET_INFO: u64 = 0x3B70; // _IO(';', 100 + 12)
    const INFO_CAPS: u32 = 1 << 1;
    let mut buf = vec![0u64; 512];
    let words = buf.len();
    // vfio_iommu_type1_info: argsz u32, flags u32, iova_pgsizes u64, cap_offset u32, pad.
    buf[0] = (words * 8) as u64;
    // SAFETY: `buf` is a writable 4 KiB buffer and argsz (its first u32) says so; the
    // kernel writes no more than argsz bytes; the fd is the container's.
    let ret = unsafe { libc::ioctl(container.as_raw_fd(), GET_INFO as _, buf.as_mut_ptr()) };
    if ret < 0 {
        return Err(format!("VFIO_IOMMU_GET_INFO: {}", Errno::last()));
    }
    let flags = (buf[0] >> 32) as u32;
    let mut off = (buf[2] & 0xffff_ffff) as usize;
    if flags & INFO_CAPS == 0 {
        return Err("VFIO_IOMMU_GET_INFO: no capability chain".into());
    }
    // Each capability: id u16, version u16, next u32 (offset from the start; 0 ends).
    while off != 0 && off.is_multiple_of(8) && off / 8 + 4 <= words {
        let hdr = buf[off / 8];
        let (id, next) = ((hdr & 0xffff) as u32, (hdr >> 32) as usize);
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION {
            // header, flags u32 + pad, pgsize_bitmap u64, max_dirty_bitmap_size u64.
            return Ok((buf[off / 8 + 2], buf[off / 8 + 3]));
        }
        off = next;
    }
    Err("VFIO_IOMMU_GET_INFO: no migration capability".into())
}

/// `iovatrack::track::Tracker` over the edu device's VFIO fd and the type1 container.
fn tracker(
    r: &mut Report,
    container: &VfioContainer,
    logger: VfioDmaLogger,
    edu: &Edu,
    buf: &DmaBuffer,
    range: IovaRange,
) -> Result<(), String> {
    let iommu = Type1Container::from_container(container).map_err(|e| e.to_string())?;
    let c = Container::new("edu-container")
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
    let mode = tracker.start(&layout).map_err(|e| e.to_string())?.clone();
    let iommu_mode = matches!(
        &mode,
        TrackingMode::Iommu {
            page_size: PAGE,
            reason: FallbackReason::NoDeviceLogging { error, .. },
            ranges,
        } if error.errno == Errno::ENOTTY && ranges[..] == [range]
    );
    r.check("tracker_chooses_iommu", iommu_mode, &mode);
    if !iommu_mode {
        return Ok(());
    }
    let mut ledger = DirtLedger::new(&[range], PAGE).map_err(|e| e.to_string())?;
    let pat = pattern(0xa5);
    buf.write(5 * PAGE as usize, &pat);
    edu.dma(IOVA + 5 * PAGE, EDU_BUF, XFER, false)?;
    edu.dma(EDU_BUF, IOVA + 7 * PAGE, XFER, true)?;
    let landed = buf.read(7 * PAGE as usize, XFER) == pat;
    let stats = tracker.collect(&mut ledger);
    let pending = ledger.pending_pages();
    r.check(
        "tracker_collect",
        landed
            && pending == PAGES
            && matches!(stats, Ok(s) if s.report_errors == 0 && s.reports >= 1),
        format!("DMA landed: {landed}; {stats:?}; {pending} of {PAGES} pages pending"),
    );
    // Before an unmap the tracker reads without clearing first: type1 has no such read,
    // so that read fails and marks the range pending; nothing is lost.
    let unmap = tracker.unmap(range, &mut ledger);
    let pending = ledger.pending_pages();
    r.check(
        "tracker_unmap_query",
        unmap.is_ok() && pending == PAGES,
        format!("{unmap:?}; {pending} of {PAGES} pages pending"),
    );
    let fin = tracker.finish(&mut ledger);
    let pending = ledger.pending_pages();
    r.check(
        "tracker_finish",
        fin.is_ok() && pending == PAGES && tracker.mode().is_none(),
        format!("{fin:?}; {pending} of {PAGES} pages pending"),
    );
    Ok(())
}
