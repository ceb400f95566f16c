//! The I/O half of the providers: [`send`] (one HTTP exchange) and [`Clients`], the
//! reqwest clients and credential caches a dispatcher holds, with `deliver` = build → send
//! → classify (and one resend after a refreshed credential).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::auth::{self, ApnsTokenCache, Clock, GoogleTokenCache, SystemClock};
use super::{
    apns, configured, fcm, mandrill, sendgrid, twilio, vonage, Classification, HttpConfig, HttpRequest, HttpResponse, Provider, ProviderError,
    ProvidersConfig,
};
use crate::model::ChannelDelivery;

/// Exchanges one request: the only I/O of a provider call.
///
/// # Errors
/// [`ProviderError::Connect`] / [`ProviderError::Timeout`] / [`ProviderError::Transport`]
/// (retryable) when no complete answer arrived; any HTTP status is an `Ok` answer.
pub async fn send(client: &reqwest::Client, req: HttpRequest, timeout: Duration) -> Result<HttpResponse, ProviderError> {
    let mut builder = client.request(req.method, &req.url).timeout(timeout);
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    let err = |e| ProviderError::from_reqwest(e, timeout);
    let resp = builder.body(req.body).send().await.map_err(err)?;
    let status = resp.status().as_u16();
    let headers = resp.headers().iter().filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))).collect();
    let body = resp.bytes().await.map_err(err)?.to_vec();
    Ok(HttpResponse { status, headers, body, received_at: SystemTime::now() })
}

/// The HTTP clients and credential caches of the enabled providers: what a dispatcher holds.
pub struct Clients {
    cfg: ProvidersConfig,
    http: HashMap<Provider, reqwest::Client>,
    apns_tokens: Option<ApnsTokenCache>,
    google_tokens: Option<GoogleTokenCache>,
    clock: Arc<dyn Clock>,
}

impl Clients {
    /// Validates the enabled providers' config, loads their keys, builds their clients.
    pub fn build(cfg: &ProvidersConfig, enabled: &[Provider]) -> Result<Self, ProviderError> {
        Self::build_with_clock(cfg, enabled, Arc::new(SystemClock))
    }

    pub fn build_with_clock(cfg: &ProvidersConfig, enabled: &[Provider], clock: Arc<dyn Clock>) -> Result<Self, ProviderError> {
        let mut clients = Clients { cfg: cfg.clone(), http: HashMap::new(), apns_tokens: None, google_tokens: None, clock: clock.clone() };
        for &p in enabled {
            match p {
                Provider::Apns => clients.apns_tokens = Some(ApnsTokenCache::new(&cfg.apns, clock.clone())?),
                Provider::Fcm => {
                    let cache = GoogleTokenCache::new(&cfg.fcm, clock.clone())?;
                    let project = &mut clients.cfg.fcm.project_id;
                    if project.is_empty() {
                        *project = cache.project_id().to_string();
                    }
                    configured(project, "providers.fcm.project_id")?;
                    clients.google_tokens = Some(cache);
                }
                Provider::Twilio => cfg.twilio.validate()?,
                Provider::Vonage => cfg.vonage.validate()?,
                Provider::Sendgrid => cfg.sendgrid.validate()?,
                Provider::Mandrill => cfg.mandrill.validate()?,
            }
            let (base_url, http) = cfg.transport(p);
            clients.http.insert(p, http_client(p, base_url, http)?);
        }
        Ok(clients)
    }

    /// The reqwest client of an enabled provider.
    pub fn client(&self, p: Provider) -> Result<&reqwest::Client, ProviderError> {
        self.http.get(&p).ok_or_else(|| not_enabled(p))
    }

    /// Builds, sends and classifies one delivery. On [`Classification::Reauth`] the
    /// credential is refreshed and the request sent once more (a rejected credential
    /// means nothing was sent); the second answer is final.
    pub async fn deliver(&self, p: Provider, d: &ChannelDelivery) -> Result<Classification, ProviderError> {
        let first = self.attempt(p, d).await?;
        if matches!(first, Classification::Reauth { .. }) && self.refresh(p).await {
            tracing::info!(provider = %p, "credential rejected; refreshed it, sending once more");
            return self.attempt(p, d).await;
        }
        Ok(first)
    }

