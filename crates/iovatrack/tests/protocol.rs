//! The protocol against restarts, strangers and hostile peers, and the counters of
//! `iovatrack migrate --json` against what happened (issue 11). Each test fails on the
//! behaviour the issue describes.

use iovatrack::layout::presets;
use iovatrack::migrate::demo::{
    merge_destination, run_local, run_source, DemoDestination, Fault, MigrateConfig, Summary,
};
use iovatrack::migrate::engine::{
    DestLimits, DestReport, Destination, Event, Handover, MigrateError,
};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::wire::{
    Frame, FrameReader, FrameWriter, MemoryLayout, HEADER_LEN, TRAILER_LEN,
};
use iovatrack::migrate::{guest_regions, scale_ram};
use iovatrack::range::IovaRange;
use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const PAGE: u64 = 4096;

fn small() -> MigrateConfig {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get("q35-2g").unwrap(), 4));
    cfg.warmup = Duration::from_millis(50);
    // Zero pages are what retries must not resend: start from a guest that has written
    // little, so the bound below measures the protocol, not the warm fill.
    cfg.warm_pct = 0;
    cfg
}

fn total_pages(cfg: &MigrateConfig) -> u64 {
    guest_regions(&cfg.layout).iter().map(|r| r.1 / PAGE).sum()
}

/// The Hello a source of `cfg`'s guest sends, as a stranger would forge it.
fn hello_for(cfg: &MigrateConfig, kind: &str) -> MemoryLayout {
    let regions = guest_regions(&cfg.layout)
        .into_iter()
        .map(|(a, n)| IovaRange::new(a, n))
        .collect();
    MemoryLayout::new(PAGE, kind, regions).unwrap()
}

/// Connect, send `frames` then `raw`, and read until the destination closes (so it has
/// dealt with this connection before the next one).
fn stranger(addr: SocketAddr, frames: &[Frame<'_>], raw: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    for f in frames {
        // The destination may refuse mid-way and close: later writes may fail.
        if w.write_frame(f).is_err() {
            break;
        }
    }
    let _ = (&s).write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = (&s).read_to_end(&mut back);
    back
}

/// The source of `cfg` against `dest` on `listener`, in one process; the destination's
/// report apart.
fn migrate_apart(
    cfg: &MigrateConfig,
    listener: TcpListener,
    dest: DemoDestination,
    sessions: u32,
) -> (Summary, Result<DestReport, MigrateError>) {
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || dest.run(&listener, sessions, Duration::from_secs(60)));
    let s = run_source(
        cfg,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        &mut |_| {},
    )
    .unwrap();
    (s, h.join().unwrap())
}

/// The source of `cfg` against `dest` on `listener`, in one process, with the
/// destination's observations folded in.
fn migrate_to(
    cfg: &MigrateConfig,
    listener: TcpListener,
    dest: DemoDestination,
    sessions: u32,
) -> Summary {
    let (mut s, d) = migrate_apart(cfg, listener, dest, sessions);
    merge_destination(&mut s, d);
    s
}

/// Defect 1: a receiver restarted between attempts is a new destination (new session
/// id): the source starts over with a full pass 0 and verifies, instead of sending only
/// newer dirt into empty memory.
#[test]
fn restarted_receiver_gets_a_full_pass_0() {
    let mut cfg = small();
    cfg.faults = vec![Fault::DropAt(1)];
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (layout, devices) = (cfg.layout.clone(), cfg.devices.clone());
    let h = std::thread::spawn(move || {
        // The first receiver loses its session (and exits: one session allowed); a new
        // one, with new memory, serves the retry on the same port.
        let first = DemoDestination::new(&layout, &devices).unwrap();
        let gone = first.run(&listener, 1, Duration::from_secs(60));
        assert!(gone.is_err(), "the first receiver must not complete");
        DemoDestination::new(&layout, &devices)
            .unwrap()
            .run(&listener, 1, Duration::from_secs(60))
    });
    let mut s = run_source(
        &cfg,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        &mut |_| {},
    )
    .unwrap();
    merge_destination(&mut s, h.join().unwrap());
    assert_eq!(s.new_destination_sessions, 1, "{s:#?}");
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.mismatched_pages, 0, "{s:#?}");
    assert_eq!(s.attempts, 2);
}

