//! Mailchimp Transactional (Mandrill): `POST {base}/api/1.0/messages/send` with the API
//! key in the JSON body; the verdict is per recipient in a 200 array.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{configured, endpoint, Classification, Email, HttpConfig, HttpRequest, HttpResponse, ProviderError};
use crate::config::Secret;
use crate::model::ChannelDelivery;

pub const PRODUCTION_URL: &str = "https://mandrillapp.com";

/// `[providers.mandrill]`: one API key, one sender.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MandrillConfig {
    pub base_url: String,
    pub api_key: Secret,
    pub from_email: String,
    pub from_name: Option<String>,
    pub http: HttpConfig,
}

impl Default for MandrillConfig {
    fn default() -> Self {
        MandrillConfig {
            base_url: PRODUCTION_URL.into(),
            api_key: Secret::default(),
            from_email: String::new(),
            from_name: None,
            http: HttpConfig::default(),
        }
    }
}

impl MandrillConfig {
    pub fn validate(&self) -> Result<(), ProviderError> {
        configured(self.api_key.expose(), "providers.mandrill.api_key")?;
        configured(&self.from_email, "providers.mandrill.from_email")?;
        Ok(())
    }
}

/// The send request for one recipient; Mandrill's tracking is off (herald tracks).
pub fn build_request(cfg: &MandrillConfig, d: &ChannelDelivery) -> Result<HttpRequest, ProviderError> {
    let email = Email::of(d)?;
    let mut message = json!({
        "subject": email.subject,
        "from_email": cfg.from_email,
        "to": [{"email": email.to, "type": "to"}],
        "headers": {},
        "metadata": {"delivery_id": d.delivery_id},
        "tags": [d.category],
        "track_opens": false,
        "track_clicks": false,
    });
    for (key, value) in [("html", email.html), ("text", email.text), ("from_name", cfg.from_name.as_deref())] {
        if let Some(v) = value {
            message[key] = v.into();
        }
    }
    let body = json!({"key": cfg.api_key.expose(), "message": message});
    Ok(HttpRequest::post(endpoint(&cfg.base_url, "api/1.0/messages/send")).json(&body))
}

/// Maps a Mandrill answer to its class: the first recipient's `status` / `reject_reason`
/// on 200, the error `name` otherwise.
pub fn classify(resp: &HttpResponse) -> Classification {
    let json = resp.json();
    let first = json.as_ref().and_then(|v| v.as_array()).and_then(|a| a.first());
    match (resp.status, first) {
        (200, Some(r)) => recipient(r),
        _ => error(resp, json.as_ref()),
    }
}

fn recipient(r: &Value) -> Classification {
    let status = r["status"].as_str().unwrap_or_default();
    let reject = r["reject_reason"].as_str().unwrap_or_default();
    let why = format!("Mandrill {status} {reject}").trim_end().to_string();
    match (status, reject) {
        // `queued` includes quota holds (hourly-quota-exhausted): Mandrill sends it later.
        ("sent" | "queued" | "scheduled", _) => Classification::sent(r["_id"].as_str().unwrap_or_default()),
        ("invalid", _) => Classification::invalid(why),
        ("rejected", "hard-bounce" | "spam" | "unsub" | "invalid") => Classification::invalid(why),
        ("rejected", "soft-bounce") => Classification::transient(why),
        // custom / rule: policy; invalid-sender / unsigned / test-mode-limit: configuration.
        _ => Classification::permanent(why),
    }
}

