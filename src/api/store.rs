//! The API's own CQL statements (tables of `cql/005_api.cql`), prepared once, beside the
//! shared [`crate::store::Store`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use crate::store::{query_err, StoreError, Template};

/// One row of `api_apps` (the secret still encrypted).
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow)]
pub struct AppRow {
    pub app_key: String,
    pub name: Option<String>,
    pub secret_enc: Option<String>,
    pub previous_secret_enc: Option<String>,
    pub previous_valid_until: Option<DateTime<Utc>>,
    pub scopes: Option<HashSet<String>>,
    pub categories: Option<HashSet<String>>,
    pub rate_limit: Option<i32>,
    pub created_at: Option<DateTime<Utc>>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Where a delivery id (or a provider's message id) leads.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow)]
pub struct DeliveryRef {
    pub delivery_id: String,
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    pub channel: Option<String>,
    pub category: Option<String>,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
}

/// A remembered `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow)]
pub struct IdempotencyRow {
    pub request_hash: String,
    pub event_ids: Vec<String>,
}

const APP_COLUMNS: &str =
    "app_key, name, secret_enc, previous_secret_enc, previous_valid_until, scopes, categories, rate_limit, created_at, rotated_at, revoked_at";

pub struct ApiStore {
    session: Arc<Session>,
    put_app: PreparedStatement,
    get_app: PreparedStatement,
    list_apps: PreparedStatement,
    rotate_app: PreparedStatement,
    revoke_app: PreparedStatement,
    get_idem: PreparedStatement,
    put_idem: PreparedStatement,
    delivery_ref: PreparedStatement,
    provider_message: PreparedStatement,
    list_templates: PreparedStatement,
    claim_version: PreparedStatement,
    versions_of: PreparedStatement,
    create_template: PreparedStatement,
    advance_template: PreparedStatement,
    put_signature: PreparedStatement,
    signature_claimants: PreparedStatement,
    webhook_seen: PreparedStatement,
    put_webhook_event: PreparedStatement,
    ping: PreparedStatement,
}

impl ApiStore {
    /// Prepares the statements against `keyspace` (migrated to 010) on `session`.
    pub async fn prepare(session: Arc<Session>, ks: &str) -> Result<ApiStore, StoreError> {
        let p = |q: String, idempotent: bool| {
            let session = session.clone();
            async move {
                let mut st = session.prepare(q).await.map_err(|e| query_err("prepare", e))?;
                st.set_is_idempotent(idempotent);
                Ok::<_, StoreError>(st)
            }
        };
        let t = "sample_params";
        Ok(ApiStore {
            put_app: p(format!("INSERT INTO {ks}.api_apps ({APP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"), true).await?,
            get_app: p(format!("SELECT {APP_COLUMNS} FROM {ks}.api_apps WHERE app_key = ?"), true).await?,
            list_apps: p(format!("SELECT {APP_COLUMNS} FROM {ks}.api_apps"), true).await?,
            rotate_app: p(format!("UPDATE {ks}.api_apps SET secret_enc = ?, previous_secret_enc = ?, previous_valid_until = ?, rotated_at = ? WHERE app_key = ?"), true).await?,
            revoke_app: p(format!("UPDATE {ks}.api_apps SET revoked_at = ? WHERE app_key = ?"), true).await?,
            get_idem: p(format!("SELECT request_hash, event_ids FROM {ks}.api_idempotency WHERE app_key = ? AND idempotency_key = ?"), true).await?,
            put_idem: p(format!("INSERT INTO {ks}.api_idempotency (app_key, idempotency_key, request_hash, event_ids, created_at) VALUES (?, ?, ?, ?, toTimestamp(now())) USING TTL ?"), true).await?,
            delivery_ref: p(format!("SELECT delivery_id, event_id, user_id, channel, category, provider, provider_message_id FROM {ks}.deliveries_by_id WHERE delivery_id = ?"), true).await?,
            provider_message: p(format!("SELECT delivery_id, event_id, user_id, channel, category, provider, provider_message_id FROM {ks}.provider_messages WHERE provider = ? AND provider_message_id = ?"), true).await?,
            list_templates: p(format!("SELECT template_id, category, current_version, default_channels, tracking, {t} FROM {ks}.templates LIMIT 1000"), true).await?,
            claim_version: p(format!("INSERT INTO {ks}.template_versions (template_id, version, created_at, created_by) VALUES (?, ?, toTimestamp(now()), ?) IF NOT EXISTS"), false).await?,
            versions_of: p(format!("SELECT version, created_at, created_by FROM {ks}.template_versions WHERE template_id = ?"), true).await?,
            create_template: p(format!("INSERT INTO {ks}.templates (template_id, category, current_version, default_channels, tracking, {t}, updated_at) VALUES (?, ?, ?, ?, ?, ?, toTimestamp(now())) IF NOT EXISTS"), false).await?,
            advance_template: p(format!("UPDATE {ks}.templates SET category = ?, current_version = ?, default_channels = ?, tracking = ?, {t} = ?, updated_at = toTimestamp(now()) WHERE template_id = ? IF current_version < ?"), false).await?,
            put_signature: p(format!("INSERT INTO {ks}.api_signatures (app_key, signature, claimant, claimed_at) VALUES (?, ?, ?, toTimestamp(now())) USING TTL ?"), true).await?,
            signature_claimants: p(format!("SELECT claimant FROM {ks}.api_signatures WHERE app_key = ? AND signature = ? LIMIT 2"), true).await?,
            webhook_seen: p(format!("SELECT outcome_id FROM {ks}.webhook_events WHERE outcome_id IN ?"), true).await?,
            put_webhook_event: p(format!("INSERT INTO {ks}.webhook_events (outcome_id, provider, recorded_at) VALUES (?, ?, toTimestamp(now())) USING TTL ?"), true).await?,
            ping: p("SELECT release_version FROM system.local".to_string(), true).await?,
            session,
        })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.ping, ()).await.map_err(|e| query_err("ping", e))?;
        Ok(())
    }

    pub async fn put_app(&self, row: &AppRow) -> Result<(), StoreError> {
        let r = row;
        self.session
            .execute_unpaged(
                &self.put_app,
                (
                    &r.app_key,
                    &r.name,
                    &r.secret_enc,
                    &r.previous_secret_enc,
                    r.previous_valid_until,
                    &r.scopes,
                    &r.categories,
                    r.rate_limit,
                    r.created_at,
                    r.rotated_at,
                    r.revoked_at,
                ),
            )
            .await
            .map_err(|e| query_err("put app", e))?;
        Ok(())
    }

    pub async fn app(&self, key: &str) -> Result<Option<AppRow>, StoreError> {
        let r = self.session.execute_unpaged(&self.get_app, (key,)).await.map_err(|e| query_err("get app", e))?;
        r.into_rows_result().map_err(|e| query_err("get app", e))?.maybe_first_row::<AppRow>().map_err(|e| query_err("get app", e))
    }

    pub async fn apps(&self) -> Result<Vec<AppRow>, StoreError> {
        self.rows(&self.list_apps, (), "list apps").await
    }

    pub async fn rotate_app(
        &self,
        key: &str,
        secret_enc: &str,
        previous_enc: Option<&str>,
        previous_valid_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.rotate_app, (secret_enc, previous_enc, previous_valid_until, Utc::now(), key))
            .await
            .map_err(|e| query_err("rotate app", e))?;
        Ok(())
    }

