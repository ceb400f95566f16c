//! Field validation shared by the endpoints: ids, email syntax, E.164 phone numbers (the
//! `phonenumber` crate, a port of libphonenumber's metadata), push token formats, locales,
//! time zones, params size limits. Pure functions; each error names the field.

use std::collections::HashMap;
use std::str::FromStr;

/// A field that failed validation: its JSON path and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), problem: problem.into() }
    }
}

/// User ids, template ids: 1–128 printable characters, no `/`, `?`, `#`, `%` or whitespace.
pub fn id(field: &str, v: &str) -> Result<(), FieldError> {
    let ok = (1..=128).contains(&v.chars().count()) && v.chars().all(|c| printable(c) && !c.is_whitespace() && !"/?#%".contains(c));
    ok.then_some(()).ok_or_else(|| {
        FieldError::new(
            field,
            "must be 1-128 printable characters without whitespace, '/', '?', '#' or '%' (no control, format or other invisible characters)",
        )
    })
}

/// Printable: not a control character, not a Unicode format character (category Cf: bidi
/// overrides and isolates, zero-width joiners and spaces, the BOM, tags, …), not another
/// character that renders as nothing (fillers, variation selectors, the combining grapheme
/// joiner) and not private use. Two ids that look alike are then alike.
pub fn printable(c: char) -> bool {
    let u = c as u32;
    // Unicode 15.1, General_Category = Cf.
    const FORMAT: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    // Invisible but not Cf: combining grapheme joiner, Hangul and Khmer fillers, variation
    // selectors; and private use (Co), whose look is anyone's guess.
    const INVISIBLE: &[(u32, u32)] = &[
        (0x034F, 0x034F),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x3164, 0x3164),
        (0xFFA0, 0xFFA0),
        (0xFE00, 0xFE0F),
        (0xE0100, 0xE01EF),
        (0xE000, 0xF8FF),
        (0xF0000, 0x10FFFF),
    ];
    !c.is_control() && !FORMAT.iter().chain(INVISIBLE).any(|&(lo, hi)| (lo..=hi).contains(&u))
}

/// Client event ids: 1–200 of `[A-Za-z0-9._:@-]`.
pub fn event_id(field: &str, v: &str) -> Result<(), FieldError> {
    let ok = (1..=200).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
    ok.then_some(()).ok_or_else(|| FieldError::new(field, "must be 1-200 characters of A-Z a-z 0-9 . _ : @ -"))
}

/// An email address (RFC 5322 addr-spec syntax, with a dotted domain); returned trimmed.
pub fn email(field: &str, v: &str) -> Result<String, FieldError> {
    let v = v.trim();
    let bad = || FieldError::new(field, "is not a valid email address");
    let parsed = email_address::EmailAddress::from_str(v).map_err(|_| bad())?;
    // `a@localhost` is valid syntax but never deliverable from a notification platform.
    if !parsed.domain().contains('.') || v.len() > 254 || v.contains(['<', '>', ' ']) {
        return Err(bad());
    }
    Ok(v.to_string())
}

/// A phone number in E.164 (`+` and country code), valid per libphonenumber metadata;
/// returned normalised (`+4915112345678`).
pub fn phone(field: &str, v: &str) -> Result<String, FieldError> {
    let v = v.trim();
    let bad = || FieldError::new(field, "is not a valid phone number in E.164 form (+ country code, e.g. +4915112345678)");
    if !v.starts_with('+') {
        return Err(bad());
    }
    let n = phonenumber::parse(None, v).map_err(|_| bad())?;
    if !phonenumber::is_valid(&n) {
        return Err(bad());
    }
    Ok(n.format().mode(phonenumber::Mode::E164).to_string())
}

/// Push platforms and their token formats: `ios` → APNs device token (even-length hex,
/// 64–200 characters; 64 today); `android` / `web` → FCM registration token (32–4096
/// characters of `[A-Za-z0-9_:.-]`).
pub fn push_token(field: &str, platform: &str, token: &str) -> Result<(), FieldError> {
    match platform {
        "ios" => {
            let ok = (64..=200).contains(&token.len()) && token.len().is_multiple_of(2) && token.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then_some(()).ok_or_else(|| FieldError::new(field, "is not an APNs device token (hex, 64 characters or more)"))
        }
        "android" | "web" => {
            let ok = (32..=4096).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b));
            ok.then_some(()).ok_or_else(|| FieldError::new(field, "is not an FCM registration token (32-4096 characters of A-Z a-z 0-9 _ : . -)"))
        }
        _ => Err(FieldError::new(field.replace("token", "platform"), "must be ios, android or web")),
    }
}

/// A BCP 47-ish locale tag: `en`, `de-DE`, `zh-Hant-TW`.
pub fn locale(field: &str, v: &str) -> Result<(), FieldError> {
    let parts: Vec<&str> = v.split(['-', '_']).collect();
    let ok = v.len() <= 35
        && parts[0].len() >= 2
        && parts[0].len() <= 3
        && parts[0].bytes().all(|b| b.is_ascii_alphabetic())
        && parts.iter().all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()));
    ok.then_some(()).ok_or_else(|| FieldError::new(field, "is not a locale tag like en or de-DE"))
}

/// An IANA time zone name.
pub fn timezone(field: &str, v: &str) -> Result<(), FieldError> {
    v.parse::<chrono_tz::Tz>().map(|_| ()).map_err(|_| FieldError::new(field, "is not an IANA time zone like Europe/Berlin"))
}

