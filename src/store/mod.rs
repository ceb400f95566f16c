//! The CQL store (ScyllaDB in production, Cassandra locally): one shared session,
//! statements prepared once, typed rows, and the store's error enum.
//!
//! - [`migrate`]: versioned DDL from `cql/`, recorded in `schema_migrations`.
//! - [`Store`]: prepared statements for every table, shared as `Arc<Store>` by the roles.

pub mod migrate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::{DeserializeRow, SerializeRow};

use crate::config::StoreConfig;
use crate::error::Classify;

/// Errors at the CQL boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "CQL store at {nodes} is not reachable within {timeout:?}: {detail}. Is it running (scripts/stack status) and is store.contact_points right?"
    )]
    Unreachable { nodes: String, timeout: Duration, detail: String },
    #[error("CQL {op} failed: {detail}")]
    Query { op: &'static str, detail: String, retryable: bool },
    #[error("migration {version} ({name}) was changed after it was applied (checksum {applied} != {now}); add a new migration instead")]
    MigrationEdited { version: i32, name: String, applied: String, now: String },
    #[error("keyspace '{0}' has no migrations applied; run `herald db migrate`")]
    NotMigrated(String),
}

impl Classify for StoreError {
    fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Query { retryable, .. } => *retryable,
            StoreError::MigrationEdited { .. } | StoreError::NotMigrated(_) => false,
        }
    }
}

/// Maps a driver error at `op` into a [`StoreError`]. A request error is classified by its
/// type: a statement the store refuses (syntax, schema, invalid values, authorization) or
/// that cannot be serialised is permanent; everything about reaching the store (no
/// connection, timeouts, unavailable or overloaded replicas, a node starting) is retryable,
/// so an outage is waited out instead of stopping a role. Other errors (row decoding) are
/// classified by their text.
pub(crate) fn query_err<E: std::fmt::Display + std::fmt::Debug + 'static>(op: &'static str, e: E) -> StoreError {
    let detail = e.to_string();
    let any: &dyn std::any::Any = &e;
    let retryable = if let Some(e) = any.downcast_ref::<scylla::errors::ExecutionError>() {
        execution_retryable(e)
    } else if let Some(e) = any.downcast_ref::<scylla::errors::PrepareError>() {
        !matches!(e, scylla::errors::PrepareError::AllAttemptsFailed { first_attempt } if !attempt_retryable(first_attempt))
    } else {
        let d = detail.to_ascii_lowercase();
        ["timeout", "timed out", "unavailable", "connection", "overloaded", "broken pipe", "no connections"].iter().any(|w| d.contains(w))
    };
    StoreError::Query { op, detail, retryable }
}

fn execution_retryable(e: &scylla::errors::ExecutionError) -> bool {
    use scylla::errors::ExecutionError as E;
    match e {
        E::BadQuery(_) => false,
        E::LastAttemptError(a) => attempt_retryable(a),
        E::PrepareError(p) => !matches!(p, scylla::errors::PrepareError::AllAttemptsFailed { first_attempt } if !attempt_retryable(first_attempt)),
        // No node to ask, no connection, a client timeout, schema agreement: the store is
        // (partly) out of reach.
        _ => true,
    }
}

fn attempt_retryable(e: &scylla::errors::RequestAttemptError) -> bool {
    use scylla::errors::{DbError as D, RequestAttemptError as A};
    match e {
        A::SerializationError(_) | A::CqlRequestSerialization(_) => false,
        A::DbError(db, _) => !matches!(
            db,
            D::SyntaxError
                | D::Invalid
                | D::AlreadyExists { .. }
                | D::FunctionFailure { .. }
                | D::AuthenticationError
                | D::Unauthorized
                | D::ConfigError
                | D::ProtocolError
        ),
        _ => true,
    }
}

/// Opens a session to the contact points, failing fast when nobody answers.
/// `keyspace`: `USE` it (it must exist).
pub async fn connect(cfg: &StoreConfig, keyspace: Option<&str>) -> Result<Session, StoreError> {
    let timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let profile = ExecutionProfile::builder()
        .consistency(Consistency::LocalQuorum)
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .build();
    let mut b =
        SessionBuilder::new().known_nodes(&cfg.contact_points).connection_timeout(timeout).default_execution_profile_handle(profile.into_handle());
    if let Some(user) = &cfg.username {
        b = b.user(user, cfg.password.expose());
    }
    if let Some(ks) = keyspace {
        b = b.use_keyspace(ks, false);
    }
    let unreachable = |detail: String| StoreError::Unreachable { nodes: cfg.contact_points.join(","), timeout, detail };
    // The driver retries internally; bound the whole attempt so a wrong port fails in seconds.
    match tokio::time::timeout(timeout + Duration::from_secs(1), b.build()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable("no answer".into())),
    }
}

/// A user's contact data.
#[derive(Debug, Clone, PartialEq, Eq, Default, DeserializeRow, SerializeRow)]
pub struct User {
    pub user_id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
}

