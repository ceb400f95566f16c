//! Request signing (appKey / appSecret): the canonical string, the client helper
//! [`sign_request`], server-side verification in constant time, the replay cache, scopes.
//!
//! Every `/v1` call carries four headers:
//!
//! - `X-Herald-Key`: the app key (`hk_…`).
//! - `X-Herald-Timestamp`: Unix seconds; more than `api.timestamp_tolerance_secs` (5 min)
//!   away from the server's clock is refused.
//! - `X-Herald-Nonce` (optional): any 8–64 characters of `[A-Za-z0-9_-]`; when present it is
//!   signed too (last line). Two otherwise identical requests in the same second need
//!   distinct nonces, since a signature is accepted once.
//! - `X-Herald-Signature`: `hex(HMAC-SHA256(secret, STRING))` with
//!
//! ```text
//! STRING = METHOD "\n" PATH "\n" CANONICAL_QUERY "\n" TIMESTAMP "\n" hex(SHA256(body))
//!          [ "\n" NONCE ]
//! ```
//!
//! `METHOD` upper-case, `PATH` exactly as sent (percent-escapes kept, neither decoded nor
//! re-encoded), `CANONICAL_QUERY` the query read as the API reads it, as
//! `application/x-www-form-urlencoded` pairs (`+` is a space, then `%XX` decoded; a literal
//! plus is `%2B`), sorted by name then value, re-encoded (RFC 3986 unreserved characters
//! kept, every other byte `%XX`) and joined with `&` (empty when there is no query). README's
//! "Signing" carries a worked example that a unit test checks. The HMAC key is the secret string's UTF-8 bytes. A signature is accepted once
//! within the tolerance window (replay cache).

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const HEADER_KEY: &str = "x-herald-key";
pub const HEADER_TIMESTAMP: &str = "x-herald-timestamp";
pub const HEADER_NONCE: &str = "x-herald-nonce";
pub const HEADER_SIGNATURE: &str = "x-herald-signature";

/// What an app may do. `admin` implies every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// POST /v1/notifications (optionally only some categories).
    Send,
    /// Users, devices, preferences; inline contacts in a notification.
    Contacts,
    /// Create, version, list and preview templates.
    Templates,
    /// Read a notification's log.
    Status,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [Scope::Send, Scope::Contacts, Scope::Templates, Scope::Status, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::Contacts => "contacts",
            Scope::Templates => "templates",
            Scope::Status => "status",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s.trim())
    }
}

/// The signed headers of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub key: String,
    pub timestamp: i64,
    pub nonce: Option<String>,
    pub signature: String,
}

/// Why a request's authentication was refused. The API answers every variant with 401
/// and a stable code; unknown keys, revoked keys and wrong signatures share one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authentication headers")]
    Missing,
    #[error("malformed authentication headers")]
    Malformed,
    #[error("timestamp outside the accepted window")]
    Stale,
    #[error("invalid signature")]
    BadSignature,
    #[error("request already seen")]
    Replayed,
}

impl AuthError {
    /// The stable error code of the JSON answer.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_auth",
            AuthError::Malformed => "malformed_auth",
            AuthError::Stale => "stale_timestamp",
            AuthError::BadSignature => "invalid_signature",
            AuthError::Replayed => "replayed_request",
        }
    }
}

