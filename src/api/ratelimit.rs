//! Per-app request rate limits: one token bucket per app key in each API process
//! (`rate` tokens per second, `burst` at most). Over the limit the API answers 429 with
//! `Retry-After`. With N replicas behind a round-robin balancer an app gets up to N × rate.

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
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` 0 = unlimited.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter { default_rate: rate, default_burst: burst.max(rate).max(1), buckets: Mutex::new(HashMap::new()) }
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
        let burst = if rate == self.default_rate { self.default_burst } else { rate.saturating_mul(2) } as f64;
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let b = buckets.entry(key.to_string()).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate as f64).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate as f64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let l = RateLimiter::new(10, 20);
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
        let l = RateLimiter::new(0, 0);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.admit_at("a", None, t0).is_ok()));
        assert!((0..2).all(|_| l.admit_at("slow", Some(1), t0).is_ok()));
        assert!(l.admit_at("slow", Some(1), t0).unwrap_err() <= Duration::from_secs(1));
    }
}
