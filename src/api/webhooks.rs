//! Provider webhooks → outcome events (delivered, undelivered, bounced, opened, clicked,
//! spam_report, unsubscribed). Each request's signature is checked with the provider's
//! documented algorithm before anything is read; a bad one is answered 401 and counted
//! (`herald_api_webhook_rejected_total{provider,reason}`). A provider whose secret is not
//! configured has no endpoint (404).
//!
//! | provider | signature | delivery lookup |
//! |---|---|---|
//! | Twilio status callback | `X-Twilio-Signature` = base64(HMAC-SHA1(auth token, URL + Σ sorted name+value)) | `delivery_id` in the callback URL's query (the dispatcher sets it), else `MessageSid` |
//! | SendGrid signed event webhook | ECDSA P-256/SHA-256 over timestamp ‖ raw body, base64 DER, SPKI public key | custom arg `delivery_id`, else `sg_message_id` (before the first `.`) |
//! | Mailchimp Transactional | `X-Mandrill-Signature` = base64(HMAC-SHA1(webhook key, URL + "mandrill_events" + value)) | `msg.metadata.delivery_id`, else `msg._id` |
//! | Vonage delivery receipt | `sig` = HMAC-SHA1/256/512(secret, "&" + sorted `k=v` pairs, `&`/`=` in values → `_`), hex; `timestamp` within 5 min | `client-ref` (= delivery id), else `messageId` |
//!
//! URL-signed providers (Twilio, Mandrill) sign the URL they were configured with: it is
//! rebuilt as `api.public_base_url` + path (+ query).
//!
//! Every provider's webhook carries the delivery id herald sent with the message, looked up
//! in `deliveries_by_id`. The provider's message id is the fallback, in `provider_messages`,
//! which dispatchers no longer write (migration 009): it finds messages sent before.
//! An `unsubscribed` outcome also opts the user out of email for the delivery's category.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use super::outcomes;
use super::store::DeliveryRef;
use super::{ApiError, ApiState};
use crate::model::DeliveryOutcome;
use crate::store::Preference;
use crate::telemetry::events;

// ---------------------------------------------------------------------------------------
// Signature algorithms (pure).

/// Twilio's and Mandrill's scheme: `base64(HMAC-SHA1(key, url + Σ name+value))`, params
/// sorted by name.
pub fn url_params_signature(key: &[u8], url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut m = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(url.as_bytes());
    for (k, v) in sorted {
        m.update(k.as_bytes());
        m.update(v.as_bytes());
    }
    B64.encode(m.finalize().into_bytes())
}

/// Constant-time comparison of two signature strings.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// SendGrid's signed event webhook: `signature_b64` (DER) over `timestamp ‖ body` with the
/// base64 DER SubjectPublicKeyInfo `public_key_b64`.
pub fn sendgrid_verify(public_key_b64: &str, timestamp: &str, body: &[u8], signature_b64: &str) -> bool {
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::{Signature, VerifyingKey};
    use p256::pkcs8::DecodePublicKey;
    let Ok(key_der) = B64.decode(public_key_b64.trim()) else { return false };
    let Ok(key) = VerifyingKey::from_public_key_der(&key_der) else { return false };
    let Ok(sig_der) = B64.decode(signature_b64.trim()) else { return false };
    let Ok(sig) = Signature::from_der(&sig_der) else { return false };
    let mut msg = Vec::with_capacity(timestamp.len() + body.len());
    msg.extend_from_slice(timestamp.as_bytes());
    msg.extend_from_slice(body);
    key.verify(&msg, &sig).is_ok()
}

/// Vonage's signed-request signature, upper-case hex, over `"&" + sorted "k=v" joined by
/// "&"` (without `sig`; `&` and `=` in values become `_`). `method`: `md5hash` (MD5 of that
/// string followed by the secret: Vonage's oldest method), or the HMACs `md5`, `sha1`,
/// `sha256`, `sha512` keyed with the secret.
pub fn vonage_signature(secret: &[u8], method: &str, params: &[(String, String)]) -> String {
    use sha2::Digest;
    let mut pairs: Vec<(String, String)> = params.iter().filter(|(k, _)| k != "sig").map(|(k, v)| (k.clone(), v.replace(['&', '='], "_"))).collect();
    pairs.sort();
    let input: String = pairs.iter().map(|(k, v)| format!("&{k}={v}")).collect();
    fn hmac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], input: &str) -> Vec<u8> {
        <M as hmac::digest::KeyInit>::new_from_slice(secret).expect("any key").chain_update(input.as_bytes()).finalize().into_bytes().to_vec()
    }
    let raw = match method {
        "md5hash" => md5::Md5::new().chain_update(input.as_bytes()).chain_update(secret).finalize().to_vec(),
        "md5" => hmac::<Hmac<md5::Md5>>(secret, &input),
        "sha1" => hmac::<Hmac<Sha1>>(secret, &input),
        "sha512" => hmac::<Hmac<sha2::Sha512>>(secret, &input),
        _ => hmac::<Hmac<sha2::Sha256>>(secret, &input),
    };
    hex::encode_upper(raw)
}