/// Defect 2: garbage, a bad CRC, empty connects, a Hello for another guest, and a stranger
/// that wrote a page and then sent garbage: each is refused and counted, the destination
/// keeps waiting, its memory is reset after the stranger's page, and the real source then
/// migrates and verifies, with only its own session counted against the budget.
#[test]
fn strangers_are_refused_and_the_source_still_migrates() {
    let cfg = small();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = dest.run(&listener, 1, Duration::from_secs(60));
        tx.send(()).unwrap();
        (r, listener)
    });
    stranger(addr, &[], &[0xa5; 20]);
    let good_hello = hello_for(&cfg, "kvm");
    let mut bad_crc = Vec::new();
    FrameWriter::new(&mut bad_crc)
        .write_frame(&good_hello.hello())
        .unwrap();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    stranger(addr, &[], &bad_crc);
    for _ in 0..5 {
        drop(TcpStream::connect(addr).unwrap());
    }
    let mut other = small();
    other.layout = scale_ram(&presets::get("q35-2g").unwrap(), 8);
    stranger(addr, &[hello_for(&other, "kvm").hello()], &[]);
    // Past Hello, a page of 0xee, then garbage.
    let page = vec![0xee; PAGE as usize];
    let back = stranger(
        addr,
        &[
            good_hello.hello(),
            Frame::PassBegin { pass: 0, pages: 1 },
            Frame::Pages {
                gpa: 0x10_0000,
                count: 1,
                data: Cow::Borrowed(&page),
            },
        ],
        &[0x5a; 20],
    );
    let frames: Vec<_> = {
        let mut r = FrameReader::new(&back[..]);
        std::iter::from_fn(|| r.read_frame().ok().map(Frame::into_owned)).collect()
    };
    let Some(Frame::HelloAck { session: first_id }) = frames.first().cloned() else {
        panic!("no HelloAck: {frames:?}");
    };
    assert!(
        matches!(frames.last(), Some(Frame::Abort { .. })),
        "the refusal says why: {frames:?}"
    );
    assert!(
        rx.try_recv().is_err(),
        "the destination gave up on strangers"
    );

    let mut s = run_source(
        &cfg,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        &mut |_| {},
    )
    .unwrap();
    let (d, _listener) = h.join().unwrap();
    let d = d.unwrap();
    assert_eq!(d.refused_connections, 9, "{:#?}", d.refusals);
    assert_eq!(
        d.sessions, 2,
        "the source's session and the stranger's past Hello"
    );
    assert_eq!(d.memory_resets, 1, "the stranger's page resets the memory");
    assert_ne!(
        d.session_id, first_id,
        "a reset memory has a new session id"
    );
    assert!(d.refusals.iter().all(|r| r.starts_with("127.0.0.1:")));
    merge_destination(&mut s, Ok(d));
    assert!(s.verified, "{s:#?}");
    assert_eq!(
        s.new_destination_sessions, 0,
        "the source saw only the new id"
    );
}

