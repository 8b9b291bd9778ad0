//! The receiver as a network peer under hostile frame sequences (issue 11): frames in any
//! order and of any size, valid or corrupted, through a real socket into a real
//! [`Destination`]. Whatever arrives, the destination never panics, ends every connection
//! within its timeouts, never completes unverified work, and a refused peer leaves no byte
//! in guest memory. A second property runs sessions of two streams: the second channel
//! joins with the right session id or a wrong one, and both carry hostile frames.
//! `PROPTEST_CASES` sets the number of sequences (default 64); the cargo-fuzz target
//! `receiver` (fuzz/) drives the same path with coverage guidance.

use iovatrack::migrate::demo::verify::{page_hashes, PageHashes};
use iovatrack::migrate::engine::{Channel, DestLimits, Destination, Served};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::wire::{Frame, FrameReader, FrameWriter, MemoryLayout, OwnedFrame};
use iovatrack::range::IovaRange;
use proptest::prelude::*;
use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const PAGE: u64 = 4096;
/// One region of 64 pages at 0, and one of 16 pages at 1 MiB.
const REGIONS: [(u64, u64); 2] = [(0, 64 * PAGE), (1 << 20, 16 * PAGE)];

fn layout() -> MemoryLayout {
    let r = REGIONS.iter().map(|&(a, n)| IovaRange::new(a, n)).collect();
    MemoryLayout::new(PAGE, "software", r).unwrap()
}

fn frame() -> impl Strategy<Value = OwnedFrame> {
    let gpa = prop_oneof![
        (0u64..80).prop_map(|p| p * PAGE),
        (0u64..16).prop_map(|p| (1 << 20) + p * PAGE),
        any::<u64>(),
    ];
    prop_oneof![
        Just(layout().hello().into_owned()),
        (0u32..4, 0u64..100).prop_map(|(pass, pages)| Frame::PassBegin { pass, pages }),
        (gpa, 0u32..5, any::<bool>(), any::<u8>()).prop_map(|(gpa, count, exact, fill)| {
            let len = if exact {
                count as usize * PAGE as usize
            } else {
                100
            };
            Frame::Pages {
                gpa,
                count,
                data: Cow::Owned(vec![fill | 1; len]),
            }
        }),
        (0u32..4, 0u64..100).prop_map(|(pass, pages_sent)| Frame::PassEnd { pass, pages_sent }),
        (0u32..4, 0u64..100).prop_map(|(pass, pages_sent)| Frame::PassCut { pass, pages_sent }),
        (0usize..3000).prop_map(|n| Frame::DeviceState {
            name: Cow::Borrowed("dev0"),
            bytes: Cow::Owned(vec![3; n]),
        }),
        (any::<u32>(), 0usize..3000).prop_map(|(index, n)| Frame::VcpuState {
            index,
            bytes: Cow::Owned(vec![4; n]),
        }),
        (0u64..100, any::<u64>()).prop_map(|(total_pages, digest)| Frame::Complete {
            total_pages,
            digest
        }),
        prop::collection::vec(any::<u64>(), 0..90).prop_map(|h| Frame::Verify {
            digest: 0,
            region_hashes: Cow::Owned(h),
        }),
        Just(Frame::Commit),
        Just(Frame::CommitAck),
        Just(Frame::HelloAck { session: 1 }),
        Just(Frame::Ack { pass: 0 }),
        Just(Frame::Abort {
            reason: Cow::Borrowed("x")
        }),
        (0u32..4).prop_map(|count| Frame::Streams { count }),
        (0u32..4, 0u64..100).prop_map(|(pass, pages)| Frame::StreamEnd { pass, pages }),
        (any::<u64>(), 0u32..3).prop_map(|(session, stream)| Frame::Join { session, stream }),
    ]
}

