//! The dispatcher's commit protocol: what a batch of deliveries becomes, such that a
//! delivery the provider accepted is never sent again because the store or the broker
//! failed, and that costs the store a few requests per batch instead of five per delivery.
//!
//! Per batch (one Kafka transaction, see [`crate::kafka::eos`]):
//!
//! 1. **Remembered decisions first.** Every decision is kept in memory by record position
//!    (topic, partition, offset) until the transaction carrying it commits. A batch that
//!    is processed again (its transaction aborted, the store was slow, Kafka was away, a
//!    partition was held) gets the same decisions back: the same outcomes, the same retry
//!    records, and no provider call.
//! 2. **One read for the rest.** The sent-log (`deliveries_by_id`) is read for the whole
//!    batch with `IN` queries. A delivery found there was sent by an earlier process (a
//!    crash, a rebalance, a replay): its `sent` outcome is emitted again, nothing is sent.
//! 3. **In-flight ranges.** Before sending, the dispatcher records per partition the offsets
//!    it is about to send (one write per batch). A process that takes a partition over and
//!    finds another process's range there knows which deliveries may have reached the
//!    provider without a sent record: it sends them again and counts each once in
//!    `herald_dispatch_uncertain_resends_total`, an upper bound on duplicate sends.
//! 4. **Send.** The provider is chosen per delivery by [`Breakers::pick`]: the route's
//!    providers in order, after the one the previous attempt failed at, skipping open
//!    circuits. A transient failure, a throttle or refused credentials fail over at once
//!    to the next provider of the route (a record on the delivery topic) while it has
//!    providers not yet tried, and go to the retry levels after that. When every provider
//!    of the route is open, the partition is held at that record until the first probe is
//!    due: no attempt is spent, and nothing waits longer than the cool-down.
//! 5. **Group commit.** An accepted send is handed at once to the [`Writer`], which writes
//!    sent records (each also the delivery's `sent` log entry) and the batch's other log rows at most `write_interval_ms` after they were
//!    queued and retries until the store takes them. The batch's result is returned only
//!    when all its writes are durable (webhooks and tracking must find the delivery before
//!    its `sent` outcome is out); if that takes longer than `durable_wait_ms` the batch is
//!    rewound and processed again, from memory.
//!
//! So a delivery is sent twice only if the process dies after the provider accepted it and
//! before its sent record was written: within `write_interval_ms` plus one store write. A
//! store or broker failure alone never causes a re-send.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;

use super::breaker::{Breakers, Pick, Signal};
use super::limit::Limiter;
use super::plan::{self, Next};
use super::store::{DispatchStore, InflightRange, SentRecord, Write};
use super::writer::{Durable, Writer};
use crate::config::DispatchConfig;
use crate::kafka::eos::{Hold, StageError};
use crate::model::{now_ms, ChannelDelivery, DeliveryOutcome};
use crate::providers::{Classification, Clients, Provider, ProviderError};
use crate::router::policy::outcome_id;
use crate::telemetry::events;

/// A record's place in Kafka (`topic:partition:offset`, the source of outcome ids).
pub use crate::kafka::headers::Position as Pos;

/// One consumed record, decoded.
#[derive(Debug, Clone)]
pub enum Item {
    Delivery {
        pos: Pos,
        delivery: Box<ChannelDelivery>,
        retry_topic: bool,
    },
    /// A record that cannot be a delivery (it goes to the DLQ with the reason).
    Poison {
        pos: Pos,
        reason: String,
    },
}

impl Item {
    fn pos(&self) -> &Pos {
        match self {
            Item::Delivery { pos, .. } | Item::Poison { pos, .. } => pos,
        }
    }
}

/// Something a decision puts on Kafka (the stage encodes it). Most are outcomes, so the
/// outcome is not boxed.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Emit {
    Outcome(DeliveryOutcome),
    /// The delivery again: to retry level `level` (1-based), or for a failover (`0`) back to
    /// the delivery topic.
    Again {
        level: usize,
        delivery: Box<ChannelDelivery>,
    },
    /// The original record to the DLQ, with the reason.
    DeadLetter {
        reason: String,
    },
    /// Routers forget the user's cached contact data.
    ContactChanged {
        user_id: String,
    },
}

/// What became of one record, and the store writes it waits for.
#[derive(Clone)]
struct Decision {
    emits: Vec<Emit>,
    durable: Vec<Durable>,
}

/// The result of a batch: decisions in batch order, and partitions to hold.
#[derive(Debug, Default)]
pub struct Planned {
    pub decisions: Vec<(Pos, Vec<Emit>)>,
    pub holds: Vec<Hold>,
}

/// Sends one delivery through a provider (the seam to [`Clients`]).
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, p: Provider, d: &ChannelDelivery) -> impl Future<Output = Result<Classification, ProviderError>> + Send;
}

impl Deliver for Clients {
    async fn deliver(&self, p: Provider, d: &ChannelDelivery) -> Result<Classification, ProviderError> {
        Clients::deliver(self, p, d).await
    }
}

enum Step {
    Decided(Decision),
    /// Every provider of the route is open until then (epoch ms).
    Held {
        until_ms: i64,
    },
}

