//! `herald router`: NotificationRequested (and mapped upstream trigger events) in, one
//! ChannelDelivery per channel × address out, plus an outcome for everything that happened.
//!
//! Per record, in order: decode → category/template known → dedup (claim by source record) →
//! expiry → enrich (cached user + devices) → channels → preferences → throttle → quiet
//! hours (hold on the delay topic) → render → emit. Deliveries, outcomes, DLQ records and
//! consumer offsets go out in one Kafka transaction ([`crate::kafka::eos`]); outcomes are
//! also written to the notification log. Everything written to Cassandra is keyed so that
//! re-processing a record after a crash writes the same rows again.
//!
//! - [`policy`]: pure decisions (addresses, opt-in, expiry, quiet hours, ids).
//! - [`contacts`]: the bounded cache and its invalidation by the changes topic.
//! - [`triggers`]: mapping upstream domain events onto requests.

pub mod contacts;
pub mod policy;
pub mod triggers;

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;
use chrono::Utc;
use chrono_tz::Tz;
use futures::StreamExt;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError};
use crate::config::{Config, RouterConfig, TriggerConfig};
use crate::error::Classify;
use crate::kafka::eos::{self, BatchResult, Hold, Output, Processor, StageError, StageSettings};
use crate::model::{delivery_id, now_ms, ChannelDelivery, DeliveryOutcome, NotificationRequested, Priority};
use crate::render::RenderContext;
use crate::store::Store;
use crate::telemetry::events;
use crate::topology::Topology;
use crate::tracking::TrackingSettings;
use contacts::Contacts;
use policy::QuietHours;

/// Header on delay-topic records: when the hold ends (epoch ms, decimal).
pub const DUE_AT_HEADER: &str = "herald-due-at";
pub use crate::kafka::eos::{DLQ_REASON_HEADER, DLQ_SOURCE_HEADER};

/// Everything the router needs, shared by its stages.
pub struct Router {
    cfg: RouterConfig,
    store: Arc<Store>,
    codec: Arc<Codec>,
    contacts: Arc<Contacts>,
    reader: Schema,
    quiet: QuietHours,
    default_tz: Tz,
    tracking: TrackingSettings,
    topics: Topics,
    /// Trigger mapping by upstream topic name.
    triggers: HashMap<String, TriggerConfig>,
}

/// Topic names from the topology.
#[derive(Debug, Clone)]
pub struct Topics {
    pub requests: String,
    pub delay: String,
    pub delay_partitions: i32,
    pub dlq: String,
    pub outcomes: String,
    pub changes: String,
    pub delivery: HashMap<&'static str, String>,
}

impl Topics {
    pub fn from(topology: &Topology) -> Result<Topics, crate::topology::TopologyError> {
        let mut delivery = HashMap::new();
        for ch in ["apns", "fcm", "sms", "email"] {
            delivery.insert(ch, topology.name(&format!("delivery.{ch}"))?.to_string());
        }
        Ok(Topics {
            requests: topology.name("requests")?.to_string(),
            delay: topology.name("delay")?.to_string(),
            delay_partitions: topology.topic("delay")?.partitions,
            dlq: topology.name("dlq")?.to_string(),
            outcomes: topology.name("outcomes")?.to_string(),
            changes: topology.name("changes")?.to_string(),
            delivery,
        })
    }
}

/// The record being routed and where it came from.
struct Source<'a> {
    msg: &'a OwnedMessage,
    /// `topic:partition:offset`, the record's identity.
    id: String,
    released: bool,
}

/// What routing one record gave.
enum Routed {
    Done(Vec<Output>),
    /// Not due yet (delay topic): hold the partition at this record until the instant.
    NotDue(i64),
}

/// A record the router refuses: DLQ + outcome `rejected` (or `template_error`).
struct Reject {
    status: &'static str,
    reason: String,
}