// ---------------------------------------------------------------------------------------
// Status mappings (pure).

/// Twilio `MessageStatus` → outcome (`None`: not a final verdict, ignored).
pub fn twilio_status(status: &str) -> Option<&'static str> {
    match status {
        "delivered" => Some("delivered"),
        "undelivered" | "failed" => Some("undelivered"),
        "read" => Some("opened"),
        _ => None,
    }
}

/// SendGrid `event` (and bounce `type`) → outcome.
pub fn sendgrid_status(event: &str, bounce_type: Option<&str>) -> Option<&'static str> {
    match event {
        "delivered" => Some("delivered"),
        "bounce" if bounce_type == Some("blocked") => Some("undelivered"),
        "bounce" => Some("bounced"),
        "dropped" => Some("undelivered"),
        "open" => Some("opened"),
        "click" => Some("clicked"),
        "spamreport" => Some("spam_report"),
        "unsubscribe" | "group_unsubscribe" => Some("unsubscribed"),
        _ => None, // processed, deferred, group_resubscribe
    }
}

/// Mandrill `event` → outcome.
pub fn mandrill_status(event: &str) -> Option<&'static str> {
    match event {
        "send" => Some("delivered"),
        "hard_bounce" => Some("bounced"),
        "reject" => Some("undelivered"),
        "open" => Some("opened"),
        "click" => Some("clicked"),
        "spam" => Some("spam_report"),
        "unsub" => Some("unsubscribed"),
        _ => None, // soft_bounce, deferral: transient
    }
}

/// Vonage DLR `status` → outcome.
pub fn vonage_status(status: &str) -> Option<&'static str> {
    match status {
        "delivered" => Some("delivered"),
        "expired" | "failed" | "rejected" => Some("undelivered"),
        _ => None, // accepted, buffered, unknown
    }
}

// ---------------------------------------------------------------------------------------
// Handlers.

fn reject(provider: &'static str, reason: &'static str) -> ApiError {
    events::webhook_rejected(provider, reason);
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", "webhook signature does not verify")
}

/// A webhook whose signature verifies but whose signed timestamp is outside
/// `api.webhook_timestamp_tolerance`.
fn stale(provider: &'static str) -> ApiError {
    events::webhook_rejected(provider, "stale");
    ApiError::new(StatusCode::UNAUTHORIZED, "stale_webhook", "the webhook's signed timestamp is outside the accepted window")
}

fn fresh_webhook(st: &ApiState, signed_at: i64) -> bool {
    super::auth::fresh(signed_at, chrono::Utc::now().timestamp(), st.cfg.webhook_timestamp_tolerance)
}

fn off() -> ApiError {
    ApiError::not_found("endpoint")
}

