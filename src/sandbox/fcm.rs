//! FCM HTTP v1: `POST /v1/projects/{project}/messages:send` with an access token from the
//! sandbox's OAuth endpoint; proto-JSON validation and Google's error body
//! (`{"error":{code,message,status,details:[BadRequest…, FcmError…]}}`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::http::{json, random_hex, with_header, Incoming};
use super::{oauth, Provider, Shared, Verdict};

const MAX_PAYLOAD: usize = 4096;
const MAX_TOPIC_PAYLOAD: usize = 2048;
/// Android TTL upper bound: 4 weeks.
const MAX_TTL_S: f64 = 2_419_200.0;
const TOP_LEVEL: [&str; 3] = ["message", "validate_only", "validateOnly"];
const MESSAGE_FIELDS: [&str; 11] =
    ["name", "data", "notification", "android", "webpush", "apns", "fcm_options", "fcmOptions", "token", "topic", "condition"];
const TARGETS: [&str; 3] = ["token", "topic", "condition"];
const BAD_TOKEN: &str = "The registration token is not a valid FCM registration token";
const INVALID: &str = "Request contains an invalid argument.";

/// `{"error":{…}}` with the given details.
fn google_error(status: StatusCode, rpc_status: &str, message: &str, details: Vec<Value>) -> Response {
    let mut error = json!({ "code": status.as_u16(), "message": message, "status": rpc_status });
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    json(status, json!({ "error": error }))
}

fn fcm_error(code: &str) -> Value {
    json!({ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code })
}

fn bad_request(field: Option<&str>, description: &str) -> Value {
    let mut violation = json!({ "description": description });
    if let Some(f) = field {
        violation["field"] = json!(f);
    }
    json!({ "@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation] })
}

/// 400 INVALID_ARGUMENT about a field, with BadRequest and FcmError details.
fn invalid(field: &str, description: &str) -> Response {
    let details = vec![bad_request(Some(field), description), fcm_error("INVALID_ARGUMENT")];
    google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", description, details)
}

/// 400 for JSON that does not fit the proto (BadRequest only, as Google's front end answers).
fn malformed(description: String) -> Response {
    google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &description, vec![bad_request(None, &description)])
}

/// The answer for a fault named by an FCM `errorCode` (or `UNAUTHENTICATED`, `502`, `504`).
pub(super) fn fault(name: &str) -> Option<Response> {
    let (status, rpc, message) = match name {
        "UNREGISTERED" => (StatusCode::NOT_FOUND, "NOT_FOUND", "Requested entity was not found."),
        "INVALID_ARGUMENT" => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", INVALID),
        "SENDER_ID_MISMATCH" => (StatusCode::FORBIDDEN, "PERMISSION_DENIED", "SenderId mismatch"),
        "QUOTA_EXCEEDED" => (
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'.",
        ),
        "UNAVAILABLE" => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "The service is currently unavailable."),
        "INTERNAL" => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error encountered."),
        "THIRD_PARTY_AUTH_ERROR" => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
        "UNSPECIFIED_ERROR" => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "Unknown error."),
        "UNAUTHENTICATED" => return Some(unauthenticated(true)),
        "502" | "504" => {
            let status = StatusCode::from_u16(name.parse().ok()?).ok()?;
            let page = format!(
                "<!DOCTYPE html>\n<html lang=en><title>Error {name} (Server Error)!!1</title><p><b>{name}.</b> <ins>That’s an error.</ins></html>\n"
            );
            return Some((status, [("content-type", "text/html; charset=UTF-8")], page).into_response());
        }
        _ => return None,
    };
    Some(google_error(status, rpc, message, vec![fcm_error(name)]))
}

/// 401 without FcmError: the access token is missing, unknown or expired (REAUTH).
fn unauthenticated(had_token: bool) -> Response {
    let message = if had_token {
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
    } else {
        "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
    };
    let challenge = if had_token {
        r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#
    } else {
        r#"Bearer realm="https://accounts.google.com/""#
    };
    with_header(google_error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", message, vec![]), "www-authenticate", challenge)
}

pub(super) async fn send(State(sb): State<Shared>, Path(project): Path<String>, req: Incoming) -> Response {
    let verdict = check(&sb, &project, &req);
    sb.answer(Provider::Fcm, &req, verdict).await
}

fn check(sb: &Shared, project: &str, req: &Incoming) -> Verdict {
    match req.bearer() {
        None => return Err(unauthenticated(false)),
        Some(token) if !oauth::is_valid(sb, token) => return Err(unauthenticated(true)),
        Some(_) => {}
    }
    if project != sb.config.fcm.project_id {
        let message = format!("Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).");
        return Err(google_error(StatusCode::FORBIDDEN, "PERMISSION_DENIED", &message, vec![]));
    }
    let body = match req.json() {
        Some(Value::Object(body)) => body,
        _ => return Err(malformed("Invalid JSON payload received. Unexpected token.".into())),
    };
    unknown_field(&body, &TOP_LEVEL, "").map_err(malformed)?;
    let empty = Map::new();
    let message = match body.get("message") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => return Err(malformed(format!("Invalid value at 'message' (type.googleapis.com/google.firebase.fcm.v1.Message), {other}"))),
    };
    unknown_field(message, &MESSAGE_FIELDS, " at 'message'").map_err(malformed)?;
    let target = validate_message(message)?;
    if let Target::Token(token) = target {
        if sb.sets(|s, _| s.fcm_unregistered.contains(token)) {
            return Err(fault("UNREGISTERED").unwrap_or_default());
        }
    }
    let dry_run = ["validate_only", "validateOnly"].iter().any(|k| body.get(*k) == Some(&Value::Bool(true)));
    let id = if dry_run { "fake_message_id".to_string() } else { format!("0:{}%{}", chrono::Utc::now().timestamp_micros(), random_hex(8)) };
    Ok(json(StatusCode::OK, json!({ "name": format!("projects/{project}/messages/{id}") })))
}