    /// Drops a rejected credential; `false` when no new one can be had yet (the APNs
    /// 20-minute floor) or the provider has none.
    async fn refresh(&self, p: Provider) -> bool {
        match (p, &self.apns_tokens, &self.google_tokens) {
            (Provider::Apns, Some(tokens), _) => tokens.invalidate(),
            (Provider::Fcm, _, Some(tokens)) => {
                tokens.invalidate().await;
                true
            }
            _ => false,
        }
    }

    async fn attempt(&self, p: Provider, d: &ChannelDelivery) -> Result<Classification, ProviderError> {
        let client = self.client(p)?;
        let now_ms = auth::epoch_ms(self.clock.now());
        let cfg = &self.cfg;
        let timeout = cfg.transport(p).1.request_timeout();
        let req = match p {
            Provider::Apns => {
                let tokens = self.apns_tokens.as_ref().ok_or_else(|| not_enabled(p))?;
                apns::build_request(&cfg.apns, d, &tokens.token()?)?
            }
            Provider::Fcm => {
                let tokens = self.google_tokens.as_ref().ok_or_else(|| not_enabled(p))?;
                let token = tokens.token(client, timeout).await?;
                fcm::build_request(&cfg.fcm, d, &token, now_ms)?
            }
            Provider::Twilio => twilio::build_request(&cfg.twilio, d, now_ms)?,
            Provider::Vonage => vonage::build_request(&cfg.vonage, d, now_ms)?,
            Provider::Sendgrid => sendgrid::build_request(&cfg.sendgrid, d)?,
            Provider::Mandrill => mandrill::build_request(&cfg.mandrill, d)?,
        };
        let resp = send(client, req, timeout).await?;
        let class = p.classify(&resp);
        tracing::debug!(provider = %p, status = resp.status, outcome = class.label(), "provider answered");
        Ok(class)
    }
}

fn not_enabled(p: Provider) -> ProviderError {
    ProviderError::Config(format!("provider {p} is not enabled"))
}

