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
//! The store is used per batch, not per record: every record is staged (decoded, checked),
//! then the batch's dedup claims, contacts and throttle hits are read in one go (`IN` reads,
//! concurrent cache loads), the records are decided in order against that state (so records
//! of one batch see each other's claims and throttle hits), and the resulting writes (claims,
//! throttle hits, the notification log) are flushed in unlogged batches before the Kafka
//! transaction commits.
//!
//! - [`policy`]: pure decisions (addresses, opt-in, expiry, quiet hours, ids).
//! - [`contacts`]: the bounded cache and its invalidation by the changes topic.
//! - [`triggers`]: mapping upstream domain events onto requests.

pub mod contacts;
pub mod policy;
pub mod triggers;

use std::collections::{HashMap, HashSet};

use foldhash::{HashMap as FastMap, HashMapExt, HashSet as FastSet, HashSetExt};
use std::sync::Arc;

use apache_avro::Schema;
use chrono::Utc;
use chrono_tz::Tz;
use futures::{StreamExt, TryStreamExt};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError};
use crate::config::{Config, RouterConfig, TriggerConfig};
use crate::error::Classify;
use crate::kafka::eos::{self, BatchResult, Hold, Output, Processor, StageError, StageSettings};
use crate::kafka::headers::{self, Position};
use crate::model::{delivery_id, now_ms, ChannelDelivery, DeliveryOutcome, NotificationRequested, Priority};
use crate::render::RenderContext;
use crate::store::{DedupClaim, NewThrottleHit, Store, ThrottleHit};
use crate::telemetry::events;
use crate::topology::Topology;
use crate::tracking::TrackingSettings;
use contacts::{Contacts, LoadedTemplate};
use policy::QuietHours;

/// Header on delay-topic records: when the hold ends (epoch ms, decimal).

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
    /// Throttle hits of the users this router owns (see [`ThrottleCache`]).
    throttle: ThrottleCache,
}

/// Write-through copy of the throttle partitions (user × category → channel → hits) of the
/// users whose records this router owns: records on the requests topic keyed by their
/// user id ([`policy::claim_by`] says `ReadWrite`), which one router at a time reads. Filled
/// from the store on first use, updated after a batch's writes are in the store, emptied
/// when the assignment changes (the next owner reads the rows, which stay in CQL, so limits
/// survive restarts and rebalances) and after `router.cache_ttl`. A user with a record of
/// another kind in a batch (a trigger topic, another key) is read from the store.
type ThrottleCache = moka::future::Cache<(String, String), Arc<HashMap<String, Vec<ThrottleHit>>>>;

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

impl Source<'_> {
    /// The record a dedup claim names: itself, or for a replayed record (`herald replay`)
    /// the record it copies, so the copy is not a duplicate of its original.
    fn claimant(&self) -> DedupClaim {
        let own = || DedupClaim { source_topic: self.msg.topic().to_string(), partition: self.msg.partition(), offset: self.msg.offset() };
        match header(self.msg, headers::REPLAY_OF).map(|of| of.parse::<Position>()) {
            Some(Ok(p)) => DedupClaim { source_topic: p.topic, partition: p.partition, offset: p.offset },
            _ => own(),
        }
    }
}

/// A record after decoding and the checks that need no user data.
enum Staged {
    /// Refused (DLQ + outcome); the request when it decoded.
    Refused(Option<NotificationRequested>, Reject),
    Ready(Ready),
}

/// A request with a known category and template and valid channels.
struct Ready {
    req: NotificationRequested,
    template: Arc<Option<LoadedTemplate>>,
    /// Distinct, valid request channels.
    channels: Vec<String>,
    /// The record a dedup claim for this request names ([`Source::claimant`]).
    claimant: DedupClaim,
}

/// What a batch needs from the store, read once for the whole batch before any record is
/// decided, and updated in memory as records are decided (records of one batch see each
/// other's claims and throttle hits).
#[derive(Default)]
struct BatchState {
    /// event id → who claimed it (claimed by transaction: after claiming; by read: existing).
    owners: HashMap<String, DedupClaim>,
    /// Records (by claimant) that already went through in this batch.
    passed: FastSet<DedupClaim>,
    contacts: HashMap<String, contacts::Cached>,
    /// (user, channel, category) → hits.
    hits: FastMap<(String, String, String), Vec<ThrottleHit>>,
    /// (user, category) of the throttle partitions this router owns, to write back to the
    /// throttle cache once the batch's writes are in the store.
    owned_throttle: Vec<(String, String)>,
}

