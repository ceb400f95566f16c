//! `herald api`: the HTTP front door (axum). Internal services and apps send notifications,
//! manage contacts and templates and read a notification's log; email clients hit the
//! tracking endpoints; providers post delivery webhooks.
//!
//! - [`config`]: `[api]` settings ([`config::ApiConfig`]).
//! - [`auth`]: the HMAC-SHA256 request signature, [`auth::sign_request`] (the client
//!   helper), the replay cache, scopes.
//! - [`apps`]: apps, their encrypted secrets and the `herald apps` operations.
//! - [`ratelimit`]: per-app token buckets (429 + Retry-After).
//! - [`cache`]: read-through caches refreshed in the background (apps, templates).
//! - [`validate`]: email, E.164 phone, push tokens, ids, params limits.
//! - [`notifications`]: `POST /v1/notifications` (+ batch), `GET /v1/notifications/{id}`.
//! - [`contacts`]: users, devices, preferences; changes announced on the changes topic.
//! - [`templates`]: create, version, list, preview; the validation cache.
//! - [`tracking`]: the open pixel and the click redirect.
//! - [`webhooks`]: Twilio, SendGrid, Mailchimp Transactional (Mandrill), Vonage.
//! - [`outcomes`]: outcome events to Kafka and the notification log.
//! - [`openapi`]: the OpenAPI 3.1 document served at `/openapi.json`.
//! - [`serve`]: the accept loop: connection cap, header-read and idle timeouts, graceful shutdown.
//! - [`store`]: the API's CQL statements (tables of `cql/005_api.cql`).
//!
//! Every error answer is `{"error": {"code": "<stable code>", "message": "…"}}` (plus
//! `details` for validation errors); internal failures are logged, never echoed.

pub mod apps;
pub mod auth;
pub mod cache;
pub mod config;
pub mod contacts;
pub mod notifications;
pub mod openapi;
pub mod outcomes;
pub mod ratelimit;
pub mod serve;
pub mod store;
pub mod templates;
pub mod tracking;
pub mod validate;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, head, post, put, MethodRouter};
use axum::{Extension, Json, Router};
use rdkafka::producer::FutureProducer;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError};
use crate::config::{CategoryConfig, Config, KafkaConfig, RegistryConfig};
use crate::error::Classify;
use crate::kafka::BusError;
use crate::store::{Store, StoreError};
use crate::telemetry::events;
use crate::topology::Topology;
use apps::{App, Apps, SecretBox};
use auth::{AuthError, ReplayCache, Scope};
use config::{ApiConfig, ReplayGuard};
use ratelimit::RateLimiter;
use store::ApiStore;
use validate::FieldError;

/// Topic names the API writes to.
#[derive(Debug, Clone)]
pub struct ApiTopics {
    pub requests: String,
    pub outcomes: String,
    pub changes: String,
}

/// Everything the handlers share.
pub struct ApiState {
    pub cfg: ApiConfig,
    /// Known categories (the router's policy table).
    pub categories: BTreeMap<String, CategoryConfig>,
    /// Verifies tracking tokens (the router signs them with the same key).
    pub tracking_secret: Vec<u8>,
    pub store: Arc<Store>,
    pub api_store: Arc<ApiStore>,
    pub apps: Apps,
    pub replay: ReplayCache,
    pub limiter: RateLimiter,
    pub codec: Codec,
    pub producer: FutureProducer,
    pub topics: ApiTopics,
    pub templates: templates::TemplateCache,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
}

