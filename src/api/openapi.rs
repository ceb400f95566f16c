//! The OpenAPI 3.1 document served at `/openapi.json`. Written by hand next to the code and
//! held to it by tests: its paths and methods equal [`super::route_table`], every request
//! schema's example deserialises into the handler's Rust type (whose unknown fields are
//! refused), dropping a `required` property makes it fail and dropping any other does not;
//! the integration tests check the answers' properties against the response schemas.

use serde_json::{json, Value};

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn body(name: &str) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": r(name) } } })
}

fn ok(code: &str, desc: &str, schema: Option<&str>) -> (String, Value) {
    let mut v = json!({ "description": desc });
    if let Some(s) = schema {
        v["content"] = json!({ "application/json": { "schema": r(s) } });
    }
    (code.to_string(), v)
}

fn err(code: &str, desc: &str) -> (String, Value) {
    (code.to_string(), json!({ "description": desc, "content": { "application/json": { "schema": r("Error") } } }))
}

/// Errors every signed endpoint can answer.
fn signed_errors() -> Vec<(String, Value)> {
    vec![
        err("401", "missing_auth, malformed_auth, stale_timestamp, invalid_signature or replayed_request"),
        err("403", "missing_scope (or category_not_allowed)"),
        err("413", "payload_too_large"),
        err("429", "rate_limited (see Retry-After)"),
        err("503", "unavailable: a dependency is down; retry"),
    ]
}

/// Errors the HTTP layer can answer on any endpoint (each herald's JSON error too).
fn transport_errors() -> Vec<(String, Value)> {
    vec![
        err("408", "request_timeout: the body did not arrive within api.body_read_timeout"),
        err("413", "payload_too_large: the body is over api.max_body_bytes (webhooks: api.webhook_max_body_bytes)"),
        err("414", "uri_too_long: the request target is over api.max_uri_bytes"),
        err("431", "headers_too_large: the headers are over api.max_header_bytes or api.max_headers"),
    ]
}

fn op(summary: &str, scope: Option<&str>, request: Option<&str>, params: &[&str], responses: Vec<(String, Value)>) -> Value {
    let mut all: serde_json::Map<String, Value> = responses.into_iter().collect();
    for (k, e) in transport_errors() {
        all.entry(k).or_insert(e);
    }
    let mut v = json!({ "summary": summary });
    if let Some(s) = scope {
        v["description"] = json!(format!("Needs scope `{s}` (or `admin`)."));
        v["security"] = json!([{ "HeraldKey": [], "HeraldTimestamp": [], "HeraldSignature": [] }]);
        for (k, e) in signed_errors() {
            all.entry(k).or_insert(e);
        }
    } else {
        v["security"] = json!([]);
    }
    if let Some(b) = request {
        v["requestBody"] = body(b);
        all.entry("400".to_string()).or_insert_with(|| err("400", "malformed_json").1);
        all.entry("415".to_string()).or_insert_with(|| err("415", "unsupported_media_type").1);
        all.entry("422".to_string()).or_insert_with(|| err("422", "invalid_request (details.fields lists every problem)").1);
    }
    if !params.is_empty() {
        all.entry("400".to_string())
            .or_insert_with(|| err("400", "bad_request: a path parameter is not valid UTF-8 (or malformed_json for a body)").1);
        v["parameters"] =
            json!(params.iter().map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } })).collect::<Vec<_>>());
    }
    v["responses"] = Value::Object(all);
    v
}

