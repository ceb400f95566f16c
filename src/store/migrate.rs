//! `herald db migrate`: creates the keyspace, then applies the versioned `cql/NNN_name.cql`
//! files not yet recorded in `schema_migrations`, in order, each recorded with its checksum.
//!
//! Migrations are built into the binary; a test checks the list matches `cql/`. A migration
//! that changed after it ran is an error, never silently re-run.

use std::time::Duration;

use scylla::client::session::Session;
use sha2::{Digest, Sha256};

use super::{connect, query_err, StoreError};
use crate::config::StoreConfig;

/// A versioned migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub cql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "001_contacts_templates", cql: include_str!("../../cql/001_contacts_templates.cql") },
    Migration { version: 2, name: "002_dedup_log", cql: include_str!("../../cql/002_dedup_log.cql") },
    Migration { version: 3, name: "003_throttle", cql: include_str!("../../cql/003_throttle.cql") },
    Migration { version: 4, name: "004_dispatch", cql: include_str!("../../cql/004_dispatch.cql") },
    Migration { version: 5, name: "005_api", cql: include_str!("../../cql/005_api.cql") },
    Migration { version: 6, name: "006_log_source", cql: include_str!("../../cql/006_log_source.cql") },
    Migration { version: 7, name: "007_throttle_by_user", cql: include_str!("../../cql/007_throttle_by_user.cql") },
    Migration { version: 8, name: "008_api_signatures", cql: include_str!("../../cql/008_api_signatures.cql") },
    Migration { version: 9, name: "009_dispatch_commit", cql: include_str!("../../cql/009_dispatch_commit.cql") },
    Migration { version: 10, name: "010_webhook_events", cql: include_str!("../../cql/010_webhook_events.cql") },
];

impl Migration {
    pub fn checksum(&self) -> String {
        hex::encode(&Sha256::digest(self.cql.as_bytes())[..12])
    }

    /// The statements of the file: comments stripped, split on `;`.
    pub fn statements(&self) -> Vec<String> {
        let without_comments: String = self
            .cql
            .lines()
            .map(|l| match l.find("--") {
                Some(i) => &l[..i],
                None => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        without_comments.split(';').map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|s| !s.is_empty()).collect()
    }
}

/// What `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub keyspace_created: bool,
    pub applied: Vec<String>,
    pub already: Vec<String>,
}

/// Creates the keyspace if needed and applies pending migrations. Idempotent.
pub async fn migrate(cfg: &StoreConfig) -> Result<MigrateReport, StoreError> {
    let session = connect(cfg, None).await?;
    let ks = &cfg.keyspace;
    let mut report = MigrateReport::default();
    let exists = session
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?", (ks,))
        .await
        .map_err(|e| query_err("read keyspaces", e))?
        .into_rows_result()
        .map_err(|e| query_err("read keyspaces", e))?
        .rows_num()
        > 0;
    if !exists {
        ddl(&session, &format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}", cfg.replication)).await?;
        report.keyspace_created = true;
    }
    session.use_keyspace(ks, false).await.map_err(|e| query_err("use keyspace", e))?;
    ddl(&session, "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text, checksum text, applied_at timestamp)").await?;
    let applied: Vec<(i32, String, String)> = session
        .query_unpaged("SELECT version, name, checksum FROM schema_migrations", ())
        .await
        .map_err(|e| query_err("read schema_migrations", e))?
        .into_rows_result()
        .map_err(|e| query_err("read schema_migrations", e))?
        .rows::<(i32, String, String)>()
        .map_err(|e| query_err("read schema_migrations", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| query_err("read schema_migrations", e))?;
    for m in MIGRATIONS {
        if let Some((_, _, sum)) = applied.iter().find(|(v, _, _)| *v == m.version) {
            if *sum != m.checksum() {
                return Err(StoreError::MigrationEdited { version: m.version, name: m.name.into(), applied: sum.clone(), now: m.checksum() });
            }
            report.already.push(m.name.to_string());
            continue;
        }
        for st in m.statements() {
            ddl(&session, &st).await?;
        }
        session
            .query_unpaged(
                // Qualified: a bound statement is prepared, and Cassandra flags prepared
                // statements that rely on USE.
                format!("INSERT INTO {ks}.schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, toTimestamp(now()))"),
                (m.version, m.name, m.checksum()),
            )
            .await
            .map_err(|e| query_err("record migration", e))?;
        report.applied.push(m.name.to_string());
    }
    Ok(report)
}

/// Runs one DDL statement and waits for schema agreement, so the next statement sees it.
async fn ddl(session: &Session, cql: &str) -> Result<(), StoreError> {
    let mut st = scylla::statement::Statement::new(cql.to_string());
    st.set_request_timeout(Some(Duration::from_secs(60)));
    session.query_unpaged(st, ()).await.map_err(|e| {
        let mut err = query_err("DDL", e);
        if let StoreError::Query { detail, .. } = &mut err {
            *detail = format!("{detail} in: {cql}");
        }
        err
    })?;
    session.await_schema_agreement().await.map_err(|e| query_err("schema agreement", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_match_the_cql_directory_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cql");
        let mut files: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".cql").to_string()).collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(files, listed, "cql/ and store::migrate::MIGRATIONS disagree");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:03}_", m.version)));
        }
    }

    #[test]
    fn statements_are_split_and_comments_dropped() {
        let m = &MIGRATIONS[0];
        let st = m.statements();
        assert!(st.iter().all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")), "{st:?}");
        assert!(st.iter().all(|s| !s.contains("--")));
        assert_eq!(st.len(), 6);
    }
}
