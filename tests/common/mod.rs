//! Shared helpers for the integration tests: configuration of the real local stack and
//! unique names so tests never collide. There is no fake here: a service that is down
//! makes the test fail with the service's name in the message.

#![allow(dead_code)]

pub mod env;

use herald::config::Config;

/// The configuration the tests run against: defaults plus `HERALD__…` overrides, so the
/// same tests run against other ports or a remote cluster.
pub fn config() -> Config {
    Config::load(None).expect("test configuration")
}

/// A fresh name for a keyspace, topic or group: `<prefix>_<12 hex>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A configuration whose store uses a fresh keyspace, migrated.
pub async fn migrated_store_config() -> Config {
    let mut c = config();
    c.store.keyspace = unique("herald_test");
    herald::store::migrate::migrate(&c.store)
        .await
        .unwrap_or_else(|e| panic!("db migrate into a fresh keyspace failed (is Cassandra/Scylla up?): {e}"));
    c
}
