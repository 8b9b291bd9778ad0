//! Shared checks for the fuzz targets: plan a parsed layout every way and check the
//! invariants every successful plan must keep; the `receiver` target's harness.

pub mod fixture;
pub mod receiver;

use iovatrack::layout::Layout;
use iovatrack::plan::{Planner, Strategy};

/// Plans `layout` with every strategy (and `optimal` at a few caps, with and without a
/// device) and asserts what a plan promises: ranges non-empty, aligned, within the cap,
/// sorted and disjoint (except `qemu`, which may overlap and says so), covering every
/// DMA-able byte.
pub fn plan_all(layout: &Layout) {
    let caps = [1u32, 2, 8, 256];
    for strategy in Strategy::ALL {
        for &cap in &caps {
            if strategy != Strategy::Optimal && cap != 256 {
                continue;
            }
            for page in [4096u64, 1 << 21] {
                let planner = Planner::new()
                    .strategy(strategy)
                    .max_ranges(cap)
                    .page_size(page);
                let Ok(plan) = planner.plan(layout) else {
                    continue;
                };
                check(&plan, strategy, cap);
                // Device views run check_start on the plan: must not panic.
                for limits in [
                    iovatrack::plan::limits::DeviceLimits::generic(),
                    iovatrack::plan::limits::DeviceLimits::mlx5(),
                    iovatrack::plan::limits::DeviceLimits::pds(),
                ] {
                    if let Ok(p) = planner.clone().device(limits).plan(layout) {
                        assert!(p.device.is_some());
                    }
                }
            }
        }
    }
}

fn check(plan: &iovatrack::plan::Plan, strategy: Strategy, cap: u32) {
    assert!(
        !plan.ranges.is_empty(),
        "{strategy:?}: empty plan returned Ok"
    );
    for r in &plan.ranges {
        assert!(r.length > 0, "{strategy:?}: zero-length range {r:?}");
        if strategy != Strategy::Qemu {
            assert!(
                r.iova % plan.page_size == 0 && r.length % plan.page_size == 0,
                "{strategy:?}: {r:?} not aligned to {:#x}",
                plan.page_size
            );
        }
    }
    if strategy == Strategy::Optimal || strategy == Strategy::Single {
        let max = if strategy == Strategy::Single {
            1
        } else {
            cap as usize
        };
        assert!(
            plan.ranges.len() <= max,
            "{strategy:?}: {} ranges > cap {max}",
            plan.ranges.len()
        );
    }
    if strategy != Strategy::Qemu {
        for w in plan.ranges.windows(2) {
            assert!(
                w[0].end() <= w[1].iova as u128,
                "{strategy:?}: unsorted/overlapping {w:?}"
            );
        }
        assert!(!plan.overlapping);
    }
    let tracked: u128 = plan.ranges.iter().map(|r| r.length as u128).sum();
    assert_eq!(tracked, plan.tracked_bytes);
    if strategy != Strategy::Qemu {
        assert_eq!(
            plan.uncovered_bytes(),
            0,
            "{strategy:?}: plan misses DMA-able bytes"
        );
        assert!(plan.tracked_bytes >= plan.dma_bytes);
    }
}
