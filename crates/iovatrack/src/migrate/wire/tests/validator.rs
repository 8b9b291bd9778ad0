//! Memory layouts, page runs and the destination's stream validation.

use super::*;
use proptest::prelude::*;

#[test]
fn layout_construction_rules() {
    let bad = |p, regions: Vec<IovaRange>| {
        assert!(matches!(
            MemoryLayout::new(PAGE, "k", regions),
            Err(WireError::InvalidLayout(q)) if q == p
        ));
    };
    assert!(matches!(
        MemoryLayout::new(3000, "k", vec![]),
        Err(WireError::InvalidLayout(LayoutProblem::PageSize(3000)))
    ));
    bad(LayoutProblem::EmptyRegion(0), vec![IovaRange::new(0, 0)]);
    bad(LayoutProblem::Misaligned(0), vec![IovaRange::new(1, PAGE)]);
    bad(LayoutProblem::Misaligned(0), vec![IovaRange::new(0, 1)]);
    bad(
        LayoutProblem::Overlap(1),
        vec![IovaRange::new(0, 2 * PAGE), IovaRange::new(PAGE, PAGE)],
    );
    bad(
        LayoutProblem::Overlap(1),
        vec![IovaRange::new(PAGE, PAGE), IovaRange::new(0, PAGE)],
    );
    bad(
        LayoutProblem::Overflow(0),
        vec![IovaRange::new(u64::MAX - PAGE + 1, 2 * PAGE)],
    );
    let l = layout();
    assert_eq!(
        l.total_pages(),
        (0x8000_0000 + 0x4000_0000 + 0x10_0000) / PAGE
    );
}

#[test]
fn hello_must_match_layout() {
    let ours = layout();
    assert!(ours.check_hello(&ours.hello()).is_ok());
    let mismatch = |l: MemoryLayout| {
        let e = ours.check_hello(&l.hello()).unwrap_err();
        match e {
            WireError::LayoutMismatch(d) => d,
            e => panic!("{e:?}"),
        }
    };
    let regions = ours.regions().to_vec();
    assert!(matches!(
        mismatch(MemoryLayout::new(8192, "emulated", vec![IovaRange::new(0, 8192)]).unwrap()),
        LayoutDiff::PageSize {
            ours: 4096,
            theirs: 8192
        }
    ));
    assert!(matches!(
        mismatch(MemoryLayout::new(PAGE, "kvm", regions.clone()).unwrap()),
        LayoutDiff::GuestKind { .. }
    ));
    assert!(matches!(
        mismatch(MemoryLayout::new(PAGE, "emulated", regions[..2].to_vec()).unwrap()),
        LayoutDiff::RegionCount { ours: 3, theirs: 2 }
    ));
    let mut r2 = regions.clone();
    r2[1].length += PAGE;
    assert!(matches!(
        mismatch(MemoryLayout::new(PAGE, "emulated", r2).unwrap()),
        LayoutDiff::Region { index: 1, .. }
    ));
    // A Hello whose total disagrees with its own regions.
    let Frame::Hello {
        guest_kind,
        regions: rs,
        ..
    } = ours.hello()
    else {
        unreachable!()
    };
    let lying = Frame::Hello {
        version: PROTOCOL_VERSION,
        guest_kind,
        page_size: PAGE,
        regions: rs.clone(),
        total_pages: 1,
    };
    assert!(matches!(
        ours.check_hello(&lying),
        Err(WireError::LayoutMismatch(LayoutDiff::TotalPages {
            theirs: 1,
            ..
        }))
    ));
    let old = Frame::Hello {
        version: 0,
        guest_kind: Cow::Borrowed("emulated"),
        page_size: PAGE,
        regions: rs,
        total_pages: ours.total_pages(),
    };
    assert!(matches!(
        ours.check_hello(&old),
        Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 0
        })
    ));
}

