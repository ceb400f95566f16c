//! Provider clients, one module each: a config, a pure `build_request`, a pure `classify`;
//! here the shared wire types, the outcome classes and helpers; the I/O is in `client`.
//!
//! Per delivery: `build_request` (pure) → [`send`] (the only I/O) → `classify` (pure) →
//! [`Classification`]. [`Clients`] wires these to the reqwest clients and the credential
//! caches of [`auth`]. Builders and classifiers are unit-tested without a network; the
//! wire formats and error classes follow `provider-contracts.md`.
//!
//! Conventions shared by the push providers: the data key [`COLLAPSE_KEY`] is not sent as
//! data but becomes the collapse id (`apns-collapse-id`, FCM `collapse_key`); `low`
//! priority maps to the power-saving priority (APNs 5, FCM `NORMAL`), anything else to
//! immediate delivery.

pub mod apns;
pub mod auth;
mod client;
pub mod fcm;
pub mod mandrill;
pub mod sendgrid;
pub mod twilio;
pub mod vonage;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Classify;
use crate::model::{ChannelDelivery, Priority};
pub use client::{send, Clients};

/// The data key that carries a push collapse id instead of custom data.
pub const COLLAPSE_KEY: &str = "collapse_id";

/// Headers whose values never appear in Debug output.
const SECRET_HEADERS: &[&str] = &["authorization"];

/// A provider by name; each serves one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Apns,
    Fcm,
    Twilio,
    Vonage,
    Sendgrid,
    Mandrill,
}

impl Provider {
    pub const ALL: [Provider; 6] = [Provider::Apns, Provider::Fcm, Provider::Twilio, Provider::Vonage, Provider::Sendgrid, Provider::Mandrill];

    /// The name used in config, metrics labels and outcomes.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
            Provider::Twilio => "twilio",
            Provider::Vonage => "vonage",
            Provider::Sendgrid => "sendgrid",
            Provider::Mandrill => "mandrill",
        }
    }

    /// The delivery channel this provider serves (`ChannelDelivery.channel`).
    pub fn channel(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
            Provider::Twilio | Provider::Vonage => "sms",
            Provider::Sendgrid | Provider::Mandrill => "email",
        }
    }

    /// The providers of a channel, in config order.
    pub fn for_channel(channel: &str) -> impl Iterator<Item = Provider> + '_ {
        Provider::ALL.into_iter().filter(move |p| p.channel() == channel)
    }

    /// Classifies a response of this provider.
    pub fn classify(self, resp: &HttpResponse) -> Classification {
        match self {
            Provider::Apns => apns::classify(resp),
            Provider::Fcm => fcm::classify(resp),
            Provider::Twilio => twilio::classify(resp),
            Provider::Vonage => vonage::classify(resp),
            Provider::Sendgrid => sendgrid::classify(resp),
            Provider::Mandrill => mandrill::classify(resp),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = ProviderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| ProviderError::Config(format!("unknown provider '{s}'")))
    }
}

/// Every provider's settings (`[providers.<name>]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersConfig {
    pub apns: apns::ApnsConfig,
    pub fcm: fcm::FcmConfig,
    pub twilio: twilio::TwilioConfig,
    pub vonage: vonage::VonageConfig,
    pub sendgrid: sendgrid::SendgridConfig,
    pub mandrill: mandrill::MandrillConfig,
}

impl ProvidersConfig {
    /// A provider's base URL and transport settings.
    pub fn transport(&self, p: Provider) -> (&str, &HttpConfig) {
        match p {
            Provider::Apns => (&self.apns.base_url, &self.apns.http),
            Provider::Fcm => (&self.fcm.base_url, &self.fcm.http),
            Provider::Twilio => (&self.twilio.base_url, &self.twilio.http),
            Provider::Vonage => (&self.vonage.base_url, &self.vonage.http),
            Provider::Sendgrid => (&self.sendgrid.base_url, &self.sendgrid.http),
            Provider::Mandrill => (&self.mandrill.base_url, &self.mandrill.http),
        }
    }
}

