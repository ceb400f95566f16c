//! The dispatcher's store seam: the four things it asks of the store ([`DispatchStore`]),
//! the CQL implementation on herald's tables, and an in-memory one that fails on command
//! for the commit protocol's unit tests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use scylla::statement::prepared::PreparedStatement;

use crate::model::DeliveryOutcome;
pub use crate::store::SentRecord;
use crate::store::{log_values, query_err, write_grouped, Row, Store, StoreError};

/// The offsets of one partition a dispatcher process had in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightRange {
    pub topic: String,
    pub partition: i32,
    /// The process (a random id per start).
    pub owner: String,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// One write the dispatcher hands to its group-commit writer.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// The sent-log entry of an accepted delivery (also its `sent` log entry and what
    /// webhooks and tracking read).
    Sent(SentRecord),
    /// A row of the notification log (every outcome but `sent`).
    Log(DeliveryOutcome),
    /// A push device whose token the provider called dead.
    DeviceInactive { user_id: String, device_id: String },
    /// A user's phone (`sms`) or email (`email`) the provider called dead.
    ContactInactive { user_id: String, channel: String },
}

/// What the dispatcher needs of the store. Every write is an idempotent upsert.
pub trait DispatchStore: Send + Sync + 'static {
    /// The sent-log entries of `delivery_ids` (absent ids are missing from the map).
    fn sent_of(&self, delivery_ids: &[&str]) -> impl Future<Output = Result<HashMap<String, SentRecord>, StoreError>> + Send;
    /// Writes all of `rows` (on an error some may have been written: write them again).
    fn write(&self, rows: &[Write]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The in-flight ranges last recorded for these partitions of `topic`.
    fn inflight_of(&self, topic: &str, partitions: &[i32]) -> impl Future<Output = Result<Vec<InflightRange>, StoreError>> + Send;
    /// Records in-flight ranges (one per partition, replacing the previous one).
    fn put_inflight(&self, ranges: &[InflightRange]) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// [`DispatchStore`] on the CQL store: `deliveries_by_id` is the sent-log and the index
/// webhooks and tracking find a delivery in (every provider's webhook carries the delivery
/// id; `provider_messages` is no longer written, which saved a third of the store's CPU per
/// delivery in the dispatch bench). Writes go in unlogged batches of a few rows.
pub struct CqlDispatchStore {
    store: Arc<Store>,
    put_delivery_ref: PreparedStatement,
    inflight_in: PreparedStatement,
    put_inflight: PreparedStatement,
}

impl CqlDispatchStore {
    /// Prepares the dispatcher's statements on `store`'s session (keyspace migrated to 009).
    pub async fn prepare(store: Arc<Store>, ks: &str) -> Result<CqlDispatchStore, StoreError> {
        let session = store.session.clone();
        let p = |q: String| {
            let session = session.clone();
            async move {
                let mut st = session.prepare(q).await.map_err(|e| query_err("prepare", e))?;
                st.set_is_idempotent(true);
                Ok::<_, StoreError>(st)
            }
        };
        Ok(CqlDispatchStore {
            put_delivery_ref: p(format!("INSERT INTO {ks}.deliveries_by_id (delivery_id, event_id, user_id, channel, category, provider, provider_message_id, attempt, latency_ms, sent_at, outcome_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")).await?,
            inflight_in: p(format!("SELECT topic, partition, owner, first_offset, last_offset FROM {ks}.dispatch_inflight WHERE topic = ? AND partition IN ?")).await?,
            put_inflight: p(format!("INSERT INTO {ks}.dispatch_inflight (topic, partition, owner, first_offset, last_offset, updated_at) VALUES (?, ?, ?, ?, ?, toTimestamp(now()))")).await?,
            store,
        })
    }
}

fn at(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap_or_else(chrono::Utc::now)
}

impl DispatchStore for CqlDispatchStore {
    async fn sent_of(&self, delivery_ids: &[&str]) -> Result<HashMap<String, SentRecord>, StoreError> {
        Ok(self.store.sent_log(delivery_ids).await?.into_iter().map(|r| (r.delivery_id.clone(), r)).collect())
    }

    async fn write(&self, rows: &[Write]) -> Result<(), StoreError> {
        let s = &self.store;
        let groups: Vec<Vec<Row<'_>>> = rows
            .iter()
            .map(|w| -> Vec<Row<'_>> {
                match w {
                    Write::Sent(r) => vec![(
                        &self.put_delivery_ref,
                        Box::new((
                            &r.delivery_id,
                            &r.event_id,
                            &r.user_id,
                            &r.channel,
                            &r.category,
                            &r.provider,
                            &r.provider_message_id,
                            r.attempt,
                            r.latency_ms,
                            at(r.sent_at),
                            &r.outcome_id,
                        )),
                    )],
                    Write::Log(o) => vec![(&s.put_log, Box::new(log_values(o, None)))],
                    Write::DeviceInactive { user_id, device_id } => vec![(&s.deactivate_device, Box::new((user_id, device_id)))],
                    Write::ContactInactive { user_id, channel } => {
                        let st = if channel == "email" { &s.set_email_active } else { &s.set_phone_active };
                        vec![(st, Box::new((false, user_id)))]
                    }
                }
            })
            .collect();
        write_grouped(&s.session, groups, "dispatch writes").await
    }

    async fn inflight_of(&self, topic: &str, partitions: &[i32]) -> Result<Vec<InflightRange>, StoreError> {
        let r = self.store.session.execute_unpaged(&self.inflight_in, (topic, partitions)).await.map_err(|e| query_err("in-flight ranges", e))?;
        let rows = r.into_rows_result().map_err(|e| query_err("in-flight ranges", e))?;
        rows.rows::<(String, i32, String, i64, i64)>()
            .map_err(|e| query_err("in-flight ranges", e))?
            .map(|row| {
                row.map(|(topic, partition, owner, first_offset, last_offset)| InflightRange { topic, partition, owner, first_offset, last_offset })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| query_err("in-flight ranges", e))
    }

    async fn put_inflight(&self, ranges: &[InflightRange]) -> Result<(), StoreError> {
        let groups: Vec<Vec<Row<'_>>> = ranges
            .iter()
            .map(|r| -> Vec<Row<'_>> { vec![(&self.put_inflight, Box::new((&r.topic, r.partition, &r.owner, r.first_offset, r.last_offset)))] })
            .collect();
        write_grouped(&self.store.session, groups, "in-flight ranges").await
    }
}

/// An in-memory [`DispatchStore`] for unit tests, with faults on command. Handles made by
/// [`memory::MemoryStore::handle`] share the data and have faults of their own, so one
/// "process" can be cut off from the store while another reaches it.
#[cfg(test)]
pub mod memory {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct Data {
        pub sent: Mutex<HashMap<String, SentRecord>>,
        pub log: Mutex<Vec<DeliveryOutcome>>,
        pub inactive: Mutex<Vec<Write>>,
        pub inflight: Mutex<HashMap<(String, i32), InflightRange>>,
        pub writes: AtomicUsize,
    }

    #[derive(Default)]
    pub struct MemoryStore {
        pub data: Arc<Data>,
        down: AtomicBool,
        writes_down: AtomicBool,
        failing_writes: AtomicUsize,
    }

    fn failure(what: &str) -> StoreError {
        StoreError::Query { op: "memory", detail: format!("{what} (on command)"), retryable: true }
    }

    impl MemoryStore {
        /// Another handle on the same data, without faults.
        pub fn handle(&self) -> MemoryStore {
            MemoryStore { data: self.data.clone(), ..Default::default() }
        }
        /// Every call fails while `down`.
        pub fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }
        /// Writes fail (nothing written) while `down`; reads work.
        pub fn set_writes_down(&self, down: bool) {
            self.writes_down.store(down, Ordering::SeqCst);
        }
        /// The next `n` writes fail after applying their first half.
        pub fn fail_writes(&self, n: usize) {
            self.failing_writes.store(n, Ordering::SeqCst);
        }
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                Err(failure("the store is down"))
            } else {
                Ok(())
            }
        }
        fn apply(&self, w: &Write) {
            let d = &self.data;
            match w {
                Write::Sent(r) => {
                    d.sent.lock().unwrap().insert(r.delivery_id.clone(), r.clone());
                }
                Write::Log(o) => {
                    let mut log = d.log.lock().unwrap();
                    match log.iter_mut().find(|x| x.event_id == o.event_id && x.outcome_id == o.outcome_id) {
                        Some(x) => *x = o.clone(),
                        None => log.push(o.clone()),
                    }
                }
                other => d.inactive.lock().unwrap().push(other.clone()),
            }
        }
    }

    impl DispatchStore for MemoryStore {
        async fn sent_of(&self, delivery_ids: &[&str]) -> Result<HashMap<String, SentRecord>, StoreError> {
            self.check()?;
            let sent = self.data.sent.lock().unwrap();
            Ok(delivery_ids.iter().filter_map(|id| sent.get(*id).map(|r| (id.to_string(), r.clone()))).collect())
        }

        async fn write(&self, rows: &[Write]) -> Result<(), StoreError> {
            self.check()?;
            if self.writes_down.load(Ordering::SeqCst) {
                return Err(failure("write timed out"));
            }
            self.data.writes.fetch_add(1, Ordering::SeqCst);
            let failing = self.failing_writes.load(Ordering::SeqCst);
            if failing > 0 {
                self.failing_writes.store(failing - 1, Ordering::SeqCst);
                rows.iter().take(rows.len() / 2).for_each(|w| self.apply(w));
                return Err(failure("write timed out half-way"));
            }
            rows.iter().for_each(|w| self.apply(w));
            Ok(())
        }

        async fn inflight_of(&self, topic: &str, partitions: &[i32]) -> Result<Vec<InflightRange>, StoreError> {
            self.check()?;
            let m = self.data.inflight.lock().unwrap();
            Ok(partitions.iter().filter_map(|p| m.get(&(topic.to_string(), *p)).cloned()).collect())
        }

        async fn put_inflight(&self, ranges: &[InflightRange]) -> Result<(), StoreError> {
            self.check()?;
            let mut m = self.data.inflight.lock().unwrap();
            for r in ranges {
                m.insert((r.topic.clone(), r.partition), r.clone());
            }
            Ok(())
        }
    }
}
