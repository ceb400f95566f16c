//! `[api]`: the HTTP front door's settings (listen address, app-secret encryption key,
//! request limits, per-app rate limits, provider webhook secrets, public base URL).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::config::{duration, Secret};

/// The development encryption key (32 ASCII bytes, base64). `herald api` warns when it
/// is in use; production sets `HERALD__API__ENCRYPTION_KEY` to 32 random bytes, base64.
pub const DEV_ENCRYPTION_KEY: &str = "ZGV2LW9ubHktaGVyYWxkLWFwaS1rZXktY2hhbmdlLSE=";

/// Settings of `herald api` (and of `herald apps`, which shares the encryption key).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the HTTP server listens, e.g. `0.0.0.0:8080`.
    pub listen: String,
    /// The URL the outside world uses to reach this API (no trailing `/`). Webhook
    /// signatures of Twilio and Mandrill are computed over `public_base_url + path`, so it
    /// must match what is configured at the provider exactly.
    pub public_base_url: String,
    /// AES-256-GCM key (32 bytes, standard base64) that encrypts app secrets at rest.
    pub encryption_key: Secret,
    /// How far a request's `X-Herald-Timestamp` may be from the server's clock, in seconds.
    pub timestamp_tolerance_secs: u64,
    /// Signatures remembered for replay detection at most (about 40 bytes each); when full,
    /// signed requests are refused (503) until old ones leave the window.
    pub replay_cache_max_entries: u64,
    /// Where replayed signatures are caught. `process`: each API process remembers the
    /// signatures it accepted, with no store work; enough for one replica, or for replicas
    /// that a balancer picks by `X-Herald-Key`. `shared`: every signature is also claimed in
    /// the store (`api_signatures`: a quorum write, then a quorum read of the signature's
    /// claims; kept past the timestamp window), so a request replayed to another replica is
    /// refused too, at a store write and read per signed request. `auto` (default):
    /// `shared` when `replicas` > 1, else `process`.
    pub replay_guard: ReplayGuard,
    /// How many API processes serve behind one balancer. Each admits `1/replicas` of an
    /// app's rate and burst, so an app's limit holds across them when the balancer spreads
    /// requests evenly (rate limits are kept per process, without store work).
    pub replicas: u32,
    /// Largest accepted request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest accepted provider webhook body, in bytes (413 above). SendGrid posts event
    /// batches of up to 768 KB, so the default is 1 MiB.
    pub webhook_max_body_bytes: usize,
    /// Longest accepted request target (path and query), in bytes (414 above).
    pub max_uri_bytes: usize,
    /// Largest accepted request head: header names and values together, in bytes, and at
    /// most `max_headers` of them (431 above).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// A connection's request line and headers must have arrived this long after the
    /// connection opened or its previous answer was sent (HTTP/1), else it is closed.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A request's whole body must have arrived this long after its headers (408 after).
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// A connection without a request in flight for this long is closed (HTTP/2: GOAWAY).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Connections served at once at most; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How far the timestamp a provider signs into a webhook (SendGrid's
    /// `X-Twilio-Email-Event-Webhook-Timestamp`, Vonage's `timestamp`) may be from the
    /// server's clock; older or newer signed webhooks are refused (401 `stale_webhook`).
    #[serde(with = "duration")]
    pub webhook_timestamp_tolerance: Duration,
    /// How long a webhook event that became an outcome is remembered, so that the same
    /// event posted again (a provider's retry, a replay) emits no second outcome.
    #[serde(with = "duration")]
    pub webhook_dedup_ttl: Duration,
    /// At most this many template params per request, each value at most
    /// `max_param_bytes`, all keys and values together at most `max_params_total_bytes`.
    pub max_params: usize,
    pub max_param_bytes: usize,
    pub max_params_total_bytes: usize,
    /// Recipients per batch call at most.
    pub max_batch: usize,
    /// Default per-app request rate (requests per second, token bucket) and burst; an app
    /// may carry its own rate (`herald apps create --rate-limit`). 0 = unlimited.
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    /// How long a looked-up app stays cached in each API process before it is re-read.
    /// Rotations and revocations reach every API process at once through the changes
    /// topic; this bounds one whose announcement was missed.
    #[serde(with = "duration")]
    pub app_cache_ttl: Duration,
    /// How long a template stays cached for request validation before it is re-read (new
    /// versions arrive through the changes topic; this is the bound should one be missed).
    #[serde(with = "duration")]
    pub template_cache_ttl: Duration,
    /// After `herald apps rotate`, the previous secret stays valid this long.
    #[serde(with = "duration")]
    pub rotation_grace: Duration,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(with = "duration")]
    pub idempotency_ttl: Duration,
    /// `linger.ms` of the API's idempotent producer (small: the caller waits for the ack).
    pub producer_linger_ms: u64,
    /// How long a produce may wait for Kafka's acknowledgement before the call fails (503).
    pub produce_timeout_ms: u64,
    /// Twilio auth token: key of `X-Twilio-Signature` (HMAC-SHA1). Empty = endpoint off.
    pub twilio_auth_token: Secret,
    /// SendGrid signed event webhook: the verification key (base64 DER SubjectPublicKeyInfo,
    /// ECDSA P-256) from SendGrid's settings. Not a secret. Empty = endpoint off.
    pub sendgrid_public_key: String,
    /// Mailchimp Transactional webhook key: key of `X-Mandrill-Signature` (HMAC-SHA1).
    /// Empty = endpoint off.
    pub mandrill_webhook_key: Secret,
    /// Vonage signature secret for signed delivery receipts. Empty = endpoint off.
    pub vonage_signature_secret: Secret,
    /// Vonage's signature method, as set in its dashboard: `md5hash` (MD5 hash), or the
    /// HMACs `md5`, `sha1`, `sha256`, `sha512`.
    pub vonage_signature_method: String,
}

