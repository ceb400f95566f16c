//! Per-app request rate limits: one token bucket per app key in each API process
//! (`rate` tokens per second, `burst` at most). Over the limit the API answers 429 with
//! `Retry-After`. With `api.replicas` = N processes behind one balancer, each admits 1/N of
//! the rate and burst, so an app's limit holds across them while requests are spread evenly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    default_rate: u32,
    default_burst: u32,
    /// Processes sharing each app's limit (`api.replicas`).
    replicas: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` 0 = unlimited; this process admits `1/replicas` of every app's rate and burst.
    pub fn new(rate: u32, burst: u32, replicas: u32) -> RateLimiter {
        RateLimiter {
            default_rate: rate,
            default_burst: burst.max(rate).max(1),
            replicas: f64::from(replicas.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` (at the app's own `rate` when it has one); `Err(wait)`
    /// says how long until one is available.
    pub fn admit(&self, key: &str, rate: Option<u32>) -> Result<(), Duration> {
        self.admit_at(key, rate, Instant::now())
    }

    fn admit_at(&self, key: &str, rate: Option<u32>, now: Instant) -> Result<(), Duration> {
        let rate = rate.unwrap_or(self.default_rate);
        if rate == 0 {
            return Ok(());
        }
        // An app with its own rate gets a burst of twice that rate (or the default burst).
        let burst = (f64::from(if rate == self.default_rate { self.default_burst } else { rate.saturating_mul(2) }) / self.replicas).max(1.0);
        let rate = f64::from(rate) / self.replicas;
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let b = buckets.entry(key.to_string()).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let l = RateLimiter::new(10, 20, 1);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(l.admit_at("a", None, t0).is_ok());
        }
        let wait = l.admit_at("a", None, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert!(l.admit_at("b", None, t0).is_ok(), "buckets are per app");
        assert!(l.admit_at("a", None, t0 + Duration::from_millis(100)).is_ok(), "one token after 1/rate");
        assert!(l.admit_at("a", None, t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn own_rate_and_unlimited() {
        let l = RateLimiter::new(0, 0, 1);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.admit_at("a", None, t0).is_ok()));
        assert!((0..2).all(|_| l.admit_at("slow", Some(1), t0).is_ok()));
        assert!(l.admit_at("slow", Some(1), t0).unwrap_err() <= Duration::from_secs(1));
    }

    #[test]
    fn replicas_share_the_rate_and_burst() {
        // Four processes: each admits a quarter, so the app's total stays at its limit.
        let l = RateLimiter::new(100, 200, 4);
        let t0 = Instant::now();
        assert_eq!((0..1000).filter(|_| l.admit_at("a", None, t0).is_ok()).count(), 50, "a quarter of the burst");
        let wait = l.admit_at("a", None, t0).unwrap_err();
        assert!(wait > Duration::from_millis(30) && wait <= Duration::from_millis(40), "one token per 40 ms: {wait:?}");
        let later = t0 + Duration::from_secs(1);
        assert_eq!((0..1000).filter(|_| l.admit_at("a", None, later).is_ok()).count(), 25, "a quarter of the rate");
        // An app's own rate is shared the same way; the burst never drops below one request.
        assert_eq!((0..10).filter(|_| l.admit_at("own", Some(1), t0).is_ok()).count(), 1);
    }
}
