//! `POST /v1/notifications` (one user), `POST /v1/notifications/batch` (one template to many
//! users) and `GET /v1/notifications/{event_id}` (the notification's log).
//!
//! A send is validated completely (category known and allowed for the app, template exists
//! and has content for every channel, params complete and within limits, inline contact
//! data well-formed), then produced to the requests topic as a `NotificationRequested`
//! through the idempotent `acks=all` producer; 202 is answered only after Kafka's ack.
//!
//! Retries are safe: a client `event_id` is the router's dedup key, and an
//! `Idempotency-Key` header derives deterministic event ids (`api-<hash>`), is remembered
//! with a hash of the request for `api.idempotency_ttl`, and a retry answers the first
//! answer again (header `Idempotent-Replayed: true`) without producing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Deserializer};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::auth::Scope;
use super::contacts::{self, DeviceInput};
use super::templates::{check_params, ParamProblem};
use super::validate::{self, FieldError};
use super::{parse_json, ApiError, ApiState, Caller};
use crate::model::{now_ms, NotificationRequested, Priority};
use crate::telemetry::events;

/// Template params: strings, or numbers and booleans (sent as their JSON text).
fn scalar_params<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
    let raw = HashMap::<String, serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(serde::de::Error::custom(format!("param '{k}' must be a string, number or boolean"))),
        })
        .collect()
}

/// Contact data sent along with a notification: upserted before the request is produced
/// (needs the `contacts` scope).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineContact {
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub locale: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceInput>,
}

/// `POST /v1/notifications`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    #[serde(default)]
    pub event_id: Option<String>,
    pub user_id: String,
    /// Defaults to the template's category.
    #[serde(default)]
    pub category: Option<String>,
    pub template_id: String,
    #[serde(default, deserialize_with = "scalar_params")]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub locale: Option<String>,
    /// RFC 3339; after it the notification is not sent.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub contact: Option<InlineContact>,
}

/// One recipient of a batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    pub user_id: String,
    #[serde(default)]
    pub event_id: Option<String>,
    /// Merged over the batch's params.
    #[serde(default, deserialize_with = "scalar_params")]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub locale: Option<String>,
}

/// `POST /v1/notifications/batch`: one template to many users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    #[serde(default)]
    pub category: Option<String>,
    pub template_id: String,
    #[serde(default, deserialize_with = "scalar_params")]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub locale: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    pub recipients: Vec<Recipient>,
}

/// The fields one notification needs, after defaults.
struct Draft<'a> {
    prefix: String,
    event_id: Option<&'a str>,
    user_id: &'a str,
    category: Option<&'a str>,
    template_id: &'a str,
    params: std::borrow::Cow<'a, HashMap<String, String>>,
    channels: Option<&'a Vec<String>>,
    priority: Option<Priority>,
    locale: Option<&'a str>,
    expires_at: Option<&'a str>,
}