/// `frames` encoded as they follow `skip` frames already on the stream, one byte flipped
/// sometimes.
fn after(
    skip: &[OwnedFrame],
    frames: &[OwnedFrame],
    flip: Option<(prop::sample::Index, u8)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = FrameWriter::new(&mut out);
    for f in skip {
        w.write_frame(f).unwrap();
    }
    let head = out.len();
    let mut w = FrameWriter::new(&mut out);
    // Numbering goes on from the skipped frames.
    for f in skip {
        w.write_frame(f).unwrap();
    }
    for f in frames {
        w.write_frame(f).unwrap();
    }
    let mut out = out.split_off(2 * head);
    if let Some((i, x)) = flip {
        if !out.is_empty() {
            let at = i.index(out.len());
            out[at] ^= x;
        }
    }
    out
}

/// One two-stream session: the main channel's frames after Hello and Streams, the second
/// channel's after its Join, whether that Join names the right session, its stream index,
/// and a byte to flip in either.
#[derive(Debug, Clone)]
struct TwoStreams {
    main: Vec<OwnedFrame>,
    side: Vec<OwnedFrame>,
    right_session: bool,
    index: u32,
    flips: [Option<(prop::sample::Index, u8)>; 2],
}

/// Mostly the shape of a real pass (pages on the second stream, its StreamEnd, PassBegin
/// and PassEnd on the main channel), with counts right or one off, then anything on
/// either channel: so pages land before the session is refused, or it gets further.
fn two_streams() -> impl Strategy<Value = TwoStreams> {
    let flip = || prop::option::of((any::<prop::sample::Index>(), 1u8..=255));
    (
        prop::collection::vec((0u64..80, 1u32..4, any::<u8>()), 0..6),
        (any::<bool>(), any::<bool>()),
        prop::collection::vec(frame(), 0..8),
        prop::collection::vec(frame(), 0..4),
        (any::<bool>(), prop_oneof![4 => Just(1u32), 1 => 0u32..3]),
        [flip(), flip()],
    )
        .prop_map(
            |(
                runs,
                (side_right, main_right),
                main_tail,
                side_tail,
                (right_session, index),
                flips,
            )| {
                let n: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
                let side = runs
                    .iter()
                    .map(|&(p, count, fill)| Frame::Pages {
                        gpa: p * PAGE,
                        count,
                        data: Cow::Owned(vec![fill | 1; count as usize * PAGE as usize]),
                    })
                    .chain([Frame::StreamEnd {
                        pass: 0,
                        pages: n + u64::from(!side_right),
                    }])
                    .chain(side_tail)
                    .collect();
                let announced = n + u64::from(!main_right);
                let main = [
                    Frame::PassBegin {
                        pass: 0,
                        pages: announced,
                    },
                    Frame::PassEnd {
                        pass: 0,
                        pages_sent: announced,
                    },
                ]
                .into_iter()
                .chain(main_tail)
                .collect();
                TwoStreams {
                    main,
                    side,
                    right_session,
                    index,
                    flips,
                }
            },
        )
}

/// A stream: mostly a valid Hello, then frames; sometimes one byte flipped, sometimes
/// raw garbage appended.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop::collection::vec(frame(), 0..24),
        prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(hello, frames, flip, tail)| {
            let mut out = Vec::new();
            let mut w = FrameWriter::new(&mut out);
            if hello {
                w.write_frame(&layout().hello()).unwrap();
            }
            for f in &frames {
                w.write_frame(f).unwrap();
            }
            if let Some((i, x)) = flip {
                if !out.is_empty() {
                    let at = i.index(out.len());
                    out[at] ^= x;
                }
            }
            out.extend_from_slice(&tail);
            out
        })
}

/// Every page of guest memory is zero.
fn all_zero(memory: &GuestMemory) -> Result<(), u64> {
    let mut buf = vec![0u8; PAGE as usize];
    for &(a, n) in &REGIONS {
        for p in 0..n / PAGE {
            memory.read_page(a + p * PAGE, &mut buf).unwrap();
            if buf.iter().any(|b| *b != 0) {
                return Err(a + p * PAGE);
            }
        }
    }
    Ok(())
}

