//! Apps: who may call the API, with which scopes. Secrets are generated here, shown once,
//! stored AES-256-GCM encrypted ([`SecretBox`]) and cached decrypted in the API process
//! ([`Apps`]). A rotation or revocation is announced on the changes topic (`app:<key>`),
//! which every API process follows, so it takes effect at once; `api.app_cache_ttl` bounds
//! it should an announcement be missed.
//!
//! `herald apps create | list | rotate | revoke` are thin shells over [`create`],
//! [`list`], [`rotate`] and [`revoke`].

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;

use super::auth::Scope;
use super::store::{ApiStore, AppRow};
use crate::config::Secret;
use crate::store::StoreError;

/// Encrypts and decrypts app secrets with the configured key; the app key is the
/// associated data, so a ciphertext moved to another app's row does not decrypt.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<redacted>)")
    }
}

impl SecretBox {
    pub fn new(key: &[u8; 32]) -> SecretBox {
        SecretBox { cipher: Aes256Gcm::new(key.into()) }
    }

    /// `base64(nonce || ciphertext)`.
    pub fn seal(&self, app_key: &str, secret: &str) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret.as_bytes(), aad: app_key.as_bytes() })
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    /// The secret, or `None` when the ciphertext was tampered with or sealed with another key.
    pub fn open(&self, app_key: &str, sealed: &str) -> Option<Secret> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: app_key.as_bytes() }).ok()?;
        String::from_utf8(pt).ok().map(Secret::new)
    }
}

/// A usable app: scopes, categories and its current (and during a rotation, previous) secret.
#[derive(Debug, Clone)]
pub struct App {
    pub key: String,
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// `send` is limited to these categories; empty = all.
    pub categories: BTreeSet<String>,
    pub rate_limit: Option<u32>,
    pub secret: Secret,
    pub previous: Option<(Secret, DateTime<Utc>)>,
}

impl App {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    pub fn may_send(&self, category: &str) -> bool {
        self.categories.is_empty() || self.categories.contains(category)
    }

    /// The secrets a signature may be made with now.
    pub fn secrets(&self, now: DateTime<Utc>) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.secret).chain(self.previous.iter().filter(move |(_, until)| *until > now).map(|(s, _)| s))
    }

    fn from_row(row: AppRow, secrets: &SecretBox) -> Option<App> {
        if row.revoked_at.is_some() {
            return None;
        }
        let secret = secrets.open(&row.app_key, row.secret_enc.as_deref()?)?;
        let previous = match (&row.previous_secret_enc, row.previous_valid_until) {
            (Some(enc), Some(until)) => secrets.open(&row.app_key, enc).map(|s| (s, until)),
            _ => None,
        };
        Some(App {
            name: row.name.unwrap_or_default(),
            scopes: row.scopes.unwrap_or_default().iter().filter_map(|s| Scope::parse(s)).collect(),
            categories: row.categories.unwrap_or_default().into_iter().collect(),
            rate_limit: row.rate_limit.and_then(|r| u32::try_from(r).ok()),
            key: row.app_key,
            secret,
            previous,
        })
    }
}

/// Cached, decrypted lookup of apps by key. `herald apps rotate | revoke` announce the
/// change on the changes topic and every API process drops its copy at once; the cache is
/// also refreshed in the background every `api.app_cache_ttl`, the bound should a change
/// be missed.
pub struct Apps {
    store: Arc<ApiStore>,
    secrets: SecretBox,
    cache: super::cache::Refreshing<Option<Arc<App>>>,
}

impl Apps {
    pub fn new(store: Arc<ApiStore>, secrets: SecretBox, ttl: Duration) -> Apps {
        Apps { store, secrets, cache: super::cache::Refreshing::new(10_000, ttl) }
    }

    /// The app, if it exists and is not revoked (unknown keys are cached too).
    pub async fn get(&self, key: &str) -> Result<Option<Arc<App>>, StoreError> {
        let (store, secrets, k) = (self.store.clone(), self.secrets.clone(), key.to_string());
        self.cache
            .get(key, move || {
                let (store, secrets, k) = (store.clone(), secrets.clone(), k.clone());
                async move { Ok(store.app(&k).await?.and_then(|r| App::from_row(r, &secrets)).map(Arc::new)) }
            })
            .await
    }

    /// Drops the cached copy of `key` (the next request reads the store).
    pub async fn invalidate(&self, key: &str) {
        self.cache.invalidate(key).await;
    }
}

/// What `apps create` / `apps rotate` hand out once.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub key: String,
    pub secret: Secret,
}

/// A listed app (never its secret).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppInfo {
    pub key: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub categories: Vec<String>,
    pub rate_limit: Option<i32>,
    pub created_at: Option<DateTime<Utc>>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn new_secret() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("hs_{}", B64URL.encode(raw))
}

fn new_key() -> String {
    let mut raw = [0u8; 12];
    rand::rng().fill_bytes(&mut raw);
    format!("hk_{}", hex::encode(raw))
}

