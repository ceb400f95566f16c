//! Logs and metrics in one place: the tracing subscriber, the Prometheus recorder, and
//! every metric name herald emits (`herald_<noun>_<verb>_total{channel,provider,outcome}`).
//!
//! Call sites use the functions in [`events`]; nothing else names a metric, so the naming
//! scheme and label sets stay bounded and documented here.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryConfig;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the log subscriber (stderr) and the metrics recorder. Safe to call twice.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_filter))
        .map_err(|e| anyhow::anyhow!("telemetry.log_filter: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(true);
    let _ = if cfg.log_format == "json" { builder.json().try_init() } else { builder.try_init() };
    if PROMETHEUS.get().is_none() {
        // Buckets, not summaries: cheap to record and drain, and aggregatable across replicas.
        let mut b = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS).map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?;
        if let Some(listen) = cfg.metrics_listen.as_deref().filter(|s| !s.is_empty()) {
            let addr: SocketAddr = listen.parse().map_err(|e| anyhow::anyhow!("telemetry.metrics_listen '{listen}': {e}"))?;
            // Upkeep runs on its own thread (below), not in the exporter's tokio task.
            b = b.with_http_listener(addr).upkeep_timeout(std::time::Duration::from_secs(3600));
            let (recorder, exporter) = b.build()?;
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                tokio::spawn(exporter);
                let _ = PROMETHEUS.set(handle.clone());
                spawn_upkeep(handle);
            }
        } else {
            let recorder = b.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_ok() {
                let _ = PROMETHEUS.set(handle.clone());
                spawn_upkeep(handle);
            }
        }
        events::describe();
    }
    Ok(())
}

/// Histogram buckets (seconds) for every duration herald records.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Drains recorded histogram samples into their buckets every second, on a thread of its
/// own. Without it samples pile up in memory until the next scrape (the recorder keeps
/// every one), and draining must not hold up a tokio worker serving requests.
fn spawn_upkeep(handle: PrometheusHandle) {
    let _ = std::thread::Builder::new().name("herald-metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        handle.run_upkeep();
    });
}

/// The Prometheus text exposition of everything recorded so far (for `/metrics` handlers).
pub fn render() -> String {
    PROMETHEUS.get().map(|h| h.render()).unwrap_or_default()
}

/// Every metric herald emits. One function per event keeps names and labels consistent.
pub mod events {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

    pub const OUTCOMES: &str = "herald_outcomes_total";
    pub const RECORDS_CONSUMED: &str = "herald_records_consumed_total";
    pub const RECORDS_PRODUCED: &str = "herald_records_produced_total";
    pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
    pub const STAGE_SECONDS: &str = "herald_stage_duration_seconds";
    pub const CONSUMER_LAG: &str = "herald_consumer_lag";
    pub const UNCERTAIN_RESENDS: &str = "herald_dispatch_uncertain_resends_total";
    pub const BREAKER_CHANGES: &str = "herald_dispatch_breaker_transitions_total";
    pub const PROVIDER_CALLS: &str = "herald_dispatch_provider_calls_total";
    pub const PROVIDER_SECONDS: &str = "herald_dispatch_provider_duration_seconds";
    pub const PROVIDER_REFUSED: &str = "herald_dispatch_provider_refused_total";
    pub const DISPATCH_WRITES: &str = "herald_dispatch_store_writes_total";
    pub const DISPATCH_WRITE_SECONDS: &str = "herald_dispatch_store_write_duration_seconds";
    pub const WAITING: &str = "herald_waiting";
    pub const API_REQUESTS: &str = "herald_api_requests_total";
    pub const API_REQUEST_SECONDS: &str = "herald_api_request_duration_seconds";
    pub const API_AUTH_FAILURES: &str = "herald_api_auth_failures_total";
    pub const API_RATE_LIMITED: &str = "herald_api_rate_limited_total";
    pub const API_WEBHOOK_DUPLICATES: &str = "herald_api_webhook_duplicates_total";
    pub const API_CONNECTIONS: &str = "herald_api_connections_total";
    pub const API_CONNECTIONS_OPEN: &str = "herald_api_connections_open";
    pub const API_CONNECTIONS_FULL: &str = "herald_api_connections_full_total";
    pub const API_WEBHOOK_REJECTED: &str = "herald_api_webhook_rejected_total";
    pub const API_WEBHOOK_UNMATCHED: &str = "herald_api_webhook_unmatched_total";
    pub const API_TRACKING: &str = "herald_api_tracking_hits_total";
    pub const CACHE_LOOKUPS: &str = "herald_cache_lookups_total";

