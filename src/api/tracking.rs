//! Email tracking: `GET /t/o/{token}` answers a 1×1 transparent GIF and records `opened`;
//! `GET /t/c/{token}` records `clicked` and redirects (302) to the link inside the signed
//! token, never to a URL from the request, so the endpoint is no open redirect. Tokens that
//! do not verify (tampered, other key, wrong kind, non-http link) get 404.
//!
//! Recording never delays the reader for long: if the outcome cannot be written, the pixel
//! or redirect is still answered and the failure logged. Opens of one delivery share one
//! log row; each click URL gets its own.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::outcomes;
use super::{ApiError, ApiState};
use crate::tracking::{self, TrackingClaim, TrackingKind};

/// The smallest transparent GIF (43 bytes).
pub const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00,
    0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

fn claim(st: &ApiState, token: &str, kind: TrackingKind) -> Result<TrackingClaim, ApiError> {
    match tracking::verify(&st.tracking_secret, token) {
        Ok(c) if c.kind == kind => Ok(c),
        _ => {
            crate::telemetry::events::api_tracking("invalid");
            Err(ApiError::not_found("tracking link"))
        }
    }
}

async fn record(st: &ApiState, delivery_id: &str, status: &str, reason: Option<String>) {
    let result = async {
        let Some(d) = st.api_store.delivery(delivery_id).await? else {
            crate::telemetry::events::api_tracking("unmatched");
            return Ok(());
        };
        let id = outcomes::outcome_id(&["tracking", delivery_id, status, reason.as_deref().unwrap_or("")]);
        let o = outcomes::outcome(&d, id, status, None, reason);
        crate::telemetry::events::api_tracking(status);
        outcomes::emit(st, &o.into_iter().collect::<Vec<_>>()).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(delivery_id, status, code = e.code, "tracking outcome not recorded");
    }
}

/// `GET /t/o/{token}`.
pub async fn open(State(st): State<Arc<ApiState>>, Path(token): Path<String>) -> Result<Response, ApiError> {
    let c = claim(&st, token.trim_end_matches(".gif"), TrackingKind::Open)?;
    record(&st, &c.delivery_id, "opened", None).await;
    let mut resp = (StatusCode::OK, PIXEL.to_vec()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store, no-cache, must-revalidate, max-age=0"));
    Ok(resp)
}

/// `GET /t/c/{token}`.
pub async fn click(State(st): State<Arc<ApiState>>, Path(token): Path<String>) -> Result<Response, ApiError> {
    let c = claim(&st, &token, TrackingKind::Click)?;
    let url = c.url.clone().unwrap_or_default();
    let location = HeaderValue::from_str(&url).map_err(|_| ApiError::not_found("tracking link"))?;
    record(&st, &c.delivery_id, "clicked", Some(url)).await;
    let mut resp = StatusCode::FOUND.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Ok(resp)
}
