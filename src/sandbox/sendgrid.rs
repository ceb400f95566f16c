//! SendGrid v3 Mail Send: `POST /v3/mail/send` with `Authorization: Bearer SG.…`; 202 and
//! `X-Message-Id` on success, `{"errors":[{message, field, help}]}` otherwise (every
//! validation error at once, as SendGrid reports them). `mail_settings.sandbox_mode` → 200.

use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use super::http::{is_email, json, now_s, with_header, Incoming};
use super::{Provider, Shared, Verdict};

const MAX_PERSONALIZATIONS: usize = 1000;
const RATE_LIMIT: u32 = 600;

/// One entry of `errors`.
fn entry(message: &str, field: Option<&str>, help: Option<&str>) -> Value {
    let help = help.map(|anchor| format!("http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#{anchor}"));
    json!({ "message": message, "field": field, "help": help })
}

fn errors(status: StatusCode, entries: Vec<Value>) -> Response {
    json(status, json!({ "errors": entries }))
}

/// 429 with the rate-limit headers; the window resets `reset_in_s` from now.
fn too_many_requests(reset_in_s: u64) -> Response {
    let r = json(StatusCode::TOO_MANY_REQUESTS, json!({ "errors": [{ "field": null, "message": "too many requests" }] }));
    let r = with_header(r, "x-ratelimit-limit", RATE_LIMIT);
    let r = with_header(r, "x-ratelimit-remaining", 0);
    with_header(r, "x-ratelimit-reset", now_s() + reset_in_s as i64)
}

/// The answer for a fault named by an HTTP status: `429` (rate limit, reset after
/// `retry_after_s`, default 1 s), `401`, `403`, `413`, `500`, `503`.
pub(super) fn fault(name: &str, retry_after_s: Option<u64>) -> Option<Response> {
    let (status, message) = match name {
        "429" => return Some(too_many_requests(retry_after_s.unwrap_or(1))),
        "401" => (StatusCode::UNAUTHORIZED, "Maximum credits exceeded"),
        "403" => (StatusCode::FORBIDDEN, "access forbidden"),
        "413" => (StatusCode::PAYLOAD_TOO_LARGE, "content too large"),
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        "503" => (StatusCode::SERVICE_UNAVAILABLE, "service unavailable"),
        _ => return None,
    };
    Some(errors(status, vec![entry(message, None, None)]))
}

pub(super) async fn send(State(sb): State<Shared>, req: Incoming) -> Response {
    let verdict = check(&sb, &req);
    sb.answer(Provider::Sendgrid, &req, verdict).await
}

fn check(sb: &Shared, req: &Incoming) -> Verdict {
    match req.bearer() {
        None => return Err(errors(StatusCode::UNAUTHORIZED, vec![entry("authorization required", None, None)])),
        Some(key) if key != sb.config.sendgrid.api_key.expose() => {
            let message = "The provided authorization grant is invalid, expired, or revoked";
            return Err(errors(StatusCode::UNAUTHORIZED, vec![entry(message, None, None)]));
        }
        Some(_) => {}
    }
    let Some(mail @ Value::Object(_)) = req.json() else {
        return Err(errors(StatusCode::BAD_REQUEST, vec![entry("Bad Request", None, None)]));
    };
    let problems = validate(&mail);
    if !problems.is_empty() {
        return Err(errors(StatusCode::BAD_REQUEST, problems));
    }
    if mail.pointer("/mail_settings/sandbox_mode/enable") == Some(&Value::Bool(true)) {
        return Ok(StatusCode::OK.into_response());
    }
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
    Ok(with_header(StatusCode::ACCEPTED.into_response(), "x-message-id", id))
}

