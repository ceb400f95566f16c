//! The provider sandbox over real HTTP: each test starts its own sandbox on 127.0.0.1:0 and
//! talks to it with reqwest (h2c prior knowledge for APNs), checking the answers against the
//! provider contract sheet: success, bad credentials, validation, faults, the request log.

use std::time::{Duration, Instant};

use herald::sandbox::{self, RunningSandbox, SandboxConfig};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

const APNS_KEY: &[u8] = include_bytes!("../sandbox/dev-keys/AuthKey_HERALDKEY1.p8");
const SERVICE_ACCOUNT: &str = include_str!("../sandbox/dev-keys/fcm-service-account.json");
const DEVICE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const FCM_TOKEN: &str = "dGVzdC1kZXZpY2U:APA91bH-sandbox-registration-token_0123456789";

struct Harness {
    sandbox: RunningSandbox,
    config: SandboxConfig,
    /// HTTP/1.1 (and HTTP/2 only if asked): what SMS/email/FCM clients use.
    http: Client,
    /// HTTP/2 prior knowledge over plaintext, as an APNs client talks to the sandbox.
    h2: Client,
}

async fn harness() -> Harness {
    let config = SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    let sandbox = sandbox::start(config.clone()).await.expect("sandbox starts");
    let http = Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let h2 = Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(10)).build().unwrap();
    Harness { sandbox, config, http, h2 }
}

async fn body(r: Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A provider JWT signed with the dev key.
fn apns_jwt(kid: &str, iss: &str, iat: i64) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    encode(&header, &json!({ "iss": iss, "iat": iat }), &EncodingKey::from_ec_pem(APNS_KEY).unwrap()).unwrap()
}

/// The same token with other claims spliced in: the signature no longer matches.
fn with_forged_claims(jwt: &str, claims: Value) -> String {
    use base64::Engine;
    let parts: Vec<&str> = jwt.split('.').collect();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{}.{}", parts[0], forged, parts[2])
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sandbox.url())
    }

    async fn put(&self, path: &str, body: Value) -> Response {
        self.http.put(self.url(path)).json(&body).send().await.unwrap()
    }

    async fn fault(&self, provider: &str, fault: Value) {
        let r = self.put(&format!("/_sandbox/faults/{provider}"), fault).await;
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }

    async fn requests(&self, provider: &str) -> Vec<Value> {
        let r = self.http.get(self.url(&format!("/_sandbox/requests/{provider}"))).send().await.unwrap();
        body(r).await.as_array().unwrap().clone()
    }

    /// An APNs push over h2c: valid defaults, `overrides` replace them (an empty value drops
    /// the header).
    async fn apns(&self, token: &str, overrides: &[(&str, &str)], payload: &str) -> Response {
        let jwt = format!("bearer {}", apns_jwt("HERALDKEY1", "HERALDDEV1", now()));
        let mut headers = vec![("authorization", jwt.as_str()), ("apns-topic", "dev.herald.demo"), ("apns-push-type", "alert")];
        for &(name, value) in overrides {
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }
        let mut req = self.h2.post(self.url(&format!("/3/device/{token}"))).body(payload.to_string());
        for (name, value) in headers.into_iter().filter(|(_, v)| !v.is_empty()) {
            req = req.header(name, value);
        }
        req.send().await.unwrap()
    }

    /// An FCM access token obtained the way a client does it: the service-account file, an
    /// RS256 assertion for its `token_uri`, POSTed to the sandbox.
    async fn fcm_access_token(&self) -> String {
        let r = self.oauth(fcm_assertion(json!({}))).await;
        assert_eq!(r.status(), StatusCode::OK);
        body(r).await["access_token"].as_str().unwrap().to_string()
    }

    async fn oauth(&self, assertion: String) -> Response {
        let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion.as_str())];
        self.http.post(self.url("/token")).form(&form).send().await.unwrap()
    }

    async fn fcm(&self, access_token: &str, project: &str, message: Value) -> Response {
        let url = self.url(&format!("/v1/projects/{project}/messages:send"));
        self.http.post(url).bearer_auth(access_token).json(&json!({ "message": message })).send().await.unwrap()
    }

    async fn twilio(&self, form: &[(&str, &str)]) -> Response {
        let c = &self.config.twilio;
        let url = self.url(&format!("/2010-04-01/Accounts/{}/Messages.json", c.account_sid));
        self.http.post(url).basic_auth(&c.account_sid, Some(c.auth_token.expose())).form(form).send().await.unwrap()
    }

    async fn vonage(&self, extra: &[(&str, &str)]) -> Value {
        let c = &self.config.vonage;
        let mut form = vec![("api_key", c.api_key.as_str()), ("api_secret", c.api_secret.expose()), ("from", "HERALD")];
        form.extend_from_slice(extra);
        let r = self.http.post(self.url("/sms/json")).form(&form).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "Vonage answers 200 for success and failure");
        body(r).await
    }

    async fn sendgrid(&self, key: &str, mail: Value) -> Response {
        self.http.post(self.url("/v3/mail/send")).bearer_auth(key).json(&mail).send().await.unwrap()
    }

    async fn mandrill(&self, key: &str, message: Value) -> Response {
        let body = json!({ "key": key, "message": message });
        self.http.post(self.url("/api/1.0/messages/send.json")).json(&body).send().await.unwrap()
    }
}

