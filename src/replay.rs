//! `herald replay`: re-drives dead letters (or any topic's records) after an incident.
//!
//! From the DLQ, each record goes back to the topic it came from (its `herald-dlq-source`
//! header), with its original key, bytes and headers, plus `herald-replay-of: <source>`.
//! The router treats a replayed record as the original one for dedup, and the dispatcher's
//! sent-log still stops anything already sent, so replaying is safe to repeat.
//! The end of the source topic is fixed when the replay starts, so records written during
//! the replay are not replayed again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka::headers::{self, Position, DLQ_REASON, DLQ_SOURCE};
use crate::topology::Topology;

/// Header on replayed records: the `topic:partition:offset` of the original record.

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Topology id of the topic to read (`dlq` by default).
    pub from: String,
    /// Target topology id; required unless reading the DLQ (whose records know their source).
    pub to: Option<String>,
    /// Only DLQ records whose reason contains this.
    pub reason: Option<String>,
    /// Only DLQ records that came from this topology id.
    pub source: Option<String>,
    /// Only records at or after this instant (epoch ms).
    pub since_ms: Option<i64>,
    /// Count what would be replayed without producing anything.
    pub dry_run: bool,
}

/// Records replayed per target topic (or that would be, in a dry run), and skipped ones.
#[derive(Debug, Default)]
pub struct Report {
    pub replayed: BTreeMap<String, usize>,
    pub skipped: usize,
}

pub async fn run(config: &Config, topology: &Topology, r: &Replay) -> anyhow::Result<Report> {
    let from = topology.topic(&r.from)?.clone();
    let is_dlq = r.from == "dlq";
    let fixed_target = match &r.to {
        Some(id) => Some(topology.name(id)?.to_string()),
        None if is_dlq => None,
        None => anyhow::bail!("--to is required when replaying {} (only DLQ records know their source)", r.from),
    };
    let source_filter = r.source.as_deref().map(|id| topology.name(id).map(str::to_string)).transpose()?;
    let k = &config.kafka;

    // Snapshot where each partition ends now, and where to start.
    let probe: BaseConsumer = crate::kafka::client_config(k, "replay").create()?;
    let mut ends = BTreeMap::new();
    let mut start = TopicPartitionList::new();
    for p in 0..from.partitions {
        let (low, high) = tokio::task::block_in_place(|| probe.fetch_watermarks(&from.name, p, k.request_timeout()))
            .with_context(|| format!("watermarks of {}", from.name))?;
        if high > low {
            ends.insert(p, high);
            start.add_partition_offset(&from.name, p, Offset::Offset(low))?;
        }
    }
    if let Some(since) = r.since_ms {
        let mut times = TopicPartitionList::new();
        for p in ends.keys() {
            times.add_partition_offset(&from.name, *p, Offset::Offset(since))?;
        }
        start = tokio::task::block_in_place(|| probe.offsets_for_times(times, k.request_timeout()))?;
    }
    let consumer: StreamConsumer = crate::kafka::client_config(k, "replay")
        .set("group.id", format!("{}-replay-{}", k.group_prefix, uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.assign(&start)?;
    let producer = crate::kafka::producer(k, "replay")?;

    let mut report = Report::default();
    let mut pending = 0usize;
    let mut done: BTreeMap<i32, bool> =
        start.elements().iter().map(|e| (e.partition(), !matches!(e.offset(), Offset::Offset(o) if o < ends[&e.partition()]))).collect();
    let mut idle = 0;
    while done.values().any(|d| !d) {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await else {
            // Transaction markers occupy offsets no record is delivered for: a partition is
            // done when the consumer's position passed the snapshot end.
            let position = consumer.position()?;
            for e in position.elements() {
                if let (Offset::Offset(o), Some(end)) = (e.offset(), ends.get(&e.partition())) {
                    if o >= *end {
                        done.insert(e.partition(), true);
                    }
                }
            }
            idle += 1;
            anyhow::ensure!(idle < 15 || done.values().all(|d| *d), "replay: {} stopped short of the snapshot end", from.name);
            continue;
        };
        let m = m?;
        idle = 0;
        let end = ends[&m.partition()];
        if m.offset() >= end - 1 {
            done.insert(m.partition(), true);
        }
        if m.offset() >= end {
            continue;
        }
        let headers: Vec<(String, Vec<u8>)> =
            m.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let origin = get(DLQ_SOURCE).map(|s| s.parse::<Position>());
        if let Some(Err(e)) = &origin {
            tracing::warn!(at = %Position::of(&m), error = %e, "DLQ record with a malformed {DLQ_SOURCE} header: skipped");
        }
        let origin = origin.and_then(Result::ok);
        let target = match (&fixed_target, &origin) {
            (Some(t), _) => t.clone(),
            (None, Some(src)) => src.topic.clone(),
            (None, None) => {
                report.skipped += 1;
                continue;
            }
        };
        let reason_ok = r.reason.as_ref().is_none_or(|want| get(DLQ_REASON).is_some_and(|have| have.contains(want.as_str())));
        let source_ok = source_filter.as_ref().is_none_or(|want| *want == target);
        if !reason_ok || !source_ok || target.is_empty() {
            report.skipped += 1;
            continue;
        }
        *report.replayed.entry(target.clone()).or_default() += 1;
        if r.dry_run {
            continue;
        }
        let replay_of = origin.unwrap_or_else(|| Position::of(&m)).to_string();
        let mut out = OwnedHeaders::new();
        for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with("herald-dlq-") && k != headers::REPLAY_OF) {
            out = out.insert(Header { key: k, value: Some(v) });
        }
        out = out.insert(Header { key: headers::REPLAY_OF, value: Some(replay_of.as_bytes()) });
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(out);
        if let Some(key) = m.key() {
            rec = rec.key(key);
        }
        if let Some(p) = m.payload() {
            rec = rec.payload(p);
        }
        producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("replaying to {target}: {e}"))?;
        pending += 1;
    }
    tracing::info!(replayed = pending, "replay finished");
    Ok(report)
}