#[test]
fn pages_rules() {
    let l = layout();
    let page = vec![0u8; PAGE as usize];
    let two = vec![0u8; 2 * PAGE as usize];
    assert_eq!(
        l.locate(0x1000, 1, page.len()).unwrap(),
        PagesTarget {
            region: 0,
            offset: 0x1000
        }
    );
    assert_eq!(
        l.locate(0x1_0000_2000, 2, two.len()).unwrap(),
        PagesTarget {
            region: 1,
            offset: 0x2000
        }
    );
    // Last page of the space, ending at exactly 2^64.
    assert_eq!(
        l.locate(u64::MAX - PAGE + 1, 1, page.len()).unwrap(),
        PagesTarget {
            region: 2,
            offset: 0x10_0000 - PAGE
        }
    );
    // Last page of region 0.
    assert!(l.locate(0x8000_0000 - PAGE, 1, page.len()).is_ok());

    assert!(matches!(
        l.locate(0x1000, 0, 0),
        Err(WireError::PagesEmpty { gpa: 0x1000 })
    ));
    assert!(matches!(
        l.locate(0x1001, 1, page.len()),
        Err(WireError::PagesMisaligned {
            gpa: 0x1001,
            page_size: PAGE
        })
    ));
    assert!(matches!(
        l.locate(0x1000, 2, page.len()),
        Err(WireError::PagesLength {
            expected: 8192,
            got: 4096,
            ..
        })
    ));
    assert!(matches!(
        l.locate(0x1000, 1, two.len()),
        Err(WireError::PagesLength { .. })
    ));
    let outside = |gpa, count: u32| {
        let len = (count as u64 * PAGE) as usize;
        matches!(
            l.locate(gpa, count, len),
            Err(WireError::PagesOutsideGuest { gpa: g, count: c }) if g == gpa && c == count
        )
    };
    // Straddles the end of region 0.
    assert!(outside(0x8000_0000 - PAGE, 2));
    // In the hole between regions.
    assert!(outside(0x8000_0000, 1));
    assert!(outside(0xFFFF_F000, 1));
    // Spans region 0's end, the hole and region 1's start.
    assert!(outside(0x7FFF_F000, 0x2_0000));
    // Beyond the last region: u64 overflow would wrap without u128.
    assert!(outside(u64::MAX - PAGE + 1, 2));
    // Past region 1.
    assert!(outside(0x1_4000_0000, 1));
    // A huge count whose byte length overflows u64: the length check fires first and
    // must not overflow either.
    assert!(matches!(
        l.locate(0, u32::MAX, 0),
        Err(WireError::PagesLength { expected, .. }) if expected == u32::MAX as u64 * PAGE
    ));
    let big = MemoryLayout::new(1 << 40, "k", vec![IovaRange::new(0, 1 << 40)]).unwrap();
    assert!(matches!(
        big.locate(0, u32::MAX, 0),
        Err(WireError::PagesLength {
            expected: u64::MAX,
            ..
        })
    ));
}

fn pages(gpa: u64, count: u32, data: &[u8]) -> Frame<'_> {
    Frame::Pages {
        gpa,
        count,
        data: Cow::Borrowed(&data[..(count as u64 * PAGE) as usize]),
    }
}

