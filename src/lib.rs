//! herald: domain events from Kafka to APNs, FCM, SMS and email — never lost, rarely twice.
//!
//! Module map (the flow is in README.md):
//!
//! - [`config`]: the one typed configuration tree (defaults, TOML file, `HERALD__…` env),
//!   secrets redacted.
//! - [`error`]: the retryable-vs-permanent contract ([`error::Classify`]) every boundary
//!   error enum implements.
//! - [`model`]: Rust mirrors of the Avro contracts (`NotificationRequested`,
//!   `ChannelDelivery`, `DeliveryOutcome`).
//! - [`schemas`]: the `.avsc` contracts built into the binary and their registration in the
//!   Confluent-compatible registry.
//! - [`codec`]: Confluent-framed Avro encode/decode against the registry; says what is poison.
//! - [`topology`]: the declared topics (`topology/topics.toml`) and `apply`/`plan` through
//!   the Kafka admin API.
//! - [`changes`]: the compacted changes topic: `kind:id` keys published on every contact,
//!   template or app change and followed by every process that caches them.
//! - [`kafka`]: client configuration, the idempotent producer, reachability checks.
//! - [`store`]: the CQL store (Scylla/Cassandra): session, prepared statements, migrations.
//! - [`render`]: templates compiled once (minijinja, strict params) and rendered per
//!   channel × locale into `RenderedContent`: SMS encoding/segments, escaped email HTML.
//! - [`tracking`]: signed open/click tokens for email (rendered here, served by the API).
//! - [`providers`]: one module per provider (APNs, FCM, Twilio, Vonage, SendGrid, Mandrill):
//!   pure request builders and response classifiers, credential caches, the HTTP clients.
//! - [`telemetry`]: tracing, the Prometheus recorder and every metric name.
//! - [`router`]: the router role (dedup, enrich, preferences, throttle, quiet hours,
//!   templates, emit) over [`kafka::eos`], the exactly-once stage loop.
//! - [`dispatch`]: the dispatcher role per channel: sent-log, retry topics, DLQ, failover
//!   with circuit breakers, per-provider limits.
//! - [`sandbox`]: the provider sandbox: local look-alikes of APNs, FCM, Twilio, Vonage,
//!   SendGrid and Mandrill with a fault-injection control API (`herald sandbox`).
//! - [`replay`]: re-drives dead letters (or a topic's records) after an incident.
//! - [`api`]: `herald api`, the HTTP front door (axum): signed app requests (send,
//!   contacts, templates, notification log), tracking pixel/redirect, provider webhooks,
//!   health and metrics, OpenAPI at `/openapi.json`; `herald apps` manages app keys.
//! - [`cli`]: the `herald` command line; each role is a subcommand.
//! - [`demo`]: the end-to-end demo behind README's first command.

pub mod api;
pub mod changes;
pub mod cli;
pub mod codec;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod error;
pub mod kafka;
pub mod model;
pub mod providers;
pub mod render;
pub mod replay;
pub mod router;
pub mod sandbox;
pub mod schemas;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod tracking;
