//! Several streams: the Streams frame on the main channel, each extra channel's Join and
//! its passes, and the counts adding up over all streams.

use super::*;
use proptest::prelude::*;

const SESSION: u64 = 0x5e55_1011;

fn unexpected(r: Result<impl std::fmt::Debug, WireError>, f: FrameKind, s: StreamState) -> bool {
    matches!(r, Err(WireError::UnexpectedFrame { frame, state }) if frame == f && state == s)
}

/// A main-channel validator past Hello.
fn main_validator() -> Validator {
    let l = layout();
    let hello = l.hello().into_owned();
    let mut v = Validator::new(l);
    v.validate(&hello).unwrap();
    v
}

fn join(stream: u32) -> OwnedFrame {
    Frame::Join {
        session: SESSION,
        stream,
    }
}

fn page_run(gpa: u64, count: u32) -> OwnedFrame {
    Frame::Pages {
        gpa,
        count,
        data: Cow::Owned(vec![1; (count as u64 * PAGE) as usize]),
    }
}

#[test]
fn streams_frame_comes_once_before_pass_0() {
    let mut v = main_validator();
    assert_eq!(v.streams(), 1);
    assert!(matches!(
        v.clone().validate(&Frame::Streams { count: 0 }),
        Err(WireError::StreamCount { count: 0 })
    ));
    v.validate(&Frame::Streams { count: 3 }).unwrap();
    assert_eq!(v.streams(), 3);
    assert!(unexpected(
        v.clone().validate(&Frame::Streams { count: 3 }),
        FrameKind::Streams,
        StreamState::Idle
    ));
    // After a pass began (or ended), too late.
    let mut late = main_validator();
    late.validate(&Frame::PassBegin { pass: 0, pages: 0 })
        .unwrap();
    assert!(unexpected(
        late.clone().validate(&Frame::Streams { count: 2 }),
        FrameKind::Streams,
        StreamState::InPass
    ));
    late.validate(&Frame::PassEnd {
        pass: 0,
        pages_sent: 0,
    })
    .unwrap();
    assert!(unexpected(
        late.validate(&Frame::Streams { count: 2 }),
        FrameKind::Streams,
        StreamState::Idle
    ));
    // An extra channel's frames never belong on the main one.
    for f in [join(1), Frame::StreamEnd { pass: 0, pages: 0 }] {
        assert!(unexpected(
            v.clone().validate(&f),
            f.kind(),
            StreamState::Idle
        ));
    }
}

#[test]
fn stream_pages_count_in_the_pass() {
    let mut v = main_validator();
    v.validate(&Frame::Streams { count: 3 }).unwrap();
    assert!(unexpected(
        v.add_stream_pages(0, 1),
        FrameKind::StreamEnd,
        StreamState::Idle
    ));
    v.validate(&Frame::PassBegin { pass: 0, pages: 5 }).unwrap();
    v.validate(&page_run(0, 1)).unwrap();
    assert!(matches!(
        v.add_stream_pages(1, 2),
        Err(WireError::PassOrder {
            expected: 0,
            got: 1
        })
    ));
    assert!(matches!(
        v.clone().add_stream_pages(0, 5),
        Err(WireError::PassCount {
            announced: 5,
            received: 6,
            ..
        })
    ));
    v.add_stream_pages(0, 2).unwrap();
    // Main's page and one stream's two: three of five, so PassEnd(5) is refused...
    assert!(matches!(
        v.clone().validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 5
        }),
        Err(WireError::PassCount { received: 3, .. })
    ));
    // ...until the other stream's two are in.
    v.add_stream_pages(0, 2).unwrap();
    v.validate(&Frame::PassEnd {
        pass: 0,
        pages_sent: 5,
    })
    .unwrap();
    assert_eq!(v.pages_received(), 5);
}

#[test]
fn join_rules() {
    let l = layout();
    let j = |f: &Frame<'_>, streams| StreamValidator::join(l.clone(), f, SESSION, streams);
    assert!(unexpected(
        j(&l.hello(), 2),
        FrameKind::Hello,
        StreamState::AwaitJoin
    ));
    assert!(matches!(
        j(
            &Frame::Join {
                session: SESSION + 1,
                stream: 1
            },
            2
        ),
        Err(WireError::WrongSession { ours: SESSION, theirs }) if theirs == SESSION + 1
    ));
    assert!(matches!(
        j(&join(0), 2),
        Err(WireError::StreamIndex {
            stream: 0,
            streams: 2
        })
    ));
    assert!(matches!(
        j(&join(2), 2),
        Err(WireError::StreamIndex {
            stream: 2,
            streams: 2
        })
    ));
    let v = j(&join(3), 4).unwrap();
    assert_eq!((v.stream(), v.pass()), (3, 0));
}

