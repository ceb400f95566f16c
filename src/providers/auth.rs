//! Provider credentials that expire: the APNs provider token (ES256 JWT, minted locally)
//! and the Google OAuth2 access token for FCM (RS256 assertion exchanged at `token_uri`),
//! each cached behind an injectable [`Clock`]. Token values are [`Secret`]s.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::apns::ApnsConfig;
use super::fcm::FcmConfig;
use super::{send, HttpRequest, HttpResponse, ProviderError};
use crate::config::Secret;

/// The source of "now" for token ages (a fake one in tests).
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to.
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(at: SystemTime) -> Arc<Self> {
        Arc::new(ManualClock(Mutex::new(at)))
    }
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

pub fn epoch_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A credential given inline or as a file path (the file wins when both are set).
pub fn load_secret(inline: &Secret, file: &Option<PathBuf>, what: &str) -> Result<Secret, ProviderError> {
    match file {
        Some(path) => {
            std::fs::read_to_string(path).map(Secret::new).map_err(|e| ProviderError::Config(format!("{what}: cannot read {}: {e}", path.display())))
        }
        None if inline.is_empty() => Err(ProviderError::Config(format!("{what} is not set"))),
        None => Ok(inline.clone()),
    }
}

fn sign<T: Serialize>(header: &Header, claims: &T, key: &EncodingKey) -> Result<Secret, ProviderError> {
    jsonwebtoken::encode(header, claims, key).map(Secret::new).map_err(|e| ProviderError::Config(format!("cannot sign a {:?} JWT: {e}", header.alg)))
}

// ---------------------------------------------------------------- APNs provider token

/// Apple rejects a provider token older than this (403 `ExpiredProviderToken`).
pub const APNS_TOKEN_MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// Apple rejects new tokens minted more often than this (429 `TooManyProviderTokenUpdates`).
pub const APNS_TOKEN_MIN_AGE: Duration = Duration::from_secs(20 * 60);

/// The claims of an APNs provider token.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApnsClaims {
    pub iss: String,
    pub iat: i64,
}

/// A provider token: header `{"alg":"ES256","kid":key_id}`, claims `{iss: team_id, iat}`.
pub fn apns_jwt(key: &EncodingKey, key_id: &str, team_id: &str, iat: SystemTime) -> Result<Secret, ProviderError> {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = None;
    header.kid = Some(key_id.to_string());
    let claims = ApnsClaims { iss: team_id.to_string(), iat: epoch_secs(iat) };
    sign(&header, &claims, key)
}

/// The one shared APNs provider token: reused until `token_refresh_secs` old, never
/// re-minted within [`APNS_TOKEN_MIN_AGE`] of the last one, even after a rejection.
pub struct ApnsTokenCache {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    max_age: Duration,
    clock: Arc<dyn Clock>,
    current: Mutex<Option<Minted>>,
}

struct Minted {
    token: Secret,
    iat: SystemTime,
    rejected: bool,
}

impl ApnsTokenCache {
    pub fn new(cfg: &ApnsConfig, clock: Arc<dyn Clock>) -> Result<Self, ProviderError> {
        cfg.validate()?;
        let what = "providers.apns.private_key_pem";
        let pem = load_secret(&cfg.private_key_pem, &cfg.private_key_file, what)?;
        let key = EncodingKey::from_ec_pem(pem.expose().as_bytes())
            .map_err(|e| ProviderError::Config(format!("{what} is not a PKCS#8 P-256 key (.p8): {e}")))?;
        let cache = ApnsTokenCache {
            key,
            key_id: cfg.key_id.clone(),
            team_id: cfg.team_id.clone(),
            max_age: Duration::from_secs(cfg.token_refresh_secs),
            clock,
            current: Mutex::new(None),
        };
        cache.token()?; // a key that cannot sign fails at startup, not on the first push
        Ok(cache)
    }

    /// The current token, minted anew when it is due.
    pub fn token(&self) -> Result<Secret, ProviderError> {
        let now = self.clock.now();
        let mut current = self.current.lock().unwrap();
        if let Some(m) = current.as_ref() {
            let age = now.duration_since(m.iat).unwrap_or(Duration::ZERO);
            let due = age >= self.max_age || (m.rejected && age >= APNS_TOKEN_MIN_AGE);
            if !due {
                return Ok(m.token.clone());
            }
        }
        let token = apns_jwt(&self.key, &self.key_id, &self.team_id, now)?;
        *current = Some(Minted { token: token.clone(), iat: now, rejected: false });
        Ok(token)
    }

