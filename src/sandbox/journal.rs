//! The request log: what each provider endpoint received and what it answered, secrets
//! masked, for tests and the demo (`GET /_sandbox/requests/{provider}`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use super::http::Incoming;
use super::Provider;

/// Kept per provider; older entries are dropped first.
const MAX_PER_PROVIDER: usize = 10_000;
/// Body fields whose values are credentials.
const SECRET_FIELDS: [&str; 4] = ["key", "api_secret", "assertion", "password"];
const MASK: &str = "****";

/// One request as received.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// Order of arrival across all providers.
    pub seq: u64,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Request headers; credentials keep their scheme only (`Bearer ****`).
    pub headers: BTreeMap<String, String>,
    /// The parsed body (JSON, or a form as an object), credentials masked.
    pub body: Value,
    /// The status answered; `null` while unanswered (latency, hang).
    pub status: Option<u16>,
    /// Arrival time, RFC 3339.
    pub at: String,
}

#[derive(Debug, Default)]
pub struct Journal {
    inner: Mutex<(u64, HashMap<Provider, VecDeque<Received>>)>,
}

impl Journal {
    /// Records an arrival; returns its `seq` for [`Journal::answered`].
    pub fn record(&self, provider: Provider, req: &Incoming, body: Value) -> u64 {
        let headers = req
            .headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                let shown = match name.as_str() {
                    "authorization" => mask_credentials(&value),
                    _ => value,
                };
                (name.as_str().to_string(), shown)
            })
            .collect();
        let mut inner = self.inner.lock().unwrap();
        inner.0 += 1;
        let seq = inner.0;
        let log = inner.1.entry(provider).or_default();
        if log.len() == MAX_PER_PROVIDER {
            log.pop_front();
        }
        log.push_back(Received {
            seq,
            method: req.method.to_string(),
            path: req.uri.path_and_query().map_or_else(|| req.uri.path().to_string(), |p| p.to_string()),
            version: format!("{:?}", req.version),
            headers,
            body: mask_body(body),
            status: None,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        seq
    }

    pub fn answered(&self, provider: Provider, seq: u64, status: u16) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(r) = inner.1.get_mut(&provider).and_then(|log| log.iter_mut().rev().find(|r| r.seq == seq)) {
            r.status = Some(status);
        }
    }

    pub fn list(&self, provider: Provider) -> Vec<Received> {
        let inner = self.inner.lock().unwrap();
        inner.1.get(&provider).map(|log| log.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn clear(&self, provider: Option<Provider>) {
        let mut inner = self.inner.lock().unwrap();
        match provider {
            Some(p) => {
                inner.1.remove(&p);
            }
            None => inner.1.clear(),
        }
    }
}

/// `Bearer eyJ…` → `Bearer ****`.
fn mask_credentials(value: &str) -> String {
    match value.split_once(' ') {
        Some((scheme, _)) => format!("{scheme} {MASK}"),
        None => MASK.into(),
    }
}

fn mask_body(mut body: Value) -> Value {
    if let Value::Object(fields) = &mut body {
        for name in SECRET_FIELDS {
            if let Some(v) = fields.get_mut(name) {
                *v = Value::String(MASK.into());
            }
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_keep_only_their_scheme() {
        assert_eq!(mask_credentials("Bearer SG.abc.def"), "Bearer ****");
        assert_eq!(mask_credentials("Basic QUM6dG9rZW4="), "Basic ****");
        assert_eq!(mask_credentials("opaque"), "****");
    }

    #[test]
    fn secret_body_fields_are_masked_and_others_kept() {
        let b = mask_body(serde_json::json!({"key": "md-1", "api_secret": "s", "to": "123"}));
        assert_eq!(b, serde_json::json!({"key": "****", "api_secret": "****", "to": "123"}));
    }
}
