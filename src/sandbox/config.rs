//! `SandboxConfig`: where the sandbox listens and which credentials it accepts.
//!
//! Every default is a fixed **development** credential, documented as such and accepted by
//! no real service: the APNs and FCM keys are the public pairs in `sandbox/dev-keys/`, the
//! rest are plain strings. Point a client at the sandbox with these and it authenticates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::SandboxState;
use crate::config::Secret;

/// The dev APNs team id (`iss` of provider JWTs).
pub const DEV_APNS_TEAM_ID: &str = "HERALDDEV1";
/// The dev APNs key id (`kid` of provider JWTs); its private half is `AuthKey_HERALDKEY1.p8`.
pub const DEV_APNS_KEY_ID: &str = "HERALDKEY1";
/// The bundle id the dev APNs setup may push to.
pub const DEV_APNS_BUNDLE_ID: &str = "dev.herald.demo";
const DEV_APNS_PUBLIC_KEY: &str = include_str!("../../sandbox/dev-keys/apns-public.pem");
const DEV_FCM_PUBLIC_KEY: &str = include_str!("../../sandbox/dev-keys/fcm-public.pem");

/// The provider sandbox (`herald sandbox`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Where `herald sandbox` listens (h2c and HTTP/1.1 on the same port).
    pub listen: String,
    pub apns: ApnsSandboxConfig,
    pub fcm: FcmSandboxConfig,
    pub twilio: TwilioSandboxConfig,
    pub vonage: VonageSandboxConfig,
    pub sendgrid: SendgridSandboxConfig,
    pub mandrill: MandrillSandboxConfig,
    /// The dead-address sets the sandbox starts with (replaced by `PUT /_sandbox/state`).
    pub state: SandboxState,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            listen: "127.0.0.1:8090".into(),
            apns: ApnsSandboxConfig::default(),
            fcm: FcmSandboxConfig::default(),
            twilio: TwilioSandboxConfig::default(),
            vonage: VonageSandboxConfig::default(),
            sendgrid: SendgridSandboxConfig::default(),
            mandrill: MandrillSandboxConfig::default(),
            state: SandboxState::default(),
        }
    }
}

/// APNs token auth: provider JWTs (ES256) are verified against these keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsSandboxConfig {
    /// The team id every JWT must carry as `iss`.
    pub team_id: String,
    /// Key id (`kid`) → P-256 public key PEM (SPKI). Unknown kid → 403 InvalidProviderToken.
    pub keys: BTreeMap<String, String>,
    /// Bundle ids `apns-topic` may name (with Apple's suffixes such as `.voip`).
    pub bundle_ids: Vec<String>,
}

impl Default for ApnsSandboxConfig {
    fn default() -> Self {
        ApnsSandboxConfig {
            team_id: DEV_APNS_TEAM_ID.into(),
            keys: BTreeMap::from([(DEV_APNS_KEY_ID.into(), DEV_APNS_PUBLIC_KEY.into())]),
            bundle_ids: vec![DEV_APNS_BUNDLE_ID.into()],
        }
    }
}

/// FCM: the service account its OAuth endpoint trusts and the project it serves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcmSandboxConfig {
    /// The only project `messages:send` accepts.
    pub project_id: String,
    /// The service account's `client_email`: the `iss` of OAuth assertions.
    pub client_email: String,
    /// The service account's `private_key_id`; an assertion's `kid`, when present, must match.
    pub private_key_id: String,
    /// RSA public key PEM of the service account (verifies RS256 assertions).
    pub public_key_pem: String,
    /// Accepted assertion audiences besides `http://<Host of the request>/token`.
    pub token_audiences: Vec<String>,
    /// Lifetime of issued access tokens, in seconds (Google: 3599).
    pub access_token_ttl_s: u64,
}

impl Default for FcmSandboxConfig {
    fn default() -> Self {
        FcmSandboxConfig {
            project_id: "herald-dev".into(),
            client_email: "herald-sandbox@herald-dev.iam.gserviceaccount.com".into(),
            private_key_id: "4e7a1d0c9b8f2e6a5d3c1b0a9f8e7d6c5b4a3921".into(),
            public_key_pem: DEV_FCM_PUBLIC_KEY.into(),
            token_audiences: vec!["https://oauth2.googleapis.com/token".into(), "http://127.0.0.1:8090/token".into()],
            access_token_ttl_s: 3599,
        }
    }
}

/// Twilio: HTTP Basic `AccountSid:AuthToken`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwilioSandboxConfig {
    pub account_sid: String,
    pub auth_token: Secret,
}

impl Default for TwilioSandboxConfig {
    fn default() -> Self {
        TwilioSandboxConfig { account_sid: "AC0123456789abcdef0123456789abcdef".into(), auth_token: Secret::new("herald-sandbox-twilio-auth-token") }
    }
}

/// Vonage: `api_key` + `api_secret` (body or Basic auth).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VonageSandboxConfig {
    pub api_key: String,
    pub api_secret: Secret,
}

impl Default for VonageSandboxConfig {
    fn default() -> Self {
        VonageSandboxConfig { api_key: "herald01".into(), api_secret: Secret::new("herald-sandbox-vonage-secret") }
    }
}

/// SendGrid: `Authorization: Bearer <api_key>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendgridSandboxConfig {
    pub api_key: Secret,
}

impl Default for SendgridSandboxConfig {
    fn default() -> Self {
        SendgridSandboxConfig { api_key: Secret::new("SG.herald-dev.sandbox-key-not-real") }
    }
}

/// Mandrill: `key` in the JSON body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MandrillSandboxConfig {
    pub api_key: Secret,
}

impl Default for MandrillSandboxConfig {
    fn default() -> Self {
        MandrillSandboxConfig { api_key: Secret::new("md-herald-dev-sandbox-key-not-real") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_survive_a_toml_round_trip_and_typos_are_refused() {
        let text = toml::to_string(&SandboxConfig::default()).unwrap();
        let back: SandboxConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.listen, "127.0.0.1:8090");
        assert_eq!(back.apns.keys[DEV_APNS_KEY_ID], DEV_APNS_PUBLIC_KEY);
        assert_eq!(back.twilio.auth_token, SandboxConfig::default().twilio.auth_token);
        let typo = toml::from_str::<SandboxConfig>("[twilio]\nauth_tokn = \"x\"\n");
        assert!(typo.unwrap_err().to_string().contains("auth_tokn"));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let printed = format!("{:?}", SandboxConfig::default());
        assert!(!printed.contains("herald-sandbox-twilio-auth-token"));
        assert!(!printed.contains("SG.herald-dev"));
    }
}