fn unknown_field(object: &Map<String, Value>, known: &[&str], at: &str) -> Result<(), String> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("Invalid JSON payload received. Unknown name \"{k}\"{at}: Cannot find field.")),
        None => Ok(()),
    }
}

enum Target<'a> {
    Token(&'a str),
    Topic,
    Condition,
}

/// Target, data, size and Android options; returns the target.
fn validate_message(message: &Map<String, Value>) -> Result<Target<'_>, Response> {
    let targets: Vec<&str> = TARGETS.iter().copied().filter(|t| message.contains_key(*t)).collect();
    let target = match targets.as_slice() {
        [] => return Err(invalid("message", "Recipient of the message is not set.")),
        [one] => *one,
        [_, second, ..] => {
            let text = format!("Invalid value at 'message' (oneof), oneof field 'target' is already set. Cannot set '{second}'");
            return Err(invalid("message", &text));
        }
    };
    let value = message[target].as_str().unwrap_or_default();
    let target = match target {
        "token" if is_registration_token(value) => Target::Token(value),
        "token" => return Err(invalid("message.token", BAD_TOKEN)),
        "topic" if is_topic(value) => Target::Topic,
        "topic" => return Err(invalid("message.topic", "Invalid topic name.")),
        _ if value.trim().is_empty() => return Err(invalid("message.condition", "Invalid condition expression.")),
        _ => Target::Condition,
    };
    let mut size = 0;
    if let Some(data) = message.get("data") {
        let Value::Object(data) = data else {
            return Err(invalid(
                "message.data",
                &format!("Invalid value at 'message.data' (type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry), {data}"),
            ));
        };
        for (i, (key, value)) in data.iter().enumerate() {
            let Value::String(text) = value else {
                let field = format!("message.data[{i}].value");
                return Err(invalid(&field, &format!("Invalid value at '{field}' (TYPE_STRING), {value}")));
            };
            if key == "from" || key == "gcm" || key.starts_with("google.") {
                return Err(invalid("message.data", &format!("Invalid data payload key: {key}")));
            }
            size += key.len() + text.len();
        }
    }
    if let Some(Value::Object(n)) = message.get("notification") {
        size += n.values().filter_map(Value::as_str).map(str::len).sum::<usize>();
    }
    let limit = if matches!(target, Target::Topic) { MAX_TOPIC_PAYLOAD } else { MAX_PAYLOAD };
    if size > limit {
        return Err(google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", INVALID, vec![]));
    }
    if let Some(android) = message.get("android") {
        validate_android(android)?;
    }
    Ok(target)
}

fn validate_android(android: &Value) -> Result<(), Response> {
    if let Some(p) = android.get("priority") {
        if !matches!(p.as_str(), Some("NORMAL" | "HIGH" | "normal" | "high")) {
            let field = "message.android.priority";
            return Err(invalid(
                field,
                &format!("Invalid value at '{field}' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {p}"),
            ));
        }
    }
    if let Some(ttl) = android.get("ttl") {
        let seconds = ttl.as_str().and_then(|t| t.strip_suffix('s')).and_then(|s| s.parse::<f64>().ok());
        if !seconds.is_some_and(|s| (0.0..=MAX_TTL_S).contains(&s)) {
            let field = "message.android.ttl";
            return Err(invalid(field, &format!("Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), {ttl}")));
        }
    }
    Ok(())
}

/// FCM tokens are long URL-safe strings (`<instance id>:APA91b…`); the sandbox accepts
/// 32–4096 characters of `[A-Za-z0-9_:-]`.
fn is_registration_token(token: &str) -> bool {
    (32..=4096).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
}

/// `[a-zA-Z0-9-_.~%]+`, optionally prefixed with `/topics/`.
fn is_topic(topic: &str) -> bool {
    let name = topic.strip_prefix("/topics/").unwrap_or(topic);
    !name.is_empty() && name.len() <= 900 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_message_needs_exactly_one_target() {
        assert!(validate_message(&message(json!({ "data": {} }))).is_err());
        assert!(validate_message(&message(json!({ "topic": "news", "condition": "'a' in topics" }))).is_err());
        assert!(matches!(validate_message(&message(json!({ "topic": "/topics/news" }))), Ok(Target::Topic)));
    }

    #[test]
    fn data_values_must_be_strings_and_keys_not_reserved() {
        let token = "a".repeat(40);
        assert!(validate_message(&message(json!({ "token": token, "data": { "n": 1 } }))).is_err());
        assert!(validate_message(&message(json!({ "token": token, "data": { "google.x": "1" } }))).is_err());
        assert!(validate_message(&message(json!({ "token": token, "data": { "n": "1" } }))).is_ok());
    }

    #[test]
    fn topic_payloads_have_half_the_room() {
        let big = "x".repeat(3000);
        assert!(validate_message(&message(json!({ "token": "a".repeat(40), "data": { "k": big } }))).is_ok());
        assert!(validate_message(&message(json!({ "topic": "news", "data": { "k": big } }))).is_err());
    }

    #[test]
    fn fault_names_are_fcm_error_codes() {
        assert_eq!(fault("QUOTA_EXCEEDED").unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(fault("UNAUTHENTICATED").unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(fault("502").unwrap().status(), StatusCode::BAD_GATEWAY);
        assert!(fault("ServiceUnavailable").is_none());
    }
}