/// A channel's provider orders (`dispatch.routes`, `dispatch.category_routes`).
pub struct Routes {
    pub default: Vec<Provider>,
    pub by_category: HashMap<String, Vec<Provider>>,
}

impl Routes {
    pub fn of(channel: &str, cfg: &DispatchConfig) -> anyhow::Result<Routes> {
        let parse = |names: &[String]| -> anyhow::Result<Vec<Provider>> {
            names.iter().map(|n| n.parse::<Provider>().map_err(anyhow::Error::from)).collect()
        };
        let default = parse(cfg.routes.get(channel).map(Vec::as_slice).unwrap_or_default())?;
        let mut by_category = HashMap::new();
        for (category, by_channel) in &cfg.category_routes {
            if let Some(order) = by_channel.get(channel) {
                by_category.insert(category.clone(), parse(order)?);
            }
        }
        let routes = Routes { default, by_category };
        anyhow::ensure!(!routes.providers().is_empty(), "no providers configured for channel '{channel}' (dispatch.routes)");
        Ok(routes)
    }

    /// Every provider of any route, once.
    pub fn providers(&self) -> Vec<Provider> {
        let mut all: Vec<Provider> = self.default.iter().chain(self.by_category.values().flatten()).copied().collect();
        all.sort();
        all.dedup();
        all
    }
}

/// How long a remembered decision outlives a batch that never committed (its partition
/// went to another dispatcher).
const MEMO_TTL: Duration = Duration::from_secs(15 * 60);

/// One channel's dispatcher logic over a store and providers.
pub struct Engine<S, P> {
    channel: String,
    /// `dispatch-<channel>`, for metrics.
    role: String,
    cfg: DispatchConfig,
    routes: Routes,
    retry_delays: Vec<Duration>,
    store: Arc<S>,
    providers: P,
    writer: Writer,
    breakers: Breakers,
    limits: HashMap<Provider, Limiter>,
    memo: Mutex<HashMap<Pos, (Instant, Decision)>>,
    /// Per partition, the in-flight range another process left (first, last offset).
    foreign: Mutex<HashMap<(String, i32), (i64, i64)>>,
    /// This process, in in-flight ranges.
    owner: String,
    /// Deliveries sent again after another process had them in flight (also a metric).
    uncertain: AtomicU64,
}

impl<S: DispatchStore, P: Deliver> Engine<S, P> {
    /// `retry_delays`: the delay of each retry level, level 1 first.
    pub fn new(channel: &str, cfg: DispatchConfig, retry_delays: Vec<Duration>, store: Arc<S>, providers: P) -> anyhow::Result<Self> {
        let routes = Routes::of(channel, &cfg)?;
        let all = routes.providers();
        let limit = |p: &Provider| cfg.limits.get(p.name()).unwrap_or(&cfg.default_limit).clone();
        Ok(Engine {
            channel: channel.to_string(),
            role: format!("dispatch-{channel}"),
            breakers: Breakers::new(all.iter().copied(), cfg.breaker_failures, cfg.breaker_open_for, cfg.breaker_unhealthy_for),
            limits: all
                .iter()
                .map(|p| {
                    (*p, {
                        let l = limit(p);
                        Limiter::new(l.concurrency, l.rate_per_sec)
                    })
                })
                .collect(),
            writer: Writer::start(store.clone(), format!("dispatch-{channel}"), Duration::from_millis(cfg.write_interval_ms), cfg.write_max_rows),
            routes,
            retry_delays,
            store,
            providers,
            cfg,
            memo: Mutex::new(HashMap::new()),
            foreign: Mutex::new(HashMap::new()),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            uncertain: AtomicU64::new(0),
        })
    }

    /// Deliveries this process sent again that another had in flight without a sent record.
    pub fn uncertain_resends(&self) -> u64 {
        self.uncertain.load(Ordering::Relaxed)
    }

    /// Store writes queued and not yet durable.
    pub fn pending_writes(&self) -> usize {
        self.writer.pending()
    }

    fn route(&self, category: &str) -> &[Provider] {
        self.routes.by_category.get(category).unwrap_or(&self.routes.default)
    }

