//! Tests of the wire protocol, one file per concern; the shared fixtures are here.

use super::*;
use crate::range::IovaRange;
use std::borrow::Cow;

mod buffered;
mod codec;
mod crc;
mod loopback;
mod props;
mod streams;
mod validator;

const PAGE: u64 = 4096;

fn layout() -> MemoryLayout {
    MemoryLayout::new(
        PAGE,
        "emulated",
        vec![
            IovaRange::new(0, 0x8000_0000),
            IovaRange::new(0x1_0000_0000, 0x4000_0000),
            // Ends exactly at 2^64: end arithmetic must not overflow.
            IovaRange::new(u64::MAX - 0xF_FFFF, 0x10_0000),
        ],
    )
    .unwrap()
}

fn b(s: &[u8]) -> Cow<'_, [u8]> {
    Cow::Borrowed(s)
}

/// One frame of every type.
fn every_frame() -> Vec<OwnedFrame> {
    let l = layout();
    vec![
        l.hello().into_owned(),
        Frame::HelloAck { session: u64::MAX },
        Frame::CommitAck,
        Frame::PassBegin { pass: 0, pages: 3 },
        Frame::Pages {
            gpa: 0x2000,
            count: 2,
            data: Cow::Owned((0..2 * PAGE).map(|i| i as u8).collect()),
        },
        Frame::PassEnd {
            pass: 7,
            pages_sent: u64::MAX,
        },
        Frame::DeviceState {
            name: Cow::Owned("0000:3b:00.0 mlx5 ✓".into()),
            bytes: Cow::Owned(vec![1, 2, 3, 0, 255]),
        },
        Frame::DeviceState {
            name: Cow::Owned(String::new()),
            bytes: Cow::Owned(vec![]),
        },
        Frame::VcpuState {
            index: 3,
            bytes: Cow::Owned(vec![9; 1000]),
        },
        Frame::Complete {
            total_pages: 12345,
            digest: 0xdead_beef_cafe_f00d,
        },
        Frame::Verify {
            digest: 1,
            region_hashes: Cow::Owned(vec![2, 3, u64::MAX]),
        },
        Frame::VerifyResult {
            ok: false,
            digest: 5,
            device_digest: 6,
            mismatched_regions: Cow::Owned(vec![0, 2]),
        },
        Frame::VerifyResult {
            ok: true,
            digest: 5,
            device_digest: u64::MAX,
            mismatched_regions: Cow::Owned(vec![]),
        },
        Frame::VerifyPages {
            region: 1,
            first: 1 << 40,
            hashes: Cow::Owned(vec![0, 1, u64::MAX]),
        },
        Frame::VerifyPagesResult {
            region: u32::MAX,
            first: 3,
            mismatched: u64::MAX,
        },
        Frame::Abort {
            reason: Cow::Owned("device refused STOP_COPY".into()),
        },
        Frame::Ack { pass: u32::MAX },
        Frame::Streams { count: 4 },
        Frame::Join {
            session: 0x0123_4567_89ab_cdef,
            stream: 3,
        },
        Frame::StreamEnd {
            pass: 2,
            pages: u64::MAX,
        },
    ]
}

fn encode(frames: &[OwnedFrame]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for f in frames {
        w.write_frame(f).unwrap();
    }
    w.into_inner()
}

/// A frame with arbitrary header fields and a correct CRC, to test checks behind the CRC.
fn raw_frame(version: u16, ty: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(payload);
    let c = crc32c(&v);
    v.extend_from_slice(&c.to_le_bytes());
    v
}
