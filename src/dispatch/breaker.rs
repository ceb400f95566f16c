//! Per-provider circuit breakers and the choice of provider for an attempt.
//!
//! - Consecutive transient failures (or throttles) open a provider's circuit for
//!   `open_for`; a refusal of herald's credentials opens it at once for `unhealthy_for`.
//! - After the cool-down exactly one probe goes through; its answer closes or re-opens.
//! - [`Breakers::pick`] chooses a delivery's provider: the route's providers in order,
//!   starting after the one its previous attempt failed at, skipping open circuits. When
//!   every provider of the route is open it says until when, so the dispatcher pauses the
//!   partition instead of spending an attempt; while a probe is in flight it says wait.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::providers::Provider;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Cool-down over; one probe is in flight and decides.
    HalfOpen,
}

/// What a send told the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The provider answered (sent, or a verdict about the request itself).
    Healthy,
    /// A transient failure or throttling: the provider is struggling.
    Failing,
    /// The provider refused herald's credentials or account: nothing will go through
    /// until an operator fixes it.
    Unhealthy,
}

/// Thread-safe breaker of one provider; time is passed in so tests need no sleeping.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    unhealthy_for: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration, unhealthy_for: Duration) -> Breaker {
        Breaker { threshold: threshold.max(1), open_for, unhealthy_for, state: Mutex::new(State::Closed { failures: 0 }) }
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

    /// Records the answer to a request that `allow` let through. Returns the new state's
    /// name when it changed (`"open"` / `"closed"`), for logs and metrics.
    pub fn record(&self, signal: Signal, now: Instant) -> Option<&'static str> {
        let mut s = self.state.lock().unwrap();
        let (next, changed) = match (*s, signal) {
            (_, Signal::Unhealthy) => (State::Open { until: now + self.unhealthy_for }, (!matches!(*s, State::Open { .. })).then_some("open")),
            (State::Closed { .. }, Signal::Healthy) => (State::Closed { failures: 0 }, None),
            (State::Closed { failures }, Signal::Failing) if failures + 1 >= self.threshold => {
                (State::Open { until: now + self.open_for }, Some("open"))
            }
            (State::Closed { failures }, Signal::Failing) => (State::Closed { failures: failures + 1 }, None),
            (State::HalfOpen | State::Open { .. }, Signal::Healthy) => (State::Closed { failures: 0 }, Some("closed")),
            (State::HalfOpen, Signal::Failing) => (State::Open { until: now + self.open_for }, Some("open")),
            // An answer from before the circuit opened: it stays open as it is.
            (State::Open { until }, Signal::Failing) => (State::Open { until }, None),
        };
        *s = next;
        changed
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().unwrap(), State::Closed { .. })
    }

    /// When an open circuit lets its probe through (`None`: closed or probing).
    fn open_until(&self) -> Option<Instant> {
        match *self.state.lock().unwrap() {
            State::Open { until } => Some(until),
            _ => None,
        }
    }
}

/// Which provider takes an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Go(Provider),
    /// A probe is in flight at a provider of the route: its answer decides.
    WaitForProbe,
    /// Every provider of the route is open; the first probe is due at `until`.
    AllOpen {
        until: Instant,
    },
}

/// The breakers of one dispatcher's providers, and a signal when any of them changes.
#[derive(Debug)]
pub struct Breakers {
    by_provider: HashMap<Provider, Breaker>,
    changed: Notify,
}

impl Breakers {
    pub fn new(providers: impl IntoIterator<Item = Provider>, threshold: u32, open_for: Duration, unhealthy_for: Duration) -> Breakers {
        Breakers {
            by_provider: providers.into_iter().map(|p| (p, Breaker::new(threshold, open_for, unhealthy_for))).collect(),
            changed: Notify::new(),
        }
    }