impl Router {
    pub async fn open(config: &Config, topology: &Topology) -> anyhow::Result<Router> {
        let r = &config.router;
        let store = Arc::new(Store::open(&config.store).await?);
        let codec = Arc::new(Codec::new(&config.registry)?);
        let contacts = Arc::new(Contacts::new(store.clone(), r.cache_max_entries, r.cache_ttl));
        let mut triggers = HashMap::new();
        for t in &r.triggers {
            triggers.insert(topology.name(&t.topic)?.to_string(), t.clone());
        }
        Ok(Router {
            store,
            codec,
            contacts,
            reader: crate::schemas::schema("NotificationRequested")?,
            quiet: QuietHours::parse(&r.quiet_hours_start, &r.quiet_hours_end)
                .ok_or_else(|| anyhow::anyhow!("router quiet hours must be HH:MM"))?,
            default_tz: r.default_timezone.parse().map_err(|e| anyhow::anyhow!("router.default_timezone: {e}"))?,
            tracking: TrackingSettings {
                base_url: r.tracking_base_url.trim_end_matches('/').to_string(),
                secret: r.tracking_secret.expose().as_bytes().to_vec(),
            },
            topics: Topics::from(topology)?,
            triggers,
            cfg: r.clone(),
        })
    }

    pub fn contacts(&self) -> &Arc<Contacts> {
        &self.contacts
    }

    /// Routes one record; retryable failures (store, registry) fail the whole batch.
    async fn route(&self, src: &Source<'_>) -> Result<Routed, StageError> {
        let mut out = Vec::new();
        let mut log = Vec::new();
        let req = match self.decode(src).await {
            Ok(r) => r,
            Err(e) if e.is_retryable() => return Err(StageError::Retryable(e.to_string())),
            Err(e) => {
                let reject = Reject { status: "rejected", reason: e.to_string() };
                self.reject(src, None, reject, &mut out, &mut log).await?;
                return self.finish(out, log).await;
            }
        };
        if src.released {
            let due = header(src.msg, DUE_AT_HEADER).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            if due > now_ms() {
                return Ok(Routed::NotDue(due));
            }
        }
        match self.route_request(src, &req, &mut out, &mut log).await? {
            Ok(()) => {}
            Err(reject) => {
                out.clear();
                log.clear();
                self.reject(src, Some(&req), reject, &mut out, &mut log).await?;
            }
        }
        self.finish(out, log).await
    }

    async fn finish(&self, out: Vec<Output>, log: Vec<DeliveryOutcome>) -> Result<Routed, StageError> {
        self.store.log_outcomes(&log).await.map_err(StageError::classify)?;
        Ok(Routed::Done(out))
    }

