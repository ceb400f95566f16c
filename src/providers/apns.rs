//! Apple Push Notification service: `POST {base}/3/device/{token}` over HTTP/2 with a
//! provider token (ES256 JWT from [`super::auth`]); an alert payload of at most 4096 bytes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{configured, endpoint, Classification, HttpConfig, HttpRequest, HttpResponse, ProviderError, Push};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://api.push.apple.com";
pub const DEVELOPMENT_URL: &str = "https://api.sandbox.push.apple.com";
/// Largest payload of a non-VoIP notification.
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// Longest `apns-collapse-id`.
pub const MAX_COLLAPSE_ID_BYTES: usize = 64;

/// `[providers.apns]`: token-based APNs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsConfig {
    /// `https://api.push.apple.com` (production) or `https://api.sandbox.push.apple.com`
    /// (development); an `http://` URL is spoken as h2c (a local sandbox).
    pub base_url: String,
    /// The app's bundle id, sent as `apns-topic`.
    pub topic: String,
    /// The 10-character Key ID of the `.p8` signing key (JWT `kid`).
    pub key_id: String,
    /// The 10-character Team ID (JWT `iss`).
    pub team_id: String,
    /// The `.p8` signing key (PKCS#8 PEM) inline ...
    pub private_key_pem: Secret,
    /// ... or the path of the `.p8` file (wins when both are set).
    pub private_key_file: Option<PathBuf>,
    /// Age at which the provider token is re-minted, 1200..=3600 s: Apple rejects tokens
    /// older than an hour and throttles minting more often than every 20 minutes.
    pub token_refresh_secs: u64,
    pub http: HttpConfig,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        ApnsConfig {
            base_url: PRODUCTION_URL.into(),
            topic: String::new(),
            key_id: String::new(),
            team_id: String::new(),
            private_key_pem: Secret::default(),
            private_key_file: None,
            token_refresh_secs: 40 * 60,
            http: HttpConfig::default(),
        }
    }
}

impl ApnsConfig {
    pub fn validate(&self) -> Result<(), ProviderError> {
        configured(&self.topic, "providers.apns.topic")?;
        configured(&self.key_id, "providers.apns.key_id")?;
        configured(&self.team_id, "providers.apns.team_id")?;
        if !(1200..=3600).contains(&self.token_refresh_secs) {
            return Err(ProviderError::Config(format!("providers.apns.token_refresh_secs must be 1200..=3600, not {}", self.token_refresh_secs)));
        }
        Ok(())
    }
}

/// The request for one alert push, authorised by `token` (the provider JWT).
///
/// # Errors
/// `InvalidAddress` for a token that is not hex, `InvalidDelivery` for missing content or
/// an over-long collapse id, `PayloadTooLarge` above [`MAX_PAYLOAD_BYTES`].
pub fn build_request(cfg: &ApnsConfig, d: &ChannelDelivery, token: &Secret) -> Result<HttpRequest, ProviderError> {
    let push = Push::of(d)?;
    if !d.address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ProviderError::InvalidAddress("APNs device token is not hex".into()));
    }
    let body = payload(&push).to_string().into_bytes();
    if body.len() > MAX_PAYLOAD_BYTES {
        return Err(ProviderError::PayloadTooLarge { size: body.len(), limit: MAX_PAYLOAD_BYTES });
    }
    let mut req = HttpRequest::post(endpoint(&cfg.base_url, &format!("3/device/{}", d.address)))
        .header("authorization", format!("bearer {}", token.expose()))
        .header("apns-topic", &cfg.topic)
        .header("apns-push-type", "alert")
        .header("apns-priority", if push.immediate { "10" } else { "5" })
        .header("apns-expiration", (d.deadline / 1000).max(0).to_string())
        .header("apns-id", apns_id(&d.delivery_id));
    if let Some(id) = push.collapse_id {
        if id.len() > MAX_COLLAPSE_ID_BYTES {
            return Err(ProviderError::InvalidDelivery(format!("collapse id is {} bytes; APNs allows {MAX_COLLAPSE_ID_BYTES}", id.len())));
        }
        req = req.header("apns-collapse-id", id);
    }
    req = req.header("content-type", "application/json");
    req.body = body;
    Ok(req)
}

/// `{"aps":{"alert":{title?, body?},"sound":"default"}, ...custom data}`; a data key
/// named `aps` cannot replace the dictionary.
fn payload(push: &Push) -> Value {
    let mut alert = Map::new();
    if let Some(t) = push.title {
        alert.insert("title".into(), t.into());
    }
    if let Some(b) = push.body {
        alert.insert("body".into(), b.into());
    }
    let mut root = Map::new();
    for (k, v) in &push.data {
        root.insert(k.to_string(), Value::from(*v));
    }
    root.insert("aps".into(), json!({"alert": alert, "sound": "default"}));
    Value::Object(root)
}

