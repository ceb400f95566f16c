//! Email open/click tracking applied to rendered HTML: `href`s of `<a>`/`<area>` tags that
//! point to http(s) become signed click URLs, and an open pixel goes before `</body>`.

use std::borrow::Cow;

use crate::tracking::{is_web_url, TrackingSettings};

/// Rewrites the links of `html` and adds the open pixel for `delivery_id`.
/// `mailto:`, relative and other non-web links, and `href`s of other tags (stylesheets),
/// are left alone.
pub(crate) fn track(html: &str, delivery_id: &str, t: &TrackingSettings) -> String {
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    let mut out = String::with_capacity(html.len() + 512);
    let (mut copied, mut from) = (0, 0);
    while let Some(at) = lower[from..].find("href").map(|i| i + from) {
        from = at + 4;
        let after_space = at > 0 && lower.as_bytes()[at - 1].is_ascii_whitespace();
        if !after_space || !in_link_tag(&lower[..at]) {
            continue;
        }
        let Some((start, end)) = quoted_value(html, from) else { continue };
        from = end;
        let url = unescape(&html[start..end]);
        if is_web_url(url.trim()) {
            out.push_str(&html[copied..start]);
            out.push_str(&t.click_url(delivery_id, url.trim()));
            copied = end;
        }
    }
    let pixel = format!(r#"<img src="{}" width="1" height="1" alt="" style="display:none">"#, t.open_url(delivery_id));
    match lower.rfind("</body") {
        Some(body_end) if body_end >= copied => {
            out.push_str(&html[copied..body_end]);
            out.push_str(&pixel);
            out.push_str(&html[body_end..]);
        }
        _ => {
            out.push_str(&html[copied..]);
            out.push_str(&pixel);
        }
    }
    out
}

/// Whether the tag open at the end of `before` is `<a …` or `<area …`.
fn in_link_tag(before: &str) -> bool {
    let Some(open) = before.rfind('<') else { return false };
    let tag = &before[open + 1..];
    !tag.contains('>') && matches!(tag.split(|c: char| c.is_ascii_whitespace()).next(), Some("a" | "area"))
}

/// Byte range of the quoted value of `= "…"` / `= '…'` starting at `from`.
fn quoted_value(s: &str, from: usize) -> Option<(usize, usize)> {
    let rest = s[from..].trim_start().strip_prefix('=')?.trim_start();
    let quote = rest.chars().next().filter(|q| *q == '"' || *q == '\'')?;
    let start = s.len() - rest.len() + 1;
    let end = start + s[start..].find(quote)?;
    Some((start, end))
}

/// Decodes the character references an attribute value may carry (minijinja escapes
/// `&<>"'/`, so a `{{ url }}` in an href arrives as `https:&#x2f;&#x2f;…`).
fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let (mut out, mut rest) = (String::with_capacity(s.len()), s);
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|end| *end <= 10).and_then(|end| Some((entity(&rest[1..end])?, end)));
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let num = name.strip_prefix('#')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::{verify, TrackingClaim};

    fn settings() -> TrackingSettings {
        TrackingSettings { base_url: "https://t.example.com".into(), secret: b"k".to_vec() }
    }

    /// The claims behind every tracking URL in `html`, in order.
    fn claims(html: &str) -> Vec<TrackingClaim> {
        html.match_indices("https://t.example.com/t/")
            .map(|(i, p)| {
                let token: String = html[i + p.len() + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).collect();
                verify(b"k", &token).unwrap()
            })
            .collect()
    }

    #[test]
    fn rewrites_web_links_to_verifiable_click_urls() {
        let html = r#"<html><body><a href="https://example.com/a?x=1&amp;y=2">A</a> <A class="b" HREF = 'http://example.com/b'>B</A></body></html>"#;
        let out = track(html, "d1", &settings());
        assert!(!out.contains("example.com/a") && !out.contains("example.com/b"), "{out}");
        assert_eq!(
            claims(&out),
            [
                TrackingClaim::click("d1", "https://example.com/a?x=1&y=2"),
                TrackingClaim::click("d1", "http://example.com/b"),
                TrackingClaim::open("d1"),
            ]
        );
    }

    #[test]
    fn decodes_escaped_urls_before_signing() {
        let out = track(r#"<a href="https:&#x2f;&#x2f;example.com&#x2f;p">x</a>"#, "d1", &settings());
        assert_eq!(claims(&out)[0], TrackingClaim::click("d1", "https://example.com/p"));
    }

    #[test]
    fn leaves_mailto_relative_and_stylesheet_links_alone() {
        let html = r#"<link href="https://fonts.example.com/f.css"><a href="mailto:help@example.com">m</a><a href="/account">r</a><a data-href="https://x.example.com">d</a>"#;
        let out = track(html, "d1", &settings());
        assert!(out.starts_with(html), "{out}");
        assert_eq!(claims(&out), [TrackingClaim::open("d1")]);
    }

    #[test]
    fn puts_the_open_pixel_before_the_body_end_or_at_the_end() {
        let out = track("<body><p>hi</p></BODY>", "d1", &settings());
        assert!(out.starts_with(r#"<body><p>hi</p><img src="https://t.example.com/t/o/"#), "{out}");
        assert!(out.ends_with(r#" width="1" height="1" alt="" style="display:none"></BODY>"#), "{out}");
        let out = track("<p>hi</p>", "d1", &settings());
        assert!(out.starts_with(r#"<p>hi</p><img src="#) && out.ends_with(r#"style="display:none">"#), "{out}");
    }
}
