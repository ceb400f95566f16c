//! `herald dispatch --channel apns|fcm|sms|email`: consumes a channel's delivery topic and
//! its retry topics, calls the provider, and emits outcomes, retries and dead letters.
//!
//! - No re-send: a sent-log keyed by delivery_id is checked before a send and written after
//!   success; an `attempting` row without `sent` is the unavoidable window (provider said
//!   yes, the process died before the write) and is counted in
//!   `herald_dispatch_uncertain_resends_total`.
//! - Retries never block a partition: a failed delivery goes to the next retry topic with a
//!   `not_before`; the retry topics' partitions are paused until their head is due
//!   ([`crate::kafka::eos`] holds), never slept on.
//! - Outcomes, retries, dead letters and the consumed offsets are one Kafka transaction,
//!   so a redelivered batch does not duplicate them either.
//! - Failover: the first provider of the channel's order whose circuit is closed gets the
//!   delivery; [`breaker`] opens on consecutive transient failures and probes to close.
//! - Within a batch, higher-priority deliveries are sent first; per-provider concurrency and
//!   rate limits come from [`limit`]; what to do with an answer from [`plan`].

pub mod breaker;
pub mod limit;
pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use futures::StreamExt;
use rand::Rng;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::{Config, DispatchConfig};
use crate::error::Classify;
use crate::kafka::eos::{self, BatchResult, Hold, Output, Processor, StageError, StageSettings};
use crate::model::{now_ms, ChannelDelivery, DeliveryOutcome};
use crate::providers::{Classification, Clients, Provider, ProviderError};
use crate::router::policy::outcome_id;
use crate::store::Store;
use crate::telemetry::events;
use crate::topology::Topology;
use breaker::{Breaker, Signal};
use limit::Limiter;
use plan::Next;

/// One channel's dispatcher.
pub struct Dispatcher {
    channel: String,
    cfg: DispatchConfig,
    store: Arc<Store>,
    codec: Arc<Codec>,
    clients: Clients,
    reader: Schema,
    breakers: HashMap<Provider, Breaker>,
    limits: HashMap<Provider, Limiter>,
    /// Retry topic names and delays, level 1 first.
    retries: Vec<(String, Duration)>,
    retry_topics: Vec<String>,
    dlq: String,
    outcomes: String,
    changes: String,
}

/// A decoded delivery and the record it came from.
struct Work {
    index: usize,
    msg: OwnedMessage,
    source: String,
    delivery: ChannelDelivery,
}

impl Dispatcher {
    pub async fn open(config: &Config, topology: &Topology, channel: &str) -> anyhow::Result<Dispatcher> {
        let cfg = config.dispatch.clone();
        let mut providers: Vec<Provider> = cfg.routes.get(channel).into_iter().flatten().filter_map(|p| p.parse().ok()).collect();
        for routes in cfg.category_routes.values() {
            providers.extend(routes.get(channel).into_iter().flatten().filter_map(|p| p.parse::<Provider>().ok()));
        }
        providers.sort_by_key(|p| p.name());
        providers.dedup();
        anyhow::ensure!(!providers.is_empty(), "no providers configured for channel '{channel}' (dispatch.routes)");
        let clients = Clients::build(&config.providers, &providers)?;
        let limit = |p: &Provider| cfg.limits.get(p.name()).unwrap_or(&cfg.default_limit).clone();
        let mut retries = Vec::new();
        for level in 1.. {
            let Ok(t) = topology.topic(&format!("retry.{channel}.{level}")) else { break };
            retries.push((t.name.clone(), t.retry_delay.unwrap_or(Duration::from_secs(60))));
        }
        Ok(Dispatcher {
            channel: channel.to_string(),
            store: Arc::new(Store::open(&config.store).await?),
            codec: Arc::new(Codec::new(&config.registry)?),
            clients,
            reader: crate::schemas::schema("ChannelDelivery")?,
            breakers: providers.iter().map(|p| (*p, Breaker::new(cfg.breaker_failures, cfg.breaker_open_for))).collect(),
            limits: providers.iter().map(|p| (*p, { let l = limit(p); Limiter::new(l.concurrency, l.rate_per_sec) })).collect(),
            retry_topics: retries.iter().map(|(t, _)| t.clone()).collect(),
            retries,
            dlq: topology.name("dlq")?.to_string(),
            outcomes: topology.name("outcomes")?.to_string(),
            changes: topology.name("changes")?.to_string(),
            cfg,
        })
    }