impl ApiState {
    /// Connects to the store, the registry and Kafka and prepares everything.
    /// Connects to the store (waiting while it is unreachable), the registry and Kafka.
    pub async fn open(config: &Config, topology: &Topology, shutdown: &CancellationToken) -> anyhow::Result<ApiState> {
        let cfg = config.api.clone();
        let key = cfg.encryption_key_bytes().map_err(anyhow::Error::msg)?;
        let store = Arc::new(Store::open_waiting(&config.store, "api", shutdown).await.context("opening the store (did `herald setup` run?)")?);
        let api_store = Arc::new(
            ApiStore::prepare(store.session.clone(), &config.store.keyspace)
                .await
                .context("preparing the API's statements (did `herald setup` run every migration?)")?,
        );
        let producer = crate::kafka::client_config(&config.kafka, "api")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.producer_linger_ms.to_string())
            .set("compression.type", "lz4")
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string())
            .create()
            .map_err(|e| BusError::Config(e.to_string()))?;
        Ok(ApiState {
            apps: Apps::new(api_store.clone(), SecretBox::new(&key), cfg.app_cache_ttl),
            replay: ReplayCache::new(Duration::from_secs(cfg.timestamp_tolerance_secs), cfg.replay_cache_max_entries),
            limiter: RateLimiter::new(cfg.rate_limit_per_second, cfg.rate_limit_burst, cfg.replicas),
            templates: templates::TemplateCache::new(store.clone(), cfg.template_cache_ttl),
            categories: config.router.categories.clone(),
            tracking_secret: config.router.tracking_secret.expose().as_bytes().to_vec(),
            codec: Codec::new(&config.registry)?,
            producer,
            topics: ApiTopics {
                requests: topology.name("requests")?.to_string(),
                outcomes: topology.name("outcomes")?.to_string(),
                changes: topology.name("changes")?.to_string(),
            },
            kafka: config.kafka.clone(),
            registry: config.registry.clone(),
            store,
            api_store,
            cfg,
        })
    }

    /// Announces a contact or template change to the routers' and API processes' caches
    /// (waits for the ack).
    pub async fn publish_change(&self, kind: &str, id: &str) -> Result<(), ApiError> {
        crate::changes::publish(&self.producer, &self.topics.changes, kind, id).await?;
        events::produced("api", &self.topics.changes, 1);
        Ok(())
    }
}

/// Changes announced by other API processes and `herald apps`: templates and apps.
impl crate::changes::Invalidate for ApiState {
    async fn invalidate(&self, kind: &str, id: &str) {
        match kind {
            "template" => self.templates.invalidate(id).await,
            "app" => self.apps.invalidate(id).await,
            _ => {}
        }
    }
}

/// Serves the API until `shutdown`.
pub async fn run(config: &Config, topology: &Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.api.uses_dev_key() {
        tracing::warn!("api.encryption_key is the development key; set HERALD__API__ENCRYPTION_KEY in production");
    }
    let state = Arc::new(ApiState::open(config, topology, &shutdown).await?);
    // Cached templates and apps are dropped when the changes topic says they changed.
    let follower = tokio::spawn({
        let (k, topic, state, stop) = (config.kafka.clone(), state.topics.changes.clone(), state.clone(), shutdown.clone());
        async move {
            let followed = crate::changes::follow(&k, &topic, "api-changes", state, stop).await;
            if let Err(e) = &followed {
                tracing::error!(error = %e, "not following the changes topic: cached apps and templates now refresh only every app_cache_ttl / template_cache_ttl");
            }
            followed
        }
    });
    let listener = tokio::net::TcpListener::bind(&config.api.listen).await.with_context(|| format!("binding api.listen {}", config.api.listen))?;
    tracing::info!(listen = %config.api.listen, replay_guard = ?config.api.replay_guard(), replicas = config.api.replicas, "herald api listening");
    let limits = serve::Limits {
        header_read_timeout: config.api.header_read_timeout,
        idle_timeout: config.api.idle_timeout,
        max_connections: config.api.max_connections,
        max_head_bytes: (config.api.max_uri_bytes + config.api.max_header_bytes).max(64 * 1024) * 4,
        shutdown_grace: Duration::from_secs(10),
    };
    let served = serve::serve(listener, router(state), limits, shutdown.clone()).await;
    shutdown.cancel();
    follower.await.context("changes follower")?.context("following the changes topic")?;
    served?;
    Ok(())
}

