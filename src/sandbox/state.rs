//! The sandbox's notion of the outside world: which addresses are dead, and how.
//!
//! Set at start from [`super::SandboxConfig::state`] and replaced with `PUT /_sandbox/state`.
//! Each set drives the provider's real "dead address" answer.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Dead-address sets, one per provider behaviour.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxState {
    /// APNs device tokens (hex, any case) answered with 410 `Unregistered` + timestamp.
    pub apns_unregistered: BTreeSet<String>,
    /// FCM registration tokens answered with 404 `UNREGISTERED`.
    pub fcm_unregistered: BTreeSet<String>,
    /// Twilio `To` numbers (E.164) that are landlines: 400 code 21614.
    pub twilio_landline: BTreeSet<String>,
    /// Twilio `To` numbers that texted STOP: 400 code 21610.
    pub twilio_unsubscribed: BTreeSet<String>,
    /// Vonage `to` numbers (digits) answered with status "7" Number barred.
    pub vonage_barred: BTreeSet<String>,
    /// Email addresses Mandrill rejects with `reject_reason: "hard-bounce"`. (SendGrid
    /// accepts bounces with 202, as the real one does; its verdict comes by webhook.)
    pub mandrill_bounce: BTreeSet<String>,
}

impl SandboxState {
    /// Canonical forms, so lookups ignore case where the provider does.
    pub(crate) fn normalized(mut self) -> Self {
        self.apns_unregistered = self.apns_unregistered.iter().map(|t| t.to_ascii_lowercase()).collect();
        self.mandrill_bounce = self.mandrill_bounce.iter().map(|e| e.to_ascii_lowercase()).collect();
        self
    }
}
