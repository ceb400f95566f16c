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
    pub router: RouterConfig,
    pub dispatch: DispatchConfig,
    /// Provider endpoints and credentials (`[providers.apns]`, ...).
    pub providers: crate::providers::ProvidersConfig,
    /// The provider sandbox (`herald sandbox`): what it listens on and accepts.
    pub sandbox: crate::sandbox::SandboxConfig,
    pub api: crate::api::config::ApiConfig,
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
    /// Extra librdkafka properties applied to every client (escape hatch). Values may be
    /// written as numbers or booleans too.
    #[serde(deserialize_with = "scalar_map")]
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
        RegistryConfig { url: "http://127.0.0.1:8081/apis/ccompat/v7".into(), username: None, password: Secret::default(), timeout_ms: 5_000 }
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
        TelemetryConfig { log_filter: "info,scylla=warn".into(), log_format: "text".into(), metrics_listen: None }
    }
}

/// Serde helpers for durations written as `"250ms"`, `"10s"`, `"5m"`, `"12h"`, `"7d"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `"10s"`, `"1m"`, `"12h"`, `"7d"`, `"250ms"`.
    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = s.split_at(split);
        let n: u64 = n.parse().ok()?;
        let ms = match unit {
            "ms" => n,
            "s" => n * 1_000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => return None,
        };
        Some(Duration::from_millis(ms))
    }

    /// The shortest exact spelling of `d` (`"90s"`, `"7d"`).
    pub fn format(d: &Duration) -> String {
        let ms = d.as_millis() as u64;
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
            if ms >= size && ms.is_multiple_of(size) {
                return format!("{}{unit}", ms / size);
            }
        }
        format!("{ms}ms")
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a duration like 10s, 5m, 7d")))
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = Option::<String>::deserialize(d)?;
            s.map(|s| super::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a duration like 10s, 5m, 7d")))).transpose()
        }
    }
}

/// The router role: dedup, enrichment, preferences, throttling, quiet hours, templates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Stable id of this router replica (pod name in a StatefulSet). It names the Kafka
    /// transactional id, so a restarted replica fences its dead predecessor at once.
    pub instance_id: String,
    /// Records per transaction at most, and how long to wait to fill a batch.
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    /// Users processed concurrently within a batch (one user's events stay sequential).
    pub concurrency: usize,
    /// `transaction.timeout.ms`: how long a dead replica's open transaction can block readers.
    pub transaction_timeout_ms: u64,
    /// Collect and route the next batch while the current one's transaction commits.
    pub pipelined: bool,
    /// How long dedup claims live.
    #[serde(with = "duration")]
    pub dedup_ttl: Duration,
    /// How dedup claims are made. `keyed` (default): a plain read and write for records on
    /// the requests topic keyed by their own user id (one router holds all of a user's
    /// records at a time), a lightweight transaction for every other record (trigger
    /// topics, other keys). `lwt`: a lightweight transaction for every record (safe even
    /// when one event id arrives on two partitions at once; several times the store's work).
    /// `single_writer`: a read and a write for every record, trusting every producer to key
    /// by user id.
    pub dedup_mode: String,
    /// Bounded in-process cache of users, devices, preferences and templates.
    pub cache_max_entries: u64,
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// Locale used when neither the request nor the user has one the template offers.
    pub default_locale: String,
    /// Quiet hours in the user's time zone, `HH:MM[:SS]`; non-urgent categories wait for `end`.
    pub quiet_hours_start: String,
    pub quiet_hours_end: String,
    /// Time zone for users without one.
    pub default_timezone: String,
    /// Where email tracking links point (the API's public base URL) and the signing key.
    pub tracking_base_url: String,
    pub tracking_secret: Secret,
    /// Per-category policy; unknown categories are rejected.
    pub categories: BTreeMap<String, CategoryConfig>,
    /// Upstream domain topics turned into notifications without code.
    pub triggers: Vec<TriggerConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        let cat = |opt_in_default, opt_out_allowed, priority: &str, throttle: Option<(u32, u64)>, quiet: bool, max_age: Option<u64>| CategoryConfig {
            opt_in_default,
            opt_out_allowed,
            priority: priority.to_string(),
            throttle_limit: throttle.map(|t| t.0),
            throttle_window: throttle.map(|t| Duration::from_secs(t.1)),
            quiet_hours: quiet,
            max_age: max_age.map(Duration::from_secs),
        };
        RouterConfig {
            instance_id: "0".into(),
            batch_max: 500,
            batch_wait_ms: 20,
            concurrency: 64,
            transaction_timeout_ms: 10_000,
            pipelined: true,
            dedup_ttl: Duration::from_secs(7 * 86_400),
            dedup_mode: "keyed".into(),
            cache_max_entries: 100_000,
            cache_ttl: Duration::from_secs(300),
            default_locale: "en".into(),
            quiet_hours_start: "21:00".into(),
            quiet_hours_end: "08:00".into(),
            default_timezone: "UTC".into(),
            tracking_base_url: "http://127.0.0.1:8080".into(),
            tracking_secret: Secret::new("dev-tracking-secret-change-me"),
            categories: BTreeMap::from([
                // Login codes: always on, urgent, pointless after 10 minutes.
                ("security".to_string(), cat(true, false, "high", None, false, Some(600))),
                ("billing".to_string(), cat(true, true, "normal", None, false, Some(7 * 86_400))),
                ("shipping".to_string(), cat(true, true, "normal", Some((10, 86_400)), true, Some(3 * 86_400))),
                ("marketing".to_string(), cat(true, true, "low", Some((3, 86_400)), true, Some(86_400))),
            ]),
            // The example upstream event in topology/ (orders.shipped).
            triggers: vec![TriggerConfig {
                topic: "upstream.orders_shipped".into(),
                category: "shipping".into(),
                template: "order_shipped".into(),
                user_id: "customer.id".into(),
                event_id: "order_id".into(),
                params: BTreeMap::from([
                    ("order_id".to_string(), "order_id".to_string()),
                    ("carrier".to_string(), "carrier".to_string()),
                    ("tracking_code".to_string(), "tracking_code".to_string()),
                ]),
                channels: Vec::new(),
            }],
        }
    }
}

