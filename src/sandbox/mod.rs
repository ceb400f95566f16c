//! The provider sandbox (`herald sandbox`): one local server that answers like APNs, FCM (and
//! Google's OAuth token endpoint), Twilio, Vonage, SendGrid and Mandrill, plus a control API
//! under `/_sandbox/` to inject faults, set dead addresses and read what each provider got.
//!
//! - [`config`]: [`SandboxConfig`], the credentials it accepts (dev defaults, `sandbox/dev-keys/`).
//! - `http`: the buffered request, credential parsing, replies, address formats.
//! - one module per provider (`apns`, `fcm` + `oauth`, `twilio`, `vonage`, `sendgrid`,
//!   `mandrill`): auth, validation, success and error bodies as in
//!   `provider-contracts.md`, and the provider's error for each fault name.
//! - `faults`, `journal`, `state`, `control`: injected faults, the request log, the
//!   dead-address sets and the `/_sandbox/` API over them.
//!
//! One listener serves every provider, told apart by path. It speaks HTTP/1.1 and h2c
//! (HTTP/2 with prior knowledge) on the same port; APNs answers HTTP/1.1 with 505.
//!
//! Every request goes through the same steps: auth and validation (the provider's own
//! rejection), then the fault drawn for that provider (latency, hang, or the provider's
//! error), then the success answer; the request log records each one with its status.

#![allow(clippy::result_large_err, reason = "a rejection is the provider's HTTP answer itself; it is built once per request")]

mod apns;
pub mod config;
mod control;
mod faults;
mod fcm;
mod http;
mod journal;
mod mandrill;
mod oauth;
mod sendgrid;
pub mod state;
mod twilio;
mod vonage;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use jsonwebtoken::DecodingKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::SandboxConfig;
pub use faults::{ErrorName, Fault};
pub use state::SandboxState;

use faults::FaultTable;
use http::{with_header, Incoming};
use journal::Journal;

/// The six simulated providers are herald's own [`crate::providers::Provider`]s, named
/// as in `/_sandbox/…/{provider}`; the sandbox adds how each one fails.
pub use crate::providers::Provider;

impl Provider {
    /// The error a fault answers with when it names none: the provider's usual outage.
    pub fn default_error(self) -> &'static str {
        match self {
            Provider::Apns => "ServiceUnavailable",
            Provider::Fcm => "UNAVAILABLE",
            Provider::Twilio => "20429",
            Provider::Vonage => "1",
            Provider::Sendgrid => "429",
            Provider::Mandrill => "GeneralError",
        }
    }

    /// The provider's real answer for a named error; `None` if it has no such error.
    fn fault_reply(self, error: &str, retry_after_s: Option<u64>) -> Option<Response> {
        match self {
            Provider::Apns => apns::fault(error),
            Provider::Fcm => fcm::fault(error),
            Provider::Twilio => twilio::fault(error),
            Provider::Vonage => vonage::fault(error),
            Provider::Sendgrid => sendgrid::fault(error, retry_after_s),
            Provider::Mandrill => mandrill::fault(error),
        }
    }
}

/// Why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {what} is not a usable public key PEM: {source}")]
    Key { what: String, source: jsonwebtoken::errors::Error },
    #[error("sandbox: cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// What a provider decided before faults: `Ok` = accepted (its success answer),
/// `Err` = rejected by auth or validation (its error answer, never faulted).
type Verdict = Result<Response, Response>;

/// The state every handler shares.
#[derive(Clone)]
struct Shared(Arc<Inner>);

struct Inner {
    config: SandboxConfig,
    /// APNs key id → verifying key.
    apns_keys: HashMap<String, DecodingKey>,
    /// The FCM service account's verifying key.
    fcm_key: DecodingKey,
    faults: FaultTable,
    journal: Journal,
    state: RwLock<World>,
    /// Access tokens issued by the OAuth endpoint → expiry.
    access_tokens: Mutex<HashMap<String, Instant>>,
    /// Vonage account balance, in EUR.
    vonage_balance: Mutex<f64>,
    /// Cancelled when the sandbox stops (ends hanging requests too).
    stop: CancellationToken,
}

/// The dead-address sets and when they were set (APNs reports that time on 410).
struct World {
    sets: SandboxState,
    since_ms: i64,
}

impl Deref for Shared {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Shared {
    fn new(config: SandboxConfig) -> Result<Shared, SandboxError> {
        let key_error = |what: String| move |source| SandboxError::Key { what, source };
        let apns_keys = config
            .apns
            .keys
            .iter()
            .map(|(kid, pem)| {
                DecodingKey::from_ec_pem(pem.as_bytes()).map(|key| (kid.clone(), key)).map_err(key_error(format!("sandbox.apns.keys.{kid}")))
            })
            .collect::<Result<_, _>>()?;
        let fcm_key = DecodingKey::from_rsa_pem(config.fcm.public_key_pem.as_bytes()).map_err(key_error("sandbox.fcm.public_key_pem".into()))?;
        let state = World { sets: config.state.clone().normalized(), since_ms: chrono::Utc::now().timestamp_millis() };
        Ok(Shared(Arc::new(Inner {
            config,
            apns_keys,
            fcm_key,
            faults: FaultTable::default(),
            journal: Journal::default(),
            state: RwLock::new(state),
            access_tokens: Mutex::new(HashMap::new()),
            vonage_balance: Mutex::new(10.0),
            stop: CancellationToken::new(),
        })))
    }

