//! APNs: `POST /3/device/{token}`, HTTP/2 only, provider-token (ES256 JWT) auth, Apple's
//! header and payload validation, `{"reason":"…"}` errors and `apns-id` on every answer.
//!
//! Apple's servers only speak HTTP/2 (ALPN `h2`); plaintext HTTP/1.1 has no exact real
//! counterpart, so the sandbox answers it with `505 HTTP Version Not Supported` and a text
//! body. Checks run in this order: HTTP version, `apns-id`, provider token, duplicate
//! headers, topic and push type, priority, expiration, collapse id, device token, payload,
//! then the dead-token set.

use axum::extract::{Path, State};
use axum::http::{StatusCode, Version};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::json;

use super::http::{json, now_s, with_header, Incoming};
use super::{Provider, Shared, Verdict};

const MAX_PAYLOAD: usize = 4096;
const MAX_VOIP_PAYLOAD: usize = 5120;
/// A provider token older than this is `ExpiredProviderToken`.
const TOKEN_LIFETIME_S: i64 = 3600;
/// Tolerated clock skew for an `iat` in the future.
const SKEW_S: i64 = 60;
const PUSH_TYPES: [&str; 9] = ["alert", "background", "location", "voip", "complication", "fileprovider", "mdm", "liveactivity", "pushtotalk"];
/// Topic suffixes and the push type each one requires.
const TOPIC_SUFFIXES: [(&str, &str); 6] = [
    (".voip", "voip"),
    (".complication", "complication"),
    (".pushkit.fileprovider", "fileprovider"),
    (".push-type.liveactivity", "liveactivity"),
    (".voip-ptt", "pushtotalk"),
    (".location-query", "location"),
];

/// Every reason Apple documents, with its status.
fn status_of(reason: &str) -> Option<StatusCode> {
    Some(match reason {
        "BadCollapseId"
        | "BadDeviceToken"
        | "BadExpirationDate"
        | "BadMessageId"
        | "BadPriority"
        | "BadTopic"
        | "DeviceTokenNotForTopic"
        | "DuplicateHeaders"
        | "IdleTimeout"
        | "InvalidPushType"
        | "MissingDeviceToken"
        | "MissingTopic"
        | "PayloadEmpty"
        | "TopicDisallowed" => StatusCode::BAD_REQUEST,
        "BadCertificate"
        | "BadCertificateEnvironment"
        | "ExpiredProviderToken"
        | "Forbidden"
        | "InvalidProviderToken"
        | "MissingProviderToken"
        | "UnrelatedKeyIdInToken" => StatusCode::FORBIDDEN,
        "BadPath" => StatusCode::NOT_FOUND,
        "MethodNotAllowed" => StatusCode::METHOD_NOT_ALLOWED,
        "ExpiredToken" | "Unregistered" => StatusCode::GONE,
        "PayloadTooLarge" => StatusCode::PAYLOAD_TOO_LARGE,
        "TooManyProviderTokenUpdates" | "TooManyRequests" => StatusCode::TOO_MANY_REQUESTS,
        "InternalServerError" => StatusCode::INTERNAL_SERVER_ERROR,
        "ServiceUnavailable" | "Shutdown" => StatusCode::SERVICE_UNAVAILABLE,
        _ => return None,
    })
}

/// `{"reason": …}` (plus `timestamp` on 410) with the reason's status.
fn reason(reason: &str, timestamp_ms: Option<i64>) -> Response {
    let status = status_of(reason).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match timestamp_ms {
        Some(ts) => json!({ "reason": reason, "timestamp": ts }),
        None => json!({ "reason": reason }),
    };
    json(status, body)
}

/// The answer for a fault named by an APNs reason.
pub(super) fn fault(name: &str) -> Option<Response> {
    let status = status_of(name)?;
    let timestamp = (status == StatusCode::GONE).then(|| chrono::Utc::now().timestamp_millis());
    Some(reason(name, timestamp))
}

pub(super) async fn send(State(sb): State<Shared>, Path(token): Path<String>, req: Incoming) -> Response {
    let verdict = check(&sb, &token, &req);
    sb.answer(Provider::Apns, &req, verdict).await
}

/// `POST /3/device/` without a token.
pub(super) async fn missing_token(State(sb): State<Shared>, req: Incoming) -> Response {
    let verdict = check(&sb, "", &req);
    sb.answer(Provider::Apns, &req, verdict).await
}

pub(super) async fn method_not_allowed() -> Response {
    reason("MethodNotAllowed", None)
}