#[test]
fn validator_accepts_a_full_migration() {
    let l = layout();
    let hello = l.hello().into_owned();
    let mut v = Validator::new(l);
    let data = vec![0u8; 4 * PAGE as usize];
    assert_eq!(v.state(), StreamState::AwaitHello);
    v.validate(&hello).unwrap();
    v.validate(&Frame::PassBegin { pass: 0, pages: 3 }).unwrap();
    assert_eq!(
        v.validate(&pages(0, 2, &data)).unwrap(),
        Some(PagesTarget {
            region: 0,
            offset: 0
        })
    );
    v.validate(&pages(0x1_0000_0000, 1, &data)).unwrap();
    v.validate(&Frame::PassEnd {
        pass: 0,
        pages_sent: 3,
    })
    .unwrap();
    v.validate(&Frame::PassBegin { pass: 1, pages: 0 }).unwrap();
    v.validate(&Frame::PassEnd {
        pass: 1,
        pages_sent: 0,
    })
    .unwrap();
    v.validate(&Frame::PassBegin { pass: 2, pages: 1 }).unwrap();
    v.validate(&pages(0, 1, &data)).unwrap();
    v.validate(&Frame::PassEnd {
        pass: 2,
        pages_sent: 1,
    })
    .unwrap();
    v.validate(&Frame::DeviceState {
        name: "nic".into(),
        bytes: b(&[1]),
    })
    .unwrap();
    v.validate(&Frame::VcpuState {
        index: 0,
        bytes: b(&[2]),
    })
    .unwrap();
    v.validate(&Frame::Complete {
        total_pages: 4,
        digest: 9,
    })
    .unwrap();
    v.validate(&Frame::Verify {
        digest: 9,
        region_hashes: Cow::Owned(vec![1, 2, 3]),
    })
    .unwrap();
    assert_eq!(v.state(), StreamState::Verified);
    assert!(v
        .validate(&Frame::Verify {
            digest: 9,
            region_hashes: Cow::Owned(vec![1, 2, 3]),
        })
        .is_err());
    v.validate(&Frame::Commit).unwrap();
    assert_eq!(v.state(), StreamState::Committed);
    assert!(v.validate(&Frame::Commit).is_err());
    assert_eq!(v.pages_received(), 4);
}