    /// Marks the current token rejected (403 `ExpiredProviderToken`); returns whether the
    /// next [`token`](Self::token) is a new one (`false` inside the 20-minute floor).
    pub fn invalidate(&self) -> bool {
        let now = self.clock.now();
        let mut current = self.current.lock().unwrap();
        match current.as_mut() {
            Some(m) => {
                m.rejected = true;
                now.duration_since(m.iat).unwrap_or(Duration::ZERO) >= APNS_TOKEN_MIN_AGE
            }
            None => true,
        }
    }
}

// ---------------------------------------------------------------- Google OAuth2 for FCM

pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME: i64 = 3600;

/// The fields herald uses from a service-account JSON key file.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: Secret,
    #[serde(default)]
    pub private_key_id: String,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
    #[serde(default)]
    pub project_id: String,
}

fn default_token_uri() -> String {
    GOOGLE_TOKEN_URI.to_string()
}

/// The claims of the OAuth2 JWT-bearer assertion.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssertionClaims {
    pub iss: String,
    pub scope: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

/// The RS256 assertion: header `{alg, typ, kid: private_key_id}`, claims
/// `{iss: client_email, scope, aud: token_uri, iat, exp: iat + 3600}`.
pub fn google_assertion(sa: &ServiceAccount, key: &EncodingKey, token_uri: &str, now: SystemTime) -> Result<Secret, ProviderError> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(sa.private_key_id.clone()).filter(|k| !k.is_empty());
    let iat = epoch_secs(now);
    let claims = AssertionClaims {
        iss: sa.client_email.clone(),
        scope: FCM_SCOPE.to_string(),
        aud: token_uri.to_string(),
        iat,
        exp: iat + ASSERTION_LIFETIME,
    };
    sign(&header, &claims, key)
}

/// The token request: a form POST of the assertion to `token_uri`.
pub fn token_request(token_uri: &str, assertion: &Secret) -> HttpRequest {
    HttpRequest::post(token_uri).form([("grant_type", JWT_BEARER), ("assertion", assertion.expose())])
}

/// `200 {"access_token","expires_in"}` → the token and its lifetime; anything else is an
/// [`ProviderError::Auth`] (retryable for 429/5xx, not for `invalid_grant` and friends).
pub fn parse_token_response(resp: &HttpResponse) -> Result<(Secret, Duration), ProviderError> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        expires_in: u64,
    }
    if resp.status == 200 {
        if let Ok(g) = serde_json::from_slice::<Granted>(&resp.body) {
            return Ok((Secret::new(g.access_token), Duration::from_secs(g.expires_in)));
        }
    }
    let reason = match resp.json() {
        Some(v) if v["error"].is_string() => format!(
            "token endpoint: HTTP {} {} {}",
            resp.status,
            v["error"].as_str().unwrap_or_default(),
            v["error_description"].as_str().unwrap_or_default()
        ),
        _ => format!("token endpoint: {}", resp.summary()),
    };
    Err(ProviderError::Auth { reason: reason.trim_end().to_string(), retryable: resp.status == 429 || resp.status >= 500 })
}

/// The FCM access token: fetched once, shared, refreshed `margin` before it expires.
/// Fetches are single-flight (the lock is held across the exchange).
pub struct GoogleTokenCache {
    account: ServiceAccount,
    key: EncodingKey,
    token_uri: String,
    margin: Duration,
    clock: Arc<dyn Clock>,
    current: tokio::sync::Mutex<Option<(Secret, SystemTime)>>,
}

