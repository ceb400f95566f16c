//! SendGrid v3 Mail Send: `POST {base}/v3/mail/send` with a bearer API key; accepted mail
//! answers 202 with the id in `X-Message-Id`, bounces arrive later by webhook.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{configured, endpoint, parse_epoch_reset, Classification, Email, HttpConfig, HttpRequest, HttpResponse, ProviderError};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://api.sendgrid.com";

/// `[providers.sendgrid]`: one API key, one verified sender.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendgridConfig {
    /// `https://api.sendgrid.com` (`https://api.eu.sendgrid.com` for EU subusers).
    pub base_url: String,
    /// An API key with the `mail.send` scope (`SG.…`).
    pub api_key: Secret,
    /// The verified sender address.
    pub from_email: String,
    pub from_name: Option<String>,
    pub http: HttpConfig,
}

impl Default for SendgridConfig {
    fn default() -> Self {
        SendgridConfig {
            base_url: PRODUCTION_URL.into(),
            api_key: Secret::default(),
            from_email: String::new(),
            from_name: None,
            http: HttpConfig::default(),
        }
    }
}

impl SendgridConfig {
    pub fn validate(&self) -> Result<(), ProviderError> {
        configured(self.api_key.expose(), "providers.sendgrid.api_key")?;
        configured(&self.from_email, "providers.sendgrid.from_email")?;
        Ok(())
    }
}

/// The mail-send request: one personalization carrying `delivery_id` (echoed by webhook
/// events), text before html, the category, SendGrid's own tracking off (herald tracks).
pub fn build_request(cfg: &SendgridConfig, d: &ChannelDelivery) -> Result<HttpRequest, ProviderError> {
    let email = Email::of(d)?;
    let content: Vec<Value> = [("text/plain", email.text), ("text/html", email.html)]
        .into_iter()
        .filter_map(|(kind, value)| Some(json!({"type": kind, "value": value?})))
        .collect();
    let mut from = json!({"email": cfg.from_email});
    if let Some(name) = &cfg.from_name {
        from["name"] = name.as_str().into();
    }
    let body = json!({
        "personalizations": [{"to": [{"email": email.to}], "custom_args": {"delivery_id": d.delivery_id}}],
        "from": from,
        "subject": email.subject,
        "content": content,
        "categories": [d.category],
        "custom_args": {"event_id": d.event_id},
        "tracking_settings": {"click_tracking": {"enable": false}, "open_tracking": {"enable": false}},
    });
    Ok(HttpRequest::post(endpoint(&cfg.base_url, "v3/mail/send")).header("authorization", format!("Bearer {}", cfg.api_key.expose())).json(&body))
}

/// Maps a SendGrid answer to its class.
pub fn classify(resp: &HttpResponse) -> Classification {
    if matches!(resp.status, 200 | 202) {
        return Classification::sent(resp.header("x-message-id").unwrap_or_default());
    }
    let json = resp.json();
    let errors = json.as_ref().and_then(|v| v["errors"].as_array()).map(Vec::as_slice).unwrap_or_default();
    let messages: Vec<&str> = errors.iter().filter_map(|e| e["message"].as_str()).collect();
    let why = if messages.is_empty() { format!("SendGrid {}", resp.summary()) } else { format!("SendGrid {}: {}", resp.status, messages.join("; ")) };
    match resp.status {
        400 if errors.iter().any(names_a_recipient) => Classification::invalid(why),
        429 => {
            let now = resp.received_at;
            let reset = resp.header("x-ratelimit-reset").and_then(|v| parse_epoch_reset(v, now));
            Classification::throttled(reset.or_else(|| resp.retry_after()), why)
        }
        // A refused API key, an exhausted plan, an unverified sender or a block on the
        // account: no mail will go through until an operator fixes it.
        401 | 403 => Classification::auth_failed(why),
        _ => Classification::by_status(resp, why),
    }
}