fn schemas() -> Value {
    let s = || json!({ "type": "string" });
    let ns = || json!({ "type": ["string", "null"] });
    let params = json!({ "type": "object", "additionalProperties": { "type": ["string", "number", "boolean"] }, "description": "Template params (numbers and booleans are sent as their JSON text)." });
    let channels = json!({ "type": "array", "items": { "enum": ["push", "sms", "email"] } });
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                "code": { "type": "string", "description": "Stable machine-readable code." },
                "message": s(),
                "details": { "type": "object" } } } }
        },
        "Device": {
            "type": "object", "required": ["platform", "token"], "additionalProperties": false,
            "properties": {
                "platform": { "enum": ["ios", "android", "web"] },
                "token": { "type": "string", "description": "ios: APNs device token (hex, 64+); android/web: FCM registration token." },
                "app_id": s() },
            "example": { "platform": "ios", "token": "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90", "app_id": "com.example.app" }
        },
        "DeviceCreated": { "type": "object", "properties": { "device_id": s(), "user_id": s(), "platform": s() } },
        "InlineContact": {
            "type": "object", "additionalProperties": false,
            "properties": { "email": s(), "phone": s(), "locale": s(), "timezone": s(), "devices": { "type": "array", "items": r("Device") } }
        },
        "SendRequest": {
            "type": "object", "required": ["user_id", "template_id"], "additionalProperties": false,
            "properties": {
                "event_id": { "type": "string", "description": "Client id (dedup key); default: derived from Idempotency-Key, else a UUIDv7." },
                "user_id": s(), "category": { "type": "string", "description": "Default: the template's category." },
                "template_id": s(), "params": params, "channels": channels,
                "priority": { "enum": ["low", "normal", "high"] }, "locale": s(),
                "expires_at": { "type": "string", "format": "date-time" },
                "contact": r("InlineContact") },
            "example": { "event_id": "order-42-shipped", "user_id": "u42", "category": "billing", "template_id": "bill_due", "params": { "amount": "12.30 €" },
                "channels": ["email"], "priority": "normal", "locale": "de-DE", "expires_at": "2999-01-01T00:00:00Z",
                "contact": { "email": "u42@example.com", "phone": "+4915112345678", "locale": "de-DE", "timezone": "Europe/Berlin", "devices": [] } }
        },
        "Recipient": {
            "type": "object", "required": ["user_id"], "additionalProperties": false,
            "properties": { "user_id": s(), "event_id": s(), "params": params, "locale": s() }
        },
        "BatchRequest": {
            "type": "object", "required": ["template_id", "recipients"], "additionalProperties": false,
            "properties": { "category": s(), "template_id": s(), "params": params, "channels": channels, "priority": { "enum": ["low", "normal", "high"] },
                "locale": s(), "expires_at": { "type": "string", "format": "date-time" }, "recipients": { "type": "array", "items": r("Recipient"), "minItems": 1 } },
            "example": { "category": "billing", "template_id": "bill_due", "params": { "amount": "5" }, "channels": ["email"], "priority": "low", "locale": "en",
                "expires_at": "2999-01-01T00:00:00Z", "recipients": [{ "user_id": "u1", "event_id": "b-1", "params": { "amount": "6" }, "locale": "de" }] }
        },
        "Accepted": { "type": "object", "required": ["status", "event_id"], "properties": { "status": { "const": "accepted" }, "event_id": s() } },
        "BatchAccepted": { "type": "object", "required": ["status", "count", "event_ids"], "properties": { "status": { "const": "accepted" }, "count": { "type": "integer" }, "event_ids": { "type": "array", "items": s() } } },
        "Outcome": {
            "type": "object",
            "properties": { "outcome_id": s(), "recorded_at": { "type": "string", "format": "date-time" }, "status": s(), "channel": ns(), "delivery_id": ns(),
                "provider": ns(), "provider_message_id": ns(), "attempt": { "type": ["integer", "null"] }, "reason": ns(), "user_id": ns(), "category": ns() }
        },
        "NotificationLog": { "type": "object", "properties": { "event_id": s(), "outcomes": { "type": "array", "items": r("Outcome") } } },
        "UserInput": {
            "type": "object", "additionalProperties": false,
            "properties": { "email": s(), "phone": { "type": "string", "description": "E.164" }, "locale": s(), "timezone": { "type": "string", "description": "IANA" } },
            "example": { "email": "u42@example.com", "phone": "+4915112345678", "locale": "de-DE", "timezone": "Europe/Berlin" }
        },
        "User": {
            "type": "object",
            "properties": { "user_id": s(), "email": ns(), "phone": ns(), "locale": ns(), "timezone": ns(),
                "devices": { "type": "array", "items": { "type": "object", "properties": { "device_id": s(), "platform": s(), "token": s(), "app_id": ns(), "active": { "type": "boolean" } } } } }
        },
        "Preference": { "type": "object", "required": ["channel", "category", "opt_in"], "additionalProperties": false,
            "properties": { "channel": { "enum": ["push", "sms", "email"] }, "category": s(), "opt_in": { "type": "boolean" } } },
        "PreferencesInput": { "type": "object", "required": ["preferences"], "additionalProperties": false,
            "properties": { "preferences": { "type": "array", "items": r("Preference") } },
            "example": { "preferences": [{ "channel": "email", "category": "marketing", "opt_in": false }] } },
        "Preferences": { "type": "object", "properties": { "user_id": s(), "preferences": { "type": "array", "items": r("Preference") } } },
        "Content": {
            "type": "object", "required": ["channel", "locale"], "additionalProperties": false,
            "properties": { "channel": { "enum": ["push", "sms", "email"] }, "locale": s(), "title": s(), "body": s(), "subject": s(), "html": s(), "text": s(),
                "data": { "type": "object", "additionalProperties": s() } }
        },
        "TemplateInput": {
            "type": "object", "required": ["contents"], "additionalProperties": false,
            "description": "Create: template_id, category and default_channels are required. New version: omitted fields keep the current version's.",
            "properties": { "template_id": s(), "category": s(), "default_channels": channels, "tracking": { "type": "boolean" },
                "sample_params": { "type": "object", "additionalProperties": s() }, "contents": { "type": "array", "items": r("Content") } },
            "example": { "template_id": "welcome", "category": "billing", "default_channels": ["email"], "tracking": false, "sample_params": { "name": "Ada" },
                "contents": [{ "channel": "email", "locale": "en", "subject": "Hi {{ name }}", "html": "<p>Hi {{ name }}</p>", "text": "Hi {{ name }}", "title": null, "body": null, "data": null }] }
        },
        "TemplateCreated": { "type": "object", "properties": { "template_id": s(), "version": { "type": "integer" } } },
        "TemplateMeta": { "type": "object", "properties": { "template_id": s(), "category": s(), "current_version": { "type": "integer" }, "default_channels": channels,
            "tracking": { "type": "boolean" }, "sample_params": { "type": "object" }, "versions": { "type": "array" }, "contents": { "type": "array", "items": r("Content") } } },
        "TemplateList": { "type": "object", "properties": { "templates": { "type": "array", "items": r("TemplateMeta") } } },
        "PreviewInput": { "type": "object", "additionalProperties": false,
            "properties": { "params": { "type": "object", "additionalProperties": s() }, "channels": channels, "locales": { "type": "array", "items": s() }, "version": { "type": "integer" } },
            "example": { "params": { "name": "Grace" }, "channels": ["email"], "locales": ["en"], "version": 1 } },
        "Preview": { "type": "object", "properties": { "template_id": s(), "version": { "type": "integer" },
            "previews": { "type": "array", "items": { "type": "object", "properties": { "channel": s(), "locale": s(), "content": { "type": "object" }, "error": s() } } } } },
        "Health": { "type": "object", "properties": { "status": s(), "checks": { "type": "object" } } },
        "WebhookResult": { "type": "object", "properties": { "received": { "type": "integer" }, "recorded": { "type": "integer" }, "unmatched": { "type": "integer" }, "duplicates": { "type": "integer" } } }
    })
}

