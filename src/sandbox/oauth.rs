//! Google's OAuth 2.0 token endpoint for service accounts (`POST /token`), as FCM clients
//! use it: a JWT-bearer grant with an RS256 assertion, answered with a `ya29.` access token
//! that `messages:send` then accepts until it expires.
//!
//! Logged under the `fcm` provider; faults set for `fcm` do not apply here.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use jsonwebtoken::{Algorithm, Validation};
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::json;

use super::http::{json, now_s, Incoming};
use super::{Provider, Shared};

pub(super) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Scopes that allow sending with FCM.
const SCOPES: [&str; 2] = ["https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"];
const MAX_LIFETIME_S: i64 = 3600;
const SKEW_S: i64 = 60;
const BAD_SIGNATURE: &str = "Invalid JWT Signature.";
const BAD_TIMES: &str =
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

pub(super) async fn token(State(sb): State<Shared>, req: Incoming) -> Response {
    let reply = issue(&sb, &req)
        .unwrap_or_else(|(error, description)| json(StatusCode::BAD_REQUEST, json!({ "error": error, "error_description": description })));
    sb.reply(Provider::Fcm, &req, reply)
}

/// Whether `token` was issued here and has not expired.
pub(super) fn is_valid(sb: &Shared, token: &str) -> bool {
    sb.access_tokens.lock().unwrap().get(token).is_some_and(|expiry| *expiry > Instant::now())
}

type Refusal = (&'static str, String);

fn issue(sb: &Shared, req: &Incoming) -> Result<Response, Refusal> {
    let form = req.form();
    let missing = |name: &str| ("invalid_request", format!("Missing required parameter: {name}"));
    match form.get("grant_type") {
        None => return Err(missing("grant_type")),
        Some(JWT_BEARER) => {}
        Some(other) => return Err(("unsupported_grant_type", format!("Invalid grant_type: {other}"))),
    }
    let assertion = form.get("assertion").ok_or_else(|| missing("assertion"))?;
    verify(sb, req, assertion)?;
    let ttl = sb.config.fcm.access_token_ttl_s;
    let token = format!("ya29.{}", Alphanumeric.sample_string(&mut rand::rng(), 120));
    let now = Instant::now();
    let mut tokens = sb.access_tokens.lock().unwrap();
    tokens.retain(|_, expiry| *expiry > now);
    tokens.insert(token.clone(), now + Duration::from_secs(ttl));
    Ok(json(StatusCode::OK, json!({ "access_token": token, "expires_in": ttl, "token_type": "Bearer" })))
}

#[derive(Deserialize)]
struct AssertionClaims {
    iss: Option<String>,
    aud: Option<String>,
    scope: Option<String>,
    iat: Option<i64>,
    exp: Option<i64>,
}

/// Signature (and `kid`), issuer, audience, lifetime, scope — Google's order and wording.
fn verify(sb: &Shared, req: &Incoming, assertion: &str) -> Result<(), Refusal> {
    let fcm = &sb.config.fcm;
    let grant = |description: &str| ("invalid_grant", description.to_string());
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| grant(BAD_SIGNATURE))?;
    if header.kid.as_ref().is_some_and(|kid| *kid != fcm.private_key_id) {
        return Err(grant(BAD_SIGNATURE));
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &sb.fcm_key, &validation).map_err(|_| grant(BAD_SIGNATURE))?.claims;
    if claims.iss.as_deref() != Some(fcm.client_email.as_str()) {
        return Err(grant("Invalid grant: account not found"));
    }
    let host = req.header("host").or_else(|| req.uri.authority().map(|a| a.as_str()));
    let own_audience = host.map(|host| format!("http://{host}/token"));
    let aud = claims.aud.unwrap_or_default();
    if !fcm.token_audiences.contains(&aud) && own_audience.as_deref() != Some(aud.as_str()) {
        return Err(grant("Invalid JWT: Failed audience check. The right audience is https://oauth2.googleapis.com/token"));
    }
    let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
        return Err(grant(BAD_TIMES));
    };
    let now = now_s();
    if exp <= iat || exp - iat > MAX_LIFETIME_S || exp <= now || iat > now + SKEW_S {
        return Err(grant(BAD_TIMES));
    }
    let scopes = claims.scope.unwrap_or_default();
    if scopes.trim().is_empty() {
        return Err(("invalid_scope", "Empty or missing scope not allowed.".into()));
    }
    if !scopes.split_whitespace().any(|s| SCOPES.contains(&s)) {
        return Err(("invalid_scope", "Invalid OAuth scope or ID token audience provided.".into()));
    }
    Ok(())
}
