//! CPU throttling for auto-converge, with QEMU's `cpu-throttle-percentage` semantics: a
//! vCPU runs one time slice ([`SLICE`], 10 ms), then sleeps `pct / (100 - pct)` slices, so
//! it is kept out of the guest `pct`% of the time.

use std::time::Duration;

/// The run slice between two throttle sleeps.
pub(crate) const SLICE: Duration = Duration::from_millis(10);
/// Highest percentage accepted (100 would stop the guest for good).
pub(crate) const MAX_PCT: u8 = 99;

/// `pct` capped to [`MAX_PCT`].
pub(crate) fn clamp(pct: u8) -> u8 {
    pct.min(MAX_PCT)
}

/// How long a vCPU sleeps after each slice at `pct`.
pub(crate) fn sleep_per_slice(pct: u8) -> Duration {
    let pct = u32::from(clamp(pct));
    SLICE * pct / (100 - pct)
}

/// One throttle period (a slice plus its sleep) at `pct`.
pub(crate) fn period(pct: u8) -> Duration {
    SLICE + sleep_per_slice(pct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_matches_the_percentage() {
        assert_eq!(sleep_per_slice(0), Duration::ZERO);
        assert_eq!(sleep_per_slice(50), SLICE);
        assert_eq!(sleep_per_slice(75), SLICE * 3);
        assert_eq!(sleep_per_slice(200), SLICE * 99);
        for pct in [10u8, 33, 50, 90] {
            let out = sleep_per_slice(pct).as_secs_f64() / period(pct).as_secs_f64();
            assert!((out - f64::from(pct) / 100.0).abs() < 0.01, "{pct}: {out}");
        }
    }
}
