//! The Avro contracts (`schemas/*.avsc`, built into the binary) and their registration in
//! the Confluent-compatible registry under TopicNameStrategy subjects (`<topic>-value`).

use std::collections::BTreeMap;

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{is_compatible_schema, post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::config::RegistryConfig;
use crate::error::Classify;
use crate::topology::{Topology, ValueFormat};

/// A contract shipped with herald.
#[derive(Debug, Clone, Copy)]
pub struct Contract {
    /// The record name used in topology/ (`avro:<record>`).
    pub record: &'static str,
    /// `io.herald.v1` for herald's own contracts; upstream examples keep their owner's.
    pub namespace: &'static str,
    pub file: &'static str,
    pub text: &'static str,
}

/// Every Avro contract in `schemas/`.
pub const CONTRACTS: &[Contract] = &[
    Contract {
        record: "NotificationRequested",
        namespace: "io.herald.v1",
        file: "schemas/notification_requested.avsc",
        text: include_str!("../schemas/notification_requested.avsc"),
    },
    Contract {
        record: "ChannelDelivery",
        namespace: "io.herald.v1",
        file: "schemas/channel_delivery.avsc",
        text: include_str!("../schemas/channel_delivery.avsc"),
    },
    Contract {
        record: "DeliveryOutcome",
        namespace: "io.herald.v1",
        file: "schemas/delivery_outcome.avsc",
        text: include_str!("../schemas/delivery_outcome.avsc"),
    },
    // An upstream service's event, consumed through router.triggers (see topology/).
    Contract {
        record: "OrderShipped",
        namespace: "com.example.shop",
        file: "schemas/order_shipped.avsc",
        text: include_str!("../schemas/order_shipped.avsc"),
    },
];

/// Errors at the registry boundary.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("no contract named '{0}' in schemas/")]
    UnknownRecord(String),
    #[error("{file} is not a valid Avro schema: {detail}")]
    Invalid { file: &'static str, detail: String },
    #[error("schema for subject '{subject}' is not compatible with the version already registered; evolve it compatibly (new fields need defaults)")]
    Incompatible { subject: String },
    #[error("schema registry at {url}: {detail}")]
    Registry { url: String, detail: String, retryable: bool },
}

impl Classify for SchemaError {
    fn is_retryable(&self) -> bool {
        matches!(self, SchemaError::Registry { retryable: true, .. })
    }
}

/// The contract for a record name.
pub fn contract(record: &str) -> Result<&'static Contract, SchemaError> {
    CONTRACTS.iter().find(|c| c.record == record).ok_or_else(|| SchemaError::UnknownRecord(record.to_string()))
}

/// The parsed schema of a record name.
pub fn schema(record: &str) -> Result<Schema, SchemaError> {
    let c = contract(record)?;
    Schema::parse_str(c.text).map_err(|e| SchemaError::Invalid { file: c.file, detail: e.to_string() })
}

/// Registry settings for the converter crate, with a timeout so a dead registry fails fast.
pub fn sr_settings(cfg: &RegistryConfig) -> Result<SrSettings, SchemaError> {
    let mut b = SrSettings::new_builder(cfg.url.clone());
    b.set_timeout(std::time::Duration::from_millis(cfg.timeout_ms));
    if let Some(user) = &cfg.username {
        b.set_basic_authorization(user, Some(cfg.password.expose()));
    }
    b.build().map_err(|e| SchemaError::Registry { url: cfg.url.clone(), detail: e.to_string(), retryable: false })
}

/// What `register` did for one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The subject already had exactly this schema.
    Unchanged { subject: String, id: u32 },
    /// A new version was registered (or the subject was created).
    Registered { subject: String, id: u32 },
}

/// Registers the value schema of every Avro topic in the topology, after checking
/// compatibility with what the subject already holds. Idempotent.
pub async fn register(cfg: &RegistryConfig, topology: &Topology) -> Result<Vec<Registration>, SchemaError> {
    let sr = sr_settings(cfg)?;
    let http = http_client(cfg)?;
    let mut wanted: BTreeMap<String, &'static Contract> = BTreeMap::new();
    for t in &topology.topics {
        if let ValueFormat::Avro(record) = &t.value {
            wanted.insert(format!("{}-value", t.name), contract(record)?);
        }
    }
    let mut done = Vec::new();
    for (subject, c) in wanted {
        // Validate locally first: a broken .avsc is our bug, not the registry's.
        schema(c.record)?;
        // A registry that is busy or restarting answers again shortly: retry what is retryable.
        let mut attempt = 0;
        let registration = loop {
            match register_subject(&http, &sr, cfg, &subject, c.text).await {
                Err(e) if e.is_retryable() && attempt < 4 => {
                    attempt += 1;
                    tracing::warn!(%subject, error = %e, attempt, "schema registration failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
                }
                other => break other?,
            }
        };
        done.push(registration);
    }
    Ok(done)
}

/// Registers `schema_text` under `subject` unless it is already there; refuses a schema that
/// is incompatible with the subject's registered versions.
pub async fn register_text(cfg: &RegistryConfig, subject: &str, schema_text: &str) -> Result<Registration, SchemaError> {
    let sr = sr_settings(cfg)?;
    let http = http_client(cfg)?;
    register_subject(&http, &sr, cfg, subject, schema_text).await
}

async fn register_subject(
    http: &reqwest::Client,
    sr: &SrSettings,
    cfg: &RegistryConfig,
    subject: &str,
    schema_text: &str,
) -> Result<Registration, SchemaError> {
    if let Some(id) = lookup(http, cfg, subject, schema_text).await? {
        return Ok(Registration::Unchanged { subject: subject.to_string(), id });
    }
    let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema_text.to_string());
    if subject_exists(http, cfg, subject).await? {
        let ok = is_compatible_schema(sr, subject.to_string(), supplied.clone()).await.map_err(|e| registry_err(cfg, e.to_string(), e.retriable))?;
        if !ok {
            return Err(SchemaError::Incompatible { subject: subject.to_string() });
        }
    }
    let reg = post_schema(sr, subject.to_string(), supplied).await.map_err(|e| registry_err(cfg, e.to_string(), e.retriable))?;
    Ok(Registration::Registered { subject: subject.to_string(), id: reg.id })
}

