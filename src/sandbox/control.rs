//! The control API under `/_sandbox/`, used by tests and the demo:
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/_sandbox/health` | `{"status":"ok","providers":[…]}` |
//! | PUT | `/_sandbox/faults/{provider}` | sets the provider's [`Fault`] (replaces any) |
//! | GET | `/_sandbox/faults` | the faults in force, with the requests each still applies to |
//! | DELETE | `/_sandbox/faults/{provider}`, `/_sandbox/faults` | clears one / all |
//! | GET | `/_sandbox/requests/{provider}` | what it received, oldest first ([`Received`]) |
//! | DELETE | `/_sandbox/requests/{provider}`, `/_sandbox/requests` | clears one / all logs |
//! | GET, PUT | `/_sandbox/state` | the dead-address sets ([`SandboxState`]); PUT replaces them |
//!
//! Errors are `{"error":"…"}` with 400 (bad body) or 404 (unknown provider).
//!
//! [`Received`]: super::journal::Received

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};

use super::http::json;
use super::{Fault, Provider, SandboxState, Shared, World};

/// Every path of the control API (README's "The provider sandbox" documents each).
const PATHS: [&str; 6] =
    ["/_sandbox/health", "/_sandbox/faults", "/_sandbox/faults/{provider}", "/_sandbox/requests", "/_sandbox/requests/{provider}", "/_sandbox/state"];

pub(super) fn routes() -> Router<Shared> {
    let [health_path, faults, fault, all_requests, provider_requests, state] = PATHS;
    Router::new()
        .route(health_path, get(health))
        .route(faults, get(list_faults).delete(clear_faults))
        .route(fault, put(set_fault).delete(clear_fault))
        .route(all_requests, axum::routing::delete(clear_requests))
        .route(provider_requests, get(requests).delete(clear_provider_requests))
        .route(state, get(get_state).put(put_state))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, json!({ "error": message.into() }))
}

fn provider(name: &str) -> Result<Provider, Response> {
    name.parse::<Provider>().ok().ok_or_else(|| {
        let known: Vec<_> = Provider::ALL.iter().map(|p| p.name()).collect();
        error(StatusCode::NOT_FOUND, format!("unknown provider '{name}' (one of {})", known.join(", ")))
    })
}

async fn health() -> Response {
    let providers: Vec<_> = Provider::ALL.iter().map(|p| p.name()).collect();
    json(StatusCode::OK, json!({ "status": "ok", "providers": providers }))
}

async fn set_fault(State(sb): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
    let p = match provider(&name) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let fault: Fault = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a fault: {e}")),
    };
    if let Err(e) = fault.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    if let Some(name) = &fault.error {
        if p.fault_reply(&name.as_string(), None).is_none() {
            return error(StatusCode::BAD_REQUEST, format!("{} has no error named '{}'", p.name(), name.as_string()));
        }
    }
    sb.faults.set(p, fault.clone());
    json(StatusCode::OK, json!({ "provider": p.name(), "fault": fault }))
}

async fn list_faults(State(sb): State<Shared>) -> Response {
    let all: Vec<Value> =
        sb.faults.list().into_iter().map(|(p, fault, remaining)| json!({ "provider": p.name(), "fault": fault, "remaining": remaining })).collect();
    json(StatusCode::OK, Value::Array(all))
}

async fn clear_fault(State(sb): State<Shared>, Path(name): Path<String>) -> Response {
    match provider(&name) {
        Ok(p) => {
            sb.faults.clear(Some(p));
            json(StatusCode::OK, json!({ "cleared": p.name() }))
        }
        Err(r) => r,
    }
}

async fn clear_faults(State(sb): State<Shared>) -> Response {
    sb.faults.clear(None);
    json(StatusCode::OK, json!({ "cleared": "all" }))
}

async fn requests(State(sb): State<Shared>, Path(name): Path<String>) -> Response {
    match provider(&name) {
        Ok(p) => json(StatusCode::OK, serde_json::to_value(sb.journal.list(p)).unwrap_or_default()),
        Err(r) => r,
    }
}

async fn clear_provider_requests(State(sb): State<Shared>, Path(name): Path<String>) -> Response {
    match provider(&name) {
        Ok(p) => {
            sb.journal.clear(Some(p));
            json(StatusCode::OK, json!({ "cleared": p.name() }))
        }
        Err(r) => r,
    }
}

async fn clear_requests(State(sb): State<Shared>) -> Response {
    sb.journal.clear(None);
    json(StatusCode::OK, json!({ "cleared": "all" }))
}

async fn get_state(State(sb): State<Shared>) -> Response {
    json(StatusCode::OK, sb.sets(|sets, _| serde_json::to_value(sets).unwrap_or_default()))
}

async fn put_state(State(sb): State<Shared>, body: Bytes) -> Response {
    match serde_json::from_slice::<SandboxState>(&body) {
        Ok(sets) => {
            let sets = sets.normalized();
            let shown = serde_json::to_value(&sets).unwrap_or_default();
            *sb.state.write().unwrap() = World { sets, since_ms: chrono::Utc::now().timestamp_millis() };
            json(StatusCode::OK, shown)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("not a sandbox state: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README documents every control path, every fault field, every field of a request-log
    /// entry and every dead-address set: a field added to the code and not to README fails.
    #[test]
    fn readme_documents_the_whole_control_api() {
        let readme = include_str!("../../README.md");
        let section = readme.split("## The provider sandbox").nth(1).expect("README has 'The provider sandbox'");
        let section = section.split("\n## ").next().unwrap();
        let keys = |v: Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let fault = keys(serde_json::to_value(Fault::default()).unwrap());
        let state = keys(serde_json::to_value(SandboxState::default()).unwrap());
        let entry = keys(
            serde_json::to_value(super::super::journal::Received {
                seq: 1,
                method: "POST".into(),
                path: "/".into(),
                version: "HTTP/2.0".into(),
                headers: Default::default(),
                body: Value::Null,
                status: None,
                at: String::new(),
            })
            .unwrap(),
        );
        assert!(fault.len() >= 6 && state.len() >= 6 && entry.len() >= 8);
        let mut missing = Vec::new();
        for path in PATHS {
            if !section.contains(&format!("`{path}`")) {
                missing.push(path.to_string());
            }
        }
        for field in fault.iter().chain(&state).chain(&entry) {
            if !section.contains(&format!("`{field}`")) {
                missing.push(field.clone());
            }
        }
        for p in Provider::ALL {
            if !section.contains(&format!("`{}`", p.name())) || !section.contains(p.default_error()) {
                missing.push(p.name().to_string());
            }
        }
        assert!(missing.is_empty(), "README's sandbox section lacks {missing:?}");
    }
}