/// Reads the four headers through `get` (header name → value), checking their shape only.
///
/// # Errors
/// [`AuthError::Missing`] when key, timestamp or signature is absent; [`AuthError::Malformed`]
/// when one is present but not of its form.
pub fn parse_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<SignedHeaders, AuthError> {
    let (Some(key), Some(ts), Some(sig)) = (get(HEADER_KEY), get(HEADER_TIMESTAMP), get(HEADER_SIGNATURE)) else {
        return Err(AuthError::Missing);
    };
    let key_ok = (3..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let timestamp: i64 = ts.parse().map_err(|_| AuthError::Malformed)?;
    let sig_ok = sig.len() == 64 && sig.bytes().all(|b| b.is_ascii_hexdigit());
    let nonce = get(HEADER_NONCE).map(str::to_string);
    let nonce_ok =
        nonce.as_deref().is_none_or(|n| (8..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    if !key_ok || !sig_ok || !nonce_ok || ts.starts_with('+') {
        return Err(AuthError::Malformed);
    }
    Ok(SignedHeaders { key: key.to_string(), timestamp, nonce, signature: sig.to_ascii_lowercase() })
}

/// Whether `timestamp` (Unix seconds) is within `tolerance` of `now`.
pub fn fresh(timestamp: i64, now: i64, tolerance: Duration) -> bool {
    timestamp.abs_diff(now) <= tolerance.as_secs()
}

/// The query's pairs, decoded, sorted and re-encoded (see the module docs).
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(q) = query.filter(|q| !q.is_empty()) else { return String::new() };
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The string an app signs.
pub fn string_to_sign(method: &str, path: &str, query: Option<&str>, timestamp: i64, nonce: Option<&str>, body: &[u8]) -> String {
    let mut s =
        format!("{}\n{}\n{}\n{}\n{}", method.to_ascii_uppercase(), path, canonical_query(query), timestamp, hex::encode(Sha256::digest(body)));
    if let Some(n) = nonce {
        s.push('\n');
        s.push_str(n);
    }
    s
}

fn mac(secret: &[u8], data: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(data.as_bytes());
    m
}

/// `hex(HMAC-SHA256(secret, string_to_sign))`.
pub fn signature(secret: &[u8], string_to_sign: &str) -> String {
    hex::encode(mac(secret, string_to_sign).finalize().into_bytes())
}

/// Whether `given` (hex) is the signature of `string_to_sign` under `secret`; the
/// comparison is constant-time (the MAC's own `verify_slice`, built on `subtle`).
pub fn verify(secret: &[u8], string_to_sign: &str, given: &str) -> bool {
    let Ok(raw) = hex::decode(given) else { return false };
    mac(secret, string_to_sign).verify_slice(&raw).is_ok()
}

/// The headers a client sends: `path_and_query` as it will be sent (e.g.
/// `/v1/users/42?x=1`), `nonce` optional, `timestamp` in Unix seconds.
///
/// ```
/// let h = herald::api::auth::sign_request("hk_demo", "hs_secret", "POST", "/v1/notifications", b"{}", 1_700_000_000, Some("n-12345678"));
/// assert_eq!(h.len(), 4);
/// ```
pub fn sign_request(
    key: &str,
    secret: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp: i64,
    nonce: Option<&str>,
) -> Vec<(&'static str, String)> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let sts = string_to_sign(method, path, query, timestamp, nonce, body);
    let mut headers =
        vec![(HEADER_KEY, key.to_string()), (HEADER_TIMESTAMP, timestamp.to_string()), (HEADER_SIGNATURE, signature(secret.as_bytes(), &sts))];
    if let Some(n) = nonce {
        headers.push((HEADER_NONCE, n.to_string()));
    }
    headers
}

/// Signatures seen within the tolerance window, per app: a second use is a replay.
///
/// A signature covers its timestamp, so a replay carries the same timestamp: entries are
/// kept in one set per minute of request timestamp and a minute is dropped once every
/// timestamp in it is outside the window (exact, no eviction under load). Sharded to keep
/// lock hold times short; entries are 64-bit keyed hashes of (app key, signature).
///
/// In-process: with several API replicas the store's claim decides as well
/// (`api.replay_guard`, [`super::store::ApiStore::claim_signature`]); this cache still
/// refuses a replay to the same process without store work. When `max_entries` are held,
/// new requests are refused (fail closed) until old minutes expire.
pub struct ReplayCache {
    tolerance: i64,
    max_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<std::sync::Mutex<std::collections::HashMap<i64, std::collections::HashSet<u64>>>>,
}

/// Why the replay cache refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Used before: a replay.
    Again,
    /// The cache is full; refuse rather than forget.
    Full,
}

impl ReplayCache {
    const SHARDS: usize = 16;

    pub fn new(tolerance: Duration, max_entries: u64) -> ReplayCache {
        ReplayCache {
            tolerance: tolerance.as_secs() as i64,
            max_per_shard: (max_entries as usize / Self::SHARDS).max(1),
            hasher: Default::default(),
            shards: (0..Self::SHARDS).map(|_| Default::default()).collect(),
        }
    }

    /// Records the signature of a request stamped `timestamp` (already checked fresh
    /// against `now`); `Err` when it was seen before or the cache is full.
    pub fn first_use(&self, key: &str, signature: &str, timestamp: i64, now: i64) -> Result<(), Seen> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((key, signature));
        let minute = timestamp.div_euclid(60);
        let mut shard = self.shards[(h % Self::SHARDS as u64) as usize].lock().expect("replay cache lock");
        // A minute is needed while some timestamp in it can still be fresh.
        shard.retain(|m, _| (m + 1) * 60 + self.tolerance >= now);
        if shard.values().map(|s| s.len()).sum::<usize>() >= self.max_per_shard {
            return Err(Seen::Full);
        }
        if shard.entry(minute).or_default().insert(h) {
            Ok(())
        } else {
            Err(Seen::Again)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers<'a>(h: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name| h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn signed_requests_verify_and_tampering_does_not() {
        let h = sign_request("hk_1", "hs_s3cret", "post", "/v1/users/a%20b?z=1&a=2", b"{\"x\":1}", 1_700_000_000, Some("nonce-0001"));
        let parsed = parse_headers(headers(&h)).unwrap();
        assert_eq!(parsed.nonce.as_deref(), Some("nonce-0001"));
        let sts = string_to_sign("POST", "/v1/users/a%20b", Some("a=2&z=1"), parsed.timestamp, Some("nonce-0001"), b"{\"x\":1}");
        assert!(verify(b"hs_s3cret", &sts, &parsed.signature));
        assert!(!verify(b"hs_other", &sts, &parsed.signature));
        let other_body = string_to_sign("POST", "/v1/users/a%20b", Some("a=2&z=1"), parsed.timestamp, Some("nonce-0001"), b"{\"x\":2}");
        assert!(!verify(b"hs_s3cret", &other_body, &parsed.signature));
        let no_nonce = string_to_sign("POST", "/v1/users/a%20b", Some("a=2&z=1"), parsed.timestamp, None, b"{\"x\":1}");
        assert!(!verify(b"hs_s3cret", &no_nonce, &parsed.signature));
    }

    #[test]
    fn canonical_query_sorts_decodes_and_reencodes() {
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
        assert_eq!(canonical_query(Some("b=2&a=1&a=0")), "a=0&a=1&b=2");
        assert_eq!(canonical_query(Some("q=a+b&r=%2F~")), "q=a%20b&r=%2F~");
        assert_eq!(canonical_query(Some("q=a%20b")), canonical_query(Some("q=a+b")));
    }

    /// README's worked example is what this module computes: path raw, `+` a space, `%2B` a plus.
    #[test]
    fn readme_signing_example_is_what_sign_request_computes() {
        let readme = include_str!("../../README.md");
        let block = readme.split("<!-- signing-example -->").nth(1).expect("README has the signing example");
        let block = block.split("```").nth(1).expect("the example is a code block");
        let field = |name: &str| {
            block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("example lacks {name}")).to_string()
        };
        let request = field("request");
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
        let timestamp: i64 = field("timestamp").parse().unwrap();
        let nonce = field("nonce");
        let secret = field("secret");
        let expected: Vec<String> = block
            .lines()
            .skip_while(|l| !l.starts_with("STRING"))
            .take_while(|l| !l.starts_with("signature"))
            .map(|l| l.trim_start_matches("STRING").trim().to_string())
            .collect();
        let (path, query) = target.split_once('?').unwrap();
        assert_eq!(string_to_sign(method, path, Some(query), timestamp, Some(&nonce), b""), expected.join("\n"));
        let headers = sign_request("hk_example", &secret, method, target, b"", timestamp, Some(&nonce));
        let sig = headers.iter().find(|(n, _)| *n == HEADER_SIGNATURE).unwrap().1.clone();
        assert_eq!(sig, field("signature"));
        // The readings the example pins down: a decoded path, or `+` taken literally, sign differently.
        assert_ne!(string_to_sign(method, "/v1/users/ana lima/devices", Some(query), timestamp, Some(&nonce), b""), expected.join("\n"));
        assert_ne!(canonical_query(Some("b=x+y")), canonical_query(Some("b=x%2By")));
    }

    #[test]
    fn headers_are_checked_for_shape() {
        let ok = sign_request("hk_1", "s", "GET", "/v1/x", b"", 5, None);
        assert!(parse_headers(headers(&ok)).is_ok());
        assert_eq!(parse_headers(|_| None), Err(AuthError::Missing));
        for (name, bad) in
            [(HEADER_TIMESTAMP, "soon"), (HEADER_TIMESTAMP, "+5"), (HEADER_SIGNATURE, "abc"), (HEADER_KEY, "k\u{e9}y"), (HEADER_NONCE, "short")]
        {
            let mut h = ok.clone();
            h.retain(|(n, _)| *n != name);
            h.push((name, bad.to_string()));
            assert_eq!(parse_headers(headers(&h)), Err(AuthError::Malformed), "{name}={bad}");
        }
    }

    #[test]
    fn freshness_window_is_symmetric() {
        let t = Duration::from_secs(300);
        assert!(fresh(1000, 1300, t) && fresh(1300, 1000, t));
        assert!(!fresh(1000, 1301, t) && !fresh(1301, 1000, t));
        assert!(!fresh(i64::MIN, 0, t) && !fresh(i64::MAX, 0, t));
    }

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let c = ReplayCache::new(Duration::from_secs(300), 1000);
        let now = 1_700_000_000;
        assert_eq!(c.first_use("hk_1", "ab", now, now), Ok(()));
        assert_eq!(c.first_use("hk_1", "ab", now, now + 299), Err(Seen::Again));
        assert_eq!(c.first_use("hk_2", "ab", now, now), Ok(()), "per app");
        // Once the timestamp is out of the window its minute is dropped (the request would
        // be refused as stale before reaching the cache anyway).
        assert_eq!(c.first_use("hk_1", "ab", now, now + 361), Ok(()), "forgotten once its minute left the window");
        assert_eq!(c.first_use("hk_1", "ab", now, now + 300), Err(Seen::Again));
    }

    #[test]
    fn a_full_cache_fails_closed() {
        let c = ReplayCache::new(Duration::from_secs(300), 16);
        let now = 1_700_000_000;
        let results: Vec<_> = (0..200).map(|i| c.first_use("hk", &format!("sig{i}"), now, now)).collect();
        assert!(results.contains(&Err(Seen::Full)));
        assert!(!results.contains(&Err(Seen::Again)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the request, its own signature verifies, and changing any one part
        /// (method, path, query, timestamp, body, nonce, secret) breaks it.
        #[test]
        fn signature_binds_every_part(
            method in "(GET|POST|PUT|DELETE)",
            path in "/[a-zA-Z0-9/%._-]{0,40}",
            query in proptest::option::of("[a-z]{1,4}=[a-zA-Z0-9%+ ]{0,8}(&[a-z]{1,4}=[a-z0-9]{0,5}){0,3}"),
            ts in 0i64..4_000_000_000,
            body in proptest::collection::vec(any::<u8>(), 0..256),
            nonce in proptest::option::of("[A-Za-z0-9_-]{8,20}"),
            secret in "[ -~]{1,40}",
            flip in 0usize..7,
        ) {
            let pq = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let h = sign_request("hk_prop", &secret, &method, &pq, &body, ts, nonce.as_deref());
            let parsed = parse_headers(headers(&h)).unwrap();
            let sts = string_to_sign(&method, &path, query.as_deref(), parsed.timestamp, parsed.nonce.as_deref(), &body);
            prop_assert!(verify(secret.as_bytes(), &sts, &parsed.signature));
            let mut body2 = body.clone();
            let (mut m, mut p, mut q, mut t, mut n, mut s) = (method.clone(), path.clone(), query.clone(), ts, nonce.clone(), secret.clone());
            match flip {
                0 => m = if m == "GET" { "POST".into() } else { "GET".into() },
                1 => p.push('x'),
                2 => q = Some(format!("{}&zz=1", q.unwrap_or_default())),
                3 => t += 1,
                4 => body2.push(b'!'),
                5 => n = match n { Some(_) => None, None => Some("added-nonce".into()) },
                _ => s.push('!'),
            }
            let tampered = string_to_sign(&m, &p, q.as_deref(), t, n.as_deref(), &body2);
            prop_assert!(!verify(s.as_bytes(), &tampered, &parsed.signature));
        }

        /// The verifier never panics on arbitrary header values and accepts no signature
        /// that is not the HMAC.
        #[test]
        fn arbitrary_headers_never_panic(key in ".{0,80}", ts in ".{0,24}", sig in ".{0,80}", nonce in proptest::option::of(".{0,80}")) {
            let mut h = vec![(HEADER_KEY, key), (HEADER_TIMESTAMP, ts), (HEADER_SIGNATURE, sig)];
            if let Some(n) = nonce { h.push((HEADER_NONCE, n)); }
            if let Ok(p) = parse_headers(headers(&h)) {
                prop_assert!(!verify(b"secret", "GET\n/\n\n0\n", &p.signature) || p.signature == signature(b"secret", "GET\n/\n\n0\n"));
            }
        }

        /// Query order and `+`/`%20` spelling do not change the canonical form.
        #[test]
        fn canonical_query_ignores_order(pairs in proptest::collection::vec(("[a-z]{1,3}", "[a-z ]{0,4}"), 0..6)) {
            let q1: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", v.replace(' ', "+"))).collect();
            let mut rev = pairs.clone();
            rev.reverse();
            let q2: Vec<String> = rev.iter().map(|(k, v)| format!("{k}={}", v.replace(' ', "%20"))).collect();
            prop_assert_eq!(canonical_query(Some(&q1.join("&"))), canonical_query(Some(&q2.join("&"))));
        }
    }
}