    pub async fn revoke_app(&self, key: &str) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.revoke_app, (Utc::now(), key)).await.map_err(|e| query_err("revoke app", e))?;
        Ok(())
    }

    pub async fn idempotency(&self, app_key: &str, key: &str) -> Result<Option<IdempotencyRow>, StoreError> {
        let r = self.session.execute_unpaged(&self.get_idem, (app_key, key)).await.map_err(|e| query_err("get idempotency key", e))?;
        r.into_rows_result()
            .map_err(|e| query_err("get idempotency key", e))?
            .maybe_first_row::<IdempotencyRow>()
            .map_err(|e| query_err("get idempotency key", e))
    }

    pub async fn put_idempotency(&self, app_key: &str, key: &str, request_hash: &str, event_ids: &[String], ttl: Duration) -> Result<(), StoreError> {
        let ttl = ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        self.session
            .execute_unpaged(&self.put_idem, (app_key, key, request_hash, event_ids, ttl))
            .await
            .map_err(|e| query_err("put idempotency key", e))?;
        Ok(())
    }

    pub async fn delivery(&self, delivery_id: &str) -> Result<Option<DeliveryRef>, StoreError> {
        let r = self.session.execute_unpaged(&self.delivery_ref, (delivery_id,)).await.map_err(|e| query_err("delivery ref", e))?;
        r.into_rows_result().map_err(|e| query_err("delivery ref", e))?.maybe_first_row::<DeliveryRef>().map_err(|e| query_err("delivery ref", e))
    }

    pub async fn provider_message(&self, provider: &str, id: &str) -> Result<Option<DeliveryRef>, StoreError> {
        let r = self.session.execute_unpaged(&self.provider_message, (provider, id)).await.map_err(|e| query_err("provider message", e))?;
        r.into_rows_result()
            .map_err(|e| query_err("provider message", e))?
            .maybe_first_row::<DeliveryRef>()
            .map_err(|e| query_err("provider message", e))
    }

    /// Which of `outcome_ids` a webhook already emitted.
    pub async fn webhook_events_seen(&self, outcome_ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        let mut seen = HashSet::new();
        for chunk in outcome_ids.chunks(crate::store::IN_CHUNK) {
            let rows: Vec<(String,)> = self.rows(&self.webhook_seen, (chunk,), "webhook events").await?;
            seen.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(seen)
    }

    /// Remembers emitted webhook outcomes for `ttl`.
    pub async fn put_webhook_events(&self, provider: &str, outcome_ids: &[&str], ttl: Duration) -> Result<(), StoreError> {
        let ttl = ttl.as_secs().clamp(1, i32::MAX as u64) as i32;
        let writes = outcome_ids.iter().map(|id| self.session.execute_unpaged(&self.put_webhook_event, (*id, provider, ttl)));
        futures::future::try_join_all(writes).await.map_err(|e| query_err("put webhook events", e))?;
        Ok(())
    }

    /// Up to 1000 templates, sorted by id.
    pub async fn templates(&self) -> Result<Vec<Template>, StoreError> {
        let mut t: Vec<Template> = self.rows(&self.list_templates, (), "list templates").await?;
        t.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        Ok(t)
    }

    /// Claims `version` of a template; `false` when someone else has it.
    pub async fn claim_version(&self, template_id: &str, version: i32, by: &str) -> Result<bool, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.claim_version, (template_id, version, by))
            .await
            .map_err(|e| query_err("claim template version", e))?;
        lwt_applied(r, "claim template version")
    }

    /// Claims a request signature of `app_key` for `ttl` (`api.replay_guard = "shared"`):
    /// writes a claim of its own, then reads the signature's claims (both at the session's
    /// LOCAL_QUORUM); `true` only when this claim is the only one. No lightweight
    /// transaction: of processes racing for one signature at most one sees only its own
    /// claim (a quorum read sees every quorum write completed before it), and overlapping
    /// ones all refuse. LOCAL_QUORUM holds this within one data centre: API replicas in
    /// several data centres need the session at QUORUM. `false` is a replay, or a race with
    /// one.
    pub async fn claim_signature(&self, app_key: &str, signature: &str, ttl: Duration) -> Result<bool, StoreError> {
        let claimant = uuid::Uuid::new_v4().simple().to_string();
        let ttl = i32::try_from(ttl.as_secs()).unwrap_or(i32::MAX);
        self.session.execute_unpaged(&self.put_signature, (app_key, signature, &claimant, ttl)).await.map_err(|e| query_err("claim signature", e))?;
        let claims: Vec<(String,)> = self.rows(&self.signature_claimants, (app_key, signature), "read signature claims").await?;
        Ok(only_claimant(&claims, &claimant))
    }

    /// Claimed versions of a template, newest first: (version, created_at, created_by).
    pub async fn versions(&self, template_id: &str) -> Result<Vec<(i32, Option<DateTime<Utc>>, Option<String>)>, StoreError> {
        self.rows(&self.versions_of, (template_id,), "template versions").await
    }

    /// Writes a new template's metadata; `false` when it already exists.
    pub async fn create_template(&self, t: &Template) -> Result<bool, StoreError> {
        let r = self
            .session
            .execute_unpaged(
                &self.create_template,
                (&t.template_id, &t.category, t.current_version, &t.default_channels, t.tracking, &t.sample_params),
            )
            .await
            .map_err(|e| query_err("create template", e))?;
        lwt_applied(r, "create template")
    }

    /// Points the template at `t.current_version` unless it already points at it or a newer one.
    pub async fn advance_template(&self, t: &Template) -> Result<bool, StoreError> {
        let r = self
            .session
            .execute_unpaged(
                &self.advance_template,
                (&t.category, t.current_version, &t.default_channels, t.tracking, &t.sample_params, &t.template_id, t.current_version),
            )
            .await
            .map_err(|e| query_err("advance template", e))?;
        lwt_applied(r, "advance template")
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

/// Whether `mine` is the one and only claim read back.
fn only_claimant(claims: &[(String,)], mine: &str) -> bool {
    matches!(claims, [(c,)] if c == mine)
}

/// The `[applied]` column of an LWT answer.
fn lwt_applied(r: scylla::response::query_result::QueryResult, op: &'static str) -> Result<bool, StoreError> {
    let rows = r.into_rows_result().map_err(|e| query_err(op, e))?;
    rows.rows::<scylla::value::Row>()
        .map_err(|e| query_err(op, e))?
        .next()
        .and_then(|row| row.ok())
        .and_then(|row| row.columns.into_iter().next().flatten())
        .and_then(|v| v.as_boolean())
        .ok_or_else(|| query_err(op, "LWT answer without [applied]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_ours_only_when_our_claim_is_alone() {
        let c = |v: &[&str]| v.iter().map(|s| (s.to_string(),)).collect::<Vec<_>>();
        assert!(only_claimant(&c(&["a"]), "a"));
        assert!(!only_claimant(&c(&["b"]), "a"), "someone else's claim alone (ours not yet visible): refuse");
        assert!(!only_claimant(&c(&["a", "b"]), "a"), "claimed before, or a race: refuse");
        assert!(!only_claimant(&c(&[]), "a"), "our own write not read back: refuse");
    }
}