    /// The pipeline after decoding. `Ok(Err(reject))` = refuse the record (DLQ).
    async fn route_request(
        &self,
        src: &Source<'_>,
        req: &NotificationRequested,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<Result<(), Reject>, StageError> {
        let reject = |reason: String| Ok(Err(Reject { status: "rejected", reason }));
        let Some(policy) = self.cfg.categories.get(&req.category) else {
            return reject(format!("unknown category '{}'", req.category));
        };
        let template = self.contacts.template(&req.template_id).await.map_err(StageError::classify)?;
        let Some(template) = template.as_ref() else {
            return reject(format!("unknown template '{}'", req.template_id));
        };
        let channels: Vec<String> = match &req.channels {
            Some(c) if !c.is_empty() => c.clone(),
            _ => template.meta.default_channels.clone(),
        };
        if let Some(bad) = channels.iter().find(|c| !policy::CHANNELS.contains(&c.as_str())) {
            return reject(format!("unknown channel '{bad}' (push, sms, email)"));
        }

        if !src.released {
            let (topic, partition, offset) = (src.msg.topic(), src.msg.partition(), src.msg.offset());
            let claim = if self.cfg.dedup_mode == "single_writer" {
                self.store.claim_event_single_writer(&req.event_id, topic, partition, offset, self.cfg.dedup_ttl).await
            } else {
                self.store.claim_event(&req.event_id, topic, partition, offset, self.cfg.dedup_ttl).await
            }
            .map_err(StageError::classify)?;
            let owner = format!("{}:{}:{}", claim.source_topic, claim.partition, claim.offset);
            // A replayed record (herald replay) stands for the record it copies.
            let me = header(src.msg, crate::replay::REPLAY_OF_HEADER).unwrap_or_else(|| src.id.clone());
            if owner != me {
                self.outcome(src, req, "duplicate", None, None, Some(format!("first seen at {owner}")), out, log).await?;
                return Ok(Ok(()));
            }
        }
        let now = now_ms();
        if policy::expired(req, policy, now) {
            self.outcome(src, req, "expired", None, None, None, out, log).await?;
            return Ok(Ok(()));
        }
        let contact = self.contacts.contact(&req.user_id).await.map_err(StageError::classify)?;
        let Some(contact) = contact.as_ref() else {
            self.outcome(src, req, "unknown_user", None, None, None, out, log).await?;
            return Ok(Ok(()));
        };
        let prefs = self.contacts.prefs(&req.user_id).await.map_err(StageError::classify)?;

        let mut plan = Vec::new();
        let mut seen = Vec::new();
        for ch in &channels {
            if seen.contains(&ch) {
                continue;
            }
            seen.push(ch);
            let addrs = policy::addresses(ch, &contact.user, &contact.devices, &contact.health);
            if addrs.is_empty() {
                self.outcome(src, req, "no_address", Some(ch), None, None, out, log).await?;
                continue;
            }
            if !policy::opted_in(&prefs, ch, &req.category, policy) {
                self.outcome(src, req, "opted_out", Some(ch), None, None, out, log).await?;
                continue;
            }
            if let (Some(limit), Some(window), false) = (policy.throttle_limit, policy.throttle_window, src.released) {
                let admitted = self
                    .store
                    .throttle_admit(&req.user_id, ch, &req.category, &req.event_id, limit, window)
                    .await
                    .map_err(StageError::classify)?;
                if !admitted {
                    let why = format!("more than {limit} {} per {}", req.category, crate::config::duration::format(&window));
                    self.outcome(src, req, "throttled", Some(ch), None, Some(why), out, log).await?;
                    continue;
                }
            }
            plan.push((ch.clone(), addrs));
        }
        if plan.is_empty() {
            return Ok(Ok(()));
        }

        let priority = policy::effective_priority(req.priority, policy);
        if !src.released && policy.quiet_hours && priority < Priority::High {
            let tz = policy::timezone(&contact.user, self.default_tz);
            if let Some(until) = self.quiet.hold_until(Utc::now(), tz) {
                let payload = self.codec.encode(&self.topics.delay, req).await.map_err(StageError::classify)?;
                out.push(Output {
                    topic: self.topics.delay.clone(),
                    partition: Some(policy::delay_partition(until, self.topics.delay_partitions)),
                    key: Some(req.user_id.clone().into_bytes()),
                    payload: Some(payload),
                    headers: vec![(DUE_AT_HEADER.into(), until.timestamp_millis().to_string().into_bytes())],
                });
                let why = format!("quiet hours in {tz} until {}", until.to_rfc3339());
                self.outcome(src, req, "held", None, None, Some(why), out, log).await?;
                return Ok(Ok(()));
            }
        }

        let compiled = match &template.compiled {
            Ok(c) => c,
            Err(e) => return Ok(Err(Reject { status: "template_error", reason: e.clone() })),
        };
        let locales: Vec<&str> = [req.locale.as_deref(), contact.user.locale.as_deref(), Some(self.cfg.default_locale.as_str())]
            .into_iter()
            .flatten()
            .collect();
        let deadline = req
            .expires_at
            .or_else(|| policy.max_age.map(|a| req.occurred_at + a.as_millis() as i64))
            .unwrap_or(now + 86_400_000);
        let mut deliveries = Vec::new();
        for (ch, addrs) in &plan {
            for a in addrs {
                let id = delivery_id(&req.event_id, a.delivery_channel, &a.address);
                let tracking = (ch == "email" && template.meta.tracking).then_some(&self.tracking);
                let ctx = RenderContext { delivery_id: &id, tracking };
                let rendered = match compiled.render(ch, &locales, &req.params, &ctx) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(Reject { status: "template_error", reason: format!("{ch}: {e}") })),
                };
                deliveries.push(ChannelDelivery {
                    delivery_id: id,
                    event_id: req.event_id.clone(),
                    user_id: req.user_id.clone(),
                    category: req.category.clone(),
                    template_id: req.template_id.clone(),
                    channel: a.delivery_channel.to_string(),
                    address: a.address.clone(),
                    device_id: a.device_id.clone(),
                    locale: rendered.locale,
                    priority,
                    content: rendered.content,
                    attempt: 0,
                    not_before: None,
                    deadline,
                    created_at: now,
                    last_error: None,
                });
            }
        }
        for d in &deliveries {
            let topic = &self.topics.delivery[d.channel.as_str()];
            let payload = self.codec.encode(topic, d).await.map_err(StageError::classify)?;
            out.push(Output {
                topic: topic.clone(),
                partition: None,
                key: Some(d.user_id.clone().into_bytes()),
                payload: Some(payload),
                headers: vec![("herald-priority".into(), format!("{:?}", d.priority).to_lowercase().into_bytes())],
            });
            self.outcome(src, req, "routed", Some(&d.channel), Some(&d.delivery_id), None, out, log).await?;
        }
        Ok(Ok(()))
    }

    /// Decodes a request, or maps an upstream trigger event onto one.
    async fn decode(&self, src: &Source<'_>) -> Result<NotificationRequested, CodecError> {
        match self.triggers.get(src.msg.topic()) {
            None => self.codec.decode(src.msg.payload(), &self.reader).await,
            Some(t) => {
                let value = self.codec.decode_value(src.msg.payload()).await?;
                let occurred_at = src.msg.timestamp().to_millis().unwrap_or_else(now_ms);
                triggers::map(t, src.msg.topic(), &value, occurred_at).map_err(CodecError::Poison)
            }
        }
    }

    /// Sends the original record to the DLQ with the reason, and emits the outcome.
    async fn reject(
        &self,
        src: &Source<'_>,
        req: Option<&NotificationRequested>,
        reject: Reject,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<(), StageError> {
        events::dead_lettered("router", reject.status, &reject.reason);
        out.push(Output::dead_letter(src.msg, &self.topics.dlq, format!("{}: {}", reject.status, reject.reason), &src.id));
        let placeholder;
        let req = match req {
            Some(r) => r,
            None => {
                placeholder = NotificationRequested {
                    event_id: format!("dlq:{}", src.id),
                    occurred_at: now_ms(),
                    source: src.msg.topic().to_string(),
                    user_id: String::new(),
                    category: String::new(),
                    template_id: String::new(),
                    params: HashMap::new(),
                    channels: None,
                    priority: Priority::Normal,
                    locale: None,
                    expires_at: None,
                };
                &placeholder
            }
        };
        self.outcome(src, req, reject.status, None, None, Some(reject.reason), out, log).await
    }

    /// Emits one outcome to the outcomes topic (and queues it for the notification log).
    #[allow(clippy::too_many_arguments)]
    async fn outcome(
        &self,
        src: &Source<'_>,
        req: &NotificationRequested,
        status: &str,
        channel: Option<&str>,
        delivery: Option<&str>,
        reason: Option<String>,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<(), StageError> {
        let known = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let o = DeliveryOutcome {
            outcome_id: policy::outcome_id(&src.id, &req.event_id, status, channel, delivery),
            event_id: req.event_id.clone(),
            delivery_id: delivery.map(str::to_string),
            user_id: known(&req.user_id),
            category: known(&req.category),
            channel: channel.map(str::to_string),
            provider: None,
            status: status.to_string(),
            reason,
            provider_message_id: None,
            attempt: 0,
            latency_ms: None,
            occurred_at: now_ms(),
            requested_at: Some(req.occurred_at),
        };
        let payload = self.codec.encode(&self.topics.outcomes, &o).await.map_err(StageError::classify)?;
        events::outcome(channel.unwrap_or("-"), "-", status);
        out.push(Output {
            topic: self.topics.outcomes.clone(),
            partition: None,
            key: Some(o.event_id.clone().into_bytes()),
            payload: Some(payload),
            headers: Vec::new(),
        });
        log.push(o);
        Ok(())
    }

    /// Routes a batch: records of one group (same key, or same partition for the delay
    /// topic) in order, groups concurrently; outputs in record order.
    async fn route_batch(&self, batch: &[OwnedMessage], released: bool) -> Result<BatchResult, StageError> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            let key = if released {
                format!("{}:{}", m.topic(), m.partition()).into_bytes()
            } else {
                m.key().map(<[u8]>::to_vec).unwrap_or_else(|| format!("#{i}").into_bytes())
            };
            match index.get(&key) {
                Some(&g) => groups[g].push(i),
                None => {
                    index.insert(key, groups.len());
                    groups.push(vec![i]);
                }
            }
        }
        let results: Vec<Result<(Vec<(usize, Vec<Output>)>, Option<Hold>), StageError>> = futures::stream::iter(groups)
            .map(|group| async move {
                let mut done = Vec::new();
                for i in group {
                    let msg = &batch[i];
                    let src = Source { msg, id: format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset()), released };
                    match self.route(&src).await? {
                        Routed::Done(out) => done.push((i, out)),
                        Routed::NotDue(until_ms) => {
                            let hold = Hold { topic: msg.topic().into(), partition: msg.partition(), offset: msg.offset(), until_ms };
                            return Ok((done, Some(hold)));
                        }
                    }
                }
                Ok((done, None))
            })
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        let mut all = Vec::new();
        let mut holds = Vec::new();
        for r in results {
            let (done, hold) = r?;
            all.extend(done);
            holds.extend(hold);
        }
        all.sort_by_key(|(i, _)| *i);
        Ok(BatchResult { outputs: all.into_iter().flat_map(|(_, o)| o).collect(), holds })
    }
}

fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The requests (and trigger topics) stage.
struct Requests(Arc<Router>);

impl Processor for Requests {
    async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        self.0.route_batch(batch, false).await
    }
}

/// The delay-topic stage: releases held requests when due.
struct Released(Arc<Router>);

impl Processor for Released {
    async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        self.0.route_batch(batch, true).await
    }
}

/// Runs the router role until `shutdown`: the requests stage, the delay stage and the
/// cache-invalidation follower.
pub async fn run(config: &Config, topology: &Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
    let router = Arc::new(Router::open(config, topology).await?);
    let k = &config.kafka;
    let r = &config.router;
    let mut topics = vec![router.topics.requests.clone()];
    topics.extend(router.triggers.keys().cloned());
    let settings = |role: &'static str, topics: Vec<String>| StageSettings {
        role,
        group_id: crate::kafka::group_id(k, role),
        topics,
        transactional_id: format!("{}-{role}-{}", k.group_prefix, r.instance_id),
        batch_max: r.batch_max,
        batch_wait: std::time::Duration::from_millis(r.batch_wait_ms),
        transaction_timeout: std::time::Duration::from_millis(r.transaction_timeout_ms),
    };
    let main = settings("router", topics);
    let delay = settings("router-delay", vec![router.topics.delay.clone()]);
    let follower = tokio::spawn({
        let (k, topic, contacts, stop) = (k.clone(), router.topics.changes.clone(), router.contacts.clone(), shutdown.clone());
        async move { contacts::follow_changes(&k, &topic, contacts, stop).await }
    });
    let requests = Requests(router.clone());
    let released = Released(router.clone());
    let result = tokio::try_join!(
        eos::run(k, &main, &requests, shutdown.clone()),
        eos::run(k, &delay, &released, shutdown.clone()),
    );
    shutdown.cancel();
    let _ = follower.await;
    result.map(|_| ()).map_err(Into::into)
}
