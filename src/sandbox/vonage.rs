//! Vonage (Nexmo) SMS API: `POST /sms/json`, form or JSON body, credentials in the body or
//! Basic auth. HTTP 200 for success and failure alike; the outcome is the string `status`
//! of each entry in `messages` (one entry per part of a long text).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::http::{json, random_hex, sms_parts, Form, Incoming};
use super::{Provider, Shared, Verdict};

/// Price per part, EUR.
const PRICE: f64 = 0.0333;
const NETWORK: &str = "23410";

/// Every SMS API status with its error text (0 = success is not an error).
const STATUSES: [(&str, &str); 18] = [
    ("1", "Throttled"),
    ("2", "Missing Parameters"),
    ("3", "Invalid Parameters"),
    ("4", "Bad Credentials"),
    ("5", "Internal Error"),
    ("6", "Invalid Message"),
    ("7", "Number barred"),
    ("8", "Partner Account barred"),
    ("9", "Partner quota violation"),
    ("10", "Too many existing binds"),
    ("11", "Account not enabled for HTTP"),
    ("12", "Message too long"),
    ("14", "Invalid signature"),
    ("15", "Invalid sender address"),
    ("22", "Invalid network code"),
    ("23", "Invalid callback url"),
    ("29", "Non-Whitelisted Destination"),
    ("33", "Number de-activated"),
];

/// One failed entry, HTTP 200.
fn failure(status: &str, text: &str) -> Response {
    json(StatusCode::OK, json!({ "message-count": "1", "messages": [{ "status": status, "error-text": text }] }))
}

/// The answer for a fault named by a status (`"1"` Throttled …) or an HTTP error (`500`,
/// `502`, `503`: not JSON, as a real outage looks to the client).
pub(super) fn fault(name: &str) -> Option<Response> {
    if let Some((status, text)) = STATUSES.iter().find(|(s, _)| *s == name) {
        return Some(failure(status, text));
    }
    let status = match name {
        "500" | "502" | "503" => StatusCode::from_u16(name.parse().ok()?).ok()?,
        _ => return None,
    };
    Some((status, [("content-type", "text/html")], format!("<html><body><h1>{status}</h1></body></html>")).into_response())
}

pub(super) async fn send(State(sb): State<Shared>, req: Incoming) -> Response {
    let verdict = check(&sb, &req);
    sb.answer(Provider::Vonage, &req, verdict).await
}

/// The parameters, from JSON (values as strings) or a form.
fn params(req: &Incoming) -> Form {
    if !req.is_json() {
        return req.form();
    }
    match req.json() {
        Some(Value::Object(fields)) => Form(
            fields
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
        ),
        _ => Form::default(),
    }
}

fn check(sb: &Shared, req: &Incoming) -> Verdict {
    let p = params(req);
    let basic = req.basic();
    let key = p.get("api_key").map(str::to_string).or_else(|| basic.as_ref().map(|(k, _)| k.clone()));
    let secret = p.get("api_secret").map(str::to_string).or_else(|| basic.as_ref().map(|(_, s)| s.clone()));
    let cfg = &sb.config.vonage;
    match (key, secret) {
        (None, _) => return Err(failure("2", "Missing api_key")),
        (_, None) => return Err(failure("2", "Missing api_secret")),
        (Some(k), Some(s)) if k != cfg.api_key || s != cfg.api_secret.expose() => return Err(failure("4", "Bad Credentials")),
        _ => {}
    }
    let missing = |name: &str| failure("2", &format!("Missing {name} param"));
    let bad = |name: &str| failure("3", &format!("Invalid {name} param"));
    let from = p.get("from").filter(|f| !f.is_empty()).ok_or_else(|| missing("from"))?;
    let to = p.get("to").filter(|t| !t.is_empty()).ok_or_else(|| missing("to"))?;
    if !((7..=15).contains(&to.len()) && to.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad("to"));
    }
    let alphanumeric_sender = (1..=11).contains(&from.len()) && from.bytes().all(|b| b.is_ascii_alphanumeric());
    let numeric_sender = (1..=15).contains(&from.len()) && from.bytes().all(|b| b.is_ascii_digit());
    if !(alphanumeric_sender || numeric_sender) {
        return Err(failure("15", "Invalid sender address"));
    }
    let kind = p.get("type").unwrap_or("text");
    let text = match kind {
        "text" | "unicode" => p.get("text").filter(|t| !t.is_empty()).ok_or_else(|| missing("text"))?,
        "binary" => {
            p.get("udh").ok_or_else(|| missing("udh"))?;
            p.get("body").ok_or_else(|| missing("body"))?
        }
        _ => return Err(bad("type")),
    };
    if let Some(ttl) = p.get("ttl") {
        if !ttl.parse::<u64>().is_ok_and(|t| (20_000..=604_800_000).contains(&t)) {
            return Err(bad("ttl"));
        }
    }
    let client_ref = p.get("client-ref");
    if client_ref.is_some_and(|r| r.chars().count() > 100) {
        return Err(bad("client-ref"));
    }
    if sb.sets(|s, _| s.vonage_barred.contains(to)) {
        return Err(failure("7", "Number barred"));
    }
    let parts = if kind == "binary" { 1 } else { sms_parts(text, kind == "unicode") };
    let mut balance = sb.vonage_balance.lock().unwrap();
    let messages: Vec<Value> = (0..parts)
        .map(|_| {
            *balance -= PRICE;
            let mut m = json!({
                "to": to,
                "message-id": random_hex(8).to_uppercase(),
                "status": "0",
                "remaining-balance": format!("{:.8}", *balance),
                "message-price": format!("{PRICE:.8}"),
                "network": NETWORK,
            });
            if let Some(r) = client_ref {
                m["client-ref"] = json!(r);
            }
            m
        })
        .collect();
    Ok(json(StatusCode::OK, json!({ "message-count": parts.to_string(), "messages": messages })))
}
