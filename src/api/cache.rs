//! A read-through cache that refreshes in the background: an entry older than `ttl` is
//! still answered while one task reloads it, so a slow store read never stalls the request
//! path (it would, at high request rates, with plain expiry: every request waits for the
//! reload). An entry older than `4 × ttl` (its refreshes kept failing) is loaded in line.
//! A load that overlapped an invalidation is not kept: it may have read the store before
//! the change it was told about (entries live for minutes, changes arrive at once).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::store::StoreError;

struct Slot<V> {
    value: V,
    loaded: Instant,
    refreshing: AtomicBool,
}

pub struct Refreshing<V> {
    cache: Cache<String, Arc<Slot<V>>>,
    ttl: Duration,
    /// Bumped by every invalidation; a load started under an older value is not cached.
    generation: Arc<AtomicU64>,
}

impl<V: Clone + Send + Sync + 'static> Refreshing<V> {
    pub fn new(max_entries: u64, ttl: Duration) -> Refreshing<V> {
        Refreshing { cache: Cache::builder().max_capacity(max_entries).build(), ttl, generation: Arc::new(AtomicU64::new(0)) }
    }

    /// The cached value for `key`, loading it with `load` when absent or too old, and
    /// refreshing it in the background when merely stale.
    pub async fn get<F, Fut>(&self, key: &str, load: F) -> Result<V, StoreError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, StoreError>> + Send + 'static,
    {
        if let Some(slot) = self.cache.get(key).await {
            let age = slot.loaded.elapsed();
            if age <= self.ttl {
                return Ok(slot.value.clone());
            }
            if age <= self.ttl * 4 {
                if !slot.refreshing.swap(true, Ordering::AcqRel) {
                    let (cache, key, stale, generation) = (self.cache.clone(), key.to_string(), slot.clone(), self.generation.clone());
                    let started_at = generation.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        let started = Instant::now();
                        match load().await {
                            Ok(_) if generation.load(Ordering::SeqCst) != started_at => {
                                // Invalidated meanwhile: the next request loads afresh.
                                stale.refreshing.store(false, Ordering::Release);
                            }
                            Ok(value) => {
                                cache.insert(key.clone(), Arc::new(Slot { value, loaded: Instant::now(), refreshing: AtomicBool::new(false) })).await;
                                tracing::debug!(key, took_ms = started.elapsed().as_millis() as u64, "cache entry refreshed");
                            }
                            Err(e) => {
                                tracing::warn!(key, error = %e, "cache refresh failed; serving the stale entry");
                                stale.refreshing.store(false, Ordering::Release);
                            }
                        }
                    });
                }
                return Ok(slot.value.clone());
            }
            self.cache.invalidate(key).await;
        }
        let started_at = self.generation.load(Ordering::SeqCst);
        let slot = self
            .cache
            .try_get_with(key.to_string(), async move {
                let value = load().await?;
                Ok::<_, StoreError>(Arc::new(Slot { value, loaded: Instant::now(), refreshing: AtomicBool::new(false) }))
            })
            .await
            .map_err(|e| StoreError::Query { op: "cache load", detail: e.to_string(), retryable: true })?;
        if self.generation.load(Ordering::SeqCst) != started_at {
            // This caller gets what it loaded; later ones read the store again.
            self.cache.invalidate(key).await;
        }
        Ok(slot.value.clone())
    }

    pub async fn invalidate(&self, key: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(key).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[tokio::test]
    async fn stale_entries_are_served_while_one_refresh_runs() {
        let c: Refreshing<u32> = Refreshing::new(10, Duration::from_millis(50));
        let loads = Arc::new(AtomicU32::new(0));
        let loader = |loads: Arc<AtomicU32>| {
            move || {
                let loads = loads.clone();
                async move { Ok(loads.fetch_add(1, Ordering::SeqCst) + 1) }
            }
        };
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 1);
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 1, "fresh: cached");
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 1, "stale: served while refreshing");
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 2, "refreshed once");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 3, "too old: loaded in line");
        c.invalidate("k").await;
        assert_eq!(c.get("k", loader(loads.clone())).await.unwrap(), 4);
    }

    /// A loader that reads `store` after `delay`, like a store read that is slow.
    fn slow_read(
        store: Arc<AtomicU32>,
        delay: Duration,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<u32, StoreError>> + Send>> + Send + Sync + 'static {
        move || {
            let store = store.clone();
            Box::pin(async move {
                let read = store.load(Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(read)
            })
        }
    }

    #[tokio::test]
    async fn a_load_that_overlaps_an_invalidation_is_not_kept() {
        let store = Arc::new(AtomicU32::new(1));
        let c: Arc<Refreshing<u32>> = Arc::new(Refreshing::new(10, Duration::from_millis(40)));
        assert_eq!(c.get("k", slow_read(store.clone(), Duration::ZERO)).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // A background refresh reads the old value, then the change lands and is announced
        // before the refresh finishes.
        assert_eq!(c.get("k", slow_read(store.clone(), Duration::from_millis(50))).await.unwrap(), 1, "stale served");
        tokio::time::sleep(Duration::from_millis(10)).await;
        store.store(2, Ordering::SeqCst);
        c.invalidate("k").await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(c.get("k", slow_read(store.clone(), Duration::ZERO)).await.unwrap(), 2, "the refresh's old read was dropped");
        // The same for a load in line.
        c.invalidate("k").await;
        let inline = tokio::spawn({
            let (c, store) = (c.clone(), store.clone());
            async move { c.get("k", slow_read(store, Duration::from_millis(50))).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        store.store(3, Ordering::SeqCst);
        c.invalidate("k").await;
        assert_eq!(inline.await.unwrap(), 2, "the caller gets what it read");
        assert_eq!(c.get("k", slow_read(store.clone(), Duration::ZERO)).await.unwrap(), 3, "but it was not kept");
    }
}