#[test]
fn stream_rules() {
    let l = layout();
    let fresh = || StreamValidator::join(layout(), &join(1), SESSION, 2).unwrap();
    let mut v = fresh();
    assert_eq!(
        v.validate(&page_run(0x1_0000_0000, 2)).unwrap(),
        StreamStep::Pages(PagesTarget {
            region: 1,
            offset: 0
        })
    );
    assert!(matches!(
        v.clone().validate(&Frame::StreamEnd { pass: 1, pages: 2 }),
        Err(WireError::PassOrder {
            expected: 0,
            got: 1
        })
    ));
    assert!(matches!(
        v.clone().validate(&Frame::StreamEnd { pass: 0, pages: 3 }),
        Err(WireError::StreamPages {
            stream: 1,
            pass: 0,
            received: 2,
            reported: 3
        })
    ));
    assert_eq!(
        v.validate(&Frame::StreamEnd { pass: 0, pages: 2 }).unwrap(),
        StreamStep::PassDone { pass: 0, pages: 2 }
    );
    // The next pass counts from zero; an empty share is a share.
    assert_eq!(v.pass(), 1);
    assert_eq!(
        v.validate(&Frame::StreamEnd { pass: 1, pages: 0 }).unwrap(),
        StreamStep::PassDone { pass: 1, pages: 0 }
    );
    // Pages outside the guest, misaligned or short: the layout's own checks.
    assert!(matches!(
        v.clone().validate(&page_run(0x8000_0000, 1)),
        Err(WireError::PagesOutsideGuest { .. })
    ));
    // Anything but Pages, StreamEnd and Abort.
    for f in [
        l.hello().into_owned(),
        Frame::PassBegin { pass: 2, pages: 0 },
        Frame::PassEnd {
            pass: 2,
            pages_sent: 0,
        },
        Frame::Streams { count: 2 },
        join(1),
        Frame::Commit,
        Frame::Ack { pass: 0 },
    ] {
        assert!(
            unexpected(v.clone().validate(&f), f.kind(), StreamState::Joined),
            "{f:?}"
        );
    }
    assert_eq!(
        v.validate(&Frame::Abort {
            reason: Cow::Borrowed("bye")
        })
        .unwrap(),
        StreamStep::Aborted
    );
    assert!(unexpected(
        v.validate(&Frame::StreamEnd { pass: 2, pages: 0 }),
        FrameKind::StreamEnd,
        StreamState::Aborted
    ));
    // One stream's share of a pass is at most the guest: no page twice in a pass.
    let small = MemoryLayout::new(PAGE, "emulated", vec![IovaRange::new(0, 64 * PAGE)]).unwrap();
    let mut v = StreamValidator::join(small, &join(1), SESSION, 2).unwrap();
    for _ in 0..4 {
        v.validate(&page_run(0, 16)).unwrap();
    }
    assert!(matches!(
        v.validate(&page_run(0, 1)),
        Err(WireError::PassCount {
            announced: 64,
            received: 65,
            ..
        })
    ));
}

proptest! {
    /// A pass's pages dealt out over the main channel and N − 1 streams in any way: every
    /// share checks, and the main channel's PassEnd accepts the sum; a share that reports
    /// one page more or less than it carried, or a pass one page short, is refused.
    #[test]
    fn a_pass_split_over_streams_adds_up(
        runs in proptest::collection::vec((0u64..4096, 1u32..5, 0u32..5), 0..30),
        streams in 1u32..6,
        skew in prop_oneof![Just(None), (0u32..6, any::<bool>()).prop_map(Some)],
    ) {
        let mut main = main_validator();
        main.validate(&Frame::Streams { count: streams }).unwrap();
        let mut shares: Vec<StreamValidator> = (1..streams)
            .map(|s| StreamValidator::join(layout(), &join(s), SESSION, streams).unwrap())
            .collect();
        let total: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        main.validate(&Frame::PassBegin { pass: 0, pages: total }).unwrap();
        let mut carried = vec![0u64; streams as usize];
        for &(page, count, to) in &runs {
            let f = page_run(page * PAGE, count);
            let to = (to % streams) as usize;
            carried[to] += u64::from(count);
            if to == 0 {
                main.validate(&f).unwrap();
            } else {
                prop_assert!(matches!(shares[to - 1].validate(&f).unwrap(), StreamStep::Pages(_)));
            }
        }
        let mut ok = true;
        for (i, v) in shares.iter_mut().enumerate() {
            let mut reported = carried[i + 1];
            if let Some((s, more)) = skew {
                if s as usize == i + 1 {
                    reported = if more { reported + 1 } else { reported.wrapping_sub(1) };
                }
            }
            match v.validate(&Frame::StreamEnd { pass: 0, pages: reported }) {
                Ok(StreamStep::PassDone { pages, .. }) => main.add_stream_pages(0, pages).unwrap(),
                Ok(other) => prop_assert!(false, "{:?}", other),
                Err(WireError::StreamPages { .. }) => ok = false,
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }
        let skewed = skew.is_some_and(|(s, _)| s >= 1 && s < streams);
        prop_assert_eq!(ok, !skewed);
        // A refused share's pages are missing from the sum (unless it carried none).
        let missing = skew.map_or(0, |(s, _)| if skewed { carried[s as usize] } else { 0 });
        let end = main.clone().validate(&Frame::PassEnd { pass: 0, pages_sent: total });
        prop_assert_eq!(end.is_ok(), missing == 0, "{:?}", end);
        if ok && total > 0 {
            // One page short of what PassBegin announced.
            let mut short = main_validator();
            short.validate(&Frame::Streams { count: streams }).unwrap();
            short.validate(&Frame::PassBegin { pass: 0, pages: total }).unwrap();
            short.add_stream_pages(0, total - 1).unwrap();
            let end = short.validate(&Frame::PassEnd { pass: 0, pages_sent: total });
            prop_assert!(end.is_err());
        }
    }
}