/// Parses `send,contacts` into scopes.
///
/// # Errors
/// Names the first unknown scope.
pub fn parse_scopes(list: &[String]) -> Result<BTreeSet<Scope>, String> {
    list.iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(|s| Scope::parse(s).ok_or_else(|| format!("unknown scope '{}' (send, contacts, templates, status, admin)", s.trim())))
        .collect()
}

/// Creates an app and returns its credentials (the only time the secret is shown).
pub async fn create(
    store: &ApiStore,
    secrets: &SecretBox,
    name: &str,
    scopes: &BTreeSet<Scope>,
    categories: &BTreeSet<String>,
    rate_limit: Option<u32>,
) -> Result<Credentials, StoreError> {
    let key = new_key();
    let secret = new_secret();
    store
        .put_app(&AppRow {
            app_key: key.clone(),
            name: Some(name.to_string()),
            secret_enc: Some(secrets.seal(&key, &secret)),
            previous_secret_enc: None,
            previous_valid_until: None,
            scopes: Some(scopes.iter().map(|s| s.as_str().to_string()).collect::<HashSet<_>>()),
            categories: Some(categories.iter().cloned().collect()),
            rate_limit: rate_limit.map(|r| i32::try_from(r).unwrap_or(i32::MAX)),
            created_at: Some(Utc::now()),
            rotated_at: None,
            revoked_at: None,
        })
        .await?;
    Ok(Credentials { key, secret: Secret::new(secret) })
}

/// Every app, revoked ones included, without secrets.
pub async fn list(store: &ApiStore) -> Result<Vec<AppInfo>, StoreError> {
    let mut apps: Vec<AppInfo> = store
        .apps()
        .await?
        .into_iter()
        .map(|r| {
            let mut scopes: Vec<String> = r.scopes.unwrap_or_default().into_iter().collect();
            scopes.sort();
            let mut categories: Vec<String> = r.categories.unwrap_or_default().into_iter().collect();
            categories.sort();
            AppInfo {
                key: r.app_key,
                name: r.name.unwrap_or_default(),
                scopes,
                categories,
                rate_limit: r.rate_limit,
                created_at: r.created_at,
                rotated_at: r.rotated_at,
                revoked_at: r.revoked_at,
            }
        })
        .collect();
    apps.sort_by(|a, b| (a.created_at, &a.key).cmp(&(b.created_at, &b.key)));
    Ok(apps)
}

/// Why an app operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("no app with key {0}")]
    Unknown(String),
    #[error("app {0} is revoked")]
    Revoked(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Gives an app a new secret; the old one keeps working for `grace`.
pub async fn rotate(store: &ApiStore, secrets: &SecretBox, key: &str, grace: Duration) -> Result<Credentials, AppError> {
    let row = store.app(key).await?.ok_or_else(|| AppError::Unknown(key.to_string()))?;
    if row.revoked_at.is_some() {
        return Err(AppError::Revoked(key.to_string()));
    }
    let secret = new_secret();
    let until = Utc::now() + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
    store.rotate_app(key, &secrets.seal(key, &secret), row.secret_enc.as_deref(), until).await?;
    Ok(Credentials { key: key.to_string(), secret: Secret::new(secret) })
}

/// Revokes an app for good (the caller announces it on the changes topic).
pub async fn revoke(store: &ApiStore, key: &str) -> Result<(), AppError> {
    store.app(key).await?.ok_or_else(|| AppError::Unknown(key.to_string()))?;
    store.revoke_app(key).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_app() {
        let b = SecretBox::new(&[7u8; 32]);
        let sealed = b.seal("hk_a", "hs_secret");
        assert!(!sealed.contains("hs_secret"));
        assert_eq!(b.open("hk_a", &sealed).unwrap().expose(), "hs_secret");
        assert!(b.open("hk_b", &sealed).is_none(), "bound to the app key");
        assert!(SecretBox::new(&[8u8; 32]).open("hk_a", &sealed).is_none(), "other encryption key");
        let mut raw = B64.decode(&sealed).unwrap();
        raw[20] ^= 1;
        assert!(b.open("hk_a", &B64.encode(raw)).is_none(), "tampered");
        assert_ne!(b.seal("hk_a", "hs_secret"), sealed, "fresh nonce each time");
        assert!(!format!("{b:?}").contains('7'));
    }

    #[test]
    fn scopes_parse_and_admin_implies_all() {
        let s = parse_scopes(&["send,contacts".into(), "status".into()]).unwrap();
        assert_eq!(s.len(), 3);
        assert!(parse_scopes(&["sned".into()]).unwrap_err().contains("sned"));
        let app = App {
            key: "k".into(),
            name: "n".into(),
            scopes: [Scope::Admin].into(),
            categories: BTreeSet::new(),
            rate_limit: None,
            secret: Secret::new("s"),
            previous: Some((Secret::new("old"), Utc::now() - chrono::Duration::seconds(1))),
        };
        assert!(Scope::ALL.iter().all(|s| app.has(*s)));
        assert!(app.may_send("anything"));
        assert_eq!(app.secrets(Utc::now()).count(), 1, "expired previous secret is not offered");
        let keys: HashSet<String> = (0..100).map(|_| new_key()).collect();
        assert_eq!(keys.len(), 100);
    }
}