#[test]
fn validator_rejections() {
    let l = layout();
    let hello = l.hello().into_owned();
    let data = vec![0u8; 4 * PAGE as usize];
    let fresh = || Validator::new(layout());
    let in_pass = |announced| {
        let mut v = fresh();
        v.validate(&hello).unwrap();
        v.validate(&Frame::PassBegin {
            pass: 0,
            pages: announced,
        })
        .unwrap();
        v
    };
    let unexpected = |r: Result<_, WireError>, f, s| matches!(r, Err(WireError::UnexpectedFrame { frame, state }) if frame == f && state == s);

    // Anything before Hello.
    assert!(unexpected(
        fresh().validate(&Frame::PassBegin { pass: 0, pages: 0 }),
        FrameKind::PassBegin,
        StreamState::AwaitHello
    ));
    // A second Hello.
    let mut v = fresh();
    v.validate(&hello).unwrap();
    assert!(unexpected(
        v.validate(&hello),
        FrameKind::Hello,
        StreamState::Idle
    ));
    // Destination-only frames.
    for f in [
        Frame::HelloAck { session: 1 },
        Frame::CommitAck,
        Frame::Ack { pass: 0 },
        Frame::VerifyResult {
            ok: true,
            digest: 0,
            device_digest: 0,
            mismatched_regions: Cow::Borrowed(&[]),
        },
        Frame::VerifyPagesResult {
            region: 0,
            first: 0,
            mismatched: 1,
        },
    ] {
        assert!(unexpected(v.validate(&f), f.kind(), StreamState::Idle));
    }
    // Pages outside a pass.
    assert!(unexpected(
        v.validate(&pages(0, 1, &data)),
        FrameKind::Pages,
        StreamState::Idle
    ));
    // Pass numbering.
    assert!(matches!(
        v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
        Err(WireError::PassOrder {
            expected: 0,
            got: 1
        })
    ));
    let mut v = in_pass(1);
    assert!(matches!(
        v.validate(&Frame::PassEnd {
            pass: 5,
            pages_sent: 0
        }),
        Err(WireError::PassOrder {
            expected: 0,
            got: 5
        })
    ));
    // State inside a pass, a nested pass.
    assert!(unexpected(
        v.validate(&Frame::VcpuState {
            index: 0,
            bytes: b(&[])
        }),
        FrameKind::VcpuState,
        StreamState::InPass
    ));
    assert!(unexpected(
        v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
        FrameKind::PassBegin,
        StreamState::InPass
    ));
    // Bad pages are refused by the validator too.
    assert!(matches!(
        v.validate(&pages(0x8000_0000, 1, &data)),
        Err(WireError::PagesOutsideGuest { .. })
    ));
    // More pages than announced.
    let mut v = in_pass(1);
    assert!(matches!(
        v.validate(&pages(0, 2, &data)),
        Err(WireError::PassCount {
            announced: 1,
            received: 2,
            ..
        })
    ));
    // Fewer pages than announced, or a wrong report.
    let mut v = in_pass(2);
    v.validate(&pages(0, 1, &data)).unwrap();
    assert!(matches!(
        v.validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 1
        }),
        Err(WireError::PassCount {
            announced: 2,
            received: 1,
            reported: 1,
            ..
        })
    ));
    let mut v = in_pass(1);
    v.validate(&pages(0, 1, &data)).unwrap();
    assert!(matches!(
        v.validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 2
        }),
        Err(WireError::PassCount { reported: 2, .. })
    ));
    v.validate(&Frame::PassEnd {
        pass: 0,
        pages_sent: 1,
    })
    .unwrap();
    // Complete with a wrong total.
    assert!(matches!(
        v.validate(&Frame::Complete {
            total_pages: 2,
            digest: 0
        }),
        Err(WireError::TotalPages {
            reported: 2,
            received: 1
        })
    ));
    // Verify before Complete; then a wrong region count; then nothing after Complete.
    let verify = |n: usize| Frame::Verify {
        digest: 0,
        region_hashes: Cow::Owned(vec![0; n]),
    };
    assert!(unexpected(
        v.validate(&verify(3)),
        FrameKind::Verify,
        StreamState::Idle
    ));
    v.validate(&Frame::Complete {
        total_pages: 1,
        digest: 0,
    })
    .unwrap();
    assert!(matches!(
        v.validate(&verify(2)),
        Err(WireError::LayoutMismatch(LayoutDiff::RegionCount {
            ours: 3,
            theirs: 2
        }))
    ));
    assert!(unexpected(
        v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
        FrameKind::PassBegin,
        StreamState::Completed
    ));
    // Abort anywhere, then nothing.
    v.validate(&Frame::Abort {
        reason: "bye".into(),
    })
    .unwrap();
    assert!(unexpected(
        v.validate(&verify(3)),
        FrameKind::Verify,
        StreamState::Aborted
    ));
    let mut v = in_pass(5);
    v.validate(&Frame::Abort { reason: "".into() }).unwrap();
    assert_eq!(v.state(), StreamState::Aborted);
    // A mismatched Hello.
    let other = MemoryLayout::new(PAGE, "kvm", layout().regions().to_vec()).unwrap();
    assert!(matches!(
        fresh().validate(&other.hello()),
        Err(WireError::LayoutMismatch(_))
    ));
}

