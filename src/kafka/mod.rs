//! Kafka plumbing shared by every role: client configuration, reachability checks,
//! the idempotent producer and the admin client used by `topology apply`.

pub mod eos;
pub mod headers;

use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;
use crate::error::Classify;

/// Errors at the Kafka boundary.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Kafka at {brokers} is not reachable within {waited:?}: {detail}. Is the broker running (scripts/stack status) and is kafka.bootstrap_servers right?")]
    Unreachable { brokers: String, waited: Duration, detail: String },
    #[error("Kafka client configuration rejected: {0}")]
    Config(String),
    #[error("Kafka topic {0} has no partitions: does it exist (herald setup)?")]
    NoPartitions(String),
    #[error("Kafka {op} failed: {source}")]
    Op {
        op: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl Classify for BusError {
    fn is_retryable(&self) -> bool {
        match self {
            BusError::Unreachable { .. } => true,
            BusError::Config(_) => false,
            // Topics appear when `herald setup` (or `topology apply`) runs.
            BusError::NoPartitions(_) => true,
            BusError::Op { source, .. } => match source.rdkafka_error_code() {
                Some(code) => !matches!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
                        | rdkafka::types::RDKafkaErrorCode::InvalidConfig
                        | rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::ClusterAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                ),
                None => true,
            },
        }
    }
}

/// Lets a repeated log line through at most once per [`Throttle::EVERY`], counting the rest.
#[derive(Default)]
pub(crate) struct Throttle(std::sync::Mutex<Option<(Instant, u64)>>);

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> Throttle {
        Throttle(std::sync::Mutex::new(None))
    }

    /// `Some(suppressed since the last one)` when this occurrence should be logged.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut s = self.0.lock().unwrap();
        match *s {
            Some((at, ref mut n)) if at.elapsed() < Self::EVERY => {
                *n += 1;
                None
            }
            Some((_, n)) => {
                *s = Some((Instant::now(), 0));
                Some(n)
            }
            None => {
                *s = Some((Instant::now(), 0));
                Some(0)
            }
        }
    }
}

/// The base librdkafka configuration every client of `role` starts from.
pub fn client_config(cfg: &KafkaConfig, role: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", format!("{}-{}", cfg.group_prefix, role))
        .set("security.protocol", &cfg.security_protocol)
        .set("socket.connection.setup.timeout.ms", cfg.request_timeout_ms.to_string())
        .set("log_level", "3");
    if let Some(m) = &cfg.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &cfg.sasl_username {
        c.set("sasl.username", u);
        c.set("sasl.password", cfg.sasl_password.expose());
    }
    for (k, v) in &cfg.extra {
        // Environment variables cannot carry dots: `linger_ms` means `linger.ms`.
        c.set(k.replace('_', "."), v);
    }
    c
}

/// The consumer group id of a role (`herald-router`, `herald-dispatch-sms`, ...).
pub fn group_id(cfg: &KafkaConfig, role: &str) -> String {
    format!("{}-{}", cfg.group_prefix, role)
}

/// An idempotent producer that waits for all in-sync replicas (`acks=all`).
pub fn producer(cfg: &KafkaConfig, role: &str) -> Result<FutureProducer, BusError> {
    client_config(cfg, role)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| BusError::Config(e.to_string()))
}

/// The admin client (topic management).
pub fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, BusError> {
    client_config(cfg, "admin").create().map_err(|e| BusError::Config(e.to_string()))
}

/// Cluster facts gathered by [`check_reachable`].
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub brokers: usize,
    pub topics: Vec<String>,
}

/// Fetches cluster metadata, failing with [`BusError::Unreachable`] after
/// `kafka.connect_timeout_ms` instead of letting librdkafka retry forever.
pub async fn check_reachable(cfg: &KafkaConfig) -> Result<ClusterInfo, BusError> {
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let consumer: BaseConsumer = client_config(cfg, "probe").create().map_err(|e| BusError::Config(e.to_string()))?;
    let brokers = cfg.bootstrap_servers.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(None, timeout).map_err(|e| BusError::Unreachable {
            brokers,
            waited: started.elapsed(),
            detail: e.to_string(),
        })?;
        Ok(ClusterInfo { brokers: md.brokers().len(), topics: md.topics().iter().map(|t| t.name().to_string()).collect() })
    })
    .await
    .expect("metadata probe task panicked")
}
