//! `herald dispatch --channel apns|fcm|sms|email`: consumes a channel's delivery topic and
//! its retry topics, calls the providers, and emits outcomes, retries and dead letters.
//!
//! - [`engine`]: the commit protocol (a delivery the provider accepted is never sent again
//!   because the store or the broker failed), failover per delivery, held partitions while
//!   every provider is down. Pure of Kafka: it takes decoded records and returns what to emit.
//! - [`writer`]: the group-commit writer of every store write the dispatcher makes.
//! - [`store`]: the store seam ([`store::DispatchStore`]), on CQL and in memory.
//! - [`breaker`], [`limit`], [`plan`]: circuit breakers and the choice of provider,
//!   per-provider concurrency and rate limits, and the decision table after an answer.
//! - Here: the stage that wires the engine to Kafka. Outcomes, retries, failovers, dead
//!   letters and the consumed offsets are one transaction ([`crate::kafka::eos`]); retry
//!   topics' partitions are paused until their head is due, never slept on.

pub mod breaker;
pub mod engine;
pub mod limit;
pub mod plan;
pub mod store;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError};
use crate::config::Config;
use crate::error::Classify;
use crate::kafka::eos::{self, BatchResult, Output, Processor, StageError, StageSettings};
use crate::model::{now_ms, ChannelDelivery};
use crate::providers::Clients;
use crate::store::Store;
use crate::topology::Topology;
use engine::{Emit, Engine, Item, Pos};
use store::CqlDispatchStore;

/// The dispatcher stage of one channel: Kafka records in, the engine's decisions out.
pub struct Dispatcher {
    engine: Engine<CqlDispatchStore, Clients>,
    codec: Arc<Codec>,
    reader: Schema,
    delivery_topic: String,
    /// Retry topic names, level 1 first.
    retry_topics: Vec<String>,
    dlq: String,
    outcomes: String,
    changes: String,
}

impl Dispatcher {
    /// Opens the channel's dispatcher; waits for the store while it is unreachable.
    pub async fn open(config: &Config, topology: &Topology, channel: &str, shutdown: &CancellationToken) -> anyhow::Result<Dispatcher> {
        let cfg = config.dispatch.clone();
        let mut retries = Vec::new();
        for level in 1.. {
            let Ok(t) = topology.topic(&format!("retry.{channel}.{level}")) else { break };
            retries.push((t.name.clone(), t.retry_delay.unwrap_or(Duration::from_secs(60))));
        }
        let store = Arc::new(Store::open_waiting(&config.store, "dispatch", shutdown).await?);
        let dispatch_store = Arc::new(CqlDispatchStore::prepare(store, &config.store.keyspace).await?);
        let clients = Clients::build(&config.providers, &engine::Routes::of(channel, &cfg)?.providers())?;
        let engine = Engine::new(channel, cfg, retries.iter().map(|(_, d)| *d).collect(), dispatch_store, clients)?;
        Ok(Dispatcher {
            engine,
            codec: Arc::new(Codec::new(&config.registry)?),
            reader: crate::schemas::schema("ChannelDelivery")?,
            delivery_topic: topology.name(&format!("delivery.{channel}"))?.to_string(),
            retry_topics: retries.into_iter().map(|(t, _)| t).collect(),
            dlq: topology.name("dlq")?.to_string(),
            outcomes: topology.name("outcomes")?.to_string(),
            changes: topology.name("changes")?.to_string(),
        })
    }

