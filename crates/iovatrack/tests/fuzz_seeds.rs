//! Seeds for the cargo-fuzz targets `wire` and `receiver` (fuzz/), made with the real
//! encoder and a real source, so they follow the protocol as it is now.
//!
//! `cargo test --release -p iovatrack --test fuzz_seeds -- --ignored` rewrites
//! `fuzz/seeds/wire` and `fuzz/seeds/receiver`; the test that is not ignored fails when
//! the committed seeds no longer decode as the current protocol (a version bump, a changed
//! frame), which is when to rewrite them.

#[path = "../../../fuzz/src/fixture.rs"]
#[allow(dead_code)]
mod fixture;

use iovatrack::device::EmulatedDevice;
use iovatrack::migrate::demo::verify::PageHashes;
use iovatrack::migrate::engine::{self, Channel, Destination, EngineConfig, NoHooks, SourceVm};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::seams::{CpuDirtyLog, DeviceMigration, EmulatedMigration, Vcpus, VmError};
use iovatrack::migrate::wire::{decode_all, Frame, FrameWriter, Limits, OwnedFrame};
use iovatrack::plan::limits::DeviceLimits;
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn seeds(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// One frame of each kind, with small plausible fields.
fn one_of_each() -> Vec<(&'static str, OwnedFrame)> {
    let layout = fixture::layout();
    // The decoder does not know the page size (the destination's validator does): a
    // short run keeps the seed small.
    let page: Vec<u8> = (0..64).collect();
    vec![
        ("Hello", layout.hello().into_owned()),
        (
            "HelloAck",
            Frame::HelloAck {
                session: 0x1234_5678,
            },
        ),
        ("PassBegin", Frame::PassBegin { pass: 0, pages: 1 }),
        (
            "Pages",
            Frame::Pages {
                gpa: 0x1_0000_0000,
                count: 1,
                data: Cow::Owned(page),
            },
        ),
        (
            "PassEnd",
            Frame::PassEnd {
                pass: 0,
                pages_sent: 1,
            },
        ),
        (
            "PassCut",
            Frame::PassCut {
                pass: 1,
                pages_sent: 0,
            },
        ),
        ("Ack", Frame::Ack { pass: 0 }),
        (
            "DeviceState",
            Frame::DeviceState {
                name: Cow::Borrowed("dma0"),
                bytes: Cow::Owned(b"\x05\0\0\0\0\0\0\0state".to_vec()),
            },
        ),
        (
            "VcpuState",
            Frame::VcpuState {
                index: 0,
                bytes: Cow::Owned(vec![0x5a; 16]),
            },
        ),
        (
            "Complete",
            Frame::Complete {
                total_pages: 1,
                digest: 7,
            },
        ),
        (
            "Verify",
            Frame::Verify {
                digest: 7,
                region_hashes: Cow::Owned(vec![1, 2, 3]),
            },
        ),
        (
            "VerifyResult",
            Frame::VerifyResult {
                ok: false,
                digest: 7,
                device_digest: 9,
                mismatched_regions: Cow::Owned(vec![2]),
            },
        ),
        (
            "VerifyPages",
            Frame::VerifyPages {
                region: 2,
                first: 0,
                hashes: Cow::Owned(vec![1, 2]),
            },
        ),
        (
            "VerifyPagesResult",
            Frame::VerifyPagesResult {
                region: 2,
                first: 0,
                mismatched: 1,
            },
        ),
        ("Streams", Frame::Streams { count: 2 }),
        (
            "Join",
            Frame::Join {
                session: 7,
                stream: 1,
            },
        ),
        ("StreamEnd", Frame::StreamEnd { pass: 0, pages: 1 }),
        ("Commit", Frame::Commit),
        ("CommitAck", Frame::CommitAck),
        (
            "Abort",
            Frame::Abort {
                reason: Cow::Borrowed("seed"),
            },
        ),
    ]
}

fn encode(frames: &[OwnedFrame]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for f in frames {
        w.write_frame(f).unwrap();
    }
    w.into_inner()
}

/// The `wire` seeds: mode byte 1 (the target repairs CRCs), then the frames.
fn wire_seeds(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = one_of_each()
        .into_iter()
        .enumerate()
        .map(|(i, (name, f))| {
            let mut b = vec![1u8];
            b.extend(encode(&[f]));
            (format!("frame-{i:02}-{name}.bin"), b)
        })
        .collect();
    let mut session = vec![1u8];
    session.extend_from_slice(stream);
    out.push(("session.bin".into(), session));
    out
}

/// A channel that keeps a copy of what the source sends.
struct Recorder {
    tcp: TcpStream,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf)?;
        self.sent.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

impl Channel for Recorder {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.tcp)
    }
}

/// vCPUs that only save a fixed state.
struct FixedVcpus;

impl Vcpus for FixedVcpus {
    fn kind(&self) -> &str {
        fixture::GUEST_KIND
    }
    fn pause(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn save(&self) -> Result<Vec<Vec<u8>>, VmError> {
        Ok(vec![vec![0x5a; 64]])
    }
}

/// A CPU that dirties nothing after pass 0.
struct NoDirt;

impl CpuDirtyLog for NoDirt {
    fn read_and_clear(&self, _slot: usize, buf: &mut [u64]) -> Result<(), VmError> {
        buf.fill(0);
        Ok(())
    }
}

fn devices(states: &[&[u8]]) -> Vec<Box<dyn DeviceMigration>> {
    fixture::DEVICES
        .iter()
        .zip(states)
        .map(|(name, state)| {
            let d = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).named(*name));
            d.migration().set_data(state.to_vec());
            Box::new(EmulatedMigration::new(*name, d)) as Box<dyn DeviceMigration>
        })
        .collect()
}

