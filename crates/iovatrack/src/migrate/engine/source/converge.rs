//! When pre-copy stops: the downtime estimate, the iteration cap, the timeout, and
//! auto-converge (QEMU's `migration_trigger_throttle` / `mig_throttle_guest_down`: when
//! the CPU dirties more than half of what a pass sent, twice, slow the vCPUs down, first
//! by `throttle_initial` %, then by `throttle_increment` % more each time).

use crate::migrate::engine::EngineConfig;
use serde::Serialize;

/// Why stop-and-copy began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Switchover {
    /// Not reached (the migration gave up first).
    #[default]
    None,
    /// The estimated downtime fit the budget.
    Converged,
    /// The iteration cap forced it.
    MaxIterations,
    /// The pre-copy timeout forced it (timeout action `force`).
    Timeout,
    /// A hook forced it.
    Forced,
}

impl std::fmt::Display for Switchover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Switchover::None => "none",
            Switchover::Converged => "converged",
            Switchover::MaxIterations => "max-iterations",
            Switchover::Timeout => "timeout",
            Switchover::Forced => "forced",
        })
    }
}

/// QEMU's `throttle-trigger-threshold` default: dirtying more than this share (%) of what
/// was sent in the same period counts as dirtying too fast.
const TRIGGER_PCT: u64 = 50;

/// Auto-converge state.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    /// The current throttle, %.
    pub(super) pct: u8,
    /// Consecutive periods that dirtied too fast.
    high: u32,
}

impl Throttle {
    /// One period: `dirtied` bytes dirtied by the CPU while `sent` bytes were sent. Returns
    /// the new throttle when it changes.
    pub(super) fn observe(&mut self, cfg: &EngineConfig, dirtied: u64, sent: u64) -> Option<u8> {
        if !cfg.auto_converge || sent == 0 {
            return None;
        }
        if dirtied.saturating_mul(100) <= sent.saturating_mul(TRIGGER_PCT) {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        let next = if self.pct == 0 {
            cfg.throttle_initial
        } else {
            self.pct.saturating_add(cfg.throttle_increment)
        }
        .min(cfg.throttle_max);
        (next != self.pct).then(|| {
            self.pct = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_like_qemu() {
        let cfg = EngineConfig {
            auto_converge: true,
            ..EngineConfig::default()
        };
        let mut t = Throttle::default();
        // Below the threshold: nothing.
        assert_eq!(t.observe(&cfg, 50, 100), None);
        // Twice above: the initial step, then increments, capped.
        assert_eq!(t.observe(&cfg, 60, 100), None);
        assert_eq!(t.observe(&cfg, 60, 100), Some(cfg.throttle_initial));
        assert_eq!(t.observe(&cfg, 60, 100), None);
        assert_eq!(
            t.observe(&cfg, 60, 100),
            Some(cfg.throttle_initial + cfg.throttle_increment)
        );
        for _ in 0..40 {
            t.observe(&cfg, 60, 100);
        }
        assert_eq!(t.pct, cfg.throttle_max);
        // Off: never.
        let off = EngineConfig::default();
        let mut t = Throttle::default();
        for _ in 0..4 {
            assert_eq!(t.observe(&off, 100, 1), None);
        }
    }
}
