//! Contacts: `PUT/GET/DELETE /v1/users/{id}`, `POST /v1/users/{id}/devices`,
//! `DELETE /v1/users/{id}/devices/{device_id}`, `GET/PUT /v1/users/{id}/preferences`.
//!
//! Every change is written to the store, then announced on the compacted changes topic
//! (`user:<id>`, `devices:<id>`, `preferences:<id>`) before the call answers, so routers
//! drop their cached copy promptly. Re-registering a push token moves it to the new user
//! (and the old owner's cache is invalidated too).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::auth::Scope;
use super::validate::{self, FieldError};
use super::{parse_json, ApiError, ApiState, Caller};
use crate::store::{Device, Preference, User};

/// `PUT /v1/users/{id}`: the whole contact record (absent fields are cleared).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInput {
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub locale: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
}

/// `POST /v1/users/{id}/devices`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInput {
    /// `ios` (APNs) | `android` | `web` (FCM).
    pub platform: String,
    pub token: String,
    #[serde(default)]
    pub app_id: Option<String>,
}

/// One preference choice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceInput {
    pub channel: String,
    pub category: String,
    pub opt_in: bool,
}

/// `PUT /v1/users/{id}/preferences`: upserts the listed choices (others stay).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencesInput {
    pub preferences: Vec<PreferenceInput>,
}

/// Validates a user record; field errors (prefixed) go to `errs`.
pub fn check_user(user_id: &str, u: &UserInput, prefix: &str, errs: &mut Vec<FieldError>) -> User {
    let f = |n: &str| format!("{prefix}{n}");
    let mut push = |r: Result<(), FieldError>| r.err().into_iter().for_each(|e| errs.push(e));
    push(validate::id("user_id", user_id));
    let mut user = User { user_id: user_id.to_string(), locale: u.locale.clone(), timezone: u.timezone.clone(), ..Default::default() };
    if let Some(e) = u.email.as_deref() {
        match validate::email(&f("email"), e) {
            Ok(e) => user.email = Some(e),
            Err(e) => push(Err(e)),
        }
    }
    if let Some(p) = u.phone.as_deref() {
        match validate::phone(&f("phone"), p) {
            Ok(p) => user.phone = Some(p),
            Err(e) => push(Err(e)),
        }
    }
    if let Some(l) = u.locale.as_deref() {
        push(validate::locale(&f("locale"), l));
    }
    if let Some(z) = u.timezone.as_deref() {
        push(validate::timezone(&f("timezone"), z));
    }
    user
}