fn form_params(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    Ok(url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

/// The URL the provider signed: the public base URL + this request's path and query.
fn public_url(st: &ApiState, uri: &Uri) -> String {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or(uri.path());
    format!("{}{pq}", st.cfg.public_base_url)
}

/// Looks up a delivery by its id first, then by the provider's message id.
async fn find(st: &ApiState, provider: &str, delivery_id: Option<&str>, message_id: Option<&str>) -> Result<Option<DeliveryRef>, ApiError> {
    if let Some(d) = delivery_id {
        if let Some(r) = st.api_store.delivery(d).await? {
            return Ok(Some(r));
        }
    }
    if let Some(m) = message_id {
        return Ok(st.api_store.provider_message(provider, m).await?);
    }
    Ok(None)
}

/// Emits the outcomes not emitted before (by their ids: a provider's retry or a replayed
/// body emits nothing twice), remembers them, applies unsubscribes, answers 200 with counts.
async fn finish(
    st: &ApiState,
    provider: &'static str,
    received: usize,
    mut outcomes: Vec<DeliveryOutcome>,
    unmatched: usize,
) -> Result<Response, ApiError> {
    for _ in 0..unmatched {
        events::webhook_unmatched(provider);
    }
    let ids: Vec<&str> = outcomes.iter().map(|o| o.outcome_id.as_str()).collect();
    let seen = if ids.is_empty() { Default::default() } else { st.api_store.webhook_events_seen(&ids).await? };
    let mut once = std::collections::HashSet::new();
    let before = outcomes.len();
    outcomes.retain(|o| !seen.contains(&o.outcome_id) && once.insert(o.outcome_id.clone()));
    let duplicates = before - outcomes.len();
    if duplicates > 0 {
        events::webhook_duplicates(provider, duplicates as u64);
    }
    outcomes::emit(st, &outcomes).await?;
    let emitted: Vec<&str> = outcomes.iter().map(|o| o.outcome_id.as_str()).collect();
    if !emitted.is_empty() {
        st.api_store.put_webhook_events(provider, &emitted, st.cfg.webhook_dedup_ttl).await?;
    }
    for o in outcomes.iter().filter(|o| o.status == "unsubscribed") {
        if let (Some(user), Some(category)) = (&o.user_id, &o.category) {
            st.store
                .put_preference(&Preference { user_id: user.clone(), channel: "email".into(), category: category.clone(), opt_in: false })
                .await?;
            st.publish_change("preferences", user).await?;
        }
    }
    Ok((StatusCode::OK, Json(json!({ "received": received, "recorded": outcomes.len(), "unmatched": unmatched, "duplicates": duplicates })))
        .into_response())
}

/// `POST /webhooks/twilio`: a status callback (form-encoded).
pub async fn twilio(State(st): State<Arc<ApiState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let token = st.cfg.twilio_auth_token.expose();
    if token.is_empty() {
        return Err(off());
    }
    let Some(given) = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()) else { return Err(reject("twilio", "missing")) };
    let params = form_params(&headers, &body)?;
    if !same(&url_params_signature(token.as_bytes(), &public_url(&st, &uri), &params), given) {
        return Err(reject("twilio", "mismatch"));
    }
    let (Some(sid), Some(status)) = (param(&params, "MessageSid"), param(&params, "MessageStatus")) else {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "MessageSid and MessageStatus are required"));
    };
    let mut out = Vec::new();
    let mut unmatched = 0;
    let delivery_id =
        uri.query().and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "delivery_id").map(|(_, v)| v.into_owned()));
    if let Some(s) = twilio_status(status) {
        match find(&st, "twilio", delivery_id.as_deref(), Some(sid)).await? {
            Some(d) => out.extend(outcomes::outcome(
                &d,
                outcomes::outcome_id(&["twilio", sid, status]),
                s,
                Some("twilio"),
                param(&params, "ErrorCode").map(|c| format!("twilio error {c}")),
            )),
            None => unmatched += 1,
        }
    }
    finish(&st, "twilio", 1, out, unmatched).await
}

/// `POST /webhooks/sendgrid`: the signed event webhook (JSON array).
pub async fn sendgrid(State(st): State<Arc<ApiState>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    if st.cfg.sendgrid_public_key.is_empty() {
        return Err(off());
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (Some(sig), Some(ts)) = (h("x-twilio-email-event-webhook-signature"), h("x-twilio-email-event-webhook-timestamp")) else {
        return Err(reject("sendgrid", "missing"));
    };
    if !sendgrid_verify(&st.cfg.sendgrid_public_key, ts, &body, sig) {
        return Err(reject("sendgrid", "mismatch"));
    }
    // The timestamp is signed: a verified but old (or future) body is a replay.
    if !ts.parse::<i64>().is_ok_and(|t| fresh_webhook(&st, t)) {
        return Err(stale("sendgrid"));
    }
    let events: Vec<Value> =
        serde_json::from_slice(&body).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "expected a JSON array of events"))?;
    let mut out = Vec::new();
    let mut unmatched = 0;
    for e in &events {
        let s = |k: &str| e.get(k).and_then(Value::as_str);
        let Some(status) = s("event").and_then(|ev| sendgrid_status(ev, s("type"))) else { continue };
        let delivery_id = s("delivery_id").or_else(|| e.pointer("/custom_args/delivery_id").and_then(Value::as_str));
        let message_id = s("sg_message_id").map(|m| m.split('.').next().unwrap_or(m));
        let Some(d) = find(&st, "sendgrid", delivery_id, message_id).await? else {
            unmatched += 1;
            continue;
        };
        let ts = e.get("timestamp").map(Value::to_string).unwrap_or_default();
        let id = match s("sg_event_id") {
            Some(ev) => outcomes::outcome_id(&["sendgrid", ev]),
            None => outcomes::outcome_id(&["sendgrid", message_id.unwrap_or(""), status, &ts]),
        };
        let reason = s("reason").or(s("url")).map(str::to_string);
        out.extend(outcomes::outcome(&d, id, status, Some("sendgrid"), reason));
    }
    finish(&st, "sendgrid", events.len(), out, unmatched).await
}