    /// The provider order for a delivery's category.
    fn order(&self, category: &str) -> Vec<Provider> {
        self.cfg
            .category_routes
            .get(category)
            .and_then(|r| r.get(&self.channel))
            .or_else(|| self.cfg.routes.get(&self.channel))
            .into_iter()
            .flatten()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The first provider in order whose circuit lets a request through.
    fn pick(&self, category: &str) -> Option<Provider> {
        let now = Instant::now();
        self.order(category).into_iter().find(|p| self.breakers.get(p).is_some_and(|b| b.allow(now)))
    }

    async fn process_batch(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        let mut outputs: Vec<(usize, Vec<Output>)> = Vec::new();
        let mut holds: Vec<Hold> = Vec::new();
        let mut work = Vec::new();
        let now = now_ms();
        for (index, msg) in batch.iter().enumerate() {
            if holds.iter().any(|h| h.topic == msg.topic() && h.partition == msg.partition()) {
                continue; // behind a held record: not processed, not committed
            }
            let source = format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset());
            match self.codec.decode::<ChannelDelivery>(msg.payload(), &self.reader).await {
                Ok(delivery) => {
                    let due = delivery.not_before.unwrap_or(0);
                    if due > now && self.retry_topics.iter().any(|t| t == msg.topic()) {
                        holds.push(Hold { topic: msg.topic().into(), partition: msg.partition(), offset: msg.offset(), until_ms: due });
                        continue;
                    }
                    work.push(Work { index, msg: msg.clone(), source, delivery });
                }
                Err(e) if e.is_retryable() => return Err(StageError::Retryable(e.to_string())),
                Err(e) => {
                    let mut out = Vec::new();
                    let mut log = Vec::new();
                    self.dead_letter(msg, &source, None, "rejected", &e.to_string(), &mut out, &mut log).await?;
                    self.store.log_outcomes(&log).await.map_err(StageError::classify)?;
                    outputs.push((index, out));
                }
            }
        }
        // Higher priority first; the stable sort keeps offset order within a priority.
        work.sort_by_key(|w| std::cmp::Reverse(w.delivery.priority));
        let sent: Vec<Result<(usize, Vec<Output>), StageError>> = futures::stream::iter(work)
            .map(|w| async move { self.deliver(&w).await.map(|out| (w.index, out)) })
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        for r in sent {
            outputs.push(r?);
        }
        outputs.sort_by_key(|(i, _)| *i);
        Ok(BatchResult { outputs: outputs.into_iter().flat_map(|(_, o)| o).collect(), holds })
    }

    /// Sends one delivery (unless already sent or expired) and says what follows.
    async fn deliver(&self, w: &Work) -> Result<Vec<Output>, StageError> {
        let d = &w.delivery;
        let mut out = Vec::new();
        let mut log = Vec::new();
        if d.deadline <= now_ms() {
            self.outcome(w, "expired", None, None, None, None, &mut out, &mut log).await?;
            return self.finish(out, log).await;
        }
        match self.store.sent(&d.delivery_id).await.map_err(StageError::classify)? {
            Some(s) if s.state == "sent" => {
                // Sent before a crash or a replay: say so again (same outcome id), send nothing.
                let provider = s.provider.as_deref().and_then(|p| p.parse().ok());
                self.outcome(w, "sent", provider, s.provider_message_id.as_deref(), None, s.latency_ms, &mut out, &mut log).await?;
                return self.finish(out, log).await;
            }
            Some(s) if s.state == "attempting" => {
                events::uncertain_resend(&self.channel, s.provider.as_deref().unwrap_or("-"));
                tracing::warn!(delivery_id = %d.delivery_id, provider = ?s.provider, "attempted before without a recorded result; sending again");
            }
            _ => {}
        }
        let Some(provider) = self.pick(&d.category) else {
            let c = Classification::Transient { reason: "every provider's circuit is open".into() };
            return self.after(w, None, c, None, out, log).await;
        };
        self.store
            .put_sent(&d.delivery_id, "attempting", provider.name(), None, d.attempt, None)
            .await
            .map_err(StageError::classify)?;
        let started = Instant::now();
        let (classification, known) = {
            let _permit = self.limits[&provider].acquire().await;
            match self.clients.deliver(provider, d).await {
                Ok(c) => (c, true),
                // No answer after the request left: the provider may have sent it.
                Err(e @ (ProviderError::Timeout(_) | ProviderError::Transport(_))) => (e.classification(), false),
                Err(e) => (e.classification(), true),
            }
        };
        let latency = started.elapsed().as_millis() as i64;
        if known && !matches!(classification, Classification::Sent { .. }) {
            // A definite "not sent": a later attempt is not the uncertain window.
            self.store
                .put_sent(&d.delivery_id, "not_sent", provider.name(), None, d.attempt, Some(latency))
                .await
                .map_err(StageError::classify)?;
        }
        let signal = match classification {
            Classification::Transient { .. } | Classification::Throttled { .. } => Signal::Failing,
            _ => Signal::Healthy,
        };
        if let Some(state) = self.breakers[&provider].record(signal, Instant::now()) {
            events::breaker(provider.name(), state);
        }
        self.after(w, Some(provider), classification, Some(latency), out, log).await
    }

