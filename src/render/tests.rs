//! Behaviour of [`CompiledTemplate`]: locale fallback, strict params, escaping per field,
//! SMS sizing, push data and email tracking.

use super::*;
use crate::tracking::{verify, TrackingClaim};

fn meta(tracking: bool) -> Template {
    Template {
        template_id: "welcome".into(),
        category: "account".into(),
        current_version: 1,
        default_channels: vec!["email".into()],
        tracking,
        sample_params: HashMap::new(),
    }
}

fn content(channel: &str, locale: &str) -> TemplateContent {
    TemplateContent { template_id: "welcome".into(), version: 1, channel: channel.into(), locale: locale.into(), ..Default::default() }
}

fn sms(locale: &str, body: &str) -> TemplateContent {
    TemplateContent { body: Some(body.into()), ..content("sms", locale) }
}

fn email(html: &str) -> TemplateContent {
    TemplateContent { subject: Some("Hi {{ name }}".into()), html: Some(html.into()), text: Some("Hi {{ name }}".into()), ..content("email", "en") }
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const NO_TRACKING: RenderContext<'static> = RenderContext { delivery_id: "d1", tracking: None };

fn render(t: &CompiledTemplate, channel: &str, locales: &[&str], p: &[(&str, &str)]) -> Result<Rendered, RenderError> {
    t.render(channel, locales, &params(p), &NO_TRACKING)
}

#[test]
fn falls_back_from_locale_to_language_to_english() {
    let t =
        CompiledTemplate::compile(&meta(false), &[sms("de", "Hallo"), sms("de-AT", "Servus"), sms("en", "Hello"), sms("fr_FR", "Bonjour")]).unwrap();
    let locale_of = |wanted: &[&str]| render(&t, "sms", wanted, &[]).unwrap().locale;
    assert_eq!(locale_of(&["de_at"]), "de-AT");
    assert_eq!(locale_of(&["de-CH", "fr"]), "de");
    assert_eq!(locale_of(&["it", "fr"]), "fr_FR");
    assert_eq!(locale_of(&["it"]), "en");
    let r = render(&t, "sms", &["DE-at"], &[]).unwrap();
    assert_eq!(r.content.body.as_deref(), Some("Servus"));
}

#[test]
fn uses_the_first_locale_when_there_is_no_english() {
    let t = CompiledTemplate::compile(&meta(false), &[sms("fr", "Bonjour"), sms("de", "Hallo")]).unwrap();
    assert_eq!(render(&t, "sms", &["it"], &[]).unwrap().locale, "de");
}

#[test]
fn a_channel_without_content_is_no_content() {
    let t = CompiledTemplate::compile(&meta(false), &[sms("en", "Hello")]).unwrap();
    assert_eq!(render(&t, "push", &["en"], &[]), Err(RenderError::NoContent { channel: "push".into() }));
}

#[test]
fn a_missing_param_is_named() {
    let t = CompiledTemplate::compile(&meta(false), &[sms("en", "Hi {{ name }}, your code is {{ code }}")]).unwrap();
    let err = render(&t, "sms", &["en"], &[("name", "Ada")]).unwrap_err();
    let RenderError::MissingParam { at, param } = &err else { panic!("{err:?}") };
    assert_eq!((at.to_string().as_str(), param.as_str()), ("welcome/sms/en/body", "code"));
    assert!(!err.is_retryable());
    let first = render(&t, "sms", &["en"], &[]).unwrap_err();
    assert!(matches!(&first, RenderError::MissingParam { param, .. } if param == "name"), "{first:?}");
    let ok = render(&t, "sms", &["en"], &[("name", "Ada"), ("code", "42")]).unwrap();
    assert_eq!(ok.content.body.as_deref(), Some("Hi Ada, your code is 42"));
}

#[test]
fn optional_params_can_be_guarded() {
    let t =
        CompiledTemplate::compile(&meta(false), &[sms("en", "Hi{% if name is defined %} {{ name }}{% endif %}{{ suffix | default('!') }}")]).unwrap();
    assert_eq!(render(&t, "sms", &["en"], &[]).unwrap().content.body.as_deref(), Some("Hi!"));
}

#[test]
fn escapes_params_in_html_but_not_in_text_or_subject() {
    let t = CompiledTemplate::compile(&meta(false), &[email("<p>Hi {{ name }}</p>")]).unwrap();
    let c = render(&t, "email", &["en"], &[("name", "<script>x</script>")]).unwrap().content;
    assert_eq!(c.html.as_deref(), Some("<p>Hi &lt;script&gt;x&lt;&#x2f;script&gt;</p>"));
    assert_eq!(c.text.as_deref(), Some("Hi <script>x</script>"));
    assert_eq!(c.subject.as_deref(), Some("Hi <script>x</script>"));
    assert_eq!((c.title, c.body, c.sms_encoding), (None, None, None));
}

#[test]
fn subjects_are_one_line() {
    let t = CompiledTemplate::compile(&meta(false), &[email("x")]).unwrap();
    let c = render(&t, "email", &["en"], &[("name", "Ada\r\nBcc: evil@example.com")]).unwrap().content;
    assert_eq!(c.subject.as_deref(), Some("Hi Ada Bcc: evil@example.com"));
}

#[test]
fn sms_carries_encoding_and_segments() {
    let t = CompiledTemplate::compile(&meta(false), &[sms("en", "{{ msg }}")]).unwrap();
    let sized = |msg: &str| {
        let c = render(&t, "sms", &["en"], &[("msg", msg)]).unwrap().content;
        (c.sms_encoding.unwrap(), c.sms_segments.unwrap())
    };
    assert_eq!(sized(&"a".repeat(160)), ("GSM-7".into(), 1));
    assert_eq!(sized(&"a".repeat(161)), ("GSM-7".into(), 2));
    assert_eq!(sized("Привет 🎉"), ("UCS-2".into(), 1));
}

#[test]
fn push_renders_title_body_and_each_data_value() {
    let push = TemplateContent {
        title: Some("Hi {{ name }}".into()),
        body: Some("Order {{ order }} shipped".into()),
        data: Some([("deeplink".to_string(), "app://orders/{{ order }}".to_string()), ("kind".into(), "ship".into())].into()),
        ..content("push", "en")
    };
    let t = CompiledTemplate::compile(&meta(false), &[push]).unwrap();
    let c = render(&t, "push", &["en"], &[("name", "<Ada>"), ("order", "7")]).unwrap().content;
    assert_eq!(c.title.as_deref(), Some("Hi <Ada>"));
    assert_eq!(c.body.as_deref(), Some("Order 7 shipped"));
    assert_eq!(c.data, [("deeplink".to_string(), "app://orders/7".to_string()), ("kind".into(), "ship".into())].into());
    assert_eq!(
        render(&t, "push", &["en"], &[("name", "Ada")]).unwrap_err().to_string(),
        "template welcome/push/en/body needs param 'order', which the request does not carry"
    );
}

#[test]
fn tracking_rewrites_links_and_adds_the_pixel() {
    let settings = TrackingSettings { base_url: "https://t.example.com".into(), secret: b"k".to_vec() };
    let html = r#"<body><a href="{{ link }}">go</a> <a href="mailto:help@example.com">help</a></body>"#;
    let t = CompiledTemplate::compile(&meta(true), &[email(html)]).unwrap();
    let ctx = RenderContext { delivery_id: "d1", tracking: Some(&settings) };
    let p = params(&[("name", "Ada"), ("link", "https://example.com/a?b=1&c=2")]);
    let c = t.render("email", &["en"], &p, &ctx).unwrap().content;
    let out = c.html.unwrap();
    let token = |prefix: &str| {
        let at = out.find(prefix).unwrap_or_else(|| panic!("{prefix} not in {out}")) + prefix.len();
        verify(b"k", &out[at..at + out[at..].find('"').unwrap()]).unwrap()
    };
    assert_eq!(token("https://t.example.com/t/c/"), TrackingClaim::click("d1", "https://example.com/a?b=1&c=2"));
    assert_eq!(token("https://t.example.com/t/o/"), TrackingClaim::open("d1"));
    assert!(out.contains(r#"href="mailto:help@example.com""#) && out.ends_with(r#"style="display:none"></body>"#), "{out}");
    assert_eq!(c.text.as_deref(), Some("Hi Ada"));

    // Off when the template or the deployment does not track.
    let plain = CompiledTemplate::compile(&meta(false), &[email(html)]).unwrap().render("email", &["en"], &p, &ctx).unwrap();
    assert!(!plain.content.html.unwrap().contains("t.example.com"));
    assert!(!t.render("email", &["en"], &p, &NO_TRACKING).unwrap().content.html.unwrap().contains("t.example.com"));
}

#[test]
fn a_syntax_error_names_the_field() {
    let err = CompiledTemplate::compile(&meta(false), &[sms("en", "ok"), email("<p>{{ name </p>")]).unwrap_err();
    let RenderError::Syntax { at, detail } = &err else { panic!("{err:?}") };
    assert_eq!(at.to_string(), "welcome/email/en/html");
    assert!(detail.contains("syntax error"), "{detail}");
}

#[test]
fn incomplete_contents_are_refused() {
    let err = CompiledTemplate::compile(&meta(false), &[content("sms", "en")]).unwrap_err();
    assert!(matches!(&err, RenderError::Incomplete { at } if at.field == "body"), "{err:?}");
    let no_subject = TemplateContent { subject: None, ..email("x") };
    assert!(matches!(CompiledTemplate::compile(&meta(false), &[no_subject]), Err(RenderError::Incomplete { .. })));
}

#[test]
fn compiles_once_and_renders_the_same_every_time() {
    fn shareable<T: Send + Sync>(_: &T) {}
    let t = CompiledTemplate::compile(&meta(false), &[email("<b>{{ name }}</b>"), sms("en", "{{ name }}")]).unwrap();
    shareable(&t);
    let p = [("name", "Ada & Bob")];
    let first = render(&t, "email", &["en"], &p).unwrap();
    assert_eq!(render(&t, "email", &["en"], &p).unwrap(), first);
    assert_eq!(first.content.html.as_deref(), Some("<b>Ada &amp; Bob</b>"));
    assert_eq!(render(&t, "sms", &["en"], &p).unwrap().content.body.as_deref(), Some("Ada & Bob"));
}

#[test]
fn covers_means_every_name_read_is_given() {
    let t =
        CompiledTemplate::compile(&meta(false), &[sms("en", "Hi {{ name }}{% set n = name %}{{ n }}"), sms("de", "Hallo {{ name }}, {{ code }}")])
            .unwrap();
    assert!(t.covers("sms", &params(&[("name", "A"), ("code", "1")])));
    assert!(t.covers("SMS", &params(&[("name", "A"), ("code", "1"), ("extra", "x")])));
    // The German content also reads `code`; a name bound by `set` is not a param.
    assert!(!t.covers("sms", &params(&[("name", "A")])));
    assert!(!t.covers("email", &params(&[("name", "A"), ("code", "1")])), "no email content");
    for p in [params(&[("name", "A"), ("code", "1")]), params(&[("name", "A")])] {
        let covered = t.covers("sms", &p);
        let renders = ["en", "de"].iter().all(|l| t.render("sms", &[l], &p, &NO_TRACKING).is_ok());
        assert!(!covered || renders, "covered but a render failed: {p:?}");
    }
}
