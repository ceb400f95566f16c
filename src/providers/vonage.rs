//! Vonage (Nexmo) SMS API: a form POST to `{base}/sms/json` with the key and secret in the
//! body; the verdict is in `messages[].status` of an HTTP 200.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{configured, endpoint, required, truncate, Classification, HttpConfig, HttpRequest, HttpResponse, ProviderError};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://rest.nexmo.com";
/// Vonage's `ttl` range, in milliseconds.
const TTL_MS: (i64, i64) = (20_000, 604_800_000);
/// Longest `client-ref`.
const MAX_CLIENT_REF: usize = 100;
/// How long to hold back after status 9 (out of credit): a top-up takes a human.
pub const QUOTA_PAUSE: Duration = Duration::from_secs(60 * 60);

/// `[providers.vonage]`: one API key, one sender.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VonageConfig {
    pub base_url: String,
    pub api_key: String,
    pub api_secret: Secret,
    /// Sender number or alphanumeric sender id.
    pub from: String,
    /// Delivery-receipt URL (≤100 chars); none = the dashboard setting.
    pub callback: Option<String>,
    pub http: HttpConfig,
}

impl Default for VonageConfig {
    fn default() -> Self {
        VonageConfig {
            base_url: PRODUCTION_URL.into(),
            api_key: String::new(),
            api_secret: Secret::default(),
            from: String::new(),
            callback: None,
            http: HttpConfig::default(),
        }
    }
}

impl VonageConfig {
    pub fn validate(&self) -> Result<(), ProviderError> {
        configured(&self.api_key, "providers.vonage.api_key")?;
        configured(self.api_secret.expose(), "providers.vonage.api_secret")?;
        configured(&self.from, "providers.vonage.from")?;
        Ok(())
    }
}

/// The send-SMS form; `to` is the E.164 number without `+`, `ttl` runs to the deadline
/// as seen at `now_ms`, `type=unicode` when the text was rendered as UCS-2.
pub fn build_request(cfg: &VonageConfig, d: &ChannelDelivery, now_ms: i64) -> Result<HttpRequest, ProviderError> {
    let text = required(&d.content.body, "SMS body")?;
    let to = d.address.strip_prefix('+').unwrap_or(&d.address);
    if !(7..=15).contains(&to.len()) || !to.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProviderError::InvalidAddress("not an E.164 number (7-15 digits)".into()));
    }
    let ttl = (d.deadline - now_ms).clamp(TTL_MS.0, TTL_MS.1).to_string();
    let client_ref = truncate(&d.delivery_id, MAX_CLIENT_REF);
    let mut fields =
        vec![("api_key", cfg.api_key.as_str()), ("api_secret", cfg.api_secret.expose()), ("from", &cfg.from), ("to", to), ("text", text)];
    if d.content.sms_encoding.as_deref() == Some("UCS-2") {
        fields.push(("type", "unicode"));
    }
    fields.push(("client-ref", client_ref));
    fields.push(("ttl", &ttl));
    if let Some(url) = &cfg.callback {
        fields.push(("callback", url));
    }
    Ok(HttpRequest::post(endpoint(&cfg.base_url, "sms/json")).form(fields))
}