/// Policy of one notification category.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// Whether a user with no stored preference gets it.
    pub opt_in_default: bool,
    /// `false` for must-deliver messages (security codes): stored opt-outs are ignored.
    pub opt_out_allowed: bool,
    /// `low` | `normal` | `high`; a request may ask for more, never less.
    pub priority: String,
    /// At most `throttle_limit` per user × channel within `throttle_window`; none = unlimited.
    #[serde(default)]
    pub throttle_limit: Option<u32>,
    #[serde(default, with = "duration::option")]
    pub throttle_window: Option<Duration>,
    /// Held during the user's quiet hours.
    pub quiet_hours: bool,
    /// Requests older than this (since occurred_at) expire.
    #[serde(default, with = "duration::option")]
    pub max_age: Option<Duration>,
}

/// The dispatcher role (`herald dispatch --channel <c>`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Stable replica id; names the transactional id like the router's.
    pub instance_id: String,
    pub batch_max: usize,
    pub batch_wait_ms: u64,
    pub transaction_timeout_ms: u64,
    /// Deliveries in flight per dispatcher (per-provider limits apply on top).
    pub concurrency: usize,
    /// Retry delays are spread by ± this fraction.
    pub jitter: f64,
    /// Provider order per channel; the first whose circuit is closed gets the traffic.
    pub routes: BTreeMap<String, Vec<String>>,
    /// Per-category overrides of `routes`: category → channel → provider order.
    pub category_routes: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Per-provider limits (missing = the default below).
    pub limits: BTreeMap<String, ProviderLimit>,
    pub default_limit: ProviderLimit,
    /// Consecutive transient failures that open a provider's circuit, and for how long.
    pub breaker_failures: u32,
    #[serde(with = "duration")]
    pub breaker_open_for: Duration,
    /// How long a provider that refused herald's credentials stays out of the rotation
    /// before one probe tries it again.
    #[serde(with = "duration")]
    pub breaker_unhealthy_for: Duration,
    /// The group-commit writer: store writes (sent records, log rows) are written at most
    /// this long after they were queued (the window in which a SIGKILL can cause a re-send)...
    pub write_interval_ms: u64,
    /// ...or as soon as this many are waiting.
    pub write_max_rows: usize,
    /// How long a batch waits for its store writes before it is rewound and tried again
    /// (its sends are remembered: nothing is sent twice); the writer keeps retrying.
    pub durable_wait_ms: u64,
}