/// One endpoint: method, path (axum and OpenAPI syntax), handler.
type Endpoint = (&'static str, &'static str, MethodRouter<Arc<ApiState>>);

/// Endpoints anyone may call (they authenticate otherwise, or not at all).
fn public_endpoints() -> Vec<Endpoint> {
    vec![
        ("get", "/healthz", get(healthz)),
        ("get", "/readyz", get(readyz)),
        ("get", "/metrics", get(metrics)),
        ("get", "/openapi.json", get(openapi_json)),
        ("get", "/t/o/{token}", get(tracking::open)),
        ("get", "/t/c/{token}", get(tracking::click)),
        ("post", "/webhooks/twilio", post(webhooks::twilio)),
        ("post", "/webhooks/sendgrid", post(webhooks::sendgrid)),
        ("post", "/webhooks/mandrill", post(webhooks::mandrill)),
        ("head", "/webhooks/mandrill", head(webhooks::mandrill_probe)),
        ("get", "/webhooks/vonage", get(webhooks::vonage)),
        ("post", "/webhooks/vonage", post(webhooks::vonage)),
    ]
}

/// Endpoints that need a signed request.
fn signed_endpoints() -> Vec<Endpoint> {
    vec![
        ("post", "/v1/notifications", post(notifications::send)),
        ("post", "/v1/notifications/batch", post(notifications::send_batch)),
        ("get", "/v1/notifications/{event_id}", get(notifications::log)),
        ("put", "/v1/users/{user_id}", put(contacts::put_user)),
        ("get", "/v1/users/{user_id}", get(contacts::get_user)),
        ("delete", "/v1/users/{user_id}", delete(contacts::delete_user)),
        ("post", "/v1/users/{user_id}/devices", post(contacts::add_device)),
        ("delete", "/v1/users/{user_id}/devices/{device_id}", delete(contacts::delete_device)),
        ("get", "/v1/users/{user_id}/preferences", get(contacts::get_preferences)),
        ("put", "/v1/users/{user_id}/preferences", put(contacts::put_preferences)),
        ("get", "/v1/templates", get(templates::list)),
        ("post", "/v1/templates", post(templates::create)),
        ("get", "/v1/templates/{template_id}", get(templates::get)),
        ("post", "/v1/templates/{template_id}/versions", post(templates::new_version)),
        ("post", "/v1/templates/{template_id}/preview", post(templates::preview)),
    ]
}

/// Every (method, path) the API serves; the OpenAPI test compares the document with it.
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    public_endpoints().into_iter().chain(signed_endpoints()).map(|(m, p, _)| (m, p)).collect()
}

fn mount(router: Router<Arc<ApiState>>, endpoints: Vec<Endpoint>) -> Router<Arc<ApiState>> {
    let mut by_path: BTreeMap<&'static str, MethodRouter<Arc<ApiState>>> = BTreeMap::new();
    for (_, path, m) in endpoints {
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(m),
            None => m,
        };
        by_path.insert(path, merged);
    }
    by_path.into_iter().fold(router, |r, (path, m)| r.route(path, m))
}

/// The whole HTTP surface.
pub fn router(state: Arc<ApiState>) -> Router {
    let signed = mount(Router::new(), signed_endpoints()).route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    mount(Router::new(), public_endpoints())
        .merge(signed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), read_body))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// The app that signed the request (set by [`authenticate`]).
#[derive(Clone)]
pub struct Caller(pub Arc<App>);

impl Caller {
    /// # Errors
    /// 403 `missing_scope` when the app lacks `scope`.
    pub fn require(&self, scope: Scope) -> Result<&App, ApiError> {
        if self.0.has(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "missing_scope", format!("this app lacks the '{}' scope", scope.as_str())))
        }
    }
}