proptest! {
    #[test]
    fn locate_matches_brute_force(
        gpa_page in 0u64..64,
        off in prop_oneof![Just(0u64), 1u64..PAGE],
        count in 0u32..20,
        extra in prop_oneof![Just(0usize), 1usize..3],
    ) {
        // Small layout: pages [4, 10) and [16, 20) and [30, 31).
        let regions = vec![
            IovaRange::new(4 * PAGE, 6 * PAGE),
            IovaRange::new(16 * PAGE, 4 * PAGE),
            IovaRange::new(30 * PAGE, PAGE),
        ];
        let l = MemoryLayout::new(PAGE, "k", regions.clone()).unwrap();
        let gpa = gpa_page * PAGE + off;
        let len = count as usize * PAGE as usize + extra;
        let got = l.locate(gpa, count, len);
        // Oracle: every page of the run is in the same region.
        let region_of = |p: u64| regions.iter().position(|r| r.contains(p * PAGE));
        let want_region = (0..u64::from(count))
            .map(|k| region_of(gpa_page + k))
            .collect::<Vec<_>>();
        let same = !want_region.is_empty()
            && want_region.iter().all(|r| r.is_some() && *r == want_region[0]);
        match got {
            Ok(t) => {
                prop_assert!(off == 0 && count > 0 && extra == 0 && same);
                prop_assert_eq!(Some(t.region), want_region[0]);
                prop_assert_eq!(t.offset, gpa - regions[t.region].iova);
            }
            Err(WireError::PagesEmpty { .. }) => prop_assert_eq!(count, 0),
            Err(WireError::PagesMisaligned { .. }) => prop_assert!(off != 0 && count > 0),
            Err(WireError::PagesLength { .. }) => prop_assert!(extra != 0 && off == 0),
            Err(WireError::PagesOutsideGuest { .. }) => prop_assert!(!same && off == 0 && extra == 0),
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }
}

#[test]
fn validator_takes_a_cut_pass_for_what_it_sent() {
    let l = layout();
    let hello = l.hello().into_owned();
    let mut v = Validator::new(l);
    let data = vec![0u8; 4 * PAGE as usize];
    v.validate(&hello).unwrap();
    v.validate(&Frame::PassBegin { pass: 0, pages: 3 }).unwrap();
    v.validate(&pages(0, 2, &data)).unwrap();
    // A PassEnd must match the announcement; a PassCut only what was received.
    assert!(matches!(
        v.clone().validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 2
        }),
        Err(WireError::PassCount { .. })
    ));
    assert!(matches!(
        v.clone().validate(&Frame::PassCut {
            pass: 0,
            pages_sent: 3
        }),
        Err(WireError::PassCount { .. })
    ));
    v.validate(&Frame::PassCut {
        pass: 0,
        pages_sent: 2,
    })
    .unwrap();
    // The next pass follows as usual.
    v.validate(&Frame::PassBegin { pass: 1, pages: 1 }).unwrap();
    v.validate(&pages(0x1_0000_0000, 1, &data)).unwrap();
    v.validate(&Frame::PassEnd {
        pass: 1,
        pages_sent: 1,
    })
    .unwrap();
    v.validate(&Frame::Complete {
        total_pages: 3,
        digest: 0,
    })
    .unwrap();
}

/// After a verdict that found regions different, the source sends page hashes of those
/// regions: each run non-empty and inside its region; no Commit after one.
#[test]
fn validator_takes_page_hashes_inside_a_region_after_verify() {
    let l = layout();
    let hello = l.hello().into_owned();
    let mut v = Validator::new(l);
    v.validate(&hello).unwrap();
    let run = |region, first, n| Frame::VerifyPages {
        region,
        first,
        hashes: Cow::Owned(vec![7; n]),
    };
    // Not before Verify.
    assert!(matches!(
        v.clone().validate(&run(0, 0, 1)),
        Err(WireError::UnexpectedFrame {
            state: StreamState::Idle,
            ..
        })
    ));
    v.validate(&Frame::Complete {
        total_pages: 0,
        digest: 0,
    })
    .unwrap();
    v.validate(&Frame::Verify {
        digest: 0,
        region_hashes: Cow::Owned(vec![1, 2, 3]),
    })
    .unwrap();
    // Region 2 is 256 pages: its last page is fine, one past it, an empty run, or a region
    // that does not exist are not.
    for (region, first, n) in [
        (2, 256, 1),
        (2, 200, 57),
        (0, 0, 0),
        (3, 0, 1),
        (2, u64::MAX, 1),
    ] {
        assert!(
            matches!(
                v.clone().validate(&run(region, first, n)),
                Err(WireError::VerifyPagesOutside { .. })
            ),
            "{region} {first} {n}"
        );
    }
    v.validate(&run(2, 255, 1)).unwrap();
    assert_eq!(v.state(), StreamState::Narrowing);
    v.validate(&run(0, 0, 3)).unwrap();
    assert!(v.clone().validate(&Frame::Commit).is_err());
    v.validate(&Frame::Abort {
        reason: Cow::Borrowed("done"),
    })
    .unwrap();
}
