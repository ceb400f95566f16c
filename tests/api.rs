//! HTTP API tests against the real stack: the `herald api` binary (and the router, so sent
//! notifications come out the other end) in an isolated environment, called over HTTP with
//! signed requests made by `herald::api::auth::sign_request`, apps made with `herald apps`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use herald::api::openapi;
use herald::dispatch::store::{CqlDispatchStore, DispatchStore, SentRecord, Write};
use herald::tracking::{TrackingClaim, TrackingSettings};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::env::Env;
use common::unique;

const WAIT: Duration = Duration::from_secs(30);
const APNS: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const FCM: &str = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

/// A signed client for one app.
#[derive(Clone)]
struct Client {
    base: String,
    key: String,
    secret: String,
    http: reqwest::Client,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

fn nonce() -> String {
    unique("n")
}

impl Client {
    /// A signed request with a JSON body (or none).
    async fn call(&self, method: &str, pq: &str, body: Option<Value>) -> Answer {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
        self.raw(method, pq, bytes, Some("application/json"), chrono::Utc::now().timestamp(), Some(&nonce()), |_| {}).await
    }

    /// Full control: raw body, content type, timestamp, nonce and a hook to tamper with the
    /// signed headers.
    #[allow(clippy::too_many_arguments)]
    async fn raw(
        &self,
        method: &str,
        pq: &str,
        body: Vec<u8>,
        ct: Option<&str>,
        ts: i64,
        nonce: Option<&str>,
        tweak: impl FnOnce(&mut Vec<(&'static str, String)>),
    ) -> Answer {
        let mut headers = herald::api::auth::sign_request(&self.key, &self.secret, method, pq, &body, ts, nonce);
        tweak(&mut headers);
        let mut rb = self.http.request(method.parse().unwrap(), format!("{}{pq}", self.base)).body(body);
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        answer(rb.send().await.unwrap()).await
    }

    async fn send_headers(&self, req: reqwest::RequestBuilder) -> Answer {
        answer(req.send().await.unwrap()).await
    }
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer { status, headers, body }
}

/// Every property of `body` is documented for (path, method, status), and it is an object.
fn documented(path: &str, method: &str, a: &Answer) {
    let doc = openapi::document();
    let props: BTreeSet<String> = openapi::response_properties(&doc, path, method, a.status.as_str())
        .unwrap_or_else(|| panic!("{method} {path} {} has no documented schema", a.status))
        .into_iter()
        .collect();
    let got: BTreeSet<String> = a.body.as_object().unwrap_or_else(|| panic!("not an object: {a:?}")).keys().cloned().collect();
    assert!(got.is_subset(&props), "{method} {path} {}: undocumented properties {:?}", a.status, got.difference(&props).collect::<Vec<_>>());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The SendGrid test key pair: (signing key, base64 SPKI public key).
fn sendgrid_keys() -> (p256::ecdsa::SigningKey, String) {
    use p256::pkcs8::EncodePublicKey;
    let sk = p256::ecdsa::SigningKey::from_bytes(&[0x5au8; 32].into()).unwrap();
    let pk = B64.encode(sk.verifying_key().to_public_key_der().unwrap().as_bytes());
    (sk, pk)
}

struct Api {
    env: Env,
    base: String,
    /// A second API process on the same store and topics (another replica).
    base2: String,
    http: reqwest::Client,
    admin: Client,
}

impl Api {
    async fn start() -> Api {
        let (port, port2) = (free_port(), free_port());
        let (_, pk) = sendgrid_keys();
        let extra = format!(
            r#"
[api]
listen = "127.0.0.1:{port}"
public_base_url = "http://127.0.0.1:{port}"
max_body_bytes = 16384
webhook_max_body_bytes = 65536
# Long cache lifetimes: rotations and revocations by `herald apps` (another process) must
# reach the API through the changes topic, not by expiry.
app_cache_ttl = "1h"
template_cache_ttl = "1h"
# Two replicas serve (api and api2): a signature is claimed once across both.
replay_guard = "shared"
twilio_auth_token = "tw-test-token"
sendgrid_public_key = "{pk}"
mandrill_webhook_key = "md-test-key"
vonage_signature_secret = "vn-test-secret"
vonage_signature_method = "sha256"
"#
        );
        let env = Env::start(&extra).await;
        env.spawn("api", &["api"]);
        let listen2 = format!("127.0.0.1:{port2}");
        env.spawn_env("api2", &["api"], &[("HERALD__API__LISTEN", listen2.as_str())]);
        env.spawn("router", &["router"]);
        let base = format!("http://127.0.0.1:{port}");
        let base2 = format!("http://{listen2}");
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for (role, b) in [("api", &base), ("api2", &base2)] {
            while http.get(format!("{b}/healthz")).send().await.map(|r| r.status()).ok() != Some(StatusCode::OK) {
                assert!(std::time::Instant::now() < deadline, "{role} did not come up:\n{}", common::env::tail(&env.log(role), 30));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let mut api =
            Api { env, base: base.clone(), base2, http: http.clone(), admin: Client { base, key: String::new(), secret: String::new(), http } };
        api.admin = api.app(&["--scopes", "admin"]);
        api
    }

    /// `herald apps <args>` with this env's config; stdout.
    fn apps(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("apps")
            .args(args)
            .env("HERALD_CONFIG", &self.env.config_path)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "herald apps {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new app via `herald apps create`.
    fn app(&self, args: &[&str]) -> Client {
        let name = unique("app");
        let mut all = vec!["create", "--name", &name, "--json"];
        all.extend_from_slice(args);
        let v: Value = serde_json::from_str(&self.apps(&all)).unwrap();
        Client {
            base: self.base.clone(),
            key: v["key"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
            http: self.http.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_paths() {
    let api = Api::start().await;
    futures::join!(
        health_metrics_and_openapi(&api),
        send_reaches_the_router_and_the_log(&api),
        idempotency_key_makes_retries_safe(&api),
        batch_sends_one_template_to_many(&api),
        inline_contacts_are_validated_and_stored(&api),
        authentication_errors(&api),
        a_replay_to_another_replica_is_refused(&api),
        racing_claims_of_one_signature_accept_at_most_one(&api),
        rotation_and_revocation(&api),
        scopes_and_categories(&api),
        validation_errors(&api),
        rate_limits_answer_429(&api),
        contacts_crud_and_token_moves(&api),
        contact_changes_reach_the_router(&api),
        templates_create_version_list_preview(&api),
        tracking_open_and_click(&api),
        twilio_and_vonage_webhooks(&api),
        sendgrid_and_mandrill_webhooks(&api),
        every_rejection_is_a_json_error(&api),
        slow_and_idle_connections_are_closed(&api),
    );
    let log = api.env.log("api") + &api.env.log("api2");
    for secret in [api.admin.secret.as_str(), "tw-test-token", "md-test-key", "vn-test-secret"] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

async fn health_metrics_and_openapi(api: &Api) {
    let a = answer(api.http.get(format!("{}/healthz", api.base)).send().await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    documented("/healthz", "get", &a);
    let a = answer(api.http.get(format!("{}/readyz", api.base)).send().await.unwrap()).await;
    assert_eq!((a.status, a.body["checks"].clone()), (StatusCode::OK, json!({ "kafka": "ok", "store": "ok", "registry": "ok" })));
    documented("/readyz", "get", &a);
    let a = answer(api.http.get(format!("{}/openapi.json", api.base)).send().await.unwrap()).await;
    assert_eq!(a.body, openapi::document(), "served document is the one the unit tests check");
    let a = answer(api.http.get(format!("{}/nope", api.base)).send().await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
    let m = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("herald_api_requests_total"), "{m}");
    // Durations are bucketed histograms (aggregatable across replicas), not summaries.
    assert!(m.contains("herald_api_request_duration_seconds_bucket{") && m.contains("le=\"0.005\""), "{m}");
}

fn bill(user: &str) -> Value {
    json!({ "user_id": user, "template_id": "bill_due", "params": { "amount": "12.30 €" }, "channels": ["email"] })
}

async fn user_with_email(api: &Api, c: &Client, user: &str) {
    let a = c.call("PUT", &format!("/v1/users/{user}"), Some(json!({ "email": format!("{user}@example.com"), "locale": "en" }))).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let _ = api;
}

async fn send_reaches_the_router_and_the_log(api: &Api) {
    let user = unique("u");
    user_with_email(api, &api.admin, &user).await;
    let a = api.admin.call("POST", "/v1/notifications", Some(bill(&user))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    documented("/v1/notifications", "post", &a);
    let id = a.body["event_id"].as_str().unwrap().to_string();
    assert_eq!(a.headers["location"], format!("/v1/notifications/{id}").as_str());
    api.env.wait_outcomes(&id, WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
    let d = &api.env.deliveries(&id)[0];
    assert_eq!((d.channel.as_str(), d.content.subject.as_deref()), ("email", Some("Your bill: 12.30 €")));
    let log = api.admin.call("GET", &format!("/v1/notifications/{id}"), None).await;
    assert_eq!(log.status, StatusCode::OK, "{log:?}");
    documented("/v1/notifications/{event_id}", "get", &log);
    assert_eq!(log.body["outcomes"][0]["status"], "routed");
    for o in log.body["outcomes"].as_array().unwrap() {
        let props: BTreeSet<String> = o.as_object().unwrap().keys().cloned().collect();
        let doc = openapi::document();
        let declared: BTreeSet<String> = doc["components"]["schemas"]["Outcome"]["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(props, declared);
    }
    let missing = api.admin.call("GET", &format!("/v1/notifications/{}", unique("never")), None).await;
    assert_eq!((missing.status, missing.code()), (StatusCode::NOT_FOUND, "not_found"));
    // The status scope reads the app's own notifications: another app's answers like an
    // unknown one, while admin apps read every notification.
    let sender = api.app(&["--scopes", "send,status"]);
    let a = sender.call("POST", "/v1/notifications", Some(bill(&user))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let theirs = a.body["event_id"].as_str().unwrap().to_string();
    api.env.wait_outcomes(&theirs, WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
    let own = sender.call("GET", &format!("/v1/notifications/{theirs}"), None).await;
    assert_eq!((own.status, own.body["outcomes"][0]["status"].as_str()), (StatusCode::OK, Some("routed")), "{own:?}");
    let other = sender.call("GET", &format!("/v1/notifications/{id}"), None).await;
    assert_eq!((other.status, other.code()), (StatusCode::NOT_FOUND, "not_found"), "another app's notification: {other:?}");
    let by_admin = api.admin.call("GET", &format!("/v1/notifications/{theirs}"), None).await;
    assert_eq!(by_admin.status, StatusCode::OK, "{by_admin:?}");
    // A client event id is kept as is.
    let mut body = bill(&user);
    let own = unique("client-evt");
    body["event_id"] = json!(own);
    let a = api.admin.call("POST", "/v1/notifications", Some(body)).await;
    assert_eq!(a.body["event_id"], own.as_str());
}

async fn idempotency_key_makes_retries_safe(api: &Api) {
    let user = unique("idem");
    user_with_email(api, &api.admin, &user).await;
    let key = unique("key");
    let body = serde_json::to_vec(&bill(&user)).unwrap();
    let post = |body: Vec<u8>| {
        let (c, key) = (api.admin.clone(), key.clone());
        async move {
            let ts = chrono::Utc::now().timestamp();
            let n = nonce();
            let mut h = herald::api::auth::sign_request(&c.key, &c.secret, "POST", "/v1/notifications", &body, ts, Some(&n));
            h.push(("idempotency-key", key));
            let mut rb = c.http.post(format!("{}/v1/notifications", c.base)).header("content-type", "application/json").body(body);
            for (k, v) in h {
                rb = rb.header(k, v);
            }
            c.send_headers(rb).await
        }
    };
    let first = post(body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    let second = post(body.clone()).await;
    assert_eq!((second.status, &second.body["event_id"]), (StatusCode::ACCEPTED, &first.body["event_id"]));
    assert_eq!(second.headers["idempotent-replayed"], "true");
    let id = first.body["event_id"].as_str().unwrap();
    api.env.wait_outcomes(id, WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api.env.outcomes(id).iter().all(|o| o.status != "duplicate"), "the retry was not produced again");
    let other = post(serde_json::to_vec(&bill(&unique("someone-else"))).unwrap()).await;
    assert_eq!((other.status, other.code()), (StatusCode::CONFLICT, "idempotency_conflict"));
}

async fn batch_sends_one_template_to_many(api: &Api) {
    let users: Vec<String> = (0..3).map(|_| unique("b")).collect();
    for u in &users {
        user_with_email(api, &api.admin, u).await;
    }
    let recipients: Vec<Value> = users.iter().enumerate().map(|(i, u)| json!({ "user_id": u, "params": { "amount": format!("{i}.00") } })).collect();
    let a = api
        .admin
        .call("POST", "/v1/notifications/batch", Some(json!({ "template_id": "bill_due", "channels": ["email"], "recipients": recipients })))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    documented("/v1/notifications/batch", "post", &a);
    let ids: Vec<String> = a.body["event_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        api.env.wait_outcomes(id, WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
        assert_eq!(api.env.deliveries(id)[0].content.subject.as_deref(), Some(format!("Your bill: {i}.00").as_str()));
    }
    // One bad recipient refuses the whole batch, naming it.
    let a = api
        .admin
        .call(
            "POST",
            "/v1/notifications/batch",
            Some(json!({ "template_id": "bill_due", "params": { "amount": "1" }, "recipients": [{ "user_id": "ok" }, { "user_id": "bad/id" }] })),
        )
        .await;
    assert_eq!(
        (a.status, a.body["error"]["details"]["fields"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("recipients[1].user_id"))
    );
    let a = api.admin.call("POST", "/v1/notifications/batch", Some(json!({ "template_id": "bill_due", "recipients": [] }))).await;
    assert_eq!(a.code(), "invalid_request");
}

async fn inline_contacts_are_validated_and_stored(api: &Api) {
    let user = unique("inline");
    let mut body = bill(&user);
    body["channels"] = json!(["email", "sms", "push"]);
    body["contact"] =
        json!({ "email": format!("{user}@example.com"), "phone": "+49 151 12345678", "devices": [{ "platform": "ios", "token": APNS }] });
    let a = api.admin.call("POST", "/v1/notifications", Some(body.clone())).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let id = a.body["event_id"].as_str().unwrap();
    api.env.wait_outcomes(id, WAIT, |os| os.iter().filter(|o| o.status == "routed").count() == 3).await;
    let stored = api.env.store.user(&user).await.unwrap().unwrap();
    assert_eq!(stored.phone.as_deref(), Some("+4915112345678"), "normalised to E.164");
    for (field, value, path) in [
        ("email", json!("not-an-email"), "contact.email"),
        ("phone", json!("0151 1234567"), "contact.phone"),
        ("devices", json!([{ "platform": "ios", "token": "xyz" }]), "contact.devices[0].token"),
        ("devices", json!([{ "platform": "android", "token": "short" }]), "contact.devices[0].token"),
    ] {
        let mut b = body.clone();
        b["contact"] = json!({ field: value });
        let a = api.admin.call("POST", "/v1/notifications", Some(b)).await;
        assert_eq!((a.status, a.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"), "{field}");
        assert_eq!(a.body["error"]["details"]["fields"][0]["field"], path, "{a:?}");
    }
}

async fn authentication_errors(api: &Api) {
    let c = &api.admin;
    let now = chrono::Utc::now().timestamp();
    // No headers at all.
    let a = answer(api.http.get(format!("{}/v1/templates", api.base)).send().await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "missing_auth"));
    // Wrong secret, unknown key, tampered signature: one answer, nothing to tell them apart.
    let wrong = Client { secret: "hs_wrong".into(), ..c.clone() };
    let unknown = Client { key: "hk_000000000000000000000000".into(), ..c.clone() };
    for client in [&wrong, &unknown] {
        let a = client.call("GET", "/v1/templates", None).await;
        assert_eq!(
            (a.status, a.code(), a.body["error"]["message"].as_str()),
            (StatusCode::UNAUTHORIZED, "invalid_signature", Some("invalid signature"))
        );
    }
    let a = c
        .raw("GET", "/v1/templates", vec![], None, now, Some(&nonce()), |h| {
            h.iter_mut().filter(|(k, _)| *k == "x-herald-signature").for_each(|(_, v)| *v = "0".repeat(64))
        })
        .await;
    assert_eq!(a.code(), "invalid_signature");
    // Signed for another body / path / query.
    let a = c
        .raw("POST", "/v1/notifications", b"{}".to_vec(), Some("application/json"), now, Some(&nonce()), |h| {
            let other = herald::api::auth::sign_request(&c.key, &c.secret, "POST", "/v1/notifications", b"{ }", now, None);
            h.retain(|(k, _)| *k != "x-herald-signature" && *k != "x-herald-nonce");
            h.push(other.into_iter().find(|(k, _)| *k == "x-herald-signature").unwrap());
        })
        .await;
    assert_eq!(a.code(), "invalid_signature");
    // Stale and future timestamps.
    for ts in [chrono::Utc::now().timestamp() - 330, chrono::Utc::now().timestamp() + 330] {
        let a = c.raw("GET", "/v1/templates", vec![], None, ts, Some(&nonce()), |_| {}).await;
        assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "stale_timestamp"));
    }
    let a = c
        .raw("GET", "/v1/templates", vec![], None, now, Some(&nonce()), |h| {
            h.iter_mut().filter(|(k, _)| *k == "x-herald-timestamp").for_each(|(_, v)| *v = "yesterday".into())
        })
        .await;
    assert_eq!(a.code(), "malformed_auth");
    // A replay of the same signed request.
    let n = nonce();
    let first = c.raw("GET", "/v1/templates?b=2&a=1", vec![], None, now, Some(&n), |_| {}).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let again = c.raw("GET", "/v1/templates?b=2&a=1", vec![], None, now, Some(&n), |_| {}).await;
    assert_eq!((again.status, again.code()), (StatusCode::UNAUTHORIZED, "replayed_request"));
    // Signed without a nonce: fine once.
    let a = c.raw("GET", "/v1/templates", vec![], None, now - 7, None, |_| {}).await;
    assert_eq!(a.status, StatusCode::OK);
    let metrics = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_api_auth_failures_total{reason=\"replayed_request\"}"), "{metrics}");
}

/// `api.replay_guard = "shared"`: a signed request that one API process accepted is refused
/// by another that never saw it (each process's own cache alone would let it through), so
/// a captured send cannot be replayed through a second replica.
async fn a_replay_to_another_replica_is_refused(api: &Api) {
    let one = &api.admin;
    let two = Client { base: api.base2.clone(), ..one.clone() };
    let now = chrono::Utc::now().timestamp();
    let n = nonce();
    let first = one.raw("GET", "/v1/templates", vec![], None, now, Some(&n), |_| {}).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let replayed = two.raw("GET", "/v1/templates", vec![], None, now, Some(&n), |_| {}).await;
    assert_eq!((replayed.status, replayed.code()), (StatusCode::UNAUTHORIZED, "replayed_request"), "{replayed:?}");
    // A send, replayed the other way round: accepted once, produced once.
    let user = unique("u");
    user_with_email(api, one, &user).await;
    let body = serde_json::to_vec(&bill(&user)).unwrap();
    let n = nonce();
    let sent = two.raw("POST", "/v1/notifications", body.clone(), Some("application/json"), now, Some(&n), |_| {}).await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{sent:?}");
    let again = one.raw("POST", "/v1/notifications", body, Some("application/json"), now, Some(&n), |_| {}).await;
    assert_eq!((again.status, again.code()), (StatusCode::UNAUTHORIZED, "replayed_request"), "{again:?}");
    // Counted where it was refused: only this test sends replays to the second process.
    let metrics = api.http.get(format!("{}/metrics", api.base2)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_api_auth_failures_total{reason=\"replayed_request\"}"), "{metrics}");
}

/// The shared guard's claim against the real store: once accepted, a signature is refused
/// ever after; of claims racing for one signature at most one is accepted.
async fn racing_claims_of_one_signature_accept_at_most_one(api: &Api) {
    let st = herald::api::store::ApiStore::prepare(api.env.store.session.clone(), &api.env.config.store.keyspace).await.unwrap();
    let ttl = Duration::from_secs(120);
    let key = unique("hk");
    assert!(st.claim_signature(&key, "sig-once", ttl).await.unwrap());
    assert!(!st.claim_signature(&key, "sig-once", ttl).await.unwrap());
    let mut won = 0;
    for round in 0..25 {
        let sig = format!("sig-race-{round}");
        let answers = futures::future::join_all((0..8).map(|_| st.claim_signature(&key, &sig, ttl))).await;
        let wins = answers.into_iter().filter(|a| *a.as_ref().unwrap()).count();
        assert!(wins <= 1, "round {round}: {wins} of 8 racing claims accepted");
        won += wins;
        assert!(!st.claim_signature(&key, &sig, ttl).await.unwrap(), "round {round}: a claim after the race was accepted");
    }
    println!("racing claims: {won} of 25 races had a winner (the others all refused)");
}

async fn rotation_and_revocation(api: &Api) {
    let c = api.app(&["--scopes", "templates"]);
    assert_eq!(c.call("GET", "/v1/templates", None).await.status, StatusCode::OK);
    let v: Value = serde_json::from_str(&api.apps(&["rotate", &c.key, "--json"])).unwrap();
    let rotated = Client { secret: v["secret"].as_str().unwrap().into(), ..c.clone() };
    assert_ne!(rotated.secret, c.secret);
    until_status(&rotated, StatusCode::OK).await;
    assert_eq!(rotated.call("GET", "/v1/templates", None).await.status, StatusCode::OK, "new secret works");
    assert_eq!(c.call("GET", "/v1/templates", None).await.status, StatusCode::OK, "old secret works during the grace period");
    let listed = api.apps(&["list"]);
    assert!(listed.contains(&c.key) && !listed.contains(&c.secret) && !listed.contains(&rotated.secret));
    api.apps(&["revoke", &c.key]);
    until_status(&rotated, StatusCode::UNAUTHORIZED).await;
    let a = rotated.call("GET", "/v1/templates", None).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "invalid_signature"));
    // Stored encrypted: neither secret is in the table.
    let rows = api
        .env
        .store
        .session
        .query_unpaged(format!("SELECT secret_enc, previous_secret_enc FROM {}.api_apps WHERE app_key = ?", api.env.config.store.keyspace), (&c.key,))
        .await
        .unwrap();
    let (enc, prev): (Option<String>, Option<String>) = rows.into_rows_result().unwrap().first_row().unwrap();
    let (enc, prev) = (enc.unwrap(), prev.unwrap());
    assert!(!enc.contains(&rotated.secret) && !prev.contains(&c.secret) && enc.len() > 40);
}

/// Waits out the app cache TTL (1 s here): the first call after it is still answered from
/// the stale entry while the refresh runs; shortly after, the refreshed one is in use.
/// Waits (at most 10 s, far below the hour the caches keep an app) until `c`'s calls answer
/// `status`: the change has reached the API through the changes topic.
async fn until_status(c: &Client, status: StatusCode) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = c.call("GET", "/v1/templates", None).await.status;
        if got == status {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still {got}, not {status}, 10 s after the change");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scopes_and_categories(api: &Api) {
    let status_only = api.app(&["--scopes", "status"]);
    let a = status_only.call("POST", "/v1/notifications", Some(bill("x"))).await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "missing_scope"));
    let a = status_only.call("PUT", "/v1/users/x", Some(json!({}))).await;
    assert_eq!(a.code(), "missing_scope");
    let billing_only = api.app(&["--scopes", "send", "--categories", "billing"]);
    let user = unique("cat");
    user_with_email(api, &api.admin, &user).await;
    assert_eq!(billing_only.call("POST", "/v1/notifications", Some(bill(&user))).await.status, StatusCode::ACCEPTED);
    let a = billing_only
        .call("POST", "/v1/notifications", Some(json!({ "user_id": user, "template_id": "login_code", "params": { "code": "1" } })))
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "category_not_allowed"));
    let mut inline = bill(&user);
    inline["contact"] = json!({ "email": "a@example.com" });
    assert_eq!(billing_only.call("POST", "/v1/notifications", Some(inline)).await.code(), "missing_scope");
    assert_eq!(billing_only.call("GET", "/v1/templates", None).await.code(), "missing_scope");
}

async fn validation_errors(api: &Api) {
    let c = &api.admin;
    let post = |b: Value| c.call("POST", "/v1/notifications", Some(b));
    let a = post(json!({ "user_id": "u", "template_id": "no_such_template" })).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_template"));
    let a = post(json!({ "user_id": "u", "template_id": "bill_due" })).await;
    assert_eq!(
        (a.status, a.code(), a.body["error"]["details"]["missing"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, "missing_params", json!(["amount"]))
    );
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "category": "nope", "params": { "amount": "1" } })).await;
    assert_eq!(a.code(), "unknown_category");
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "channels": ["fax"], "params": { "amount": "1" } })).await;
    assert_eq!((a.code(), a.body["error"]["details"]["fields"][0]["field"].as_str()), ("invalid_request", Some("channels[0]")));
    let a = post(json!({ "user_id": "u", "template_id": "login_code", "channels": ["email"], "params": { "code": "1" } })).await;
    assert_eq!(a.code(), "invalid_request", "login_code has no email content: {a:?}");
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "params": { "amount": "x".repeat(3000) } })).await;
    assert_eq!((a.code(), a.body["error"]["details"]["fields"][0]["field"].as_str()), ("invalid_request", Some("params.amount")));
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "params": { "amount": "1" }, "expires_at": "2001-01-01T00:00:00Z" })).await;
    assert_eq!(a.code(), "invalid_request");
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "surprise": true })).await;
    assert_eq!(a.code(), "invalid_request", "unknown fields are refused");
    let now = chrono::Utc::now().timestamp();
    let a = c.raw("POST", "/v1/notifications", b"{\"user_id\": ".to_vec(), Some("application/json"), now, Some(&nonce()), |_| {}).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "malformed_json"));
    let a = c.raw("POST", "/v1/notifications", serde_json::to_vec(&bill("u")).unwrap(), Some("text/plain"), now, Some(&nonce()), |_| {}).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
    let big = json!({ "user_id": "u", "template_id": "bill_due", "params": { "amount": "y".repeat(20_000) } });
    let a = c.raw("POST", "/v1/notifications", serde_json::to_vec(&big).unwrap(), Some("application/json"), now, Some(&nonce()), |_| {}).await;
    assert_eq!((a.status, a.code()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    let a = c.call("PUT", "/v1/users/v1", Some(json!({ "phone": "+49 1" }))).await;
    assert_eq!((a.code(), a.body["error"]["details"]["fields"][0]["field"].as_str()), ("invalid_request", Some("phone")));
    let a = c.call("PUT", "/v1/users/v1", Some(json!({ "email": "two@@example.com" }))).await;
    assert_eq!(a.body["error"]["details"]["fields"][0]["field"], "email");
    let a = c.call("DELETE", "/v1/templates", None).await;
    assert_eq!((a.status, a.code()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    // Ids that look like other ids: bidi overrides, zero-width joiners, isolates.
    for id in ["v1\u{202E}gnp", "v\u{200D}1", "\u{2066}v1"] {
        let pq = format!("/v1/users/{}", url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>());
        let a = c.call("PUT", &pq, Some(json!({ "email": "v@example.com" }))).await;
        assert_eq!(
            (a.status, a.body["error"]["details"]["fields"][0]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("user_id")),
            "{id:?}: {a:?}"
        );
        let a = post(json!({ "user_id": id, "template_id": "bill_due", "params": { "amount": "1" } })).await;
        assert_eq!(
            (a.status, a.body["error"]["details"]["fields"][0]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("user_id")),
            "{id:?}: {a:?}"
        );
    }
    // A NUL byte in a param.
    let a = post(json!({ "user_id": "u", "template_id": "bill_due", "params": { "amount": "1\u{0}" } })).await;
    assert_eq!(
        (a.status, a.body["error"]["details"]["fields"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("params.amount")),
        "{a:?}"
    );
    // Opting out of a category that cannot be opted out of.
    let a = c
        .call("PUT", "/v1/users/v1/preferences", Some(json!({ "preferences": [{ "channel": "sms", "category": "security", "opt_in": false }] })))
        .await;
    assert_eq!(
        (a.status, a.body["error"]["details"]["fields"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("preferences[0].opt_in")),
        "{a:?}"
    );
    let a = c
        .call("PUT", "/v1/users/v1/preferences", Some(json!({ "preferences": [{ "channel": "sms", "category": "security", "opt_in": true }] })))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
}

async fn rate_limits_answer_429(api: &Api) {
    let slow = api.app(&["--scopes", "templates", "--rate-limit", "1"]);
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(slow.call("GET", "/v1/templates", None).await);
    }
    let limited = answers.iter().find(|a| a.status == StatusCode::TOO_MANY_REQUESTS).expect("one of 4 quick calls at 1/s (burst 2) is limited");
    assert_eq!(limited.code(), "rate_limited");
    assert!(limited.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(api.admin.call("GET", "/v1/templates", None).await.status, StatusCode::OK, "limits are per app");
}

async fn contacts_crud_and_token_moves(api: &Api) {
    let c = &api.admin;
    let (a_id, b_id) = (unique("ca"), unique("cb"));
    let a = c
        .call(
            "PUT",
            &format!("/v1/users/{a_id}"),
            Some(json!({ "email": "a@example.com", "phone": "+4915112345678", "locale": "de-DE", "timezone": "Europe/Berlin" })),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    documented("/v1/users/{user_id}", "put", &a);
    user_with_email(api, c, &b_id).await;
    let a = c.call("POST", &format!("/v1/users/{a_id}/devices"), Some(json!({ "platform": "android", "token": FCM, "app_id": "com.example" }))).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    documented("/v1/users/{user_id}/devices", "post", &a);
    let device = a.body["device_id"].as_str().unwrap().to_string();
    let got = c.call("GET", &format!("/v1/users/{a_id}"), None).await;
    documented("/v1/users/{user_id}", "get", &got);
    assert_eq!((got.body["phone"].as_str(), got.body["devices"][0]["token"].as_str()), (Some("+4915112345678"), Some(FCM)));
    // The same token registered by user b moves there.
    let a = c.call("POST", &format!("/v1/users/{b_id}/devices"), Some(json!({ "platform": "android", "token": FCM }))).await;
    assert_eq!(a.body["device_id"], device.as_str(), "device id is stable for (platform, token)");
    assert_eq!(c.call("GET", &format!("/v1/users/{a_id}"), None).await.body["devices"], json!([]));
    assert_eq!(api.env.store.token_owner(FCM).await.unwrap().unwrap().0, b_id);
    let a = c.call("DELETE", &format!("/v1/users/{b_id}/devices/{device}"), None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(c.call("DELETE", &format!("/v1/users/{b_id}/devices/{device}"), None).await.status, StatusCode::NOT_FOUND);
    assert!(api.env.store.token_owner(FCM).await.unwrap().is_none());
    let a = c.call("POST", &format!("/v1/users/{}/devices", unique("ghost")), Some(json!({ "platform": "ios", "token": APNS }))).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // Preferences.
    let a = c
        .call(
            "PUT",
            &format!("/v1/users/{a_id}/preferences"),
            Some(json!({ "preferences": [{ "channel": "email", "category": "marketing", "opt_in": false }] })),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    documented("/v1/users/{user_id}/preferences", "put", &a);
    let a = c.call("GET", &format!("/v1/users/{a_id}/preferences"), None).await;
    assert_eq!(a.body["preferences"], json!([{ "channel": "email", "category": "marketing", "opt_in": false }]));
    let a = c
        .call(
            "PUT",
            &format!("/v1/users/{a_id}/preferences"),
            Some(json!({ "preferences": [{ "channel": "pigeon", "category": "nope", "opt_in": true }] })),
        )
        .await;
    assert_eq!(a.body["error"]["details"]["fields"].as_array().unwrap().len(), 2);
    // Delete.
    assert_eq!(c.call("DELETE", &format!("/v1/users/{a_id}"), None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(c.call("GET", &format!("/v1/users/{a_id}"), None).await.status, StatusCode::NOT_FOUND);
    assert!(api.env.store.preferences(&a_id).await.unwrap().is_empty());
}

async fn contact_changes_reach_the_router(api: &Api) {
    let c = &api.admin;
    let user = unique("mover");
    user_with_email(api, c, &user).await;
    let a = c.call("POST", "/v1/notifications", Some(bill(&user))).await;
    api.env.wait_outcomes(a.body["event_id"].as_str().unwrap(), WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
    // The router has the user cached; the API changes it and announces the change.
    let a = c.call("PUT", &format!("/v1/users/{user}"), Some(json!({ "email": format!("{user}@example.com"), "phone": "+4915112345678" }))).await;
    assert_eq!(a.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut body = bill(&user);
    body["channels"] = json!(["sms"]);
    let a = c.call("POST", "/v1/notifications", Some(body)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{a:?}");
    let id = a.body["event_id"].as_str().unwrap();
    api.env.wait_outcomes(id, WAIT, |os| os.iter().any(|o| o.status == "routed" && o.channel.as_deref() == Some("sms"))).await;
}

async fn templates_create_version_list_preview(api: &Api) {
    let c = &api.admin;
    let id = unique("welcome");
    let tpl = json!({
        "template_id": id, "category": "billing", "default_channels": ["email", "sms"], "sample_params": { "name": "Ada" },
        "contents": [
            { "channel": "email", "locale": "en", "subject": "Hi {{ name }}", "html": "<p>Hi {{ name }}</p>", "text": "Hi {{ name }}" },
            { "channel": "email", "locale": "de", "subject": "Hallo {{ name }}", "text": "Hallo {{ name }}" },
            { "channel": "sms", "locale": "en", "body": "Hi {{ name }}" }
        ]
    });
    let a = c.call("POST", "/v1/templates", Some(tpl.clone())).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    documented("/v1/templates", "post", &a);
    assert_eq!(c.call("POST", "/v1/templates", Some(tpl.clone())).await.code(), "template_exists");
    // Refused: does not render for its own sample (needs `surname`), or does not compile.
    let mut broken = tpl.clone();
    broken["template_id"] = json!(unique("broken"));
    broken["contents"][2]["body"] = json!("Hi {{ name }} {{ surname }}");
    let a = c.call("POST", "/v1/templates", Some(broken.clone())).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNPROCESSABLE_ENTITY, "template_invalid"), "{a:?}");
    assert!(a.body["error"]["message"].as_str().unwrap().contains("surname"));
    broken["contents"][2]["body"] = json!("Hi {{ name ");
    assert_eq!(c.call("POST", "/v1/templates", Some(broken)).await.code(), "template_invalid");
    // Version 2 changes the SMS; the API validates sends against it at once.
    let v2 = json!({ "sample_params": { "name": "Ada", "code": "7" }, "contents": [
        { "channel": "email", "locale": "en", "subject": "Hi {{ name }}", "text": "Hi {{ name }}" },
        { "channel": "sms", "locale": "en", "body": "Hi {{ name }}, code {{ code }}" }
    ] });
    let a = c.call("POST", &format!("/v1/templates/{id}/versions"), Some(v2)).await;
    assert_eq!((a.status, a.body["version"].as_i64()), (StatusCode::CREATED, Some(2)), "{a:?}");
    let got = c.call("GET", &format!("/v1/templates/{id}"), None).await;
    documented("/v1/templates/{template_id}", "get", &got);
    assert_eq!((got.body["current_version"].as_i64(), got.body["versions"].as_array().unwrap().len()), (Some(2), 2));
    let list = c.call("GET", "/v1/templates", None).await;
    documented("/v1/templates", "get", &list);
    assert!(list.body["templates"].as_array().unwrap().iter().any(|t| t["template_id"] == id.as_str()));
    let pv = c.call("POST", &format!("/v1/templates/{id}/preview"), Some(json!({ "params": { "name": "Grace" } }))).await;
    documented("/v1/templates/{template_id}/preview", "post", &pv);
    let previews = pv.body["previews"].as_array().unwrap();
    assert_eq!(previews.len(), 2);
    assert!(previews.iter().any(|p| p["channel"] == "sms" && p["content"]["body"] == "Hi Grace, code 7"), "{previews:?}");
    let pv1 = c.call("POST", &format!("/v1/templates/{id}/preview"), Some(json!({ "version": 1, "channels": ["email"], "locales": ["de"] }))).await;
    assert_eq!(pv1.body["previews"], json!([{ "channel": "email", "locale": "de", "content": pv1.body["previews"][0]["content"].clone() }]));
    assert_eq!(pv1.body["previews"][0]["content"]["subject"], "Hallo Ada");
    assert_eq!(c.call("POST", &format!("/v1/templates/{}/preview", unique("none")), None).await.status, StatusCode::NOT_FOUND);
    let user = unique("tpl-user");
    let a = c
        .call("POST", "/v1/notifications", Some(json!({ "user_id": user, "template_id": id, "channels": ["sms"], "params": { "name": "x" } })))
        .await;
    assert_eq!(a.body["error"]["details"]["missing"], json!(["code"]), "validated against version 2: {a:?}");
}

/// A delivery the dispatcher would have recorded after sending.
async fn sent(api: &Api, provider: &str, message_id: &str, channel: &str) -> (String, String, String) {
    let (event, delivery, user) = (unique("evt"), unique("dlv"), unique("tu"));
    let store = CqlDispatchStore::prepare(api.env.store.clone(), &api.env.config.store.keyspace).await.unwrap();
    let record = SentRecord {
        delivery_id: delivery.clone(),
        event_id: event.clone(),
        user_id: user.clone(),
        channel: channel.into(),
        category: "billing".into(),
        provider: provider.into(),
        provider_message_id: message_id.into(),
        attempt: 0,
        latency_ms: Some(12),
        sent_at: herald::model::now_ms(),
        outcome_id: unique("o-sent"),
    };
    store.write(&[Write::Sent(record)]).await.unwrap();
    (event, delivery, user)
}

async fn tracking_open_and_click(api: &Api) {
    let (event, delivery, _) = sent(api, "sendgrid", &unique("sg"), "email").await;
    let t = TrackingSettings { base_url: api.base.clone(), secret: api.env.config.router.tracking_secret.expose().as_bytes().to_vec() };
    let open = api.http.get(t.open_url(&delivery)).send().await.unwrap();
    assert_eq!((open.status(), open.headers()["content-type"].to_str().unwrap()), (StatusCode::OK, "image/gif"));
    assert_eq!(open.bytes().await.unwrap().len(), 43);
    let click = api.http.get(t.click_url(&delivery, "https://example.com/pay?x=1")).send().await.unwrap();
    assert_eq!((click.status(), click.headers()["location"].to_str().unwrap()), (StatusCode::FOUND, "https://example.com/pay?x=1"));
    let os = api.env.wait_outcomes(&event, WAIT, |os| os.iter().any(|o| o.status == "opened") && os.iter().any(|o| o.status == "clicked")).await;
    assert!(os.iter().all(|o| o.delivery_id.as_deref() == Some(delivery.as_str())));
    // The log: the two tracking hits, and the delivery's sent-log row as its `sent` entry.
    let mut statuses: Vec<String> = api.env.store.log(&event).await.unwrap().into_iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, ["clicked", "opened", "sent"]);
    // Forged, re-signed with another key, or the wrong kind: 404, and never a redirect.
    let token = herald::tracking::sign(b"someone-elses-key", &TrackingClaim::click(&delivery, "https://evil.example/"));
    let r = api.http.get(format!("{}/t/c/{token}", api.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let open_url = t.open_url(&delivery);
    let open_token = open_url.rsplit('/').next().unwrap();
    assert_eq!(api.http.get(format!("{}/t/c/{open_token}", api.base)).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(api.http.get(format!("{}/t/o/garbage", api.base)).send().await.unwrap().status(), StatusCode::NOT_FOUND);
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

async fn twilio_and_vonage_webhooks(api: &Api) {
    use herald::api::webhooks::{url_params_signature, vonage_signature};
    let sid = format!("SM{}", &uuid::Uuid::new_v4().simple().to_string());
    let (event, delivery, _) = sent(api, "twilio", &sid, "sms").await;
    let params = [("MessageSid", sid.as_str()), ("MessageStatus", "delivered"), ("AccountSid", "AC1"), ("To", "+4915112345678")];
    let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    // The dispatcher's status callback URL names the delivery (Twilio signs it with its query).
    let url = format!("{}/webhooks/twilio?delivery_id={delivery}", api.base);
    let sig = url_params_signature(b"tw-test-token", &url, &owned);
    let post = |sig: String| {
        api.http.post(&url).header("content-type", "application/x-www-form-urlencoded").header("x-twilio-signature", sig).body(form(&params)).send()
    };
    let a = answer(post(sig.clone()).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64()), (StatusCode::OK, Some(1)), "{a:?}");
    documented("/webhooks/twilio", "post", &a);
    let os = api.env.wait_outcomes(&event, WAIT, |os| os.iter().any(|o| o.status == "delivered")).await;
    assert_eq!(os[0].provider.as_deref(), Some("twilio"));
    // Twilio retries a callback it got no answer for: the second emits nothing.
    let a = answer(post(sig.clone()).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64(), a.body["duplicates"].as_i64()), (StatusCode::OK, Some(0), Some(1)), "{a:?}");
    // Signed, but without the status fields.
    let bare = [("AccountSid", "AC1")];
    let bare_sig = url_params_signature(b"tw-test-token", &url, &[("AccountSid".to_string(), "AC1".to_string())]);
    let a = answer(
        api.http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", bare_sig)
            .body(form(&bare))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"), "{a:?}");
    documented("/webhooks/twilio", "post", &a);
    let a = answer(post(url_params_signature(b"not-the-token", &url, &owned)).await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "invalid_signature"));
    let metrics = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_api_webhook_rejected_total{provider=\"twilio\",reason=\"mismatch\"}"), "bad signatures are counted");

    // Vonage: the delivery id comes back as client-ref.
    let (event, delivery, _) = sent(api, "vonage", &unique("vn"), "sms").await;
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut q: Vec<(String, String)> = [
        ("messageId", "0A0000001"),
        ("status", "failed"),
        ("err-code", "3"),
        ("client-ref", &delivery),
        ("msisdn", "4915112345678"),
        ("timestamp", &ts),
        ("nonce", "abc"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = vonage_signature(b"vn-test-secret", "sha256", &q);
    q.push(("sig".into(), sig));
    let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&q).finish();
    let a = answer(api.http.get(format!("{}/webhooks/vonage?{query}", api.base)).send().await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let os = api.env.wait_outcomes(&event, WAIT, |os| os.iter().any(|o| o.status == "undelivered")).await;
    assert_eq!(os[0].reason.as_deref(), Some("vonage err-code 3"));
    let tampered = query.replace("status=failed", "status=delivered");
    let a = answer(api.http.get(format!("{}/webhooks/vonage?{tampered}", api.base)).send().await.unwrap()).await;
    assert_eq!(a.code(), "invalid_signature");
    // A receipt signed an hour ago (longer than webhook_timestamp_tolerance).
    let old_ts = (chrono::Utc::now().timestamp() - 3600).to_string();
    let mut q: Vec<(String, String)> =
        [("messageId", "0A0000002"), ("status", "delivered"), ("client-ref", delivery.as_str()), ("timestamp", old_ts.as_str())]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let sig = vonage_signature(b"vn-test-secret", "sha256", &q);
    q.push(("sig".into(), sig));
    let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&q).finish();
    let a = answer(api.http.get(format!("{}/webhooks/vonage?{query}", api.base)).send().await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "stale_webhook"), "{a:?}");
    documented("/webhooks/vonage", "get", &a);
}

async fn sendgrid_and_mandrill_webhooks(api: &Api) {
    use herald::api::webhooks::url_params_signature;
    use p256::ecdsa::signature::Signer;
    let (sk, _) = sendgrid_keys();
    let (event, delivery, user) = sent(api, "sendgrid", &unique("sgm"), "email").await;
    let body = serde_json::to_vec(&json!([
        { "email": "a@example.com", "timestamp": 1700000000, "event": "delivered", "sg_event_id": unique("e1"), "sg_message_id": "x.y", "delivery_id": delivery },
        { "email": "a@example.com", "timestamp": 1700000001, "event": "open", "sg_event_id": unique("e2"), "sg_message_id": "x.y", "delivery_id": delivery },
        { "email": "a@example.com", "timestamp": 1700000002, "event": "unsubscribe", "sg_event_id": unique("e3"), "sg_message_id": "x.y", "delivery_id": delivery },
        { "email": "a@example.com", "timestamp": 1700000003, "event": "processed", "sg_event_id": unique("e4"), "delivery_id": delivery },
        { "email": "b@example.com", "timestamp": 1700000004, "event": "bounce", "sg_event_id": unique("e5"), "sg_message_id": "unknown.1" }
    ]))
    .unwrap();
    let signed = |ts: &str, body: &[u8]| {
        let sig: p256::ecdsa::Signature = sk.sign(&[ts.as_bytes(), body].concat());
        B64.encode(sig.to_der().as_bytes())
    };
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = signed(&ts, &body);
    let post_at = |ts: String, body: Vec<u8>, sig: String| {
        api.http
            .post(format!("{}/webhooks/sendgrid", api.base))
            .header("content-type", "application/json")
            .header("x-twilio-email-event-webhook-signature", sig)
            .header("x-twilio-email-event-webhook-timestamp", ts)
            .body(body)
            .send()
    };
    let post = |body: Vec<u8>, sig: String| post_at(ts.clone(), body, sig);
    let a = answer(post(body.clone(), sig.clone()).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64(), a.body["unmatched"].as_i64()), (StatusCode::OK, Some(3), Some(1)), "{a:?}");
    documented("/webhooks/sendgrid", "post", &a);
    let three = |os: &[herald::model::DeliveryOutcome]| ["delivered", "opened", "unsubscribed"].iter().all(|s| os.iter().any(|o| o.status == *s));
    api.env.wait_outcomes(&event, WAIT, three).await;
    // The same body again (a provider's retry, or a replay): nothing is emitted twice.
    let a = answer(post(body.clone(), sig.clone()).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64(), a.body["duplicates"].as_i64()), (StatusCode::OK, Some(0), Some(3)), "{a:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let os = api.env.wait_outcomes(&event, WAIT, three).await;
    for status in ["delivered", "opened", "unsubscribed"] {
        assert_eq!(os.iter().filter(|o| o.status == status).count(), 1, "{status} twice: {os:?}");
    }
    // A signed timestamp a day old: refused, though the signature verifies.
    let old_ts = (chrono::Utc::now().timestamp() - 86_400).to_string();
    let a = answer(post_at(old_ts.clone(), body.clone(), signed(&old_ts, &body)).await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "stale_webhook"), "{a:?}");
    // Signed, but not JSON.
    let a = answer(post(b"nope".to_vec(), signed(&ts, b"nope")).await.unwrap()).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "malformed_json"), "{a:?}");
    documented("/webhooks/sendgrid", "post", &a);
    let prefs = api.env.store.preferences(&user).await.unwrap();
    assert!(prefs.iter().any(|p| p.channel == "email" && p.category == "billing" && !p.opt_in), "unsubscribe opts out: {prefs:?}");
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(answer(post(tampered, sig).await.unwrap()).await.code(), "invalid_signature");

    // Mandrill: metadata carries the delivery id (as the dispatcher sends it)...
    let mid = unique("md");
    let (event, delivery, _) = sent(api, "mandrill", &mid, "email").await;
    let events = json!([{ "event": "hard_bounce", "_id": mid, "ts": 1700000000, "msg": { "_id": mid, "state": "bounced", "bounce_description": "bad_mailbox", "metadata": { "delivery_id": delivery } } }]).to_string();
    let url = format!("{}/webhooks/mandrill", api.base);
    let sig = url_params_signature(b"md-test-key", &url, &[("mandrill_events".to_string(), events.clone())]);
    let post = |sig: String| {
        api.http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-mandrill-signature", sig)
            .body(form(&[("mandrill_events", &events)]))
            .send()
    };
    let a = answer(post(sig.clone()).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64()), (StatusCode::OK, Some(1)), "{a:?}");
    let os = api.env.wait_outcomes(&event, WAIT, |os| os.iter().any(|o| o.status == "bounced")).await;
    assert_eq!(os[0].reason.as_deref(), Some("bad_mailbox"));
    let a = answer(post(sig).await.unwrap()).await;
    assert_eq!((a.status, a.body["recorded"].as_i64(), a.body["duplicates"].as_i64()), (StatusCode::OK, Some(0), Some(1)), "{a:?}");
    // Signed, but mandrill_events is not JSON.
    let bad = [("mandrill_events", "[not json")];
    let bad_sig = url_params_signature(b"md-test-key", &url, &[("mandrill_events".to_string(), "[not json".to_string())]);
    let a = answer(
        api.http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-mandrill-signature", bad_sig)
            .body(form(&bad))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "malformed_json"), "{a:?}");
    documented("/webhooks/mandrill", "post", &a);
    // ...and a message sent before migration 009 (no metadata; dispatchers then also wrote
    // provider_messages) is found by its message id.
    let (old_mid, old_event, old_delivery) = (unique("md-old"), unique("evt"), unique("dlv"));
    let ks = &api.env.config.store.keyspace;
    api.env.store.session
        .query_unpaged(format!("INSERT INTO {ks}.provider_messages (provider, provider_message_id, delivery_id, event_id, user_id, channel, category, sent_at) VALUES ('mandrill', ?, ?, ?, 'tu', 'email', 'billing', toTimestamp(now()))"), (&old_mid, &old_delivery, &old_event))
        .await
        .unwrap();
    let old = json!([{ "event": "hard_bounce", "_id": old_mid, "ts": 1700000000, "msg": { "_id": old_mid, "state": "bounced", "bounce_description": "bad_mailbox", "metadata": {} } }]).to_string();
    let old_sig = url_params_signature(b"md-test-key", &url, &[("mandrill_events".to_string(), old.clone())]);
    let a = answer(
        api.http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-mandrill-signature", old_sig)
            .body(form(&[("mandrill_events", &old)]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.status, a.body["recorded"].as_i64()), (StatusCode::OK, Some(1)), "{a:?}");
    let os = api.env.wait_outcomes(&old_event, WAIT, |os| os.iter().any(|o| o.status == "bounced")).await;
    assert_eq!(os[0].reason.as_deref(), Some("bad_mailbox"));
    assert_eq!(answer(post("AAAA".into()).await.unwrap()).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.http.head(&url).send().await.unwrap().status(), StatusCode::OK);
}

/// Every answer herald makes is its JSON error, the HTTP layer's rejections included.
async fn every_rejection_is_a_json_error(api: &Api) {
    let c = &api.admin;
    let json_error = |a: &Answer, status: StatusCode, code: &str| {
        assert_eq!((a.status, a.code()), (status, code), "{a:?}");
        assert!(a.headers["content-type"].to_str().unwrap().starts_with("application/json"), "{:?}", a.headers);
        assert!(!a.body["error"]["message"].as_str().unwrap_or("").is_empty(), "{a:?}");
    };
    // A path segment that is not UTF-8 (signed, so it reaches the handler's extractor).
    let a = c.call("GET", "/v1/users/%FF%FE", None).await;
    json_error(&a, StatusCode::BAD_REQUEST, "bad_request");
    documented("/v1/users/{user_id}", "get", &a);
    // Too large: a signed body, and a webhook body beyond webhooks' own limit.
    let a = c
        .raw("POST", "/v1/notifications", vec![b' '; 20_000], Some("application/json"), chrono::Utc::now().timestamp(), Some(&nonce()), |_| {})
        .await;
    json_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    documented("/v1/notifications", "post", &a);
    let big = api.http.post(format!("{}/webhooks/sendgrid", api.base)).header("content-type", "application/json").body(vec![b'['; 70_000]);
    let a = answer(big.send().await.unwrap()).await;
    json_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    documented("/webhooks/sendgrid", "post", &a);
    // A webhook body sent chunked (no length declared) is bounded too.
    let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![b' '; 1000])))));
    let a = answer(
        api.http
            .post(format!("{}/webhooks/mandrill", api.base))
            .body(reqwest::Body::wrap(http_body_util::StreamBody::new(chunks)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    json_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // A long request target, and large headers.
    let a = answer(api.http.get(format!("{}/healthz?{}", api.base, "x".repeat(10_000))).send().await.unwrap()).await;
    json_error(&a, StatusCode::URI_TOO_LONG, "uri_too_long");
    documented("/healthz", "get", &a);
    let a = answer(api.http.get(format!("{}/healthz", api.base)).header("x-big", "y".repeat(40_000)).send().await.unwrap()).await;
    json_error(&a, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large");
    documented("/healthz", "get", &a);
    let mut many = api.http.get(format!("{}/healthz", api.base));
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "1");
    }
    json_error(&answer(many.send().await.unwrap()).await, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large");
    // A method the route does not have.
    let a = answer(api.http.delete(format!("{}/healthz", api.base)).send().await.unwrap()).await;
    json_error(&a, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

/// Slow-loris connections (idle, a partial request line, headers or a body sent a byte at a
/// time, an idle keep-alive) are closed by the API's timeouts while good requests are served;
/// beyond `max_connections`, a connection waits until one closes.
async fn slow_and_idle_connections_are_closed(api: &Api) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    api.env.spawn_env(
        "api-slow",
        &["api"],
        &[
            ("HERALD__API__LISTEN", listen.as_str()),
            ("HERALD__API__HEADER_READ_TIMEOUT", "2s"),
            ("HERALD__API__BODY_READ_TIMEOUT", "2s"),
            ("HERALD__API__IDLE_TIMEOUT", "3s"),
            ("HERALD__API__MAX_CONNECTIONS", "8"),
        ],
    );
    let base = format!("http://{listen}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while api.http.get(format!("{base}/healthz")).send().await.map(|r| r.status()).ok() != Some(StatusCode::OK) {
        assert!(std::time::Instant::now() < deadline, "api-slow did not come up:\n{}", common::env::tail(&api.env.log("api-slow"), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each slow client writes `first`, then one byte of `trickle` every 300 ms, and reports
    // how long the server took to close the connection, and what it answered.
    async fn slow(listen: String, first: &'static [u8], trickle: &'static [u8]) -> (Duration, String) {
        let started = std::time::Instant::now();
        let mut s = TcpStream::connect(&listen).await.unwrap();
        s.write_all(first).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            if trickle.is_empty() {
                // Hold the write half open (dropping it would send a FIN).
                std::future::pending::<()>().await;
            }
            for b in trickle.iter().cycle() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        writer.abort();
        assert!(closed.is_ok(), "the server kept a slow connection open for 30 s ({first:?})");
        (started.elapsed(), String::from_utf8_lossy(&got).into_owned())
    }
    let good = {
        let (http, base) = (reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap(), base.clone());
        tokio::spawn(async move {
            let mut served = 0;
            for _ in 0..20 {
                let r = http.get(format!("{base}/healthz")).timeout(Duration::from_secs(5)).send().await;
                assert_eq!(r.map(|r| r.status()).ok(), Some(StatusCode::OK), "a good request failed while slow clients were connected");
                served += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            served
        })
    };
    let l = || listen.clone();
    let (idle, line, headers, body, keepalive) = tokio::join!(
        slow(l(), b"", b""),
        slow(l(), b"GET /heal", b""),
        slow(l(), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"abcdefgh"),
        slow(l(), b"POST /webhooks/sendgrid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[", b" "),
        slow(l(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    );
    assert_eq!(good.await.unwrap(), 20);
    println!(
        "slow clients closed after: idle {:?}, partial line {:?}, slow headers {:?}, slow body {:?}, idle keep-alive {:?}",
        idle.0, line.0, headers.0, body.0, keepalive.0
    );
    for (what, (took, _)) in [("idle", &idle), ("partial request line", &line), ("slow headers", &headers)] {
        let took = *took;
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(6), "{what}: closed after {took:?} (header_read_timeout 2s)");
    }
    assert!(body.0 >= Duration::from_millis(1500) && body.0 < Duration::from_secs(6), "slow body: closed after {:?}", body.0);
    assert!(body.1.starts_with("HTTP/1.1 408") && body.1.contains("\"request_timeout\""), "slow body answered {:?}", body.1);
    assert!(keepalive.1.starts_with("HTTP/1.1 200"), "{:?}", keepalive.1);
    assert!(keepalive.0 >= Duration::from_millis(1500) && keepalive.0 < Duration::from_secs(8), "idle keep-alive: closed after {:?}", keepalive.0);
    // The cap: 8 idle connections fill it; a 9th is served only once they time out.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(&listen).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let r = api.http.get(format!("{base}/healthz")).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(1000), "served at once ({:?}) beyond max_connections", started.elapsed());
    drop(held);
    let m = api.http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in ["herald_api_connections_full_total", "herald_api_connections_total{event=\"header_timeout\"}"] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
}