    /// The provider for an attempt over `route`: in order, starting after `after` (the
    /// provider the previous attempt failed at), the first whose circuit lets it through.
    pub fn pick(&self, route: &[Provider], after: Option<Provider>, now: Instant) -> Pick {
        let start = after.and_then(|a| route.iter().position(|p| *p == a)).map_or(0, |i| i + 1);
        let n = route.len();
        let mut until: Option<Instant> = None;
        let mut probing = false;
        for i in 0..n {
            let p = route[(start + i) % n];
            let Some(b) = self.by_provider.get(&p) else { continue };
            if b.allow(now) {
                return Pick::Go(p);
            }
            match b.open_until() {
                Some(t) => until = Some(until.map_or(t, |u| u.min(t))),
                None => probing = true,
            }
        }
        if probing {
            return Pick::WaitForProbe;
        }
        match until {
            Some(until) => Pick::AllOpen { until },
            // No provider of the route is configured: as good as open for a while.
            None => Pick::AllOpen { until: now + Duration::from_secs(60) },
        }
    }

    /// Whether another provider than `p` on `route` would take an attempt now (without
    /// letting a probe through).
    pub fn other_closed(&self, route: &[Provider], p: Provider) -> Option<Provider> {
        let start = route.iter().position(|x| *x == p).map_or(0, |i| i + 1);
        (0..route.len()).map(|i| route[(start + i) % route.len()]).filter(|x| *x != p).find(|x| self.by_provider.get(x).is_some_and(|b| !b.is_open()))
    }

    /// Records an answer; returns the state's new name when it changed.
    pub fn record(&self, p: Provider, signal: Signal, now: Instant) -> Option<&'static str> {
        let changed = self.by_provider.get(&p)?.record(signal, now);
        if changed.is_some() {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Waits until some breaker changes state, at most `limit`.
    pub async fn changed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.changed.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(30), H);
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
        let b = Breaker::new(2, Duration::from_secs(10), H);
        b.record(Signal::Failing, t0);
        b.record(Signal::Healthy, t0);
        assert_eq!(b.record(Signal::Failing, t0), None, "count was reset by the success");
        assert_eq!(b.record(Signal::Failing, t0), Some("open"));
        assert!(b.allow(t0 + Duration::from_secs(10)));
        assert_eq!(b.record(Signal::Failing, t0 + Duration::from_secs(10)), Some("open"));
        assert!(!b.allow(t0 + Duration::from_secs(19)));
        assert!(b.allow(t0 + Duration::from_secs(20)));
    }

    #[test]
    fn refused_credentials_open_at_once_for_longer() {
        let t0 = Instant::now();
        let b = Breaker::new(5, Duration::from_secs(10), Duration::from_secs(60));
        assert_eq!(b.record(Signal::Unhealthy, t0), Some("open"));
        assert!(!b.allow(t0 + Duration::from_secs(59)));
        assert!(b.allow(t0 + Duration::from_secs(60)));
        assert_eq!(b.record(Signal::Unhealthy, t0 + Duration::from_secs(60)), Some("open"), "a refused probe re-opens");
    }

    #[test]
    fn pick_rotates_past_the_failed_provider_and_skips_open_circuits() {
        use Provider::{Twilio, Vonage};
        let t0 = Instant::now();
        let b = Breakers::new([Twilio, Vonage], 1, Duration::from_secs(10), H);
        let route = [Twilio, Vonage];
        assert_eq!(b.pick(&route, None, t0), Pick::Go(Twilio));
        assert_eq!(b.pick(&route, Some(Twilio), t0), Pick::Go(Vonage), "the next attempt goes to the next provider");
        assert_eq!(b.pick(&route, Some(Vonage), t0), Pick::Go(Twilio), "and wraps around");
        b.record(Twilio, Signal::Failing, t0);
        assert_eq!(b.pick(&route, None, t0), Pick::Go(Vonage), "open circuit skipped");
        assert_eq!(b.other_closed(&route, Vonage), None);
        b.record(Vonage, Signal::Failing, t0 + Duration::from_secs(2));
        assert_eq!(b.pick(&route, None, t0 + Duration::from_secs(3)), Pick::AllOpen { until: t0 + Duration::from_secs(10) });
        // Twilio's probe is due first; while it is in flight, others wait for it.
        assert_eq!(b.pick(&route, None, t0 + Duration::from_secs(10)), Pick::Go(Twilio));
        assert_eq!(b.pick(&route, None, t0 + Duration::from_secs(10)), Pick::WaitForProbe);
        b.record(Twilio, Signal::Healthy, t0 + Duration::from_secs(10));
        assert_eq!(b.pick(&route, None, t0 + Duration::from_secs(10)), Pick::Go(Twilio));
        assert_eq!(b.other_closed(&route, Vonage), Some(Twilio));
    }
}