    /// Acts on a provider's answer.
    #[allow(clippy::too_many_arguments)]
    async fn after(
        &self,
        w: &Work,
        provider: Option<Provider>,
        c: Classification,
        latency: Option<i64>,
        mut out: Vec<Output>,
        mut log: Vec<DeliveryOutcome>,
    ) -> Result<Vec<Output>, StageError> {
        let d = &w.delivery;
        let levels: Vec<Duration> = self.retries.iter().map(|(_, delay)| *delay).collect();
        let jitter = rand::rng().random_range(-self.cfg.jitter..=self.cfg.jitter);
        match plan::next(&c, d.attempt, &levels, jitter) {
            Next::Sent { message_id } => {
                let p = provider.expect("sent through a provider");
                // The provider's id → delivery, for webhooks and the API's notification log.
                let by_message_id = crate::store::ProviderMessage {
                    provider: p.name().to_string(),
                    provider_message_id: message_id.clone(),
                    delivery_id: d.delivery_id.clone(),
                    event_id: d.event_id.clone(),
                    user_id: d.user_id.clone(),
                    channel: d.channel.clone(),
                    category: d.category.clone(),
                    sent_at: now_ms(),
                };
                tokio::try_join!(
                    self.store.put_sent(&d.delivery_id, "sent", p.name(), Some(&message_id), d.attempt, latency),
                    self.store.put_provider_message(&by_message_id),
                )
                .map_err(StageError::classify)?;
                self.outcome(w, "sent", Some(p), Some(&message_id), None, latency, &mut out, &mut log).await?;
            }
            Next::Deactivate { reason } => {
                match (d.channel.as_str(), &d.device_id) {
                    ("apns" | "fcm", Some(device)) => self.store.deactivate_device(&d.user_id, device).await,
                    (ch @ ("sms" | "email"), _) => self.store.set_contact_active(&d.user_id, ch, false).await,
                    _ => Ok(()),
                }
                .map_err(StageError::classify)?;
                out.push(change_record(&self.changes, &d.user_id));
                self.outcome(w, "invalid_address", provider, None, Some(reason), latency, &mut out, &mut log).await?;
            }
            Next::Retry { level, delay, reason } => {
                let mut again = d.clone();
                again.attempt += 1;
                again.not_before = Some(now_ms() + delay.as_millis() as i64);
                again.last_error = Some(reason.clone());
                let topic = &self.retries[level - 1].0;
                let payload = self.codec.encode(topic, &again).await.map_err(StageError::classify)?;
                out.push(Output { topic: topic.clone(), partition: None, key: Some(d.user_id.clone().into_bytes()), payload: Some(payload), headers: Vec::new() });
                let why = format!("{reason}; retry {level} in {:.0} s", delay.as_secs_f64());
                self.outcome(w, "retry_scheduled", provider, None, Some(why), latency, &mut out, &mut log).await?;
            }
            Next::DeadLetter { reason } => {
                let p = provider.map(|p| p.name()).unwrap_or("-");
                self.dead_letter(&w.msg, &w.source, Some(w), "dead_lettered", &format!("{p}: {reason}"), &mut out, &mut log).await?;
            }
            Next::Fail { reason } => {
                self.outcome(w, "failed", provider, None, Some(reason), latency, &mut out, &mut log).await?;
            }
        }
        self.finish(out, log).await
    }

    async fn finish(&self, out: Vec<Output>, log: Vec<DeliveryOutcome>) -> Result<Vec<Output>, StageError> {
        self.store.log_outcomes(&log).await.map_err(StageError::classify)?;
        Ok(out)
    }

