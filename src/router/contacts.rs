//! The router's bounded read-through cache of users, devices, preferences and templates,
//! invalidated through the changes topic ([`crate::changes`]: `user:<id>`, `template:<id>`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use crate::changes::Invalidate;
use crate::render::CompiledTemplate;
use crate::store::{ContactHealth, Device, Store, StoreError, Template, User};

/// A user with every device (active or not) and whether their email and phone still work.
#[derive(Debug, Clone)]
pub struct Contact {
    pub user: User,
    pub devices: Vec<Device>,
    pub health: ContactHealth,
}

/// A template's metadata and its compiled live version.
pub struct LoadedTemplate {
    pub meta: Template,
    pub compiled: Result<CompiledTemplate, String>,
}

/// Opt-in choices of one user, by (channel, category).
pub type Prefs = HashMap<(String, String), bool>;

/// Read-through caches in front of the store; `None` entries (unknown user or template) are
/// cached too, until invalidated or expired.
pub struct Contacts {
    store: Arc<Store>,
    users: Cache<String, Arc<Option<Contact>>>,
    prefs: Cache<String, Arc<Prefs>>,
    templates: Cache<String, Arc<Option<LoadedTemplate>>>,
    /// Counts invalidations, so a bulk load that overlapped one drops what it cached
    /// ([`Contacts::load_many`]).
    invalidations: AtomicU64,
}

/// A user's cached contact and opt-in choices.
pub type Cached = (Arc<Option<Contact>>, Arc<Prefs>);

impl Contacts {
    pub fn new(store: Arc<Store>, max_entries: u64, ttl: Duration) -> Contacts {
        Contacts {
            store,
            users: cache(max_entries, ttl),
            prefs: cache(max_entries, ttl),
            templates: cache(max_entries, ttl),
            invalidations: AtomicU64::new(0),
        }
    }

    /// The contacts and preferences of many users: cached ones from the cache, the rest in
    /// one bulk read ([`Store::contacts_of`]), then cached. A change announced while the
    /// bulk read ran may not be in what it read, so its entries are then dropped again
    /// (this batch still uses them, as a read racing the change would anyway).
    pub async fn load_many(&self, users: &[&str]) -> Result<HashMap<String, Cached>, StoreError> {
        let before = self.invalidations.load(Ordering::SeqCst);
        let mut out = HashMap::with_capacity(users.len());
        let mut missing = Vec::new();
        for u in users {
            match (self.users.get(*u).await, self.prefs.get(*u).await) {
                (Some(c), Some(p)) => {
                    out.insert(u.to_string(), (c, p));
                }
                _ => missing.push(*u),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let mut found = self.store.contacts_of(&missing).await?;
        for u in &missing {
            let (contact, prefs) = match found.remove(*u) {
                Some(rows) => {
                    (Arc::new(Some(Contact { user: rows.user, devices: rows.devices, health: rows.health })), Arc::new(prefs_of(rows.preferences)))
                }
                None => (Arc::new(None), Arc::new(Prefs::new())),
            };
            self.users.insert(u.to_string(), contact.clone()).await;
            self.prefs.insert(u.to_string(), prefs.clone()).await;
            out.insert(u.to_string(), (contact, prefs));
        }
        // The follower counts before it invalidates: an unchanged count here means any later
        // invalidation comes after these inserts and removes them itself.
        if self.invalidations.load(Ordering::SeqCst) != before {
            for u in &missing {
                self.users.invalidate(*u).await;
                self.prefs.invalidate(*u).await;
            }
        }
        Ok(out)
    }

    pub async fn contact(&self, user_id: &str) -> Result<Arc<Option<Contact>>, StoreError> {
        let store = &self.store;
        self.users
            .try_get_with(user_id.to_string(), async {
                let Some(user) = store.user(user_id).await? else { return Ok(Arc::new(None)) };
                let (devices, health) = tokio::try_join!(store.devices(user_id), store.contact_health(user_id))?;
                Ok(Arc::new(Some(Contact { user, devices, health })))
            })
            .await
            .map_err(unshare)
    }

    pub async fn prefs(&self, user_id: &str) -> Result<Arc<Prefs>, StoreError> {
        let store = &self.store;
        self.prefs.try_get_with(user_id.to_string(), async { Ok(Arc::new(prefs_of(store.preferences(user_id).await?))) }).await.map_err(unshare)
    }

    pub async fn template(&self, template_id: &str) -> Result<Arc<Option<LoadedTemplate>>, StoreError> {
        let store = &self.store;
        self.templates
            .try_get_with(template_id.to_string(), async {
                let Some(meta) = store.template(template_id).await? else { return Ok(Arc::new(None)) };
                let contents = store.template_contents(template_id, meta.current_version).await?;
                let compiled = CompiledTemplate::compile(&meta, &contents).map_err(|e| e.to_string());
                Ok(Arc::new(Some(LoadedTemplate { meta, compiled })))
            })
            .await
            .map_err(unshare)
    }

    /// Cached entries across all caches (for the memory benchmark).
    pub fn entries(&self) -> u64 {
        self.users.entry_count() + self.prefs.entry_count() + self.templates.entry_count()
    }
}

/// A user's preference rows as (channel, category) → opt-in.
fn prefs_of(rows: Vec<crate::store::Preference>) -> Prefs {
    rows.into_iter().map(|p| ((p.channel, p.category), p.opt_in)).collect()
}

fn cache<V: Clone + Send + Sync + 'static>(max_entries: u64, ttl: Duration) -> Cache<String, V> {
    Cache::builder().max_capacity(max_entries).time_to_live(ttl).build()
}

impl Invalidate for Contacts {
    async fn invalidate(&self, kind: &str, id: &str) {
        match kind {
            "user" | "devices" | "preferences" => {
                self.invalidations.fetch_add(1, Ordering::SeqCst);
                self.users.invalidate(id).await;
                self.prefs.invalidate(id).await;
            }
            "template" => {
                self.invalidations.fetch_add(1, Ordering::SeqCst);
                self.templates.invalidate(id).await;
            }
            _ => {}
        }
    }
}

fn unshare(e: Arc<StoreError>) -> StoreError {
    Arc::try_unwrap(e).unwrap_or_else(|e| StoreError::Query { op: "cache load", detail: e.to_string(), retryable: true })
}
