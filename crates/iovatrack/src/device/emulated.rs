//! A software device that logs its DMA writes the way a VFIO driver does, as harshly.
//!
//! START is judged by [`check_start`], the same rule engine the planner predicts with: the
//! vfio core's checks (drivers/vfio/vfio_main.c) in the kernel's order, so the first
//! offending range decides the errno, then the driver rules of its [`DeviceLimits`]: mlx5
//! (page size floored and clamped, smallest-gap merge to the device's range count,
//! EOPNOTSUPP on the total size) or pds (no regions: EOPNOTSUPP; merge to its regions, one
//! on 6.6; `u32` page counts the firmware rounds up). The device adds only what a driver
//! holds: its state (double START, pds' EEXIST when someone else tracks), its own refusals
//! (zero length, unusable page size, log memory) and fault injection.
//!
//! REPORT is as harsh as the drivers (the `report` module has the rules and their sources):
//! whole device pages are acknowledged and the core's `iova_bitmap_set` drops what falls
//! outside the caller's range; pds acknowledges whole 64-page words; an mlx5 REPORT error
//! sticks until STOP and START. [`DmaLogger::report_granule`] says how to query so that
//! nothing is dropped.
//!
//! DMA writes arrive through [`EmulatedDevice::dma_write`] from any number of threads. The
//! tracked set is fixed at START, so the hot path takes only a shared read lock (no writer
//! ever waits on it while logging runs), binary-searches the immutable region list and sets
//! bits with one atomic OR per word. A write outside every tracked range is what a real
//! device silently loses; it is counted instead.

mod report;

use super::migration::{MigFlags, MigrationDevice};
use super::{DeviceError, DeviceOp, DmaLogger, Errno, ReportGranule, ReportRegion, Rule};
use crate::bitmap::{words_for, AtomicDirtyBitmap};
// The tests compare tracked ranges with the planner's merge.
#[cfg(test)]
use crate::plan::combine::combine;
use crate::plan::limits::{
    check_start, pds_regions, Accepted, DeviceLimits, DeviceProfile, DriverKind, PdsRegion,
    StartRefusal,
};
use crate::range::{is_pow2, IovaRange};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

/// Default cap on the log's memory (bits at the tracking page size): 256 MiB, i.e. 8 TiB
/// tracked at 4 KiB.
const DEFAULT_MAX_LOG_BYTES: u64 = 256 << 20;

/// A software DMA-logging device. See the module documentation.
pub struct EmulatedDevice {
    name: String,
    limits: DeviceLimits,
    logging: bool,
    max_log_bytes: u64,
    session: RwLock<Option<Session>>,
    untracked_writes: AtomicU64,
    untracked_pages: AtomicU64,
    faults: Mutex<Faults>,
    /// pds: the device reports `num_regions != 0` (someone else started tracking).
    busy: AtomicBool,
    migration: Mutex<MigrationDevice>,
}

/// What START fixed: the page size and the merged regions, sorted by IOVA.
struct Session {
    shift: u32,
    regions: Vec<Region>,
    /// mlx5 `tracker->is_err`: a REPORT failed; every later one is EIO until STOP.
    is_err: AtomicBool,
}

/// One tracked region: a bit per device page from `first_page` on.
struct Region {
    range: IovaRange,
    first_page: u64,
    npages: u64,
    bits: AtomicDirtyBitmap,
    /// pds: the driver's view of the region (REPORT bounds and bitmap size).
    pds: Option<PdsRegion>,
}

#[derive(Default)]
struct Faults {
    /// Fail the REPORT after `n - 1` more successful ones.
    report: Option<(u64, Errno)>,
    /// Refuse START (when given more than `above` ranges, if set).
    start: Option<(Errno, Option<usize>)>,
}