/// Whether an error's `field` is a recipient address, e.g. `personalizations.0.to.0.email`.
fn names_a_recipient(error: &Value) -> bool {
    let field = error["field"].as_str().unwrap_or_default();
    let parts: Vec<&str> = field.split('.').collect();
    matches!(parts.as_slice(), ["personalizations", _, "to" | "cc" | "bcc", _, "email"])
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::RenderedContent;
    use crate::providers::tests::{body_json, delivery, resp};

    fn cfg() -> SendgridConfig {
        SendgridConfig {
            api_key: Secret::new("SG.secret"),
            from_email: "news@example.com".into(),
            from_name: Some("Herald".into()),
            ..SendgridConfig::default()
        }
    }

    fn mail() -> ChannelDelivery {
        let content = RenderedContent {
            subject: Some("Your order shipped".into()),
            text: Some("It ships.".into()),
            html: Some("<p>It ships.</p>".into()),
            ..Default::default()
        };
        delivery("email", "ana@example.org", content)
    }

    #[test]
    fn builds_the_mail_send_request() {
        let req = build_request(&cfg(), &mail()).unwrap();
        assert_eq!(req.url, "https://api.sendgrid.com/v3/mail/send");
        assert_eq!(req.header_value("authorization"), Some("Bearer SG.secret"));
        assert_eq!(req.header_value("content-type"), Some("application/json"));
        assert_eq!(
            body_json(&req),
            json!({
                "personalizations": [{"to": [{"email": "ana@example.org"}], "custom_args": {"delivery_id": "d-42"}}],
                "from": {"email": "news@example.com", "name": "Herald"},
                "subject": "Your order shipped",
                "content": [{"type": "text/plain", "value": "It ships."}, {"type": "text/html", "value": "<p>It ships.</p>"}],
                "categories": ["order_shipped"],
                "custom_args": {"event_id": "e-1"},
                "tracking_settings": {"click_tracking": {"enable": false}, "open_tracking": {"enable": false}},
            })
        );
        assert!(!format!("{req:?}").contains("SG.secret"));
    }

    #[test]
    fn sends_only_the_parts_rendered() {
        let mut d = mail();
        d.content.text = None;
        let body = body_json(&build_request(&SendgridConfig { from_name: None, ..cfg() }, &d).unwrap());
        assert_eq!(body["content"], json!([{"type": "text/html", "value": "<p>It ships.</p>"}]));
        assert_eq!(body["from"], json!({"email": "news@example.com"}));
        d.content.html = None;
        assert!(matches!(build_request(&cfg(), &d), Err(ProviderError::InvalidDelivery(_))));
        let mut d = mail();
        d.content.subject = None;
        assert!(matches!(build_request(&cfg(), &d), Err(ProviderError::InvalidDelivery(_))));
        d = mail();
        d.address = "nobody".into();
        assert!(matches!(build_request(&cfg(), &d), Err(ProviderError::InvalidAddress(_))));
    }

    fn error(status: u16, field: Option<&str>, message: &str) -> HttpResponse {
        resp(status, &json!({"errors": [{"message": message, "field": field, "help": null}]}).to_string())
    }

    #[test]
    fn classifies_every_status_in_the_table() {
        let ok = resp(202, "").with_header("X-Message-Id", "W5Cz4bGkQ1a0fTzJ8mA3Vw");
        assert_eq!(classify(&ok), Classification::sent("W5Cz4bGkQ1a0fTzJ8mA3Vw"));
        assert_eq!(classify(&resp(200, "")).label(), "sent"); // sandbox mode
        let bad_to = error(400, Some("personalizations.0.to.0.email"), "Does not contain a valid address.");
        assert_eq!(classify(&bad_to), Classification::invalid("SendGrid 400: Does not contain a valid address."));
        for (status, field, message, class) in [
            (400, Some("from.email"), "The from email does not contain a valid address.", "permanent"),
            (400, Some("subject"), "The subject is required.", "permanent"),
            (401, None, "The provided authorization grant is invalid, expired, or revoked", "auth_failed"),
            (401, None, "Maximum credits exceeded", "auth_failed"),
            (403, None, "The from address does not match a verified Sender Identity.", "auth_failed"),
            (413, None, "content too large", "permanent"),
            (429, None, "too many requests", "throttled"),
            (500, None, "internal error", "transient"),
            (503, None, "unavailable", "transient"),
        ] {
            assert_eq!(classify(&error(status, field, message)).label(), class, "{status} {message}");
        }
        let mut limited = error(429, None, "too many requests").with_header("X-RateLimit-Reset", "1767225660");
        limited.received_at = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(classify(&limited), Classification::throttled(Some(Duration::from_secs(60)), "SendGrid 429: too many requests"));
        assert_eq!(classify(&resp(502, "bad gateway")).label(), "transient");
    }
}
