//! Per-provider client-side limits: at most `concurrency` requests in flight and at most
//! `rate` requests per second (a token bucket with one second of burst).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Limits of one provider.
#[derive(Debug)]
pub struct Limiter {
    in_flight: Semaphore,
    rate: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(concurrency: usize, rate_per_sec: f64) -> Limiter {
        let rate = rate_per_sec.max(0.001);
        Limiter { in_flight: Semaphore::new(concurrency.max(1)), rate, bucket: Mutex::new((rate, Instant::now())) }
    }

    /// Waits for a rate token and a concurrency slot; the slot is freed when the permit drops.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap();
                let now = Instant::now();
                let refill = now.duration_since(b.1).as_secs_f64() * self.rate;
                b.0 = (b.0 + refill).min(self.rate.max(1.0));
                b.1 = now;
                if b.0 >= 1.0 {
                    b.0 -= 1.0;
                    None
                } else {
                    Some(Duration::from_secs_f64((1.0 - b.0) / self.rate))
                }
            };
            match wait {
                None => break,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
        self.in_flight.acquire().await.expect("limiter semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_is_enforced_after_the_burst() {
        let l = Limiter::new(100, 10.0);
        let t0 = Instant::now();
        for _ in 0..30 {
            drop(l.acquire().await);
        }
        // 10 immediately (burst), 20 more at 10/s.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1_900) && took <= Duration::from_millis(2_100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded() {
        let l = Limiter::new(2, 1000.0);
        let a = l.acquire().await;
        let _b = l.acquire().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), l.acquire()).await.is_err(), "third waits");
        drop(a);
        assert!(tokio::time::timeout(Duration::from_millis(50), l.acquire()).await.is_ok());
    }
}