/// What a real source sends migrating a tiny guest of the fixture's layout (two
/// non-zero pages, two devices, one vCPU) to a real destination, which must verify.
fn record_source() -> Vec<u8> {
    let memory = GuestMemory::new(&fixture::REGIONS).unwrap();
    memory
        .fill_with(0x1000, fixture::PAGE, |a| a ^ 0xfeed)
        .unwrap();
    memory
        .fill_with(0x1_0000_3000, fixture::PAGE, |a| a.rotate_left(7))
        .unwrap();
    let layout = iovatrack::migrate::vm_memory::layout_from(memory.vm_memory()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let memory = Arc::new(GuestMemory::new(&fixture::REGIONS).unwrap());
        let mut d = Destination::new(memory, devices(&[b"", b""]))
            .verifier(Arc::new(PageHashes))
            .vcpu_kind(fixture::GUEST_KIND)
            .limits(fixture::limits());
        d.run(&listener, 1, Duration::from_secs(30))
            .map(|r| r.report)
    });
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut devs: Vec<(usize, Box<dyn DeviceMigration>)> = devices(&[b"dma0 state", b"dma1"])
        .into_iter()
        .map(|d| (0, d))
        .collect();
    let vm = SourceVm {
        layout: &layout,
        memory: &memory,
        vcpus: &FixedVcpus,
        cpu_log: &NoDirt,
        containers: &mut [],
        devices: &mut devs,
        verifier: Some(&PageHashes),
    };
    let report = engine::run_source(
        &EngineConfig::default(),
        vm,
        &mut NoHooks,
        || {
            let tcp = TcpStream::connect(addr)?;
            Ok(Box::new(Recorder {
                tcp,
                sent: sent.clone(),
            }) as Box<dyn Channel>)
        },
        &mut |_| {},
    )
    .unwrap();
    let dest = dest.join().unwrap().unwrap();
    assert!(report.verified && dest.verified, "{report:#?} {dest:#?}");
    assert!(dest.device_state_restored, "{dest:#?}");
    let stream = sent.lock().unwrap().clone();
    stream
}

/// The offset just past the first `n` frames of `stream`.
fn after_frames(stream: &[u8], n: usize) -> usize {
    let mut at = 0;
    for _ in 0..n {
        let len = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 20 + len + 4;
    }
    at
}

/// The `receiver` seeds: raw sessions (see fuzz/src/fixture.rs).
fn receiver_seeds(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
    use fixture::{RAW, RAW_FIX_CRC, RAW_FIX_SEQ, SEPARATOR};
    let raw = |mode: u8, sessions: &[&[u8]]| {
        let mut b = vec![mode];
        for (i, s) in sessions.iter().enumerate() {
            if i > 0 {
                b.extend_from_slice(SEPARATOR);
            }
            b.extend_from_slice(s);
        }
        b
    };
    let page = vec![0xee; fixture::PAGE as usize];
    let mut stranger = encode(&[
        fixture::layout().hello().into_owned(),
        Frame::PassBegin { pass: 0, pages: 1 },
        Frame::Pages {
            gpa: 0x10_0000,
            count: 1,
            data: Cow::Owned(page),
        },
    ]);
    stranger.extend_from_slice(&[0x5a; 20]);
    // The source's stream cut after its first Pages frame (a dropped link).
    let cut = &stream[..after_frames(stream, 3)];
    vec![
        ("recorded.bin".into(), raw(RAW, &[stream])),
        (
            "recorded-repaired.bin".into(),
            raw(RAW | RAW_FIX_CRC | RAW_FIX_SEQ, &[stream]),
        ),
        (
            "stranger-then-source.bin".into(),
            raw(RAW, &[&stranger, stream]),
        ),
        ("dropped-then-source.bin".into(), raw(RAW, &[cut, stream])),
        (
            "committed-then-stranger.bin".into(),
            raw(RAW, &[stream, &stranger]),
        ),
    ]
}

#[test]
#[ignore = "rewrites fuzz/seeds; run when the protocol changes"]
fn write_fuzz_seeds() {
    let stream = record_source();
    for (target, files) in [
        ("wire", wire_seeds(&stream)),
        ("receiver", receiver_seeds(&stream)),
    ] {
        let dir = seeds(target);
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        for (name, bytes) in files {
            assert!(bytes.len() <= 16384, "{name}: over scripts/fuzz's -max_len");
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn fuzz_seeds_follow_the_protocol() {
    // One seed a frame kind, exactly as the encoder writes it now.
    for (i, (name, f)) in one_of_each().into_iter().enumerate() {
        let path = seeds("wire").join(format!("frame-{i:02}-{name}.bin"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let mut want = vec![1u8];
        want.extend(encode(&[f]));
        assert!(bytes == want, "{path:?} is stale: rewrite the seeds");
    }
    // The recorded source: whole frames, starting with the fixture's Hello, to Commit.
    for (target, file) in [("wire", "session.bin"), ("receiver", "recorded.bin")] {
        let bytes = std::fs::read(seeds(target).join(file)).unwrap();
        let decoded = decode_all(&bytes[1..], &Limits::default()).unwrap();
        assert_eq!(decoded[0], fixture::layout().hello().into_owned());
        assert_eq!(decoded.last(), Some(&Frame::Commit));
    }
}