/// Client-side limits of one provider.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderLimit {
    pub concurrency: usize,
    pub rate_per_sec: f64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        let order = |ps: &[&str]| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        DispatchConfig {
            instance_id: "0".into(),
            batch_max: 500,
            batch_wait_ms: 20,
            transaction_timeout_ms: 30_000,
            // At least batch_max: a whole batch's provider calls overlap, so provider latency
            // costs one round trip per batch, not several.
            concurrency: 500,
            jitter: 0.2,
            routes: BTreeMap::from([
                ("apns".to_string(), order(&["apns"])),
                ("fcm".to_string(), order(&["fcm"])),
                ("sms".to_string(), order(&["twilio", "vonage"])),
                ("email".to_string(), order(&["sendgrid", "mandrill"])),
            ]),
            category_routes: BTreeMap::new(),
            limits: BTreeMap::from([
                // Vonage's default account limit is 30 requests/s.
                ("vonage".to_string(), ProviderLimit { concurrency: 30, rate_per_sec: 30.0 }),
                ("twilio".to_string(), ProviderLimit { concurrency: 100, rate_per_sec: 100.0 }),
            ]),
            default_limit: ProviderLimit { concurrency: 500, rate_per_sec: 5_000.0 },
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(30),
            breaker_unhealthy_for: Duration::from_secs(60),
            write_interval_ms: 5,
            write_max_rows: 400,
            durable_wait_ms: 10_000,
        }
    }
}