/// Every problem with the mail, in SendGrid's wording.
fn validate(mail: &Value) -> Vec<Value> {
    let mut problems = Vec::new();
    let templated = mail.get("template_id").and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    let personalizations = mail.get("personalizations").and_then(Value::as_array).filter(|p| !p.is_empty());
    match personalizations {
        None => problems.push(entry(
            "The personalizations field is required and must have at least one personalization.",
            Some("personalizations"),
            Some("message.personalizations"),
        )),
        Some(list) if list.len() > MAX_PERSONALIZATIONS => problems.push(entry(
            "The personalizations field is limited to 1000 personalizations per request.",
            Some("personalizations"),
            Some("message.personalizations"),
        )),
        Some(list) => {
            for (i, p) in list.iter().enumerate() {
                recipients(i, p, &mut problems);
            }
        }
    }
    match mail.get("from") {
        Some(from) if from.get("email").and_then(Value::as_str).is_some_and(is_email) => {}
        Some(from) if from.get("email").is_some() => problems.push(entry(
            "The from email does not contain a valid address.",
            Some("from.email"),
            Some("message.from"),
        )),
        _ => problems.push(entry(
            "The from object must be provided for every email send. It is an object that requires the email parameter, but may also contain a name parameter.",
            Some("from"),
            Some("message.from"),
        )),
    }
    let has_subject = |v: &Value| v.get("subject").and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let every_personalization_has_one = personalizations.is_some_and(|list| list.iter().all(has_subject));
    if !templated && !has_subject(mail) && !every_personalization_has_one {
        problems.push(entry(
            "The subject is required. You can get around this requirement if you use a template with a subject defined or if every personalization has a subject defined.",
            Some("subject"),
            Some("message.subject"),
        ));
    }
    match mail.get("content").and_then(Value::as_array).filter(|c| !c.is_empty()) {
        None if !templated => problems.push(entry(
            "Unless a valid template_id is provided, the content parameter is required. There must be at least one defined content block. We typically suggest both text/plain and text/html blocks are included, but only one block is required.",
            Some("content"),
            Some("message.content"),
        )),
        None => {}
        Some(blocks) => {
            for (i, block) in blocks.iter().enumerate() {
                for part in ["type", "value"] {
                    if block.get(part).and_then(Value::as_str).is_none_or(str::is_empty) {
                        problems.push(entry(
                            &format!("The content {part} must be a string at least one character in length."),
                            Some(&format!("content.{i}.{part}")),
                            Some(&format!("message.content.{part}")),
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// `to` (required), `cc`, `bcc` of personalization `i`: valid addresses, each only once.
fn recipients(i: usize, personalization: &Value, problems: &mut Vec<Value>) {
    let to = personalization.get("to").and_then(Value::as_array).filter(|t| !t.is_empty());
    if to.is_none() {
        problems.push(entry(
            "The to array is required for all personalization objects, and must have at least one email object with a valid email address.",
            Some(&format!("personalizations.{i}.to")),
            Some("message.personalizations.to"),
        ));
    }
    let mut seen = HashSet::new();
    for kind in ["to", "cc", "bcc"] {
        let Some(list) = personalization.get(kind).and_then(Value::as_array) else {
            continue;
        };
        for (j, r) in list.iter().enumerate() {
            let email = r.get("email").and_then(Value::as_str).unwrap_or_default();
            if !is_email(email) {
                problems.push(entry(
                    "Does not contain a valid address.",
                    Some(&format!("personalizations.{i}.{kind}.{j}.email")),
                    Some(&format!("message.personalizations.{kind}")),
                ));
            } else if !seen.insert(email.to_ascii_lowercase()) {
                problems.push(entry(
                    &format!("Each email address in the personalization block should be unique between to, cc, and bcc. We found the first duplicate instance of [{email}] in the personalizations.{i}.{kind} field."),
                    Some(&format!("personalizations.{i}.{kind}")),
                    Some("message.recipient_errors"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(mail: Value) -> Vec<String> {
        validate(&mail).iter().map(|e| e["field"].as_str().unwrap_or("null").to_string()).collect()
    }

    #[test]
    fn a_complete_mail_has_no_problems() {
        let mail = json!({
            "personalizations": [{ "to": [{ "email": "a@example.com" }] }],
            "from": { "email": "noreply@example.com" }, "subject": "hi",
            "content": [{ "type": "text/plain", "value": "hello" }]
        });
        assert!(fields(mail).is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mail =
            json!({ "personalizations": [{ "to": [{ "email": "nope" }], "cc": [{ "email": "b@example.com" }, { "email": "B@example.com" }] }] });
        assert_eq!(fields(mail), ["personalizations.0.to.0.email", "personalizations.0.cc", "from", "subject", "content"]);
    }

    #[test]
    fn a_template_stands_in_for_subject_and_content() {
        let mail = json!({
            "personalizations": [{ "to": [{ "email": "a@example.com" }] }],
            "from": { "email": "noreply@example.com" }, "template_id": "d-123"
        });
        assert!(fields(mail).is_empty());
    }
}