/// Checks the signature, the timestamp, replays and the app's rate over the body that
/// [`read_body`] has already read and bounded, then hands the request on with the app
/// attached.
async fn authenticate(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let limit = st.cfg.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::too_large(limit))?;
    let refuse = |e: AuthError| {
        events::api_auth_failure(e.code());
        ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
    };
    let h = auth::parse_headers(|n| parts.headers.get(n).and_then(|v| v.to_str().ok())).map_err(refuse)?;
    let now = chrono::Utc::now();
    if !auth::fresh(h.timestamp, now.timestamp(), Duration::from_secs(st.cfg.timestamp_tolerance_secs)) {
        return Err(refuse(AuthError::Stale));
    }
    let app = st.apps.get(&h.key).await?;
    let sts = auth::string_to_sign(parts.method.as_str(), parts.uri.path(), parts.uri.query(), h.timestamp, h.nonce.as_deref(), &bytes);
    let valid = match &app {
        Some(app) => app.secrets(now).any(|s| auth::verify(s.expose().as_bytes(), &sts, &h.signature)),
        None => {
            // Same work for unknown keys, so timing does not tell keys apart.
            let _ = auth::verify(b"unknown-app-key", &sts, &h.signature);
            false
        }
    };
    let app = match (valid, app) {
        (true, Some(app)) => app,
        _ => return Err(refuse(AuthError::BadSignature)),
    };
    match st.replay.first_use(&app.key, &h.signature, h.timestamp, now.timestamp()) {
        Ok(()) => {}
        Err(auth::Seen::Again) => return Err(refuse(AuthError::Replayed)),
        Err(auth::Seen::Full) => {
            tracing::warn!("replay cache full; refusing signed requests until old entries expire");
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable; retry later"));
        }
    }
    // Another replica may have accepted this signature: the store decides (fails closed).
    if st.cfg.replay_guard() == ReplayGuard::Shared && !st.api_store.claim_signature(&app.key, &h.signature, st.cfg.signature_ttl()).await? {
        return Err(refuse(AuthError::Replayed));
    }
    if let Err(wait) = st.limiter.admit(&app.key, app.rate_limit) {
        events::api_rate_limited();
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("rate limit exceeded; retry in {secs} s"));
        e.retry_after = Some(secs);
        return Err(e);
    }
    parts.extensions.insert(Caller(app));
    Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await)
}

/// Bounds the request head (414, 431) and reads the body within `body_read_timeout` (408)
/// and the route's limit (413: `webhook_max_body_bytes` for provider webhooks,
/// `max_body_bytes` for the rest), before anything else looks at the request.
async fn read_body(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let cfg = &st.cfg;
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > cfg.max_uri_bytes {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is longer than {} bytes", cfg.max_uri_bytes),
        ));
    }
    let head: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    if head > cfg.max_header_bytes || req.headers().len() > cfg.max_headers {
        let msg = format!("the request headers are larger than {} bytes or more than {}", cfg.max_header_bytes, cfg.max_headers);
        return Err(ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", msg));
    }
    let limit = if req.uri().path().starts_with("/webhooks/") { cfg.webhook_max_body_bytes } else { cfg.max_body_bytes };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(cfg.body_read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            let over = std::iter::successors(Some(&*inner as &(dyn std::error::Error + 'static)), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            return Err(if over {
                ApiError::too_large(limit)
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", "the request body could not be read")
            });
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {}", crate::config::duration::format(&cfg.body_read_timeout));
            let mut resp = ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", msg).into_response();
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
    };
    Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await)
}

