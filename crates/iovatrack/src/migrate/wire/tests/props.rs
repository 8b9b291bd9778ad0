//! Properties over arbitrary frame streams and arbitrary bytes.

use super::*;
use proptest::prelude::*;

fn arb_frame() -> impl Strategy<Value = OwnedFrame> {
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    prop_oneof![
        (
            any::<u16>(),
            ".{0,12}",
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..5),
            any::<u64>()
        )
            .prop_map(|(version, k, page_size, rs, total_pages)| Frame::Hello {
                version,
                guest_kind: Cow::Owned(k),
                page_size,
                regions: Cow::Owned(rs.into_iter().map(|(a, b)| IovaRange::new(a, b)).collect()),
                total_pages,
            }),
        any::<u64>().prop_map(|session| Frame::HelloAck { session }),
        Just(Frame::CommitAck),
        (any::<u32>(), any::<u64>()).prop_map(|(pass, pages)| Frame::PassBegin { pass, pages }),
        (any::<u64>(), any::<u32>(), bytes(300)).prop_map(|(gpa, count, d)| Frame::Pages {
            gpa,
            count,
            data: Cow::Owned(d)
        }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(pass, pages_sent)| Frame::PassEnd { pass, pages_sent }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(pass, pages_sent)| Frame::PassCut { pass, pages_sent }),
        (".{0,12}", bytes(64)).prop_map(|(n, d)| Frame::DeviceState {
            name: Cow::Owned(n),
            bytes: Cow::Owned(d)
        }),
        (any::<u32>(), bytes(64)).prop_map(|(index, d)| Frame::VcpuState {
            index,
            bytes: Cow::Owned(d)
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(total_pages, digest)| Frame::Complete {
            total_pages,
            digest
        }),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..6)).prop_map(|(digest, h)| {
            Frame::Verify {
                digest,
                region_hashes: Cow::Owned(h),
            }
        }),
        (
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u32>(), 0..6)
        )
            .prop_map(|(ok, digest, device_digest, m)| Frame::VerifyResult {
                ok,
                digest,
                device_digest,
                mismatched_regions: Cow::Owned(m)
            }),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..6)
        )
            .prop_map(|(region, first, h)| Frame::VerifyPages {
                region,
                first,
                hashes: Cow::Owned(h)
            }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(region, first, mismatched)| {
            Frame::VerifyPagesResult {
                region,
                first,
                mismatched,
            }
        }),
        ".{0,20}".prop_map(|r| Frame::Abort {
            reason: Cow::Owned(r)
        }),
        any::<u32>().prop_map(|pass| Frame::Ack { pass }),
        any::<u32>().prop_map(|count| Frame::Streams { count }),
        (any::<u64>(), any::<u32>()).prop_map(|(session, stream)| Frame::Join { session, stream }),
        (any::<u32>(), any::<u64>()).prop_map(|(pass, pages)| Frame::StreamEnd { pass, pages }),
    ]
}

fn frame_ends(frames: &[OwnedFrame]) -> Vec<usize> {
    let mut w = FrameWriter::new(Vec::new());
    frames
        .iter()
        .map(|f| {
            w.write_frame(f).unwrap();
            w.get_ref().len()
        })
        .collect()
}

proptest! {
    #[test]
    fn stream_round_trips(frames in proptest::collection::vec(arb_frame(), 0..8)) {
        let bytes = encode(&frames);
        prop_assert_eq!(&decode_all(&bytes, &Limits::default()).unwrap(), &frames);
        let mut r = FrameReader::new(&bytes[..]);
        for f in &frames {
            prop_assert_eq!(&r.read_frame().unwrap(), f);
        }
        prop_assert!(matches!(r.read_frame(), Err(WireError::Closed)));
    }

    #[test]
    fn any_single_byte_flip_is_rejected(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = encode(&frames);
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        prop_assert!(decode_all(&bytes, &Limits::default()).is_err());
        let mut r = FrameReader::new(&bytes[..]);
        let mut failed = false;
        for _ in 0..frames.len() + 1 {
            match r.read_frame() {
                Ok(_) => {}
                Err(WireError::Closed) => break,
                Err(_) => { failed = true; break; }
            }
        }
        prop_assert!(failed, "flip at {} of {} accepted", i, bytes.len());
    }

    #[test]
    fn truncation_yields_a_prefix_or_truncated(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        at in any::<prop::sample::Index>(),
    ) {
        let bytes = encode(&frames);
        let cut = at.index(bytes.len());
        let ends = frame_ends(&frames);
        match decode_all(&bytes[..cut], &Limits::default()) {
            Ok(got) => {
                let k = got.len();
                prop_assert_eq!(&got[..], &frames[..k]);
                prop_assert_eq!(if k == 0 { 0 } else { ends[k - 1] }, cut);
            }
            Err(WireError::Truncated) => prop_assert!(!ends.contains(&cut) && cut != 0),
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        max in 0u32..1024,
    ) {
        let limits = Limits { max_payload: max };
        let _ = decode_all(&bytes, &limits);
        let mut r = FrameReader::with_limits(&bytes[..], limits);
        while r.read_frame().is_ok() {}
    }

    #[test]
    fn arbitrary_payloads_behind_a_valid_crc_never_panic(
        ty in 0u16..20,
        payload in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let bytes = raw_frame(PROTOCOL_VERSION, ty, 0, &payload);
        if let Ok(frames) = decode_all(&bytes, &Limits::default()) {
            // Whatever parsed re-encodes to the same bytes: no two encodings per frame.
            prop_assert_eq!(encode(&frames), bytes);
        }
    }

}
