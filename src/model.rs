//! Rust mirrors of the Avro contracts in `schemas/`: the records herald reads and writes.
//!
//! Field names and order follow the `.avsc` files exactly (serde maps them onto Avro
//! values); timestamps are UTC milliseconds since the epoch. `codec` checks these types
//! against the schemas, and a unit test round-trips each one.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Dispatch priority (Avro enum `io.herald.v1.Priority`; symbol order matters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

/// The upstream domain event: "notify this user with this template".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationRequested {
    pub event_id: String,
    pub occurred_at: i64,
    pub source: String,
    pub user_id: String,
    pub category: String,
    pub template_id: String,
    #[serde(default)]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub locale: Option<String>,
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// Content rendered for one channel; which fields are set depends on the channel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RenderedContent {
    pub title: Option<String>,
    pub body: Option<String>,
    #[serde(default)]
    pub data: HashMap<String, String>,
    pub subject: Option<String>,
    pub html: Option<String>,
    pub text: Option<String>,
    pub sms_encoding: Option<String>,
    pub sms_segments: Option<i32>,
}

/// One dispatcher work item: a channel and one address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelDelivery {
    pub delivery_id: String,
    pub event_id: String,
    pub user_id: String,
    pub category: String,
    pub template_id: String,
    pub channel: String,
    pub address: String,
    pub device_id: Option<String>,
    pub locale: String,
    pub priority: Priority,
    pub content: RenderedContent,
    pub attempt: i32,
    pub not_before: Option<i64>,
    pub deadline: i64,
    pub created_at: i64,
    pub last_error: Option<String>,
    /// The provider the previous attempt failed at: the next attempt goes to the one after
    /// it in the route.
    #[serde(default)]
    pub last_provider: Option<String>,
}

/// Deterministic delivery id of (event, channel, address): the end-to-end idempotency key.
pub fn delivery_id(event_id: &str, channel: &str, address: &str) -> String {
    let mut h = Sha256::new();
    for part in [event_id, channel, address] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..16])
}

/// One thing that happened to a notification (the analytics contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryOutcome {
    pub outcome_id: String,
    pub event_id: String,
    pub delivery_id: Option<String>,
    pub user_id: Option<String>,
    pub category: Option<String>,
    pub channel: Option<String>,
    pub provider: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub provider_message_id: Option<String>,
    pub attempt: i32,
    pub latency_ms: Option<i64>,
    pub occurred_at: i64,
    pub requested_at: Option<i64>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let a = delivery_id("e1", "sms", "+15550001");
        assert_eq!(a, delivery_id("e1", "sms", "+15550001"));
        assert_ne!(a, delivery_id("e1", "email", "+15550001"));
        // The separator keeps ("e1s", "ms") and ("e1", "sms") apart.
        assert_ne!(delivery_id("e1s", "ms", "x"), delivery_id("e1", "sms", "x"));
        assert_eq!(a.len(), 32);
    }
}
