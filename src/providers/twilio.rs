//! Twilio Programmable Messaging: a form POST to
//! `{base}/2010-04-01/Accounts/{sid}/Messages.json` with HTTP Basic auth.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{configured, endpoint, required, seconds_left, Classification, HttpConfig, HttpRequest, HttpResponse, ProviderError};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://api.twilio.com";
/// Twilio's `ValidityPeriod` range, in seconds.
const VALIDITY: (i64, i64) = (1, 36_000);

/// `[providers.twilio]`: one account, one sender.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwilioConfig {
    pub base_url: String,
    /// The Account SID (`AC…`), part of the URL.
    pub account_sid: String,
    /// An API key SID (`SK…`) to authenticate with instead of the Account SID.
    pub api_key_sid: Option<String>,
    /// The account's auth token, or the API key's secret when `api_key_sid` is set.
    pub auth_token: Secret,
    /// The sender number / short code / alphanumeric id ...
    pub from: Option<String>,
    /// ... or a Messaging Service (`MG…`); exactly one of the two.
    pub messaging_service_sid: Option<String>,
    /// Where Twilio posts status callbacks; none = no callbacks.
    pub status_callback: Option<String>,
    pub http: HttpConfig,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        TwilioConfig {
            base_url: PRODUCTION_URL.into(),
            account_sid: String::new(),
            api_key_sid: None,
            auth_token: Secret::default(),
            from: None,
            messaging_service_sid: None,
            status_callback: None,
            http: HttpConfig::default(),
        }
    }
}

impl TwilioConfig {
    pub fn validate(&self) -> Result<(), ProviderError> {
        configured(&self.account_sid, "providers.twilio.account_sid")?;
        configured(self.auth_token.expose(), "providers.twilio.auth_token")?;
        if self.from.is_some() == self.messaging_service_sid.is_some() {
            return Err(ProviderError::Config("providers.twilio: set exactly one of from and messaging_service_sid".into()));
        }
        Ok(())
    }
}

/// The create-message request; `ValidityPeriod` runs to the deadline as seen at `now_ms`.
pub fn build_request(cfg: &TwilioConfig, d: &ChannelDelivery, now_ms: i64) -> Result<HttpRequest, ProviderError> {
    let body = required(&d.content.body, "SMS body")?;
    if d.address.is_empty() {
        return Err(ProviderError::InvalidAddress("empty phone number".into()));
    }
    let validity = seconds_left(d, now_ms, VALIDITY.0, VALIDITY.1).to_string();
    let mut fields = vec![("To", d.address.as_str())];
    match (&cfg.from, &cfg.messaging_service_sid) {
        (Some(from), _) => fields.push(("From", from)),
        (None, Some(sid)) => fields.push(("MessagingServiceSid", sid)),
        (None, None) => return Err(ProviderError::Config("providers.twilio.from is not set".into())),
    }
    fields.push(("Body", body));
    // The callback names the delivery, so the webhook finds it without a lookup by
    // MessageSid (Twilio signs the URL with its query).
    let callback = cfg.status_callback.as_ref().map(|url| {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}delivery_id={}", d.delivery_id)
    });
    if let Some(url) = &callback {
        fields.push(("StatusCallback", url));
    }
    fields.push(("ValidityPeriod", &validity));
    let user = cfg.api_key_sid.as_deref().unwrap_or(&cfg.account_sid);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", cfg.auth_token.expose()));
    let path = format!("2010-04-01/Accounts/{}/Messages.json", cfg.account_sid);
    Ok(HttpRequest::post(endpoint(&cfg.base_url, &path)).header("authorization", format!("Basic {basic}")).form(fields))
}