    /// Decides a batch (in consumption order). See the module docs for the protocol.
    pub async fn process(&self, items: Vec<Item>) -> Result<Planned, StageError> {
        let now = now_ms();
        let mut holds: HashMap<(String, i32), Hold> = HashMap::new();
        // In batch order: a record's decision, or `None` while it is still to be decided.
        let mut slots: Vec<(Pos, Option<Decision>)> = Vec::new();
        let mut work: Vec<(usize, Pos, ChannelDelivery)> = Vec::new();
        {
            let mut memo = self.memo.lock().unwrap();
            memo.retain(|_, (at, _)| at.elapsed() < MEMO_TTL);
            for item in items {
                let key = (item.pos().topic.clone(), item.pos().partition);
                if holds.contains_key(&key) {
                    continue; // behind a held record: not decided, not committed
                }
                if let Some((_, d)) = memo.get(item.pos()) {
                    slots.push((item.pos().clone(), Some(d.clone())));
                    continue;
                }
                match item {
                    Item::Poison { pos, reason } => {
                        let d = self.poison(&pos, &reason);
                        memo.insert(pos.clone(), (Instant::now(), d.clone()));
                        slots.push((pos, Some(d)));
                    }
                    Item::Delivery { pos, delivery, retry_topic } => {
                        let due = delivery.not_before.unwrap_or(0);
                        if retry_topic && due > now {
                            holds.insert(key, Hold { topic: pos.topic.clone(), partition: pos.partition, offset: pos.offset, until_ms: due });
                            continue;
                        }
                        work.push((slots.len(), pos.clone(), *delivery));
                        slots.push((pos, None));
                    }
                }
            }
        }
        if !work.is_empty() {
            let ids: Vec<&str> = work.iter().map(|(_, _, d)| d.delivery_id.as_str()).collect();
            let read = async {
                let (found, ()) = tokio::try_join!(self.store.sent_of(&ids), self.read_foreign_ranges(&work))?;
                self.store.put_inflight(&self.ranges(&work, &found)).await?;
                Ok::<_, crate::store::StoreError>(found)
            };
            let found = match read.await {
                Ok(found) => {
                    events::waiting(&self.role, "store", false);
                    found
                }
                // Nothing sent yet: the batch is tried again once the store answers.
                Err(e) => {
                    events::waiting(&self.role, "store", true);
                    return Err(StageError::Retryable(format!("the store: {e}")));
                }
            };
            let foreign = self.foreign.lock().unwrap().clone();
            let uncertain =
                |pos: &Pos| foreign.get(&(pos.topic.clone(), pos.partition)).is_some_and(|(first, last)| (*first..=*last).contains(&pos.offset));
            // Higher priority first; the stable sort keeps offset order within a priority.
            let mut order: Vec<usize> = (0..work.len()).collect();
            order.sort_by_key(|i| Reverse(work[*i].2.priority));
            let work = &work;
            let steps: Vec<(usize, Step)> = futures::stream::iter(order)
                .map(|i| {
                    let (_, pos, d) = &work[i];
                    let (found, uncertain) = (found.get(&d.delivery_id), uncertain(pos));
                    async move { (i, self.decide(pos, d, found, uncertain).await) }
                })
                .buffer_unordered(self.cfg.concurrency.max(1))
                .collect()
                .await;
            let mut memo = self.memo.lock().unwrap();
            for (i, step) in steps {
                let (slot, pos, _) = &work[i];
                match step {
                    Step::Decided(d) => {
                        memo.insert(pos.clone(), (Instant::now(), d.clone()));
                        slots[*slot].1 = Some(d);
                    }
                    Step::Held { until_ms } => {
                        let h = holds.entry((pos.topic.clone(), pos.partition)).or_insert(Hold {
                            topic: pos.topic.clone(),
                            partition: pos.partition,
                            offset: pos.offset,
                            until_ms,
                        });
                        if pos.offset < h.offset {
                            h.offset = pos.offset;
                        }
                    }
                }
            }
        }
        // Records at or after a partition's hold are read again when it resumes; their
        // decisions (if any) are remembered, not emitted now.
        let mut planned = Planned::default();
        let mut durable: Vec<Durable> = Vec::new();
        for (pos, decision) in slots {
            let Some(decision) = decision else { continue };
            if holds.get(&(pos.topic.clone(), pos.partition)).is_some_and(|h| pos.offset >= h.offset) {
                continue;
            }
            durable.extend(decision.durable);
            planned.decisions.push((pos, decision.emits));
        }
        let wait = Duration::from_millis(self.cfg.durable_wait_ms);
        if tokio::time::timeout(wait, futures::future::join_all(durable)).await.is_err() {
            return Err(StageError::Retryable(format!(
                "store writes not durable within {wait:?} ({} waiting); the batch is tried again from memory",
                self.writer.pending()
            )));
        }
        planned.holds = holds.into_values().collect();
        Ok(planned)
    }