/// Transport settings of one provider (`[providers.<name>.http]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time to establish a connection (TCP + TLS), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time for a whole request/response exchange, in milliseconds.
    pub request_timeout_ms: u64,
    /// Idle connections kept per host (HTTP/1.1; HTTP/2 multiplexes on one). Keep it at
    /// least the provider's concurrency limit (`dispatch.limits`), or connections beyond it
    /// are closed after each request and opened again under load; idle ones close after 90 s.
    pub pool_max_idle_per_host: usize,
    /// Extra trusted root certificates (PEM), e.g. a local sandbox's generated CA.
    pub root_ca_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { connect_timeout_ms: 5_000, request_timeout_ms: 10_000, pool_max_idle_per_host: 4096, root_ca_file: None }
    }
}

impl HttpConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// A request as the builders produce it; Debug redacts credentials and omits the body.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn post(url: impl Into<String>) -> Self {
        HttpRequest { method: Method::POST, url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// Sets a JSON body and its content type.
    pub fn json(self, body: &Value) -> Self {
        let mut r = self.header("content-type", "application/json");
        r.body = body.to_string().into_bytes();
        r
    }

    /// Sets an `application/x-www-form-urlencoded` body.
    pub fn form<'a>(self, fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut r = self.header("content-type", "application/x-www-form-urlencoded");
        r.body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish().into_bytes();
        r
    }

    /// The first value of a header (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let secret = SECRET_HEADERS.iter().any(|s| k.eq_ignore_ascii_case(s));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

/// A provider's answer; `received_at` anchors relative delays (Retry-After dates).
/// Debug omits the body (token endpoints answer with credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received_at: SystemTime,
}

impl HttpResponse {
    /// A response received now (tests and fakes).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse { status, headers: Vec::new(), body: body.into(), received_at: SystemTime::now() }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The first value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `Retry-After` delay, if the header is present and valid.
    pub fn retry_after(&self) -> Option<Duration> {
        parse_retry_after(self.header("retry-after")?, self.received_at)
    }

    /// `HTTP <status>: <start of the body>`, for reasons of unexpected answers.
    fn summary(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        format!("HTTP {}: {}", self.status, truncate(&text, 120)).trim_end_matches(": ").to_string()
    }
}

impl fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// `Retry-After`: delay-seconds or an HTTP-date (relative to `now`; past dates give zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at: SystemTime = chrono::DateTime::parse_from_rfc2822(value).ok()?.into();
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A reset instant in epoch seconds (SendGrid `X-RateLimit-Reset`) as a delay from `now`.
pub fn parse_epoch_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let at = UNIX_EPOCH + Duration::from_secs(value.trim().parse().ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What a provider's answer means for the delivery (the contract sheet's classes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// Accepted by the provider (not yet delivered); `message_id` correlates receipts.
    Sent { message_id: String },
    /// DEACTIVATE: the address is dead (unregistered token, invalid number, bounced
    /// email); disable it, do not retry.
    InvalidAddress { reason: String },
    /// THROTTLE: retry after `retry_after` (from the provider) or a backoff of our own.
    Throttled { retry_after: Option<Duration>, reason: String },
    /// RETRY: a transient failure; back off with jitter and try again.
    Transient { reason: String },
    /// FAIL: bad request or configuration; retrying the same request cannot succeed.
    Permanent { reason: String },
    /// REAUTH: the credential expired; refresh it and retry once.
    Reauth { reason: String },
    /// The provider refused herald's credentials or account (a wrong or revoked key, a
    /// barred or exhausted account): nothing was sent and nothing will be until an operator
    /// fixes it. The dispatcher marks the provider unhealthy, alerts, and fails over.
    AuthFailed { reason: String },
}