/// Request channels.
pub fn channel(field: &str, v: &str) -> Result<(), FieldError> {
    crate::router::policy::CHANNELS.contains(&v).then_some(()).ok_or_else(|| FieldError::new(field, "must be push, sms or email"))
}

/// Size limits of template params.
#[derive(Debug, Clone, Copy)]
pub struct ParamLimits {
    pub max_params: usize,
    pub max_value_bytes: usize,
    pub max_total_bytes: usize,
}

/// Checks count, key shape and sizes of `params`.
pub fn params(field: &str, p: &HashMap<String, String>, limits: ParamLimits) -> Result<(), FieldError> {
    if p.len() > limits.max_params {
        return Err(FieldError::new(field, format!("has more than {} params", limits.max_params)));
    }
    let mut total = 0;
    for (k, v) in p {
        if k.is_empty() || k.len() > 64 || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
            return Err(FieldError::new(format!("{field}.{k}"), "param names are 1-64 characters of A-Z a-z 0-9 _ ."));
        }
        if v.len() > limits.max_value_bytes {
            return Err(FieldError::new(format!("{field}.{k}"), format!("is longer than {} bytes", limits.max_value_bytes)));
        }
        if let Some(c) = v.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                format!("contains the control character U+{:04X} (only tab, CR and LF are allowed)", c as u32),
            ));
        }
        total += k.len() + v.len();
    }
    if total > limits.max_total_bytes {
        return Err(FieldError::new(field, format!("are larger than {} bytes together", limits.max_total_bytes)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["a@example.com", "first.last+tag@sub.example.co.uk", " x@y.io "] {
            assert!(email("email", ok).is_ok(), "{ok}");
        }
        for bad in ["", "plain", "a@", "@b.com", "a@@b.com", "a b@c.com", "a@localhost", "Name <a@b.com>"] {
            assert!(email("email", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phones_are_e164_and_valid() {
        assert_eq!(phone("phone", "+4915112345678").unwrap(), "+4915112345678");
        assert_eq!(phone("phone", "+1 (415) 555-0123").unwrap(), "+14155550123", "spaces and punctuation are normalised");
        assert_eq!(phone("phone", "+1 650 253 0000").unwrap(), "+16502530000");
        for bad in ["015112345678", "+49", "+999123456", "+49abc", "", "+4915112345678999999", "+1 415 000 0123"] {
            assert!(phone("phone", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_tokens() {
        let apns = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
        assert!(push_token("token", "ios", apns).is_ok());
        assert!(push_token("token", "ios", &apns[..62]).is_err());
        assert!(push_token("token", "ios", &apns.replace('a', "z")).is_err());
        let fcm = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";
        assert!(push_token("token", "android", fcm).is_ok());
        assert!(push_token("token", "web", "short:tok").is_err());
        assert!(push_token("token", "android", "has space in it and is long enough....").is_err());
        assert_eq!(push_token("devices[0].token", "symbian", fcm).unwrap_err().field, "devices[0].platform");
    }

    #[test]
    fn ids_locales_zones_and_params() {
        assert!(id("user_id", "user-42").is_ok());
        assert!(id("user_id", "a/b").is_err() && id("user_id", "").is_err() && id("user_id", &"x".repeat(129)).is_err());
        assert!(event_id("event_id", "order:42@shop").is_ok() && event_id("event_id", "a b").is_err());
        assert!(locale("locale", "de-DE").is_ok() && locale("locale", "zh-Hant-TW").is_ok());
        assert!(locale("locale", "d").is_err() && locale("locale", "de--DE").is_err() && locale("locale", "1e").is_err());
        assert!(timezone("timezone", "Europe/Berlin").is_ok() && timezone("timezone", "Mars/Olympus").is_err());
        let limits = ParamLimits { max_params: 2, max_value_bytes: 4, max_total_bytes: 10 };
        let p = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        assert!(params("params", &p(&[("a", "1234")]), limits).is_ok());
        assert!(params("params", &p(&[("a", "12345")]), limits).is_err());
        assert!(params("params", &p(&[("a", "1"), ("b", "2"), ("c", "3")]), limits).is_err());
        assert!(params("params", &p(&[("aaaa", "1234"), ("bbbb", "1")]), limits).is_err());
        assert!(params("params", &p(&[("bad key", "1")]), limits).is_err());
        let nul = params("params", &p(&[("a", "x\0y")]), limits).unwrap_err();
        assert_eq!((nul.field.as_str(), nul.problem.contains("U+0000")), ("params.a", true));
        assert!(params("params", &p(&[("a", "1\n2\t")]), limits).is_ok());
    }

    #[test]
    fn ids_refuse_invisible_and_format_characters() {
        for bad in [
            "user\u{202E}gnp.exe",
            "a\u{200D}b",
            "\u{2066}x",
            "x\u{FEFF}",
            "a\u{00AD}b",
            "a\u{200B}",
            "tag\u{E0041}",
            "a\u{FE0F}",
            "\u{3164}",
            "a\u{E000}",
            "a\u{0007}b",
            "a\u{0085}",
        ] {
            assert!(id("user_id", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["jürgen", "用户-42", "user@example.com", "ñandú_1", "Ελένη", "rocket-🚀"] {
            assert!(id("user_id", good).is_ok(), "{good:?} refused");
        }
    }
}