/// A refused stranger cannot leave a byte in guest memory it wrote before being caught,
/// and too many refusals end the destination (bounded in count).
#[test]
fn refused_writes_are_undone_and_refusals_are_bounded() {
    let cfg = small();
    let memory = Arc::new(GuestMemory::new(&guest_regions(&cfg.layout)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mem = memory.clone();
    let h = std::thread::spawn(move || {
        let mut d = Destination::new(mem, Vec::new()).limits(DestLimits {
            max_refused: 2,
            ..DestLimits::default()
        });
        let id = d.session_id();
        let r = d.run(&listener, 1, Duration::from_secs(60));
        (r.err().map(|e| e.to_string()), id, d.session_id())
    });
    let page = vec![0xee; PAGE as usize];
    let hello = hello_for(&cfg, "kvm");
    for _ in 0..3 {
        stranger(
            addr,
            &[
                hello.hello(),
                Frame::PassBegin { pass: 0, pages: 1 },
                Frame::Pages {
                    gpa: 0x20_0000,
                    count: 1,
                    data: Cow::Borrowed(&page),
                },
                // Announced one page, ends with two.
                Frame::PassEnd {
                    pass: 0,
                    pages_sent: 2,
                },
            ],
            &[],
        );
    }
    let (err, id0, id1) = h.join().unwrap();
    let err = err.expect("three refusals over a limit of two end the destination");
    assert!(err.contains("3 connections refused"), "{err}");
    assert_ne!(id0, id1);
    let mut buf = vec![0u8; PAGE as usize];
    memory.read_page(0x20_0000, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "a stranger's page survived");
}

/// Defect 3: device state is bounded per device (default 64 MiB a session): the third
/// 32 MiB frame is refused before the device sees it, and the source still migrates.
#[test]
fn device_state_flood_is_refused() {
    let cfg = small();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    let h = std::thread::spawn(move || dest.run(&listener, 1, Duration::from_secs(60)));
    let blob = vec![7u8; 32 << 20];
    let state = || Frame::DeviceState {
        name: Cow::Borrowed("dma0"),
        bytes: Cow::Borrowed(&blob),
    };
    let hello = hello_for(&cfg, "kvm");
    stranger(
        addr,
        &[hello.hello(), state(), state(), state(), state()],
        &[],
    );
    // vCPU states are bounded too: 1 MiB each.
    let big_vcpu = vec![1u8; (1 << 20) + 1];
    stranger(
        addr,
        &[
            hello.hello(),
            Frame::VcpuState {
                index: 0,
                bytes: Cow::Borrowed(&big_vcpu),
            },
        ],
        &[],
    );
    let mut s = run_source(
        &cfg,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        &mut |_| {},
    )
    .unwrap();
    let d = h.join().unwrap().unwrap();
    assert_eq!(d.refused_connections, 2, "{:#?}", d.refusals);
    assert!(
        d.refusals[0]
            .contains("100663296 bytes of state in this session, over the limit of 67108864"),
        "{:#?}",
        d.refusals
    );
    assert!(d.refusals[1].contains("vCPU state 0"), "{:#?}", d.refusals);
    merge_destination(&mut s, Ok(d));
    assert!(s.verified, "{s:#?}");
}

/// Defect 6 (guest kind): a destination that can resume only software state refuses a
/// KVM source at Hello.
#[test]
fn destination_states_the_guest_kind_it_resumes() {
    let cfg = small();
    let memory = Arc::new(GuestMemory::new(&guest_regions(&cfg.layout)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut d = Destination::new(memory, Vec::new())
            .vcpu_kind("software")
            .limits(DestLimits {
                max_refused: 0,
                ..DestLimits::default()
            });
        d.run(&listener, 1, Duration::from_secs(60)).err().unwrap()
    });
    let back = stranger(addr, &[hello_for(&cfg, "kvm").hello()], &[]);
    let err = h.join().unwrap().to_string();
    assert!(err.contains("guest kind") || err.contains("kvm"), "{err}");
    let mut r = FrameReader::new(&back[..]);
    assert!(matches!(r.read_frame(), Ok(Frame::Abort { .. })));
}

/// Defect 6 (counters): `passes` and `pages_sent` are the acknowledged passes (the Pass
/// events, which fire on Ack), `bytes_sent` stops at the last acknowledgement while
/// `bytes_on_wire` has the dropped pass too; `handover` is acknowledged.
#[test]
fn counters_count_what_was_acknowledged() {
    let mut cfg = small();
    cfg.faults = vec![Fault::DropAt(1), Fault::ReportFail(0)];
    let (mut passes, mut pages) = (0u32, 0u64);
    let s = run_local(&cfg, &mut |e| {
        if let Event::Pass(p) = e {
            passes += 1;
            pages += p.pages;
        }
    })
    .unwrap();
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.passes, passes, "{s:#?}");
    assert_eq!(s.pages_sent, pages, "{s:#?}");
    assert!(s.bytes_on_wire > s.bytes_sent, "{s:#?}");
    assert_eq!(s.handover, Handover::Acknowledged);
    // Pass 0 collects nothing: report-fail@0 never fires and is not claimed.
    assert!(s.faults.contains(&"report-fail@0".to_string()));
    assert_eq!(s.faults_fired, ["drop@1"], "{s:#?}");

    // Without faults, the only bytes after the verdict are the Commit frame's.
    let s = run_local(&small(), &mut |_| {}).unwrap();
    assert!(s.verified, "{s:#?}");
    assert_eq!(
        s.bytes_on_wire - s.bytes_sent,
        (HEADER_LEN + TRAILER_LEN) as u64
    );
}

/// Defect 7: a CommitAck that never arrives leaves the guest paused here and says so.
#[test]
fn lost_commit_ack_is_reported() {
    let mut cfg = small();
    cfg.faults = vec![Fault::DropAfterCommit];
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert_eq!(s.handover, Handover::Unacknowledged, "{s:#?}");
    assert!(!s.verified);
    assert!(!s.source_resumed, "the source must not run the guest again");
    assert!(
        s.aborted
            .as_deref()
            .unwrap_or("")
            .contains("never acknowledged"),
        "{s:#?}"
    );
}

/// Defect 5: retries cost what they must. A start-e2big retry does not restart logging
/// (the single accepted range still covers the plan), and a retry after a pass-0 failure
/// does not resend zero pages.
#[test]
fn retries_send_no_more_than_needed() {
    let mut cfg = small();
    let total = total_pages(&cfg);
    cfg.faults = vec![Fault::StartE2big, Fault::DropAt(1)];
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.ranges.len(), 1);
    assert!(
        s.pages_sent < total / 4,
        "{} pages of {total}: {s:#?}",
        s.pages_sent
    );
    cfg.faults = vec![Fault::CancelAt(0)];
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(s.verified, "{s:#?}");
    assert!(
        s.pages_sent < total / 4,
        "{} pages of {total}: {s:#?}",
        s.pages_sent
    );
}

