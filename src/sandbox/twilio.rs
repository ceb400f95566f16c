//! Twilio Programmable Messaging: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`
//! (form body, Basic `AccountSid:AuthToken`), answered 201 with the Message resource or
//! with Twilio's `{code, message, more_info, status}` error.
//!
//! Sender rule, as the contract sheet states it: exactly one of `From` or
//! `MessagingServiceSid`; neither and both are refused with code 21603.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::http::{is_e164, json, random_hex, sms_parts, Form, Incoming};
use super::{Provider, Shared, Verdict};

const MAX_BODY_CHARS: usize = 1600;
const MAX_MEDIA: usize = 10;

/// Twilio's error body.
fn error(status: StatusCode, code: u32, message: &str) -> Response {
    json(
        status,
        json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        }),
    )
}

fn invalid(code: u32, message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, code, message)
}

/// The answer for a fault named by a Twilio error code (or `429`, `500`, `503`).
pub(super) fn fault(name: &str) -> Option<Response> {
    let (status, code, message) = match name {
        "20429" | "429" => (StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests"),
        "20500" | "500" => (StatusCode::INTERNAL_SERVER_ERROR, 20500, "Internal Server Error"),
        "20503" | "503" => (StatusCode::SERVICE_UNAVAILABLE, 20503, "Service Unavailable"),
        "20003" => (StatusCode::UNAUTHORIZED, 20003, "Authenticate"),
        "21211" => (StatusCode::BAD_REQUEST, 21211, "The 'To' number is not a valid phone number."),
        "21408" => (StatusCode::BAD_REQUEST, 21408, "Permission to send an SMS has not been enabled for the region indicated by the 'To' number."),
        "21606" => (
            StatusCode::BAD_REQUEST,
            21606,
            "The 'From' phone number provided is not a valid message-capable Twilio phone number for this destination/account.",
        ),
        "21610" => (StatusCode::BAD_REQUEST, 21610, "Attempt to send to unsubscribed recipient"),
        "21614" => (StatusCode::BAD_REQUEST, 21614, "'To' number is not a valid mobile number"),
        "21617" => (StatusCode::BAD_REQUEST, 21617, "The concatenated message body exceeds the 1600 character limit."),
        _ => return None,
    };
    Some(error(status, code, message))
}

pub(super) async fn send(State(sb): State<Shared>, Path(account): Path<String>, req: Incoming) -> Response {
    let verdict = check(&sb, &account, &req);
    sb.answer(Provider::Twilio, &req, verdict).await
}

fn check(sb: &Shared, account: &str, req: &Incoming) -> Verdict {
    let cfg = &sb.config.twilio;
    match req.basic() {
        None => return Err(error(StatusCode::UNAUTHORIZED, 20003, "Authenticate")),
        Some((sid, token)) if sid != cfg.account_sid || token != cfg.auth_token.expose() => {
            return Err(error(StatusCode::UNAUTHORIZED, 20003, "Authentication Error - invalid username"));
        }
        Some(_) => {}
    }
    if account != cfg.account_sid {
        let message = format!("The requested resource {} was not found", req.uri.path());
        return Err(error(StatusCode::NOT_FOUND, 20404, &message));
    }
    let form = req.form();
    let message = validate(sb, &form)?;
    Ok(json(StatusCode::CREATED, message))
}

/// Field checks in Twilio's order; returns the Message resource to create.
fn validate(sb: &Shared, form: &Form) -> Result<serde_json::Value, Response> {
    let to = form.get("To").filter(|t| !t.is_empty()).ok_or_else(|| invalid(21604, "A 'To' phone number is required."))?;
    let address = to.strip_prefix("whatsapp:").unwrap_or(to);
    if !is_e164(address) {
        return Err(invalid(21211, &format!("The 'To' number {to} is not a valid phone number.")));
    }
    let from = form.get("From").filter(|f| !f.is_empty());
    let service = form.get("MessagingServiceSid").filter(|s| !s.is_empty());
    match (from, service) {
        (None, None) => return Err(invalid(21603, "A 'From' phone number is required.")),
        (Some(_), Some(_)) => return Err(invalid(21603, "Specify either 'From' or 'MessagingServiceSid', not both.")),
        (Some(f), None) if !is_sender(f) => {
            let message = format!("The 'From' number {f} is not a valid phone number, shortcode, or alphanumeric sender ID.");
            return Err(invalid(21212, &message));
        }
        (None, Some(s)) if !is_sid(s, "MG") => {
            return Err(invalid(21701, &format!("The Messaging Service Sid {s} is invalid.")));
        }
        _ => {}
    }
    let body = form.get("Body").unwrap_or_default();
    let media = form.all("MediaUrl");
    if body.is_empty() && media.is_empty() {
        return Err(invalid(21602, "Message body is required."));
    }
    if body.chars().count() > MAX_BODY_CHARS {
        return Err(invalid(21617, "The concatenated message body exceeds the 1600 character limit."));
    }
    if media.len() > MAX_MEDIA {
        return Err(invalid(21623, "Number of media files exceeds allowed limit of 10."));
    }
    if let Some(cb) = form.get("StatusCallback") {
        let ok = url::Url::parse(cb).is_ok_and(|u| u.host_str().is_some_and(|h| !h.contains('_')));
        if !ok {
            return Err(invalid(21609, &format!("The StatusCallback URL {cb} is not a valid URL.")));
        }
    }
    let (landline, unsubscribed) = sb.sets(|s, _| (s.twilio_landline.contains(address), s.twilio_unsubscribed.contains(address)));
    if landline {
        return Err(invalid(21614, &format!("'To' number {to} is not a valid mobile number")));
    }
    if unsubscribed {
        return Err(invalid(21610, "Attempt to send to unsubscribed recipient"));
    }
    Ok(message_resource(&sb.config.twilio.account_sid, to, from, service, body, media.len()))
}

/// The Message resource as Twilio returns it on create (counts are strings, dates RFC 2822).
fn message_resource(account: &str, to: &str, from: Option<&str>, service: Option<&str>, body: &str, media: usize) -> serde_json::Value {
    let sid = format!("SM{}", random_hex(16));
    let now = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S %z").to_string();
    let uri = format!("/2010-04-01/Accounts/{account}/Messages/{sid}");
    json!({
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": now,
        "date_sent": null,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": from,
        "messaging_service_sid": service,
        "num_media": media.to_string(),
        "num_segments": sms_parts(body, false).to_string(),
        "price": null,
        "price_unit": "USD",
        "sid": sid,
        "status": if service.is_some() { "accepted" } else { "queued" },
        "subresource_uris": { "media": format!("{uri}/Media.json") },
        "to": to,
        "uri": format!("{uri}.json"),
    })
}

/// An E.164 number, a 5–6 digit short code, an alphanumeric sender id (≤11, one letter at
/// least) or a channel address (`whatsapp:+…`).
fn is_sender(from: &str) -> bool {
    let address = from.strip_prefix("whatsapp:").unwrap_or(from);
    is_e164(address)
        || ((5..=6).contains(&address.len()) && address.bytes().all(|b| b.is_ascii_digit()))
        || ((1..=11).contains(&address.len())
            && address.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ')
            && address.bytes().any(|b| b.is_ascii_alphabetic()))
}

/// `<prefix>` + 32 hex digits.
fn is_sid(sid: &str, prefix: &str) -> bool {
    sid.strip_prefix(prefix).is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_numbers_short_codes_or_alphanumeric_ids() {
        for ok in ["+14155550100", "12345", "HERALD", "whatsapp:+14155550100"] {
            assert!(is_sender(ok), "{ok}");
        }
        for bad in ["bad_sender!", "TOOLONGSENDERID", "123", "+1-415"] {
            assert!(!is_sender(bad), "{bad}");
        }
    }

    #[test]
    fn the_message_resource_has_a_sid_and_string_counts() {
        let m = message_resource("AC1", "+14155550100", Some("+14155550101"), None, &"x".repeat(200), 0);
        let sid = m["sid"].as_str().unwrap();
        assert!(is_sid(sid, "SM"), "{sid}");
        assert_eq!((m["status"].as_str(), m["num_segments"].as_str()), (Some("queued"), Some("2")));
        assert!(m["date_created"].as_str().unwrap().ends_with("+0000"));
    }
}