/// A stable `apns-id` for a delivery: a version-8 UUID from SHA-256 of the delivery id,
/// so every attempt of one delivery carries the same correlation id.
pub fn apns_id(delivery_id: &str) -> String {
    let digest = Sha256::digest(delivery_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().hyphenated().to_string()
}

/// Maps an APNs answer to its class (every reason of Apple's table).
pub fn classify(resp: &HttpResponse) -> Classification {
    if resp.status == 200 {
        return Classification::sent(resp.header("apns-id").unwrap_or_default());
    }
    let json = resp.json();
    let Some(reason) = json.as_ref().and_then(|v| v["reason"].as_str()) else {
        return Classification::by_status(resp, resp.summary());
    };
    let why = format!("APNs {} {reason}", resp.status);
    match reason {
        // Never retry these (Apple); the token or its topic binding is dead.
        "BadDeviceToken" | "Unregistered" | "ExpiredToken" | "DeviceTokenNotForTopic" => Classification::invalid(why),
        "ExpiredProviderToken" => Classification::reauth(why),
        // Too many pushes to one device: no Retry-After, the dispatcher backs off.
        "TooManyRequests" => Classification::throttled(resp.retry_after(), why),
        // Minted too often: keep the cached token and try later (the cache has the floor).
        "TooManyProviderTokenUpdates" => Classification::throttled(resp.retry_after(), why),
        "IdleTimeout" | "InternalServerError" | "ServiceUnavailable" | "Shutdown" => Classification::transient(why),
        "BadCollapseId" | "BadExpirationDate" | "BadMessageId" | "BadPriority" | "BadTopic" | "DuplicateHeaders" | "InvalidPushType"
        | "MissingDeviceToken" | "MissingTopic" | "PayloadEmpty" | "TopicDisallowed" | "BadPath" | "MethodNotAllowed" | "PayloadTooLarge"
        | "Forbidden" => Classification::permanent(why),
        // Herald's signing key, team or certificate is refused: no push will go through.
        "InvalidProviderToken" | "MissingProviderToken" | "BadCertificate" | "BadCertificateEnvironment" => Classification::auth_failed(why),
        _ => Classification::by_status(resp, why),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Priority, RenderedContent};
    use crate::providers::auth::tests::apns_config;
    use crate::providers::tests::{body_json, delivery, resp, NOW_MS};

    const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn push_delivery() -> ChannelDelivery {
        let mut content = RenderedContent { title: Some("Shipped".into()), body: Some("Your order is on its way".into()), ..Default::default() };
        content.data.insert("order_id".into(), "o-9".into());
        content.data.insert("collapse_id".into(), "order-o-9".into());
        delivery("apns", TOKEN, content)
    }

    fn jwt() -> Secret {
        Secret::new("eyJ.jwt.sig")
    }

    #[test]
    fn builds_the_alert_request() {
        let req = build_request(&apns_config(), &push_delivery(), &jwt()).unwrap();
        assert_eq!(req.method, reqwest::Method::POST);
        assert_eq!(req.url, format!("https://api.push.apple.com/3/device/{TOKEN}"));
        let expiration = ((NOW_MS + 3_600_000) / 1000).to_string();
        let expected: Vec<(String, String)> = [
            ("authorization", "bearer eyJ.jwt.sig"),
            ("apns-topic", "com.example.app"),
            ("apns-push-type", "alert"),
            ("apns-priority", "10"),
            ("apns-expiration", expiration.as_str()),
            ("apns-id", apns_id("d-42").as_str()),
            ("apns-collapse-id", "order-o-9"),
            ("content-type", "application/json"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(req.headers, expected);
        assert_eq!(
            body_json(&req),
            json!({"aps": {"alert": {"title": "Shipped", "body": "Your order is on its way"}, "sound": "default"},
                   "order_id": "o-9"})
        );
        assert!(!format!("{req:?}").contains("eyJ.jwt.sig"));
    }

    #[test]
    fn low_priority_is_power_aware_and_a_data_key_cannot_replace_aps() {
        let mut d = push_delivery();
        d.priority = Priority::Low;
        d.content.data.insert("aps".into(), "evil".into());
        d.content.data.remove("collapse_id");
        let req = build_request(&apns_config(), &d, &jwt()).unwrap();
        assert_eq!(req.header_value("apns-priority"), Some("5"));
        assert_eq!(req.header_value("apns-collapse-id"), None);
        assert_eq!(body_json(&req)["aps"]["sound"], "default");
        d.priority = Priority::High;
        let req = build_request(&apns_config(), &d, &jwt()).unwrap();
        assert_eq!(req.header_value("apns-priority"), Some("10"));
    }

    #[test]
    fn apns_id_is_a_stable_lowercase_uuid() {
        let id = apns_id("d-42");
        assert_eq!(id, apns_id("d-42"));
        assert_ne!(id, apns_id("d-43"));
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(id.chars().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == '-'));
    }

    #[test]
    fn refuses_oversized_payloads_and_bad_input_before_sending() {
        let mut d = push_delivery();
        d.content.body = Some("x".repeat(MAX_PAYLOAD_BYTES));
        let err = build_request(&apns_config(), &d, &jwt()).unwrap_err();
        assert!(matches!(err, ProviderError::PayloadTooLarge { limit: 4096, size } if size > 4096), "{err}");

        // Exactly at the limit is fine.
        let base = build_request(&apns_config(), &push_delivery(), &jwt()).unwrap().body.len();
        let mut d = push_delivery();
        let room = MAX_PAYLOAD_BYTES - base;
        d.content.body = Some(format!("{}{}", d.content.body.unwrap(), "y".repeat(room)));
        assert_eq!(build_request(&apns_config(), &d, &jwt()).unwrap().body.len(), MAX_PAYLOAD_BYTES);

        let mut d = push_delivery();
        d.content.data.insert("collapse_id".into(), "c".repeat(65));
        assert!(matches!(build_request(&apns_config(), &d, &jwt()), Err(ProviderError::InvalidDelivery(_))));
        let mut d = push_delivery();
        d.address = "../../admin".into();
        assert!(matches!(build_request(&apns_config(), &d, &jwt()), Err(ProviderError::InvalidAddress(_))));
        let mut d = push_delivery();
        d.content.title = None;
        d.content.body = None;
        assert!(matches!(build_request(&apns_config(), &d, &jwt()), Err(ProviderError::InvalidDelivery(_))));
    }

    fn reason(status: u16, reason: &str) -> Classification {
        classify(&resp(status, &format!(r#"{{"reason":"{reason}"}}"#)))
    }

    #[test]
    fn classifies_every_reason_in_the_table() {
        let ok = resp(200, "").with_header("apns-id", "0a1b2c3d-0000-8000-8000-000000000000");
        assert_eq!(classify(&ok), Classification::sent("0a1b2c3d-0000-8000-8000-000000000000"));
        let gone = resp(410, r#"{"reason":"Unregistered","timestamp":1767225600000}"#);
        assert_eq!(classify(&gone).label(), "invalid_address");
        let table: &[(u16, &str, &str)] = &[
            (400, "BadDeviceToken", "invalid_address"),
            (410, "ExpiredToken", "invalid_address"),
            (400, "DeviceTokenNotForTopic", "invalid_address"),
            (400, "BadCollapseId", "permanent"),
            (400, "BadExpirationDate", "permanent"),
            (400, "BadMessageId", "permanent"),
            (400, "BadPriority", "permanent"),
            (400, "BadTopic", "permanent"),
            (400, "DuplicateHeaders", "permanent"),
            (400, "InvalidPushType", "permanent"),
            (400, "MissingDeviceToken", "permanent"),
            (400, "MissingTopic", "permanent"),
            (400, "PayloadEmpty", "permanent"),
            (400, "TopicDisallowed", "permanent"),
            (404, "BadPath", "permanent"),
            (405, "MethodNotAllowed", "permanent"),
            (413, "PayloadTooLarge", "permanent"),
            (403, "ExpiredProviderToken", "reauth"),
            (403, "InvalidProviderToken", "auth_failed"),
            (403, "MissingProviderToken", "auth_failed"),
            (403, "BadCertificate", "auth_failed"),
            (403, "BadCertificateEnvironment", "auth_failed"),
            (403, "Forbidden", "permanent"),
            (429, "TooManyRequests", "throttled"),
            (429, "TooManyProviderTokenUpdates", "throttled"),
            (400, "IdleTimeout", "transient"),
            (500, "InternalServerError", "transient"),
            (503, "ServiceUnavailable", "transient"),
            (503, "Shutdown", "transient"),
            (500, "SomethingNew", "transient"),
            (400, "SomethingNew", "permanent"),
        ];
        for (status, r, class) in table {
            let c = reason(*status, r);
            assert_eq!(c.label(), *class, "{status} {r}");
            assert_eq!(c.reason(), Some(format!("APNs {status} {r}").as_str()));
        }
        assert_eq!(reason(429, "TooManyRequests"), Classification::throttled(None, "APNs 429 TooManyRequests"));
        let c = classify(&resp(429, r#"{"reason":"TooManyRequests"}"#).with_header("retry-after", "30"));
        assert!(matches!(c, Classification::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(30)));
        assert_eq!(classify(&resp(502, "<html>bad gateway</html>")).label(), "transient");
    }
}
