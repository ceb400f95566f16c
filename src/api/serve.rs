//! The API's HTTP server: the accept loop with a connection cap, the header-read and idle
//! timeouts of every connection, and graceful shutdown (body-read limits are the
//! `read_body` middleware's, since they differ per route).
//!
//! `axum::serve` has no timeouts: an idle socket, a request line that never ends or headers
//! sent a byte a minute stay open forever, and enough of them exhaust the file limit. Here:
//! - hyper's HTTP/1 `header_read_timeout` bounds the time from a connection's start (or the
//!   end of its previous response) to the end of the next request's headers;
//! - a connection with no request in flight for `idle_timeout` is shut down gracefully
//!   (HTTP/2 gets a GOAWAY), whatever its protocol;
//! - at most `max_connections` are served at once; further ones wait in the listen backlog
//!   and are accepted as others close.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::kafka::Throttle;
use crate::telemetry::events;

/// The connection limits of [`serve`] (from `[api]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// hyper's own head buffer: well above the API's `max_header_bytes`, so that the API,
    /// not hyper, refuses large heads (with a JSON error).
    pub max_head_bytes: usize,
    /// How long open connections get to finish at shutdown.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish their
/// requests (at most `shutdown_grace`).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(limits.max_head_bytes).max_headers(1000);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30))).keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let (full, accept_errors) = (Throttle::new(), Throttle::new());
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if full.allow().is_some() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "api.max_connections reached; new connections wait in the listen backlog"
                    );
                }
                events::api_connections_full();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                }
            }
        };
        let (tcp, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin; never exit.
                    if accept_errors.allow().is_some() {
                        tracing::error!(error = %e, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // No Nagle: an answer goes out when written, not when the client's ACK comes back.
        let _ = tcp.set_nodelay(true);
        let (builder, app, stop) = (builder.clone(), app.clone(), shutdown.clone());
        tracker.spawn(async move {
            connection(&builder, tcp, app, limits, stop).await;
            drop(permit);
        });
    }
    tracker.close();
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the shutdown grace; closing them");
    }
    Ok(())
}

/// When a connection last had a request in flight, and how many it has now.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Some(self.started.elapsed().saturating_sub(last))
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }
}

async fn connection(builder: &auto::Builder<TokioExecutor>, tcp: tokio::net::TcpStream, app: Router, limits: Limits, stop: CancellationToken) {
    events::api_connection("opened");
    let activity = Arc::new(Activity { started: Instant::now(), in_flight: AtomicUsize::new(0), last_ms: AtomicU64::new(0) });
    let svc = {
        let activity = activity.clone();
        tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (app, activity) = (app.clone(), activity.clone());
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            async move {
                let resp = app.oneshot(req.map(axum::body::Body::new)).await;
                activity.touch();
                activity.in_flight.fetch_sub(1, Ordering::AcqRel);
                resp
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    let mut closing: Option<tokio::time::Instant> = None;
    let reason = loop {
        tokio::select! {
            done = conn.as_mut() => break match done {
                Ok(()) => "closed",
                Err(e) => {
                    tracing::debug!(error = %e, "connection ended");
                    let timeout = e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                    if timeout { "header_timeout" } else { "error" }
                }
            },
            _ = stop.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + limits.shutdown_grace);
            }
            _ = tick.tick() => match closing {
                None => if activity.idle_for().is_some_and(|idle| idle >= limits.idle_timeout) {
                    conn.as_mut().graceful_shutdown();
                    // A peer that ignores the shutdown is dropped a little later.
                    closing = Some(tokio::time::Instant::now() + Duration::from_secs(5).min(limits.idle_timeout));
                    events::api_connection("idle_timeout");
                },
                Some(deadline) => if tokio::time::Instant::now() >= deadline { break "dropped" },
            },
        }
    };
    events::api_connection(reason);
}