/// Whether a user's email and phone still work (`None` = never found dead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, DeserializeRow)]
pub struct ContactHealth {
    pub email_active: Option<bool>,
    pub phone_active: Option<bool>,
}

/// A delivery the provider accepted: its sent-log row (`deliveries_by_id`), which is also
/// its `sent` entry in the notification log and what webhooks and tracking look it up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    pub delivery_id: String,
    pub event_id: String,
    pub user_id: String,
    pub channel: String,
    pub category: String,
    /// `apns` | `fcm` | `twilio` | `vonage` | `sendgrid` | `mandrill`.
    pub provider: String,
    pub provider_message_id: String,
    pub attempt: i32,
    pub latency_ms: Option<i64>,
    /// Epoch milliseconds; also the `occurred_at` of its `sent` outcome.
    pub sent_at: i64,
    /// The id of its `sent` outcome (empty for rows written before migration 009).
    pub outcome_id: String,
}

/// One device of a user.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow, SerializeRow)]
pub struct Device {
    pub user_id: String,
    pub device_id: String,
    pub platform: String,
    #[scylla(rename = "push_token")]
    pub token: String,
    pub app_id: Option<String>,
    pub active: bool,
}

/// Everything the router needs of one user ([`Store::contacts_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRows {
    pub user: User,
    pub health: ContactHealth,
    pub devices: Vec<Device>,
    pub preferences: Vec<Preference>,
}

/// One preference row.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow, SerializeRow)]
pub struct Preference {
    pub user_id: String,
    pub channel: String,
    pub category: String,
    pub opt_in: bool,
}

/// Template metadata.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow, SerializeRow)]
pub struct Template {
    pub template_id: String,
    pub category: String,
    pub current_version: i32,
    pub default_channels: Vec<String>,
    pub tracking: bool,
    pub sample_params: HashMap<String, String>,
}

/// Template content for one version × channel × locale.
#[derive(Debug, Clone, PartialEq, Eq, Default, DeserializeRow, SerializeRow)]
pub struct TemplateContent {
    pub template_id: String,
    pub version: i32,
    pub channel: String,
    pub locale: String,
    pub title: Option<String>,
    pub body: Option<String>,
    pub subject: Option<String>,
    pub html: Option<String>,
    pub text: Option<String>,
    pub data: Option<HashMap<String, String>>,
}

