//! Helpers every provider shares: the buffered request, credential parsing, form bodies,
//! JSON replies, ids, and the address formats (E.164, email, SMS segments).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Map, Value};

/// Larger bodies are refused before any provider sees them (SendGrid's limit is 30 MB).
const MAX_BODY: usize = 32 * 1024 * 1024;

/// A request with its body read, so it can be logged, validated and answered.
#[derive(Debug)]
pub struct Incoming {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for Incoming {
    type Rejection = Response;

    async fn from_request(req: Request, _: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let body =
            axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response())?;
        Ok(Incoming { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers, body })
    }
}

impl Incoming {
    /// The first value of a header, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn is_json(&self) -> bool {
        self.header("content-type").is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"))
    }

    /// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive).
    pub fn bearer(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, credential) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| credential.trim())
    }

    /// `(user, password)` of `Authorization: Basic …`.
    pub fn basic(&self) -> Option<(String, String)> {
        let (scheme, encoded) = self.header("authorization")?.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }

    pub fn form(&self) -> Form {
        Form(url::form_urlencoded::parse(&self.body).into_owned().collect())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body for the request log: JSON if it parses, a form if it is one, else text.
    pub fn body_for_log(&self) -> Value {
        if self.body.is_empty() {
            Value::Null
        } else if let Some(v) = self.json() {
            v
        } else if self.header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
            self.form().to_json()
        } else {
            Value::String(String::from_utf8_lossy(&self.body).into_owned())
        }
    }
}

/// An `application/x-www-form-urlencoded` body; names may repeat (Twilio `MediaUrl`).
#[derive(Debug, Default)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    /// As a JSON object; a repeated name becomes an array.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (name, value) in &self.0 {
            match map.get_mut(name) {
                None => {
                    map.insert(name.clone(), Value::String(value.clone()));
                }
                Some(Value::Array(values)) => values.push(Value::String(value.clone())),
                Some(first) => *first = Value::Array(vec![first.take(), Value::String(value.clone())]),
            }
        }
        Value::Object(map)
    }
}

/// A JSON reply.
pub fn json(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string()).into_response()
}

/// Sets a header on a reply (values the sandbox builds itself, so always valid).
pub fn with_header(mut response: Response, name: &'static str, value: impl ToString) -> Response {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        response.headers_mut().insert(name, v);
    }
    response
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// Seconds since the Unix epoch.
pub fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `+` then 7–15 digits, not starting with 0.
pub fn is_e164(number: &str) -> bool {
    number
        .strip_prefix('+')
        .is_some_and(|digits| (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'))
}

/// A plausible address: one `@`, a non-empty local part, a dotted domain, no spaces.
pub fn is_email(address: &str) -> bool {
    match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && !address.chars().any(char::is_whitespace)
                && domain.split('.').count() >= 2
                && domain.split('.').all(|label| !label.is_empty())
        }
        None => false,
    }
}

const GSM_BASIC: &str =
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM_EXTENSION: &str = "^{}\\[~]|€\u{c}";

/// How many SMS parts a text needs: GSM-7 160 per single / 153 per concatenated part
/// (extension characters take two), else UCS-2 70 / 67.
pub fn sms_parts(text: &str, force_unicode: bool) -> usize {
    let septets: Option<usize> = (!force_unicode)
        .then(|| {
            text.chars()
                .map(|c| {
                    if GSM_BASIC.contains(c) {
                        Some(1)
                    } else if GSM_EXTENSION.contains(c) {
                        Some(2)
                    } else {
                        None
                    }
                })
                .sum()
        })
        .flatten();
    let (units, single, multi) = match septets {
        Some(n) => (n, 160, 153),
        None => (text.encode_utf16().count(), 70, 67),
    };
    if units <= single {
        1
    } else {
        units.div_ceil(multi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_needs_a_plus_and_seven_to_fifteen_digits() {
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("14155550100"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1415555010012345"));
        assert!(!is_e164("+1-415-555"));
    }

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(is_email("a.b+tag@example.co.uk"));
        for bad in ["", "no-at", "@example.com", "a@localhost", "a@b@c.com", "a b@c.com", "a@c..com"] {
            assert!(!is_email(bad), "{bad}");
        }
    }

    #[test]
    fn sms_parts_follow_gsm7_and_ucs2_limits() {
        assert_eq!(sms_parts(&"a".repeat(160), false), 1);
        assert_eq!(sms_parts(&"a".repeat(161), false), 2);
        assert_eq!(sms_parts(&"a".repeat(306), false), 2);
        assert_eq!(sms_parts(&"{".repeat(80), false), 1);
        assert_eq!(sms_parts(&"é".repeat(160), false), 1);
        assert_eq!(sms_parts(&"ł".repeat(70), false), 1);
        assert_eq!(sms_parts(&"ł".repeat(71), false), 2);
        assert_eq!(sms_parts("hi", true), 1);
    }

    #[test]
    fn repeated_form_fields_become_arrays() {
        let f = Form(vec![("To".into(), "+1".into()), ("MediaUrl".into(), "a".into()), ("MediaUrl".into(), "b".into())]);
        assert_eq!(f.to_json(), serde_json::json!({"To": "+1", "MediaUrl": ["a", "b"]}));
        assert_eq!(f.all("MediaUrl"), vec!["a", "b"]);
    }
}
