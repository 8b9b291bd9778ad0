//! Rate limiting of guest page writes.

use std::time::{Duration, Instant};

/// Paces the guest to `rate` pages/s by sleeping in the exit handler; the window restarts
/// on resume and on a rate change so a pause does not turn into a burst.
pub(crate) struct Pacer {
    start: Instant,
    pages: u64,
    rate: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            start: Instant::now(),
            pages: 0,
            rate,
        }
    }

    /// Time to sleep after `pages` more pages, if any.
    pub(crate) fn after(&mut self, pages: u64, rate: u64) -> Option<Duration> {
        if rate != self.rate {
            *self = Self::new(rate);
        }
        if rate == 0 {
            return None;
        }
        self.pages += pages;
        let due = self.start + Duration::from_secs_f64(self.pages as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            Some(due - now)
        } else {
            if now - due > Duration::from_millis(100) {
                // Far behind (host stalls): do not bank credit for a later burst.
                *self = Self::new(rate);
            }
            None
        }
    }
}