fn error(resp: &HttpResponse, json: Option<&Value>) -> Classification {
    let name = json.and_then(|v| v["name"].as_str());
    let Some(name) = name else {
        return Classification::by_status(resp, format!("Mandrill {}", resp.summary()));
    };
    let message = json.and_then(|v| v["message"].as_str()).unwrap_or_default();
    let why = format!("Mandrill {name}: {message}");
    match name {
        "ServiceUnavailable" | "GeneralError" => Classification::transient(why),
        "ValidationError" | "Unknown_Template" => Classification::permanent(why),
        // The key or the account is refused: nothing goes through until it is fixed.
        "Invalid_Key" | "PaymentRequired" | "Unknown_Subaccount" => Classification::auth_failed(why),
        // Mandrill answers 500 for every API error, so an unknown name falls to the status.
        _ => Classification::by_status(resp, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RenderedContent;
    use crate::providers::tests::{body_json, delivery, resp};

    fn cfg() -> MandrillConfig {
        MandrillConfig {
            api_key: Secret::new("md-secret"),
            from_email: "news@example.com".into(),
            from_name: Some("Herald".into()),
            ..MandrillConfig::default()
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
    fn builds_the_send_request() {
        let req = build_request(&cfg(), &mail()).unwrap();
        assert_eq!(req.url, "https://mandrillapp.com/api/1.0/messages/send");
        assert_eq!(req.headers, [("content-type".to_string(), "application/json".to_string())]);
        assert_eq!(
            body_json(&req),
            json!({"key": "md-secret", "message": {
                "html": "<p>It ships.</p>",
                "text": "It ships.",
                "subject": "Your order shipped",
                "from_email": "news@example.com",
                "from_name": "Herald",
                "to": [{"email": "ana@example.org", "type": "to"}],
                "headers": {},
                "metadata": {"delivery_id": "d-42"},
                "tags": ["order_shipped"],
                "track_opens": false,
                "track_clicks": false,
            }})
        );
        assert!(!format!("{req:?}").contains("md-secret"), "the key is in the body; Debug omits it");
        let mut d = mail();
        d.content.html = None;
        let body = body_json(&build_request(&MandrillConfig { from_name: None, ..cfg() }, &d).unwrap());
        assert!(body["message"].get("html").is_none() && body["message"].get("from_name").is_none());
    }

    fn answer(status: &str, reject: Option<&str>) -> HttpResponse {
        let r = json!([{"email": "ana@example.org", "status": status, "reject_reason": reject,
                        "queued_reason": null, "_id": "abc123abc123abc123abc123abc123ab"}]);
        resp(200, &r.to_string())
    }

    #[test]
    fn classifies_every_status_and_reject_reason() {
        for status in ["sent", "queued", "scheduled"] {
            assert_eq!(classify(&answer(status, None)), Classification::sent("abc123abc123abc123abc123abc123ab"));
        }
        assert_eq!(classify(&answer("invalid", None)), Classification::invalid("Mandrill invalid"));
        for (reject, class) in [
            ("hard-bounce", "invalid_address"),
            ("spam", "invalid_address"),
            ("unsub", "invalid_address"),
            ("invalid", "invalid_address"),
            ("soft-bounce", "transient"),
            ("custom", "permanent"),
            ("rule", "permanent"),
            ("invalid-sender", "permanent"),
            ("unsigned", "permanent"),
            ("test-mode-limit", "permanent"),
        ] {
            let c = classify(&answer("rejected", Some(reject)));
            assert_eq!(c.label(), class, "{reject}");
        }
        assert_eq!(classify(&answer("rejected", Some("spam"))).reason(), Some("Mandrill rejected spam"));
    }

    #[test]
    fn classifies_error_bodies_by_name() {
        let err = |name: &str| resp(500, &json!({"status": "error", "code": -1, "name": name, "message": "m"}).to_string());
        for (name, class) in [
            ("ValidationError", "permanent"),
            ("Invalid_Key", "auth_failed"),
            ("PaymentRequired", "auth_failed"),
            ("Unknown_Subaccount", "auth_failed"),
            ("Unknown_Template", "permanent"),
            ("ServiceUnavailable", "transient"),
            ("GeneralError", "transient"),
            ("SomethingNew", "transient"),
        ] {
            assert_eq!(classify(&err(name)).label(), class, "{name}");
        }
        assert_eq!(classify(&err("Invalid_Key")), Classification::auth_failed("Mandrill Invalid_Key: m"));
        assert_eq!(classify(&resp(503, "<html>")).label(), "transient");
        assert_eq!(classify(&resp(200, "[]")).label(), "permanent");
    }
}
