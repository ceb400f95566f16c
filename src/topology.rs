//! The declared Kafka topology (`topology/topics.toml`): parsing, lookup by id, and
//! `apply` / `plan`, which create topics and reconcile their configs through the admin API.
//!
//! The file owns every topic-level config override of herald's topics: apply sets exactly
//! the declared ones (Kafka's AlterConfigs replaces the whole set), and reports anything it
//! cannot or will not change (partition counts, replication factor) as drift.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use serde::Deserialize;

use crate::config::KafkaConfig;
use crate::error::Classify;
use crate::kafka::{self, BusError};

/// The topology built into the binary.
pub const BUILTIN: &str = include_str!("../topology/topics.toml");

/// Errors reading the topology or applying it.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology file {path}: {detail}")]
    Invalid { path: String, detail: String },
    #[error("topology has no topic with id '{0}'")]
    UnknownTopic(String),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("creating topic {topic}: {detail}")]
    Create { topic: String, detail: String },
    #[error("altering configs of topic {topic}: {detail}")]
    Alter { topic: String, detail: String },
}

impl Classify for TopologyError {
    fn is_retryable(&self) -> bool {
        match self {
            TopologyError::Bus(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// How a topic's values are encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueFormat {
    /// Confluent-framed Avro of the named record in `schemas/`.
    Avro(String),
    Json,
    /// Opaque bytes (the DLQ keeps whatever it was given).
    Raw,
}

/// One topic as declared.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub id: String,
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub min_insync_replicas: i32,
    /// `retention.ms`; -1 keeps forever.
    pub retention_ms: i64,
    pub cleanup: String,
    pub key: String,
    pub value: ValueFormat,
    pub producers: Vec<String>,
    pub consumers: Vec<String>,
    pub retry_delay: Option<Duration>,
    pub doc: String,
}

impl TopicSpec {
    /// The topic-level configs this spec declares, for a cluster allowing `max_rf` replicas.
    pub fn configs(&self, max_rf: i32) -> BTreeMap<&'static str, String> {
        let rf = self.replication_factor.min(max_rf).max(1);
        BTreeMap::from([
            ("cleanup.policy", self.cleanup.clone()),
            ("retention.ms", self.retention_ms.to_string()),
            ("min.insync.replicas", self.min_insync_replicas.min(rf).to_string()),
        ])
    }
}

/// All declared topics.
#[derive(Debug, Clone)]
pub struct Topology {
    pub topics: Vec<TopicSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDefaults {
    partitions: i32,
    replication_factor: i32,
    min_insync_replicas: i32,
    retention: String,
    cleanup: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTopic {
    id: String,
    name: String,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    min_insync_replicas: Option<i32>,
    retention: Option<String>,
    cleanup: Option<String>,
    key: String,
    value: String,
    #[serde(default)]
    producers: Vec<String>,
    #[serde(default)]
    consumers: Vec<String>,
    retry_delay: Option<String>,
    #[serde(default)]
    doc: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    defaults: FileDefaults,
    topic: Vec<FileTopic>,
}

pub use crate::config::duration::parse as parse_duration;

impl Topology {
    /// The topology compiled into herald.
    pub fn builtin() -> Topology {
        Topology::parse(BUILTIN, "topology/topics.toml (built in)").expect("the built-in topology is valid (checked by tests)")
    }

    /// Loads `path`, or the built-in file when `None`.
    pub fn load(path: Option<&Path>) -> Result<Topology, TopologyError> {
        match path {
            None => Ok(Topology::builtin()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| TopologyError::Invalid { path: p.display().to_string(), detail: e.to_string() })?;
                Topology::parse(&text, &p.display().to_string())
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let bad = |detail: String| TopologyError::Invalid { path: origin.to_string(), detail };
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let d = &file.defaults;
        let mut topics = Vec::new();
        let mut seen = HashMap::new();
        for t in file.topic {
            if seen.insert(t.id.clone(), ()).is_some() {
                return Err(bad(format!("duplicate topic id '{}'", t.id)));
            }
            let retention = t.retention.as_deref().unwrap_or(&d.retention);
            let retention_ms = if retention == "forever" {
                -1
            } else {
                parse_duration(retention).ok_or_else(|| bad(format!("{}: bad retention '{retention}'", t.id)))?.as_millis() as i64
            };
            let value = match t.value.as_str() {
                "json" => ValueFormat::Json,
                "raw" => ValueFormat::Raw,
                v => match v.strip_prefix("avro:") {
                    Some(record) => {
                        crate::schemas::contract(record).map_err(|e| bad(format!("{}: {e}", t.id)))?;
                        ValueFormat::Avro(record.to_string())
                    }
                    None => return Err(bad(format!("{}: unknown value format '{v}'", t.id))),
                },
            };
            let cleanup = t.cleanup.unwrap_or_else(|| d.cleanup.clone());
            if !matches!(cleanup.as_str(), "delete" | "compact" | "compact,delete") {
                return Err(bad(format!("{}: bad cleanup '{cleanup}'", t.id)));
            }
            let retry_delay = match t.retry_delay {
                None => None,
                Some(s) => Some(parse_duration(&s).ok_or_else(|| bad(format!("{}: bad retry_delay '{s}'", t.id)))?),
            };
            topics.push(TopicSpec {
                partitions: t.partitions.unwrap_or(d.partitions),
                replication_factor: t.replication_factor.unwrap_or(d.replication_factor),
                min_insync_replicas: t.min_insync_replicas.unwrap_or(d.min_insync_replicas),
                id: t.id,
                name: t.name,
                retention_ms,
                cleanup,
                key: t.key,
                value,
                producers: t.producers,
                consumers: t.consumers,
                retry_delay,
                doc: t.doc,
            });
        }
        Ok(Topology { topics })
    }

    /// The topic declared under `id` (e.g. `"requests"`, `"delivery.sms"`).
    pub fn topic(&self, id: &str) -> Result<&TopicSpec, TopologyError> {
        self.topics.iter().find(|t| t.id == id).ok_or_else(|| TopologyError::UnknownTopic(id.to_string()))
    }

    /// Shorthand for the topic name of `id`.
    pub fn name(&self, id: &str) -> Result<&str, TopologyError> {
        self.topic(id).map(|t| t.name.as_str())
    }
}

/// One difference between the declaration and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The topic does not exist yet (apply creates it).
    Create { topic: String, partitions: i32, replication: i32 },
    /// A declared config differs or an undeclared override exists (apply sets the declared set).
    Config { topic: String, key: String, actual: Option<String>, declared: Option<String> },
    /// Drift apply does not fix: partition count or replication factor differ.
    Drift { topic: String, detail: String },
}

impl Change {
    /// Whether `apply` fixes this change.
    pub fn fixable(&self) -> bool {
        !matches!(self, Change::Drift { .. })
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Create { topic, partitions, replication } => {
                write!(f, "create  {topic} (partitions={partitions}, replication={replication})")
            }
            Change::Config { topic, key, actual, declared } => write!(
                f,
                "config  {topic}: {key} {} -> {}",
                actual.as_deref().unwrap_or("(default)"),
                declared.as_deref().unwrap_or("(default: undeclared override removed)")
            ),
            Change::Drift { topic, detail } => write!(f, "DRIFT   {topic}: {detail} (not changed by apply)"),
        }
    }
}

/// The result of comparing (and possibly applying) the topology.
#[derive(Debug, Clone)]
pub struct Report {
    pub brokers: usize,
    /// Replication factors were capped at this (the broker count).
    pub max_replication: i32,
    pub changes: Vec<Change>,
    pub applied: bool,
}

impl Report {
    pub fn drift(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| !c.fixable())
    }
}

/// Compares the cluster with the declaration; when `apply` is set, creates missing topics
/// and reconciles configs, then re-plans so the report shows what is left.
pub async fn reconcile(cfg: &KafkaConfig, topology: &Topology, apply: bool) -> Result<Report, TopologyError> {
    let info = kafka::check_reachable(cfg).await?;
    let max_rf = info.brokers.max(1) as i32;
    let changes = plan(cfg, topology, max_rf).await?;
    if !apply || changes.iter().all(|c| !c.fixable()) {
        return Ok(Report { brokers: info.brokers, max_replication: max_rf, changes, applied: false });
    }
    let admin = kafka::admin(cfg)?;
    let opts = AdminOptions::new().request_timeout(Some(cfg.request_timeout())).operation_timeout(Some(cfg.request_timeout()));
    // Create missing topics with their declared configs in one request.
    let to_create: Vec<&TopicSpec> =
        topology.topics.iter().filter(|t| changes.iter().any(|c| matches!(c, Change::Create { topic, .. } if *topic == t.name))).collect();
    if !to_create.is_empty() {
        let configs: Vec<BTreeMap<&str, String>> = to_create.iter().map(|t| t.configs(max_rf)).collect();
        let new_topics: Vec<NewTopic> = to_create
            .iter()
            .zip(&configs)
            .map(|(t, cfgs)| {
                let mut nt = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication_factor.min(max_rf)));
                for (k, v) in cfgs {
                    nt = nt.set(k, v);
                }
                nt
            })
            .collect();
        let results = admin.create_topics(new_topics.iter(), &opts).await.map_err(|source| BusError::Op { op: "create topics", source })?;
        for r in results {
            if let Err((topic, code)) = r {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(TopologyError::Create { topic, detail: code.to_string() });
                }
            }
        }
    }
    // Replace the config set of topics whose configs differ.
    let to_alter: Vec<&TopicSpec> =
        topology.topics.iter().filter(|t| changes.iter().any(|c| matches!(c, Change::Config { topic, .. } if *topic == t.name))).collect();
    if !to_alter.is_empty() {
        let configs: Vec<BTreeMap<&str, String>> = to_alter.iter().map(|t| t.configs(max_rf)).collect();
        let alters: Vec<AlterConfig> = to_alter
            .iter()
            .zip(&configs)
            .map(|(t, cfgs)| {
                let mut a = AlterConfig::new(ResourceSpecifier::Topic(&t.name));
                for (k, v) in cfgs {
                    a = a.set(k, v);
                }
                a
            })
            .collect();
        let results = admin.alter_configs(alters.iter(), &opts).await.map_err(|source| BusError::Op { op: "alter configs", source })?;
        for r in results {
            if let Err((resource, code)) = r {
                return Err(TopologyError::Alter { topic: format!("{resource:?}"), detail: code.to_string() });
            }
        }
    }
    // Creation and config changes propagate asynchronously: wait until the cluster shows them.
    let deadline = std::time::Instant::now() + cfg.request_timeout();
    while plan(cfg, topology, max_rf).await?.iter().any(Change::fixable) {
        if std::time::Instant::now() > deadline {
            return Err(TopologyError::Create {
                topic: "(several)".into(),
                detail: format!("changes not visible after {:?}", cfg.request_timeout()),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Report { brokers: info.brokers, max_replication: max_rf, changes, applied: true })
}

/// What would change: missing topics, config differences, unfixable drift.
pub async fn plan(cfg: &KafkaConfig, topology: &Topology, max_rf: i32) -> Result<Vec<Change>, TopologyError> {
    let md = metadata(cfg).await?;
    let existing: HashMap<&str, (i32, i32)> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let parts = t.partitions().len() as i32;
            let rf = t.partitions().first().map(|p| p.replicas().len() as i32).unwrap_or(0);
            (t.name(), (parts, rf))
        })
        .collect();
    let mut changes = Vec::new();
    let present: Vec<&TopicSpec> = topology.topics.iter().filter(|t| existing.contains_key(t.name.as_str())).collect();
    for t in &topology.topics {
        match existing.get(t.name.as_str()) {
            None => changes.push(Change::Create { topic: t.name.clone(), partitions: t.partitions, replication: t.replication_factor.min(max_rf) }),
            Some(&(parts, rf)) => {
                if parts != t.partitions {
                    changes.push(Change::Drift { topic: t.name.clone(), detail: format!("has {parts} partitions, declared {}", t.partitions) });
                }
                let want_rf = t.replication_factor.min(max_rf);
                if rf != want_rf {
                    changes.push(Change::Drift { topic: t.name.clone(), detail: format!("replication factor {rf}, declared {want_rf}") });
                }
            }
        }
    }
    if present.is_empty() {
        return Ok(changes);
    }
    let admin = kafka::admin(cfg)?;
    let opts = AdminOptions::new().request_timeout(Some(cfg.request_timeout()));
    let specs: Vec<ResourceSpecifier> = present.iter().map(|t| ResourceSpecifier::Topic(&t.name)).collect();
    let described = admin.describe_configs(specs.iter(), &opts).await.map_err(|source| BusError::Op { op: "describe configs", source })?;
    for (t, result) in present.iter().zip(described) {
        let resource = result.map_err(|code| TopologyError::Alter { topic: t.name.clone(), detail: format!("describe configs: {code}") })?;
        let declared = t.configs(max_rf);
        let overrides: BTreeMap<String, Option<String>> = resource
            .entries
            .iter()
            .filter(|e| matches!(e.source, rdkafka::admin::ConfigSource::DynamicTopic))
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        for (k, v) in &declared {
            let actual = overrides.get(*k).cloned().flatten();
            if actual.as_deref() != Some(v.as_str()) {
                changes.push(Change::Config { topic: t.name.clone(), key: k.to_string(), actual, declared: Some(v.clone()) });
            }
        }
        for (k, v) in &overrides {
            if !declared.contains_key(k.as_str()) {
                changes.push(Change::Config { topic: t.name.clone(), key: k.clone(), actual: v.clone(), declared: None });
            }
        }
    }
    Ok(changes)
}