/// `api.replay_guard`: how far a signature's single use is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayGuard {
    /// `Shared` when more than one API process serves (`api.replicas`), else `Process`.
    #[default]
    Auto,
    /// In this process only (memory).
    Process,
    /// Across every API process sharing the store (a write and a read per request).
    Shared,
}

impl ApiConfig {
    /// How long a claimed signature must be kept: a request is fresh while its timestamp is
    /// within the tolerance either side of the clock, so its signature can come back until
    /// twice the tolerance after it was first seen; a minute more for clocks of replicas
    /// that differ.
    pub fn signature_ttl(&self) -> Duration {
        Duration::from_secs(2 * self.timestamp_tolerance_secs + 60)
    }

    /// The guard in force: `auto` resolved by `replicas`.
    pub fn replay_guard(&self) -> ReplayGuard {
        match self.replay_guard {
            ReplayGuard::Auto if self.replicas > 1 => ReplayGuard::Shared,
            ReplayGuard::Auto => ReplayGuard::Process,
            g => g,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            public_base_url: "http://127.0.0.1:8080".into(),
            encryption_key: Secret::new(DEV_ENCRYPTION_KEY),
            timestamp_tolerance_secs: 300,
            replay_cache_max_entries: 10_000_000,
            replay_guard: ReplayGuard::Auto,
            replicas: 1,
            max_body_bytes: 256 * 1024,
            webhook_max_body_bytes: 1024 * 1024,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            webhook_timestamp_tolerance: Duration::from_secs(600),
            webhook_dedup_ttl: Duration::from_secs(4 * 86_400),
            max_params: 50,
            max_param_bytes: 2048,
            max_params_total_bytes: 16 * 1024,
            max_batch: 1000,
            rate_limit_per_second: 200,
            rate_limit_burst: 400,
            app_cache_ttl: Duration::from_secs(300),
            template_cache_ttl: Duration::from_secs(300),
            rotation_grace: Duration::from_secs(86_400),
            idempotency_ttl: Duration::from_secs(86_400),
            producer_linger_ms: 1,
            produce_timeout_ms: 10_000,
            twilio_auth_token: Secret::default(),
            sendgrid_public_key: String::new(),
            mandrill_webhook_key: Secret::default(),
            vonage_signature_secret: Secret::default(),
            vonage_signature_method: "sha256".into(),
        }
    }
}