/// An OAuth assertion from the dev service account; `overrides` replace claims.
fn fcm_assertion(overrides: Value) -> String {
    let sa: Value = serde_json::from_str(SERVICE_ACCOUNT).unwrap();
    let mut claims = json!({
        "iss": sa["client_email"],
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": sa["token_uri"],
        "iat": now(),
        "exp": now() + 3600,
    });
    for (k, v) in overrides.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut header = Header::new(Algorithm::RS256);
    header.kid = sa["private_key_id"].as_str().map(String::from);
    let key = EncodingKey::from_rsa_pem(sa["private_key"].as_str().unwrap().as_bytes()).unwrap();
    encode(&header, &claims, &key).unwrap()
}

fn mail(to: &str) -> Value {
    json!({
        "personalizations": [{ "to": [{ "email": to }] }],
        "from": { "email": "noreply@herald.dev" },
        "subject": "Your bill",
        "content": [{ "type": "text/plain", "value": "is due" }],
    })
}

fn mandrill_message(to: &[&str]) -> Value {
    let to: Vec<Value> = to.iter().map(|e| json!({ "email": e, "type": "to" })).collect();
    json!({ "from_email": "noreply@herald.dev", "subject": "Your bill", "text": "is due", "to": to })
}

// ---------------------------------------------------------------- APNs

