//! Firebase Cloud Messaging HTTP v1: `POST {base}/v1/projects/{project}/messages:send`
//! with an OAuth2 access token (service-account assertion, see [`super::auth`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{configured, endpoint, seconds_left, Classification, HttpConfig, HttpRequest, HttpResponse, ProviderError, Push};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://fcm.googleapis.com";
/// FCM keeps a message at most four weeks.
pub const MAX_TTL_SECS: i64 = 2_419_200;

/// `[providers.fcm]`: FCM v1 with a service account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcmConfig {
    /// `https://fcm.googleapis.com`, or a local sandbox.
    pub base_url: String,
    /// The Firebase project; empty = the service account's `project_id`.
    pub project_id: String,
    /// The service-account JSON key inline ...
    pub service_account_json: Secret,
    /// ... or the path of the JSON key file (wins when both are set).
    pub service_account_file: Option<PathBuf>,
    /// Overrides the key's `token_uri` (a local sandbox serves its own); also the JWT `aud`.
    pub token_uri: Option<String>,
    /// Refresh the access token this long before it expires.
    pub token_refresh_margin_secs: u64,
    pub http: HttpConfig,
}

impl Default for FcmConfig {
    fn default() -> Self {
        FcmConfig {
            base_url: PRODUCTION_URL.into(),
            project_id: String::new(),
            service_account_json: Secret::default(),
            service_account_file: None,
            token_uri: None,
            token_refresh_margin_secs: 300,
            http: HttpConfig::default(),
        }
    }
}

/// Data keys FCM reserves (INVALID_ARGUMENT if sent).
fn reserved(key: &str) -> bool {
    matches!(key, "from" | "notification" | "message_type") || key.starts_with("google") || key.starts_with("gcm")
}

/// The send request for one device, authorised by the OAuth2 access `token`; the Android
/// TTL runs until the delivery's deadline as seen at `now_ms`.
///
/// # Errors
/// `Config` without a project id, `InvalidDelivery` for missing content or a reserved
/// data key, `InvalidAddress` for an empty token.
pub fn build_request(cfg: &FcmConfig, d: &ChannelDelivery, token: &Secret, now_ms: i64) -> Result<HttpRequest, ProviderError> {
    let project = configured(&cfg.project_id, "providers.fcm.project_id")?;
    let push = Push::of(d)?;
    if let Some(key) = push.data.keys().find(|k| reserved(k)) {
        return Err(ProviderError::InvalidDelivery(format!("data key '{key}' is reserved by FCM")));
    }
    let mut notification = Map::new();
    if let Some(t) = push.title {
        notification.insert("title".into(), t.into());
    }
    if let Some(b) = push.body {
        notification.insert("body".into(), b.into());
    }
    let mut android = json!({
        "priority": if push.immediate { "HIGH" } else { "NORMAL" },
        "ttl": format!("{}s", seconds_left(d, now_ms, 0, MAX_TTL_SECS)),
    });
    let mut apns_headers = json!({
        "apns-priority": if push.immediate { "10" } else { "5" },
        "apns-expiration": (d.deadline / 1000).max(0).to_string(),
    });
    if let Some(id) = push.collapse_id {
        android["collapse_key"] = id.into();
        apns_headers["apns-collapse-id"] = id.into();
    }
    let mut message = json!({
        "token": d.address,
        "notification": notification,
        "android": android,
        "apns": {"headers": apns_headers, "payload": {"aps": {"sound": "default"}}},
    });
    if !push.data.is_empty() {
        message["data"] = json!(push.data);
    }
    let url = endpoint(&cfg.base_url, &format!("v1/projects/{project}/messages:send"));
    Ok(HttpRequest::post(url).header("authorization", format!("Bearer {}", token.expose())).json(&json!({ "message": message })))
}