    pub(super) fn describe() {
        describe_counter!(OUTCOMES, "Outcome events emitted, by channel, provider and outcome.");
        describe_counter!(RECORDS_CONSUMED, "Kafka records consumed, by role and topic.");
        describe_counter!(RECORDS_PRODUCED, "Kafka records produced and acknowledged, by role and topic.");
        describe_counter!(DEAD_LETTERS, "Records sent to the dead-letter topic, by role and reason.");
        describe_histogram!(STAGE_SECONDS, "Time spent per processing stage.");
        describe_counter!(
            UNCERTAIN_RESENDS,
            "Deliveries sent again that a dispatcher which stopped had in flight without a sent record: each may have reached the provider before; an upper bound on duplicate sends."
        );
        describe_counter!(PROVIDER_CALLS, "Provider requests, by provider and answer class (sent, transient, throttled, auth_failed, ...).");
        describe_histogram!(PROVIDER_SECONDS, "Provider request duration, by provider.");
        describe_counter!(PROVIDER_REFUSED, "Answers refusing herald's credentials or account, by provider (the provider is taken out of rotation).");
        describe_counter!(DISPATCH_WRITES, "Rows the dispatchers' group-commit writer wrote to the store.");
        describe_histogram!(DISPATCH_WRITE_SECONDS, "Duration of one group-commit write (retries not included).");
        describe_gauge!(WAITING, "1 while a role is waiting for a dependency (kafka, store) to come back, by role and dependency.");
        describe_gauge!(CONSUMER_LAG, "Records waiting per assigned partition (queue depth), by role, topic and partition.");
        describe_counter!(BREAKER_CHANGES, "Provider circuit breaker transitions, by provider and new state.");
        describe_counter!(API_REQUESTS, "HTTP API answers, by route template and status code.");
        describe_histogram!(API_REQUEST_SECONDS, "HTTP API request duration, by route template.");
        describe_counter!(API_AUTH_FAILURES, "Refused API signatures, by reason (stable error code).");
        describe_counter!(API_RATE_LIMITED, "API requests refused with 429.");
        describe_counter!(
            API_CONNECTIONS,
            "API connections opened and ended, by event (opened, closed, idle_timeout, header_timeout, error, dropped)."
        );
        describe_counter!(
            API_WEBHOOK_DUPLICATES,
            "Webhook events skipped because they were turned into outcomes before (provider retries, replays), by provider."
        );
        describe_gauge!(API_CONNECTIONS_OPEN, "API connections open now.");
        describe_counter!(API_CONNECTIONS_FULL, "Times api.max_connections was reached (new connections waited in the listen backlog).");
        describe_counter!(API_WEBHOOK_REJECTED, "Provider webhooks refused for their signature, by provider and reason.");
        describe_counter!(API_WEBHOOK_UNMATCHED, "Webhook events whose message matched no known delivery, by provider.");
        describe_counter!(API_TRACKING, "Tracking pixel and click hits, by result (opened, clicked, invalid, unmatched).");
        describe_counter!(CACHE_LOOKUPS, "Lookups in a role's in-memory caches, by cache (throttle, …) and result (hit, miss).");
    }

    /// An outcome event was emitted.
    pub fn outcome(channel: &str, provider: &str, outcome: &str) {
        counter!(OUTCOMES, "channel" => label(channel), "provider" => label(provider), "outcome" => label(outcome)).increment(1);
    }

    /// A label value without an allocation when it is one of the values herald emits on hot
    /// paths (channels, providers, the router's and dispatcher's statuses).
    fn label(value: &str) -> metrics::SharedString {
        const KNOWN: &[&str] = &[
            "-",
            "apns",
            "fcm",
            "sms",
            "email",
            "push",
            "twilio",
            "vonage",
            "sendgrid",
            "mandrill",
            "routed",
            "sent",
            "failed",
            "duplicate",
            "expired",
            "throttled",
            "opted_out",
            "no_address",
            "unknown_user",
            "held",
            "rejected",
            "template_error",
            "retry_scheduled",
            "dead_lettered",
            "invalid_address",
        ];
        match KNOWN.iter().find(|k| **k == value) {
            Some(k) => metrics::SharedString::const_str(k),
            None => metrics::SharedString::from(value.to_string()),
        }
    }

    /// A batch's lookups in an in-memory cache.
    pub fn cache(cache: &'static str, hits: u64, misses: u64) {
        counter!(CACHE_LOOKUPS, "cache" => cache, "result" => "hit").increment(hits);
        counter!(CACHE_LOOKUPS, "cache" => cache, "result" => "miss").increment(misses);
    }

    pub fn consumed(role: &'static str, topic: &str, n: u64) {
        counter!(RECORDS_CONSUMED, "role" => role, "topic" => topic.to_string()).increment(n);
    }

    pub fn produced(role: &'static str, topic: &str, n: u64) {
        counter!(RECORDS_PRODUCED, "role" => role, "topic" => topic.to_string()).increment(n);
    }

