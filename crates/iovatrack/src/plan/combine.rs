//! The drivers' range reduction: `vfio_combine_iova_ranges()` (vfio core since 6.6, mlx5's
//! `combine_ranges` before), re-implemented twice.
//!
//! Given more ranges than the device takes, the kernel repeatedly merges the adjacent pair
//! with the smallest gap (`curr.start - prev.last`, ties to the lowest address), and for a
//! request of one node makes a single span. Because merging a pair leaves every other gap
//! unchanged, the result is exactly "close the `n - req` smallest gaps, ties lowest address
//! first", which [`combine`] computes in O(n log n). [`combine_kernel`] is the kernel's own
//! O(n²) loop, kept as the reference and as the benchmark baseline.

use crate::range::IovaRange;

/// The kernel's algorithm, step for step (O((n − req)·n)). `ranges` must be sorted and
/// disjoint. `req == 0` behaves as the kernel does: it ends with one node.
pub fn combine_kernel(ranges: &[IovaRange], req: usize) -> Vec<IovaRange> {
    // Work on inclusive [start, last] as the kernel's interval tree does.
    let mut nodes: Vec<(u64, u64)> = ranges
        .iter()
        .filter_map(|r| r.last().map(|l| (r.iova, l)))
        .collect();
    if nodes.is_empty() {
        return Vec::new();
    }
    if req == 1 {
        let last = nodes[nodes.len() - 1].1;
        return vec![to_range(nodes[0].0, last)];
    }
    while nodes.len() > req {
        let mut min_gap = u64::MAX;
        let mut at = None;
        for i in 1..nodes.len() {
            let gap = nodes[i].0 - nodes[i - 1].1;
            if gap < min_gap {
                min_gap = gap;
                at = Some(i);
            }
        }
        let Some(i) = at else { break };
        nodes[i - 1].1 = nodes[i].1;
        nodes.remove(i);
    }
    nodes.into_iter().map(|(s, l)| to_range(s, l)).collect()
}

/// Same result as [`combine_kernel`] in O(n log n): close the `n − req` smallest gaps.
/// `ranges` must be sorted and disjoint.
pub fn combine(ranges: &[IovaRange], req: usize) -> Vec<IovaRange> {
    let req = req.max(1);
    let n = ranges.len();
    if n <= req {
        return ranges.to_vec();
    }
    // Gap i lies between ranges[i-1] and ranges[i]; its kernel size is start - prev.last.
    let mut gaps: Vec<(u64, usize)> = (1..n)
        .map(|i| {
            (
                ranges[i].iova - ranges[i - 1].last().unwrap_or(ranges[i - 1].iova),
                i,
            )
        })
        .collect();
    let close = n - req;
    // Only the `close` smallest matter: select, then mark. (gap, index) orders ties lowest first.
    gaps.select_nth_unstable(close - 1);
    let mut closed = vec![false; n];
    for &(_, i) in &gaps[..close] {
        closed[i] = true;
    }
    let mut out = Vec::with_capacity(req);
    let mut cur = ranges[0];
    for i in 1..n {
        if closed[i] {
            cur = span(cur, ranges[i]);
        } else {
            out.push(cur);
            cur = ranges[i];
        }
    }
    out.push(cur);
    out
}

fn span(a: IovaRange, b: IovaRange) -> IovaRange {
    let last = b.last().unwrap_or(b.iova);
    to_range(a.iova, last)
}

fn to_range(first: u64, last: u64) -> IovaRange {
    // A span of the whole 2^64 space cannot be described by a u64 length; saturate (such a
    // plan is refused later with EOVERFLOW anyway).
    IovaRange::from_inclusive(first, last).unwrap_or(IovaRange::new(first, u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(a: u64, b: u64) -> IovaRange {
        IovaRange::new(a, b)
    }

    #[test]
    fn smallest_gap_first_ties_lowest() {
        // gaps: 0x1000 (between 0 and 1), 0x1000 (1,2), 0x3000 (2,3)
        let v = [
            r(0, 0x1000),
            r(0x2000, 0x1000),
            r(0x4000, 0x1000),
            r(0x8000, 0x1000),
        ];
        let out = combine(&v, 3);
        assert_eq!(
            out,
            vec![r(0, 0x3000), r(0x4000, 0x1000), r(0x8000, 0x1000)]
        );
        assert_eq!(out, combine_kernel(&v, 3));
        assert_eq!(combine(&v, 1), vec![r(0, 0x9000)]);
        assert_eq!(combine_kernel(&v, 1), vec![r(0, 0x9000)]);
        assert_eq!(combine_kernel(&v, 0), vec![r(0, 0x9000)]);
    }

    proptest! {
        #[test]
        fn fast_equals_kernel(raw in prop::collection::vec((0u64..64, 1u64..8), 1..40), req in 1usize..12) {
            let mut v = Vec::new();
            let mut at = 0u64;
            for (gap, len) in raw {
                at += gap * 0x1000;
                v.push(r(at, len * 0x1000));
                at += len * 0x1000 + 0x1000; // keep disjoint, never touching
            }
            prop_assert_eq!(combine(&v, req), combine_kernel(&v, req));
        }
    }
}