    /// The original record to the DLQ with the reason; outcome `status`; an alert.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        source: &str,
        w: Option<&Work>,
        status: &'static str,
        reason: &str,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<(), StageError> {
        events::dead_lettered("dispatch", status, reason);
        out.push(Output::dead_letter(msg, &self.dlq, format!("{status}: {reason}"), source));
        match w {
            Some(w) => self.outcome(w, status, None, None, Some(reason.to_string()), None, out, log).await,
            None => {
                let o = DeliveryOutcome {
                    outcome_id: outcome_id(source, "", status, Some(&self.channel), None),
                    event_id: format!("dlq:{source}"),
                    delivery_id: None,
                    user_id: None,
                    category: None,
                    channel: Some(self.channel.clone()),
                    provider: None,
                    status: status.to_string(),
                    reason: Some(reason.to_string()),
                    provider_message_id: None,
                    attempt: 0,
                    latency_ms: None,
                    occurred_at: now_ms(),
                    requested_at: None,
                };
                self.push_outcome(o, out, log).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn outcome(
        &self,
        w: &Work,
        status: &str,
        provider: Option<Provider>,
        message_id: Option<&str>,
        reason: Option<String>,
        latency: Option<i64>,
        out: &mut Vec<Output>,
        log: &mut Vec<DeliveryOutcome>,
    ) -> Result<(), StageError> {
        let d = &w.delivery;
        let o = DeliveryOutcome {
            outcome_id: outcome_id(&w.source, &d.event_id, status, Some(&d.channel), Some(&d.delivery_id)),
            event_id: d.event_id.clone(),
            delivery_id: Some(d.delivery_id.clone()),
            user_id: Some(d.user_id.clone()),
            category: Some(d.category.clone()),
            channel: Some(d.channel.clone()),
            provider: provider.map(|p| p.name().to_string()),
            status: status.to_string(),
            reason,
            provider_message_id: message_id.map(str::to_string),
            attempt: d.attempt,
            latency_ms: latency,
            occurred_at: now_ms(),
            requested_at: None,
        };
        self.push_outcome(o, out, log).await
    }

    async fn push_outcome(&self, o: DeliveryOutcome, out: &mut Vec<Output>, log: &mut Vec<DeliveryOutcome>) -> Result<(), StageError> {
        let payload = self.codec.encode(&self.outcomes, &o).await.map_err(StageError::classify)?;
        events::outcome(o.channel.as_deref().unwrap_or("-"), o.provider.as_deref().unwrap_or("-"), &o.status);
        out.push(Output { topic: self.outcomes.clone(), partition: None, key: Some(o.event_id.clone().into_bytes()), payload: Some(payload), headers: Vec::new() });
        log.push(o);
        Ok(())
    }
}

/// The changes-topic record that makes routers forget a user's cached contact data.
fn change_record(topic: &str, user_id: &str) -> Output {
    let value = serde_json::json!({ "kind": "user", "id": user_id, "at": now_ms() }).to_string();
    Output { topic: topic.into(), partition: None, key: Some(format!("user:{user_id}").into_bytes()), payload: Some(value.into_bytes()), headers: Vec::new() }
}

struct Stage(Arc<Dispatcher>);

impl Processor for Stage {
    async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        self.0.process_batch(batch).await
    }
}

/// Runs `herald dispatch --channel <channel>` until `shutdown`.
pub async fn run(config: &Config, topology: &Topology, channel: &str, shutdown: CancellationToken) -> anyhow::Result<()> {
    let d = Arc::new(Dispatcher::open(config, topology, channel).await?);
    let k = &config.kafka;
    let mut topics = vec![topology.name(&format!("delivery.{channel}"))?.to_string()];
    topics.extend(d.retry_topics.iter().cloned());
    let role: &'static str = match channel {
        "apns" => "dispatch-apns",
        "fcm" => "dispatch-fcm",
        "sms" => "dispatch-sms",
        "email" => "dispatch-email",
        other => anyhow::bail!("unknown channel '{other}' (apns, fcm, sms, email)"),
    };
    let settings = StageSettings {
        role,
        group_id: crate::kafka::group_id(k, role),
        topics,
        transactional_id: format!("{}-{role}-{}", k.group_prefix, config.dispatch.instance_id),
        batch_max: config.dispatch.batch_max,
        batch_wait: Duration::from_millis(config.dispatch.batch_wait_ms),
        transaction_timeout: Duration::from_millis(config.dispatch.transaction_timeout_ms),
    };
    eos::run(k, &settings, &Stage(d), shutdown).await?;
    Ok(())
}