/// A listener that a source reaches after a port scan: the scan's connects cost nothing.
#[test]
fn port_scan_does_not_end_the_destination() {
    let cfg = small();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    for _ in 0..20 {
        drop(TcpStream::connect(addr).unwrap());
    }
    let s = migrate_to(&cfg, listener, dest, 1);
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.refused_connections, 20);
}

/// The device-state digest (issue 11): a record changed after the source's digest took it
/// in (`corrupt-device-state`) arrives intact as far as the frame's CRC can tell, but the
/// destination's digest of what it received differs. The source refuses the handover and
/// resumes, and the destination hears why instead of waiting for a retry.
#[test]
fn device_state_digest_catches_a_changed_record() {
    let mut cfg = small();
    cfg.faults = vec![Fault::CorruptDeviceState];
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    let (mut s, d) = migrate_apart(&cfg, listener, dest, 1);
    let d = d.unwrap();
    assert_eq!(s.faults_fired, ["corrupt-device-state"], "{s:#?}");
    assert!(!s.verified && !s.device_state_matched, "{s:#?}");
    assert_eq!(s.mismatched_pages, 0, "the memory matched: {s:#?}");
    assert_eq!(s.handover, Handover::None, "{s:#?}");
    assert!(
        s.aborted.as_deref().unwrap_or("").contains("device state"),
        "{s:#?}"
    );
    assert_eq!(s.source_running_after_abort, Some(true), "{s:#?}");
    assert_ne!(d.received_state_digest, s.sent_state_digest, "{d:#?}");
    assert!(!d.verified && !d.resumed, "{d:#?}");
    assert!(d.handover_refused.is_some(), "{d:#?}");
    merge_destination(&mut s, Ok(d));
    assert!(!s.verified && !s.device_state_restored, "{s:#?}");

    // Unchanged, the two digests are equal and the same run verifies.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    let mut clean = small();
    clean.faults.clear();
    let s = migrate_to(&clean, listener, dest, 1);
    assert!(s.verified && s.device_state_matched, "{s:#?}");
    assert_ne!(s.sent_state_digest, 0, "{s:#?}");
}