/// Maps an FCM answer to its class: `FcmError.errorCode` first, then `error.status`.
pub fn classify(resp: &HttpResponse) -> Classification {
    let json = resp.json();
    if resp.status == 200 {
        let name = json.as_ref().and_then(|v| v["name"].as_str()).unwrap_or_default();
        return Classification::sent(name.rsplit('/').next().unwrap_or_default());
    }
    let error = json.as_ref().map(|v| &v["error"]).filter(|e| e.is_object());
    let field = |k: &str| error.and_then(|e| e[k].as_str()).unwrap_or_default();
    let (status, message) = (field("status"), field("message"));
    let details = error.and_then(|e| e["details"].as_array()).map(Vec::as_slice).unwrap_or_default();
    let error_code = details
        .iter()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError")))
        .and_then(|d| d["errorCode"].as_str());
    let code = error_code.unwrap_or(status);
    let why = format!("FCM {} {code}: {message}", resp.status);
    if resp.status == 401 && error_code.is_none() {
        return Classification::reauth(why); // the access token expired or was revoked
    }
    match code {
        "UNREGISTERED" => Classification::invalid(why),
        // A token of another Firebase project: dead for this sender.
        "SENDER_ID_MISMATCH" => Classification::invalid(why),
        "INVALID_ARGUMENT" if about_the_token(message, details) => Classification::invalid(why),
        "INVALID_ARGUMENT" | "THIRD_PARTY_AUTH_ERROR" => Classification::permanent(why),
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" => Classification::throttled(resp.retry_after(), why),
        // RETRY; a Retry-After, when FCM sends one, must be honoured, and only Throttled
        // carries a delay.
        "UNAVAILABLE" | "INTERNAL" | "UNSPECIFIED_ERROR" => match resp.retry_after() {
            Some(after) => Classification::throttled(Some(after), why),
            None => Classification::transient(why),
        },
        "" => Classification::by_status(resp, resp.summary()),
        _ => Classification::by_status(resp, why),
    }
}