/// A destination on a fresh listener, run in a thread: its result and report come back
/// on the channel.
#[allow(clippy::type_complexity)]
fn destination(
    memory: Arc<GuestMemory>,
) -> (
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<(
        Result<iovatrack::migrate::engine::DestReport, String>,
        iovatrack::migrate::engine::DestReport,
    )>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut d = Destination::new(memory, Vec::new())
            .vcpu_kind("software")
            .limits(DestLimits {
                max_refused: 0,
                hello_timeout: Duration::from_secs(2),
                read_timeout: Duration::from_secs(5),
                ..DestLimits::default()
            });
        let r = d.run(&listener, 1, Duration::from_secs(10));
        let _ = tx.send((
            r.map(|r| r.report).map_err(|e| e.to_string()),
            d.report().clone(),
        ));
    });
    (addr, rx)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn hostile_streams_leave_the_receiver_sound(bytes in stream()) {
        let memory = Arc::new(GuestMemory::new(&REGIONS).unwrap());
        let (addr, rx) = destination(memory.clone());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
        let (result, report) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the destination ends every connection within its timeouts");
        if let Ok(r) = &result {
            // Completing needs a Verify that matched this memory and a Commit.
            prop_assert!(!r.verified || r.mismatched_pages == 0);
        }
        if report.refused_connections > 0 {
            let left = all_zero(&memory);
            prop_assert!(left.is_ok(), "a refused peer left page {:#x}", left.unwrap_err());
        }
    }

    #[test]
    fn hostile_frames_over_two_streams_leave_the_receiver_sound(
        case in two_streams()
    ) {
        let TwoStreams { main, side, right_session, index, flips } = case;
        let memory = Arc::new(GuestMemory::new(&REGIONS).unwrap());
        let (addr, rx) = destination(memory.clone());
        let head = [layout().hello().into_owned(), Frame::Streams { count: 2 }];
        let mut m = TcpStream::connect(addr).unwrap();
        m.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = FrameWriter::new(m.try_clone().unwrap());
        for f in &head {
            w.write_frame(f).unwrap();
        }
        let ack = FrameReader::new(m.try_clone().unwrap()).read_frame().map(Frame::into_owned);
        let Ok(Frame::HelloAck { session }) = ack else {
            panic!("a valid Hello got {ack:?}");
        };
        let join = Frame::Join {
            session: if right_session { session } else { session ^ 1 },
            stream: index,
        };
        let mut j = TcpStream::connect(addr).unwrap();
        j.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut jw = FrameWriter::new(j.try_clone().unwrap());
        let _ = jw.write_frame(&join);
        let _ = j.write_all(&after(std::slice::from_ref(&join), &side, flips[1]));
        let _ = m.write_all(&after(&head, &main, flips[0]));
        for s in [&j, &m] {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        for mut s in [&j, &m] {
            let _ = s.read_to_end(&mut Vec::new());
        }
        let (result, report) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the destination ends every connection within its timeouts");
        if let Ok(r) = &result {
            prop_assert!(!r.verified || r.mismatched_pages == 0);
        }
        if !(right_session && index == 1) {
            prop_assert!(report.refused_connections > 0, "a wrong Join was let in: {:#?}", report);
        }
        if report.refused_connections > 0 {
            let left = all_zero(&memory);
            prop_assert!(left.is_ok(), "a refused peer left page {:#x}", left.unwrap_err());
        }
    }
}

/// A peer as an in-memory channel: reads come from `input`; the destination's writes
/// succeed for its first `writes_ok` frames, then fail (the peer is gone).
struct Scripted {
    input: std::io::Cursor<Vec<u8>>,
    writes_ok: usize,
    writes: usize,
}