const AUTH_DOC: &str = "Every /v1 call is signed. Headers: X-Herald-Key (app key), X-Herald-Timestamp (Unix seconds, within 5 minutes of the server clock), \
optional X-Herald-Nonce (8-64 of [A-Za-z0-9_-]), X-Herald-Signature = hex(HMAC-SHA256(app secret, METHOD \\n PATH \\n CANONICAL_QUERY \\n TIMESTAMP \\n hex(SHA256(body)) [\\n NONCE])). \
CANONICAL_QUERY: query pairs decoded, sorted by name then value, RFC 3986-encoded, joined with '&'. A signature is accepted once.";

/// The whole document.
pub fn document() -> Value {
    let header_scheme = |name: &str, desc: &str| json!({ "type": "apiKey", "in": "header", "name": name, "description": desc });
    let mut paths = serde_json::Map::new();
    let mut add = |path: &str, method: &str, v: Value| {
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[method] = v;
    };
    add("/healthz", "get", op("Liveness", None, None, &[], vec![ok("200", "alive", Some("Health"))]));
    add(
        "/readyz",
        "get",
        op(
            "Readiness: Kafka, the CQL store and the registry reachable",
            None,
            None,
            &[],
            vec![ok("200", "ready", Some("Health")), ok("503", "a dependency is down", Some("Health"))],
        ),
    );
    add("/metrics", "get", op("Prometheus metrics (text exposition)", None, None, &[], vec![ok("200", "metrics", None)]));
    add("/openapi.json", "get", op("This document", None, None, &[], vec![ok("200", "OpenAPI 3.1", None)]));
    add(
        "/t/o/{token}",
        "get",
        op(
            "Open pixel: records `opened`, answers a 1x1 GIF",
            None,
            None,
            &["token"],
            vec![ok("200", "image/gif", None), err("404", "not_found: token does not verify")],
        ),
    );
    add(
        "/t/c/{token}",
        "get",
        op(
            "Click: records `clicked`, redirects to the signed link",
            None,
            None,
            &["token"],
            vec![ok("302", "redirect to the link inside the token", None), err("404", "not_found")],
        ),
    );
    let hook = |what: &str| {
        op(
            what,
            None,
            None,
            &[],
            vec![
                ok("200", "recorded (events turned into outcomes before are counted in duplicates and emitted once)", Some("WebhookResult")),
                err("400", "malformed_json: signed, but the events are not the provider's JSON"),
                err("401", "invalid_signature (counted), or stale_webhook: the signed timestamp is outside api.webhook_timestamp_tolerance"),
                err("404", "provider not configured"),
                err("415", "unsupported_media_type"),
                err("422", "invalid_request: signed, but a required field is missing"),
                err("503", "unavailable: Kafka or the store is down; the provider retries"),
            ],
        )
    };
    add("/webhooks/twilio", "post", hook("Twilio status callback (X-Twilio-Signature)"));
    add("/webhooks/sendgrid", "post", hook("SendGrid signed event webhook (ECDSA P-256)"));
    add("/webhooks/mandrill", "post", hook("Mailchimp Transactional webhook (X-Mandrill-Signature)"));
    add("/webhooks/mandrill", "head", op("Mandrill's URL probe", None, None, &[], vec![ok("200", "ok", None)]));
    add("/webhooks/vonage", "get", hook("Vonage delivery receipt (signed, query)"));
    add("/webhooks/vonage", "post", hook("Vonage delivery receipt (signed, form or JSON)"));
    add(
        "/v1/notifications",
        "post",
        op(
            "Send a notification (202 after Kafka acknowledged it). Header Idempotency-Key makes retries safe.",
            Some("send"),
            Some("SendRequest"),
            &[],
            vec![
                ok("202", "accepted", Some("Accepted")),
                err("409", "idempotency_conflict"),
                err("422", "invalid_request, unknown_template, unknown_category, missing_params, template_invalid"),
            ],
        ),
    );
    add(
        "/v1/notifications/batch",
        "post",
        op(
            "One template to many users",
            Some("send"),
            Some("BatchRequest"),
            &[],
            vec![ok("202", "accepted", Some("BatchAccepted")), err("409", "idempotency_conflict")],
        ),
    );
    add(
        "/v1/notifications/{event_id}",
        "get",
        op(
            "The notification's log (an app sees the notifications it sent; admin apps see all)",
            Some("status"),
            None,
            &["event_id"],
            vec![ok("200", "every outcome, oldest first", Some("NotificationLog")), err("404", "not_found")],
        ),
    );
    add(
        "/v1/users/{user_id}",
        "put",
        op("Create or replace a user's contact data", Some("contacts"), Some("UserInput"), &["user_id"], vec![ok("200", "stored", Some("User"))]),
    );
    add(
        "/v1/users/{user_id}",
        "get",
        op("A user with devices", Some("contacts"), None, &["user_id"], vec![ok("200", "the user", Some("User")), err("404", "not_found")]),
    );
    add(
        "/v1/users/{user_id}",
        "delete",
        op("Delete a user, devices and preferences", Some("contacts"), None, &["user_id"], vec![ok("204", "deleted", None), err("404", "not_found")]),
    );
    add(
        "/v1/users/{user_id}/devices",
        "post",
        op(
            "Register a push token (moves it from a previous owner)",
            Some("contacts"),
            Some("Device"),
            &["user_id"],
            vec![ok("201", "registered", Some("DeviceCreated")), err("404", "not_found")],
        ),
    );
    add(
        "/v1/users/{user_id}/devices/{device_id}",
        "delete",
        op("Remove a device", Some("contacts"), None, &["user_id", "device_id"], vec![ok("204", "removed", None), err("404", "not_found")]),
    );
    add(
        "/v1/users/{user_id}/preferences",
        "get",
        op("Opt-in choices (channel x category)", Some("contacts"), None, &["user_id"], vec![ok("200", "stored choices", Some("Preferences"))]),
    );
    add(
        "/v1/users/{user_id}/preferences",
        "put",
        op("Upsert opt-in choices", Some("contacts"), Some("PreferencesInput"), &["user_id"], vec![ok("200", "stored choices", Some("Preferences"))]),
    );
    add("/v1/templates", "get", op("List templates", Some("templates"), None, &[], vec![ok("200", "templates", Some("TemplateList"))]));
    add(
        "/v1/templates",
        "post",
        op(
            "Create a template (version 1); refused unless every content renders with sample_params",
            Some("templates"),
            Some("TemplateInput"),
            &[],
            vec![ok("201", "created", Some("TemplateCreated")), err("409", "template_exists"), err("422", "invalid_request, template_invalid")],
        ),
    );
    add(
        "/v1/templates/{template_id}",
        "get",
        op(
            "A template: metadata, versions, live contents",
            Some("templates"),
            None,
            &["template_id"],
            vec![ok("200", "the template", Some("TemplateMeta")), err("404", "not_found")],
        ),
    );
    add(
        "/v1/templates/{template_id}/versions",
        "post",
        op(
            "Publish a new version",
            Some("templates"),
            Some("TemplateInput"),
            &["template_id"],
            vec![
                ok("201", "published", Some("TemplateCreated")),
                err("404", "not_found"),
                err("409", "version_conflict"),
                err("422", "template_invalid"),
            ],
        ),
    );
    add(
        "/v1/templates/{template_id}/preview",
        "post",
        op(
            "Render against sample params (overridable) per channel and locale",
            Some("templates"),
            Some("PreviewInput"),
            &["template_id"],
            vec![ok("200", "renders", Some("Preview")), err("404", "not_found")],
        ),
    );
    json!({
        "openapi": "3.1.0",
        "info": { "title": "herald API", "version": env!("CARGO_PKG_VERSION"), "description": AUTH_DOC },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "HeraldKey": header_scheme("X-Herald-Key", "The app key (hk_...)."),
                "HeraldTimestamp": header_scheme("X-Herald-Timestamp", "Unix seconds; at most 5 minutes off."),
                "HeraldSignature": header_scheme("X-Herald-Signature", AUTH_DOC),
                "HeraldNonce": header_scheme("X-Herald-Nonce", "Optional; signed as the last line when present."),
            }
        }
    })
}