/// One provider's reqwest client: connection reuse, timeouts, no redirects (a redirect
/// must never carry credentials elsewhere), extra roots for a sandbox CA. APNs speaks
/// HTTP/2 only: h2c (prior knowledge) for an `http://` sandbox, ALPN h2 over TLS otherwise.
fn http_client(p: Provider, base_url: &str, http: &HttpConfig) -> Result<reqwest::Client, ProviderError> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_millis(http.connect_timeout_ms))
        .pool_max_idle_per_host(http.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    if p == Provider::Apns {
        // Apple wants long-lived connections: keep them alive with HTTP/2 PINGs.
        b = b.http2_keep_alive_interval(Duration::from_secs(60)).http2_keep_alive_while_idle(true);
        if base_url.starts_with("http://") {
            b = b.http2_prior_knowledge();
        }
    }
    if let Some(path) = &http.root_ca_file {
        let pem = std::fs::read(path).map_err(|e| ProviderError::Config(format!("{p}: cannot read root_ca_file {}: {e}", path.display())))?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ProviderError::Config(format!("{p}: root_ca_file {}: {e}", path.display())))?;
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| ProviderError::Config(format!("{p}: HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::model::RenderedContent;
    use crate::providers::tests::delivery;

    /// Serves `app` on a loopback port; returns its base URL.
    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    type Log = Arc<std::sync::Mutex<Vec<(axum::http::Version, String)>>>;

    #[tokio::test]
    async fn apns_over_h2c_mints_a_new_token_and_resends_once_after_expired_provider_token() {
        use axum::response::IntoResponse;
        let log = Log::default();
        let seen = log.clone();
        let app = axum::Router::new().route(
            "/3/device/{token}",
            axum::routing::post(move |req: axum::extract::Request| async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_string();
                let id = req.headers()["apns-id"].to_str().unwrap().to_string();
                let mut seen = seen.lock().unwrap();
                seen.push((req.version(), auth));
                match seen.len() {
                    1 => (axum::http::StatusCode::FORBIDDEN, r#"{"reason":"ExpiredProviderToken"}"#).into_response(),
                    _ => (axum::http::StatusCode::OK, [("apns-id", id)]).into_response(),
                }
            }),
        );
        let mut cfg = ProvidersConfig { apns: auth::tests::apns_config(), ..Default::default() };
        cfg.apns.base_url = serve(app).await;
        let clock = auth::ManualClock::new(auth::tests::t0());
        let clients = Clients::build_with_clock(&cfg, &[Provider::Apns], clock.clone()).unwrap();
        clock.advance(Duration::from_secs(21 * 60)); // past the 20-minute re-mint floor
        let content = RenderedContent { title: Some("Hi".into()), ..Default::default() };
        let d = delivery("apns", "ab12", content);
        let class = clients.deliver(Provider::Apns, &d).await.unwrap();
        assert_eq!(class, Classification::sent(apns::apns_id("d-42")));
        let seen = log.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|(v, _)| *v == axum::http::Version::HTTP_2), "h2c: {seen:?}");
        assert_ne!(seen[0].1, seen[1].1, "the rejected token was replaced");
    }

    #[tokio::test]
    async fn fcm_fetches_an_access_token_and_refetches_it_after_401() {
        use axum::response::IntoResponse;
        let log = Log::default();
        let (tokens, sends) = (log.clone(), log.clone());
        let app = axum::Router::new()
            .route(
                "/token",
                axum::routing::post(move |body: String| async move {
                    let mut seen = tokens.lock().unwrap();
                    assert!(body.starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=ey"));
                    seen.push((axum::http::Version::HTTP_11, "token".into()));
                    let n = seen.iter().filter(|(_, what)| what == "token").count();
                    format!(r#"{{"access_token":"ya29.n{n}","expires_in":3599,"token_type":"Bearer"}}"#)
                }),
            )
            .route(
                "/v1/projects/herald-test/messages:send",
                axum::routing::post(move |headers: axum::http::HeaderMap| async move {
                    let auth = headers["authorization"].to_str().unwrap().to_string();
                    sends.lock().unwrap().push((axum::http::Version::HTTP_11, auth.clone()));
                    if auth == "Bearer ya29.n1" {
                        let body = r#"{"error":{"code":401,"message":"expired","status":"UNAUTHENTICATED"}}"#;
                        (axum::http::StatusCode::UNAUTHORIZED, body).into_response()
                    } else {
                        r#"{"name":"projects/herald-test/messages/m-1"}"#.into_response()
                    }
                }),
            );
        let base = serve(app).await;
        let mut cfg = ProvidersConfig::default();
        cfg.fcm.base_url = base.clone();
        cfg.fcm.service_account_json = Secret::new(auth::tests::service_account_json(&format!("{base}/token")));
        let clients = Clients::build(&cfg, &[Provider::Fcm]).unwrap();
        let content = RenderedContent { body: Some("Hi".into()), ..Default::default() };
        let d = delivery("fcm", "fcm-token", content);
        assert_eq!(clients.deliver(Provider::Fcm, &d).await.unwrap(), Classification::sent("m-1"));
        assert_eq!(clients.deliver(Provider::Fcm, &d).await.unwrap(), Classification::sent("m-1"));
        let seen: Vec<String> = log.lock().unwrap().iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(seen, ["token", "Bearer ya29.n1", "token", "Bearer ya29.n2", "Bearer ya29.n2"]);
    }

    #[test]
    fn clients_build_only_what_is_enabled_and_name_missing_settings() {
        let mut cfg = ProvidersConfig::default();
        let err = Clients::build(&cfg, &[Provider::Twilio]).err().unwrap();
        assert!(err.to_string().contains("providers.twilio.account_sid"), "{err}");
        cfg.twilio.account_sid = "AC1".into();
        cfg.twilio.auth_token = Secret::new("t");
        cfg.twilio.from = Some("+15550000000".into());
        cfg.apns.base_url = "http://127.0.0.1:1".into();
        let clients = Clients::build(&cfg, &[Provider::Twilio]).unwrap();
        assert!(clients.client(Provider::Twilio).is_ok());
        assert!(clients.client(Provider::Apns).is_err());
        cfg.sendgrid.http.root_ca_file = Some("/nonexistent/ca.pem".into());
        cfg.sendgrid.api_key = Secret::new("SG.x");
        cfg.sendgrid.from_email = "a@b.c".into();
        let err = Clients::build(&cfg, &[Provider::Sendgrid]).err().unwrap();
        assert!(err.to_string().contains("root_ca_file"), "{err}");
    }
}