    async fn process_batch(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        let mut items = Vec::with_capacity(batch.len());
        for msg in batch {
            let pos = Pos { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset() };
            match self.codec.decode::<ChannelDelivery>(msg.payload(), &self.reader).await {
                Ok(delivery) => {
                    items.push(Item::Delivery { retry_topic: self.retry_topics.iter().any(|t| t == msg.topic()), pos, delivery: Box::new(delivery) })
                }
                Err(e) if e.is_retryable() => return Err(StageError::Retryable(e.to_string())),
                Err(e) => items.push(Item::Poison { pos, reason: e.to_string() }),
            }
        }
        let planned = self.engine.process(items).await?;
        let by_pos: std::collections::HashMap<(&str, i32, i64), &OwnedMessage> =
            batch.iter().map(|m| ((m.topic(), m.partition(), m.offset()), m)).collect();
        let mut outputs = Vec::new();
        for (pos, emits) in &planned.decisions {
            let msg = by_pos[&(pos.topic.as_str(), pos.partition, pos.offset)];
            for e in emits {
                outputs.push(self.output(msg, e).await.map_err(StageError::classify)?);
            }
        }
        Ok(BatchResult { outputs, holds: planned.holds })
    }

    async fn output(&self, msg: &OwnedMessage, e: &Emit) -> Result<Output, CodecError> {
        Ok(match e {
            Emit::Outcome(o) => {
                let payload = self.codec.encode(&self.outcomes, o).await?;
                Output {
                    topic: self.outcomes.clone(),
                    partition: None,
                    key: Some(o.event_id.clone().into_bytes()),
                    payload: Some(payload),
                    headers: Vec::new(),
                }
            }
            Emit::Again { level, delivery } => {
                let topic = match level {
                    0 => &self.delivery_topic,
                    n => &self.retry_topics[n - 1],
                };
                let payload = self.codec.encode(topic, delivery.as_ref()).await?;
                Output {
                    topic: topic.clone(),
                    partition: None,
                    key: Some(delivery.user_id.clone().into_bytes()),
                    payload: Some(payload),
                    headers: Vec::new(),
                }
            }
            Emit::DeadLetter { reason } => Output::dead_letter(msg, &self.dlq, reason.clone()),
            Emit::ContactChanged { user_id } => change_record(&self.changes, user_id),
        })
    }
}

/// The changes-topic record that makes routers forget a user's cached contact data.
fn change_record(topic: &str, user_id: &str) -> Output {
    let value = serde_json::json!({ "kind": "user", "id": user_id, "at": now_ms() }).to_string();
    Output {
        topic: topic.into(),
        partition: None,
        key: Some(format!("user:{user_id}").into_bytes()),
        payload: Some(value.into_bytes()),
        headers: Vec::new(),
    }
}

struct Stage(Arc<Dispatcher>);

impl Processor for Stage {
    async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
        self.0.process_batch(batch).await
    }

    fn committed(&self, batch: &[OwnedMessage]) {
        let positions: Vec<Pos> = batch.iter().map(|m| Pos { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() }).collect();
        self.0.engine.committed(&positions);
    }
}

/// Runs `herald dispatch --channel <channel>` until `shutdown`.
pub async fn run(config: &Config, topology: &Topology, channel: &str, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role: &'static str = match channel {
        "apns" => "dispatch-apns",
        "fcm" => "dispatch-fcm",
        "sms" => "dispatch-sms",
        "email" => "dispatch-email",
        other => anyhow::bail!("unknown channel '{other}' (apns, fcm, sms, email)"),
    };
    let d = Arc::new(Dispatcher::open(config, topology, channel, &shutdown).await?);
    let k = &config.kafka;
    let mut topics = vec![d.delivery_topic.clone()];
    topics.extend(d.retry_topics.iter().cloned());
    let settings = StageSettings {
        role,
        group_id: crate::kafka::group_id(k, role),
        topics,
        transactional_id: format!("{}-{role}-{}", k.group_prefix, config.dispatch.instance_id),
        batch_max: config.dispatch.batch_max,
        batch_wait: Duration::from_millis(config.dispatch.batch_wait_ms),
        transaction_timeout: Duration::from_millis(config.dispatch.transaction_timeout_ms),
        // The engine remembers decisions until their transaction commits (`committed`).
        pipelined: false,
    };
    eos::run(k, &settings, &Stage(d.clone()), shutdown).await?;
    // Writes of a batch that did not commit (its records are read again by the next owner):
    // finish them, so that owner finds its sends recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.engine.pending_writes() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
