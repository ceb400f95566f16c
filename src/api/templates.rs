//! Templates: create (version 1), new versions, list, get, preview; and the cache the
//! notification endpoints validate requests against (template exists, params complete).
//!
//! A template (or version) is refused unless it compiles and every channel × locale
//! content renders against its own `sample_params`. Versions are numbered by claiming
//! `(template_id, version)` with `IF NOT EXISTS` first, then the contents are written, then
//! the template is pointed at the version (`IF current_version < version`), then routers are
//! told through the changes topic.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::auth::Scope;
use super::validate::{self, FieldError};
use super::{parse_json, ApiError, ApiState, Caller};
use crate::render::{CompiledTemplate, RenderContext, RenderError};
use crate::store::{Store, StoreError, Template, TemplateContent};

/// A template's live version: metadata, contents and the compiled form.
pub struct LoadedTemplate {
    pub meta: Template,
    pub contents: Vec<TemplateContent>,
    pub compiled: Result<CompiledTemplate, String>,
}

/// Read-through cache of live templates: this process's own writes invalidate at once,
/// other API processes' writes through the changes topic, and entries are refreshed in
/// the background every `api.template_cache_ttl` should an announcement be missed.
pub struct TemplateCache {
    store: Arc<Store>,
    cache: super::cache::Refreshing<Arc<Option<LoadedTemplate>>>,
}

impl TemplateCache {
    pub fn new(store: Arc<Store>, ttl: Duration) -> TemplateCache {
        TemplateCache { store, cache: super::cache::Refreshing::new(10_000, ttl) }
    }

    pub async fn get(&self, id: &str) -> Result<Arc<Option<LoadedTemplate>>, StoreError> {
        let (store, id_owned) = (self.store.clone(), id.to_string());
        self.cache
            .get(id, move || {
                let (store, id) = (store.clone(), id_owned.clone());
                async move {
                    let Some(meta) = store.template(&id).await? else { return Ok(Arc::new(None)) };
                    let contents = store.template_contents(&id, meta.current_version).await?;
                    let compiled = CompiledTemplate::compile(&meta, &contents).map_err(|e| e.to_string());
                    Ok(Arc::new(Some(LoadedTemplate { meta, contents, compiled })))
                }
            })
            .await
    }

    pub async fn invalidate(&self, id: &str) {
        self.cache.invalidate(id).await;
    }
}

/// Why a request's params do not fit a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamProblem {
    Missing(Vec<String>),
    NoContent(String),
    Broken(String),
}

const NO_TRACKING: RenderContext<'static> = RenderContext { delivery_id: "", tracking: None };

/// Checks that `params` completes every stored locale of `channels`. A channel whose
/// contents read only names `params` carries passes on that alone
/// ([`CompiledTemplate::covers`]: no render, the common case). Otherwise every locale is
/// rendered with `params`, collecting every missing param (each is filled with a
/// placeholder and the render retried), so a name only a guarded branch reads is not
/// required. What only values can break (a filter refusing a value) is not checked here:
/// the router renders each delivery and records `template_error` for it.
pub fn check_params(t: &LoadedTemplate, channels: &[String], params: &HashMap<String, String>) -> Result<(), ParamProblem> {
    let compiled = t.compiled.as_ref().map_err(|e| ParamProblem::Broken(e.clone()))?;
    let mut missing = BTreeSet::new();
    for ch in channels {
        let locales: Vec<&str> = t.contents.iter().filter(|c| c.channel.eq_ignore_ascii_case(ch)).map(|c| c.locale.as_str()).collect();
        if locales.is_empty() {
            return Err(ParamProblem::NoContent(ch.clone()));
        }
        if compiled.covers(ch, params) {
            continue;
        }
        for l in locales {
            let mut p: Option<HashMap<String, String>> = None;
            for _ in 0..64 {
                match compiled.render(ch, &[l], p.as_ref().unwrap_or(params), &NO_TRACKING) {
                    Ok(_) => break,
                    Err(RenderError::MissingParam { param, .. }) => {
                        let p = p.get_or_insert_with(|| params.clone());
                        if p.contains_key(&param) {
                            break; // a nested expression (`user.name`): reported once
                        }
                        missing.insert(param.clone());
                        p.insert(param, "x".into());
                    }
                    // Placeholders may upset filters; what is missing is already known.
                    Err(_) if !missing.is_empty() => break,
                    Err(e) => return Err(ParamProblem::Broken(e.to_string())),
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ParamProblem::Missing(missing.into_iter().collect()))
    }
}

/// A template (create) or a new version: metadata plus contents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInput {
    /// Required on create; must be absent (or the same) on a new version.
    #[serde(default)]
    pub template_id: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub default_channels: Option<Vec<String>>,
    #[serde(default)]
    pub tracking: Option<bool>,
    #[serde(default)]
    pub sample_params: Option<HashMap<String, String>>,
    pub contents: Vec<ContentInput>,
}

/// One channel × locale content.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentInput {
    pub channel: String,
    pub locale: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub data: Option<HashMap<String, String>>,
}

