//! A per-provider circuit breaker: consecutive transient failures open it, traffic moves to
//! the channel's other provider, and after a cool-down one probe decides whether to close it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    /// Cool-down over; one probe is in flight and decides.
    HalfOpen,
}

/// Thread-safe breaker; time is passed in so tests need no sleeping.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

/// What a send told the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The provider answered (sent, or a verdict about the request itself).
    Healthy,
    /// A transient failure or throttling: the provider is struggling.
    Failing,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker { threshold: threshold.max(1), open_for, state: Mutex::new(State::Closed { failures: 0 }) }
    }

    /// May a request go to this provider now? An open breaker past its cool-down lets
    /// exactly one probe through.
    pub fn allow(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap();
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *s = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    /// Records the outcome of a request that `allow` let through. Returns the new state's
    /// name when it changed (`"open"` / `"closed"`), for logs and metrics.
    pub fn record(&self, signal: Signal, now: Instant) -> Option<&'static str> {
        let mut s = self.state.lock().unwrap();
        let (next, changed) = match (*s, signal) {
            (State::Closed { .. }, Signal::Healthy) => (State::Closed { failures: 0 }, None),
            (State::Closed { failures }, Signal::Failing) if failures + 1 >= self.threshold => {
                (State::Open { until: now + self.open_for }, Some("open"))
            }
            (State::Closed { failures }, Signal::Failing) => (State::Closed { failures: failures + 1 }, None),
            (State::HalfOpen | State::Open { .. }, Signal::Healthy) => (State::Closed { failures: 0 }, Some("closed")),
            (State::HalfOpen | State::Open { .. }, Signal::Failing) => (State::Open { until: now + self.open_for }, Some("open")),
        };
        *s = next;
        changed
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().unwrap(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(30));
        assert!(b.allow(t0));
        assert_eq!(b.record(Signal::Failing, t0), None);
        assert_eq!(b.record(Signal::Failing, t0), None);
        assert_eq!(b.record(Signal::Failing, t0), Some("open"));
        assert!(!b.allow(t0 + Duration::from_secs(29)), "open: traffic goes elsewhere");
        assert!(b.allow(t0 + Duration::from_secs(30)), "one probe after the cool-down");
        assert!(!b.allow(t0 + Duration::from_secs(30)), "only one probe at a time");
        assert_eq!(b.record(Signal::Healthy, t0 + Duration::from_secs(31)), Some("closed"));
        assert!(b.allow(t0 + Duration::from_secs(31)));
    }

    #[test]
    fn a_failed_probe_reopens_and_success_resets_the_count() {
        let t0 = Instant::now();
        let b = Breaker::new(2, Duration::from_secs(10));
        b.record(Signal::Failing, t0);
        b.record(Signal::Healthy, t0);
        assert_eq!(b.record(Signal::Failing, t0), None, "count was reset by the success");
        assert_eq!(b.record(Signal::Failing, t0), Some("open"));
        assert!(b.allow(t0 + Duration::from_secs(10)));
        assert_eq!(b.record(Signal::Failing, t0 + Duration::from_secs(10)), Some("open"));
        assert!(!b.allow(t0 + Duration::from_secs(19)));
        assert!(b.allow(t0 + Duration::from_secs(20)));
    }
}