    /// Reads the dead-address sets.
    fn sets<T>(&self, f: impl FnOnce(&SandboxState, i64) -> T) -> T {
        let world = self.state.read().unwrap();
        f(&world.sets, world.since_ms)
    }

    /// Logs the request and answers it as is (no fault applies).
    fn reply(&self, provider: Provider, req: &Incoming, response: Response) -> Response {
        let seq = self.journal.record(provider, req, req.body_for_log());
        self.journal.answered(provider, seq, response.status().as_u16());
        response
    }

    /// Logs the request and answers it: rejections as they are, accepted requests after
    /// the provider's fault (if any).
    async fn answer(&self, provider: Provider, req: &Incoming, verdict: Verdict) -> Response {
        let seq = self.journal.record(provider, req, req.body_for_log());
        let response = match verdict {
            Err(rejected) => rejected,
            Ok(accepted) => self.apply_fault(provider, accepted).await,
        };
        self.journal.answered(provider, seq, response.status().as_u16());
        response
    }

    async fn apply_fault(&self, provider: Provider, accepted: Response) -> Response {
        let Some(plan) = self.faults.draw(provider) else {
            return accepted;
        };
        tokio::time::sleep(plan.latency).await;
        if plan.hang {
            self.stop.cancelled().await;
            return (StatusCode::SERVICE_UNAVAILABLE, "sandbox stopped").into_response();
        }
        let Some(error) = plan.error else {
            return accepted;
        };
        let Some(mut reply) = provider.fault_reply(&error, plan.retry_after_s) else {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("sandbox: no {} error {error}", provider.name())).into_response();
        };
        if let Some(id) = accepted.headers().get("apns-id") {
            reply.headers_mut().insert("apns-id", id.clone());
        }
        match plan.retry_after_s {
            Some(s) if reply.status() != StatusCode::OK => with_header(reply, "retry-after", s),
            _ => reply,
        }
    }
}

/// Every provider route plus the control API.
fn router(shared: Shared) -> Router {
    Router::new()
        .route("/3/device/{token}", post(apns::send).fallback(apns::method_not_allowed))
        .route("/3/device/", post(apns::missing_token).fallback(apns::method_not_allowed))
        .route("/token", post(oauth::token))
        .route("/v1/projects/{project}/messages:send", post(fcm::send))
        .route("/2010-04-01/Accounts/{account}/Messages.json", post(twilio::send))
        .route("/sms/json", post(vonage::send))
        .route("/v3/mail/send", post(sendgrid::send))
        .route("/api/1.0/messages/send", post(mandrill::send))
        .route("/api/1.0/messages/send.json", post(mandrill::send))
        .merge(control::routes())
        .fallback(not_found)
        .with_state(shared)
}

/// Unknown paths: APNs-style `BadPath` under `/3/`, a plain 404 elsewhere.
async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/3/") {
        apns::fault("BadPath").unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
    } else {
        (StatusCode::NOT_FOUND, "no such sandbox endpoint").into_response()
    }
}

/// A sandbox serving in the background; stops when [`RunningSandbox::stop`] is called or
/// it is dropped.
pub struct RunningSandbox {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSandbox {
    /// The bound address (useful with `listen = "127.0.0.1:0"`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the base URL of every provider endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, ends hanging requests and waits for open connections to finish.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `config.listen` and serves in a background task.
///
/// # Errors
/// A key in the config is not a valid public key PEM, or the address cannot be bound.
pub async fn start(config: SandboxConfig) -> Result<RunningSandbox, SandboxError> {
    let listen = config.listen.clone();
    let shared = Shared::new(config)?;
    let bind_error = |source| SandboxError::Bind { addr: listen.clone(), source };
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let stop = shared.stop.clone();
    let app = router(shared);
    let serving = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    let task = tokio::spawn(async move { serving.await });
    tracing::info!(%addr, "provider sandbox listening (HTTP/1.1 + h2c)");
    Ok(RunningSandbox { addr, stop, task: Some(task) })
}

/// `herald sandbox`: serves until Ctrl-C.
pub async fn run(config: SandboxConfig) -> anyhow::Result<()> {
    let sandbox = start(config).await?;
    println!("sandbox: listening on {} (HTTP/1.1 and h2c); control API at {}/_sandbox/", sandbox.url(), sandbox.url());
    tokio::signal::ctrl_c().await?;
    println!("sandbox: stopping");
    sandbox.stop().await?;
    Ok(())
}