impl EmulatedDevice {
    /// A device with DMA logging following `limits`, migration flags STOP_COPY|P2P|PRE_COPY.
    pub fn new(limits: DeviceLimits) -> Self {
        let name = match limits.driver {
            DriverKind::Generic => "emulated-generic",
            DriverKind::Mlx5 => "emulated-mlx5",
            DriverKind::Pds => "emulated-pds",
            DriverKind::Pds66 => "emulated-pds-6.6",
        };
        Self {
            name: name.to_string(),
            limits,
            logging: true,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            session: RwLock::new(None),
            untracked_writes: AtomicU64::new(0),
            untracked_pages: AtomicU64::new(0),
            faults: Mutex::new(Faults::default()),
            busy: AtomicBool::new(false),
            migration: Mutex::new(MigrationDevice::new(MigFlags::ALL)),
        }
    }

    /// A device with a profile's default limits.
    pub fn with_profile(profile: DeviceProfile) -> Self {
        Self::new(profile.limits())
    }

    /// The same device without DMA logging support: probe/start/report/stop give ENOTTY.
    pub fn without_logging(mut self) -> Self {
        self.logging = false;
        self
    }

    /// Rename the device.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Cap the log memory (START fails with ENOMEM above it).
    pub fn max_log_bytes(mut self, bytes: u64) -> Self {
        self.max_log_bytes = bytes;
        self
    }

    /// The migration flags the device reports.
    pub fn migration_flags(self, flags: MigFlags) -> Self {
        *self
            .migration
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = MigrationDevice::new(flags);
        self
    }