#[tokio::test]
async fn apns_accepts_a_signed_push_over_h2c_and_echoes_apns_id() {
    let h = harness().await;
    let id = "123e4567-e89b-12d3-a456-426614174000";
    let r = h.apns(DEVICE, &[("apns-id", id)], r#"{"aps":{"alert":"hi"}}"#).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["apns-id"], id);
    assert!(r.text().await.unwrap().is_empty(), "success has an empty body");

    let r = h.apns(DEVICE, &[], r#"{"aps":{"alert":"hi"}}"#).await;
    let generated = r.headers()["apns-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
}

#[tokio::test]
async fn apns_refuses_http1() {
    let h = harness().await;
    let r = h.http.post(h.url(&format!("/3/device/{DEVICE}"))).body("{}").send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), StatusCode::HTTP_VERSION_NOT_SUPPORTED);
}

#[tokio::test]
async fn apns_rejects_missing_forged_unknown_and_expired_provider_tokens() {
    let h = harness().await;
    let payload = r#"{"aps":{"alert":"hi"}}"#;
    let valid = apns_jwt("HERALDKEY1", "HERALDDEV1", now());
    let cases = [
        (String::new(), 403, "MissingProviderToken"),
        (with_forged_claims(&valid, json!({ "iss": "HERALDDEV1", "iat": now() + 1 })), 403, "InvalidProviderToken"),
        (apns_jwt("OTHERKEY01", "HERALDDEV1", now()), 403, "InvalidProviderToken"),
        (apns_jwt("HERALDKEY1", "OTHERTEAM1", now()), 403, "InvalidProviderToken"),
        (apns_jwt("HERALDKEY1", "HERALDDEV1", now() - 3601), 403, "ExpiredProviderToken"),
    ];
    for (jwt, status, reason) in cases {
        let auth = if jwt.is_empty() { String::new() } else { format!("bearer {jwt}") };
        let r = h.apns(DEVICE, &[("authorization", &auth)], payload).await;
        assert_eq!(r.status().as_u16(), status, "{reason}");
        assert!(r.headers().contains_key("apns-id"));
        assert_eq!(body(r).await, json!({ "reason": reason }));
    }
}

#[tokio::test]
async fn apns_validates_headers_token_and_payload_like_apple() {
    let h = harness().await;
    let ok = r#"{"aps":{"alert":"hi"}}"#;
    let big = format!(r#"{{"aps":{{"alert":"{}"}}}}"#, "x".repeat(4100));
    let long_collapse = "c".repeat(65);
    // (device token, header overrides, payload, status, reason)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (DEVICE, vec![("apns-topic", "")], ok, 400, "MissingTopic"),
        (DEVICE, vec![("apns-topic", "com.someone.else")], ok, 400, "TopicDisallowed"),
        (DEVICE, vec![("apns-topic", "not a topic")], ok, 400, "BadTopic"),
        (DEVICE, vec![("apns-push-type", "shout")], ok, 400, "InvalidPushType"),
        (DEVICE, vec![("apns-push-type", "voip")], ok, 400, "InvalidPushType"),
        (DEVICE, vec![("apns-priority", "7")], ok, 400, "BadPriority"),
        (DEVICE, vec![("apns-push-type", "background")], ok, 400, "BadPriority"),
        (DEVICE, vec![("apns-expiration", "tomorrow")], ok, 400, "BadExpirationDate"),
        (DEVICE, vec![("apns-collapse-id", &long_collapse)], ok, 400, "BadCollapseId"),
        (DEVICE, vec![("apns-id", "NOT-A-UUID")], ok, 400, "BadMessageId"),
        ("abc123", vec![], ok, 400, "BadDeviceToken"),
        (DEVICE, vec![], "", 400, "PayloadEmpty"),
        (DEVICE, vec![], &big, 413, "PayloadTooLarge"),
    ];
    for (token, headers, payload, status, reason) in cases {
        let r = h.apns(token, &headers, payload).await;
        assert_eq!(r.status().as_u16(), status, "{reason}");
        assert_eq!(body(r).await["reason"], reason);
    }
    let voip = h.apns(DEVICE, &[("apns-topic", "dev.herald.demo.voip"), ("apns-push-type", "voip")], &big).await;
    assert_eq!(voip.status(), StatusCode::OK, "VoIP payloads may reach 5120 bytes");
}

#[tokio::test]
async fn apns_answers_unregistered_tokens_with_410_and_a_timestamp() {
    let h = harness().await;
    let r = h.put("/_sandbox/state", json!({ "apns_unregistered": [DEVICE.to_uppercase()] })).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = h.apns(DEVICE, &[], r#"{"aps":{"alert":"hi"}}"#).await;
    assert_eq!(r.status(), StatusCode::GONE);
    let b = body(r).await;
    assert_eq!(b["reason"], "Unregistered");
    assert!(b["timestamp"].as_i64().unwrap() > 1_700_000_000_000, "ms since epoch: {b}");
}

// ---------------------------------------------------------------- FCM

#[tokio::test]
async fn fcm_oauth_flow_end_to_end() {
    let h = harness().await;
    let r = h.oauth(fcm_assertion(json!({}))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let t = body(r).await;
    assert_eq!((t["expires_in"].as_u64(), t["token_type"].as_str()), (Some(3599), Some("Bearer")));
    let token = t["access_token"].as_str().unwrap();
    assert!(token.starts_with("ya29."));

    let r = h.fcm(token, "herald-dev", json!({ "token": FCM_TOKEN, "notification": { "title": "Hi" }, "data": { "k": "v" } })).await;
    assert_eq!(r.status(), StatusCode::OK);
    let name = body(r).await["name"].as_str().unwrap().to_string();
    let id = name.strip_prefix("projects/herald-dev/messages/0:").unwrap_or_else(|| panic!("{name}"));
    let (digits, hex) = id.split_once('%').unwrap();
    assert!(digits.bytes().all(|b| b.is_ascii_digit()) && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");

    let dry = h
        .http
        .post(h.url("/v1/projects/herald-dev/messages:send"))
        .bearer_auth(token)
        .json(&json!({ "validate_only": true, "message": { "topic": "news" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(body(dry).await["name"], "projects/herald-dev/messages/fake_message_id");
}

#[tokio::test]
async fn fcm_token_endpoint_refuses_bad_assertions_like_google() {
    let h = harness().await;
    let forged = with_forged_claims(&fcm_assertion(json!({})), json!({ "iss": "x@y.iam.gserviceaccount.com" }));
    let cases = [
        (forged, "invalid_grant", "Invalid JWT Signature."),
        (fcm_assertion(json!({ "exp": now() + 7200 })), "invalid_grant", "Token must be a short-lived token"),
        (fcm_assertion(json!({ "iat": now() - 7200, "exp": now() - 3600 })), "invalid_grant", "Token must be a short-lived token"),
        (fcm_assertion(json!({ "aud": "https://example.com/token" })), "invalid_grant", "audience"),
        (fcm_assertion(json!({ "scope": "" })), "invalid_scope", "scope"),
    ];
    for (assertion, error, description) in cases {
        let r = h.oauth(assertion).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let b = body(r).await;
        assert_eq!(b["error"], error, "{b}");
        assert!(b["error_description"].as_str().unwrap().contains(description), "{b}");
    }
    let r = h.http.post(h.url("/token")).form(&[("grant_type", "password")]).send().await.unwrap();
    assert_eq!(body(r).await["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn fcm_answers_unknown_or_expired_access_tokens_with_401_without_fcm_error() {
    let mut config = SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    config.fcm.access_token_ttl_s = 1;
    let sandbox = sandbox::start(config.clone()).await.unwrap();
    let h = Harness { sandbox, config, http: Client::new(), h2: Client::new() };
    let token = h.fcm_access_token().await;
    let message = json!({ "token": FCM_TOKEN });
    assert_eq!(h.fcm(&token, "herald-dev", message.clone()).await.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for token in [token.as_str(), "ya29.never-issued"] {
        let r = h.fcm(token, "herald-dev", message.clone()).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        let b = body(r).await;
        assert_eq!(b["error"]["status"], "UNAUTHENTICATED");
        assert!(b["error"].get("details").is_none(), "no FcmError: the client must re-authenticate");
    }
}

#[tokio::test]
async fn fcm_validates_messages_with_google_error_bodies() {
    let h = harness().await;
    let token = h.fcm_access_token().await;
    let cases = [
        (json!({ "data": { "k": "v" } }), "message", "Recipient of the message is not set."),
        (json!({ "token": FCM_TOKEN, "topic": "news" }), "message", "oneof field 'target' is already set"),
        (json!({ "token": FCM_TOKEN, "data": { "n": 1 } }), "message.data[0].value", "TYPE_STRING"),
        (json!({ "token": FCM_TOKEN, "data": { "from": "me" } }), "message.data", "from"),
        (json!({ "token": "short!" }), "message.token", "The registration token is not a valid FCM registration token"),
        (json!({ "token": FCM_TOKEN, "android": { "ttl": "forever" } }), "message.android.ttl", "Duration"),
    ];
    for (message, field, text) in cases {
        let r = h.fcm(&token, "herald-dev", message).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let e = body(r).await["error"].clone();
        assert_eq!(e["status"], "INVALID_ARGUMENT");
        assert!(e["message"].as_str().unwrap().contains(text), "{e}");
        assert_eq!(e["details"][0]["fieldViolations"][0]["field"], field, "{e}");
        assert_eq!(e["details"][1]["errorCode"], "INVALID_ARGUMENT", "{e}");
    }
    let big = json!({ "token": FCM_TOKEN, "data": { "k": "x".repeat(4100) } });
    let e = body(h.fcm(&token, "herald-dev", big).await).await["error"].clone();
    assert_eq!((e["code"].as_u64(), e.get("details")), (Some(400), None), "too big: bare INVALID_ARGUMENT");
    let r = h.fcm(&token, "someone-elses-project", json!({ "token": FCM_TOKEN })).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn fcm_answers_unregistered_tokens_with_404_and_fcm_error() {
    let h = harness().await;
    h.put("/_sandbox/state", json!({ "fcm_unregistered": [FCM_TOKEN] })).await;
    let token = h.fcm_access_token().await;
    let r = h.fcm(&token, "herald-dev", json!({ "token": FCM_TOKEN })).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        body(r).await,
        json!({ "error": { "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
            "details": [{ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED" }] } })
    );
}

// ---------------------------------------------------------------- Twilio

#[tokio::test]
async fn twilio_creates_a_queued_message_with_201() {
    let h = harness().await;
    let r = h.twilio(&[("To", "+14155550100"), ("From", "+14155550199"), ("Body", &"x".repeat(200))]).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let m = body(r).await;
    let sid = m["sid"].as_str().unwrap();
    assert!(sid.starts_with("SM") && sid.len() == 34, "{sid}");
    assert_eq!(m["status"], "queued");
    assert_eq!(m["num_segments"], "2");
    assert_eq!(m["account_sid"], h.config.twilio.account_sid);
    assert_eq!((m["direction"].as_str(), m["error_code"].as_null()), (Some("outbound-api"), Some(())));
    chrono::DateTime::parse_from_rfc2822(m["date_created"].as_str().unwrap()).expect("RFC 2822 date");
}

#[tokio::test]
async fn twilio_rejects_bad_basic_auth_with_20003() {
    let h = harness().await;
    let url = h.url(&format!("/2010-04-01/Accounts/{}/Messages.json", h.config.twilio.account_sid));
    let r = h.http.post(url).basic_auth(&h.config.twilio.account_sid, Some("wrong")).form(&[("To", "+14155550100")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let b = body(r).await;
    assert_eq!((b["code"].as_u64(), b["status"].as_u64()), (Some(20003), Some(401)));
    assert_eq!(b["more_info"], "https://www.twilio.com/docs/errors/20003");
}

#[tokio::test]
async fn twilio_validates_numbers_senders_and_body() {
    let h = harness().await;
    h.put("/_sandbox/state", json!({ "twilio_landline": ["+14155550111"], "twilio_unsubscribed": ["+14155550122"] })).await;
    let long = "x".repeat(1601);
    let cases: Vec<(Vec<(&str, &str)>, u64)> = vec![
        (vec![("To", "555-0100"), ("From", "+14155550199"), ("Body", "hi")], 21211),
        (vec![("From", "+14155550199"), ("Body", "hi")], 21604),
        (vec![("To", "+14155550100"), ("Body", "hi")], 21603),
        (
            vec![("To", "+14155550100"), ("From", "+14155550199"), ("MessagingServiceSid", "MG0123456789abcdef0123456789abcdef"), ("Body", "hi")],
            21603,
        ),
        (vec![("To", "+14155550100"), ("From", "+14155550199")], 21602),
        (vec![("To", "+14155550100"), ("From", "+14155550199"), ("Body", &long)], 21617),
        (vec![("To", "+14155550111"), ("From", "+14155550199"), ("Body", "hi")], 21614),
        (vec![("To", "+14155550122"), ("From", "+14155550199"), ("Body", "hi")], 21610),
    ];
    for (form, code) in cases {
        let r = h.twilio(&form).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{code}");
        assert_eq!(body(r).await["code"].as_u64(), Some(code));
    }
    let r = h.twilio(&[("To", "+14155550100"), ("MessagingServiceSid", "MG0123456789abcdef0123456789abcdef"), ("Body", "hi")]).await;
    assert_eq!(body(r).await["status"], "accepted", "a Messaging Service accepts first");
}

// ---------------------------------------------------------------- Vonage

#[tokio::test]
async fn vonage_sends_one_entry_per_part_and_echoes_client_ref() {
    let h = harness().await;
    let b = h.vonage(&[("to", "447700900000"), ("text", "hello"), ("client-ref", "order-7")]).await;
    assert_eq!(b["message-count"], "1");
    let m = &b["messages"][0];
    assert_eq!((m["status"].as_str(), m["client-ref"].as_str(), m["to"].as_str()), (Some("0"), Some("order-7"), Some("447700900000")));
    for field in ["message-id", "remaining-balance", "message-price", "network"] {
        assert!(m[field].is_string(), "{field}: {m}");
    }
    let long = "y".repeat(400);
    let b = h.vonage(&[("to", "447700900000"), ("text", &long)]).await;
    assert_eq!(b["message-count"], "3");
    assert_eq!(b["messages"].as_array().unwrap().len(), 3);

    let c = &h.config.vonage;
    let r = h
        .http
        .post(h.url("/sms/json"))
        .basic_auth(&c.api_key, Some(c.api_secret.expose()))
        .json(&json!({ "from": "HERALD", "to": "447700900000", "text": "json + basic auth" }))
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await["messages"][0]["status"], "0");
}

#[tokio::test]
async fn vonage_reports_errors_as_string_statuses_in_a_200() {
    let h = harness().await;
    let r = h
        .http
        .post(h.url("/sms/json"))
        .form(&[("api_key", "herald01"), ("api_secret", "nope"), ("from", "X"), ("to", "447700900000"), ("text", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["messages"][0]["status"], "4");
    h.put("/_sandbox/state", json!({ "vonage_barred": ["447700900666"] })).await;
    let cases = [
        (vec![("text", "x")], "2", "Missing to"),
        (vec![("to", "+447700900000"), ("text", "x")], "3", "Invalid to"),
        (vec![("to", "123"), ("text", "x")], "3", "Invalid to"),
        (vec![("to", "447700900666"), ("text", "x")], "7", "barred"),
    ];
    for (extra, status, text) in cases {
        let b = h.vonage(&extra).await;
        let m = &b["messages"][0];
        assert_eq!(m["status"], status, "{b}");
        assert!(m["error-text"].as_str().unwrap().contains(text), "{b}");
    }
}

// ---------------------------------------------------------------- SendGrid

#[tokio::test]
async fn sendgrid_accepts_mail_with_202_and_a_message_id() {
    let h = harness().await;
    let r = h.sendgrid(h.config.sendgrid.api_key.expose(), mail("ada@example.com")).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(!r.headers()["x-message-id"].is_empty());
    assert!(r.text().await.unwrap().is_empty());
}

#[tokio::test]
async fn sendgrid_rejects_a_bad_key_with_401() {
    let h = harness().await;
    let r = h.sendgrid("SG.wrong", mail("ada@example.com")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let b = body(r).await;
    assert_eq!(b["errors"][0]["message"], "The provided authorization grant is invalid, expired, or revoked");
    assert_eq!(b["errors"][0]["field"], Value::Null);
}

#[tokio::test]
async fn sendgrid_reports_each_invalid_field() {
    let h = harness().await;
    let key = h.config.sendgrid.api_key.expose();
    let r = h.sendgrid(key, mail("not-an-address")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e = body(r).await["errors"][0].clone();
    assert_eq!((e["field"].as_str(), e["message"].as_str()), (Some("personalizations.0.to.0.email"), Some("Does not contain a valid address.")));

    let mut m = mail("ada@example.com");
    m.as_object_mut().unwrap().remove("from");
    m.as_object_mut().unwrap().remove("content");
    let fields: Vec<Value> = body(h.sendgrid(key, m).await).await["errors"].as_array().unwrap().iter().map(|e| e["field"].clone()).collect();
    assert_eq!(fields, vec![json!("from"), json!("content")]);
}

// ---------------------------------------------------------------- Mandrill

#[tokio::test]
async fn mandrill_answers_per_recipient_with_ids_and_bounces() {
    let h = harness().await;
    h.put("/_sandbox/state", json!({ "mandrill_bounce": ["Gone@example.com"] })).await;
    let r = h.mandrill(h.config.mandrill.api_key.expose(), mandrill_message(&["ada@example.com", "gone@example.com"])).await;
    assert_eq!(r.status(), StatusCode::OK);
    let results = body(r).await;
    assert_eq!((results[0]["status"].as_str(), results[0]["reject_reason"].as_null()), (Some("sent"), Some(())));
    let id = results[0]["_id"].as_str().unwrap();
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!((results[1]["status"].as_str(), results[1]["reject_reason"].as_str()), (Some("rejected"), Some("hard-bounce")));
}

#[tokio::test]
async fn mandrill_rejects_a_bad_key_and_invalid_messages_with_500() {
    let h = harness().await;
    let r = h.mandrill("md-wrong", mandrill_message(&["ada@example.com"])).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body(r).await, json!({ "status": "error", "code": -1, "name": "Invalid_Key", "message": "Invalid API key" }));
    let key = h.config.mandrill.api_key.expose();
    for message in [json!({ "subject": "no recipients" }), json!({ "to": [{ "email": "a@example.com" }], "from_email": "nobody" })] {
        let r = h.mandrill(key, message).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body(r).await["name"], "ValidationError");
    }
    let r = h
        .http
        .post(h.url("/api/1.0/messages/send"))
        .json(&json!({ "key": key, "message": mandrill_message(&["a@example.com"]) }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the path without .json works too");
}

// ---------------------------------------------------------------- faults

#[tokio::test]
async fn error_rate_one_answers_with_each_providers_outage_error() {
    let h = harness().await;
    for p in ["apns", "fcm", "twilio", "vonage", "sendgrid", "mandrill"] {
        h.fault(p, json!({ "error_rate": 1.0 })).await;
    }
    let r = h.apns(DEVICE, &[], r#"{"aps":{}}"#).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("apns-id"));
    assert_eq!(body(r).await, json!({ "reason": "ServiceUnavailable" }));

    let token = h.fcm_access_token().await;
    let r = h.fcm(&token, "herald-dev", json!({ "token": FCM_TOKEN })).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e = body(r).await["error"].clone();
    assert_eq!((e["status"].as_str(), e["details"][0]["errorCode"].as_str()), (Some("UNAVAILABLE"), Some("UNAVAILABLE")));

    let r = h.twilio(&[("To", "+14155550100"), ("From", "+14155550199"), ("Body", "hi")]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body(r).await["code"], 20429);

    let b = h.vonage(&[("to", "447700900000"), ("text", "hi")]).await;
    assert_eq!((b["messages"][0]["status"].as_str(), b["messages"][0]["error-text"].as_str()), (Some("1"), Some("Throttled")));

    let r = h.sendgrid(h.config.sendgrid.api_key.expose(), mail("ada@example.com")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    for header in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"] {
        assert!(r.headers().contains_key(header), "{header}");
    }
    assert_eq!(body(r).await["errors"][0]["message"], "too many requests");

    let r = h.mandrill(h.config.mandrill.api_key.expose(), mandrill_message(&["ada@example.com"])).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body(r).await["name"], "GeneralError");
}

#[tokio::test]
async fn faults_apply_only_after_auth_and_validation() {
    let h = harness().await;
    h.fault("apns", json!({ "error": "ServiceUnavailable" })).await;
    let r = h.apns(DEVICE, &[("authorization", "")], "{}").await;
    assert_eq!(body(r).await["reason"], "MissingProviderToken");
    let r = h.apns("abc", &[], "{}").await;
    assert_eq!(body(r).await["reason"], "BadDeviceToken");
}

#[tokio::test]
async fn a_counted_fault_hits_only_the_next_n_requests() {
    let h = harness().await;
    h.fault("sendgrid", json!({ "error": 503, "count": 2 })).await;
    let key = h.config.sendgrid.api_key.expose();
    let statuses = [
        h.sendgrid(key, mail("a@example.com")).await.status(),
        h.sendgrid(key, mail("a@example.com")).await.status(),
        h.sendgrid(key, mail("a@example.com")).await.status(),
    ];
    assert_eq!(statuses, [StatusCode::SERVICE_UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, StatusCode::ACCEPTED]);
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let h = harness().await;
    h.fault("mandrill", json!({ "latency_ms": 300 })).await;
    let started = Instant::now();
    let r = h.mandrill(h.config.mandrill.api_key.expose(), mandrill_message(&["a@example.com"])).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn throttling_faults_carry_retry_after() {
    let h = harness().await;
    h.fault("fcm", json!({ "error": "QUOTA_EXCEEDED", "retry_after_s": 7 })).await;
    let token = h.fcm_access_token().await;
    let r = h.fcm(&token, "herald-dev", json!({ "token": FCM_TOKEN })).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(body(r).await["error"]["status"], "RESOURCE_EXHAUSTED");

    h.fault("twilio", json!({ "error": 20429, "retry_after_s": 2 })).await;
    let r = h.twilio(&[("To", "+14155550100"), ("From", "+14155550199"), ("Body", "hi")]).await;
    assert_eq!((r.status(), r.headers()["retry-after"].to_str().unwrap()), (StatusCode::TOO_MANY_REQUESTS, "2"));

    h.fault("sendgrid", json!({ "retry_after_s": 30 })).await;
    let r = h.sendgrid(h.config.sendgrid.api_key.expose(), mail("a@example.com")).await;
    let reset: i64 = r.headers()["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((now() + 29..=now() + 31).contains(&reset), "reset {reset}");
}

#[tokio::test]
async fn a_hanging_provider_never_answers_until_the_client_gives_up() {
    let h = harness().await;
    h.fault("twilio", json!({ "hang": true })).await;
    let c = &h.config.twilio;
    let url = h.url(&format!("/2010-04-01/Accounts/{}/Messages.json", c.account_sid));
    let started = Instant::now();
    let e = h
        .http
        .post(url)
        .basic_auth(&c.account_sid, Some(c.auth_token.expose()))
        .form(&[("To", "+14155550100"), ("From", "+14155550199"), ("Body", "hi")])
        .timeout(Duration::from_millis(400))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(h.requests("twilio").await[0]["status"], Value::Null, "logged as unanswered");
}

#[tokio::test]
async fn the_control_api_refuses_unknown_providers_and_errors_and_clears_faults() {
    let h = harness().await;
    assert_eq!(h.put("/_sandbox/faults/pigeon", json!({})).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(h.put("/_sandbox/faults/apns", json!({ "error": "UNAVAILABLE" })).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(h.put("/_sandbox/faults/apns", json!({ "error_rate": 2.0 })).await.status(), StatusCode::BAD_REQUEST);
    h.fault("apns", json!({ "error": "Shutdown" })).await;
    let listed = body(h.http.get(h.url("/_sandbox/faults")).send().await.unwrap()).await;
    assert_eq!(listed[0]["provider"], "apns");
    h.http.delete(h.url("/_sandbox/faults")).send().await.unwrap();
    assert_eq!(h.apns(DEVICE, &[], "{}").await.status(), StatusCode::OK);
    let health = body(h.http.get(h.url("/_sandbox/health")).send().await.unwrap()).await;
    assert_eq!(health["status"], "ok");
}

// ---------------------------------------------------------------- request log

#[tokio::test]
async fn the_request_log_shows_what_each_provider_received_with_secrets_masked() {
    let h = harness().await;
    h.twilio(&[("To", "+14155550100"), ("From", "+14155550199"), ("Body", "hi")]).await;
    h.mandrill(h.config.mandrill.api_key.expose(), mandrill_message(&["a@example.com"])).await;
    h.apns(DEVICE, &[], "{}").await;

    let twilio = h.requests("twilio").await;
    assert_eq!(twilio.len(), 1);
    let t = &twilio[0];
    assert_eq!((t["method"].as_str(), t["status"].as_u64()), (Some("POST"), Some(201)));
    assert!(t["path"].as_str().unwrap().ends_with("/Messages.json"));
    assert_eq!(t["headers"]["authorization"], "Basic ****");
    assert_eq!(t["body"]["To"], "+14155550100");
    assert!(t["at"].as_str().unwrap().ends_with('Z'));

    let m = &h.requests("mandrill").await[0];
    assert_eq!(m["body"]["key"], "****");
    let a = &h.requests("apns").await[0];
    assert_eq!((a["version"].as_str(), a["headers"]["authorization"].as_str()), (Some("HTTP/2.0"), Some("bearer ****")));

    h.http.delete(h.url("/_sandbox/requests")).send().await.unwrap();
    assert!(h.requests("twilio").await.is_empty());
}