impl Classification {
    fn sent(id: impl Into<String>) -> Self {
        Classification::Sent { message_id: id.into() }
    }
    fn invalid(reason: impl Into<String>) -> Self {
        Classification::InvalidAddress { reason: reason.into() }
    }
    fn throttled(retry_after: Option<Duration>, reason: impl Into<String>) -> Self {
        Classification::Throttled { retry_after, reason: reason.into() }
    }
    fn transient(reason: impl Into<String>) -> Self {
        Classification::Transient { reason: reason.into() }
    }
    fn permanent(reason: impl Into<String>) -> Self {
        Classification::Permanent { reason: reason.into() }
    }
    fn reauth(reason: impl Into<String>) -> Self {
        Classification::Reauth { reason: reason.into() }
    }
    fn auth_failed(reason: impl Into<String>) -> Self {
        Classification::AuthFailed { reason: reason.into() }
    }

    /// A bounded label for metrics and outcomes.
    pub fn label(&self) -> &'static str {
        match self {
            Classification::Sent { .. } => "sent",
            Classification::InvalidAddress { .. } => "invalid_address",
            Classification::Throttled { .. } => "throttled",
            Classification::Transient { .. } => "transient",
            Classification::Permanent { .. } => "permanent",
            Classification::Reauth { .. } => "reauth",
            Classification::AuthFailed { .. } => "auth_failed",
        }
    }

    /// Why it was not sent (`None` for [`Classification::Sent`]).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Classification::Sent { .. } => None,
            Classification::InvalidAddress { reason }
            | Classification::Throttled { reason, .. }
            | Classification::Transient { reason }
            | Classification::Permanent { reason }
            | Classification::Reauth { reason }
            | Classification::AuthFailed { reason } => Some(reason),
        }
    }

    /// By HTTP status alone, for answers a provider's own rules do not cover:
    /// 429 throttles (with Retry-After), 408/5xx are transient, the rest is permanent.
    fn by_status(resp: &HttpResponse, reason: String) -> Self {
        match resp.status {
            429 => Classification::throttled(resp.retry_after(), reason),
            408 | 500..=599 => Classification::transient(reason),
            _ => Classification::permanent(reason),
        }
    }
}

/// A failure before or while exchanging the request (no provider verdict).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider configuration: {0}")]
    Config(String),
    #[error("delivery cannot be sent: {0}")]
    InvalidDelivery(String),
    #[error("invalid address: {0}")]
    InvalidAddress(String),
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("credential: {reason}")]
    Auth { reason: String, retryable: bool },
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The request may have reached the provider: a retry can duplicate.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("transport: {0}")]
    Transport(String),
}

impl Classify for ProviderError {
    fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect(_) | ProviderError::Timeout(_) | ProviderError::Transport(_) => true,
            ProviderError::Auth { retryable, .. } => *retryable,
            ProviderError::Config(_)
            | ProviderError::InvalidDelivery(_)
            | ProviderError::InvalidAddress(_)
            | ProviderError::PayloadTooLarge { .. } => false,
        }
    }
}

impl ProviderError {
    /// The same decision as a [`Classification`], so the dispatcher handles one type.
    pub fn classification(&self) -> Classification {
        let reason = self.to_string();
        match self {
            ProviderError::InvalidAddress(_) => Classification::invalid(reason),
            _ if self.is_retryable() => Classification::transient(reason),
            _ => Classification::permanent(reason),
        }
    }

    fn from_reqwest(e: reqwest::Error, timeout: Duration) -> Self {
        // reqwest's Display stops at "error sending request"; the cause is in the chain.
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            detail = format!("{detail}: {cause}");
            source = cause.source();
        }
        if e.is_timeout() {
            ProviderError::Timeout(timeout)
        } else if e.is_connect() {
            ProviderError::Connect(detail)
        } else if e.is_builder() {
            ProviderError::Config(detail)
        } else {
            ProviderError::Transport(detail)
        }
    }
}

/// `base` + `path` with exactly one slash between them.
fn endpoint(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches('/'))
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A required, non-empty piece of rendered content.
fn required<'a>(value: &'a Option<String>, what: &str) -> Result<&'a str, ProviderError> {
    value.as_deref().filter(|v| !v.is_empty()).ok_or_else(|| ProviderError::InvalidDelivery(format!("no {what} rendered")))
}