/// Checks a draft against the template, categories and limits; field errors go to `errs`.
async fn check(st: &ApiState, caller: &Caller, d: &Draft<'_>, errs: &mut Vec<FieldError>) -> Result<Option<NotificationRequested>, ApiError> {
    let f = |name: &str| format!("{}{name}", d.prefix);
    let start = errs.len();
    if let Some(e) = d.event_id {
        validate::event_id(&f("event_id"), e).err().into_iter().for_each(|e| errs.push(e));
    }
    validate::id(&f("user_id"), d.user_id).err().into_iter().for_each(|e| errs.push(e));
    if let Some(l) = d.locale {
        validate::locale(&f("locale"), l).err().into_iter().for_each(|e| errs.push(e));
    }
    let limits = validate::ParamLimits {
        max_params: st.cfg.max_params,
        max_value_bytes: st.cfg.max_param_bytes,
        max_total_bytes: st.cfg.max_params_total_bytes,
    };
    if let Err(e) = validate::params(&f("params"), &d.params, limits) {
        errs.push(e);
    }
    let expires_at = match d.expires_at.map(chrono::DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) if t.timestamp_millis() > now_ms() => Some(t.timestamp_millis()),
        Some(Ok(_)) => {
            errs.push(FieldError::new(f("expires_at"), "is in the past"));
            None
        }
        Some(Err(_)) => {
            errs.push(FieldError::new(f("expires_at"), "is not an RFC 3339 timestamp"));
            None
        }
    };
    if let Some(chs) = d.channels {
        for (i, c) in chs.iter().enumerate() {
            validate::channel(&f(&format!("channels[{i}]")), c).err().into_iter().for_each(|e| errs.push(e));
        }
    }
    if validate::id("template_id", d.template_id).is_err() {
        return Err(unknown_template());
    }
    let loaded = st.templates.get(d.template_id).await?;
    let Some(t) = loaded.as_ref() else { return Err(unknown_template()) };
    let category = d.category.unwrap_or(&t.meta.category);
    if !st.categories.contains_key(category) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_category", format!("unknown category '{category}'")));
    }
    if !caller.0.may_send(category) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "category_not_allowed", format!("this app may not send category '{category}'")));
    }
    if errs.len() > start {
        return Ok(None);
    }
    let channels: Vec<String> = match d.channels {
        Some(c) if !c.is_empty() => c.clone(),
        _ => t.meta.default_channels.clone(),
    };
    match check_params(t, &channels, &d.params) {
        Ok(()) => {}
        Err(ParamProblem::Missing(names)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing_params",
                format!("{}template '{}' needs params: {}", d.prefix, d.template_id, names.join(", ")),
            )
            .with_details(json!({ "missing": names, "at": d.prefix.trim_end_matches('.') })));
        }
        Err(ParamProblem::NoContent(ch)) => {
            errs.push(FieldError::new(f("channels"), format!("template has no content for channel '{ch}'")));
            return Ok(None);
        }
        Err(ParamProblem::Broken(e)) => {
            tracing::warn!(template = d.template_id, error = %e, "stored template does not render");
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_invalid", "the template does not render; publish a fixed version"));
        }
    }
    Ok(Some(NotificationRequested {
        event_id: d.event_id.map(str::to_string).unwrap_or_default(),
        occurred_at: now_ms(),
        source: format!("api:{}", caller.0.key),
        user_id: d.user_id.to_string(),
        category: category.to_string(),
        template_id: d.template_id.to_string(),
        params: d.params.clone().into_owned(),
        channels: d.channels.filter(|c| !c.is_empty()).cloned(),
        priority: d.priority.unwrap_or_default(),
        locale: d.locale.map(str::to_string),
        expires_at,
    }))
}

fn unknown_template() -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_template", "no such template")
}

/// The `Idempotency-Key` header: 1–255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    match v.to_str() {
        Ok(s) if (1..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(s.to_string())),
        _ => Err(ApiError::invalid(vec![FieldError::new("Idempotency-Key", "must be 1-255 visible ASCII characters")])),
    }
}