/// Who first claimed an event id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, DeserializeRow)]
pub struct DedupClaim {
    pub source_topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One counted send in a throttle window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleHit {
    pub event_id: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A throttle hit to record for user × channel × category, kept for `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewThrottleHit {
    pub user_id: String,
    pub channel: String,
    pub category: String,
    pub hit: ThrottleHit,
    pub window: Duration,
}

/// Keys per `IN` read: one request instead of a hundred, still a small fan-out.
pub(crate) const IN_CHUNK: usize = 100;
/// Rows per unlogged write batch (a few KiB: under Scylla's and Cassandra's batch-size
/// warnings for herald's small rows).
pub(crate) const WRITE_CHUNK: usize = 20;
/// Requests one batch operation keeps in flight.
const IN_FLIGHT: usize = 64;

/// Runs `f` over `items` with at most [`IN_FLIGHT`] at a time; results in any order.
pub(crate) async fn bounded<'a, T, R, F, Fut>(items: &'a [T], f: F) -> Result<Vec<R>, StoreError>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = Result<R, StoreError>> + 'a,
{
    use futures::{StreamExt, TryStreamExt};
    // Futures collected first: a closure inside the stream type trips rustc's
    // higher-ranked lifetime check when the caller's future must be `Send`.
    let futures: Vec<Fut> = items.iter().map(f).collect();
    futures::stream::iter(futures).buffer_unordered(IN_FLIGHT).try_collect().await
}

/// One statement of a mixed write batch with its values.
pub(crate) type Row<'r> = (&'r PreparedStatement, Box<dyn scylla::serialize::row::SerializeRow + Send + Sync + 'r>);

/// Writes groups of rows in unlogged batches: a group never straddles two batches (rows of
/// one partition key travel together and land as one mutation), groups are packed up to
/// [`WRITE_CHUNK`] rows, [`IN_FLIGHT`] batches at a time. Every row must be an idempotent
/// upsert: a batch failing half-way is simply written again.
pub(crate) async fn write_grouped(session: &Session, groups: Vec<Vec<Row<'_>>>, op: &'static str) -> Result<(), StoreError> {
    let mut batches: Vec<Vec<Row<'_>>> = Vec::new();
    for rows in groups {
        match batches.last_mut() {
            Some(b) if b.len() + rows.len() <= WRITE_CHUNK => b.extend(rows),
            _ => batches.push(rows),
        }
    }
    bounded(&batches, |rows| async move {
        let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Unlogged);
        for (st, _) in rows {
            batch.append_statement((*st).clone());
        }
        batch.set_is_idempotent(true);
        let values: Vec<&(dyn scylla::serialize::row::SerializeRow + Send + Sync)> = rows.iter().map(|(_, v)| v.as_ref()).collect();
        session.batch(&batch, values).await.map_err(|e| query_err(op, e))?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// One row of the notification log.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow)]
pub struct LogEntry {
    pub event_id: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub outcome_id: String,
    pub delivery_id: Option<String>,
    pub user_id: Option<String>,
    pub category: Option<String>,
    pub channel: Option<String>,
    pub provider: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub provider_message_id: Option<String>,
    pub attempt: Option<i32>,
    /// Who asked for the notification (the request's `source`, e.g. `api:<app key>`); only
    /// on the router's rows.
    pub source: Option<String>,
}

pub(crate) type LogValues<'a> = (
    &'a str,
    chrono::DateTime<chrono::Utc>,
    &'a str,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    &'a str,
    &'a Option<String>,
    &'a Option<String>,
    i32,
    scylla::value::MaybeUnset<&'a str>,
);

/// A log row's values; `source` unset (not null: no tombstone) where the writer does not
/// know who asked.
pub(crate) fn log_values<'a>(o: &'a crate::model::DeliveryOutcome, source: Option<&'a str>) -> LogValues<'a> {
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(o.occurred_at).unwrap_or_else(chrono::Utc::now);
    (
        &o.event_id,
        at,
        &o.outcome_id,
        &o.delivery_id,
        &o.user_id,
        &o.category,
        &o.channel,
        &o.provider,
        &o.status,
        &o.reason,
        &o.provider_message_id,
        o.attempt,
        source.map_or(scylla::value::MaybeUnset::Unset, scylla::value::MaybeUnset::Set),
    )
}

/// The session plus every statement herald runs, prepared once at start-up.
pub struct Store {
    pub session: Arc<Session>,
    put_user: PreparedStatement,
    get_user: PreparedStatement,
    put_device: PreparedStatement,
    put_token_owner: PreparedStatement,
    token_owner: PreparedStatement,
    devices_of: PreparedStatement,
    put_preference: PreparedStatement,
    preferences_of: PreparedStatement,
    put_template: PreparedStatement,
    get_template: PreparedStatement,
    put_template_content: PreparedStatement,
    template_contents: PreparedStatement,
    claim_event: PreparedStatement,
    put_claim: PreparedStatement,
    get_claim: PreparedStatement,
    get_claims: PreparedStatement,
    users_in: PreparedStatement,
    devices_in: PreparedStatement,
    preferences_in: PreparedStatement,
    pub(crate) put_log: PreparedStatement,
    /// The sent-log (`deliveries_by_id`) of many deliveries; shared with the dispatcher's store.
    pub(crate) sent_in: PreparedStatement,
    log_of: PreparedStatement,
    throttle_hits_of_users: PreparedStatement,
    put_throttle_hit: PreparedStatement,
    pub(crate) deactivate_device: PreparedStatement,
    pub(crate) set_email_active: PreparedStatement,
    pub(crate) set_phone_active: PreparedStatement,
    contact_health: PreparedStatement,
    del_user: PreparedStatement,
    del_devices_of: PreparedStatement,
    del_device: PreparedStatement,
    del_token_owner: PreparedStatement,
    del_preferences_of: PreparedStatement,
}

impl Store {
    /// Connects to the configured keyspace (which `db migrate` must have created) and
    /// prepares every statement.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let session = connect(cfg, None).await?;
        let migrated = session
            .query_unpaged(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = 'schema_migrations'",
                (&cfg.keyspace,),
            )
            .await
            .map_err(|e| query_err("read schema", e))?
            .into_rows_result()
            .map_err(|e| query_err("read schema", e))?
            .rows_num()
            > 0;
        if !migrated {
            return Err(StoreError::NotMigrated(cfg.keyspace.clone()));
        }
        Store::prepare(Arc::new(session), &cfg.keyspace).await
    }

    /// [`Store::open`] for a long-running role: while the store is unreachable (or a
    /// statement cannot be prepared for a retryable reason) it waits, logging, and tries
    /// again until it succeeds or `shutdown` is cancelled; only a permanent error (the
    /// keyspace is not migrated, a statement is refused) is returned.
    pub async fn open_waiting(cfg: &StoreConfig, role: &'static str, shutdown: &tokio_util::sync::CancellationToken) -> Result<Store, StoreError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match Store::open(cfg).await {
                Ok(s) => {
                    crate::telemetry::events::waiting(role, "store", false);
                    return Ok(s);
                }
                Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                    crate::telemetry::events::waiting(role, "store", true);
                    tracing::warn!(error = %e, ?backoff, "waiting for the store");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Prepares every statement with keyspace-qualified table names (no `USE`, which
    /// Cassandra flags as ambiguous for prepared statements).
    async fn prepare(session: Arc<Session>, ks: &str) -> Result<Store, StoreError> {
        let qualify = |q: &str| q.replacen("INSERT INTO ", &format!("INSERT INTO {ks}."), 1).replacen(" FROM ", &format!(" FROM {ks}."), 1);
        let p = |q: &str| {
            let session = session.clone();
            let q = qualify(q);
            async move {
                let mut st = session.prepare(q).await.map_err(|e| query_err("prepare", e))?;
                // Every statement here is an upsert or a read: safe to retry or speculate.
                st.set_is_idempotent(true);
                Ok::<_, StoreError>(st)
            }
        };
        Ok(Store {
            put_user: p("INSERT INTO users (user_id, email, phone, locale, timezone, updated_at) VALUES (?, ?, ?, ?, ?, toTimestamp(now()))").await?,
            get_user: p("SELECT user_id, email, phone, locale, timezone FROM users WHERE user_id = ?").await?,
            put_device: p("INSERT INTO devices (user_id, device_id, platform, push_token, app_id, active, updated_at) VALUES (?, ?, ?, ?, ?, ?, toTimestamp(now()))").await?,
            put_token_owner: p("INSERT INTO devices_by_token (push_token, user_id, device_id, updated_at) VALUES (?, ?, ?, toTimestamp(now()))").await?,
            token_owner: p("SELECT user_id, device_id FROM devices_by_token WHERE push_token = ?").await?,
            devices_of: p("SELECT user_id, device_id, platform, push_token, app_id, active FROM devices WHERE user_id = ?").await?,
            put_preference: p("INSERT INTO preferences (user_id, channel, category, opt_in, updated_at) VALUES (?, ?, ?, ?, toTimestamp(now()))").await?,
            preferences_of: p("SELECT user_id, channel, category, opt_in FROM preferences WHERE user_id = ?").await?,
            put_template: p("INSERT INTO templates (template_id, category, current_version, default_channels, tracking, sample_params, updated_at) VALUES (?, ?, ?, ?, ?, ?, toTimestamp(now()))").await?,
            get_template: p("SELECT template_id, category, current_version, default_channels, tracking, sample_params FROM templates WHERE template_id = ?").await?,
            put_template_content: p("INSERT INTO template_contents (template_id, version, channel, locale, title, body, subject, html, text, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").await?,
            template_contents: p("SELECT template_id, version, channel, locale, title, body, subject, html, text, data FROM template_contents WHERE template_id = ? AND version = ?").await?,
            claim_event: {
                // A lightweight transaction: only the first claimant wins. Not idempotent.
                let mut st = session
                    .prepare(qualify("INSERT INTO dedup_claims (event_id, source_topic, partition, offset, claimed_at) VALUES (?, ?, ?, ?, toTimestamp(now())) IF NOT EXISTS USING TTL ?"))
                    .await
                    .map_err(|e| query_err("prepare", e))?;
                st.set_is_idempotent(false);
                st
            },
            put_claim: p("INSERT INTO dedup_claims (event_id, source_topic, partition, offset, claimed_at) VALUES (?, ?, ?, ?, toTimestamp(now())) USING TTL ?").await?,
            get_claim: p("SELECT source_topic, partition, offset FROM dedup_claims WHERE event_id = ?").await?,
            get_claims: p("SELECT event_id, source_topic, partition, offset FROM dedup_claims WHERE event_id IN ?").await?,
            users_in: p("SELECT user_id, email, phone, locale, timezone, email_active, phone_active FROM users WHERE user_id IN ?").await?,
            devices_in: p("SELECT user_id, device_id, platform, push_token, app_id, active FROM devices WHERE user_id IN ?").await?,
            preferences_in: p("SELECT user_id, channel, category, opt_in FROM preferences WHERE user_id IN ?").await?,
            put_log: p("INSERT INTO notification_log (event_id, recorded_at, outcome_id, delivery_id, user_id, category, channel, provider, status, reason, provider_message_id, attempt, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").await?,
            sent_in: p("SELECT delivery_id, event_id, user_id, channel, category, provider, provider_message_id, attempt, latency_ms, sent_at, outcome_id FROM deliveries_by_id WHERE delivery_id IN ?").await?,
            log_of: p("SELECT event_id, recorded_at, outcome_id, delivery_id, user_id, category, channel, provider, status, reason, provider_message_id, attempt, source FROM notification_log WHERE event_id = ?").await?,
            throttle_hits_of_users: p("SELECT user_id, channel, event_id, at FROM throttle_hits_by_user WHERE user_id IN ? AND category = ?").await?,
            put_throttle_hit: p("INSERT INTO throttle_hits_by_user (user_id, category, channel, event_id, at) VALUES (?, ?, ?, ?, ?) USING TTL ?").await?,
            deactivate_device: p(&format!("UPDATE {ks}.devices SET active = false, updated_at = toTimestamp(now()) WHERE user_id = ? AND device_id = ?")).await?,
            set_email_active: p(&format!("UPDATE {ks}.users SET email_active = ? WHERE user_id = ?")).await?,
            set_phone_active: p(&format!("UPDATE {ks}.users SET phone_active = ? WHERE user_id = ?")).await?,
            contact_health: p("SELECT email_active, phone_active FROM users WHERE user_id = ?").await?,
            del_user: p("DELETE FROM users WHERE user_id = ?").await?,
            del_devices_of: p("DELETE FROM devices WHERE user_id = ?").await?,
            del_device: p("DELETE FROM devices WHERE user_id = ? AND device_id = ?").await?,
            del_token_owner: p("DELETE FROM devices_by_token WHERE push_token = ?").await?,
            del_preferences_of: p("DELETE FROM preferences WHERE user_id = ?").await?,
            session,
        })
    }

    pub async fn put_user(&self, u: &User) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.put_user, u).await.map_err(|e| query_err("put user", e))?;
        Ok(())
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        self.first_row::<User, _>(&self.get_user, (user_id,), "get user").await
    }

    /// Writes a device and its token index together (a logged batch: both or neither).
    pub async fn put_device(&self, d: &Device) -> Result<(), StoreError> {
        let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Logged);
        batch.append_statement(self.put_device.clone());
        batch.append_statement(self.put_token_owner.clone());
        batch.set_is_idempotent(true);
        self.session.batch(&batch, (d, (&d.token, &d.user_id, &d.device_id))).await.map_err(|e| query_err("put device", e))?;
        Ok(())
    }

    /// The contact data of many users at once: their rows, health, devices and preferences
    /// in three `IN` reads per [`IN_CHUNK`] users (a cache filling up would otherwise make
    /// four requests per user). Users without a row are missing from the map.
    pub async fn contacts_of(&self, users: &[&str]) -> Result<HashMap<String, ContactRows>, StoreError> {
        type UserRow = (String, Option<String>, Option<String>, Option<String>, Option<String>, Option<bool>, Option<bool>);
        let chunks: Vec<&[&str]> = users.chunks(IN_CHUNK).collect();
        let (found, devices, prefs) = tokio::try_join!(
            bounded(&chunks, |ids| async move { self.rows::<UserRow, _>(&self.users_in, (ids,), "users").await }),
            bounded(&chunks, |ids| async move { self.rows::<Device, _>(&self.devices_in, (ids,), "devices of users").await }),
            bounded(&chunks, |ids| async move { self.rows::<Preference, _>(&self.preferences_in, (ids,), "preferences of users").await }),
        )?;
        let mut out: HashMap<String, ContactRows> = found
            .into_iter()
            .flatten()
            .map(|(user_id, email, phone, locale, timezone, email_active, phone_active)| {
                let user = User { user_id: user_id.clone(), email, phone, locale, timezone };
                (user_id, ContactRows { user, health: ContactHealth { email_active, phone_active }, devices: Vec::new(), preferences: Vec::new() })
            })
            .collect();
        for d in devices.into_iter().flatten() {
            if let Some(c) = out.get_mut(&d.user_id) {
                c.devices.push(d);
            }
        }
        for p in prefs.into_iter().flatten() {
            if let Some(c) = out.get_mut(&p.user_id) {
                c.preferences.push(p);
            }
        }
        Ok(out)
    }

    /// Which user and device a push token is registered to.
    pub async fn token_owner(&self, token: &str) -> Result<Option<(String, String)>, StoreError> {
        self.first_row::<(String, String), _>(&self.token_owner, (token,), "token owner").await
    }

    /// Every device of a user, active or not.
    pub async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        self.rows(&self.devices_of, (user_id,), "devices of user").await
    }

    pub async fn put_preference(&self, p: &Preference) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.put_preference, p).await.map_err(|e| query_err("put preference", e))?;
        Ok(())
    }

    pub async fn preferences(&self, user_id: &str) -> Result<Vec<Preference>, StoreError> {
        self.rows(&self.preferences_of, (user_id,), "preferences of user").await
    }

    pub async fn put_template(&self, t: &Template) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.put_template, t).await.map_err(|e| query_err("put template", e))?;
        Ok(())
    }

    pub async fn template(&self, template_id: &str) -> Result<Option<Template>, StoreError> {
        self.first_row::<Template, _>(&self.get_template, (template_id,), "get template").await
    }

    pub async fn put_template_content(&self, c: &TemplateContent) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.put_template_content, c).await.map_err(|e| query_err("put template content", e))?;
        Ok(())
    }

    /// All channel × locale contents of one template version.
    pub async fn template_contents(&self, template_id: &str, version: i32) -> Result<Vec<TemplateContent>, StoreError> {
        self.rows(&self.template_contents, (template_id, version), "template contents").await
    }

    /// Claims `event_id` for the record at (topic, partition, offset). Returns the owner:
    /// the given record if the claim is new, otherwise whoever claimed it first.
    pub async fn claim_event(&self, event_id: &str, topic: &str, partition: i32, offset: i64, ttl: Duration) -> Result<DedupClaim, StoreError> {
        let ttl = ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        let r = self
            .session
            .execute_unpaged(&self.claim_event, (event_id, topic, partition, offset, ttl))
            .await
            .map_err(|e| query_err("claim event", e))?;
        // An LWT answers with `[applied]` first (then, when not applied, the existing row).
        let rows = r.into_rows_result().map_err(|e| query_err("claim event", e))?;
        let applied = rows
            .rows::<scylla::value::Row>()
            .map_err(|e| query_err("claim event", e))?
            .next()
            .and_then(|row| row.ok())
            .and_then(|row| row.columns.into_iter().next().flatten())
            .and_then(|v| v.as_boolean())
            .ok_or_else(|| query_err("claim event", "LWT answer without [applied]"))?;
        if applied {
            return Ok(DedupClaim { source_topic: topic.into(), partition, offset });
        }
        self.claim(event_id).await?.ok_or_else(|| query_err("claim event", "claim expired between write and read"))
    }

    /// Claims many event ids at once with [`Store::claim_event`] (one lightweight
    /// transaction each, run concurrently): event id → owner.
    pub async fn claim_events(&self, claims: &[(&str, DedupClaim)], ttl: Duration) -> Result<HashMap<String, DedupClaim>, StoreError> {
        let owners = bounded(claims, |(id, c)| async move {
            let owner = self.claim_event(id, &c.source_topic, c.partition, c.offset, ttl).await?;
            Ok((id.to_string(), owner))
        })
        .await?;
        Ok(owners.into_iter().collect())
    }

    /// The existing claims of `event_ids` (absent ids are missing from the map): the read
    /// half of the claim when one writer owns each event id at a time
    /// (`router.dedup_mode` `keyed` or `single_writer`; see [`Store::put_claims`]).
    pub async fn claims(&self, event_ids: &[&str]) -> Result<HashMap<String, DedupClaim>, StoreError> {
        let chunks: Vec<&[&str]> = event_ids.chunks(IN_CHUNK).collect();
        let found =
            bounded(&chunks, |ids| async move { self.rows::<(String, String, i32, i64), _>(&self.get_claims, (ids,), "get claims").await }).await?;
        Ok(found.into_iter().flatten().map(|(id, source_topic, partition, offset)| (id, DedupClaim { source_topic, partition, offset })).collect())
    }

    /// Writes claims without a lightweight transaction (the write half of
    /// [`Store::claims`]): safe when one writer owns each event id at a time.
    pub async fn put_claims(&self, claims: &[(&str, DedupClaim)], ttl: Duration) -> Result<(), StoreError> {
        let ttl = ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        let rows: Vec<_> = claims.iter().map(|(id, c)| (*id, &c.source_topic, c.partition, c.offset, ttl)).collect();
        self.write_rows(&self.put_claim, rows, "put claims").await
    }

    pub async fn claim(&self, event_id: &str) -> Result<Option<DedupClaim>, StoreError> {
        self.first_row::<DedupClaim, _>(&self.get_claim, (event_id,), "get claim").await
    }

    /// Writes outcomes to the notification log: one unlogged batch per event (one partition).
    pub async fn log_outcomes(&self, outcomes: &[crate::model::DeliveryOutcome]) -> Result<(), StoreError> {
        // Sorted so one event's outcomes share a batch as far as possible.
        let mut sorted: Vec<&crate::model::DeliveryOutcome> = outcomes.iter().collect();
        sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        self.write_rows(&self.put_log, sorted.into_iter().map(|o| log_values(o, None)).collect(), "log outcomes").await
    }

    /// Writes what routing a batch of events decided, partition by partition: an event's
    /// dedup claim (if any) and its notification-log rows share the partition key
    /// `event_id`, so they go in one batch and reach the store as one mutation (one
    /// commit-log entry) instead of one per table. Batches hold whole events, up to
    /// [`WRITE_CHUNK`] rows, [`IN_FLIGHT`] at a time; every write is an idempotent upsert.
    /// Each outcome comes with the request's `source` (who asked), when known.
    pub async fn record_events(
        &self,
        claims: &[(&str, DedupClaim)],
        claim_ttl: Duration,
        outcomes: &[(crate::model::DeliveryOutcome, Option<String>)],
    ) -> Result<(), StoreError> {
        let ttl = claim_ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        let mut by_event: std::collections::BTreeMap<&str, Vec<Row<'_>>> = Default::default();
        for (id, c) in claims {
            by_event.entry(id).or_default().push((&self.put_claim, Box::new((*id, c.source_topic.as_str(), c.partition, c.offset, ttl))));
        }
        for (o, source) in outcomes {
            by_event.entry(o.event_id.as_str()).or_default().push((&self.put_log, Box::new(log_values(o, source.as_deref()))));
        }
        write_grouped(&self.session, by_event.into_values().collect(), "record events").await
    }

    /// Writes many rows with one statement: unlogged batches of [`WRITE_CHUNK`] rows (one
    /// request each instead of one per row), [`IN_FLIGHT`] at a time. Every write here is an
    /// idempotent upsert, so a batch failing half-way is simply written again.
    async fn write_rows<V: scylla::serialize::row::SerializeRow + Sync>(
        &self,
        st: &PreparedStatement,
        rows: Vec<V>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        if let [one] = rows.as_slice() {
            self.session.execute_unpaged(st, one).await.map_err(|e| query_err(op, e))?;
            return Ok(());
        }
        let chunks: Vec<&[V]> = rows.chunks(WRITE_CHUNK).collect();
        bounded(&chunks, |chunk| async move {
            let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Unlogged);
            for _ in 0..chunk.len() {
                batch.append_statement(st.clone());
            }
            batch.set_is_idempotent(true);
            self.session.batch(&batch, *chunk).await.map_err(|e| query_err(op, e))?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Appends an outcome to the notification log.
    pub async fn log_outcome(&self, o: &crate::model::DeliveryOutcome) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.put_log, log_values(o, None)).await.map_err(|e| query_err("log outcome", e))?;
        Ok(())
    }

    /// Every outcome recorded for an event, oldest first: its notification-log rows, and
    /// the `sent` entry of each delivery they name (the router's `routed` rows name every
    /// delivery), which is the delivery's sent-log row (`deliveries_by_id`, migration 009).
    pub async fn log(&self, event_id: &str) -> Result<Vec<LogEntry>, StoreError> {
        let mut rows: Vec<LogEntry> = self.rows(&self.log_of, (event_id,), "notification log").await?;
        let mut deliveries: Vec<&str> = rows.iter().filter_map(|r| r.delivery_id.as_deref()).collect();
        deliveries.sort();
        deliveries.dedup();
        let sent = self.sent_log(&deliveries).await?;
        let logged: std::collections::HashSet<&str> = rows.iter().map(|r| r.outcome_id.as_str()).collect();
        let mut add: Vec<LogEntry> = sent
            .into_iter()
            .filter(|s| s.event_id == event_id && !logged.contains(s.outcome_id.as_str()))
            .map(|s| LogEntry {
                event_id: s.event_id,
                recorded_at: chrono::DateTime::<chrono::Utc>::from_timestamp_millis(s.sent_at).unwrap_or_default(),
                outcome_id: s.outcome_id,
                delivery_id: Some(s.delivery_id),
                user_id: Some(s.user_id),
                category: Some(s.category),
                channel: Some(s.channel),
                provider: Some(s.provider),
                status: "sent".into(),
                reason: None,
                provider_message_id: Some(s.provider_message_id),
                attempt: Some(s.attempt),
                source: None,
            })
            .collect();
        rows.append(&mut add);
        rows.sort_by(|a, b| (a.recorded_at, &a.outcome_id).cmp(&(b.recorded_at, &b.outcome_id)));
        Ok(rows)
    }

    /// The sent-log rows of `delivery_ids` (absent ids have none).
    pub async fn sent_log(&self, delivery_ids: &[&str]) -> Result<Vec<SentRecord>, StoreError> {
        type SentRow = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i32>,
            Option<i64>,
            Option<chrono::DateTime<chrono::Utc>>,
            Option<String>,
        );
        let chunks: Vec<&[&str]> = delivery_ids.chunks(IN_CHUNK).collect();
        let found = bounded(&chunks, |ids| async move { self.rows::<SentRow, _>(&self.sent_in, (ids,), "sent-log").await }).await?;
        Ok(found
            .into_iter()
            .flatten()
            .map(|(delivery_id, event_id, user_id, channel, category, provider, message_id, attempt, latency_ms, sent_at, outcome_id)| SentRecord {
                delivery_id,
                event_id: event_id.unwrap_or_default(),
                user_id: user_id.unwrap_or_default(),
                channel: channel.unwrap_or_default(),
                category: category.unwrap_or_default(),
                provider: provider.unwrap_or_default(),
                provider_message_id: message_id.unwrap_or_default(),
                attempt: attempt.unwrap_or(0),
                latency_ms,
                sent_at: sent_at.map(|t| t.timestamp_millis()).unwrap_or(0),
                outcome_id: outcome_id.unwrap_or_default(),
            })
            .collect())
    }

    /// Marks a user's email (`channel = "email"`) or phone (`"sms"`) as working or dead.
    pub async fn set_contact_active(&self, user_id: &str, channel: &str, active: bool) -> Result<(), StoreError> {
        let st = match channel {
            "email" => &self.set_email_active,
            "sms" => &self.set_phone_active,
            other => return Err(StoreError::Query { op: "set contact active", detail: format!("no contact for channel {other}"), retryable: false }),
        };
        self.session.execute_unpaged(st, (active, user_id)).await.map_err(|e| query_err("set contact active", e))?;
        Ok(())
    }

    /// Whether a user's email and phone still work.
    pub async fn contact_health(&self, user_id: &str) -> Result<ContactHealth, StoreError> {
        Ok(self.first_row::<ContactHealth, _>(&self.contact_health, (user_id,), "contact health").await?.unwrap_or_default())
    }

    /// The throttle hits of `users` in one category, every channel: (user, channel) → (event
    /// id, when); one partition per user. Pairs without hits are missing from the map.
    pub async fn throttle_hits(&self, category: &str, users: &[&str]) -> Result<HashMap<(String, String), Vec<ThrottleHit>>, StoreError> {
        let chunks: Vec<&[&str]> = users.chunks(IN_CHUNK).collect();
        let found = bounded(&chunks, |ids| async move {
            self.rows::<(String, String, String, chrono::DateTime<chrono::Utc>), _>(&self.throttle_hits_of_users, (ids, category), "throttle hits")
                .await
        })
        .await?;
        let mut by_user: HashMap<(String, String), Vec<ThrottleHit>> = HashMap::new();
        for (user, channel, event_id, at) in found.into_iter().flatten() {
            by_user.entry((user, channel)).or_default().push(ThrottleHit { event_id, at });
        }
        Ok(by_user)
    }

    /// Records admitted sends against their limits; each row lives for its window. Sorted by
    /// partition (user × category), so a user's hits on several channels travel in one batch
    /// and land as one mutation.
    pub async fn put_throttle_hits(&self, hits: &[NewThrottleHit]) -> Result<(), StoreError> {
        let mut sorted: Vec<&NewThrottleHit> = hits.iter().collect();
        sorted.sort_by(|a, b| (&a.user_id, &a.category).cmp(&(&b.user_id, &b.category)));
        let rows: Vec<_> = sorted
            .into_iter()
            .map(|h| (&h.user_id, &h.category, &h.channel, &h.hit.event_id, h.hit.at, h.window.as_secs().clamp(1, i32::MAX as u64) as i32))
            .collect();
        self.write_rows(&self.put_throttle_hit, rows, "throttle hits").await
    }

    /// Deletes a user with every device (and the token index entries those devices still
    /// own) and every preference, in one logged batch.
    pub async fn delete_user(&self, user_id: &str) -> Result<(), StoreError> {
        let devices = self.devices(user_id).await?;
        let mut owned = Vec::new();
        for d in &devices {
            if self.token_owner(&d.token).await?.is_some_and(|(u, dev)| u == user_id && dev == d.device_id) {
                owned.push(d.token.clone());
            }
        }
        let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Logged);
        let mut values: Vec<Vec<String>> = Vec::new();
        for st in [&self.del_user, &self.del_devices_of, &self.del_preferences_of] {
            batch.append_statement(st.clone());
            values.push(vec![user_id.to_string()]);
        }
        for token in owned {
            batch.append_statement(self.del_token_owner.clone());
            values.push(vec![token]);
        }
        batch.set_is_idempotent(true);
        self.session.batch(&batch, values).await.map_err(|e| query_err("delete user", e))?;
        Ok(())
    }

    /// Deletes one device of a user, and the token index entry if it still points at it.
    pub async fn delete_device(&self, user_id: &str, device_id: &str, token: &str) -> Result<(), StoreError> {
        let owns = self.token_owner(token).await?.is_some_and(|(u, d)| u == user_id && d == device_id);
        let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Logged);
        batch.append_statement(self.del_device.clone());
        let mut values: Vec<Vec<String>> = vec![vec![user_id.to_string(), device_id.to_string()]];
        if owns {
            batch.append_statement(self.del_token_owner.clone());
            values.push(vec![token.to_string()]);
        }
        batch.set_is_idempotent(true);
        self.session.batch(&batch, values).await.map_err(|e| query_err("delete device", e))?;
        Ok(())
    }

    async fn first_row<R, V>(&self, st: &PreparedStatement, values: V, op: &'static str) -> Result<Option<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
        V: scylla::serialize::row::SerializeRow,
    {
        let r = self.session.execute_unpaged(st, values).await.map_err(|e| query_err(op, e))?;
        r.into_rows_result().map_err(|e| query_err(op, e))?.maybe_first_row::<R>().map_err(|e| query_err(op, e))
    }

    async fn rows<R, V>(&self, st: &PreparedStatement, values: V, op: &'static str) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
        V: scylla::serialize::row::SerializeRow,
    {
        let r = self.session.execute_unpaged(st, values).await.map_err(|e| query_err(op, e))?;
        let rows = r.into_rows_result().map_err(|e| query_err(op, e))?;
        rows.rows::<R>().map_err(|e| query_err(op, e))?.collect::<Result<Vec<R>, _>>().map_err(|e| query_err(op, e))
    }
}