/// A required config value.
fn configured<'a>(value: &'a str, what: &str) -> Result<&'a str, ProviderError> {
    if value.trim().is_empty() {
        Err(ProviderError::Config(format!("{what} is not set")))
    } else {
        Ok(value)
    }
}

/// What both push providers send: alert, custom data and collapse id.
struct Push<'a> {
    title: Option<&'a str>,
    body: Option<&'a str>,
    data: BTreeMap<&'a str, &'a str>,
    collapse_id: Option<&'a str>,
    immediate: bool,
}

impl<'a> Push<'a> {
    fn of(d: &'a ChannelDelivery) -> Result<Self, ProviderError> {
        let c = &d.content;
        let title = c.title.as_deref().filter(|s| !s.is_empty());
        let body = c.body.as_deref().filter(|s| !s.is_empty());
        if title.is_none() && body.is_none() {
            return Err(ProviderError::InvalidDelivery("no push title or body rendered".into()));
        }
        if d.address.is_empty() {
            return Err(ProviderError::InvalidAddress("empty device token".into()));
        }
        let mut data: BTreeMap<&str, &str> = c.data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let collapse_id = data.remove(COLLAPSE_KEY);
        Ok(Push { title, body, data, collapse_id, immediate: d.priority != Priority::Low })
    }
}

/// What both email providers send.
struct Email<'a> {
    to: &'a str,
    subject: &'a str,
    text: Option<&'a str>,
    html: Option<&'a str>,
}

impl<'a> Email<'a> {
    fn of(d: &'a ChannelDelivery) -> Result<Self, ProviderError> {
        let c = &d.content;
        let present = |v: &'a Option<String>| v.as_deref().filter(|s| !s.is_empty());
        let (text, html) = (present(&c.text), present(&c.html));
        if text.is_none() && html.is_none() {
            return Err(ProviderError::InvalidDelivery("no email text or html rendered".into()));
        }
        if !d.address.contains('@') {
            return Err(ProviderError::InvalidAddress("not an email address".into()));
        }
        Ok(Email { to: &d.address, subject: required(&c.subject, "email subject")?, text, html })
    }
}