/// `HEAD /webhooks/mandrill`: Mandrill probes the URL when the webhook is created.
pub async fn mandrill_probe() -> StatusCode {
    StatusCode::OK
}

/// `POST /webhooks/mandrill`: form param `mandrill_events` (JSON array).
pub async fn mandrill(State(st): State<Arc<ApiState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let key = st.cfg.mandrill_webhook_key.expose();
    if key.is_empty() {
        return Err(off());
    }
    let Some(given) = headers.get("x-mandrill-signature").and_then(|v| v.to_str().ok()) else { return Err(reject("mandrill", "missing")) };
    let params = form_params(&headers, &body)?;
    if !same(&url_params_signature(key.as_bytes(), &public_url(&st, &uri), &params), given) {
        return Err(reject("mandrill", "mismatch"));
    }
    let raw = param(&params, "mandrill_events").unwrap_or("[]");
    let events: Vec<Value> =
        serde_json::from_str(raw).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "mandrill_events is not a JSON array"))?;
    let mut out = Vec::new();
    let mut unmatched = 0;
    for e in &events {
        let Some(status) = e.get("event").and_then(Value::as_str).and_then(mandrill_status) else { continue };
        let message_id = e.pointer("/msg/_id").and_then(Value::as_str).or_else(|| e.get("_id").and_then(Value::as_str));
        let delivery_id = e.pointer("/msg/metadata/delivery_id").and_then(Value::as_str);
        let Some(d) = find(&st, "mandrill", delivery_id, message_id).await? else {
            unmatched += 1;
            continue;
        };
        let ts = e.get("ts").map(Value::to_string).unwrap_or_default();
        let event = e.get("event").and_then(Value::as_str).unwrap_or("");
        let id = outcomes::outcome_id(&["mandrill", message_id.unwrap_or(""), event, &ts]);
        let reason =
            e.pointer("/msg/bounce_description").and_then(Value::as_str).or_else(|| e.get("url").and_then(Value::as_str)).map(str::to_string);
        out.extend(outcomes::outcome(&d, id, status, Some("mandrill"), reason));
    }
    finish(&st, "mandrill", events.len(), out, unmatched).await
}