impl GoogleTokenCache {
    pub fn new(cfg: &FcmConfig, clock: Arc<dyn Clock>) -> Result<Self, ProviderError> {
        let what = "providers.fcm.service_account_json";
        let json = load_secret(&cfg.service_account_json, &cfg.service_account_file, what)?;
        let account: ServiceAccount =
            serde_json::from_str(json.expose()).map_err(|e| ProviderError::Config(format!("{what} is not a service-account key: {e}")))?;
        let key = EncodingKey::from_rsa_pem(account.private_key.expose().as_bytes())
            .map_err(|e| ProviderError::Config(format!("{what}: private_key is not an RSA PEM: {e}")))?;
        let token_uri = cfg.token_uri.clone().unwrap_or_else(|| account.token_uri.clone());
        Ok(GoogleTokenCache {
            account,
            key,
            token_uri,
            margin: Duration::from_secs(cfg.token_refresh_margin_secs),
            clock,
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The service account's project (the default FCM project).
    pub fn project_id(&self) -> &str {
        &self.account.project_id
    }

    /// A valid access token, fetched over `client` when none is cached.
    pub async fn token(&self, client: &reqwest::Client, timeout: Duration) -> Result<Secret, ProviderError> {
        self.token_with(|req| send(client, req, timeout)).await
    }

    /// Like [`token`](Self::token) with the exchange injected (tests, other transports).
    pub async fn token_with<F, Fut>(&self, fetch: F) -> Result<Secret, ProviderError>
    where
        F: FnOnce(HttpRequest) -> Fut,
        Fut: Future<Output = Result<HttpResponse, ProviderError>>,
    {
        let mut current = self.current.lock().await;
        if let Some((token, refresh_at)) = current.as_ref() {
            if self.clock.now() < *refresh_at {
                return Ok(token.clone());
            }
        }
        let now = self.clock.now();
        let assertion = google_assertion(&self.account, &self.key, &self.token_uri, now)?;
        let (token, lifetime) = parse_token_response(&fetch(token_request(&self.token_uri, &assertion)).await?)?;
        let refresh_at = now + lifetime - self.margin.min(lifetime / 2);
        *current = Some((token.clone(), refresh_at));
        Ok(token)
    }

    /// Drops the cached token (after 401 UNAUTHENTICATED); the next call fetches anew.
    pub async fn invalidate(&self) {
        *self.current.lock().await = None;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    /// TEST-ONLY keys generated with openssl for these tests; never used anywhere else.
    pub const APNS_TEST_KEY: &str = include_str!("testdata/apns_test_key.p8");
    const APNS_TEST_PUB: &str = include_str!("testdata/apns_test_key.pub.pem");
    pub const RSA_TEST_KEY: &str = include_str!("testdata/fcm_test_key.pem");
    const RSA_TEST_PUB: &str = include_str!("testdata/fcm_test_key.pub.pem");

    pub fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    fn no_validation(alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v.validate_aud = false;
        v
    }

    pub fn apns_config() -> ApnsConfig {
        ApnsConfig {
            topic: "com.example.app".into(),
            key_id: "ABC123DEFG".into(),
            team_id: "DEF123GHIJ".into(),
            private_key_pem: Secret::new(APNS_TEST_KEY),
            ..ApnsConfig::default()
        }
    }

    #[test]
    fn apns_jwt_is_es256_with_kid_and_verifies_with_the_public_key() {
        let key = EncodingKey::from_ec_pem(APNS_TEST_KEY.as_bytes()).unwrap();
        let jwt = apns_jwt(&key, "ABC123DEFG", "DEF123GHIJ", t0()).unwrap();
        let jwt = jwt.expose();
        let header = jsonwebtoken::decode_header(jwt).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("ABC123DEFG"));
        assert_eq!(header.typ, None);
        let public = DecodingKey::from_ec_pem(APNS_TEST_PUB.as_bytes()).unwrap();
        let data = jsonwebtoken::decode::<ApnsClaims>(jwt, &public, &no_validation(Algorithm::ES256)).unwrap();
        assert_eq!(data.claims, ApnsClaims { iss: "DEF123GHIJ".into(), iat: 1_767_225_600 });
        // JWS ES256 signatures are raw r‖s, not DER.
        let sig = jwt.rsplit('.').next().unwrap();
        let sig = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn apns_token_is_reused_until_due_and_never_reminted_within_20_minutes() {
        let clock = ManualClock::new(t0());
        let cache = ApnsTokenCache::new(&apns_config(), clock.clone()).unwrap();
        let first = cache.token().unwrap();
        clock.advance(minutes(39));
        assert_eq!(cache.token().unwrap(), first, "reused before the configured 40 min");
        clock.advance(minutes(1));
        let second = cache.token().unwrap();
        assert_ne!(second, first, "re-minted at 40 min");

        // A rejection 5 minutes later must not re-mint (TooManyProviderTokenUpdates) ...
        clock.advance(minutes(5));
        assert!(!cache.invalidate());
        assert_eq!(cache.token().unwrap(), second);
        // ... but once 20 minutes have passed the rejected token is replaced.
        clock.advance(minutes(15));
        assert!(cache.invalidate());
        let third = cache.token().unwrap();
        assert_ne!(third, second);
        assert_eq!(cache.token().unwrap(), third);
    }

    #[test]
    fn apns_refresh_age_must_be_between_20_and_60_minutes() {
        for secs in [600, 3601] {
            let cfg = ApnsConfig { token_refresh_secs: secs, ..apns_config() };
            let err = ApnsTokenCache::new(&cfg, Arc::new(SystemClock)).err().unwrap();
            assert!(err.to_string().contains("token_refresh_secs"), "{err}");
        }
        let cfg = ApnsConfig { private_key_pem: Secret::new("not a key"), ..apns_config() };
        let err = ApnsTokenCache::new(&cfg, Arc::new(SystemClock)).err().unwrap().to_string();
        assert!(err.contains("private_key_pem") && !err.contains("not a key"), "{err}");
    }

    pub fn service_account_json(token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "herald-test",
            "private_key_id": "kid-1",
            "private_key": RSA_TEST_KEY,
            "client_email": "push@herald-test.iam.gserviceaccount.com",
            "token_uri": token_uri,
        })
        .to_string()
    }

    fn fcm_config() -> FcmConfig {
        FcmConfig { service_account_json: Secret::new(service_account_json(GOOGLE_TOKEN_URI)), ..FcmConfig::default() }
    }

    fn granted(token: &str, expires_in: u64) -> HttpResponse {
        HttpResponse::new(200, format!(r#"{{"access_token":"{token}","expires_in":{expires_in},"token_type":"Bearer"}}"#))
    }

    #[test]
    fn google_assertion_has_the_service_account_claims_and_verifies() {
        let sa: ServiceAccount = serde_json::from_str(&service_account_json(GOOGLE_TOKEN_URI)).unwrap();
        let key = EncodingKey::from_rsa_pem(RSA_TEST_KEY.as_bytes()).unwrap();
        let jwt = google_assertion(&sa, &key, GOOGLE_TOKEN_URI, t0()).unwrap();
        let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
        assert_eq!((header.alg, header.kid.as_deref(), header.typ.as_deref()), (Algorithm::RS256, Some("kid-1"), Some("JWT")));
        let public = DecodingKey::from_rsa_pem(RSA_TEST_PUB.as_bytes()).unwrap();
        let claims = jsonwebtoken::decode::<AssertionClaims>(jwt.expose(), &public, &no_validation(Algorithm::RS256)).unwrap().claims;
        assert_eq!(
            claims,
            AssertionClaims {
                iss: "push@herald-test.iam.gserviceaccount.com".into(),
                scope: FCM_SCOPE.into(),
                aud: GOOGLE_TOKEN_URI.into(),
                iat: 1_767_225_600,
                exp: 1_767_225_600 + 3600,
            }
        );
        let req = token_request(GOOGLE_TOKEN_URI, &jwt);
        assert_eq!(req.url, GOOGLE_TOKEN_URI);
        assert_eq!(req.header_value("content-type"), Some("application/x-www-form-urlencoded"));
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&req.body).into_owned().collect();
        assert_eq!(form[0], ("grant_type".into(), JWT_BEARER.into()));
        assert_eq!(form[1], ("assertion".into(), jwt.expose().to_string()));
    }

    #[tokio::test]
    async fn google_token_is_cached_until_expiry_minus_the_margin() {
        let clock = ManualClock::new(t0());
        let mut cfg = fcm_config();
        cfg.token_uri = Some("http://127.0.0.1:9999/token".into());
        let cache = GoogleTokenCache::new(&cfg, clock.clone()).unwrap();
        assert_eq!(cache.project_id(), "herald-test");
        let calls = AtomicUsize::new(0);
        let fetch = |req: HttpRequest| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(req.url, "http://127.0.0.1:9999/token", "config overrides token_uri");
            async move { Ok(granted(&format!("ya29.t{n}"), 3600)) }
        };
        assert_eq!(cache.token_with(fetch).await.unwrap().expose(), "ya29.t0");
        clock.advance(minutes(54));
        assert_eq!(cache.token_with(fetch).await.unwrap().expose(), "ya29.t0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(minutes(1)); // 55 min = 60 min lifetime - 5 min margin
        assert_eq!(cache.token_with(fetch).await.unwrap().expose(), "ya29.t1");
        cache.invalidate().await;
        assert_eq!(cache.token_with(fetch).await.unwrap().expose(), "ya29.t2");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn google_token_errors_say_whether_to_retry() {
        let cache = GoogleTokenCache::new(&fcm_config(), ManualClock::new(t0())).unwrap();
        let bad = r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        let err = cache.token_with(|_| async { Ok(HttpResponse::new(400, bad)) }).await.unwrap_err();
        assert!(matches!(&err, ProviderError::Auth { retryable: false, reason } if reason.contains("Invalid JWT Signature")), "{err}");
        let err = cache.token_with(|_| async { Ok(HttpResponse::new(503, "busy")) }).await.unwrap_err();
        assert!(matches!(err, ProviderError::Auth { retryable: true, .. }));
        let err = cache.token_with(|_| async { Err(ProviderError::Timeout(Duration::from_secs(1))) }).await.unwrap_err();
        assert!(matches!(err, ProviderError::Timeout(_)));
    }
}
