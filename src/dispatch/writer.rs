//! The dispatcher's group-commit writer: every store write of the dispatcher (sent records,
//! log rows, dead addresses) is queued here and written in groups, at most `interval` after
//! it was queued or as soon as `max_rows` are waiting. A failed group is written again with
//! backoff until it succeeds: a store outage delays the writes, it never fails a batch or
//! loses one. Each write returns a [`Durable`] that resolves once it is in the store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{oneshot, Notify, Semaphore};

use super::store::{DispatchStore, Write};
use crate::telemetry::events;

/// Resolves once its write is in the store (clone it to wait more than once).
pub type Durable = Shared<BoxFuture<'static, ()>>;

/// Groups written at once; a slow store holds at most this many in flight.
const FLUSHES_IN_FLIGHT: usize = 4;

struct Queue {
    rows: Vec<Write>,
    done: Vec<oneshot::Sender<()>>,
    /// When the oldest waiting write was queued.
    since: Option<Instant>,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Notify,
    max_rows: usize,
}

/// A handle to the writer task (cheap to clone).
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

impl Writer {
    /// Starts the writer task on `store`.
    /// `role` labels the `herald_waiting{dependency="store"}` gauge while writes fail.
    pub fn start<S: DispatchStore>(store: Arc<S>, role: String, interval: Duration, max_rows: usize) -> Writer {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue { rows: Vec::new(), done: Vec::new(), since: None }),
            wake: Notify::new(),
            max_rows: max_rows.max(1),
        });
        tokio::spawn(flush_loop(inner.clone(), store, role, interval));
        Writer { inner }
    }

    /// Queues a write; the returned future resolves when it is durable.
    pub fn put(&self, w: Write) -> Durable {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut q = self.inner.queue.lock().unwrap();
            q.rows.push(w);
            q.done.push(tx);
            let first = q.since.is_none();
            q.since.get_or_insert_with(Instant::now);
            // The flush loop sleeps until a group's first write, then until it is full.
            first || q.rows.len() >= self.inner.max_rows
        };
        if wake {
            self.inner.wake.notify_one();
        }
        // A dropped sender means the writer task is gone (the runtime is shutting down):
        // the write is not known to be durable, so never resolve.
        async move {
            if rx.await.is_err() {
                futures::future::pending::<()>().await;
            }
        }
        .boxed()
        .shared()
    }

    /// Writes queued and not yet written (a gauge for `/metrics` and shutdown).
    pub fn pending(&self) -> usize {
        self.inner.queue.lock().unwrap().rows.len()
    }
}

async fn flush_loop<S: DispatchStore>(inner: Arc<Inner>, store: Arc<S>, role: String, interval: Duration) {
    let role: Arc<str> = role.into();
    let slots = Arc::new(Semaphore::new(FLUSHES_IN_FLIGHT));
    loop {
        // Wait for a first write, then until the group is `interval` old or full.
        let since = loop {
            let since = inner.queue.lock().unwrap().since;
            match since {
                Some(t) => break t,
                None => inner.wake.notified().await,
            }
        };
        loop {
            let (len, left) = {
                let q = inner.queue.lock().unwrap();
                (q.rows.len(), interval.saturating_sub(since.elapsed()))
            };
            if len >= inner.max_rows || left.is_zero() {
                break;
            }
            let _ = tokio::time::timeout(left, inner.wake.notified()).await;
        }
        let permit = slots.clone().acquire_owned().await.expect("writer semaphore is never closed");
        let (rows, done) = {
            let mut q = inner.queue.lock().unwrap();
            let n = q.rows.len().min(inner.max_rows);
            let rows: Vec<Write> = q.rows.drain(..n).collect();
            let done: Vec<oneshot::Sender<()>> = q.done.drain(..n).collect();
            q.since = if q.rows.is_empty() { None } else { Some(Instant::now()) };
            (rows, done)
        };
        let (store, role) = (store.clone(), role.clone());
        tokio::spawn(async move {
            write_until_done(store.as_ref(), &role, &rows).await;
            for d in done {
                let _ = d.send(());
            }
            drop(permit);
        });
    }
}

/// Writes `rows`, again and again with backoff until the store takes them.
async fn write_until_done<S: DispatchStore>(store: &S, role: &str, rows: &[Write]) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        match store.write(rows).await {
            Ok(()) => {
                events::dispatch_flush(rows.len(), started.elapsed().as_secs_f64());
                if failures > 0 {
                    tracing::info!(rows = rows.len(), failures, "store writes went through after retrying");
                    events::waiting(role, "store", false);
                }
                tracing::debug!(rows = rows.len(), write_ms = started.elapsed().as_millis() as u64, "dispatch writes durable");
                return;
            }
            Err(e) => {
                failures += 1;
                events::waiting(role, "store", true);
                tracing::warn!(error = %e, rows = rows.len(), failures, ?backoff, "store writes failed; writing them again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::store::memory::MemoryStore;
    use crate::model::DeliveryOutcome;

    fn log_row(i: usize) -> Write {
        Write::Log(DeliveryOutcome {
            outcome_id: format!("o{i}"),
            event_id: format!("e{i}"),
            delivery_id: None,
            user_id: None,
            category: None,
            channel: None,
            provider: None,
            status: "sent".into(),
            reason: None,
            provider_message_id: None,
            attempt: 0,
            latency_ms: None,
            occurred_at: 0,
            requested_at: None,
        })
    }

    #[tokio::test]
    async fn writes_are_grouped_and_retried_until_the_store_takes_them() {
        let store = Arc::new(MemoryStore::default());
        let w = Writer::start(store.clone(), "test".into(), Duration::from_millis(20), 100);
        store.fail_writes(2);
        let tickets: Vec<Durable> = (0..10).map(|i| w.put(log_row(i))).collect();
        tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(tickets)).await.expect("durable after the failures");
        assert_eq!(store.data.log.lock().unwrap().len(), 10);
        // One group, written three times (two failures on command).
        assert_eq!(store.data.writes.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(w.pending(), 0);
    }

    #[tokio::test]
    async fn a_store_outage_is_waited_out() {
        let store = Arc::new(MemoryStore::default());
        let w = Writer::start(store.clone(), "test".into(), Duration::from_millis(5), 100);
        store.set_down(true);
        let t = w.put(log_row(1));
        assert!(tokio::time::timeout(Duration::from_millis(300), t.clone()).await.is_err(), "not durable while the store is down");
        store.set_down(false);
        tokio::time::timeout(Duration::from_secs(5), t).await.expect("durable once the store is back");
    }

    #[tokio::test]
    async fn a_full_group_is_written_before_the_interval() {
        let store = Arc::new(MemoryStore::default());
        let w = Writer::start(store.clone(), "test".into(), Duration::from_secs(30), 4);
        let tickets: Vec<Durable> = (0..4).map(|i| w.put(log_row(i))).collect();
        tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(tickets)).await.expect("written when full");
    }
}