/// Seconds from `now_ms` until the delivery's deadline, clamped to `[min, max]`.
fn seconds_left(d: &ChannelDelivery, now_ms: i64, min: i64, max: i64) -> i64 {
    ((d.deadline - now_ms) / 1000).clamp(min, max)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::RenderedContent;

    /// 2026-01-01T00:00:00Z: the fixed "now" of the provider tests.
    pub const NOW_MS: i64 = 1_767_225_600_000;

    /// A delivery on `channel` to `address`, one hour before its deadline.
    pub fn delivery(channel: &str, address: &str, content: RenderedContent) -> ChannelDelivery {
        ChannelDelivery {
            delivery_id: "d-42".into(),
            event_id: "e-1".into(),
            user_id: "u-7".into(),
            category: "order_shipped".into(),
            template_id: "t-1".into(),
            channel: channel.into(),
            address: address.into(),
            device_id: None,
            locale: "en".into(),
            priority: Priority::Normal,
            content,
            attempt: 0,
            not_before: None,
            deadline: NOW_MS + 3_600_000,
            created_at: NOW_MS,
            last_error: None,
            last_provider: None,
        }
    }

    pub fn body_json(req: &HttpRequest) -> Value {
        serde_json::from_slice(&req.body).expect("JSON body")
    }

    pub fn form(req: &HttpRequest) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&req.body).into_owned().collect()
    }

    pub fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse::new(status, body)
    }

    #[test]
    fn providers_name_their_channel() {
        let sms: Vec<_> = Provider::for_channel("sms").collect();
        assert_eq!(sms, [Provider::Twilio, Provider::Vonage]);
        assert_eq!(Provider::Apns.channel(), "apns");
        assert_eq!(Provider::Fcm.channel(), "fcm");
        assert_eq!(Provider::Mandrill.channel(), "email");
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>().unwrap(), p);
        }
        assert!("pigeon".parse::<Provider>().is_err());
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_epoch_reset("1445412540", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_epoch_reset("x", now), None);

        let mut r = resp(429, "").with_header("Retry-After", "7");
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        r.received_at = now;
        r.headers[0].1 = "Wed, 21 Oct 2015 07:28:10 GMT".into();
        assert_eq!(r.retry_after(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn status_fallback_and_errors_map_to_classes() {
        let c = Classification::by_status(&resp(503, ""), "x".into());
        assert_eq!(c.label(), "transient");
        let c = Classification::by_status(&resp(429, "").with_header("retry-after", "3"), "x".into());
        assert_eq!(c, Classification::throttled(Some(Duration::from_secs(3)), "x"));
        assert_eq!(Classification::by_status(&resp(404, ""), "x".into()).label(), "permanent");

        let timeout = ProviderError::Timeout(Duration::from_secs(5));
        assert!(timeout.is_retryable());
        assert_eq!(timeout.classification().label(), "transient");
        let big = ProviderError::PayloadTooLarge { size: 5000, limit: 4096 };
        assert!(!big.is_retryable());
        assert_eq!(big.classification().label(), "permanent");
        let addr = ProviderError::InvalidAddress("x".into());
        assert_eq!(addr.classification().label(), "invalid_address");
        assert!(ProviderError::Auth { reason: "x".into(), retryable: true }.is_retryable());
    }

    #[test]
    fn debug_of_a_request_redacts_authorization_and_omits_the_body() {
        let req = HttpRequest::post("https://example.test/x")
            .header("Authorization", "bearer sekrit-token")
            .json(&serde_json::json!({"key": "body-secret"}));
        let printed = format!("{req:?} {req:#?}");
        assert!(!printed.contains("sekrit-token") && !printed.contains("body-secret"), "{printed}");
        assert!(printed.contains("<redacted>") && printed.contains("application/json"));
        let r = resp(200, r#"{"access_token":"ya29.secret"}"#);
        assert!(!format!("{r:?}").contains("ya29"));
    }

    #[test]
    fn summaries_are_short_and_single_line() {
        let long = format!("<html>\n<body>{}</body></html>", "x".repeat(500));
        let s = resp(502, &long).summary();
        assert!(s.starts_with("HTTP 502: <html> <body>xxx") && s.len() < 140, "{s}");
        assert_eq!(resp(500, "").summary(), "HTTP 500");
    }

    #[test]
    fn config_sections_reject_unknown_keys_and_default_to_production() {
        let cfg: ProvidersConfig = toml::from_str("[apns]\ntopic = \"com.example\"\n").unwrap();
        assert_eq!(cfg.apns.base_url, "https://api.push.apple.com");
        assert_eq!(cfg.fcm.base_url, "https://fcm.googleapis.com");
        assert_eq!(cfg.twilio.base_url, "https://api.twilio.com");
        assert_eq!(cfg.vonage.base_url, "https://rest.nexmo.com");
        assert_eq!(cfg.sendgrid.base_url, "https://api.sendgrid.com");
        assert_eq!(cfg.mandrill.base_url, "https://mandrillapp.com");
        let err = toml::from_str::<ProvidersConfig>("[twilio]\nauth_tokn = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("auth_tokn"), "{err}");
    }

    #[test]
    fn debug_of_every_config_redacts_credentials() {
        let cfg: ProvidersConfig = toml::from_str(
            r#"
            [apns]
            private_key_pem = "apns-pem-secret"
            [fcm]
            service_account_json = "fcm-sa-secret"
            [twilio]
            auth_token = "twilio-secret"
            [vonage]
            api_secret = "vonage-secret"
            [sendgrid]
            api_key = "sendgrid-secret"
            [mandrill]
            api_key = "mandrill-secret"
            "#,
        )
        .unwrap();
        let printed = format!("{cfg:?} {cfg:#?}");
        for s in ["apns-pem", "fcm-sa", "twilio-secret", "vonage-secret", "sendgrid-secret", "mandrill-secret"] {
            assert!(!printed.contains(s), "{s} leaked");
        }
    }
}