/// `GET|POST /webhooks/vonage`: a signed delivery receipt (query, form or JSON).
pub async fn vonage(State(st): State<Arc<ApiState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let secret = st.cfg.vonage_signature_secret.expose();
    if secret.is_empty() {
        return Err(off());
    }
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let params: Vec<(String, String)> = if body.is_empty() {
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    } else if ct.starts_with("application/json") {
        let v: serde_json::Map<String, Value> =
            serde_json::from_slice(&body).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "expected a JSON object"))?;
        v.into_iter()
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                Value::Number(n) => Some((k, n.to_string())),
                Value::Bool(b) => Some((k, b.to_string())),
                _ => None,
            })
            .collect()
    } else {
        form_params(&headers, &body)?
    };
    let (Some(sig), Some(ts)) = (param(&params, "sig"), param(&params, "timestamp")) else { return Err(reject("vonage", "missing")) };
    if !same(&vonage_signature(secret.as_bytes(), &st.cfg.vonage_signature_method, &params), &sig.to_ascii_uppercase()) {
        return Err(reject("vonage", "mismatch"));
    }
    // Vonage's timestamp is signed (epoch seconds): an old receipt is a replay.
    if !ts.parse::<i64>().is_ok_and(|t| fresh_webhook(&st, t)) {
        return Err(stale("vonage"));
    }
    let message_id = param(&params, "messageId").or(param(&params, "message-id"));
    let status = param(&params, "status").unwrap_or("");
    let mut out = Vec::new();
    let mut unmatched = 0;
    if let Some(s) = vonage_status(status) {
        match find(&st, "vonage", param(&params, "client-ref"), message_id).await? {
            Some(d) => {
                let err = param(&params, "err-code").unwrap_or("");
                let id = outcomes::outcome_id(&["vonage", message_id.unwrap_or(""), status, err]);
                let reason = (err != "0" && !err.is_empty()).then(|| format!("vonage err-code {err}"));
                out.extend(outcomes::outcome(&d, id, s, Some("vonage"), reason));
            }
            None => unmatched += 1,
        }
    }
    finish(&st, "vonage", 1, out, unmatched).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The worked example from Twilio's security docs (auth token 12345).
    #[test]
    fn twilio_documented_example() {
        let params =
            p(&[("CallSid", "CA1234567890ABCDE"), ("Caller", "+12349013030"), ("Digits", "1234"), ("From", "+12349013030"), ("To", "+18005551212")]);
        let sig = url_params_signature(b"12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params);
        assert_eq!(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        // Order of the posted params does not matter; any change does.
        let mut rev = params.clone();
        rev.reverse();
        assert_eq!(url_params_signature(b"12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &rev), sig);
        assert_ne!(url_params_signature(b"12345", "https://mycompany.com/myapp.php?foo=1&bar=3", &params), sig);
    }

    #[test]
    fn mandrill_signs_url_plus_the_events_param() {
        let events = r#"[{"event":"open"}]"#;
        let a = url_params_signature(b"key", "https://h.example/webhooks/mandrill", &p(&[("mandrill_events", events)]));
        let mut m = Hmac::<Sha1>::new_from_slice(b"key").unwrap();
        m.update(format!("https://h.example/webhooks/mandrillmandrill_events{events}").as_bytes());
        assert_eq!(a, B64.encode(m.finalize().into_bytes()));
    }

    #[test]
    fn sendgrid_ecdsa_over_timestamp_and_raw_body() {
        use p256::ecdsa::signature::Signer;
        use p256::ecdsa::{Signature, SigningKey};
        use p256::pkcs8::EncodePublicKey;
        let sk = SigningKey::from_bytes(&[0x42u8; 32].into()).unwrap();
        let pk = B64.encode(sk.verifying_key().to_public_key_der().unwrap().as_bytes());
        let body = br#"[{"event":"delivered"}]"#;
        let sig: Signature = sk.sign(&[b"1700000000".as_slice(), body].concat());
        let sig_b64 = B64.encode(sig.to_der().as_bytes());
        assert!(sendgrid_verify(&pk, "1700000000", body, &sig_b64));
        assert!(!sendgrid_verify(&pk, "1700000001", body, &sig_b64));
        assert!(!sendgrid_verify(&pk, "1700000000", br#"[{"event":"bounce"}]"#, &sig_b64));
        assert!(!sendgrid_verify(&pk, "1700000000", body, "bm90IGEgc2lnbmF0dXJl"));
        assert!(!sendgrid_verify("garbage", "1700000000", body, &sig_b64));
    }

    #[test]
    fn vonage_hmac_sorts_escapes_and_skips_sig() {
        let params = p(&[("status", "delivered"), ("messageId", "0A00"), ("timestamp", "1700000000"), ("text", "a&b=c"), ("sig", "X")]);
        let sig = vonage_signature(b"s3cret", "sha256", &params);
        let expect = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret")
            .unwrap()
            .chain_update(b"&messageId=0A00&status=delivered&text=a_b_c&timestamp=1700000000")
            .finalize()
            .into_bytes();
        assert_eq!(sig, hex::encode_upper(expect));
        assert_eq!(vonage_signature(b"s3cret", "sha1", &params).len(), 40);
        assert_eq!(vonage_signature(b"s3cret", "sha512", &params).len(), 128);
        // Vonage's own SDK test vector for the MD5-hash method (signature secret "secret").
        let sdk: Vec<(String, String)> = [("a", "1"), ("b", "2"), ("timestamp", "1461605396"), ("sig", "6af838ef94998832dbfc29020b564830")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(vonage_signature(b"secret", "md5hash", &sdk), "6AF838EF94998832DBFC29020B564830");
        let md5_hmac = Hmac::<md5::Md5>::new_from_slice(b"secret").unwrap().chain_update(b"&a=1&b=2&timestamp=1461605396").finalize().into_bytes();
        assert_eq!(vonage_signature(b"secret", "md5", &sdk), hex::encode_upper(md5_hmac));
    }

    #[test]
    fn statuses_map_onto_outcomes() {
        assert_eq!(twilio_status("delivered"), Some("delivered"));
        assert_eq!(twilio_status("failed"), Some("undelivered"));
        assert_eq!(twilio_status("sent"), None);
        assert_eq!(sendgrid_status("bounce", Some("bounce")), Some("bounced"));
        assert_eq!(sendgrid_status("bounce", Some("blocked")), Some("undelivered"));
        assert_eq!(sendgrid_status("group_unsubscribe", None), Some("unsubscribed"));
        assert_eq!(sendgrid_status("processed", None), None);
        assert_eq!(mandrill_status("spam"), Some("spam_report"));
        assert_eq!(mandrill_status("soft_bounce"), None);
        assert_eq!(vonage_status("expired"), Some("undelivered"));
        assert_eq!(vonage_status("buffered"), None);
    }
}
