//! Template rendering for the router: a template's stored contents compiled once into a
//! [`CompiledTemplate`] (minijinja, strict on undefined params), then rendered per channel
//! and locale into a [`RenderedContent`]. Pure: no I/O.
//!
//! - [`locale`]: which stored locale answers a request.
//! - [`sms`]: GSM-7 / UCS-2 encoding and segment count.
//! - `links`: click-tracking links and the open pixel in email HTML.

mod links;
pub mod locale;
pub mod sms;

use std::collections::{HashMap, HashSet};
use std::fmt;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use crate::error::Classify;
use crate::model::RenderedContent;
use crate::store::{Template, TemplateContent};
use crate::tracking::TrackingSettings;

/// One field of one stored content, e.g. `welcome/email/de-DE/html` (push data values are
/// `data.<key>`); also its template name inside the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRef {
    pub template_id: String,
    pub channel: String,
    pub locale: String,
    pub field: String,
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", self.template_id, self.channel, self.locale, self.field)
    }
}

/// Why a template could not be compiled or rendered.
///
/// Every variant is permanent: the same template and params fail the same way on every
/// attempt, so the router records outcome `template_error` and dead-letters the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("template {at} does not compile: {detail}")]
    Syntax { at: FieldRef, detail: String },
    #[error("template {at} needs param '{param}', which the request does not carry")]
    MissingParam { at: FieldRef, param: String },
    #[error("template has no content for channel '{channel}'")]
    NoContent { channel: String },
    #[error("template {at} is required for the channel but missing")]
    Incomplete { at: FieldRef },
    #[error("template {at} failed to render: {detail}")]
    Render { at: FieldRef, detail: String },
}

impl Classify for RenderError {
    fn is_retryable(&self) -> bool {
        false
    }
}

/// Per-delivery inputs besides the params.
#[derive(Debug, Clone, Copy)]
pub struct RenderContext<'a> {
    /// Carried by the email tracking tokens.
    pub delivery_id: &'a str,
    /// `Some` when the deployment serves tracking; the template's own `tracking` flag must
    /// be on too.
    pub tracking: Option<&'a TrackingSettings>,
}

/// Rendered content and the stored locale it came from (for `ChannelDelivery.locale`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub content: RenderedContent,
    pub locale: String,
}

/// The templated fields of each channel; push also templates every `data` value.
fn channel_fields(channel: &str) -> Option<&'static [&'static str]> {
    match channel {
        "push" => Some(&["title", "body"]),
        "sms" => Some(&["body"]),
        "email" => Some(&["subject", "html", "text"]),
        _ => None,
    }
}

/// One stored channel × locale content: the engine names of its fields.
#[derive(Debug)]
struct Variant {
    channel: String,
    locale: String,
    normalized: String,
    /// (field, engine template name); `data.<key>` for push data.
    fields: Vec<(String, String)>,
    /// The top-level names its fields read from outside (params; also engine globals such
    /// as `range` when used). Names a field binds itself (`set`, loop variables) are not here.
    refers: HashSet<String>,
}

/// A template with every content compiled, ready to render many times.
/// `Send + Sync`: the router caches one per template version and shares it.
#[derive(Debug)]
pub struct CompiledTemplate {
    template_id: String,
    tracking: bool,
    env: Environment<'static>,
    /// Sorted by channel, then normalized locale.
    variants: Vec<Variant>,
}

impl CompiledTemplate {
    /// Compiles the fields of `contents` (one version's rows) that their channel renders.
    /// Contents of unknown channels are ignored; of two rows whose locales normalize the
    /// same, the first wins.
    ///
    /// # Errors
    /// [`RenderError::Syntax`] naming the first field that does not parse;
    /// [`RenderError::Incomplete`] for an SMS without body or an email without subject or
    /// without both html and text.
    pub fn compile(meta: &Template, contents: &[TemplateContent]) -> Result<CompiledTemplate, RenderError> {
        let mut sources = Vec::new();
        let mut variants: Vec<Variant> = Vec::new();
        for c in contents {
            let channel = c.channel.trim().to_ascii_lowercase();
            let Some(names) = channel_fields(&channel) else { continue };
            let normalized = locale::normalize(&c.locale);
            if variants.iter().any(|v| v.channel == channel && v.normalized == normalized) {
                continue;
            }
            let at = |field: &str| FieldRef {
                template_id: meta.template_id.clone(),
                channel: channel.clone(),
                locale: c.locale.clone(),
                field: field.to_owned(),
            };
            let mut fields = Vec::new();
            let stored = [("title", &c.title), ("body", &c.body), ("subject", &c.subject), ("html", &c.html), ("text", &c.text)];
            for (field, source) in stored {
                if let (true, Some(source)) = (names.contains(&field), source) {
                    fields.push((field.to_owned(), source.clone()));
                }
            }
            if channel == "push" {
                let mut data: Vec<_> = c.data.iter().flatten().collect();
                data.sort();
                fields.extend(data.into_iter().map(|(k, v)| (format!("data.{k}"), v.clone())));
            }
            let has = |f: &str| fields.iter().any(|(name, _)| name == f);
            let missing = match channel.as_str() {
                "sms" if !has("body") => Some("body"),
                "email" if !has("subject") => Some("subject"),
                "email" if !has("html") && !has("text") => Some("html or text"),
                _ => None,
            };
            if let Some(field) = missing {
                return Err(RenderError::Incomplete { at: at(field) });
            }
            let fields = fields
                .into_iter()
                .map(|(field, source)| {
                    let name = at(&field).to_string();
                    sources.push((at(&field), name.clone(), source));
                    (field, name)
                })
                .collect();
            variants.push(Variant { channel, locale: c.locale.clone(), normalized, fields, refers: HashSet::new() });
        }
        variants.sort_by(|a, b| (&a.channel, &a.normalized).cmp(&(&b.channel, &b.normalized)));

        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let html: HashSet<String> = sources.iter().filter(|(at, ..)| at.field == "html").map(|(_, name, _)| name.clone()).collect();
        env.set_auto_escape_callback(move |name| if html.contains(name) { AutoEscape::Html } else { AutoEscape::None });
        for (at, name, source) in sources {
            env.add_template_owned(name, source).map_err(|e| RenderError::Syntax { at, detail: describe(&e) })?;
        }
        for v in &mut variants {
            for (_, name) in &v.fields {
                if let Ok(t) = env.get_template(name) {
                    v.refers.extend(t.undeclared_variables(false));
                }
            }
        }
        Ok(CompiledTemplate { template_id: meta.template_id.clone(), tracking: meta.tracking, env, variants })
    }