/// Maps a Vonage answer to its class: sent only when every part has status "0"; otherwise
/// the first failed part decides. Non-200 or non-JSON answers are transient.
pub fn classify(resp: &HttpResponse) -> Classification {
    let json = resp.json();
    let parts = match json.as_ref().and_then(|v| v["messages"].as_array()) {
        Some(parts) if resp.status == 200 && !parts.is_empty() => parts,
        _ => return Classification::transient(format!("Vonage {}", resp.summary())),
    };
    let status = |p: &Value| p["status"].as_str().unwrap_or_default().to_string();
    let Some(failed) = parts.iter().find(|p| status(p) != "0") else {
        return Classification::sent(parts[0]["message-id"].as_str().unwrap_or_default());
    };
    let code = status(failed);
    let text = failed["error-text"].as_str().unwrap_or_default();
    let why = format!("Vonage status {code}: {text}");
    match code.as_str() {
        "1" | "10" => Classification::throttled(None, why),
        // Out of credit: no send will succeed until someone tops up, so hold back long.
        "9" => Classification::throttled(Some(QUOTA_PAUSE), why),
        "5" => Classification::transient(why),
        // Number barred / de-activated.
        "7" | "33" => Classification::invalid(why),
        // 6 (invalid message, e.g. an unknown prefix) means a dead number only if it recurs,
        // which one answer cannot tell: FAIL this delivery, let the caller count.
        "6" => Classification::permanent(why),
        // Invalid credentials or signature, account barred: nothing goes through.
        "4" | "8" | "14" | "32" => Classification::auth_failed(why),
        // 2, 3, 12, 22, 23: bad request; 11, 15, 29: configuration of this request.
        _ => Classification::permanent(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RenderedContent;
    use crate::providers::tests::{delivery, form, resp, NOW_MS};

    fn cfg() -> VonageConfig {
        VonageConfig { api_key: "abcd1234".into(), api_secret: Secret::new("vn-secret"), from: "Herald".into(), ..VonageConfig::default() }
    }

    fn sms() -> ChannelDelivery {
        let content = RenderedContent { body: Some("Héllo ✓".into()), sms_encoding: Some("UCS-2".into()), ..Default::default() };
        delivery("sms", "+447700900000", content)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn builds_the_send_form() {
        let req = build_request(&cfg(), &sms(), NOW_MS).unwrap();
        assert_eq!(req.url, "https://rest.nexmo.com/sms/json");
        assert_eq!(req.headers, pairs(&[("content-type", "application/x-www-form-urlencoded")]));
        assert_eq!(
            form(&req),
            pairs(&[
                ("api_key", "abcd1234"),
                ("api_secret", "vn-secret"),
                ("from", "Herald"),
                ("to", "447700900000"),
                ("text", "Héllo ✓"),
                ("type", "unicode"),
                ("client-ref", "d-42"),
                ("ttl", "3600000"),
            ])
        );
        assert!(!format!("{req:?}").contains("vn-secret"), "the secret is in the body; Debug omits it");
    }

    #[test]
    fn gsm_text_clamps_and_bad_numbers() {
        let mut d = sms();
        d.content.sms_encoding = Some("GSM-7".into());
        d.deadline = NOW_MS + 1_000;
        d.delivery_id = "x".repeat(150);
        let cfg = VonageConfig { callback: Some("https://hooks.example.com/dlr".into()), ..cfg() };
        let f = form(&build_request(&cfg, &d, NOW_MS).unwrap());
        assert!(!f.iter().any(|(k, _)| k == "type"));
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("ttl"), "20000");
        assert_eq!(get("client-ref").len(), 100);
        assert_eq!(get("callback"), "https://hooks.example.com/dlr");
        d.deadline = NOW_MS + 30 * 86_400_000;
        let f = form(&build_request(&cfg, &d, NOW_MS).unwrap());
        assert!(f.contains(&("ttl".into(), "604800000".into())));
        for bad in ["+44 7700", "12345", "+4477009000001234", "tel:447700900000"] {
            d.address = bad.into();
            assert!(matches!(build_request(&cfg, &d, NOW_MS), Err(ProviderError::InvalidAddress(_))), "{bad}");
        }
    }

    fn status(code: &str) -> HttpResponse {
        resp(200, &format!(r#"{{"message-count":"1","messages":[{{"status":"{code}","error-text":"t"}}]}}"#))
    }

    #[test]
    fn classifies_every_status_in_the_table() {
        let ok = resp(
            200,
            r#"{"message-count":"2","messages":[
                {"to":"447700900000","message-id":"0A0000000123ABCD1","status":"0","remaining-balance":"3.14","message-price":"0.03","network":"12345"},
                {"to":"447700900000","message-id":"0A0000000123ABCD2","status":"0"}]}"#,
        );
        assert_eq!(classify(&ok), Classification::sent("0A0000000123ABCD1"));
        let partly = resp(200, r#"{"messages":[{"status":"0","message-id":"A"},{"status":"5","error-text":"Internal Error"}]}"#);
        assert_eq!(classify(&partly), Classification::transient("Vonage status 5: Internal Error"));
        for (code, class) in [
            ("1", "throttled"),
            ("2", "permanent"),
            ("3", "permanent"),
            ("4", "auth_failed"),
            ("5", "transient"),
            ("6", "permanent"),
            ("7", "invalid_address"),
            ("8", "auth_failed"),
            ("9", "throttled"),
            ("10", "throttled"),
            ("11", "permanent"),
            ("12", "permanent"),
            ("14", "auth_failed"),
            ("15", "permanent"),
            ("22", "permanent"),
            ("23", "permanent"),
            ("29", "permanent"),
            ("32", "auth_failed"),
            ("33", "invalid_address"),
        ] {
            assert_eq!(classify(&status(code)).label(), class, "status {code}");
        }
        assert_eq!(classify(&status("1")), Classification::throttled(None, "Vonage status 1: t"));
        assert!(matches!(classify(&status("9")), Classification::Throttled { retry_after: Some(QUOTA_PAUSE), .. }));
        assert_eq!(classify(&resp(500, "oops")).label(), "transient");
        assert_eq!(classify(&resp(200, "<html>")).label(), "transient");
        assert_eq!(classify(&resp(200, r#"{"messages":[]}"#)).label(), "transient");
    }
}
