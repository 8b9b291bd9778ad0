//! The receiver as a network peer under hostile frame sequences (issue 11): frames in any
//! order and of any size, valid or corrupted, through a real socket into a real
//! [`Destination`]. Whatever arrives, the destination never panics, ends every connection
//! within its timeouts, never completes unverified work, and a refused peer leaves no byte
//! in guest memory. `PROPTEST_CASES` sets the number of sequences (default 64); the
//! cargo-fuzz target `receiver` (fuzz/) drives the same path with coverage guidance.

use iovatrack::migrate::engine::{DestLimits, Destination};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::wire::{Frame, FrameWriter, MemoryLayout, OwnedFrame};
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
    ]
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mem = memory.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut d = Destination::new(mem, Vec::new())
                .vcpu_kind("software")
                .limits(DestLimits {
                    max_refused: 0,
                    hello_timeout: Duration::from_secs(5),
                    read_timeout: Duration::from_secs(5),
                    ..DestLimits::default()
                });
            let r = d.run(&listener, 1, Duration::from_secs(10));
            let _ = tx.send((r.map(|r| r.report), d.report().clone()));
        });
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
            let mut buf = vec![0u8; PAGE as usize];
            for &(a, n) in &REGIONS {
                for p in 0..n / PAGE {
                    memory.read_page(a + p * PAGE, &mut buf).unwrap();
                    prop_assert!(buf.iter().all(|b| *b == 0), "a refused peer left page {:#x}", a + p * PAGE);
                }
            }
        }
    }
}
