//! One typed configuration tree: defaults in code, an optional TOML file, then
//! `HERALD__SECTION__KEY` environment overrides; secrets are redacted in Debug and logs.
//!
//! Precedence (last wins): [`Config::default`] < the file (`--config` / `HERALD_CONFIG`) <
//! environment. An env override names a path with double underscores, lower-cased:
//! `HERALD__KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `HERALD__STORE__CONTACT_POINTS=a:9042,b:9042`.
//! Values are parsed as TOML scalars when they look like one (numbers, booleans), lists are
//! comma-separated, everything else is a string.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "HERALD__";

/// A secret string: deserialises like a string, never prints its value.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is handed to a client, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The whole configuration of every herald role.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub store: StoreConfig,
    pub topology: TopologyConfig,
    pub telemetry: TelemetryConfig,
}

/// Kafka connection settings shared by every role.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap brokers.
    pub bootstrap_servers: String,
    /// Prefix of client ids and consumer group ids (`<prefix>-router`, ...).
    pub group_prefix: String,
    /// How long the first contact with the cluster may take before a clear error, in ms.
    pub connect_timeout_ms: u64,
    /// How long an admin or metadata call may take before it fails, in milliseconds.
    pub request_timeout_ms: u64,
    /// `security.protocol` (PLAINTEXT locally; SASL_SSL in production).
    pub security_protocol: String,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Secret,
    /// Extra librdkafka properties applied to every client (escape hatch).
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_prefix: "herald".into(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 15_000,
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: Secret::default(),
            extra: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Confluent-compatible schema registry (Apicurio's ccompat API locally).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8081/apis/ccompat/v7`.
    pub url: String,
    pub username: Option<String>,
    pub password: Secret,
    pub timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
            username: None,
            password: Secret::default(),
            timeout_ms: 5_000,
        }
    }
}

/// The CQL store: ScyllaDB in production, Cassandra 5 locally.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// The replication map used when `db migrate` creates the keyspace.
    pub replication: String,
    pub username: Option<String>,
    pub password: Secret,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "herald".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            username: None,
            password: Secret::default(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Where the topic declarations live.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// Path of a topology file; empty = the `topology/topics.toml` built into the binary.
    pub file: Option<PathBuf>,
}

/// Logs and metrics.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter, e.g. `info,herald=debug`; `RUST_LOG` wins when set.
    pub log_filter: String,
    /// `text` or `json`.
    pub log_format: String,
    /// Where roles serve Prometheus `/metrics`; empty = no listener.
    pub metrics_listen: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_filter: "info,scylla=warn".into(),
            log_format: "text".into(),
            metrics_listen: None,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Defaults, then `file` (if any), then `HERALD__…` variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let file_tree: toml::Value =
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?;
            merge(&mut tree, file_tree);
        }
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (key, value) in overrides {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            set_path(&mut tree, &path, &value).map_err(|msg| {
                ConfigError::Invalid(format!("environment variable {key}: {msg}"))
            })?;
        }
        let config: Config = tree
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that cannot be expressed in types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return bad("kafka.bootstrap_servers is empty");
        }
        if self.store.contact_points.is_empty() {
            return bad("store.contact_points is empty");
        }
        if !self
            .store
            .keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.store.keyspace.is_empty()
        {
            return bad("store.keyspace must be [A-Za-z0-9_]+");
        }
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://"))
        {
            return bad("registry.url must be an http(s) URL");
        }
        if self.registry.url.ends_with('/') {
            return bad("registry.url must not end with '/'");
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad("telemetry.log_format must be 'text' or 'json'");
        }
        Ok(())
    }
}

/// Recursively overlays `over` onto `base` (tables merge, everything else replaces).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Sets `path` in the tree to `raw`, typed after the value it replaces.
fn set_path(tree: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut node = tree;
    for p in parents {
        let table = node.as_table_mut().ok_or(format!("'{p}' is not a section"))?;
        node = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node
        .as_table_mut()
        .ok_or(format!("'{last}' is not inside a section"))?;
    let value = match table.get(last) {
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.parse()
                .map_err(|_| format!("'{raw}' is not an integer"))?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(
            raw.parse()
                .map_err(|_| format!("'{raw}' is not true/false"))?,
        ),
        _ => toml::Value::String(raw.to_string()),
    };
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_point_at_the_local_stack() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(c.store.contact_points, vec!["127.0.0.1:9042"]);
        assert_eq!(c.registry.url, "http://127.0.0.1:8081/apis/ccompat/v7");
    }

    #[test]
    fn file_then_env_override_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(
            &path,
            "[kafka]\nbootstrap_servers = \"file:9092\"\nrequest_timeout_ms = 111\n[store]\nkeyspace = \"from_file\"\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&path),
            env(&[
                ("HERALD__KAFKA__BOOTSTRAP_SERVERS", "env:9092"),
                ("HERALD__STORE__CONTACT_POINTS", "a:9042, b:9042"),
                ("HERALD__KAFKA__EXTRA__LINGER_MS", "5"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "env:9092");
        assert_eq!(c.kafka.request_timeout_ms, 111);
        assert_eq!(c.store.keyspace, "from_file");
        assert_eq!(c.store.contact_points, vec!["a:9042", "b:9042"]);
        assert_eq!(c.kafka.extra.get("linger_ms").map(String::as_str), Some("5"));
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let e = Config::load_from(None, env(&[("HERALD__KAFKA__BOOTSTRAP_SERVRES", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bootstrap_servres"), "{e}");
        let e = Config::load_from(None, env(&[("HERALD__KAFKA__REQUEST_TIMEOUT_MS", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("HERALD__KAFKA__REQUEST_TIMEOUT_MS") && e.contains("soon"), "{e}");
        let e = Config::load_from(None, env(&[("HERALD__STORE__KEYSPACE", "drop table")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keyspace"), "{e}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = Config::load_from(
            None,
            env(&[
                ("HERALD__STORE__PASSWORD", "hunter2"),
                ("HERALD__KAFKA__SASL_PASSWORD", "s3cret"),
                ("HERALD__REGISTRY__PASSWORD", "pw-registry"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store.password.expose(), "hunter2");
        let printed = format!("{c:?} {c:#?}");
        for s in ["hunter2", "s3cret", "pw-registry"] {
            assert!(!printed.contains(s), "{s} leaked");
        }
        assert!(printed.contains("<redacted>"));
    }
}