/// The stable device id of (platform, token).
pub fn device_id(platform: &str, token: &str) -> String {
    let mut h = Sha256::new();
    h.update(platform.as_bytes());
    h.update([0]);
    h.update(token.as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// Validates a device; `None` (and field errors in `errs`) when it is not well-formed.
pub fn check_device(d: &DeviceInput, prefix: &str, errs: &mut Vec<FieldError>) -> Option<DeviceInput> {
    let before = errs.len();
    if let Err(e) = validate::push_token(&format!("{prefix}token"), &d.platform, &d.token) {
        errs.push(e);
    }
    if d.app_id.as_ref().is_some_and(|a| a.is_empty() || a.len() > 255 || !a.chars().all(|c| validate::printable(c) && !c.is_whitespace())) {
        errs.push(FieldError::new(format!("{prefix}app_id"), "must be 1-255 printable characters without whitespace"));
    }
    (errs.len() == before).then(|| d.clone())
}

/// Registers `d` to `user_id`, moving the token away from a previous owner.
async fn register_device(st: &ApiState, user_id: &str, d: &DeviceInput) -> Result<String, ApiError> {
    let id = device_id(&d.platform, &d.token);
    if let Some((owner, old_id)) = st.store.token_owner(&d.token).await? {
        if owner != user_id || old_id != id {
            st.store.delete_device(&owner, &old_id, &d.token).await?;
            if owner != user_id {
                st.publish_change("devices", &owner).await?;
            }
        }
    }
    st.store
        .put_device(&Device {
            user_id: user_id.to_string(),
            device_id: id.clone(),
            platform: d.platform.clone(),
            token: d.token.clone(),
            app_id: d.app_id.clone(),
            active: true,
        })
        .await?;
    Ok(id)
}

/// Writes an inline contact of a notification (merging into an existing user).
pub async fn upsert_inline(st: &ApiState, user_id: &str, given: User, devices: Vec<DeviceInput>) -> Result<(), ApiError> {
    let current = st.store.user(user_id).await?.unwrap_or_else(|| User { user_id: user_id.to_string(), ..Default::default() });
    let merged = User {
        user_id: user_id.to_string(),
        email: given.email.or(current.email),
        phone: given.phone.or(current.phone),
        locale: given.locale.or(current.locale),
        timezone: given.timezone.or(current.timezone),
    };
    st.store.put_user(&merged).await?;
    for d in &devices {
        register_device(st, user_id, d).await?;
    }
    st.publish_change("user", user_id).await
}

fn user_json(u: &User) -> serde_json::Value {
    json!({ "user_id": u.user_id, "email": u.email, "phone": u.phone, "locale": u.locale, "timezone": u.timezone })
}

/// `PUT /v1/users/{id}`.
pub async fn put_user(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Contacts)?;
    let input: UserInput = parse_json(&headers, &body)?;
    let mut errs = Vec::new();
    let user = check_user(&user_id, &input, "", &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    st.store.put_user(&user).await?;
    st.publish_change("user", &user_id).await?;
    Ok(Json(user_json(&user)))
}

/// `GET /v1/users/{id}`: the contact record with its devices.
pub async fn get_user(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Contacts)?;
    let user = st.store.user(&user_id).await?.ok_or_else(|| ApiError::not_found("user"))?;
    let devices = st.store.devices(&user_id).await?;
    let mut v = user_json(&user);
    v["devices"] = json!(devices
        .iter()
        .map(|d| json!({ "device_id": d.device_id, "platform": d.platform, "token": d.token, "app_id": d.app_id, "active": d.active }))
        .collect::<Vec<_>>());
    Ok(Json(v))
}

/// `DELETE /v1/users/{id}`: the user, their devices and preferences.
pub async fn delete_user(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Contacts)?;
    if st.store.user(&user_id).await?.is_none() {
        return Err(ApiError::not_found("user"));
    }
    st.store.delete_user(&user_id).await?;
    st.publish_change("user", &user_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/users/{id}/devices`.
pub async fn add_device(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Contacts)?;
    let input: DeviceInput = parse_json(&headers, &body)?;
    let mut errs = Vec::new();
    let Some(d) = check_device(&input, "", &mut errs) else { return Err(ApiError::invalid(errs)) };
    if st.store.user(&user_id).await?.is_none() {
        return Err(ApiError::not_found("user"));
    }
    let id = register_device(&st, &user_id, &d).await?;
    st.publish_change("devices", &user_id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "device_id": id, "user_id": user_id, "platform": d.platform }))).into_response())
}

/// `DELETE /v1/users/{id}/devices/{device_id}`.
pub async fn delete_device(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((user_id, device_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Contacts)?;
    let devices = st.store.devices(&user_id).await?;
    let d = devices.iter().find(|d| d.device_id == device_id).ok_or_else(|| ApiError::not_found("device"))?;
    st.store.delete_device(&user_id, &device_id, &d.token).await?;
    st.publish_change("devices", &user_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/users/{id}/preferences`: the stored choices (absent = the category's default).
pub async fn get_preferences(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Contacts)?;
    let prefs = st.store.preferences(&user_id).await?;
    let list: Vec<_> = prefs.iter().map(|p| json!({ "channel": p.channel, "category": p.category, "opt_in": p.opt_in })).collect();
    Ok(Json(json!({ "user_id": user_id, "preferences": list })))
}

/// `PUT /v1/users/{id}/preferences`.
pub async fn put_preferences(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Contacts)?;
    let input: PreferencesInput = parse_json(&headers, &body)?;
    let mut errs = Vec::new();
    if let Err(e) = validate::id("user_id", &user_id) {
        errs.push(e);
    }
    for (i, p) in input.preferences.iter().enumerate() {
        if let Err(e) = validate::channel(&format!("preferences[{i}].channel"), &p.channel) {
            errs.push(e);
        }
        match st.categories.get(&p.category) {
            None => errs.push(FieldError::new(format!("preferences[{i}].category"), "is not a known category")),
            Some(c) if !p.opt_in && !c.opt_out_allowed => errs.push(FieldError::new(
                format!("preferences[{i}].opt_in"),
                format!("category '{}' cannot be opted out of (its notifications are always sent)", p.category),
            )),
            Some(_) => {}
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    for p in &input.preferences {
        st.store
            .put_preference(&Preference { user_id: user_id.clone(), channel: p.channel.clone(), category: p.category.clone(), opt_in: p.opt_in })
            .await?;
    }
    st.publish_change("preferences", &user_id).await?;
    get_preferences(State(st), Extension(caller), Path(user_id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_validated_and_normalised() {
        let mut errs = Vec::new();
        let u = check_user(
            "u1",
            &UserInput {
                email: Some(" a@example.com ".into()),
                phone: Some("+49 151 12345678".into()),
                locale: Some("de-DE".into()),
                timezone: Some("Europe/Berlin".into()),
            },
            "",
            &mut errs,
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!((u.email.as_deref(), u.phone.as_deref()), (Some("a@example.com"), Some("+4915112345678")));
        check_user(
            "u1",
            &UserInput { email: Some("nope".into()), phone: Some("0151".into()), timezone: Some("X".into()), ..Default::default() },
            "contact.",
            &mut errs,
        );
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["contact.email", "contact.phone", "contact.timezone"]);
    }

    #[test]
    fn device_ids_are_stable_per_platform_and_token() {
        assert_eq!(device_id("ios", "ab"), device_id("ios", "ab"));
        assert_ne!(device_id("ios", "ab"), device_id("web", "ab"));
        let mut errs = Vec::new();
        assert!(check_device(&DeviceInput { platform: "ios".into(), token: "zz".into(), app_id: None }, "", &mut errs).is_none());
        assert_eq!(errs[0].field, "token");
    }
}