/// The event id an idempotency key stands for.
fn derived_event_id(app_key: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(app_key.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    format!("api-{}", hex::encode(&h.finalize()[..16]))
}

/// Answers from a remembered idempotency key, or refuses a different request under it.
fn replayed(row: &super::store::IdempotencyRow, request_hash: &str, batch: bool) -> Result<Response, ApiError> {
    if row.request_hash != request_hash {
        return Err(ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", "this Idempotency-Key was used for a different request"));
    }
    let mut resp = accepted(&row.event_ids, batch);
    resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(resp)
}

fn accepted(ids: &[String], batch: bool) -> Response {
    if batch {
        (StatusCode::ACCEPTED, Json(json!({ "status": "accepted", "count": ids.len(), "event_ids": ids }))).into_response()
    } else {
        let id = ids.first().cloned().unwrap_or_default();
        let mut resp = (StatusCode::ACCEPTED, Json(json!({ "status": "accepted", "event_id": id }))).into_response();
        if let Ok(loc) = HeaderValue::from_str(&format!("/v1/notifications/{id}")) {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        resp
    }
}

/// Produces one request and waits for Kafka's acknowledgement.
pub async fn produce(st: &ApiState, req: &NotificationRequested) -> Result<(), ApiError> {
    let bytes = st.codec.encode(&st.topics.requests, req).await?;
    st.producer
        .send(FutureRecord::to(&st.topics.requests).key(req.user_id.as_bytes()).payload(&bytes), Duration::from_millis(st.cfg.produce_timeout_ms))
        .await
        .map_err(|(e, _)| ApiError::unavailable("produce request", &e))?;
    events::produced("api", &st.topics.requests, 1);
    Ok(())
}

/// `POST /v1/notifications`.
pub async fn send(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Send)?;
    let req: SendRequest = parse_json(&headers, &body)?;
    let idem = idempotency_key(&headers)?;
    let hash = hex::encode(Sha256::digest(&body));
    if let Some(k) = &idem {
        if let Some(row) = st.api_store.idempotency(&caller.0.key, k).await? {
            return replayed(&row, &hash, false);
        }
    }
    let draft = Draft {
        prefix: String::new(),
        event_id: req.event_id.as_deref(),
        user_id: &req.user_id,
        category: req.category.as_deref(),
        template_id: &req.template_id,
        params: std::borrow::Cow::Borrowed(&req.params),
        channels: req.channels.as_ref(),
        priority: req.priority,
        locale: req.locale.as_deref(),
        expires_at: req.expires_at.as_deref(),
    };
    let mut errs = Vec::new();
    let contact = match &req.contact {
        Some(c) => {
            caller.require(Scope::Contacts)?;
            let user = contacts::UserInput { email: c.email.clone(), phone: c.phone.clone(), locale: c.locale.clone(), timezone: c.timezone.clone() };
            let checked = contacts::check_user(&req.user_id, &user, "contact.", &mut errs);
            let devices: Vec<_> =
                c.devices.iter().enumerate().filter_map(|(i, d)| contacts::check_device(d, &format!("contact.devices[{i}]."), &mut errs)).collect();
            Some((checked, devices))
        }
        None => None,
    };
    let checked = check(&st, &caller, &draft, &mut errs).await?;
    let Some(mut n) = checked.filter(|_| errs.is_empty()) else { return Err(ApiError::invalid(errs)) };
    if let Some((user, devices)) = contact {
        contacts::upsert_inline(&st, &req.user_id, user, devices).await?;
    }
    if n.event_id.is_empty() {
        n.event_id = match &idem {
            Some(k) => derived_event_id(&caller.0.key, k),
            None => uuid::Uuid::now_v7().to_string(),
        };
    }
    produce(&st, &n).await?;
    let ids = vec![n.event_id];
    if let Some(k) = &idem {
        st.api_store.put_idempotency(&caller.0.key, k, &hash, &ids, st.cfg.idempotency_ttl).await?;
    }
    Ok(accepted(&ids, false))
}

/// `POST /v1/notifications/batch`: every recipient validated first (nothing is produced
/// unless all are valid), then all produced concurrently; 202 after every ack.
pub async fn send_batch(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Send)?;
    let req: BatchRequest = parse_json(&headers, &body)?;
    if req.recipients.is_empty() || req.recipients.len() > st.cfg.max_batch {
        return Err(ApiError::invalid(vec![FieldError::new("recipients", format!("needs 1 to {} recipients", st.cfg.max_batch))]));
    }
    let idem = idempotency_key(&headers)?;
    let hash = hex::encode(Sha256::digest(&body));
    if let Some(k) = &idem {
        if let Some(row) = st.api_store.idempotency(&caller.0.key, k).await? {
            return replayed(&row, &hash, true);
        }
    }
    let mut errs = Vec::new();
    let mut out = Vec::with_capacity(req.recipients.len());
    let mut seen_ids = std::collections::HashSet::new();
    for (i, r) in req.recipients.iter().enumerate() {
        let params = if r.params.is_empty() {
            std::borrow::Cow::Borrowed(&req.params)
        } else {
            let mut p = req.params.clone();
            p.extend(r.params.clone());
            std::borrow::Cow::Owned(p)
        };
        let draft = Draft {
            prefix: format!("recipients[{i}]."),
            event_id: r.event_id.as_deref(),
            user_id: &r.user_id,
            category: req.category.as_deref(),
            template_id: &req.template_id,
            params,
            channels: req.channels.as_ref(),
            priority: req.priority,
            locale: r.locale.as_deref().or(req.locale.as_deref()),
            expires_at: req.expires_at.as_deref(),
        };
        if let Some(mut n) = check(&st, &caller, &draft, &mut errs).await? {
            if n.event_id.is_empty() {
                n.event_id = match &idem {
                    Some(k) => format!("{}-{i}", derived_event_id(&caller.0.key, k)),
                    None => uuid::Uuid::now_v7().to_string(),
                };
            }
            if !seen_ids.insert(n.event_id.clone()) {
                errs.push(FieldError::new(format!("recipients[{i}].event_id"), "repeats another recipient's event_id"));
            }
            out.push(n);
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    futures::future::try_join_all(out.iter().map(|n| produce(&st, n))).await?;
    let ids: Vec<String> = out.into_iter().map(|n| n.event_id).collect();
    if let Some(k) = &idem {
        st.api_store.put_idempotency(&caller.0.key, k, &hash, &ids, st.cfg.idempotency_ttl).await?;
    }
    Ok(accepted(&ids, true))
}

/// Whether `app` may read a notification whose log rows are `rows`: admin apps read every
/// notification, other apps the ones they sent (the router records the request's source).
fn may_read(app: &super::apps::App, rows: &[crate::store::LogEntry]) -> bool {
    app.scopes.contains(&Scope::Admin)
        || rows.iter().find_map(|r| r.source.as_deref()).is_some_and(|s| s.strip_prefix("api:") == Some(app.key.as_str()))
}

/// `GET /v1/notifications/{event_id}`: every outcome recorded, oldest first. Another app's
/// notification answers the same 404 as an unknown one (no hint that it exists).
pub async fn log(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(event_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Status)?;
    let rows = st.store.log(&event_id).await?;
    if rows.is_empty() || !may_read(&caller.0, &rows) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no outcome recorded for this event (yet)"));
    }
    let outcomes: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "outcome_id": r.outcome_id,
                "recorded_at": r.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "status": r.status,
                "channel": r.channel,
                "delivery_id": r.delivery_id,
                "provider": r.provider,
                "provider_message_id": r.provider_message_id,
                "attempt": r.attempt,
                "reason": r.reason,
                "user_id": r.user_id,
                "category": r.category,
            })
        })
        .collect();
    Ok(Json(json!({ "event_id": event_id, "outcomes": outcomes })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_scalar_params_and_reject_unknown_fields() {
        let r: SendRequest =
            serde_json::from_str(r#"{"user_id":"u","template_id":"t","params":{"a":"x","n":3,"b":true},"priority":"high"}"#).unwrap();
        assert_eq!(r.params["n"], "3");
        assert_eq!(r.params["b"], "true");
        assert_eq!(r.priority, Some(Priority::High));
        assert!(serde_json::from_str::<SendRequest>(r#"{"user_id":"u","template_id":"t","params":{"o":{"x":1}}}"#).is_err());
        assert!(serde_json::from_str::<SendRequest>(r#"{"user_id":"u","template_id":"t","surprise":1}"#).is_err());
        assert!(serde_json::from_str::<SendRequest>(r#"{"user_id":"u","template_id":"t","priority":"urgent"}"#).is_err());
    }

    #[test]
    fn idempotency_keys_derive_stable_per_app_ids() {
        assert_eq!(derived_event_id("hk_a", "k1"), derived_event_id("hk_a", "k1"));
        assert_ne!(derived_event_id("hk_a", "k1"), derived_event_id("hk_b", "k1"));
        assert!(validate::event_id("e", &derived_event_id("hk_a", "k1")).is_ok());
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert("idempotency-key", HeaderValue::from_static("order-42"));
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("order-42"));
        h.insert("idempotency-key", HeaderValue::from_static(""));
        assert!(idempotency_key(&h).is_err());
    }
}