    /// The device's limits.
    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
    }

    /// The migration v2 side of the device (state machine and state stream).
    pub fn migration(&self) -> MutexGuard<'_, MigrationDevice> {
        self.migration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the device really tracks (after the driver's merge), if logging.
    pub fn tracked_ranges(&self) -> Option<Vec<IovaRange>> {
        let s = self.session.read().unwrap_or_else(PoisonError::into_inner);
        s.as_ref()
            .map(|s| s.regions.iter().map(|r| r.range).collect())
    }

    /// The tracking page size, if logging.
    pub fn page_size(&self) -> Option<u64> {
        let s = self.session.read().unwrap_or_else(PoisonError::into_inner);
        s.as_ref().map(|s| 1u64 << s.shift)
    }

    /// DMA writes that touched at least one byte outside every tracked range while logging.
    pub fn untracked_writes(&self) -> u64 {
        self.untracked_writes.load(Ordering::Relaxed)
    }

    /// Device pages (at the tracking page size) of those bytes: dirt a real device loses.
    pub fn untracked_pages(&self) -> u64 {
        self.untracked_pages.load(Ordering::Relaxed)
    }

    /// Fail the `nth` REPORT from now (1 = the next one) with `errno`. On mlx5 the failure
    /// sticks (`tracker->is_err`): every later REPORT is EIO until STOP and START.
    pub fn fail_report(&self, nth: u64, errno: Errno) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report = Some((nth.max(1), errno));
    }

    /// Refuse every START with `errno` (after the core's checks, as a driver would); with
    /// `above`, only STARTs given more than that many ranges.
    pub fn refuse_start(&self, errno: Errno, above: Option<usize>) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .start = Some((errno, above));
    }

    /// pds: the device says it already tracks (`num_regions != 0`), as when another user
    /// started logging on it; START is EEXIST until this is cleared.
    pub fn set_tracking_elsewhere(&self, on: bool) {
        self.busy.store(on, Ordering::SeqCst);
    }

    /// Remove injected faults.
    pub fn clear_faults(&self) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = Faults::default();
    }

    /// The device DMA-writes `len` bytes at `iova`. Logged at the tracking page size inside
    /// the tracked ranges; bytes outside them are counted as untracked. No-op when not
    /// logging.
    pub fn dma_write(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let guard = self.session.read().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = guard.as_ref() else { return };
        let end = iova as u128 + len as u128;
        let mut i = s.regions.partition_point(|r| r.range.end() <= iova as u128);
        let mut cur = iova as u128;
        let mut lost = Untracked {
            shift: s.shift,
            pages: 0,
            last: None,
        };
        while cur < end {
            match s.regions.get(i) {
                Some(r) if (r.range.iova as u128) < end => {
                    let rs = r.range.iova as u128;
                    if rs > cur {
                        lost.add(cur, rs);
                    }
                    let a = cur.max(rs);
                    let b = end.min(r.range.end());
                    r.mark((a >> s.shift) as u64, ((b - 1) >> s.shift) as u64);
                    cur = b;
                    i += 1;
                }
                _ => {
                    lost.add(cur, end);
                    cur = end;
                }
            }
        }
        if lost.pages > 0 {
            self.untracked_writes.fetch_add(1, Ordering::Relaxed);
            self.untracked_pages
                .fetch_add(lost.pages, Ordering::Relaxed);
        }
    }

    fn err(op: DeviceOp, errno: Errno, rule: Rule) -> DeviceError {
        DeviceError::new(op, errno, rule)
    }

    fn check_supported(&self, op: DeviceOp) -> Result<(), DeviceError> {
        if self.logging {
            Ok(())
        } else {
            Err(Self::err(op, Errno::ENOTTY, Rule::NoLoggingSupport))
        }
    }

    /// The driver's `log_start` after the core's checks and the state check, in the
    /// kernel drivers' order: injected refusal, pds' device status (EEXIST), this device's
    /// own refusals (zero length, unusable page size), then `verdict`'s driver rules
    /// (merge, mlx5 address space, pds regions), then the log allocation.
    fn driver_start(
        &self,
        page_size: u64,
        ranges: &[IovaRange],
        verdict: Result<Accepted, StartRefusal>,
    ) -> Result<Session, DeviceError> {
        let e = |errno, rule| Self::err(DeviceOp::Start, errno, rule);
        if let Some((errno, above)) = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .start
        {
            if above.is_none_or(|a| ranges.len() > a) {
                return Err(e(errno, Rule::Injected));
            }
        }
        // pds_vfio_dirty_enable asks the device's status before anything else.
        if self.limits.driver.is_pds() && self.busy.load(Ordering::SeqCst) {
            return Err(e(Errno::EEXIST, Rule::DeviceBusy));
        }
        // Beyond the kernel: a zero length wraps in the core and no tracker can size it.
        if let Some(index) = ranges.iter().position(|r| r.length == 0) {
            return Err(e(Errno::EINVAL, Rule::ZeroLength { index }));
        }
        let ps = self.limits.negotiate_page_size(page_size);
        if !is_pow2(ps) {
            return Err(e(Errno::EINVAL, Rule::UnusablePageSize { page_size: ps }));
        }
        let accepted = verdict.map_err(DeviceError::start)?;
        debug_assert_eq!(accepted.page_size, ps);
        let merged = accepted.ranges;
        // pds: the driver's region table for the same merge (check_start accepted it).
        let pds: Vec<Option<PdsRegion>> = if self.limits.driver.is_pds() {
            let mut given: Vec<IovaRange> = ranges.to_vec();
            given.sort_unstable();
            let target = self.limits.tracked_max_ranges() as usize;
            if given.len() > target {
                given = crate::plan::combine::combine(&given, target);
            }
            pds_regions(&self.limits, ps, &given)
                .map_err(DeviceError::start)?
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None; merged.len()]
        };
        let shift = ps.trailing_zeros();
        let mut words_total: u128 = 0;
        let mut spans = Vec::with_capacity(merged.len());
        for r in &merged {
            let first_page = r.iova >> shift;
            let last_page = r.last().map_or(first_page, |l| l >> shift);
            let npages = last_page - first_page + 1;
            words_total += words_for(npages) as u128;
            spans.push((first_page, npages));
        }
        let bytes = words_total * 8;
        if bytes > self.max_log_bytes as u128 {
            return Err(e(
                Errno::ENOMEM,
                Rule::TrackerMemory {
                    bytes,
                    max: self.max_log_bytes,
                },
            ));
        }
        let mut regions = Vec::with_capacity(merged.len());
        for ((r, (first_page, npages)), pds) in merged.into_iter().zip(spans).zip(pds) {
            let bits = AtomicDirtyBitmap::try_new(npages).map_err(|_| {
                e(
                    Errno::ENOMEM,
                    Rule::TrackerMemory {
                        bytes,
                        max: self.max_log_bytes,
                    },
                )
            })?;
            regions.push(Region {
                range: r,
                first_page,
                npages,
                bits,
                pds,
            });
        }
        Ok(Session {
            shift,
            regions,
            is_err: AtomicBool::new(false),
        })
    }

    fn take_report_fault(&self) -> Option<Errno> {
        let mut f = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        match f.report {
            Some((1, errno)) => {
                f.report = None;
                Some(errno)
            }
            Some((n, errno)) => {
                f.report = Some((n - 1, errno));
                None
            }
            None => None,
        }
    }
}

