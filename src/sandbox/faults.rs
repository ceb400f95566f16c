//! Injected faults: per provider, an error rate with a named provider error, added latency,
//! Retry-After, hanging, optionally for the next `count` requests only.
//!
//! A fault is drawn only for requests that passed auth and validation: a real outage still
//! answers a bad key with 401, and only valid requests meet the outage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Provider;

/// The body of `PUT /_sandbox/faults/{provider}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// Share of requests answered with `error`, 0.0–1.0. Absent: 1.0 when `error` or
    /// `retry_after_s` is set, else 0.0 (latency or hang only).
    pub error_rate: Option<f64>,
    /// The provider's own error name (APNs reason, FCM errorCode, Twilio code, Vonage status,
    /// SendGrid/HTTP status, Mandrill error name); absent = the provider's usual outage answer.
    pub error: Option<ErrorName>,
    /// Added before answering, in milliseconds.
    pub latency_ms: u64,
    /// Adds `Retry-After: n` to non-200 fault answers (and sets SendGrid's X-RateLimit-Reset).
    pub retry_after_s: Option<u64>,
    /// Never answer (until the client gives up or the sandbox stops).
    pub hang: bool,
    /// Apply to the next `count` valid requests only, then remove itself.
    pub count: Option<u64>,
}

/// An error name given as a string (`"ServiceUnavailable"`) or a number (`503`, `20429`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ErrorName {
    Text(String),
    Number(u64),
}

impl ErrorName {
    pub fn as_string(&self) -> String {
        match self {
            ErrorName::Text(s) => s.clone(),
            ErrorName::Number(n) => n.to_string(),
        }
    }
}

impl Fault {
    fn rate(&self) -> f64 {
        self.error_rate.unwrap_or(if self.error.is_some() || self.retry_after_s.is_some() { 1.0 } else { 0.0 })
    }

    /// Checks ranges; the error name is checked by the provider.
    pub fn validate(&self) -> Result<(), String> {
        match self.error_rate {
            Some(r) if !(0.0..=1.0).contains(&r) => Err(format!("error_rate {r} is not within 0.0–1.0")),
            _ if self.count == Some(0) => Err("count must be at least 1".into()),
            _ => Ok(()),
        }
    }
}

/// What a fault does to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub latency: Duration,
    pub hang: bool,
    /// The error to answer with (already resolved to the provider default when unnamed).
    pub error: Option<String>,
    pub retry_after_s: Option<u64>,
}

/// The faults in force, with the remaining count of each.
#[derive(Debug, Default)]
pub struct FaultTable {
    active: Mutex<HashMap<Provider, (Fault, Option<u64>)>>,
}

impl FaultTable {
    pub fn set(&self, provider: Provider, fault: Fault) {
        let remaining = fault.count;
        self.active.lock().unwrap().insert(provider, (fault, remaining));
    }

    pub fn clear(&self, provider: Option<Provider>) {
        let mut active = self.active.lock().unwrap();
        match provider {
            Some(p) => {
                active.remove(&p);
            }
            None => active.clear(),
        }
    }

    /// The faults in force, with how many requests each still applies to.
    pub fn list(&self) -> Vec<(Provider, Fault, Option<u64>)> {
        let active = self.active.lock().unwrap();
        let mut all: Vec<_> = active.iter().map(|(p, (f, left))| (*p, f.clone(), *left)).collect();
        all.sort_by_key(|(p, _, _)| p.name());
        all
    }

    /// Draws the fault for one valid request, using up one of its `count`.
    pub fn draw(&self, provider: Provider) -> Option<Plan> {
        let mut active = self.active.lock().unwrap();
        let (fault, remaining) = active.get_mut(&provider)?;
        let fault = fault.clone();
        if let Some(left) = remaining {
            *left -= 1;
            if *left == 0 {
                active.remove(&provider);
            }
        }
        drop(active);
        let hit = rand::random::<f64>() < fault.rate();
        Some(Plan {
            latency: Duration::from_millis(fault.latency_ms),
            hang: fault.hang,
            error: hit.then(|| fault.error.as_ref().map_or_else(|| provider.default_error().to_string(), ErrorName::as_string)),
            retry_after_s: fault.retry_after_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(json: &str) -> Fault {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_named_error_defaults_to_every_request() {
        let t = FaultTable::default();
        t.set(Provider::Apns, fault(r#"{"error":"Shutdown"}"#));
        for _ in 0..20 {
            assert_eq!(t.draw(Provider::Apns).unwrap().error.as_deref(), Some("Shutdown"));
        }
        assert_eq!(t.draw(Provider::Fcm), None);
    }

    #[test]
    fn latency_alone_never_errors_and_an_unnamed_error_is_the_provider_default() {
        let t = FaultTable::default();
        t.set(Provider::Twilio, fault(r#"{"latency_ms":5}"#));
        let plan = t.draw(Provider::Twilio).unwrap();
        assert_eq!((plan.latency, plan.error), (Duration::from_millis(5), None));
        t.set(Provider::Twilio, fault(r#"{"error_rate":1.0}"#));
        assert_eq!(t.draw(Provider::Twilio).unwrap().error.as_deref(), Some("20429"));
    }

    #[test]
    fn count_limits_the_fault_to_the_next_n_requests() {
        let t = FaultTable::default();
        t.set(Provider::Vonage, fault(r#"{"error":1,"count":2}"#));
        assert!(t.draw(Provider::Vonage).unwrap().error.is_some());
        assert_eq!(t.list()[0].2, Some(1));
        assert!(t.draw(Provider::Vonage).unwrap().error.is_some());
        assert_eq!(t.draw(Provider::Vonage), None);
    }

    #[test]
    fn error_rate_outside_the_unit_interval_is_refused() {
        assert!(fault(r#"{"error_rate":1.5}"#).validate().is_err());
        assert!(fault(r#"{"count":0}"#).validate().is_err());
        assert!(fault(r#"{"error_rate":0.5,"error":"x"}"#).validate().is_ok());
    }
}