/// Store writes a batch makes, flushed before its Kafka transaction commits.
#[derive(Default)]
struct BatchWrites {
    claims: Vec<(String, DedupClaim)>,
    hits: Vec<NewThrottleHit>,
    /// Notification-log rows, each with the request's `source` (who asked) when it decoded.
    log: Vec<(DeliveryOutcome, Option<String>)>,
}

/// A record the router refuses: DLQ + outcome `rejected` (or `template_error`).
struct Reject {
    status: &'static str,
    reason: String,
}

impl Router {
    /// Opens the router; waits for the store while it is unreachable.
    pub async fn open(config: &Config, topology: &Topology, shutdown: &CancellationToken) -> anyhow::Result<Router> {
        let r = &config.router;
        let store = Arc::new(Store::open_waiting(&config.store, "router", shutdown).await?);
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
            quiet: QuietHours::parse(&r.quiet_hours_start, &r.quiet_hours_end).ok_or_else(|| anyhow::anyhow!("router quiet hours must be HH:MM"))?,
            default_tz: r.default_timezone.parse().map_err(|e| anyhow::anyhow!("router.default_timezone: {e}"))?,
            tracking: TrackingSettings {
                base_url: r.tracking_base_url.trim_end_matches('/').to_string(),
                secret: r.tracking_secret.expose().as_bytes().to_vec(),
            },
            topics: Topics::from(topology)?,
            triggers,
            throttle: moka::future::Cache::builder().max_capacity(r.cache_max_entries).time_to_live(r.cache_ttl).build(),
            cfg: r.clone(),
        })
    }

    pub fn contacts(&self) -> &Arc<Contacts> {
        &self.contacts
    }

    /// Decodes a record and checks what needs no user data: category, template, channels.
    /// Retryable failures (registry, store) fail the whole batch.
    async fn stage(&self, src: &Source<'_>) -> Result<Staged, StageError> {
        let req = match self.decode(src).await {
            Ok(r) => r,
            Err(e) if e.is_retryable() => return Err(StageError::Retryable(e.to_string())),
            Err(e) => return Ok(Staged::Refused(None, Reject { status: "rejected", reason: e.to_string() })),
        };
        let refuse = |req, reason: String| Ok(Staged::Refused(Some(req), Reject { status: "rejected", reason }));
        if !self.cfg.categories.contains_key(&req.category) {
            let why = format!("unknown category '{}'", req.category);
            return refuse(req, why);
        }
        let template = self.contacts.template(&req.template_id).await.map_err(StageError::classify)?;
        let Some(t) = template.as_ref() else {
            let why = format!("unknown template '{}'", req.template_id);
            return refuse(req, why);
        };
        let mut channels: Vec<String> = Vec::new();
        let asked = match &req.channels {
            Some(c) if !c.is_empty() => c,
            _ => &t.meta.default_channels,
        };
        for c in asked {
            if !policy::CHANNELS.contains(&c.as_str()) {
                let why = format!("unknown channel '{c}' (push, sms, email)");
                return refuse(req, why);
            }
            if !channels.contains(c) {
                channels.push(c.clone());
            }
        }
        Ok(Staged::Ready(Ready { req, template, channels, claimant: src.claimant() }))
    }

    /// Reads what the batch's records need from the store, concurrently: dedup claims (read,
    /// or made by lightweight transaction; see [`policy::claim_by`]), contacts and
    /// preferences through the cache (one bulk read for the users it lacks), and the
    /// throttle hits of every throttled user × category (all its channels in one partition).
    async fn prefetch(&self, ready: &[(&Source<'_>, &Ready)]) -> Result<BatchState, StageError> {
        // First sight of each event id in the batch, by how it is claimed.
        let (mut transact, mut read): (Vec<(&str, DedupClaim)>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut seen = FastSet::new();
        let mut users = Vec::new();
        let mut seen_users = FastSet::new();
        // (user, category) → whether every record of it in the batch is owned (cacheable).
        let mut throttled_keys: Vec<(&str, &str)> = Vec::new();
        let mut owned: FastMap<(&str, &str), bool> = FastMap::new();
        for (src, r) in ready {
            if seen_users.insert(r.req.user_id.as_str()) {
                users.push(r.req.user_id.as_str());
            }
            if src.released {
                continue;
            }
            if seen.insert(r.req.event_id.as_str()) {
                match policy::claim_by(&self.cfg.dedup_mode, src.msg.topic(), &self.topics.requests, src.msg.key(), &r.req.user_id) {
                    policy::ClaimBy::Transaction => transact.push((r.req.event_id.as_str(), r.claimant.clone())),
                    policy::ClaimBy::ReadWrite => read.push(r.req.event_id.as_str()),
                }
            }
            let policy = &self.cfg.categories[&r.req.category];
            if policy.throttle_limit.is_some() && policy.throttle_window.is_some() {
                let key = (r.req.user_id.as_str(), r.req.category.as_str());
                let mine = policy::claim_by(&self.cfg.dedup_mode, src.msg.topic(), &self.topics.requests, src.msg.key(), &r.req.user_id)
                    == policy::ClaimBy::ReadWrite;
                match owned.entry(key) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(mine);
                        throttled_keys.push(key);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => *o.get_mut() &= mine,
                }
            }
        }
        // Category → the users whose limits in it are read from the store (one partition
        // each); owned ones the throttle cache holds are not.
        let mut throttled: FastMap<&str, Vec<&str>> = FastMap::new();
        let mut cached_hits = FastMap::new();
        let mut owned_throttle = Vec::new();
        let (mut cache_hits, mut cache_misses) = (0, 0);
        for key in throttled_keys {
            let (user, cat) = key;
            if owned[&key] {
                let owned_key = (user.to_string(), cat.to_string());
                let cached = self.throttle.get(&owned_key).await;
                owned_throttle.push(owned_key);
                if let Some(hits) = cached {
                    cache_hits += 1;
                    for (ch, h) in hits.iter() {
                        cached_hits.insert((user.to_string(), ch.clone(), cat.to_string()), h.clone());
                    }
                    continue;
                }
                cache_misses += 1;
            }
            throttled.entry(cat).or_default().push(user);
        }
        events::cache("throttle", cache_hits, cache_misses);
        let ttl = self.cfg.dedup_ttl;
        // Transactions return each id's owner (this record, or the one before it); reads return
        // the existing claims only, and `decide` writes a claim for the ids without one.
        let owners = async {
            let (mut owners, existing) = tokio::try_join!(self.store.claim_events(&transact, ttl), self.store.claims(&read))?;
            owners.extend(existing);
            Ok::<_, crate::store::StoreError>(owners)
        };
        let contacts = self.contacts.load_many(&users);
        let hits = futures::future::try_join_all(throttled.iter().map(|(cat, users)| async move {
            let found = self.store.throttle_hits(cat, users).await?;
            Ok::<_, crate::store::StoreError>(found.into_iter().map(|((u, ch), h)| ((u, ch, cat.to_string()), h)).collect::<Vec<_>>())
        }));
        let (owners, contacts, hits) = tokio::try_join!(owners, contacts, hits).map_err(StageError::classify)?;
        let mut hits: FastMap<_, _> = hits.into_iter().flatten().collect();
        hits.extend(cached_hits);
        Ok(BatchState { owners, contacts, hits, passed: FastSet::new(), owned_throttle })
    }

    /// Flushes the batch's store writes (before its Kafka transaction commits; all are
    /// idempotent, so a batch processed again writes the same rows).
    async fn flush(&self, writes: &BatchWrites) -> Result<(), StageError> {
        let claims: Vec<(&str, DedupClaim)> = writes.claims.iter().map(|(id, c)| (id.as_str(), c.clone())).collect();
        tokio::try_join!(self.store.record_events(&claims, self.cfg.dedup_ttl, &writes.log), self.store.put_throttle_hits(&writes.hits))
            .map_err(StageError::classify)?;
        Ok(())
    }

    /// After a batch's writes are in the store: its owned throttle partitions, as decided,
    /// into the throttle cache (hits older than the category's window dropped).
    async fn remember_throttle(&self, st: &BatchState) {
        if st.owned_throttle.is_empty() {
            return;
        }
        let mut by_key: FastMap<(&str, &str), HashMap<String, Vec<ThrottleHit>>> =
            st.owned_throttle.iter().map(|(u, c)| ((u.as_str(), c.as_str()), HashMap::new())).collect();
        let now = chrono::Utc::now();
        for ((user, ch, cat), hits) in &st.hits {
            if let Some(m) = by_key.get_mut(&(user.as_str(), cat.as_str())) {
                let window = self.cfg.categories.get(cat).and_then(|p| p.throttle_window).unwrap_or_default();
                let since = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
                m.insert(ch.clone(), hits.iter().filter(|h| h.at > since).cloned().collect());
            }
        }
        for ((user, cat), m) in by_key {
            self.throttle.insert((user.to_string(), cat.to_string()), Arc::new(m)).await;
        }
    }

    /// The assignment changed: the throttle partitions this router owned may be another's now.
    fn forget_owned_state(&self) {
        self.throttle.invalidate_all();
        tracing::debug!("assignment changed: throttle cache emptied");
    }

    /// Decides one staged record with the batch's state: outputs and store writes.
    async fn decide(&self, src: &Source<'_>, staged: Staged, st: &mut BatchState, writes: &mut BatchWrites) -> Result<Vec<Output>, StageError> {
        let mut out = Vec::new();
        let mut log = Vec::new();
        let (req, reject) = match staged {
            Staged::Refused(req, reject) => (req, reject),
            Staged::Ready(ready) => match self.route_request(src, &ready, st, writes, &mut out, &mut log).await? {
                Ok(()) => {
                    writes.log.extend(log.into_iter().map(|o| (o, Some(ready.req.source.clone()))));
                    return Ok(out);
                }
                Err(reject) => (Some(ready.req), reject),
            },
        };
        out.clear();
        log.clear();
        self.reject(src, req.as_ref(), reject, &mut out, &mut log).await?;
        let source = req.map(|r| r.source);
        writes.log.extend(log.into_iter().map(|o| (o, source.clone())));
        Ok(out)
    }

    /// The pipeline after staging. `Ok(Err(reject))` = refuse the record (DLQ).
    async fn route_request(
        &self,
        src: &Source<'_>,
        ready: &Ready,
        st: &mut BatchState,
        writes: &mut BatchWrites,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<Result<(), Reject>, StageError> {
        let req = &ready.req;
        let policy = &self.cfg.categories[&req.category];
        let Some(template) = ready.template.as_ref() else {
            return Ok(Err(Reject { status: "rejected", reason: format!("unknown template '{}'", req.template_id) }));
        };

        if !src.released {
            let me = &ready.claimant;
            let owner = st.owners.entry(req.event_id.clone()).or_insert_with(|| {
                // Claimed by read, no claim yet: this record claims the id.
                writes.claims.push((req.event_id.clone(), me.clone()));
                me.clone()
            });
            if owner != me || !st.passed.insert(me.clone()) {
                let at = Position::new(owner.source_topic.clone(), owner.partition, owner.offset);
                let why = if owner == me { format!("{at} went through earlier in this batch") } else { format!("first seen at {at}") };
                self.outcome(src, req, "duplicate", None, None, Some(why), out, log).await?;
                return Ok(Ok(()));
            }
        }
        let now = now_ms();
        if policy::expired(req, policy, now) {
            self.outcome(src, req, "expired", None, None, None, out, log).await?;
            return Ok(Ok(()));
        }
        let (contact, prefs) = match st.contacts.get(&req.user_id) {
            Some((c, p)) => (c.clone(), p.clone()),
            None => {
                let c = self.contacts.contact(&req.user_id).await.map_err(StageError::classify)?;
                (c, self.contacts.prefs(&req.user_id).await.map_err(StageError::classify)?)
            }
        };
        let Some(contact) = contact.as_ref() else {
            self.outcome(src, req, "unknown_user", None, None, None, out, log).await?;
            return Ok(Ok(()));
        };

        let mut plan = Vec::new();
        for ch in &ready.channels {
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
                let at = chrono::Utc::now();
                let since = at - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
                let hits = st.hits.entry((req.user_id.clone(), ch.clone(), req.category.clone())).or_default();
                match policy::throttle(hits, &req.event_id, limit, since) {
                    policy::Throttle::Counted => {}
                    policy::Throttle::Admit => {
                        let hit = ThrottleHit { event_id: req.event_id.clone(), at };
                        hits.push(hit.clone());
                        writes.hits.push(NewThrottleHit {
                            user_id: req.user_id.clone(),
                            channel: ch.clone(),
                            category: req.category.clone(),
                            hit,
                            window,
                        });
                    }
                    policy::Throttle::Throttled => {
                        let why = format!("more than {limit} {} per {}", req.category, crate::config::duration::format(&window));
                        self.outcome(src, req, "throttled", Some(ch), None, Some(why), out, log).await?;
                        continue;
                    }
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
                    headers: vec![(headers::DUE_AT.into(), until.timestamp_millis().to_string().into_bytes())],
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
        let locales: Vec<&str> =
            [req.locale.as_deref(), contact.user.locale.as_deref(), Some(self.cfg.default_locale.as_str())].into_iter().flatten().collect();
        let deadline = req.expires_at.or_else(|| policy.max_age.map(|a| req.occurred_at + a.as_millis() as i64)).unwrap_or(now + 86_400_000);
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
                    last_provider: None,
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
        out.push(Output::dead_letter(src.msg, &self.topics.dlq, format!("{}: {}", reject.status, reject.reason)));
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

    /// Routes a batch: stage every record (decode, static checks), read what they need from
    /// the store in one go, decide them in record order, flush the store writes; outputs in
    /// record order. On the delay topic a record not yet due holds its partition there.
    async fn route_batch(&self, batch: &[OwnedMessage], released: bool) -> Result<BatchResult, StageError> {
        let now = now_ms();
        let mut holds = Vec::new();
        let mut held = HashSet::new();
        let mut sources = Vec::with_capacity(batch.len());
        for msg in batch {
            if released {
                let tp = (msg.topic(), msg.partition());
                if held.contains(&tp) {
                    continue;
                }
                let due = header(msg, headers::DUE_AT).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                if due > now {
                    held.insert(tp);
                    holds.push(Hold { topic: msg.topic().into(), partition: msg.partition(), offset: msg.offset(), until_ms: due });
                    continue;
                }
            }
            sources.push(Source { msg, id: Position::of(msg).to_string(), released });
        }
        let stages: Vec<_> = sources.iter().map(|src| self.stage(src)).collect();
        let t0 = std::time::Instant::now();
        let staged: Vec<Staged> = futures::stream::iter(stages).buffered(self.cfg.concurrency).try_collect().await?;
        let t_stage = t0.elapsed();
        let ready: Vec<(&Source<'_>, &Ready)> = sources
            .iter()
            .zip(&staged)
            .filter_map(|(src, s)| match s {
                Staged::Ready(r) => Some((src, r)),
                Staged::Refused(..) => None,
            })
            .collect();
        let mut state = self.prefetch(&ready).await?;
        let t_prefetch = t0.elapsed();
        let mut writes = BatchWrites::default();
        let mut outputs = Vec::new();
        for (src, s) in sources.iter().zip(staged) {
            outputs.extend(self.decide(src, s, &mut state, &mut writes).await?);
        }
        let t_decide = t0.elapsed();
        self.flush(&writes).await?;
        self.remember_throttle(&state).await;
        tracing::debug!(
            records = batch.len(),
            outputs = outputs.len(),
            stage_ms = t_stage.as_millis() as u64,
            prefetch_ms = (t_prefetch - t_stage).as_millis() as u64,
            decide_ms = (t_decide - t_prefetch).as_millis() as u64,
            flush_ms = (t0.elapsed() - t_decide).as_millis() as u64,
            "batch routed"
        );
        Ok(BatchResult { outputs, holds })
    }
}

fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    msg.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The requests (and trigger topics) stage.
struct Requests(Arc<Router>);

impl Processor for Requests {
    async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        self.0.route_batch(batch, false).await
    }

    fn assignment_changed(&self) {
        self.0.forget_owned_state();
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
    let router = Arc::new(Router::open(config, topology, &shutdown).await?);
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
        pipelined: false,
    };
    // The requests stage flushes its store writes inside `process`, so batch N+1's prefetch
    // already sees batch N's claims and throttle hits while N's transaction commits.
    let main = StageSettings { pipelined: r.pipelined, ..settings("router", topics) };
    let delay = settings("router-delay", vec![router.topics.delay.clone()]);
    let follower = tokio::spawn({
        let (k, topic, contacts, stop) = (k.clone(), router.topics.changes.clone(), router.contacts.clone(), shutdown.clone());
        async move { crate::changes::follow(&k, &topic, "router-changes", contacts, stop).await }
    });
    let requests = Requests(router.clone());
    let released = Released(router.clone());
    let result = tokio::try_join!(eos::run(k, &main, &requests, shutdown.clone()), eos::run(k, &delay, &released, shutdown.clone()),);
    shutdown.cancel();
    let _ = follower.await;
    result.map(|_| ()).map_err(Into::into)
}