/// Turns every error answer that is not herald's JSON error (an extractor's or the HTTP
/// layer's rejection: a path that is not UTF-8, a missing header, …) into one.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Counts every answer by route template and status, and times it.
async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    events::api_request(&route, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

/// An error answer with a stable code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: None, retry_after: None }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> ApiError {
        self.details = Some(details);
        self
    }

    /// 422 `invalid_request` listing every field problem.
    pub fn invalid(errors: Vec<FieldError>) -> ApiError {
        let first = errors.first().map(|e| format!("{} {}", e.field, e.problem)).unwrap_or_default();
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", first).with_details(json!({ "fields": errors }))
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body is larger than {limit} bytes"))
    }

    /// 503 for a dependency that is down or slow (the client may retry); logged here.
    pub fn unavailable(what: &str, detail: &dyn std::fmt::Display) -> ApiError {
        tracing::warn!(what, error = %detail, "dependency unavailable");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable; retry later")
    }

    /// 500 for a bug or a permanent dependency error; the detail is logged, not answered.
    pub fn internal(what: &str, detail: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(what, error = %detail, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if e.is_retryable() {
            ApiError::unavailable("store", &e)
        } else {
            ApiError::internal("store", &e)
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> ApiError {
        if e.is_retryable() {
            ApiError::unavailable("kafka", &e)
        } else {
            ApiError::internal("kafka", &e)
        }
    }
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> ApiError {
        if e.is_retryable() {
            ApiError::unavailable("registry", &e)
        } else {
            ApiError::internal("codec", &e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut resp = (self.status, Json(json!({ "error": body }))).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Parses a JSON body: 415 `unsupported_media_type` unless `Content-Type` is JSON,
/// 400 `malformed_json` for bytes that are not JSON, 422 `invalid_request` for JSON of the
/// wrong shape.
pub fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" {
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "Content-Type must be application/json"));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", e.to_string()),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("request body is not valid JSON (line {}, column {})", e.line(), e.column()),
        ),
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when Kafka, the CQL store and the registry all answer within 2 s; 503 otherwise.
async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    let within = Duration::from_secs(2);
    let kafka = {
        let producer = st.producer.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                producer.client().fetch_metadata(None, within).map(|_| ())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        }
    };
    let store =
        async { tokio::time::timeout(within, st.api_store.ping()).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) };
    let registry = async {
        tokio::time::timeout(within, crate::schemas::ping(&st.registry))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    };
    let (k, s, r) = tokio::join!(kafka, store, registry);
    let mut ok = true;
    let mut checks = serde_json::Map::new();
    for (name, result) in [("kafka", k), ("store", s), ("registry", r)] {
        if let Err(e) = &result {
            ok = false;
            tracing::warn!(dependency = name, error = %e, "readiness check failed");
        }
        checks.insert(name.into(), json!(if result.is_ok() { "ok" } else { "down" }));
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "status": if ok { "ready" } else { "not_ready" }, "checks": checks }))).into_response()
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render())
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

/// `Extension` of the caller, re-exported for handler signatures.
pub type CallerExt = Extension<Caller>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_are_checked_for_type_syntax_and_shape() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        let mut h = HeaderMap::new();
        assert_eq!(parse_json::<T>(&h, b"{\"a\":1}").unwrap_err().code, "unsupported_media_type");
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(parse_json::<T>(&h, b"{\"a\":1}").unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert_eq!(parse_json::<T>(&h, b"{\"a\":1}").unwrap().a, 1);
        assert_eq!(parse_json::<T>(&h, b"{\"a\":").unwrap_err().code, "malformed_json");
        assert_eq!(parse_json::<T>(&h, b"{\"a\":\"x\"}").unwrap_err().code, "invalid_request");
    }

    #[test]
    fn every_route_is_mounted_once() {
        let table = route_table();
        let mut seen = std::collections::HashSet::new();
        for (m, p) in &table {
            assert!(seen.insert((m, p)), "{m} {p} twice");
        }
        // Building the router panics on conflicting routes.
        let _ = mount(Router::new(), public_endpoints()).merge(mount(Router::new(), signed_endpoints()));
    }

    proptest::proptest! {
        /// Request parsing never panics, whatever the bytes.
        #[test]
        fn parsing_arbitrary_bodies_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let _ = parse_json::<notifications::SendRequest>(&h, &body);
            let _ = parse_json::<notifications::BatchRequest>(&h, &body);
            let _ = parse_json::<contacts::UserInput>(&h, &body);
            let _ = parse_json::<templates::TemplateInput>(&h, &body);
        }
    }
}