/// The destination counts a page it receives twice in one pass (the source's selection
/// never repeats one; a stranger's or a broken sender's stream can).
#[test]
fn destination_counts_a_page_sent_twice_in_a_pass() {
    let cfg = small();
    let memory = Arc::new(GuestMemory::new(&guest_regions(&cfg.layout)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut d = Destination::new(memory, Vec::new());
        // The stream ends after its pass: an interrupted session, not a refusal.
        assert!(d.run(&listener, 1, Duration::from_secs(60)).is_err());
        d.report().clone()
    });
    let data = vec![0x11; 2 * PAGE as usize];
    stranger(
        addr,
        &[
            hello_for(&cfg, "kvm").hello(),
            Frame::PassBegin { pass: 0, pages: 5 },
            Frame::Pages {
                gpa: 0x10_0000,
                count: 2,
                data: Cow::Borrowed(&data),
            },
            // The second page again, and a new one.
            Frame::Pages {
                gpa: 0x10_1000,
                count: 2,
                data: Cow::Borrowed(&data),
            },
            Frame::Pages {
                gpa: 0x10_0000,
                count: 1,
                data: Cow::Borrowed(&data[..PAGE as usize]),
            },
            Frame::PassEnd {
                pass: 0,
                pages_sent: 5,
            },
            // The next pass may send the same pages again.
            Frame::PassBegin { pass: 1, pages: 1 },
            Frame::Pages {
                gpa: 0x10_0000,
                count: 1,
                data: Cow::Borrowed(&data[..PAGE as usize]),
            },
            Frame::PassEnd {
                pass: 1,
                pages_sent: 1,
            },
        ],
        &[],
    );
    let d = h.join().unwrap();
    assert_eq!(d.refused_connections, 0, "{d:#?}");
    assert_eq!(d.pages_received, 6, "{d:#?}");
    assert_eq!(d.duplicate_pages_received, 2, "{d:#?}");
    assert_eq!(d.interrupted.len(), 1, "{d:#?}");
}

/// Timing and activity counters against each other and the configuration: the migration
/// is part of the wall time, the pause part of the migration, the budget the one given;
/// every dirty-log bit is a page the guest wrote, and the device wrote.
#[test]
fn timing_and_activity_counters_are_consistent() {
    let mut cfg = small();
    cfg.engine.downtime_ms = 250;
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.downtime_budget_ms, 250);
    assert_eq!(s.downtime_exceeded, s.downtime_ms > 250.0, "{s:#?}");
    assert!(
        s.downtime_ms > 0.0 && s.downtime_ms <= s.migration_ms,
        "{s:#?}"
    );
    assert!(
        s.migration_ms + cfg.warmup.as_secs_f64() * 1000.0 <= s.total_ms,
        "{s:#?}"
    );
    assert!(s.cpu_dirty_pages <= s.guest_pages_written, "{s:#?}");
    assert!(s.guest_pages_written > 0 && s.dma_writes > 0, "{s:#?}");
    assert!(s.device_dirty_pages <= s.dma_writes, "{s:#?}");
    assert_eq!(s.negative_control, None, "{s:#?}");
    // Verification comes after the downtime, inside the migration; no prealloc asked.
    assert!(
        s.verify_ms > 0.0 && s.downtime_ms + s.verify_ms <= s.migration_ms,
        "{s:#?}"
    );
    assert_eq!(s.prealloc_ms, 0.0, "{s:#?}");
}

/// `--prealloc`: the destination's RAM is allocated before the source connects, counted
/// apart from the migration (in the wall time, not in `migration_ms`), and the migration
/// still verifies.
#[test]
fn prealloc_is_counted_apart_from_the_migration() {
    let mut cfg = small();
    cfg.prealloc = true;
    let t = std::time::Instant::now();
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    assert!(s.verified, "{s:#?}");
    assert!(s.prealloc_ms > 0.0, "{s:#?}");
    assert!(s.migration_ms + s.prealloc_ms <= wall, "{s:#?}");
}

/// Issue 10: three streams, the link dropped half-way through pass 1 (every channel
/// goes, the pass rolls back): the retry opens three new streams and verifies, with no
/// page twice in a pass on either side.
#[test]
fn multi_stream_drop_retry_verifies() {
    let mut cfg = small();
    cfg.engine.streams = 3;
    cfg.faults = vec![Fault::DropAt(1)];
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices).unwrap();
    let (mut s, d) = migrate_apart(&cfg, listener, dest, 3);
    let d = d.unwrap();
    assert_eq!(d.streams, 3, "{d:#?}");
    assert_eq!(d.sessions, 2, "{d:#?}");
    assert_eq!(d.duplicate_pages_received, 0);
    merge_destination(&mut s, Ok(d));
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.streams, 3);
    assert_eq!(s.attempts, 2);
    assert_eq!(s.faults_fired, ["drop@1"], "{s:#?}");
    assert_eq!(s.duplicate_pages_sent, 0);
}