fn check(sb: &Shared, token: &str, req: &Incoming) -> Verdict {
    if req.version != Version::HTTP_2 {
        return Err((StatusCode::HTTP_VERSION_NOT_SUPPORTED, "APNs requires HTTP/2 (use h2c prior knowledge)\n").into_response());
    }
    let apns_id = match req.header("apns-id") {
        Some(id) if !is_canonical_uuid(id) => return Err(reason("BadMessageId", None)),
        Some(id) => id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let tag = |r: Response| with_header(r, "apns-id", &apns_id);
    let validate = || -> Result<(), Response> {
        authenticate(sb, req).map_err(|r| reason(r, None))?;
        validate_headers(sb, req).map_err(|r| reason(r, None))?;
        if token.is_empty() {
            return Err(reason("MissingDeviceToken", None));
        }
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(reason("BadDeviceToken", None));
        }
        let limit = if req.header("apns-push-type") == Some("voip") { MAX_VOIP_PAYLOAD } else { MAX_PAYLOAD };
        if req.body.is_empty() {
            return Err(reason("PayloadEmpty", None));
        }
        if req.body.len() > limit {
            return Err(reason("PayloadTooLarge", None));
        }
        let gone = sb.sets(|s, since| s.apns_unregistered.contains(&token.to_ascii_lowercase()).then_some(since));
        match gone {
            Some(since) => Err(reason("Unregistered", Some(since))),
            None => Ok(()),
        }
    };
    validate().map_err(tag)?;
    let ok = with_header(StatusCode::OK.into_response(), "apns-id", &apns_id);
    Ok(with_header(ok, "apns-unique-id", uuid::Uuid::new_v4()))
}

#[derive(Deserialize)]
struct ProviderClaims {
    iss: String,
    iat: i64,
}

/// The provider token: ES256, a configured `kid`, `iss` = team id, `iat` within the hour.
fn authenticate(sb: &Shared, req: &Incoming) -> Result<(), &'static str> {
    if req.header("authorization").is_none() {
        return Err("MissingProviderToken");
    }
    let jwt = req.bearer().ok_or("InvalidProviderToken")?;
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| "InvalidProviderToken")?;
    let key = header.kid.as_ref().and_then(|kid| sb.apns_keys.get(kid)).ok_or("InvalidProviderToken")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<ProviderClaims>(jwt, key, &validation).map_err(|_| "InvalidProviderToken")?.claims;
    if claims.iss != sb.config.apns.team_id || claims.iat > now_s() + SKEW_S {
        return Err("InvalidProviderToken");
    }
    if now_s() - claims.iat > TOKEN_LIFETIME_S {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

fn validate_headers(sb: &Shared, req: &Incoming) -> Result<(), &'static str> {
    let duplicated = req.headers.keys().any(|name| name.as_str().starts_with("apns-") && req.headers.get_all(name).iter().count() > 1);
    if duplicated {
        return Err("DuplicateHeaders");
    }
    let topic = req.header("apns-topic").ok_or("MissingTopic")?;
    let topic_push_type = topic_push_type(&sb.config.apns.bundle_ids, topic)?;
    let push_type = req.header("apns-push-type");
    if let Some(t) = push_type {
        if !PUSH_TYPES.contains(&t) || topic_push_type.is_some_and(|required| required != t) {
            return Err("InvalidPushType");
        }
        if topic_push_type.is_none() && TOPIC_SUFFIXES.iter().any(|(_, required)| *required == t) {
            return Err("InvalidPushType");
        }
    }
    match req.header("apns-priority") {
        None | Some("10" | "5" | "1") => {}
        Some(_) => return Err("BadPriority"),
    }
    if push_type == Some("background") && matches!(req.header("apns-priority"), None | Some("10")) {
        return Err("BadPriority");
    }
    if req.header("apns-expiration").is_some_and(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit())) {
        return Err("BadExpirationDate");
    }
    if req.header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err("BadCollapseId");
    }
    Ok(())
}

/// `Ok(None)` for a plain bundle id, `Ok(Some(push type))` for a suffixed one.
fn topic_push_type(bundle_ids: &[String], topic: &str) -> Result<Option<&'static str>, &'static str> {
    for bundle in bundle_ids {
        if topic == bundle {
            return Ok(None);
        }
        if let Some(suffix) = topic.strip_prefix(bundle.as_str()) {
            if let Some((_, push_type)) = TOPIC_SUFFIXES.iter().find(|(s, _)| *s == suffix) {
                return Ok(Some(push_type));
            }
        }
    }
    let well_formed = !topic.is_empty() && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) && topic.contains('.');
    Err(if well_formed { "TopicDisallowed" } else { "BadTopic" })
}

/// Lowercase 8-4-4-4-12 hex, as Apple requires for `apns-id`.
fn is_canonical_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_id_must_be_a_lowercase_canonical_uuid() {
        assert!(is_canonical_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_canonical_uuid("123E4567-E89B-12D3-A456-426614174000"));
        assert!(!is_canonical_uuid("123e4567e89b12d3a456426614174000"));
    }

    #[test]
    fn topics_are_the_bundle_or_a_suffix_that_fixes_the_push_type() {
        let bundles = vec!["dev.herald.demo".to_string()];
        assert_eq!(topic_push_type(&bundles, "dev.herald.demo"), Ok(None));
        assert_eq!(topic_push_type(&bundles, "dev.herald.demo.voip"), Ok(Some("voip")));
        assert_eq!(topic_push_type(&bundles, "com.other.app"), Err("TopicDisallowed"));
        assert_eq!(topic_push_type(&bundles, "not a topic"), Err("BadTopic"));
    }

    #[test]
    fn every_fault_name_is_an_apple_reason_with_its_status() {
        assert_eq!(fault("ServiceUnavailable").unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(fault("Unregistered").unwrap().status(), StatusCode::GONE);
        assert_eq!(fault("TooManyRequests").unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(fault("NoSuchReason").is_none());
    }
}