async fn metadata(cfg: &KafkaConfig) -> Result<Metadata, TopologyError> {
    let consumer: BaseConsumer = kafka::client_config(cfg, "topology").create().map_err(|e| BusError::Config(e.to_string()))?;
    let timeout = cfg.request_timeout();
    let brokers = cfg.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| TopologyError::Bus(BusError::Unreachable { brokers, waited: timeout, detail: e.to_string() }))
    })
    .await
    .expect("metadata task panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_topology_is_complete() {
        let t = Topology::builtin();
        for id in ["requests", "delay", "dlq", "outcomes", "changes"] {
            t.topic(id).unwrap();
        }
        for ch in ["apns", "fcm", "sms", "email"] {
            assert_eq!(t.name(&format!("delivery.{ch}")).unwrap(), format!("herald.delivery.{ch}"));
            let delays: Vec<_> = (1..=3).map(|n| t.topic(&format!("retry.{ch}.{n}")).unwrap().retry_delay.unwrap()).collect();
            assert!(delays.windows(2).all(|w| w[0] < w[1]), "retry delays must increase");
        }
        assert_eq!(t.topic("changes").unwrap().cleanup, "compact");
        assert_eq!(t.topic("changes").unwrap().retention_ms, -1);
        let names: std::collections::HashSet<_> = t.topics.iter().map(|t| &t.name).collect();
        assert_eq!(names.len(), t.topics.len(), "topic names are unique");
    }

    #[test]
    fn durations_and_rf_capping() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7 weeks"), None);
        let t = Topology::builtin();
        let c = t.topic("requests").unwrap().configs(1);
        assert_eq!(c["min.insync.replicas"], "1");
        assert_eq!(t.topic("requests").unwrap().configs(3)["min.insync.replicas"], "2");
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        let base = "[defaults]\npartitions=1\nreplication_factor=1\nmin_insync_replicas=1\nretention=\"1d\"\ncleanup=\"delete\"\n";
        let e = Topology::parse(&format!("{base}[[topic]]\nid=\"a\"\nname=\"a\"\nkey=\"k\"\nvalue=\"avro:Nope\"\n"), "t").unwrap_err().to_string();
        assert!(e.contains("Nope"), "{e}");
        let e = Topology::parse(&format!("{base}[[topic]]\nid=\"a\"\nname=\"a\"\nkey=\"k\"\nvalue=\"raw\"\nretention=\"soon\"\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon"), "{e}");
    }
}