/// Maps an upstream domain topic onto a notification.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Topology id of the upstream topic (its value is Confluent-framed Avro).
    pub topic: String,
    pub category: String,
    pub template: String,
    /// Dotted field path of the user id in the event, e.g. `customer.id`.
    pub user_id: String,
    /// Dotted field path of a unique id; the event id becomes `<topic>:<value>`.
    pub event_id: String,
    /// Template parameter name → dotted field path.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Channels to use; empty = the template's defaults.
    #[serde(default)]
    pub channels: Vec<String>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Defaults, then `file` (if any), then `HERALD__…` variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut tree = toml::Value::try_from(Config::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            let file_tree: toml::Value = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
            merge(&mut tree, file_tree);
        }
        let mut overrides: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        overrides.sort();
        for (key, value) in overrides {
            let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut tree, &path, &value).map_err(|msg| ConfigError::Invalid(format!("environment variable {key}: {msg}")))?;
        }
        let config: Config = tree.try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
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
        if !self.store.keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || self.store.keyspace.is_empty() {
            return bad("store.keyspace must be [A-Za-z0-9_]+");
        }
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://")) {
            return bad("registry.url must be an http(s) URL");
        }
        if self.registry.url.ends_with('/') {
            return bad("registry.url must not end with '/'");
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return bad("telemetry.log_format must be 'text' or 'json'");
        }
        let r = &self.router;
        for (name, c) in &r.categories {
            if !matches!(c.priority.as_str(), "low" | "normal" | "high") {
                return bad(&format!("router.categories.{name}.priority must be low, normal or high"));
            }
            if c.throttle_limit.is_some() != c.throttle_window.is_some() {
                return bad(&format!("router.categories.{name}: throttle_limit and throttle_window go together"));
            }
        }
        for t in &r.triggers {
            if !r.categories.contains_key(&t.category) {
                return bad(&format!("router.triggers ({}): unknown category '{}'", t.topic, t.category));
            }
        }
        for (what, hm) in [("quiet_hours_start", &r.quiet_hours_start), ("quiet_hours_end", &r.quiet_hours_end)] {
            if crate::router::policy::parse_time(hm).is_none() {
                return bad(&format!("router.{what} must be HH:MM or HH:MM:SS"));
            }
        }
        if r.default_timezone.parse::<chrono_tz::Tz>().is_err() {
            return bad("router.default_timezone is not an IANA time zone");
        }
        if !matches!(r.dedup_mode.as_str(), "keyed" | "lwt" | "single_writer") {
            return bad("router.dedup_mode must be 'keyed', 'lwt' or 'single_writer'");
        }
        if r.batch_max == 0 || r.concurrency == 0 {
            return bad("router.batch_max and router.concurrency must be > 0");
        }
        let d = &self.dispatch;
        let known = |p: &String| p.parse::<crate::providers::Provider>().is_ok();
        for (ch, order) in d.routes.iter().chain(d.category_routes.values().flatten()) {
            if order.is_empty() || !order.iter().all(known) {
                return bad(&format!("dispatch routes for {ch}: {order:?} must name providers (apns, fcm, twilio, vonage, sendgrid, mandrill)"));
            }
            if order.iter().any(|p| p.parse::<crate::providers::Provider>().ok().map(|p| p.channel()) != Some(ch.as_str())) {
                return bad(&format!("dispatch routes for {ch}: {order:?} has a provider of another channel"));
            }
        }
        if !(0.0..1.0).contains(&d.jitter) {
            return bad("dispatch.jitter must be in [0, 1)");
        }
        self.api.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// A map of strings that also accepts numbers and booleans as values (librdkafka settings).
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            toml::Value::Integer(i) => Ok((k, i.to_string())),
            toml::Value::Float(f) => Ok((k, f.to_string())),
            toml::Value::Boolean(b) => Ok((k, b.to_string())),
            other => Err(serde::de::Error::custom(format!("{k}: expected a scalar, got {other}"))),
        })
        .collect()
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
        node = table.entry(p.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node.as_table_mut().ok_or(format!("'{last}' is not inside a section"))?;
    let value = match table.get(last) {
        Some(toml::Value::Array(_)) => {
            toml::Value::Array(raw.split(',').map(|s| s.trim()).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect())
        }
        Some(toml::Value::Integer(_)) => toml::Value::Integer(raw.parse().map_err(|_| format!("'{raw}' is not an integer"))?),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(raw.parse().map_err(|_| format!("'{raw}' is not true/false"))?),
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        // Unset optional values: take the TOML scalar the text looks like.
        _ => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .or_else(|_| raw.parse::<bool>().map(toml::Value::Boolean))
            .unwrap_or_else(|_| toml::Value::String(raw.to_string())),
    };
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// config/herald.example.toml, README's example of every section a deployment writes,
    /// loads without an unknown key and means what its comments say.
    #[test]
    fn the_commented_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/herald.example.toml");
        let c = Config::load_from(Some(&path), Vec::new()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(c.dispatch.category_routes["security"]["sms"], ["vonage", "twilio"]);
        assert_eq!(c.dispatch.category_routes["marketing"]["email"], ["mandrill"]);
        assert_eq!(c.dispatch.limits["vonage"].rate_per_sec, 30.0);
        let t = &c.router.triggers[..];
        assert_eq!(t.len(), 1, "the file's triggers replace the defaults");
        assert_eq!((t[0].topic.as_str(), t[0].event_id.as_str(), t[0].params.len()), ("upstream.orders_shipped", "order_id", 3));
        assert_eq!(t[0].channels, ["apns", "fcm", "email"]);
        assert!(!c.router.categories["marketing"].opt_in_default);
        assert_eq!(c.router.categories["marketing"].throttle_window, Some(Duration::from_secs(86_400)));
        assert_eq!(c.kafka.extra["ssl.ca.location"], "/etc/herald/kafka-ca.pem");
        assert_eq!(c.api.replicas, 3);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
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
        std::fs::write(&path, "[kafka]\nbootstrap_servers = \"file:9092\"\nrequest_timeout_ms = 111\n[store]\nkeyspace = \"from_file\"\n").unwrap();
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
    fn nested_and_unset_optional_values_can_be_overridden() {
        let c = Config::load_from(
            None,
            env(&[
                ("HERALD__ROUTER__CATEGORIES__BILLING__THROTTLE_LIMIT", "5"),
                ("HERALD__ROUTER__CATEGORIES__BILLING__THROTTLE_WINDOW", "1h"),
                ("HERALD__ROUTER__INSTANCE_ID", "7"),
            ]),
        )
        .unwrap();
        let billing = &c.router.categories["billing"];
        assert_eq!(billing.throttle_limit, Some(5));
        assert_eq!(billing.throttle_window, Some(Duration::from_secs(3600)));
        assert_eq!(c.router.instance_id, "7");
        let e = Config::load_from(None, env(&[("HERALD__ROUTER__CATEGORIES__BILLING__THROTTLE_LIMIT", "5")])).unwrap_err().to_string();
        assert!(e.contains("throttle_window"), "{e}");
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let e = Config::load_from(None, env(&[("HERALD__KAFKA__BOOTSTRAP_SERVRES", "x")])).unwrap_err().to_string();
        assert!(e.contains("bootstrap_servres"), "{e}");
        let e = Config::load_from(None, env(&[("HERALD__KAFKA__REQUEST_TIMEOUT_MS", "soon")])).unwrap_err().to_string();
        assert!(e.contains("HERALD__KAFKA__REQUEST_TIMEOUT_MS") && e.contains("soon"), "{e}");
        let e = Config::load_from(None, env(&[("HERALD__STORE__KEYSPACE", "drop table")])).unwrap_err().to_string();
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
                ("HERALD__API__TWILIO_AUTH_TOKEN", "tw-token"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store.password.expose(), "hunter2");
        let printed = format!("{c:?} {c:#?}");
        for s in ["hunter2", "s3cret", "pw-registry", "tw-token"] {
            assert!(!printed.contains(s), "{s} leaked");
        }
        assert!(printed.contains("<redacted>"));
    }
}
