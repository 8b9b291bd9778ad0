//! The duplicate count: pages that went out twice in one pass, counted from the Pages
//! frames as they were written (not from the selection, which cannot repeat a page by
//! construction), so a sender that repeats a page is caught.

use crate::bitmap::DirtyBitmap;

/// Mark `count` pages from `first` of a region as written in this pass (`pass`: the
/// region's pages written so far this pass); returns how many were written before in it.
pub(super) fn record_run(pass: &mut DirtyBitmap, first: u64, count: u64) -> u64 {
    // Frames come from the region's own ledger bitmap: always in range.
    pass.set_range_counting(first, count).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn a_repeated_page_is_counted() {
        let mut pass = DirtyBitmap::new(64);
        assert_eq!(record_run(&mut pass, 0, 4), 0);
        // Page 3 again, with 4 and 5 new.
        assert_eq!(record_run(&mut pass, 3, 3), 1);
        assert_eq!(record_run(&mut pass, 0, 6), 6);
        pass.clear();
        assert_eq!(record_run(&mut pass, 0, 6), 0, "a new pass starts clean");
    }

    proptest! {
        /// Any runs, overlapping or not: duplicates are the pages written minus the
        /// distinct pages written (a set as the oracle).
        #[test]
        fn duplicates_are_pages_minus_distinct(
            runs in proptest::collection::vec((0u64..200, 1u64..40), 0..30),
        ) {
            let mut pass = DirtyBitmap::new(256);
            let mut seen = HashSet::new();
            let (mut written, mut dups) = (0u64, 0u64);
            for (first, count) in runs {
                dups += record_run(&mut pass, first, count);
                written += count;
                seen.extend(first..first + count);
            }
            prop_assert_eq!(dups, written - seen.len() as u64);
        }
    }
}