/// Validates `input` merged over `base` (for versions) and builds the rows of `version`.
fn build(
    st: &ApiState,
    template_id: &str,
    input: &TemplateInput,
    base: Option<&Template>,
    version: i32,
) -> Result<(Template, Vec<TemplateContent>), ApiError> {
    let mut errs = Vec::new();
    let category = input.category.clone().or_else(|| base.map(|b| b.category.clone())).unwrap_or_default();
    if category.is_empty() {
        errs.push(FieldError::new("category", "is required"));
    } else if !st.categories.contains_key(&category) {
        errs.push(FieldError::new("category", "is not a known category"));
    }
    let channels = input.default_channels.clone().or_else(|| base.map(|b| b.default_channels.clone())).unwrap_or_default();
    if channels.is_empty() {
        errs.push(FieldError::new("default_channels", "needs at least one of push, sms, email"));
    }
    for (i, c) in channels.iter().enumerate() {
        if let Err(e) = validate::channel(&format!("default_channels[{i}]"), c) {
            errs.push(e);
        }
    }
    if input.contents.is_empty() {
        errs.push(FieldError::new("contents", "needs at least one channel × locale content"));
    }
    let mut seen = BTreeSet::new();
    for (i, c) in input.contents.iter().enumerate() {
        if let Err(e) = validate::channel(&format!("contents[{i}].channel"), &c.channel) {
            errs.push(e);
        }
        if let Err(e) = validate::locale(&format!("contents[{i}].locale"), &c.locale) {
            errs.push(e);
        }
        if !seen.insert((c.channel.clone(), c.locale.to_ascii_lowercase())) {
            errs.push(FieldError::new(format!("contents[{i}]"), "repeats a channel × locale"));
        }
    }
    for (i, c) in channels.iter().enumerate() {
        if !input.contents.iter().any(|x| &x.channel == c) {
            errs.push(FieldError::new(format!("default_channels[{i}]"), "has no content"));
        }
    }
    let sample_params = input.sample_params.clone().or_else(|| base.map(|b| b.sample_params.clone())).unwrap_or_default();
    let limits = validate::ParamLimits {
        max_params: st.cfg.max_params,
        max_value_bytes: st.cfg.max_param_bytes,
        max_total_bytes: st.cfg.max_params_total_bytes,
    };
    if let Err(e) = validate::params("sample_params", &sample_params, limits) {
        errs.push(e);
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid(errs));
    }
    let meta = Template {
        template_id: template_id.to_string(),
        category,
        current_version: version,
        default_channels: channels,
        tracking: input.tracking.or(base.map(|b| b.tracking)).unwrap_or(false),
        sample_params,
    };
    let contents: Vec<TemplateContent> = input
        .contents
        .iter()
        .map(|c| TemplateContent {
            template_id: template_id.to_string(),
            version,
            channel: c.channel.clone(),
            locale: c.locale.clone(),
            title: c.title.clone(),
            body: c.body.clone(),
            subject: c.subject.clone(),
            html: c.html.clone(),
            text: c.text.clone(),
            data: c.data.clone(),
        })
        .collect();
    // It must compile, and every content must render against the template's own sample.
    let refuse = |msg: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_invalid", msg);
    let compiled = CompiledTemplate::compile(&meta, &contents).map_err(|e| refuse(e.to_string()))?;
    for c in &contents {
        compiled
            .render(&c.channel, &[c.locale.as_str()], &meta.sample_params, &NO_TRACKING)
            .map_err(|e| refuse(format!("does not render with its sample_params: {e}")))?;
    }
    Ok((meta, contents))
}

