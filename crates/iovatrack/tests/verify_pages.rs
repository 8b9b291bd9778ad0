//! `mismatched_pages` is in pages for every guest size (issue 11). A guest too large for a
//! frame of page hashes (over 8,388,600 pages, about 32 GiB) is verified per region, and
//! the regions that differ are then compared page by page. Each test migrates with the
//! engine's own parts, writes pages behind its back after pass 0 (no log sees them), and
//! checks both sides' count against a brute-force comparison of the two memories.

use iovatrack::layout::json;
use iovatrack::migrate::demo::verify::PageHashes;
use iovatrack::migrate::engine::{
    run_source, Checkpoint, Control, DestReport, Destination, EngineConfig, SourceHooks,
    SourceReport, SourceVm,
};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::seams::{CpuDirtyLog, Vcpus, VmError};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;

/// vCPUs that never run: the test alone writes memory.
struct Idle;
impl Vcpus for Idle {
    fn kind(&self) -> &str {
        "test"
    }
    fn pause(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn save(&self) -> Result<Vec<Vec<u8>>, VmError> {
        Ok(vec![vec![0; 8]])
    }
}

/// A CPU log that never has dirt: writes the test makes go unlogged.
struct NoLog;
impl CpuDirtyLog for NoLog {
    fn read_and_clear(&self, _slot: usize, buf: &mut [u64]) -> Result<(), VmError> {
        buf.fill(0);
        Ok(())
    }
}

/// Writes `pages` (gpa, value) into the source at the start of pass 1, after pass 0 sent
/// every page and past its last collection: the destination never gets them.
struct Behind {
    memory: Arc<GuestMemory>,
    pages: Vec<(u64, u64)>,
}
impl SourceHooks for Behind {
    fn at(&mut self, point: Checkpoint) -> Control {
        if let Checkpoint::PassStart { pass: 1, .. } = point {
            for (gpa, v) in self.pages.drain(..) {
                self.memory.write_u64(gpa, v).unwrap();
            }
        }
        Control::Continue
    }
}

fn layout_json(regions: &[(u64, u64)]) -> String {
    let sections: Vec<String> = regions
        .iter()
        .map(|(a, n)| format!(r#"{{"start":"{a:#x}","size":"{n:#x}","kind":"ram","name":"ram"}}"#))
        .collect();
    format!(r#"{{"sections":[{}]}}"#, sections.join(","))
}

/// Pages whose bytes differ, page by page; pages never written on either side are zero on
/// both (pagemap says so without faulting them in).
fn brute_force_differences(a: &GuestMemory, b: &GuestMemory) -> u64 {
    let (mut pa, mut pb) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    let mut differ = 0;
    for (i, r) in a.regions().iter().enumerate() {
        let (na, nb) = (a.never_written(i), b.never_written(i));
        for p in 0..r.length / PAGE {
            let never = |n: &Option<Vec<u64>>| {
                n.as_ref()
                    .is_some_and(|w| w[(p / 64) as usize] >> (p % 64) & 1 == 1)
            };
            if never(&na) && never(&nb) {
                continue;
            }
            a.read_page(r.iova + p * PAGE, &mut pa).unwrap();
            b.read_page(r.iova + p * PAGE, &mut pb).unwrap();
            differ += u64::from(pa != pb);
        }
    }
    differ
}

/// Migrate a guest of `regions` holding `before` (gpa, value) to a destination, writing
/// `behind` after pass 0; returns both reports and the brute-force count.
fn migrate(
    regions: &[(u64, u64)],
    before: &[(u64, u64)],
    behind: Vec<(u64, u64)>,
) -> (SourceReport, DestReport, u64) {
    let layout = json::parse(&layout_json(regions)).unwrap();
    let src = Arc::new(GuestMemory::new(regions).unwrap());
    let dst = Arc::new(GuestMemory::new(regions).unwrap());
    for &(gpa, v) in before {
        src.write_u64(gpa, v).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let d = dst.clone();
    let h = std::thread::spawn(move || {
        let mut dest = Destination::new(d, Vec::new()).verifier(Arc::new(PageHashes));
        dest.run(&listener, 1, Duration::from_secs(60))
            .unwrap()
            .report
    });
    let mut hooks = Behind {
        memory: src.clone(),
        pages: behind,
    };
    let vm = SourceVm {
        layout: &layout,
        memory: src.as_ref(),
        vcpus: &Idle,
        cpu_log: &NoLog,
        containers: &mut [],
        devices: &mut [],
        verifier: Some(&PageHashes),
    };
    let cfg = EngineConfig {
        retries: 0,
        ..EngineConfig::default()
    };
    let s = run_source(
        &cfg,
        vm,
        &mut hooks,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        &mut |_| {},
    )
    .unwrap();
    let d = h.join().unwrap();
    let brute = brute_force_differences(&src, &dst);
    (s, d, brute)
}

/// `count` pages spread over `[base, base + len)`, two words each, some of them twice
/// (a page counts once), and one rewritten with the value it already holds (no change).
fn scatter(base: u64, len: u64, count: u64, salt: u64) -> Vec<(u64, u64)> {
    let step = (len / PAGE / count).max(1) * PAGE;
    let mut out: Vec<(u64, u64)> = (0..count)
        .flat_map(|k| {
            let gpa = base + k * step;
            [(gpa + 8, salt ^ k), (gpa + 4000, !k)]
        })
        .collect();
    out.push((base + 8, salt + 1));
    out
}

fn check(regions: &[(u64, u64)], want_per_region: bool) {
    let total: u64 = regions.iter().map(|r| r.1 / PAGE).sum();
    assert_eq!(total > 8_388_600, want_per_region, "{total} pages");
    let (lo, hi) = (regions[0], regions[1]);
    let before = [
        scatter(lo.0 + PAGE, lo.1 - PAGE, 50, 1),
        scatter(hi.0, hi.1, 300, 2),
    ]
    .concat();
    // Behind the engine's back: both regions, partly over pages pass 0 sent, and one page
    // rewritten with the value it holds (an unchanged page must not count).
    let mut behind = [
        scatter(lo.0 + PAGE, lo.1 - PAGE, 37, 3),
        scatter(hi.0 + 5 * PAGE, hi.1 - 5 * PAGE, 1234, 4),
    ]
    .concat();
    behind.push(*before.last().unwrap());
    let (s, d, brute) = migrate(regions, &before, behind);
    eprintln!(
        "{total} pages: brute force {brute} differ; source counted {}, destination {}",
        s.mismatched_pages, d.mismatched_pages
    );
    let ctx = format!("brute force {brute}\nsource {s:#?}\ndestination {d:#?}");
    assert!(!s.verified && !d.verified, "{ctx}");
    assert!(brute > 1000, "the case must differ in many pages: {ctx}");
    assert_eq!(s.mismatched_pages, brute, "{ctx}");
    assert_eq!(d.mismatched_pages, brute, "{ctx}");
    assert!(d.interrupted.is_empty(), "{ctx}");
    let said = format!("differs in {brute} page(s)");
    assert!(s.aborted.as_deref().unwrap_or("").contains(&said), "{ctx}");
}

/// 37 GiB in two regions: per-region hashes, then the pages of both regions (the large
/// one in two frames of page hashes).
#[test]
fn large_guest_mismatches_are_counted_in_pages() {
    check(&[(0, GIB), (4 * GIB, 36 * GIB)], true);
}

/// A small guest is compared page by page at once, as before.
#[test]
fn small_guest_mismatches_are_counted_in_pages() {
    check(&[(0, 64 << 20), (4 * GIB, 64 << 20)], false);
}