/// Maps a Twilio answer to its class by the error `code`.
pub fn classify(resp: &HttpResponse) -> Classification {
    let json = resp.json();
    if matches!(resp.status, 200 | 201) {
        return Classification::sent(json.as_ref().and_then(|v| v["sid"].as_str()).unwrap_or_default());
    }
    let Some(code) = json.as_ref().and_then(|v| v["code"].as_u64()) else {
        return Classification::by_status(resp, resp.summary());
    };
    let message = json.as_ref().and_then(|v| v["message"].as_str()).unwrap_or_default();
    let why = format!("Twilio {} {code}: {message}", resp.status);
    match code {
        // Invalid number, not a mobile number, recipient replied STOP.
        21211 | 21614 | 21610 => Classification::invalid(why),
        // REST concurrency exceeded: not processed, safe to retry.
        20429 => Classification::throttled(resp.retry_after(), why),
        // Authentication failed: herald's account SID or auth token is wrong.
        20003 => Classification::auth_failed(why),
        21000..=21999 => Classification::permanent(why),
        _ => Classification::by_status(resp, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RenderedContent;
    use crate::providers::tests::{delivery, form, resp, NOW_MS};

    fn cfg() -> TwilioConfig {
        TwilioConfig {
            account_sid: "AC0123".into(),
            auth_token: Secret::new("tw-secret"),
            from: Some("+15550001111".into()),
            status_callback: Some("https://hooks.example.com/twilio".into()),
            ..TwilioConfig::default()
        }
    }

    fn sms() -> ChannelDelivery {
        let content = RenderedContent { body: Some("Code: 1234 & more".into()), ..Default::default() };
        delivery("sms", "+15557654321", content)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn builds_the_create_message_form() {
        let req = build_request(&cfg(), &sms(), NOW_MS).unwrap();
        assert_eq!(req.url, "https://api.twilio.com/2010-04-01/Accounts/AC0123/Messages.json");
        assert_eq!(
            req.headers,
            pairs(&[
                ("authorization", "Basic QUMwMTIzOnR3LXNlY3JldA=="), // AC0123:tw-secret
                ("content-type", "application/x-www-form-urlencoded"),
            ])
        );
        assert_eq!(
            form(&req),
            pairs(&[
                ("To", "+15557654321"),
                ("From", "+15550001111"),
                ("Body", "Code: 1234 & more"),
                ("StatusCallback", "https://hooks.example.com/twilio?delivery_id=d-42"),
                ("ValidityPeriod", "3600"),
            ])
        );
        assert!(String::from_utf8_lossy(&req.body).contains("To=%2B15557654321"));
        let printed = format!("{req:?}");
        assert!(!printed.contains("QUMwMTIzOnR3LXNlY3JldA") && !printed.contains("tw-secret"));
    }

    #[test]
    fn messaging_service_api_key_and_validity_clamps() {
        let cfg =
            TwilioConfig { from: None, messaging_service_sid: Some("MG9".into()), api_key_sid: Some("SK7".into()), status_callback: None, ..cfg() };
        let mut d = sms();
        d.deadline = NOW_MS + 48 * 3_600_000;
        let req = build_request(&cfg, &d, NOW_MS).unwrap();
        assert_eq!(req.header_value("authorization"), Some("Basic U0s3OnR3LXNlY3JldA==")); // SK7:tw-secret
        let f = form(&req);
        assert_eq!(f[1], ("MessagingServiceSid".into(), "MG9".into()));
        assert_eq!(f.last().unwrap(), &("ValidityPeriod".into(), "36000".into()));
        d.deadline = NOW_MS - 5_000;
        let req = build_request(&cfg, &d, NOW_MS).unwrap();
        assert_eq!(form(&req).last().unwrap(), &("ValidityPeriod".into(), "1".into()));
        assert!(cfg.validate().is_ok());
        let both = TwilioConfig { from: Some("+1".into()), ..cfg };
        assert!(both.validate().is_err());
        d.content.body = None;
        assert!(matches!(build_request(&both, &d, NOW_MS), Err(ProviderError::InvalidDelivery(_))));
    }

    fn error(status: u16, code: u64) -> HttpResponse {
        let body = format!(r#"{{"code":{code},"message":"m","more_info":"https://www.twilio.com/docs/errors/{code}","status":{status}}}"#);
        resp(status, &body)
    }

    #[test]
    fn classifies_every_code_in_the_table() {
        let ok = resp(201, r#"{"sid":"SM0123456789abcdef0123456789abcdef","status":"queued"}"#);
        assert_eq!(classify(&ok), Classification::sent("SM0123456789abcdef0123456789abcdef"));
        for (status, code, class) in [
            (400, 21211, "invalid_address"),
            (400, 21614, "invalid_address"),
            (400, 21610, "invalid_address"),
            (400, 21606, "permanent"),
            (400, 21408, "permanent"),
            (400, 21617, "permanent"),
            (400, 21602, "permanent"),
            (401, 20003, "auth_failed"),
            (429, 20429, "throttled"),
            (500, 20500, "transient"),
            (503, 20503, "transient"),
        ] {
            let c = classify(&error(status, code));
            assert_eq!(c.label(), class, "{status} {code}");
        }
        assert_eq!(classify(&error(400, 21211)).reason(), Some("Twilio 400 21211: m"));
        assert_eq!(classify(&resp(503, "Service Unavailable")).label(), "transient");
    }
}