async fn write_contents(st: &ApiState, contents: &[TemplateContent]) -> Result<(), ApiError> {
    futures::future::try_join_all(contents.iter().map(|c| st.store.put_template_content(c))).await?;
    Ok(())
}

/// `POST /v1/templates`: version 1 of a new template.
pub async fn create(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let app = caller.require(Scope::Templates)?;
    let input: TemplateInput = parse_json(&headers, &body)?;
    let id = input.template_id.clone().unwrap_or_default();
    validate::id("template_id", &id).map_err(|e| ApiError::invalid(vec![e]))?;
    let (meta, contents) = build(&st, &id, &input, None, 1)?;
    let exists = || ApiError::new(StatusCode::CONFLICT, "template_exists", "a template with this id exists; post a new version instead");
    if st.store.template(&id).await?.is_some() || !st.api_store.claim_version(&id, 1, &app.key).await? {
        return Err(exists());
    }
    write_contents(&st, &contents).await?;
    if !st.api_store.create_template(&meta).await? {
        return Err(exists());
    }
    st.templates.invalidate(&id).await;
    st.publish_change("template", &id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "template_id": id, "version": 1 }))).into_response())
}

/// `POST /v1/templates/{id}/versions`: a new live version.
pub async fn new_version(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let app = caller.require(Scope::Templates)?;
    let input: TemplateInput = parse_json(&headers, &body)?;
    if input.template_id.as_ref().is_some_and(|t| t != &id) {
        return Err(ApiError::invalid(vec![FieldError::new("template_id", "differs from the path")]));
    }
    let base = st.store.template(&id).await?.ok_or_else(|| ApiError::not_found("template"))?;
    build(&st, &id, &input, Some(&base), base.current_version + 1)?;
    let claimed = st.api_store.versions(&id).await?.first().map(|v| v.0).unwrap_or(0);
    let mut version = base.current_version.max(claimed) + 1;
    let mut tries = 0;
    while !st.api_store.claim_version(&id, version, &app.key).await? {
        tries += 1;
        if tries >= 5 {
            return Err(ApiError::new(StatusCode::CONFLICT, "version_conflict", "concurrent versions of this template; retry"));
        }
        version += 1;
    }
    let (meta, contents) = build(&st, &id, &input, Some(&base), version)?;
    write_contents(&st, &contents).await?;
    if !st.api_store.advance_template(&meta).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, "version_conflict", "a newer version was published meanwhile"));
    }
    st.templates.invalidate(&id).await;
    st.publish_change("template", &id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "template_id": id, "version": version }))).into_response())
}

fn meta_json(t: &Template) -> serde_json::Value {
    json!({
        "template_id": t.template_id,
        "category": t.category,
        "current_version": t.current_version,
        "default_channels": t.default_channels,
        "tracking": t.tracking,
        "sample_params": t.sample_params,
    })
}

fn content_json(c: &TemplateContent) -> serde_json::Value {
    let mut v = json!({ "channel": c.channel, "locale": c.locale });
    for (k, f) in [("title", &c.title), ("body", &c.body), ("subject", &c.subject), ("html", &c.html), ("text", &c.text)] {
        if let Some(f) = f {
            v[k] = json!(f);
        }
    }
    if let Some(d) = &c.data {
        v["data"] = json!(d);
    }
    v
}

/// `GET /v1/templates`.
pub async fn list(State(st): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Templates)?;
    let all = st.api_store.templates().await?;
    Ok(Json(json!({ "templates": all.iter().map(meta_json).collect::<Vec<_>>() })))
}

/// `GET /v1/templates/{id}`: metadata, versions, the live version's contents.
pub async fn get(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Templates)?;
    let meta = st.store.template(&id).await?.ok_or_else(|| ApiError::not_found("template"))?;
    let contents = st.store.template_contents(&id, meta.current_version).await?;
    let versions = st.api_store.versions(&id).await?;
    let mut v = meta_json(&meta);
    v["versions"] = json!(versions.iter().map(|(n, at, by)| json!({ "version": n, "created_at": at, "created_by": by })).collect::<Vec<_>>());
    v["contents"] = json!(contents.iter().map(content_json).collect::<Vec<_>>());
    Ok(Json(v))
}