fn http_client(cfg: &RegistryConfig) -> Result<reqwest::Client, SchemaError> {
    reqwest::Client::builder().timeout(std::time::Duration::from_millis(cfg.timeout_ms)).build().map_err(|e| registry_err(cfg, e.to_string(), false))
}

fn registry_err(cfg: &RegistryConfig, detail: String, retryable: bool) -> SchemaError {
    SchemaError::Registry { url: cfg.url.clone(), detail, retryable }
}

fn http_err(cfg: &RegistryConfig, e: reqwest::Error) -> SchemaError {
    let retryable = e.is_timeout() || e.is_connect();
    registry_err(cfg, format!("{e} (is the registry running and registry.url right?)"), retryable)
}

fn authed(cfg: &RegistryConfig, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match &cfg.username {
        Some(u) => rb.basic_auth(u, Some(cfg.password.expose())),
        None => rb,
    }
}

/// `POST /subjects/{subject}`: the id if this exact schema is already under the subject.
async fn lookup(http: &reqwest::Client, cfg: &RegistryConfig, subject: &str, schema_text: &str) -> Result<Option<u32>, SchemaError> {
    let url = format!("{}/subjects/{}", cfg.url, subject);
    let body = serde_json::json!({ "schema": schema_text, "schemaType": "AVRO" });
    let resp = authed(cfg, http.post(&url))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&body)
        .send()
        .await
        .map_err(|e| http_err(cfg, e))?;
    let status = resp.status();
    if status.as_u16() == 404 {
        return Ok(None);
    }
    let text = resp.text().await.map_err(|e| http_err(cfg, e))?;
    if !status.is_success() {
        return Err(registry_err(cfg, format!("lookup of {subject} answered {status}: {text}"), status.is_server_error()));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| registry_err(cfg, format!("lookup of {subject}: {e}: {text}"), false))?;
    Ok(v.get("id").and_then(|id| id.as_u64()).map(|id| id as u32))
}

/// Whether the subject has any version registered.
async fn subject_exists(http: &reqwest::Client, cfg: &RegistryConfig, subject: &str) -> Result<bool, SchemaError> {
    let url = format!("{}/subjects/{}/versions", cfg.url, subject);
    let resp = authed(cfg, http.get(&url)).send().await.map_err(|e| http_err(cfg, e))?;
    match resp.status().as_u16() {
        200 => Ok(true),
        404 => Ok(false),
        s => Err(registry_err(cfg, format!("GET {url} answered {s}"), s >= 500)),
    }
}

/// `GET /subjects`: reachability check used by readiness probes and tests.
pub async fn ping(cfg: &RegistryConfig) -> Result<Vec<String>, SchemaError> {
    let http = http_client(cfg)?;
    let resp = authed(cfg, http.get(format!("{}/subjects", cfg.url))).send().await.map_err(|e| http_err(cfg, e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(registry_err(cfg, format!("GET /subjects answered {status}"), status.is_server_error()));
    }
    resp.json().await.map_err(|e| registry_err(cfg, format!("GET /subjects: {e}"), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_parses_and_is_namespaced() {
        for c in CONTRACTS {
            let s = schema(c.record).unwrap();
            let name = s.name().expect("a named record");
            assert_eq!(name.fullname(None), format!("{}.{}", c.namespace, c.record), "{}", c.file);
        }
    }

    #[test]
    fn every_schema_file_is_a_contract() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        for entry in std::fs::read_dir(dir).unwrap() {
            let file = format!("schemas/{}", entry.unwrap().file_name().to_string_lossy());
            assert!(CONTRACTS.iter().any(|c| c.file == file), "{file} is not listed in schemas::CONTRACTS");
        }
    }

    #[test]
    fn every_field_is_documented_and_optional_ones_have_defaults() {
        for c in CONTRACTS {
            let v: serde_json::Value = serde_json::from_str(c.text).unwrap();
            for f in v["fields"].as_array().unwrap() {
                let name = f["name"].as_str().unwrap();
                assert!(f.get("doc").is_some(), "{}: field {name} has no doc", c.file);
                let nullable = f["type"].as_array().is_some_and(|u| u.first() == Some(&serde_json::json!("null")));
                if nullable {
                    assert_eq!(f.get("default"), Some(&serde_json::Value::Null), "{}: {name}", c.file);
                }
            }
        }
    }
}