/// A source driven frame by frame, for what a real one never does on its own.
struct Manual {
    w: FrameWriter<TcpStream>,
    r: FrameReader<TcpStream>,
    tcp: TcpStream,
    session: u64,
}

impl Manual {
    /// Hello, HelloAck, and `streams` announced.
    fn connect(addr: SocketAddr, layout: &MemoryLayout, streams: u32) -> Self {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = FrameWriter::new(tcp.try_clone().unwrap());
        let mut r = FrameReader::new(tcp.try_clone().unwrap());
        w.write_frame(&layout.hello()).unwrap();
        let Frame::HelloAck { session } = r.read_frame().unwrap() else {
            panic!("no HelloAck");
        };
        w.write_frame(&Frame::Streams { count: streams }).unwrap();
        Manual { w, r, tcp, session }
    }

    /// An extra channel that joins as `stream` of `session`.
    fn join(addr: SocketAddr, session: u64, stream: u32) -> FrameWriter<TcpStream> {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = FrameWriter::new(tcp);
        w.write_frame(&Frame::Join { session, stream }).unwrap();
        w
    }

    fn send(&mut self, f: Frame<'_>) {
        self.w.write_frame(&f).unwrap();
    }

    fn expect_ack(&mut self, pass: u32) {
        self.tcp
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let f = self.r.read_frame().unwrap().into_owned();
        assert_eq!(f, Frame::Ack { pass });
    }

    /// Whether a frame from the destination arrives within `wait` (nothing is consumed).
    fn answers_within(&self, wait: Duration) -> bool {
        self.tcp.set_read_timeout(Some(wait)).unwrap();
        let got = self.tcp.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
        self.tcp
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        got
    }

    /// Complete, Verify (the destination has no verifier: any hashes), Commit.
    fn finish(mut self, pages: u64, regions: usize) {
        self.send(Frame::Complete {
            total_pages: pages,
            digest: 0,
        });
        self.send(Frame::Verify {
            digest: 0,
            region_hashes: Cow::Owned(vec![0; regions]),
        });
        assert!(matches!(
            self.r.read_frame().unwrap(),
            Frame::VerifyResult { ok: true, .. }
        ));
        self.send(Frame::Commit);
        assert!(matches!(self.r.read_frame().unwrap(), Frame::CommitAck));
    }
}

fn page_of(gpa: u64, fill: u8, data: &[u8]) -> Frame<'_> {
    assert!(data.iter().all(|b| *b == fill));
    Frame::Pages {
        gpa,
        count: 1,
        data: Cow::Borrowed(data),
    }
}