    /// Renders `channel` (`push`, `sms` or `email`) in the best available locale for
    /// `locales` (preference order; see [`locale`]).
    ///
    /// # Errors
    /// [`RenderError::NoContent`] when the template has no content for `channel`;
    /// [`RenderError::MissingParam`] when a field uses a param `params` lacks;
    /// [`RenderError::Render`] for other evaluation failures (a failing filter, …).
    pub fn render(
        &self,
        channel: &str,
        locales: &[&str],
        params: &HashMap<String, String>,
        ctx: &RenderContext<'_>,
    ) -> Result<Rendered, RenderError> {
        let candidates: Vec<&Variant> = self.variants.iter().filter(|v| v.channel.eq_ignore_ascii_case(channel)).collect();
        let normalized: Vec<&str> = candidates.iter().map(|v| v.normalized.as_str()).collect();
        let variant =
            locale::pick(&normalized, locales).map(|i| candidates[i]).ok_or_else(|| RenderError::NoContent { channel: channel.to_owned() })?;

        let vars = Value::from(params.clone());
        let mut content = RenderedContent::default();
        for (field, name) in &variant.fields {
            let out = self.render_field(variant, field, name, &vars)?;
            match field.as_str() {
                "title" => content.title = Some(out),
                "body" => content.body = Some(out),
                "subject" => content.subject = Some(one_line(&out)),
                "html" => content.html = Some(out),
                "text" => content.text = Some(out),
                data => {
                    let key = data.strip_prefix("data.").unwrap_or(data);
                    content.data.insert(key.to_owned(), out);
                }
            }
        }
        if variant.channel == "sms" {
            let size = sms::measure(content.body.as_deref().unwrap_or_default());
            content.sms_encoding = Some(size.encoding.as_str().to_owned());
            content.sms_segments = Some(i32::try_from(size.segments).unwrap_or(i32::MAX));
        }
        if let (true, Some(t), Some(html)) = (self.tracking, ctx.tracking, &content.html) {
            content.html = Some(links::track(html, ctx.delivery_id, t));
        }
        Ok(Rendered { content, locale: variant.locale.clone() })
    }

    /// Whether `params` carries every name that some content of `channel` (any locale)
    /// reads, so that no render of the channel can fail for a missing param; a check of
    /// the names only, no render. `false` when the channel has no content, or when a
    /// content reads an engine global (`range`, …) or a name only a guarded branch needs:
    /// then only rendering tells.
    pub fn covers(&self, channel: &str, params: &HashMap<String, String>) -> bool {
        let mut of_channel = self.variants.iter().filter(|v| v.channel.eq_ignore_ascii_case(channel)).peekable();
        of_channel.peek().is_some() && of_channel.all(|v| v.refers.iter().all(|name| params.contains_key(name)))
    }

    fn render_field(&self, variant: &Variant, field: &str, name: &str, vars: &Value) -> Result<String, RenderError> {
        let at = || FieldRef {
            template_id: self.template_id.clone(),
            channel: variant.channel.clone(),
            locale: variant.locale.clone(),
            field: field.to_owned(),
        };
        let tmpl = self.env.get_template(name).map_err(|e| RenderError::Render { at: at(), detail: describe(&e) })?;
        tmpl.render(vars).map_err(|e| {
            if e.kind() != ErrorKind::UndefinedError {
                return RenderError::Render { at: at(), detail: describe(&e) };
            }
            // The engine names the undefined expression in backticks: "`code` is undefined".
            let param = e.detail().and_then(|d| d.split('`').nth(1)).map_or_else(|| describe(&e), str::to_owned);
            RenderError::MissingParam { at: at(), param }
        })
    }
}

/// The engine's message without the template name (our [`FieldRef`] already says it).
fn describe(e: &minijinja::Error) -> String {
    let what = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

/// Email subjects are one header line: line breaks become single spaces.
fn one_line(s: &str) -> String {
    s.split(['\r', '\n']).map(str::trim).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