/// Whether an INVALID_ARGUMENT names the registration token (DEACTIVATE) rather than
/// another field (FAIL).
fn about_the_token(message: &str, details: &[Value]) -> bool {
    let violation = details.iter().any(|d| d["fieldViolations"].as_array().is_some_and(|v| v.iter().any(|f| f["field"] == "message.token")));
    violation || message.to_ascii_lowercase().contains("registration token")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Priority, RenderedContent};
    use crate::providers::tests::{body_json, delivery, resp, NOW_MS};

    fn cfg() -> FcmConfig {
        FcmConfig { project_id: "herald-test".into(), ..FcmConfig::default() }
    }

    fn push_delivery() -> ChannelDelivery {
        let mut content = RenderedContent { title: Some("Shipped".into()), body: Some("On its way".into()), ..Default::default() };
        content.data.insert("order_id".into(), "o-9".into());
        content.data.insert("collapse_id".into(), "order-o-9".into());
        delivery("fcm", "fcm-token-1", content)
    }

    #[test]
    fn builds_the_v1_send_request() {
        let req = build_request(&cfg(), &push_delivery(), &Secret::new("ya29.access"), NOW_MS).unwrap();
        assert_eq!(req.url, "https://fcm.googleapis.com/v1/projects/herald-test/messages:send");
        assert_eq!(
            req.headers,
            [("authorization".to_string(), "Bearer ya29.access".to_string()), ("content-type".to_string(), "application/json".to_string()),]
        );
        let expiration = ((NOW_MS + 3_600_000) / 1000).to_string();
        assert_eq!(
            body_json(&req),
            json!({"message": {
                "token": "fcm-token-1",
                "notification": {"title": "Shipped", "body": "On its way"},
                "data": {"order_id": "o-9"},
                "android": {"priority": "HIGH", "ttl": "3600s", "collapse_key": "order-o-9"},
                "apns": {
                    "headers": {"apns-priority": "10", "apns-expiration": expiration, "apns-collapse-id": "order-o-9"},
                    "payload": {"aps": {"sound": "default"}}
                }
            }})
        );
        assert!(!format!("{req:?}").contains("ya29.access"));
    }

    #[test]
    fn low_priority_expired_and_reserved_keys() {
        let mut d = push_delivery();
        d.priority = Priority::Low;
        d.content.data.clear();
        d.deadline = NOW_MS - 1;
        let body = body_json(&build_request(&cfg(), &d, &Secret::new("t"), NOW_MS).unwrap());
        assert_eq!(body["message"]["android"], json!({"priority": "NORMAL", "ttl": "0s"}));
        assert_eq!(body["message"]["apns"]["headers"]["apns-priority"], "5");
        assert!(body["message"].get("data").is_none());

        d.content.data.insert("google.c.a".into(), "x".into());
        let err = build_request(&cfg(), &d, &Secret::new("t"), NOW_MS).unwrap_err();
        assert!(matches!(err, ProviderError::InvalidDelivery(ref m) if m.contains("google.c.a")), "{err}");
        let err = build_request(&FcmConfig::default(), &push_delivery(), &Secret::new("t"), NOW_MS).unwrap_err();
        assert!(matches!(err, ProviderError::Config(_)));
    }

    fn error(status: u16, top: &str, code: Option<&str>, message: &str) -> HttpResponse {
        let details = match code {
            Some(c) => {
                json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}])
            }
            None => json!([]),
        };
        let body = json!({"error": {"code": status, "message": message, "status": top, "details": details}});
        resp(status, &body.to_string())
    }

    #[test]
    fn classifies_every_error_code_in_the_table() {
        let ok = resp(200, r#"{"name":"projects/herald-test/messages/0:1500415314455276%31bd1c9631bd1c96"}"#);
        assert_eq!(classify(&ok), Classification::sent("0:1500415314455276%31bd1c9631bd1c96"));
        let table: &[(u16, &str, Option<&str>, &str, &str)] = &[
            (404, "NOT_FOUND", Some("UNREGISTERED"), "Requested entity was not found.", "invalid_address"),
            (400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), "The registration token is not a valid FCM registration token", "invalid_address"),
            (400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), "Invalid value at 'message.android.ttl'", "permanent"),
            (400, "INVALID_ARGUMENT", None, "Request contains an invalid argument.", "permanent"),
            (403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"), "SenderId mismatch", "invalid_address"),
            (429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"), "Quota exceeded", "throttled"),
            (503, "UNAVAILABLE", Some("UNAVAILABLE"), "The service is currently unavailable.", "transient"),
            (500, "INTERNAL", Some("INTERNAL"), "Internal error", "transient"),
            (401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR"), "Auth error from APNS or Web Push Service", "permanent"),
            (401, "UNAUTHENTICATED", None, "Request had invalid authentication credentials.", "reauth"),
            (500, "UNKNOWN", Some("UNSPECIFIED_ERROR"), "?", "transient"),
            (403, "PERMISSION_DENIED", None, "Permission denied on resource project", "permanent"),
        ];
        for (status, top, code, message, class) in table {
            let c = classify(&error(*status, top, *code, message));
            assert_eq!(c.label(), *class, "{status} {top} {code:?} {message}");
        }
        let c = classify(&error(404, "NOT_FOUND", Some("UNREGISTERED"), "Requested entity was not found."));
        assert_eq!(c.reason(), Some("FCM 404 UNREGISTERED: Requested entity was not found."));

        // A field violation on message.token is about the token, whatever the message says.
        let violation = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad request",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                         "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}]}});
        assert_eq!(classify(&resp(400, &violation.to_string())).label(), "invalid_address");

        let quota = error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"), "q").with_header("Retry-After", "42");
        assert!(matches!(classify(&quota), Classification::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(42)));
        let busy = error(503, "UNAVAILABLE", Some("UNAVAILABLE"), "u").with_header("retry-after", "10");
        assert!(matches!(classify(&busy), Classification::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(10)));
        assert_eq!(classify(&resp(502, "<html>Bad Gateway</html>")).label(), "transient");
        assert_eq!(classify(&resp(504, "<html>Gateway Timeout</html>")).label(), "transient");
        assert_eq!(classify(&resp(401, "")).label(), "reauth");
    }
}
