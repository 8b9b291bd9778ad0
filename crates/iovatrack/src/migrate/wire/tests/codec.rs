//! Encoding, decoding, header checks and buffer reuse of the reader and writer.

use super::*;

#[test]
fn round_trip_every_frame_type() {
    let frames = every_frame();
    let kinds: std::collections::HashSet<_> = frames.iter().map(|f| f.kind()).collect();
    assert_eq!(kinds.len(), 18, "every frame kind is covered");
    let bytes = encode(&frames);
    assert_eq!(decode_all(&bytes, &Limits::default()).unwrap(), frames);
    // And through the streaming reader, which borrows its buffer.
    let mut r = FrameReader::new(&bytes[..]);
    for f in &frames {
        assert_eq!(&r.read_frame().unwrap(), f);
    }
    assert_eq!(r.next_seq(), frames.len() as u64);
    assert!(matches!(r.read_frame(), Err(WireError::Closed)));
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = encode(&[Frame::Ack { pass: 0x0102_0304 }]);
    assert_eq!(&bytes[0..4], b"IOVT");
    assert_eq!(&bytes[4..6], &PROTOCOL_VERSION.to_le_bytes());
    assert_eq!(&bytes[6..8], &(FrameKind::Ack as u16).to_le_bytes());
    assert_eq!(&bytes[8..12], &4u32.to_le_bytes());
    assert_eq!(&bytes[12..20], &0u64.to_le_bytes());
    assert_eq!(&bytes[20..24], &[4, 3, 2, 1]);
    assert_eq!(bytes.len(), HEADER_LEN + 4 + TRAILER_LEN);
    let crc = crc32c(&bytes[..24]).to_le_bytes();
    assert_eq!(&bytes[24..], &crc);
}

#[test]
fn header_rejections() {
    let l = Limits::default();
    let good = encode(&[Frame::HelloAck { session: 7 }]);

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode_all(&bad, &l),
        Err(WireError::BadMagic { found }) if found == *b"XOVT"
    ));

    let next = PROTOCOL_VERSION + 1;
    let v2 = raw_frame(next, FrameKind::HelloAck as u16, 0, &[]);
    assert!(matches!(
        decode_all(&v2, &l),
        Err(WireError::VersionMismatch { ours: PROTOCOL_VERSION, theirs }) if theirs == next
    ));

    let unknown = raw_frame(PROTOCOL_VERSION, 99, 0, &[]);
    assert!(matches!(
        decode_all(&unknown, &l),
        Err(WireError::UnknownFrameType { ty: 99 })
    ));
    let zero = raw_frame(PROTOCOL_VERSION, 0, 0, &[]);
    assert!(matches!(
        decode_all(&zero, &l),
        Err(WireError::UnknownFrameType { ty: 0 })
    ));

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        decode_all(&bad, &l),
        Err(WireError::Checksum { seq: 0, .. })
    ));

    // Two streams each starting at 0, glued: the second frame is a replay.
    let mut glued = good.clone();
    glued.extend_from_slice(&good);
    assert!(matches!(
        decode_all(&glued, &l),
        Err(WireError::SequenceGap {
            expected: 1,
            got: 0
        })
    ));
    let skip = [good.clone(), raw_frame(PROTOCOL_VERSION, 2, 2, &[])].concat();
    assert!(matches!(
        decode_all(&skip, &l),
        Err(WireError::SequenceGap {
            expected: 1,
            got: 2
        })
    ));

    assert!(matches!(
        decode_all(&good[..good.len() - 1], &l),
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        decode_all(&good[..5], &l),
        Err(WireError::Truncated)
    ));
    assert!(decode_all(&[], &l).unwrap().is_empty());
}

#[test]
fn hostile_length_rejected_before_allocation() {
    let limits = Limits {
        max_payload: 1 << 20,
    };
    let mut hdr = raw_frame(PROTOCOL_VERSION, FrameKind::Pages as u16, 0, &[]);
    hdr.truncate(HEADER_LEN);
    hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_all(&hdr, &limits),
        Err(WireError::FrameTooLarge { len, max }) if len == u32::MAX as u64 && max == 1 << 20
    ));
    let mut r = FrameReader::with_limits(&hdr[..], limits);
    assert!(matches!(
        r.read_frame(),
        Err(WireError::FrameTooLarge { .. })
    ));
    assert_eq!(
        r.buf.capacity(),
        0,
        "nothing allocated for a refused length"
    );

    // Within the limit but the bytes never come: the buffer only grows with the data.
    hdr[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let mut stream = hdr.clone();
    stream.extend_from_slice(&[0u8; 100]);
    let mut r = FrameReader::with_limits(&stream[..], limits);
    assert!(matches!(r.read_frame(), Err(WireError::Truncated)));
    assert!(r.buf.capacity() < 4096, "capacity {}", r.buf.capacity());
    assert!(matches!(
        decode_all(&stream, &limits),
        Err(WireError::Truncated)
    ));
}

#[test]
fn reader_closed_versus_truncated() {
    let bytes = encode(&[Frame::HelloAck { session: 7 }]);
    let mut r = FrameReader::new(&bytes[..]);
    r.read_frame().unwrap();
    assert!(matches!(r.read_frame(), Err(WireError::Closed)));
    for cut in 1..bytes.len() {
        let mut r = FrameReader::new(&bytes[..cut]);
        assert!(
            matches!(r.read_frame(), Err(WireError::Truncated)),
            "cut at {cut}"
        );
    }
}