/// A destination with no verifier and no devices over `regions`, run in a thread.
fn bare_destination(
    regions: &[(u64, u64)],
) -> (
    Arc<GuestMemory>,
    SocketAddr,
    std::thread::JoinHandle<iovatrack::migrate::engine::DestReport>,
) {
    let memory = Arc::new(GuestMemory::new(regions).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mem = memory.clone();
    let h = std::thread::spawn(move || {
        let mut d = Destination::new(mem, Vec::new());
        let r = d.run(&listener, 1, Duration::from_secs(60));
        r.map(|r| r.report)
            .unwrap_or_else(|e| panic!("{e}: {:#?}", d.report()))
    });
    (memory, addr, h)
}

const REGIONS: [(u64, u64); 2] = [(0, 64 * PAGE), (1 << 20, 16 * PAGE)];

fn bare_layout() -> MemoryLayout {
    let r = REGIONS.iter().map(|&(a, n)| IovaRange::new(a, n)).collect();
    MemoryLayout::new(PAGE, "software", r).unwrap()
}

/// Issue 10: an extra channel whose Join names another memory session is refused (told
/// why, counted like any stranger), and the session goes on with the stream that joins
/// right; pages from both channels land.
#[test]
fn join_with_a_wrong_session_is_refused() {
    let (memory, addr, h) = bare_destination(&REGIONS);
    let mut src = Manual::connect(addr, &bare_layout(), 2);
    let mut stranger = Manual::join(addr, src.session ^ 0x5a5a, 1);
    let back: Vec<_> = {
        let s = stranger.get_mut().try_clone().unwrap();
        let mut r = FrameReader::new(s);
        std::iter::from_fn(|| r.read_frame().ok().map(Frame::into_owned)).collect()
    };
    assert!(
        matches!(back.as_slice(), [Frame::Abort { reason }] if reason.contains("session")),
        "{back:?}"
    );
    let mut stream = Manual::join(addr, src.session, 1);
    let (a, b) = (vec![0xaa; PAGE as usize], vec![0xbb; PAGE as usize]);
    src.send(Frame::PassBegin { pass: 0, pages: 2 });
    src.send(page_of(0x3000, 0xaa, &a));
    stream
        .write_frame(&page_of((1 << 20) + 0x1000, 0xbb, &b))
        .unwrap();
    stream
        .write_frame(&Frame::StreamEnd { pass: 0, pages: 1 })
        .unwrap();
    src.send(Frame::PassEnd {
        pass: 0,
        pages_sent: 2,
    });
    src.expect_ack(0);
    drop(stream);
    src.finish(2, REGIONS.len());
    let d = h.join().unwrap();
    assert_eq!(d.refused_connections, 1, "{:#?}", d.refusals);
    assert!(d.refusals[0].contains("session"), "{:#?}", d.refusals);
    assert_eq!((d.streams, d.pages_received), (2, 2), "{d:#?}");
    let mut buf = vec![0u8; PAGE as usize];
    memory.read_page(0x3000, &mut buf).unwrap();
    assert_eq!(buf, a);
    memory.read_page((1 << 20) + 0x1000, &mut buf).unwrap();
    assert_eq!(buf, b);
}

/// Issue 10, the per-pass barrier: pass 0's copy of a page is late on stream 1 (its
/// frames still in flight) when the main channel ends pass 0. A destination that acked
/// pass 0 then would let pass 1 resend the page on another channel, and the late pass-0
/// copy would land on top of it. The destination must instead hold the Ack until stream
/// 1 has delivered pass 0, so the page ends up with pass 1's contents.
#[test]
fn a_late_stream_cannot_overwrite_the_next_pass() {
    let (memory, addr, h) = bare_destination(&REGIONS);
    let mut src = Manual::connect(addr, &bare_layout(), 2);
    let mut stream = Manual::join(addr, src.session, 1);
    let (old, new) = (vec![0x01; PAGE as usize], vec![0x02; PAGE as usize]);
    let page = 0x5000;
    src.send(Frame::PassBegin { pass: 0, pages: 1 });
    // Stream 1's pass-0 frames are "in flight": not written yet.
    src.send(Frame::PassEnd {
        pass: 0,
        pages_sent: 1,
    });
    let late = |stream: &mut FrameWriter<TcpStream>| {
        stream.write_frame(&page_of(page, 0x01, &old)).unwrap();
        stream
            .write_frame(&Frame::StreamEnd { pass: 0, pages: 1 })
            .unwrap();
    };
    let acked_early = src.answers_within(Duration::from_secs(2));
    if !acked_early {
        // The barrier held the Ack: the late frames arrive, then the Ack.
        late(&mut stream);
    }
    src.expect_ack(0);
    // Pass 1 sends the page again, on the main channel this time.
    src.send(Frame::PassBegin { pass: 1, pages: 1 });
    src.send(page_of(page, 0x02, &new));
    src.send(Frame::PassEnd {
        pass: 1,
        pages_sent: 1,
    });
    if acked_early {
        // Without a barrier pass 1 is acked (its page written) at its PassEnd, and the
        // late pass-0 frames land after it.
        src.expect_ack(1);
        late(&mut stream);
        std::thread::sleep(Duration::from_millis(300));
    }
    stream
        .write_frame(&Frame::StreamEnd { pass: 1, pages: 0 })
        .unwrap();
    if !acked_early {
        src.expect_ack(1);
    }
    // Pass 1 is acknowledged: the page must hold its copy now.
    let mut buf = vec![0u8; PAGE as usize];
    memory.read_page(page, &mut buf).unwrap();
    drop(stream);
    src.finish(2, REGIONS.len());
    let d = h.join().unwrap();
    assert!(
        buf == new,
        "page {page:#x} holds pass {}'s copy after pass 1 (acked pass 0 early: {acked_early}): {d:#?}",
        buf[0] - 1
    );
    memory.read_page(page, &mut buf).unwrap();
    assert_eq!(buf, new);
    assert!(
        !acked_early,
        "pass 0 was acknowledged before stream 1 delivered it"
    );
}
