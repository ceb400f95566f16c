//! Mailchimp Transactional (Mandrill): `POST /api/1.0/messages/send[.json]` with the API
//! key in the JSON body. 200 with one result per recipient (`sent`, `queued`, `scheduled`,
//! `rejected` + `reject_reason`, `invalid`); API errors are HTTP 500 with
//! `{"status":"error","code","name","message"}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::http::{is_email, json, random_hex, Incoming};
use super::{Provider, Shared, Verdict};

/// More recipients than this are always queued (async).
const SYNC_RECIPIENTS: usize = 10;

fn error(code: i32, name: &str, message: &str) -> Response {
    json(StatusCode::INTERNAL_SERVER_ERROR, json!({ "status": "error", "code": code, "name": name, "message": message }))
}

fn validation_error(detail: Value) -> Response {
    error(-2, "ValidationError", &format!("Validation error: {detail}"))
}

/// The answer for a fault named by a Mandrill error name.
pub(super) fn fault(name: &str) -> Option<Response> {
    let (code, message) = match name {
        "GeneralError" => (-1, "An unexpected error occurred processing the request. Mandrill developers will be notified."),
        "ServiceUnavailable" => (-1, "Service temporarily unavailable"),
        "PaymentRequired" => (-1, "The requested feature requires payment."),
        "Invalid_Key" => (-1, "Invalid API key"),
        "ValidationError" => (-2, "Validation error: {\"message\":\"Please enter a valid message\"}"),
        "Unknown_Subaccount" => (12, "No subaccount exists with the id 'unknown'"),
        "Unknown_Template" => (5, "No such template \"unknown\""),
        _ => return None,
    };
    Some(error(code, name, message))
}

pub(super) async fn send(State(sb): State<Shared>, req: Incoming) -> Response {
    let verdict = check(&sb, &req);
    sb.answer(Provider::Mandrill, &req, verdict).await
}

fn check(sb: &Shared, req: &Incoming) -> Verdict {
    let body = req.json().unwrap_or(Value::Null);
    match body.get("key").and_then(Value::as_str) {
        None => return Err(error(-1, "Invalid_Key", "You must specify a key value")),
        Some(key) if key != sb.config.mandrill.api_key.expose() => return Err(error(-1, "Invalid_Key", "Invalid API key")),
        Some(_) => {}
    }
    let Some(message) = body.get("message").filter(|m| m.is_object()) else {
        return Err(validation_error(json!({ "message": "Please enter an array" })));
    };
    let recipients = message.get("to").and_then(Value::as_array).filter(|to| !to.is_empty());
    let Some(recipients) = recipients else {
        return Err(validation_error(json!({ "message": { "to": "Please enter an array" } })));
    };
    if recipients.iter().any(|r| r.get("email").and_then(Value::as_str).is_none()) {
        return Err(validation_error(json!({ "message": { "to": { "email": "Please enter a value" } } })));
    }
    if let Some(from) = message.get("from_email") {
        if !from.as_str().is_some_and(is_email) {
            return Err(validation_error(json!({ "message": { "from_email": "An email address must contain a single @" } })));
        }
    }
    let scheduled = body.get("send_at").and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let queued = recipients.len() > SYNC_RECIPIENTS;
    let results: Vec<Value> = recipients
        .iter()
        .map(|r| {
            let email = r.get("email").and_then(Value::as_str).unwrap_or_default();
            let bounced = sb.sets(|s, _| s.mandrill_bounce.contains(&email.to_ascii_lowercase()));
            let (status, reject, queued_reason) = match () {
                _ if !is_email(email) => ("invalid", None, None),
                _ if bounced => ("rejected", Some("hard-bounce"), None),
                _ if scheduled => ("scheduled", None, None),
                _ if queued => ("queued", None, Some("multiple-recipients")),
                _ => ("sent", None, None),
            };
            json!({ "email": email, "status": status, "reject_reason": reject, "queued_reason": queued_reason, "_id": random_hex(16) })
        })
        .collect();
    Ok(json(StatusCode::OK, Value::Array(results)))
}