impl ApiConfig {
    /// The decoded AES-256 key.
    ///
    /// # Errors
    /// A message naming the setting when it is not 32 bytes of standard base64.
    pub fn encryption_key_bytes(&self) -> Result<[u8; 32], String> {
        let raw = B64.decode(self.encryption_key.expose().trim()).map_err(|_| "api.encryption_key must be standard base64".to_string())?;
        raw.try_into().map_err(|_| "api.encryption_key must decode to exactly 32 bytes".to_string())
    }

    /// Checks that cannot be expressed in types (called from `Config::validate`).
    pub fn validate(&self) -> Result<(), String> {
        self.encryption_key_bytes()?;
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err("api.listen must be host:port with an IP address".into());
        }
        if !(self.public_base_url.starts_with("http://") || self.public_base_url.starts_with("https://")) || self.public_base_url.ends_with('/') {
            return Err("api.public_base_url must be an http(s) URL without a trailing '/'".into());
        }
        if !matches!(self.vonage_signature_method.as_str(), "md5hash" | "md5" | "sha1" | "sha256" | "sha512") {
            return Err("api.vonage_signature_method must be md5hash, md5, sha1, sha256 or sha512".into());
        }
        if self.replicas == 0 {
            return Err("api.replicas must be at least 1".into());
        }
        if self.max_body_bytes < 1024 || self.max_batch == 0 {
            return Err("api.max_body_bytes must be >= 1024 and api.max_batch > 0".into());
        }
        if self.webhook_max_body_bytes < 1024 || self.max_uri_bytes < 256 || self.max_header_bytes < 1024 || self.max_headers < 16 {
            return Err("api.webhook_max_body_bytes and api.max_header_bytes must be >= 1024, api.max_uri_bytes >= 256, api.max_headers >= 16".into());
        }
        if self.max_connections == 0 || [self.header_read_timeout, self.body_read_timeout, self.idle_timeout].iter().any(Duration::is_zero) {
            return Err("api.max_connections and the api timeouts must be above 0".into());
        }
        Ok(())
    }

    pub fn uses_dev_key(&self) -> bool {
        self.encryption_key.expose() == DEV_ENCRYPTION_KEY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_key_decodes() {
        let c = ApiConfig::default();
        c.validate().unwrap();
        assert_eq!(c.encryption_key_bytes().unwrap().len(), 32);
        assert!(c.uses_dev_key());
        assert!(!format!("{c:?}").contains(DEV_ENCRYPTION_KEY));
    }

    #[test]
    fn bad_keys_and_urls_are_named() {
        let c = ApiConfig { encryption_key: Secret::new("c2hvcnQ="), ..Default::default() };
        assert!(c.validate().unwrap_err().contains("32 bytes"));
        let c = ApiConfig { public_base_url: "http://x/".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().contains("public_base_url"));
        let c = ApiConfig { replicas: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("replicas"));
    }

    #[test]
    fn replay_guard_parses_and_outlives_the_timestamp_window() {
        #[derive(Deserialize)]
        struct T {
            api: ApiConfig,
        }
        let t: T = toml::from_str("[api]\nreplay_guard = \"shared\"\nreplicas = 3").unwrap();
        assert_eq!((t.api.replay_guard, t.api.replicas), (ReplayGuard::Shared, 3));
        assert!(toml::from_str::<T>("[api]\nreplay_guard = \"cluster\"").is_err());
        assert_eq!(t.api.replay_guard(), ReplayGuard::Shared);
        // Auto: one process guards itself; several share the store.
        assert_eq!(ApiConfig::default().replay_guard(), ReplayGuard::Process);
        assert_eq!(ApiConfig { replicas: 3, ..Default::default() }.replay_guard(), ReplayGuard::Shared);
        assert_eq!(ApiConfig { replicas: 3, replay_guard: ReplayGuard::Process, ..Default::default() }.replay_guard(), ReplayGuard::Process);
        let c = ApiConfig::default();
        assert!(c.signature_ttl() > Duration::from_secs(2 * c.timestamp_tolerance_secs));
    }
}