impl Scripted {
    fn new(frames: &[Frame<'_>], writes_ok: usize) -> Box<Self> {
        let mut w = FrameWriter::new(Vec::new());
        for f in frames {
            w.write_frame(f).unwrap();
        }
        Box::new(Scripted {
            input: std::io::Cursor::new(w.into_inner()),
            writes_ok,
            writes: 0,
        })
    }
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }
    // One call a frame: the frame writer hands a whole frame to one vectored write.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.writes += 1;
        if self.writes > self.writes_ok {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Channel for Scripted {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// A destination over `REGIONS` that verifies page by page, as the demo's does.
fn verifying_destination() -> (Arc<GuestMemory>, Destination) {
    let memory = Arc::new(GuestMemory::new(&REGIONS).unwrap());
    let d = Destination::new(memory.clone(), Vec::new())
        .vcpu_kind("software")
        .verifier(Arc::new(PageHashes));
    (memory, d)
}

/// A whole migration of one page of `fill` at 1 MiB, verified against `expect` (the
/// memory the source has), then Commit.
fn one_page_migration(fill: u8, expect: &GuestMemory) -> Vec<OwnedFrame> {
    let layout = layout();
    vec![
        layout.hello().into_owned(),
        Frame::PassBegin { pass: 0, pages: 1 },
        Frame::Pages {
            gpa: 1 << 20,
            count: 1,
            data: Cow::Owned(vec![fill; PAGE as usize]),
        },
        Frame::PassEnd {
            pass: 0,
            pages_sent: 1,
        },
        Frame::Complete {
            total_pages: 1,
            digest: 0,
        },
        Frame::Verify {
            digest: 0,
            region_hashes: Cow::Owned(page_hashes(expect).unwrap()),
        },
        Frame::Commit,
    ]
}

/// Fuzz finding (`receiver`): a peer that went away just before the verdict (the write
/// of VerifyResult failed) made `serve_channel` return an error, so `Destination::run`
/// gave up on its real source. It is a dropped connection: the session is interrupted
/// and the next one continues into the same memory.
#[test]
fn a_peer_gone_before_the_verdict_interrupts_the_session() {
    let (_memory, mut d) = verifying_destination();
    let zero = GuestMemory::new(&REGIONS).unwrap();
    let hashes = page_hashes(&zero).unwrap();
    let layout = layout();
    let frames = [
        layout.hello(),
        Frame::Complete {
            total_pages: 0,
            digest: 0,
        },
        Frame::Verify {
            digest: 0,
            region_hashes: Cow::Borrowed(&hashes),
        },
    ];
    // HelloAck goes out; the verdict does not.
    let served = d.serve_channel(Scripted::new(&frames, 1), "gone").unwrap();
    assert!(matches!(served, Served::Interrupted(_)));
    assert_eq!(d.report().refused_connections, 0);
    // The source's next connection completes.
    let source = GuestMemory::new(&REGIONS).unwrap();
    source.write_page(1 << 20, &[9; PAGE as usize]).unwrap();
    let served = d
        .serve_channel(Scripted::new(&one_page_migration(9, &source), 9), "source")
        .unwrap();
    let Served::Complete(r) = served else {
        panic!("the retry did not complete");
    };
    assert!(r.report.verified);
}

/// Fuzz finding (`receiver`): after a committed migration the destination still took
/// connections into the memory the guest now runs on: a stranger's pages landed in it,
/// and a refused stranger's pages would have been zeroed in the running guest. Every
/// later connection is refused and the memory is left alone.
#[test]
fn after_a_committed_migration_every_connection_is_refused() {
    let (memory, mut d) = verifying_destination();
    let source = GuestMemory::new(&REGIONS).unwrap();
    source.write_page(1 << 20, &[7; PAGE as usize]).unwrap();
    let served = d
        .serve_channel(Scripted::new(&one_page_migration(7, &source), 9), "source")
        .unwrap();
    assert!(matches!(served, Served::Complete(r) if r.report.verified));
    // A stranger with pages of its own, then one that breaks the protocol after a page.
    let stranger = one_page_migration(0xee, &source);
    for frames in [&stranger[..], &stranger[..3]] {
        let served = d
            .serve_channel(Scripted::new(frames, 9), "stranger")
            .unwrap();
        assert!(matches!(served, Served::Refused));
    }
    assert_eq!(d.report().refused_connections, 2);
    assert!(
        d.report().refusals[0].contains("handed over"),
        "{:?}",
        d.report().refusals
    );
    assert_eq!(d.report().memory_resets, 0);
    let mut page = vec![0u8; PAGE as usize];
    memory.read_page(1 << 20, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 7), "the guest's page changed");
}