/// Counts device pages of untracked bytes, each page once per write.
struct Untracked {
    shift: u32,
    pages: u64,
    last: Option<u128>,
}

impl Untracked {
    fn add(&mut self, a: u128, b: u128) {
        let mut first = a >> self.shift;
        let last = (b - 1) >> self.shift;
        if self.last == Some(first) {
            first += 1;
        }
        if first <= last {
            self.pages += (last - first + 1) as u64;
        }
        self.last = Some(last);
    }
}

impl Region {
    /// Set the bits of absolute device pages `p0..=p1` (inside this region).
    fn mark(&self, p0: u64, p1: u64) {
        let (k0, k1) = (p0 - self.first_page, p1 - self.first_page);
        // One read guard (the caller's) and one SeqCst fetch_or per word, no allocation:
        // SeqCst makes "a write racing a REPORT lands in that report or the next" provable
        // with a SeqCst round counter.
        self.bits
            .set_range(k0, k1 - k0 + 1)
            .expect("DMA pages clipped to the region");
    }

    /// Read and clear the bits of region pages `k0..=k1` (clipped to the region), calling
    /// `f` with the absolute device page of each dirty one: the device acknowledges them.
    fn take(&self, k0: u64, k1: u64, mut f: impl FnMut(u64)) {
        if self.npages == 0 || k0 >= self.npages {
            return;
        }
        let k1 = k1.min(self.npages - 1);
        if k0 > k1 {
            return;
        }
        self.bits
            .visit_range(k0, k1 - k0 + 1, true, |k| f(self.first_page + k))
            .expect("pages clipped to the region");
    }
}

impl DmaLogger for EmulatedDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self) -> Result<(), DeviceError> {
        self.check_supported(DeviceOp::Probe)
    }

    fn start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        self.check_supported(DeviceOp::Start)?;
        // The one rule engine (the planner predicts with it). The core's refusals come
        // before the driver sees the request; the driver's come after its state check.
        let verdict = check_start(&self.limits, page_size, ranges);
        if let Err(refusal) = &verdict {
            if refusal.is_core() {
                return Err(DeviceError::start(refusal.clone()));
            }
        }
        let mut session = self.session.write().unwrap_or_else(PoisonError::into_inner);
        if session.is_some() {
            return Err(Self::err(
                DeviceOp::Start,
                Errno::EINVAL,
                Rule::AlreadyStarted,
            ));
        }
        let s = self.driver_start(page_size, ranges, verdict)?;
        let ps = 1u64 << s.shift;
        *session = Some(s);
        Ok(ps)
    }

    fn report(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.check_supported(DeviceOp::Report)?;
        let guard = self.session.read().unwrap_or_else(PoisonError::into_inner);
        report::report(self, guard.as_ref(), range, page_size, bitmap)
    }

    fn stop(&self) -> Result<(), DeviceError> {
        self.check_supported(DeviceOp::Stop)?;
        *self.session.write().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }

    fn report_granule(&self) -> ReportGranule {
        let guard = self.session.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(s) if self.limits.driver.is_pds() => ReportGranule::RegionWords {
                word_pages: 64,
                regions: s
                    .regions
                    .iter()
                    .filter_map(|r| r.pds)
                    .map(|g| ReportRegion {
                        range: IovaRange::new(g.start, g.size),
                        page_size: 1 << s.shift,
                        max_pages: u64::from(g.page_count) / 64 * 64,
                    })
                    .collect(),
            },
            _ => ReportGranule::DevicePage,
        }
    }
}

#[cfg(test)]
mod pds_tests;
#[cfg(test)]
mod tests;