    /// A record went to the DLQ: logged at error level (the alert) and counted.
    pub fn dead_lettered(role: &'static str, reason: &'static str, detail: &str) {
        tracing::error!(role, reason, detail, "record dead-lettered");
        counter!(DEAD_LETTERS, "role" => role, "reason" => reason).increment(1);
    }

    /// A delivery another dispatcher had in flight without a sent record is sent again.
    pub fn uncertain_resend(channel: &str, provider: &str) {
        counter!(UNCERTAIN_RESENDS, "channel" => channel.to_string(), "provider" => provider.to_string()).increment(1);
    }

    /// A provider's circuit opened (traffic fails over) or closed again.
    pub fn breaker(provider: &'static str, state: &'static str) {
        tracing::warn!(provider, state, "provider circuit breaker changed state");
        counter!(BREAKER_CHANGES, "provider" => provider, "state" => state).increment(1);
    }

    /// A provider answered (`outcome` is the answer's class).
    pub fn provider_call(provider: &'static str, outcome: &'static str, seconds: f64) {
        counter!(PROVIDER_CALLS, "provider" => provider, "outcome" => outcome).increment(1);
        histogram!(PROVIDER_SECONDS, "provider" => provider).record(seconds);
    }

    /// A provider refused herald's credentials or account: the alert (error level).
    pub fn provider_refused(provider: &'static str, reason: &str) {
        tracing::error!(provider, reason, "provider refused herald's credentials; taking it out of rotation and failing over");
        counter!(PROVIDER_REFUSED, "provider" => provider).increment(1);
    }

    /// The dispatchers' writer wrote a group of rows.
    pub fn dispatch_flush(rows: usize, seconds: f64) {
        counter!(DISPATCH_WRITES).increment(rows as u64);
        histogram!(DISPATCH_WRITE_SECONDS).record(seconds);
    }

    /// A role started (`true`) or stopped (`false`) waiting for `dependency`.
    pub fn waiting(role: &str, dependency: &'static str, waiting: bool) {
        gauge!(WAITING, "role" => role.to_string(), "dependency" => dependency).set(if waiting { 1.0 } else { 0.0 });
    }

    pub fn consumer_lag(role: &'static str, topic: &str, partition: i32, lag: i64) {
        gauge!(CONSUMER_LAG, "role" => role, "topic" => topic.to_string(), "partition" => partition.to_string()).set(lag as f64);
    }

    pub fn stage_time(stage: &'static str, seconds: f64) {
        histogram!(STAGE_SECONDS, "stage" => stage).record(seconds);
    }

    /// An HTTP API answer (`route` is the matched route template, bounded).
    pub fn api_request(route: &str, status: u16, seconds: f64) {
        counter!(API_REQUESTS, "route" => route.to_string(), "status" => status.to_string()).increment(1);
        histogram!(API_REQUEST_SECONDS, "route" => route.to_string()).record(seconds);
    }

    /// A signature refused (`reason` is the stable error code).
    pub fn api_auth_failure(reason: &'static str) {
        counter!(API_AUTH_FAILURES, "reason" => reason).increment(1);
    }

    /// A connection of the API opened or ended (`how`: `opened`, `closed`, `idle_timeout`,
    /// `header_timeout`, `error`, `dropped`).
    pub fn api_connection(how: &'static str) {
        counter!(API_CONNECTIONS, "event" => how).increment(1);
        match how {
            "opened" => gauge!(API_CONNECTIONS_OPEN).increment(1.0),
            "idle_timeout" => {}
            _ => gauge!(API_CONNECTIONS_OPEN).decrement(1.0),
        }
    }

    /// `api.max_connections` was reached: a new connection waits in the listen backlog.
    pub fn api_connections_full() {
        counter!(API_CONNECTIONS_FULL).increment(1);
    }

    pub fn api_rate_limited() {
        counter!(API_RATE_LIMITED).increment(1);
    }

    /// A provider webhook refused for its signature: logged (an attack or a misconfigured
    /// secret) and counted.
    pub fn webhook_rejected(provider: &'static str, reason: &'static str) {
        tracing::warn!(provider, reason, "webhook signature rejected");
        counter!(API_WEBHOOK_REJECTED, "provider" => provider, "reason" => reason).increment(1);
    }

    /// Webhook events already turned into outcomes before (a retry or a replay): skipped.
    pub fn webhook_duplicates(provider: &'static str, n: u64) {
        counter!(API_WEBHOOK_DUPLICATES, "provider" => provider).increment(n);
    }

    pub fn webhook_unmatched(provider: &'static str) {
        counter!(API_WEBHOOK_UNMATCHED, "provider" => provider).increment(1);
    }

    pub fn api_tracking(result: &str) {
        counter!(API_TRACKING, "result" => result.to_string()).increment(1);
    }
}