    /// The transaction carrying these records committed: forget their decisions.
    pub fn committed<'a>(&self, positions: impl IntoIterator<Item = &'a Pos>) {
        let mut memo = self.memo.lock().unwrap();
        for p in positions {
            memo.remove(p);
        }
    }

    /// Reads the in-flight ranges of the work's partitions; keeps those of other processes.
    async fn read_foreign_ranges(&self, work: &[(usize, Pos, ChannelDelivery)]) -> Result<(), crate::store::StoreError> {
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (_, pos, _) in work {
            let ps = by_topic.entry(pos.topic.as_str()).or_default();
            if !ps.contains(&pos.partition) {
                ps.push(pos.partition);
            }
        }
        for (topic, partitions) in by_topic {
            let ranges = self.store.inflight_of(topic, &partitions).await?;
            let mut foreign = self.foreign.lock().unwrap();
            for r in ranges.into_iter().filter(|r| r.owner != self.owner) {
                tracing::info!(topic = %r.topic, partition = r.partition, first = r.first_offset, last = r.last_offset, "partition taken over with deliveries another dispatcher had in flight");
                foreign.insert((r.topic, r.partition), (r.first_offset, r.last_offset));
            }
        }
        Ok(())
    }

    /// This batch's in-flight range per partition: the offsets of deliveries to send. The
    /// row is one per partition, so while a range inherited from a stopped process reaches
    /// past this batch, it is written as the union of the two: a process that stops before
    /// getting to the rest of the inherited range leaves it recorded for the next one.
    fn ranges(&self, work: &[(usize, Pos, ChannelDelivery)], found: &HashMap<String, SentRecord>) -> Vec<InflightRange> {
        let mut by_partition: HashMap<(&str, i32), (i64, i64)> = HashMap::new();
        for (_, pos, _) in work.iter().filter(|(_, _, d)| !found.contains_key(&d.delivery_id)) {
            let r = by_partition.entry((pos.topic.as_str(), pos.partition)).or_insert((pos.offset, pos.offset));
            r.0 = r.0.min(pos.offset);
            r.1 = r.1.max(pos.offset);
        }
        let foreign = self.foreign.lock().unwrap();
        for ((topic, partition), r) in by_partition.iter_mut() {
            if let Some((first, last)) = foreign.get(&(topic.to_string(), *partition)) {
                if *last > r.1 {
                    r.0 = r.0.min(*first);
                    r.1 = *last;
                }
            }
        }
        drop(foreign);
        by_partition
            .into_iter()
            .map(|((topic, partition), (first_offset, last_offset))| InflightRange {
                topic: topic.to_string(),
                partition,
                owner: self.owner.clone(),
                first_offset,
                last_offset,
            })
            .collect()
    }

    /// Decides one delivery: already sent, expired, held, or sent now and what followed.
    async fn decide(&self, pos: &Pos, d: &ChannelDelivery, found: Option<&SentRecord>, uncertain: bool) -> Step {
        let mut out = Decision { emits: Vec::new(), durable: Vec::new() };
        if let Some(s) = found {
            // Sent before (by a process that stopped, or a replay): say so again, send nothing.
            // (Its log entry is the sent-log row itself.)
            let mut o = self.outcome(pos, d, "sent");
            (o.provider, o.provider_message_id, o.latency_ms, o.attempt, o.occurred_at) =
                (Some(s.provider.clone()), Some(s.provider_message_id.clone()), s.latency_ms, s.attempt, s.sent_at);
            if !s.outcome_id.is_empty() {
                o.outcome_id = s.outcome_id.clone();
            }
            self.announce(o, &mut out);
            return Step::Decided(out);
        }
        if d.deadline <= now_ms() {
            self.emit(self.outcome(pos, d, "expired"), &mut out);
            return Step::Decided(out);
        }
        let route = self.route(&d.category);
        let last = d.last_provider.as_deref().and_then(|p| p.parse::<Provider>().ok());
        let provider = loop {
            match self.breakers.pick(route, last, Instant::now()) {
                Pick::Go(p) => break p,
                Pick::WaitForProbe => self.breakers.changed(Duration::from_millis(500)).await,
                Pick::AllOpen { until } => {
                    return Step::Held { until_ms: now_ms() + until.saturating_duration_since(Instant::now()).as_millis() as i64 };
                }
            }
        };
        if uncertain {
            self.uncertain.fetch_add(1, Ordering::Relaxed);
            events::uncertain_resend(&self.channel, provider.name());
            tracing::warn!(delivery_id = %d.delivery_id, source = %pos.to_string(), "in flight at a dispatcher that stopped, no sent record: sending again");
        }
        let started = Instant::now();
        let answer = {
            let _permit = self.limits[&provider].acquire().await;
            self.providers.deliver(provider, d).await
        };
        let latency = started.elapsed().as_millis() as i64;
        let class = answer.unwrap_or_else(|e| e.classification());
        events::provider_call(provider.name(), class.label(), started.elapsed().as_secs_f64());
        let signal = match &class {
            Classification::Transient { .. } | Classification::Throttled { .. } => Signal::Failing,
            Classification::AuthFailed { reason } | Classification::Reauth { reason } => {
                events::provider_refused(provider.name(), reason);
                Signal::Unhealthy
            }
            _ => Signal::Healthy,
        };
        if let Some(state) = self.breakers.record(provider, signal, Instant::now()) {
            events::breaker(provider.name(), state);
        }
        // Fail over at once while the delivery has providers it has not tried yet.
        let failover = if (d.attempt.max(0) as usize) + 1 < route.len() { self.breakers.other_closed(route, provider) } else { None };
        let jitter = if self.cfg.jitter > 0.0 { rand::rng().random_range(-self.cfg.jitter..=self.cfg.jitter) } else { 0.0 };
        let with_provider = |mut o: DeliveryOutcome| {
            (o.provider, o.latency_ms) = (Some(provider.name().to_string()), Some(latency));
            o
        };
        match plan::next(&class, d.attempt, &self.retry_delays, jitter, failover) {
            Next::Sent { message_id } => {
                let mut o = with_provider(self.outcome(pos, d, "sent"));
                let sent = SentRecord {
                    delivery_id: d.delivery_id.clone(),
                    event_id: d.event_id.clone(),
                    user_id: d.user_id.clone(),
                    channel: d.channel.clone(),
                    category: d.category.clone(),
                    provider: provider.name().to_string(),
                    provider_message_id: message_id.clone(),
                    attempt: d.attempt,
                    latency_ms: Some(latency),
                    sent_at: o.occurred_at,
                    outcome_id: o.outcome_id.clone(),
                };
                o.provider_message_id = Some(message_id);
                // The sent-log row is also the `sent` entry of the notification log.
                out.durable.push(self.writer.put(Write::Sent(sent)));
                self.announce(o, &mut out);
            }
            Next::Deactivate { reason } => {
                let w = match (d.channel.as_str(), &d.device_id) {
                    ("apns" | "fcm", Some(device)) => Some(Write::DeviceInactive { user_id: d.user_id.clone(), device_id: device.clone() }),
                    (ch @ ("sms" | "email"), _) => Some(Write::ContactInactive { user_id: d.user_id.clone(), channel: ch.to_string() }),
                    _ => None,
                };
                if let Some(w) = w {
                    out.durable.push(self.writer.put(w));
                }
                out.emits.push(Emit::ContactChanged { user_id: d.user_id.clone() });
                let mut o = with_provider(self.outcome(pos, d, "invalid_address"));
                o.reason = Some(reason);
                self.emit(o, &mut out);
            }
            Next::Failover { to, reason } => {
                out.emits.push(Emit::Again { level: 0, delivery: Box::new(self.again(d, provider, &reason, None)) });
                let mut o = with_provider(self.outcome(pos, d, "retry_scheduled"));
                o.reason = Some(format!("{provider}: {reason}; failing over to {to} now"));
                self.emit(o, &mut out);
            }
            Next::Retry { level, delay, reason } => {
                out.emits
                    .push(Emit::Again { level, delivery: Box::new(self.again(d, provider, &reason, Some(now_ms() + delay.as_millis() as i64))) });
                let mut o = with_provider(self.outcome(pos, d, "retry_scheduled"));
                o.reason = Some(format!("{provider}: {reason}; retry {level} in {:.0} s", delay.as_secs_f64()));
                self.emit(o, &mut out);
            }
            Next::DeadLetter { reason } => {
                let reason = format!("{provider}: {reason}");
                events::dead_lettered("dispatch", "dead_lettered", &reason);
                out.emits.push(Emit::DeadLetter { reason: format!("dead_lettered: {reason}") });
                let mut o = self.outcome(pos, d, "dead_lettered");
                o.reason = Some(reason);
                self.emit(o, &mut out);
            }
            Next::Fail { reason } => {
                let mut o = with_provider(self.outcome(pos, d, "failed"));
                o.reason = Some(reason);
                self.emit(o, &mut out);
            }
        }
        Step::Decided(out)
    }

    /// The delivery's next attempt after a failure at `provider`.
    fn again(&self, d: &ChannelDelivery, provider: Provider, reason: &str, not_before: Option<i64>) -> ChannelDelivery {
        let mut again = d.clone();
        again.attempt += 1;
        again.not_before = not_before;
        again.last_error = Some(reason.to_string());
        again.last_provider = Some(provider.name().to_string());
        again
    }

    /// A record that is no delivery: to the DLQ, outcome `rejected`, an alert.
    fn poison(&self, pos: &Pos, reason: &str) -> Decision {
        events::dead_lettered("dispatch", "rejected", reason);
        let source = pos.to_string();
        let o = DeliveryOutcome {
            outcome_id: outcome_id(&source, "", "rejected", Some(&self.channel), None),
            event_id: format!("dlq:{source}"),
            delivery_id: None,
            user_id: None,
            category: None,
            channel: Some(self.channel.clone()),
            provider: None,
            status: "rejected".into(),
            reason: Some(reason.to_string()),
            provider_message_id: None,
            attempt: 0,
            latency_ms: None,
            occurred_at: now_ms(),
            requested_at: None,
        };
        let mut out = Decision { emits: vec![Emit::DeadLetter { reason: format!("rejected: {reason}") }], durable: Vec::new() };
        self.emit(o, &mut out);
        out
    }

    /// An outcome of `d` (provider, reason and latency left for the caller to set).
    fn outcome(&self, pos: &Pos, d: &ChannelDelivery, status: &str) -> DeliveryOutcome {
        DeliveryOutcome {
            outcome_id: outcome_id(&pos.to_string(), &d.event_id, status, Some(&d.channel), Some(&d.delivery_id)),
            event_id: d.event_id.clone(),
            delivery_id: Some(d.delivery_id.clone()),
            user_id: Some(d.user_id.clone()),
            category: Some(d.category.clone()),
            channel: Some(d.channel.clone()),
            provider: None,
            status: status.to_string(),
            reason: None,
            provider_message_id: None,
            attempt: d.attempt,
            latency_ms: None,
            occurred_at: now_ms(),
            requested_at: None,
        }
    }

    /// Emits an outcome: on Kafka, in the notification log (through the writer), counted.
    fn emit(&self, o: DeliveryOutcome, out: &mut Decision) {
        out.durable.push(self.writer.put(Write::Log(o.clone())));
        self.announce(o, out);
    }

    /// An outcome on Kafka and in the metrics, whose log entry is written otherwise.
    fn announce(&self, o: DeliveryOutcome, out: &mut Decision) {
        events::outcome(o.channel.as_deref().unwrap_or("-"), o.provider.as_deref().unwrap_or("-"), &o.status);
        out.emits.push(Emit::Outcome(o));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::dispatch::store::memory::MemoryStore;
    use crate::model::{Priority, RenderedContent};

    /// Providers that answer as told: a queue of answers per provider, then `Sent`.
    #[derive(Default)]
    struct FakeProviders {
        answers: Mutex<HashMap<Provider, VecDeque<Classification>>>,
        always: Mutex<HashMap<Provider, Classification>>,
        calls: Mutex<Vec<(Provider, String)>>,
    }

    impl FakeProviders {
        fn always(&self, p: Provider, c: Option<Classification>) {
            let mut a = self.always.lock().unwrap();
            match c {
                Some(c) => a.insert(p, c),
                None => a.remove(&p),
            };
        }
        fn calls(&self, p: Provider) -> usize {
            self.calls.lock().unwrap().iter().filter(|(x, _)| *x == p).count()
        }
        fn total(&self) -> usize {
            self.calls.lock().unwrap().len()
        }
    }

    impl Deliver for Arc<FakeProviders> {
        async fn deliver(&self, p: Provider, d: &ChannelDelivery) -> Result<Classification, ProviderError> {
            self.calls.lock().unwrap().push((p, d.delivery_id.clone()));
            if let Some(c) = self.answers.lock().unwrap().get_mut(&p).and_then(VecDeque::pop_front) {
                return Ok(c);
            }
            if let Some(c) = self.always.lock().unwrap().get(&p) {
                return Ok(c.clone());
            }
            Ok(Classification::Sent { message_id: format!("{p}-{}", d.delivery_id) })
        }
    }

    fn cfg() -> DispatchConfig {
        DispatchConfig {
            jitter: 0.0,
            breaker_failures: 1,
            breaker_open_for: Duration::from_millis(300),
            breaker_unhealthy_for: Duration::from_secs(60),
            write_interval_ms: 2,
            durable_wait_ms: 300,
            ..DispatchConfig::default()
        }
    }

    const LEVELS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(3)];

    fn engine_on(store: Arc<MemoryStore>, providers: &Arc<FakeProviders>, channel: &str) -> Engine<MemoryStore, Arc<FakeProviders>> {
        Engine::new(channel, cfg(), LEVELS.to_vec(), store, providers.clone()).unwrap()
    }

    fn delivery(channel: &str, i: usize) -> ChannelDelivery {
        ChannelDelivery {
            delivery_id: format!("d{i}"),
            event_id: format!("e{i}"),
            user_id: format!("u{i}"),
            category: "billing".into(),
            template_id: "t".into(),
            channel: channel.into(),
            address: format!("a{i}"),
            device_id: None,
            locale: "en".into(),
            priority: Priority::Normal,
            content: RenderedContent::default(),
            attempt: 0,
            not_before: None,
            deadline: now_ms() + 3_600_000,
            created_at: now_ms(),
            last_error: None,
            last_provider: None,
        }
    }

    fn items(channel: &str, range: std::ops::Range<usize>) -> Vec<Item> {
        range
            .map(|i| Item::Delivery {
                pos: Pos { topic: format!("delivery.{channel}"), partition: 0, offset: i as i64 },
                delivery: Box::new(delivery(channel, i)),
                retry_topic: false,
            })
            .collect()
    }

    fn outcomes(p: &Planned) -> Vec<DeliveryOutcome> {
        p.decisions
            .iter()
            .flat_map(|(_, es)| es.iter())
            .filter_map(|e| match e {
                Emit::Outcome(o) => Some(o.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn an_accepted_send_is_not_sent_again_when_its_store_write_fails() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let e = engine_on(store.clone(), &providers, "email");
        store.set_writes_down(true);
        // Sent, but the sent records cannot be written: the batch fails (to be rewound)...
        assert!(matches!(e.process(items("email", 0..5)).await, Err(StageError::Retryable(_))));
        assert_eq!(providers.total(), 5);
        // ...and again, from memory, without calling the provider...
        assert!(e.process(items("email", 0..5)).await.is_err());
        assert_eq!(providers.total(), 5, "a rewound batch re-sends nothing");
        // ...until the store takes the writes.
        store.set_writes_down(false);
        let done = e.process(items("email", 0..5)).await.unwrap();
        assert_eq!(providers.total(), 5);
        let sent = outcomes(&done);
        assert_eq!(sent.len(), 5);
        assert!(sent.iter().all(|o| o.status == "sent"));
        assert_eq!(store.data.sent.lock().unwrap().len(), 5, "sent records durable");
        // An aborted transaction (the same batch again, not committed): the same outcomes.
        let again = e.process(items("email", 0..5)).await.unwrap();
        assert_eq!(outcomes(&again), sent);
        assert_eq!(providers.total(), 5);
        // Half-written groups are written again.
        store.fail_writes(2);
        e.committed(done.decisions.iter().map(|(p, _)| p));
        let next = e.process(items("email", 5..10)).await.unwrap();
        assert_eq!(outcomes(&next).len(), 5);
        assert_eq!(store.data.sent.lock().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn nothing_is_sent_while_the_store_cannot_be_read() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let e = engine_on(store.clone(), &providers, "email");
        store.set_down(true);
        assert!(matches!(e.process(items("email", 0..3)).await, Err(StageError::Retryable(_))));
        assert_eq!(providers.total(), 0);
        store.set_down(false);
        assert_eq!(outcomes(&e.process(items("email", 0..3)).await.unwrap()).len(), 3);
    }

    #[tokio::test]
    async fn another_process_finds_what_was_sent_and_resends_only_the_unrecorded() {
        let (data, providers) = (MemoryStore::default(), Arc::new(FakeProviders::default()));
        // Process A: d0-d4 sent and recorded.
        let a = engine_on(Arc::new(data.handle()), &providers, "email");
        let first = a.process(items("email", 0..5)).await.unwrap();
        // A sends d5-d9, then loses the store and dies before their records are written.
        let a_store = Arc::new(data.handle());
        let a2 = engine_on(a_store.clone(), &providers, "email");
        a_store.set_writes_down(true);
        assert!(a2.process(items("email", 5..10)).await.is_err());
        assert_eq!(providers.total(), 10);
        drop((a, a2));
        // Process B takes the partition over from the committed offset 0.
        let b = engine_on(Arc::new(data.handle()), &providers, "email");
        let planned = b.process(items("email", 0..10)).await.unwrap();
        assert_eq!(providers.total(), 15, "d0-d4 not sent again; d5-d9 (no sent record) are");
        assert_eq!(b.uncertain_resends(), 5, "each re-send counted once: A had them in flight");
        let os = outcomes(&planned);
        assert_eq!(os.len(), 10);
        assert_eq!(&os[..5], &outcomes(&first)[..], "the same sent outcomes (ids, times) as A's");
        // B processing the same records again (its transaction aborted) counts nothing more.
        b.process(items("email", 0..10)).await.unwrap();
        assert_eq!((providers.total(), b.uncertain_resends()), (15, 5));
    }

    /// A taker-over that dies after sending only part of the range it inherited must leave
    /// the rest of that range recorded: the next one counts those re-sends too.
    #[tokio::test]
    async fn an_inherited_range_survives_a_second_takeover() {
        let (data, providers) = (MemoryStore::default(), Arc::new(FakeProviders::default()));
        // A sends d0-d9 and dies before any sent record is written.
        let a_store = Arc::new(data.handle());
        let a = engine_on(a_store.clone(), &providers, "email");
        a_store.set_writes_down(true);
        assert!(a.process(items("email", 0..10)).await.is_err());
        drop(a);
        // B takes over and gets only d0-d4 in its first batch: re-sent (counted) and recorded.
        let b = engine_on(Arc::new(data.handle()), &providers, "email");
        b.process(items("email", 0..5)).await.unwrap();
        assert_eq!((providers.total(), b.uncertain_resends()), (15, 5));
        drop(b);
        // C takes over from the committed offset 0: d0-d4 are recorded, d5-d9 are not, and A
        // may have sent them: still uncertain, and counted.
        let c = engine_on(Arc::new(data.handle()), &providers, "email");
        c.process(items("email", 0..10)).await.unwrap();
        assert_eq!(providers.total(), 20, "d5-d9 sent again, d0-d4 not");
        assert_eq!(c.uncertain_resends(), 5, "A's range was kept when B wrote its own");
    }

    #[tokio::test]
    async fn a_failing_provider_fails_over_to_the_next_at_once() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let e = engine_on(store.clone(), &providers, "sms");
        providers.always(Provider::Twilio, Some(Classification::Transient { reason: "HTTP 500".into() }));
        let planned = e.process(items("sms", 0..1)).await.unwrap();
        let again = planned.decisions[0].1.iter().find_map(|x| match x {
            Emit::Again { level, delivery } => Some((*level, (**delivery).clone())),
            _ => None,
        });
        let (level, next) = again.expect("another attempt");
        assert_eq!((level, next.attempt, next.last_provider.as_deref(), next.not_before), (0, 1, Some("twilio"), None), "now, on the delivery topic");
        let retry = &outcomes(&planned)[0];
        assert!(retry.status == "retry_scheduled" && retry.reason.as_deref().unwrap().contains("failing over to vonage"), "{retry:?}");
        // The next attempt goes to Vonage.
        let planned = e
            .process(vec![Item::Delivery {
                pos: Pos { topic: "delivery.sms".into(), partition: 0, offset: 1 },
                delivery: Box::new(next),
                retry_topic: false,
            }])
            .await
            .unwrap();
        let sent = &outcomes(&planned)[0];
        assert_eq!((sent.status.as_str(), sent.provider.as_deref(), sent.attempt), ("sent", Some("vonage"), 1));
        assert_eq!((providers.calls(Provider::Twilio), providers.calls(Provider::Vonage)), (1, 1));
        // Twilio's circuit is open (one failure here): new deliveries go to Vonage directly.
        e.process(items("sms", 10..13)).await.unwrap();
        assert_eq!((providers.calls(Provider::Twilio), providers.calls(Provider::Vonage)), (1, 4));
    }

    #[tokio::test]
    async fn refused_credentials_take_a_provider_out_of_rotation() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let mut c = cfg();
        c.breaker_failures = 100; // an auth failure opens the circuit by itself
        let e = Engine::new("sms", c, LEVELS.to_vec(), store, providers.clone()).unwrap();
        providers.always(Provider::Twilio, Some(Classification::AuthFailed { reason: "Twilio 401 20003".into() }));
        let planned = e.process(items("sms", 0..1)).await.unwrap();
        assert!(planned.decisions[0].1.iter().any(|x| matches!(x, Emit::Again { level: 0, .. })), "failed over");
        e.process(items("sms", 1..6)).await.unwrap();
        assert_eq!((providers.calls(Provider::Twilio), providers.calls(Provider::Vonage)), (1, 5));
    }

    #[tokio::test]
    async fn while_every_provider_is_open_the_partition_is_held_and_no_attempt_spent() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let e = engine_on(store, &providers, "apns");
        providers.always(Provider::Apns, Some(Classification::Transient { reason: "503".into() }));
        let first = e.process(items("apns", 0..1)).await.unwrap();
        assert!(first.decisions[0].1.iter().any(|x| matches!(x, Emit::Again { level: 1, .. })), "the only provider: a retry level");
        e.committed(first.decisions.iter().map(|(p, _)| p));
        // The circuit is open: the next records are held, nothing is called or emitted.
        let started = now_ms();
        let held = e.process(items("apns", 1..4)).await.unwrap();
        assert!(held.decisions.is_empty());
        assert_eq!(held.holds.len(), 1);
        let h = &held.holds[0];
        assert_eq!(h.offset, 1, "held at the first undecided record");
        assert!(h.until_ms > started && h.until_ms <= started + 400, "until the probe is due: {}", h.until_ms - started);
        assert_eq!(providers.total(), 1);
        // The provider recovers; when the probe is due, everything goes.
        providers.always(Provider::Apns, None);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let resumed = e.process(items("apns", 1..4)).await.unwrap();
        assert!(resumed.holds.is_empty());
        assert!(outcomes(&resumed).iter().all(|o| o.status == "sent" && o.attempt == 0), "no attempt was spent while held");
        assert_eq!(providers.total(), 4);
    }

    #[tokio::test]
    async fn records_after_a_hold_are_remembered_not_emitted() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let mut c = cfg();
        c.concurrency = 1;
        let e = Engine::new("apns", c, LEVELS.to_vec(), store, providers.clone()).unwrap();
        // d2 is high priority, so it is decided first; its failure opens the circuit, and d0
        // and d1 find every provider open.
        let mut batch = items("apns", 0..3);
        if let Item::Delivery { delivery, .. } = &mut batch[2] {
            delivery.priority = Priority::High;
        }
        providers.answers.lock().unwrap().insert(Provider::Apns, VecDeque::from([Classification::Transient { reason: "503".into() }]));
        let planned = e.process(batch.clone()).await.unwrap();
        // d2 (offset 2) was decided first and failed; d0 and d1 found the circuit open.
        assert_eq!(planned.holds.len(), 1);
        assert_eq!(planned.holds[0].offset, 0);
        assert!(planned.decisions.is_empty(), "offset 2 is after the hold: not emitted now");
        assert_eq!(providers.total(), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let resumed = e.process(batch).await.unwrap();
        let os = outcomes(&resumed);
        assert_eq!(os.iter().filter(|o| o.status == "sent").count(), 2);
        assert_eq!(os.iter().filter(|o| o.status == "retry_scheduled").count(), 1, "d2's remembered decision");
        assert_eq!(providers.total(), 3, "d2 was not attempted again");
    }

    #[tokio::test]
    async fn due_and_undue_retries_and_poison() {
        let (store, providers) = (Arc::new(MemoryStore::default()), Arc::new(FakeProviders::default()));
        let e = engine_on(store.clone(), &providers, "email");
        let mut later = delivery("email", 1);
        later.not_before = Some(now_ms() + 60_000);
        let batch = vec![
            Item::Poison { pos: Pos { topic: "retry.email.1".into(), partition: 1, offset: 7 }, reason: "undecodable record: bad magic byte".into() },
            Item::Delivery { pos: Pos { topic: "retry.email.1".into(), partition: 0, offset: 3 }, delivery: Box::new(later), retry_topic: true },
            Item::Delivery {
                pos: Pos { topic: "retry.email.1".into(), partition: 0, offset: 4 },
                delivery: Box::new(delivery("email", 2)),
                retry_topic: true,
            },
        ];
        let planned = e.process(batch).await.unwrap();
        assert_eq!(planned.holds.len(), 1);
        assert_eq!((planned.holds[0].partition, planned.holds[0].offset), (0, 3));
        assert_eq!(planned.decisions.len(), 1, "only the poison record");
        assert!(planned.decisions[0].1.iter().any(|x| matches!(x, Emit::DeadLetter { reason } if reason.starts_with("rejected: undecodable"))));
        assert_eq!(providers.total(), 0);
        assert_eq!(store.data.log.lock().unwrap().len(), 1, "its outcome is logged");
    }
}