/// The device's START against the rule engine it is built on: same verdict, errno and
/// tracked ranges, with the device's own refusals in their documented places.
#[cfg(test)]
mod check_start_agreement {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> impl Strategy<Value = DeviceLimits> {
        let driver = prop_oneof![
            Just(DeviceLimits::generic()),
            Just(DeviceLimits::mlx5()),
            Just(DeviceLimits::pds()),
            Just(DeviceLimits::pds_6_6()),
            Just(DeviceLimits {
                page_count_align: 1,
                ..DeviceLimits::pds()
            })
        ];
        (
            driver,
            1u32..6,
            1u32..300,
            prop::option::of((12u8..16, 14u8..20)),
        )
            .prop_map(|(base, max, core, addr)| DeviceLimits {
                max_ranges: max,
                core_max_ranges: core.min(256),
                addr_space_log2: if base.driver == DriverKind::Mlx5 {
                    addr
                } else {
                    None
                },
                ..base
            })
    }

    fn ranges() -> impl Strategy<Value = Vec<IovaRange>> {
        // Mostly page-aligned small ranges; sometimes misaligned, empty or near 2^64.
        let one = prop_oneof![
            8 => (0u64..64, 0u64..8).prop_map(|(p, n)| IovaRange::new(p * 4096, n * 4096)),
            1 => (0u64..0x40000, 0u64..0x9000).prop_map(|(a, l)| IovaRange::new(a, l)),
            1 => (1u64..4).prop_map(|p| IovaRange::new(u64::MAX - p * 4096 + 1, 4096)),
        ];
        // Disjoint aligned lists (zero lengths included) reach the driver's rules; random
        // lists mostly exercise the core's.
        let disjoint = prop::collection::vec((1u64..4, 0u64..4), 1..8).prop_map(|v| {
            let mut at = 0;
            v.into_iter()
                .map(|(gap, len)| {
                    at += gap * 4096;
                    let r = IovaRange::new(at, len * 4096);
                    at += len * 4096;
                    r
                })
                .rev()
                .collect()
        });
        prop_oneof![prop::collection::vec(one, 0..10), disjoint]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn device_start_follows_check_start(
            l in limits(),
            ps in prop_oneof![Just(0u64), Just(4096), Just(8192), Just(12288)],
            v in ranges(),
        ) {
            let d = EmulatedDevice::new(l);
            let got = d.start(ps, &v);
            let want = check_start(&l, ps, &v);
            match (&want, &got) {
                // The core's refusals come first, whatever the device.
                (Err(r), Err(e)) if r.is_core() => prop_assert_eq!(e, &DeviceError::start(r.clone())),
                (_, Err(e)) if v.iter().any(|r| r.length == 0) => {
                    prop_assert!(matches!(e.rule, Rule::ZeroLength { .. }), "{e}")
                }
                (_, Err(e)) if !is_pow2(l.negotiate_page_size(ps)) => {
                    prop_assert!(matches!(e.rule, Rule::UnusablePageSize { .. }), "{e}")
                }
                (Err(r), Err(e)) => prop_assert_eq!(e, &DeviceError::start(r.clone())),
                (Ok(a), Ok(p)) => {
                    prop_assert_eq!(*p, a.page_size);
                    prop_assert_eq!(d.tracked_ranges().unwrap(), a.ranges.clone());
                }
                (Ok(_), Err(e)) => prop_assert_eq!(e.errno, Errno::ENOMEM, "{}", e),
                (Err(r), Ok(_)) => prop_assert!(false, "device accepted what check_start refuses: {r}"),
            }
        }
    }

    /// mlx5 checks `log_active` before anything else in `log_start`: a second START is
    /// EINVAL even with ranges its address-space check would refuse.
    #[test]
    fn double_start_before_driver_rules() {
        let d = EmulatedDevice::new(DeviceLimits::mlx5());
        d.start(4096, &[IovaRange::new(0, 4096)]).unwrap();
        let too_big = [IovaRange::new(0, 1 << 42), IovaRange::new(1 << 43, 4096)];
        let refusal = check_start(&DeviceLimits::mlx5(), 4096, &too_big).unwrap_err();
        assert_eq!(refusal.errno(), libc::EOPNOTSUPP);
        let e = d.start(4096, &too_big).unwrap_err();
        assert_eq!((e.errno, e.rule), (Errno::EINVAL, Rule::AlreadyStarted));
    }
}