#[test]
fn malformed_payloads() {
    let l = Limits::default();
    let check = |ty: FrameKind, payload: &[u8], want: Malformation| {
        let bytes = raw_frame(PROTOCOL_VERSION, ty as u16, 0, payload);
        match decode_all(&bytes, &l) {
            Err(WireError::Malformed { frame, problem }) => {
                assert_eq!((frame, problem), (ty, want), "{payload:?}")
            }
            other => panic!("{ty:?} {payload:?}: {other:?}"),
        }
    };
    check(FrameKind::Ack, &[1, 2, 3], Malformation::Short);
    check(FrameKind::Ack, &[1, 2, 3, 4, 5], Malformation::Trailing);
    check(FrameKind::HelloAck, &[0], Malformation::Short);
    check(FrameKind::HelloAck, &[0; 9], Malformation::Trailing);
    check(FrameKind::CommitAck, &[0], Malformation::Trailing);
    check(FrameKind::Pages, &[0; 11], Malformation::Short);
    check(FrameKind::Abort, &[0xff, 0xfe], Malformation::InvalidUtf8);
    check(
        FrameKind::DeviceState,
        &[2, 0, 0xc3, 0x28],
        Malformation::InvalidUtf8,
    );
    check(FrameKind::DeviceState, &[5, 0, b'a'], Malformation::Short);
    let mut vr = vec![2u8];
    vr.extend_from_slice(&[0; 20]);
    check(FrameKind::VerifyResult, &vr, Malformation::BadBool);
    // A version-2 VerifyResult (no device digest) is too short for this version.
    check(FrameKind::VerifyResult, &[1; 9], Malformation::Short);
    check(FrameKind::VerifyPagesResult, &[0; 19], Malformation::Short);
    check(
        FrameKind::VerifyPagesResult,
        &[0; 21],
        Malformation::Trailing,
    );
    let mut v = vec![0u8; 12];
    v.extend_from_slice(&2u32.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    check(FrameKind::VerifyPages, &v, Malformation::CountMismatch);
    // A hostile list count: claims 2^32 − 1 hashes, carries one.
    let mut v = vec![0u8; 8];
    v.extend_from_slice(&u32::MAX.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    check(FrameKind::Verify, &v, Malformation::CountMismatch);
    // And one that claims fewer than it carries.
    let mut v = vec![0u8; 8];
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&[0; 16]);
    check(FrameKind::Verify, &v, Malformation::CountMismatch);
    let mut h = Vec::new();
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 16]);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&[0; 15]);
    check(FrameKind::Hello, &h, Malformation::CountMismatch);
}

#[test]
fn writer_refuses_oversized_frames_before_writing() {
    let limits = Limits { max_payload: 64 };
    let mut w = FrameWriter::with_limits(Vec::new(), limits);
    let data = [0u8; 64 - PAGES_PREFIX_LEN];
    w.write_pages(0, 1, &data).unwrap();
    let written = w.get_ref().len();
    let too_big = [0u8; 64 - PAGES_PREFIX_LEN + 1];
    assert!(matches!(
        w.write_pages(0, 1, &too_big),
        Err(WireError::FrameTooLarge { len: 65, max: 64 })
    ));
    assert_eq!(w.get_ref().len(), written);
    assert_eq!(w.next_seq(), 1);
    let long_name = "x".repeat(70_000);
    let mut w = FrameWriter::new(Vec::new());
    assert!(matches!(
        w.write_frame(&Frame::DeviceState {
            name: Cow::Borrowed(&long_name),
            bytes: b(&[]),
        }),
        Err(WireError::Malformed {
            problem: Malformation::FieldTooLong,
            ..
        })
    ));
    assert_eq!(Limits::default().max_pages_per_frame(4096), 16383);
    assert_eq!(limits.max_pages_per_frame(4096), 0);
    assert_eq!(limits.max_pages_per_frame(0), 0);
}

#[test]
fn buffers_are_reused_once_warm() {
    let data = vec![7u8; 4 * PAGE as usize];
    let mut w = FrameWriter::new(Vec::with_capacity(1 << 20));
    w.write_pages(0, 4, &data).unwrap();
    let scratch = (w.scratch.as_ptr(), w.scratch.capacity());
    for i in 0..50u32 {
        let n = i % 4 + 1;
        w.write_pages(u64::from(i) * PAGE, n, &data[..(n as u64 * PAGE) as usize])
            .unwrap();
    }
    assert_eq!((w.scratch.as_ptr(), w.scratch.capacity()), scratch);

    let bytes = w.into_inner();
    let mut r = FrameReader::new(&bytes[..]);
    r.read_frame().unwrap();
    let buf = (r.buf.as_ptr(), r.buf.capacity());
    for _ in 0..50 {
        let f = r.read_frame().unwrap();
        let Frame::Pages { data, .. } = f else {
            panic!("not pages")
        };
        assert!(matches!(data, Cow::Borrowed(_)), "pages borrow the buffer");
    }
    assert_eq!((r.buf.as_ptr(), r.buf.capacity()), buf);
}
