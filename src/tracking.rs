//! Signed open/click tracking tokens, shared by the renderer (which puts them into email
//! HTML) and the HTTP API (which serves `/t/o/{token}` and `/t/c/{token}`).
//!
//! A token is `base64url(compact JSON claim) "." base64url(HMAC-SHA256(secret, first part))`,
//! both without padding, so it is safe in a URL path. Tokens do not expire: a link in an
//! old email keeps working.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Where tracking URLs point and the key that signs them.
#[derive(Clone, PartialEq, Eq)]
pub struct TrackingSettings {
    /// Public base URL of the HTTP API, e.g. `https://t.example.com` (a trailing `/` is ignored).
    pub base_url: String,
    /// HMAC key; the API verifying the tokens must hold the same one.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TrackingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackingSettings").field("base_url", &self.base_url).field("secret", &"<redacted>").finish()
    }
}

impl TrackingSettings {
    /// `{base_url}/t/o/{token}`: the open pixel's source for `delivery_id`.
    pub fn open_url(&self, delivery_id: &str) -> String {
        self.url("o", &TrackingClaim::open(delivery_id))
    }

    /// `{base_url}/t/c/{token}`: redirects to `url` after recording a click on `delivery_id`.
    pub fn click_url(&self, delivery_id: &str, url: &str) -> String {
        self.url("c", &TrackingClaim::click(delivery_id, url))
    }

    fn url(&self, path: &str, claim: &TrackingClaim) -> String {
        format!("{}/t/{path}/{}", self.base_url.trim_end_matches('/'), sign(&self.secret, claim))
    }
}

/// What a token records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrackingKind {
    #[serde(rename = "o")]
    Open,
    #[serde(rename = "c")]
    Click,
}

/// The signed content of a token (short JSON keys keep URLs short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingClaim {
    #[serde(rename = "k")]
    pub kind: TrackingKind,
    #[serde(rename = "d")]
    pub delivery_id: String,
    /// The original link (clicks only).
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl TrackingClaim {
    pub fn open(delivery_id: &str) -> Self {
        TrackingClaim { kind: TrackingKind::Open, delivery_id: delivery_id.into(), url: None }
    }

    pub fn click(delivery_id: &str, url: &str) -> Self {
        TrackingClaim { kind: TrackingKind::Click, delivery_id: delivery_id.into(), url: Some(url.into()) }
    }
}

/// Why a token was refused; the API answers 404 to all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackingError {
    #[error("tracking token is malformed")]
    Malformed,
    #[error("tracking token signature does not match")]
    BadSignature,
    #[error("tracking token's click URL is missing or not http(s)")]
    UnsafeUrl,
}

/// Signs `claim` into a URL-path-safe token.
pub fn sign(secret: &[u8], claim: &TrackingClaim) -> String {
    let json = serde_json::to_vec(claim).expect("a claim always serializes");
    let payload = B64.encode(json);
    let sig = B64.encode(mac(secret, &payload).finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// Checks the signature (in constant time) and returns the claim.
///
/// # Errors
/// [`TrackingError::Malformed`] for garbled tokens, [`TrackingError::BadSignature`] for
/// tampered ones or another secret, [`TrackingError::UnsafeUrl`] for a click claim whose
/// URL is not http(s) (no open redirect to `javascript:` and friends).
pub fn verify(secret: &[u8], token: &str) -> Result<TrackingClaim, TrackingError> {
    let (payload, sig) = token.split_once('.').ok_or(TrackingError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| TrackingError::Malformed)?;
    mac(secret, payload).verify_slice(&sig).map_err(|_| TrackingError::BadSignature)?;
    let json = B64.decode(payload).map_err(|_| TrackingError::Malformed)?;
    let claim: TrackingClaim = serde_json::from_slice(&json).map_err(|_| TrackingError::Malformed)?;
    if claim.kind == TrackingKind::Click && !claim.url.as_deref().is_some_and(is_web_url) {
        return Err(TrackingError::UnsafeUrl);
    }
    Ok(claim)
}

/// An absolute `http:` or `https:` URL with a host.
pub(crate) fn is_web_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn mac(secret: &[u8], payload: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(payload.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-secret";

    #[test]
    fn signed_claims_verify_back() {
        for claim in [TrackingClaim::open("d1"), TrackingClaim::click("d1", "https://example.com/a?b=1&c=%20")] {
            let token = sign(KEY, &claim);
            assert!(token.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{token}");
            assert_eq!(verify(KEY, &token), Ok(claim));
        }
    }

    #[test]
    fn rejects_tampered_and_garbled_tokens() {
        let token = sign(KEY, &TrackingClaim::click("d1", "https://example.com/"));
        let (payload, sig) = token.split_once('.').unwrap();
        let forged = B64.encode(br#"{"k":"c","d":"d1","u":"https://evil.example/"}"#);
        assert_eq!(verify(KEY, &format!("{forged}.{sig}")), Err(TrackingError::BadSignature));
        assert_eq!(verify(b"other-secret", &token), Err(TrackingError::BadSignature));
        let flipped = format!("{payload}.{}{}", if sig.starts_with('A') { 'B' } else { 'A' }, &sig[1..]);
        assert_eq!(verify(KEY, &flipped), Err(TrackingError::BadSignature));
        for garbled in ["", "no-dot", "a.b.c", "!!.??", &format!("{payload}.")] {
            assert!(verify(KEY, garbled).is_err(), "{garbled:?} accepted");
        }
    }

    #[test]
    fn rejects_click_claims_that_are_not_http() {
        for url in ["javascript:alert(1)", "mailto:a@example.com", "/relative", "ftp://example.com/"] {
            let token = sign(KEY, &TrackingClaim::click("d1", url));
            assert_eq!(verify(KEY, &token), Err(TrackingError::UnsafeUrl), "{url}");
        }
        let no_url = TrackingClaim { url: None, ..TrackingClaim::click("d1", "") };
        assert_eq!(verify(KEY, &sign(KEY, &no_url)), Err(TrackingError::UnsafeUrl));
    }

    #[test]
    fn settings_build_urls_under_the_base_and_hide_the_secret() {
        let s = TrackingSettings { base_url: "https://t.example.com/".into(), secret: KEY.to_vec() };
        let open = s.open_url("d1");
        let token = open.strip_prefix("https://t.example.com/t/o/").expect(&open);
        assert_eq!(verify(KEY, token).unwrap(), TrackingClaim::open("d1"));
        assert!(!format!("{s:?}").contains("test-secret"));
    }
}