/// The property names a response schema declares (following one `$ref`).
pub fn response_properties(doc: &Value, path: &str, method: &str, status: &str) -> Option<Vec<String>> {
    let schema =
        doc.pointer(&format!("/paths/{}/{method}/responses/{status}/content/application~1json/schema", path.replace('~', "~0").replace('/', "~1")))?;
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(r.trim_start_matches('#'))?,
        None => schema,
    };
    Some(schema.get("properties")?.as_object()?.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::api::{contacts, notifications, route_table, templates};

    #[test]
    fn paths_and_methods_equal_the_router() {
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = route_table().into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn every_ref_resolves_and_path_params_are_declared() {
        let doc = document();
        fn walk(v: &Value, doc: &Value) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        assert!(doc.pointer(r.trim_start_matches('#')).is_some(), "dangling {r}");
                    }
                    m.values().for_each(|x| walk(x, doc));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, doc)),
                _ => {}
            }
        }
        walk(&doc, &doc);
        for (path, ops) in doc["paths"].as_object().unwrap() {
            let wanted: BTreeSet<&str> = path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
            for (m, op) in ops.as_object().unwrap() {
                let declared: BTreeSet<&str> =
                    op["parameters"].as_array().map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect()).unwrap_or_default();
                assert_eq!(declared, wanted, "{m} {path}");
            }
        }
    }

    /// Every operation lists the HTTP layer's errors, each with the JSON error schema; the
    /// webhooks list the statuses their handlers answer.
    #[test]
    fn every_operation_lists_its_error_statuses() {
        let doc = document();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let codes: BTreeSet<&str> = op["responses"].as_object().unwrap().keys().map(String::as_str).collect();
                for code in ["408", "413", "414", "431"] {
                    assert!(codes.contains(code), "{method} {path} does not list {code}");
                    assert!(response_properties(&doc, path, method, code).is_some_and(|p| p == ["error"]), "{method} {path} {code}");
                }
                if path.contains('{') {
                    assert!(codes.contains("400"), "{method} {path} has path params but no 400");
                }
                if path.starts_with("/webhooks/") && method != "head" {
                    for code in ["400", "401", "404", "415", "422", "503"] {
                        assert!(codes.contains(code), "{method} {path} does not list {code}");
                    }
                }
            }
        }
    }

    /// Each documented request example fits the handler's type; `required` is exactly what
    /// the type cannot do without.
    #[test]
    fn request_schemas_match_the_rust_types() {
        let doc = document();
        type Check = fn(&Value) -> bool;
        let cases: [(&str, Check); 7] = [
            ("SendRequest", |v| serde_json::from_value::<notifications::SendRequest>(v.clone()).is_ok()),
            ("BatchRequest", |v| serde_json::from_value::<notifications::BatchRequest>(v.clone()).is_ok()),
            ("UserInput", |v| serde_json::from_value::<contacts::UserInput>(v.clone()).is_ok()),
            ("Device", |v| serde_json::from_value::<contacts::DeviceInput>(v.clone()).is_ok()),
            ("PreferencesInput", |v| serde_json::from_value::<contacts::PreferencesInput>(v.clone()).is_ok()),
            ("TemplateInput", |v| serde_json::from_value::<templates::TemplateInput>(v.clone()).is_ok()),
            ("PreviewInput", |v| serde_json::from_value::<templates::PreviewInput>(v.clone()).is_ok()),
        ];
        for (name, fits) in cases {
            let schema = &doc["components"]["schemas"][name];
            let example = schema["example"].clone();
            assert!(fits(&example), "{name}: documented example does not parse");
            let props: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
            let given: BTreeSet<String> = example.as_object().unwrap().keys().cloned().collect();
            assert_eq!(props, given, "{name}: the example must show every documented property");
            let required: BTreeSet<String> =
                schema["required"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default();
            for p in &props {
                let mut without = example.clone();
                without.as_object_mut().unwrap().remove(p);
                assert_eq!(fits(&without), !required.contains(p), "{name}.{p}: required in the document iff required by the type");
            }
            let mut extra = example.clone();
            extra["undocumented"] = json!(1);
            assert!(!fits(&extra), "{name}: unknown fields must be refused");
        }
    }
}