/// Preview request: params over the template's sample params, optional filters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewInput {
    #[serde(default)]
    pub params: HashMap<String, String>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub locales: Option<Vec<String>>,
    #[serde(default)]
    pub version: Option<i32>,
}

/// `POST /v1/templates/{id}/preview`: renders every channel × locale (or the filtered ones).
pub async fn preview(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Templates)?;
    let input: PreviewInput = if body.is_empty() { PreviewInput::default() } else { parse_json(&headers, &body)? };
    let meta = st.store.template(&id).await?.ok_or_else(|| ApiError::not_found("template"))?;
    let version = input.version.unwrap_or(meta.current_version);
    let contents = st.store.template_contents(&id, version).await?;
    if contents.is_empty() {
        return Err(ApiError::not_found("template version"));
    }
    let compiled = CompiledTemplate::compile(&meta, &contents)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_invalid", e.to_string()))?;
    let mut params = meta.sample_params.clone();
    params.extend(input.params);
    let mut previews = Vec::new();
    for c in &contents {
        if input.channels.as_ref().is_some_and(|f| !f.contains(&c.channel))
            || input.locales.as_ref().is_some_and(|f| !f.iter().any(|l| l.eq_ignore_ascii_case(&c.locale)))
        {
            continue;
        }
        match compiled.render(&c.channel, &[c.locale.as_str()], &params, &NO_TRACKING) {
            Ok(r) => previews.push(json!({ "channel": c.channel, "locale": c.locale, "content": r.content })),
            Err(e) => previews.push(json!({ "channel": c.channel, "locale": c.locale, "error": e.to_string() })),
        }
    }
    Ok(Json(json!({ "template_id": id, "version": version, "previews": previews })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(contents: Vec<TemplateContent>) -> LoadedTemplate {
        let meta = Template {
            template_id: "t".into(),
            category: "billing".into(),
            current_version: 1,
            default_channels: vec!["email".into()],
            tracking: false,
            sample_params: HashMap::new(),
        };
        let compiled = CompiledTemplate::compile(&meta, &contents).map_err(|e| e.to_string());
        LoadedTemplate { meta, contents, compiled }
    }

    fn content(channel: &str, locale: &str, body: &str) -> TemplateContent {
        TemplateContent {
            template_id: "t".into(),
            version: 1,
            channel: channel.into(),
            locale: locale.into(),
            body: Some(body.into()),
            subject: (channel == "email").then(|| "S {{ subject_param }}".into()),
            text: (channel == "email").then(|| body.into()),
            ..Default::default()
        }
    }

    #[test]
    fn every_missing_param_of_every_locale_is_reported() {
        let t = loaded(vec![content("sms", "en", "Hi {{ a }} {{ b }}"), content("sms", "de", "Hallo {{ c }}"), content("email", "en", "{{ d }}")]);
        let p = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        assert_eq!(check_params(&t, &["sms".into()], &p(&[])), Err(ParamProblem::Missing(vec!["a".into(), "b".into(), "c".into()])));
        assert_eq!(check_params(&t, &["sms".into()], &p(&[("a", "1"), ("b", "2"), ("c", "3")])), Ok(()));
        assert_eq!(check_params(&t, &["email".into()], &p(&[])), Err(ParamProblem::Missing(vec!["d".into(), "subject_param".into()])));
        assert_eq!(check_params(&t, &["push".into()], &p(&[])), Err(ParamProblem::NoContent("push".into())));
    }

    #[test]
    fn names_only_a_guarded_branch_reads_are_not_required() {
        let t = loaded(vec![content("sms", "en", "Hi{% if name is defined %} {{ name }}{% endif %}{% for i in range(2) %}.{% endfor %}")]);
        let p = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        // Neither set covers the names (`range` is a global), so these are decided by rendering.
        assert!(!t.compiled.as_ref().unwrap().covers("sms", &p(&[("name", "Ann")])));
        assert_eq!(check_params(&t, &["sms".into()], &p(&[])), Ok(()));
        assert_eq!(check_params(&t, &["sms".into()], &p(&[("name", "Ann")])), Ok(()));
    }
}
