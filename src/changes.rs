//! The compacted changes topic: `kind:id` keys announce that a user, their devices or
//! preferences, a template or an app changed, and every process holding a cached copy
//! (routers, API processes) follows the topic and drops it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{self, BusError};

/// Kinds of change keys: `user`, `devices`, `preferences` and `template` (routers and API
/// processes cache these), `app` (API processes cache apps by key).
pub const KINDS: [&str; 5] = ["user", "devices", "preferences", "template", "app"];

/// Something holding cached copies that a change key (`kind:id`) makes stale.
pub trait Invalidate: Send + Sync + 'static {
    fn invalidate(&self, kind: &str, id: &str) -> impl Future<Output = ()> + Send;
}

/// Splits a change key into (kind, id); `None` for keys of no known kind.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    key.split_once(':').filter(|(kind, id)| KINDS.contains(kind) && !id.is_empty())
}

/// Announces that `kind:id` changed, so every follower drops its cached copy. Waits for
/// Kafka's acknowledgement.
pub async fn publish(producer: &FutureProducer, topic: &str, kind: &str, id: &str) -> Result<(), BusError> {
    debug_assert!(KINDS.contains(&kind), "unknown change kind {kind}");
    let key = format!("{kind}:{id}");
    let value = serde_json::json!({ "kind": kind, "id": id, "at": crate::model::now_ms() }).to_string();
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(10))
        .await
        .map_err(|(source, _)| BusError::Op { op: "publish change", source })?;
    Ok(())
}

/// Follows the changes topic from its end on every partition (each process needs every
/// change; no consumer group, no commits) and hands each key to `sink` until `shutdown`.
/// `role` names the client (`router-changes`, `api-changes`). Until the topic can be
/// assigned (Kafka unreachable at start) it retries every second, logging why.
pub async fn follow<S: Invalidate>(cfg: &KafkaConfig, topic: &str, role: &str, sink: Arc<S>, shutdown: CancellationToken) -> Result<(), BusError> {
    let consumer = loop {
        match assign_from_end(cfg, topic, role) {
            Ok(c) => break c,
            Err(e @ BusError::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot follow the changes topic yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let errors = crate::kafka::Throttle::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => match m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    Some(key) => match parse_key(key) {
                        Some((kind, id)) => sink.invalidate(kind, id).await,
                        None => tracing::debug!(key, "ignoring unknown change key"),
                    },
                    None => tracing::debug!("ignoring a change without a UTF-8 key"),
                },
                Err(e) => {
                    if let Some(suppressed) = errors.allow() {
                        tracing::warn!(error = %e, suppressed, "changes topic read failed (retrying)");
                    }
                }
            }
        }
    }
}

/// A consumer assigned every partition of `topic` at its end.
fn assign_from_end(cfg: &KafkaConfig, topic: &str, role: &str) -> Result<StreamConsumer, BusError> {
    let consumer: StreamConsumer = kafka::client_config(cfg, role)
        .set("group.id", format!("{}-{role}-{}", cfg.group_prefix, uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| BusError::Config(e.to_string()))?;
    let md = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), cfg.request_timeout()))
        .map_err(|source| BusError::Op { op: "changes metadata", source })?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End).map_err(|source| BusError::Op { op: "changes assign", source })?;
        }
    }
    if tpl.count() == 0 {
        return Err(BusError::NoPartitions(topic.to_string()));
    }
    consumer.assign(&tpl).map_err(|source| BusError::Op { op: "changes assign", source })?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_known_kinds() {
        assert_eq!(parse_key("user:u-1"), Some(("user", "u-1")));
        assert_eq!(parse_key("template:bill:due"), Some(("template", "bill:due")), "ids may hold ':'");
        assert_eq!(parse_key("app:hk_123"), Some(("app", "hk_123")));
        assert_eq!(parse_key("user:"), None);
        assert_eq!(parse_key("group:x"), None);
        assert_eq!(parse_key("no-colon"), None);
    }
}
