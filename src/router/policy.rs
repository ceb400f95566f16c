//! The router's pure decisions: which addresses a channel has, opt-in, expiry, quiet hours
//! (and the hour-of-day partition of the delay topic), effective priority, outcome ids.
//! No I/O here, so every rule is unit-tested with plain values.

use std::collections::HashMap;

use chrono::{DateTime, Duration as ChronoDuration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use sha2::{Digest, Sha256};

use crate::config::CategoryConfig;
use crate::model::{NotificationRequested, Priority};
use crate::store::{ContactHealth, Device, ThrottleHit, User};

/// Request-level channels a client may ask for.
pub const CHANNELS: [&str; 3] = ["push", "sms", "email"];

/// One place to send to: the delivery channel (topic) and the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `apns` | `fcm` | `sms` | `email`.
    pub delivery_channel: &'static str,
    pub address: String,
    pub device_id: Option<String>,
}

/// Every address a request channel has for this user: push fans out to all active devices
/// (APNs for iOS, FCM for Android and web); SMS needs a phone, email an email address, each
/// not found dead by a provider.
pub fn addresses(channel: &str, user: &User, devices: &[Device], health: &ContactHealth) -> Vec<Address> {
    match channel {
        "push" => devices
            .iter()
            .filter(|d| d.active)
            .filter_map(|d| {
                let delivery_channel = match d.platform.as_str() {
                    "ios" => "apns",
                    "android" | "web" => "fcm",
                    _ => return None,
                };
                Some(Address { delivery_channel, address: d.token.clone(), device_id: Some(d.device_id.clone()) })
            })
            .collect(),
        "sms" => user
            .phone
            .iter()
            .filter(|p| !p.is_empty() && health.phone_active != Some(false))
            .map(|p| Address { delivery_channel: "sms", address: p.clone(), device_id: None })
            .collect(),
        "email" => user
            .email
            .iter()
            .filter(|e| !e.is_empty() && health.email_active != Some(false))
            .map(|e| Address { delivery_channel: "email", address: e.clone(), device_id: None })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether the user gets `category` on `channel`: a stored choice wins, unless the category
/// cannot be opted out of; otherwise the category's default.
pub fn opted_in(prefs: &HashMap<(String, String), bool>, channel: &str, category: &str, policy: &CategoryConfig) -> bool {
    if !policy.opt_out_allowed {
        return true;
    }
    prefs.get(&(channel.to_string(), category.to_string())).copied().unwrap_or(policy.opt_in_default)
}

/// Whether the request is past its `expires_at` or older than the category's max age.
pub fn expired(req: &NotificationRequested, policy: &CategoryConfig, now_ms: i64) -> bool {
    if req.expires_at.is_some_and(|e| e <= now_ms) {
        return true;
    }
    policy.max_age.is_some_and(|age| req.occurred_at + age.as_millis() as i64 <= now_ms)
}

/// The priority dispatchers see: the category's, raised (never lowered) by the request.
pub fn effective_priority(req: Priority, policy: &CategoryConfig) -> Priority {
    let cat = match policy.priority.as_str() {
        "high" => Priority::High,
        "low" => Priority::Low,
        _ => Priority::Normal,
    };
    req.max(cat)
}

/// Quiet hours in local time: `start`..`end`, possibly across midnight.
#[derive(Debug, Clone, Copy)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl QuietHours {
    /// `HH:MM` (or `HH:MM:SS`) local times.
    pub fn parse(start: &str, end: &str) -> Option<QuietHours> {
        Some(QuietHours { start: parse_time(start)?, end: parse_time(end)? })
    }

    /// `None` when `now` is outside quiet hours in `tz`; otherwise the instant they end.
    pub fn hold_until(&self, now: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&tz);
        let t = local.time();
        let quiet = if self.start <= self.end { t >= self.start && t < self.end } else { t >= self.start || t < self.end };
        if !quiet {
            return None;
        }
        let mut day = local.date_naive();
        if t >= self.end {
            day = day.succ_opt()?;
        }
        // A DST gap at `end` (rare): take the first valid instant after it.
        let naive = day.and_time(self.end);
        let end = tz.from_local_datetime(&naive).earliest().or_else(|| tz.from_local_datetime(&(naive + ChronoDuration::hours(1))).earliest())?;
        Some(end.with_timezone(&Utc))
    }
}

/// `HH:MM` or `HH:MM:SS`.
pub fn parse_time(s: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(s, "%H:%M:%S").or_else(|_| NaiveTime::parse_from_str(s, "%H:%M")).ok()
}

/// The delay-topic partition for a hold ending at `due`: one partition per UTC hour of the
/// day, so records in one partition come due in the order they were written (time zones
/// with half-hour offsets share an hour: at most 59 minutes of extra wait).
pub fn delay_partition(due: DateTime<Utc>, partitions: i32) -> i32 {
    use chrono::Timelike;
    (due.hour() as i32) % partitions.max(1)
}

/// A user's time zone, or the default when unset or unknown.
pub fn timezone(user: &User, default: Tz) -> Tz {
    user.timezone.as_deref().and_then(|z| z.parse().ok()).unwrap_or(default)
}

/// Deterministic outcome id: the same record producing the same outcome again (after a
/// crash) gets the same id, so the notification log and consumers can de-duplicate.
pub fn outcome_id(source: &str, event_id: &str, status: &str, channel: Option<&str>, delivery_id: Option<&str>) -> String {
    let mut h = Sha256::new();
    for part in [source, event_id, status, channel.unwrap_or(""), delivery_id.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..16])
}

/// How an event id's dedup claim is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimBy {
    /// A plain read, then a plain write: enough when only one router can hold any record of
    /// the event id at a time.
    ReadWrite,
    /// A lightweight transaction (`IF NOT EXISTS`): the first claimant wins even when two
    /// routers claim at once.
    Transaction,
}

/// How `router.dedup_mode` claims a record's event id. `keyed`: a record on the requests
/// topic keyed by its own user id lands on the partition every record of that user lands
/// on, and a partition has one router at a time (the consumer group; a stale owner's
/// transaction is fenced, and it would claim for the same record), so a read and a write
/// suffice; anything else (trigger topics, other keys, no key) might meet a record of the
/// same id on another partition at the same moment, so it takes a transaction.
pub fn claim_by(mode: &str, topic: &str, requests_topic: &str, key: Option<&[u8]>, user_id: &str) -> ClaimBy {
    match mode {
        "single_writer" => ClaimBy::ReadWrite,
        "keyed" if topic == requests_topic && key == Some(user_id.as_bytes()) => ClaimBy::ReadWrite,
        _ => ClaimBy::Transaction,
    }
}

/// What a throttle limit says about one more send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// This event was counted before (the record is being processed again): still fits.
    Counted,
    /// Fits: record a hit for it.
    Admit,
    /// `limit` other sends already fall inside the window.
    Throttled,
}

/// Checks one send of `event_id` against `limit` sends since `since`, given the hits recorded
/// for that user × channel × category.
pub fn throttle(hits: &[ThrottleHit], event_id: &str, limit: u32, since: DateTime<Utc>) -> Throttle {
    if hits.iter().any(|h| h.event_id == event_id) {
        return Throttle::Counted;
    }
    if hits.iter().filter(|h| h.at > since).count() >= limit as usize {
        Throttle::Throttled
    } else {
        Throttle::Admit
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_records_keyed_by_their_user_on_the_requests_topic_skip_the_transaction() {
        let by = |mode, topic, key: Option<&str>| claim_by(mode, topic, "requests", key.map(str::as_bytes), "u1");
        assert_eq!(by("keyed", "requests", Some("u1")), ClaimBy::ReadWrite);
        assert_eq!(by("keyed", "requests", Some("u2")), ClaimBy::Transaction, "another user's key");
        assert_eq!(by("keyed", "requests", None), ClaimBy::Transaction, "no key");
        assert_eq!(by("keyed", "orders.shipped", Some("u1")), ClaimBy::Transaction, "a trigger topic");
        assert_eq!(by("lwt", "requests", Some("u1")), ClaimBy::Transaction);
        assert_eq!(by("single_writer", "orders.shipped", None), ClaimBy::ReadWrite);
    }

    fn policy(opt_in_default: bool, opt_out_allowed: bool) -> CategoryConfig {
        CategoryConfig {
            opt_in_default,
            opt_out_allowed,
            priority: "normal".into(),
            throttle_limit: None,
            throttle_window: None,
            quiet_hours: true,
            max_age: Some(Duration::from_secs(600)),
        }
    }

    fn device(id: &str, platform: &str, active: bool) -> Device {
        Device { user_id: "u".into(), device_id: id.into(), platform: platform.into(), token: format!("tok-{id}"), app_id: None, active }
    }

    #[test]
    fn push_fans_out_to_every_active_device_by_platform() {
        let user = User { user_id: "u".into(), ..Default::default() };
        let devices = [device("a", "ios", true), device("b", "android", true), device("c", "web", true), device("d", "ios", false)];
        let ok = ContactHealth::default();
        let got: Vec<_> = addresses("push", &user, &devices, &ok).into_iter().map(|a| (a.delivery_channel, a.address)).collect();
        assert_eq!(got, vec![("apns", "tok-a".into()), ("fcm", "tok-b".into()), ("fcm", "tok-c".into())]);
        assert!(addresses("sms", &user, &devices, &ok).is_empty(), "no phone, no sms address");
    }

    #[test]
    fn a_contact_found_dead_is_no_address() {
        let user = User { user_id: "u".into(), email: Some("a@b.c".into()), phone: Some("+15550001".into()), ..Default::default() };
        let dead_phone = ContactHealth { email_active: Some(true), phone_active: Some(false) };
        assert!(addresses("sms", &user, &[], &dead_phone).is_empty());
        assert_eq!(addresses("email", &user, &[], &dead_phone).len(), 1);
    }

    #[test]
    fn stored_choice_wins_unless_the_category_is_mandatory() {
        let mut prefs = HashMap::new();
        prefs.insert(("sms".to_string(), "marketing".to_string()), false);
        assert!(!opted_in(&prefs, "sms", "marketing", &policy(true, true)));
        assert!(opted_in(&prefs, "email", "marketing", &policy(true, true)), "default applies elsewhere");
        assert!(!opted_in(&prefs, "email", "marketing", &policy(false, true)));
        assert!(opted_in(&prefs, "sms", "marketing", &policy(true, false)), "security codes ignore opt-outs");
    }

    #[test]
    fn expiry_by_deadline_or_category_age() {
        let mut req = crate::model::NotificationRequested {
            event_id: "e".into(),
            occurred_at: 1_000_000,
            source: "s".into(),
            user_id: "u".into(),
            category: "security".into(),
            template_id: "t".into(),
            params: HashMap::new(),
            channels: None,
            priority: Priority::Normal,
            locale: None,
            expires_at: None,
        };
        let p = policy(true, true);
        assert!(!expired(&req, &p, 1_000_000 + 599_999));
        assert!(expired(&req, &p, 1_000_000 + 600_000), "max age 10 min");
        req.expires_at = Some(1_000_500);
        assert!(expired(&req, &p, 1_000_500));
    }

    #[test]
    fn quiet_hours_across_midnight_end_at_local_morning() {
        let q = QuietHours::parse("21:00", "08:00").unwrap();
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 22:30 UTC = 23:30 in Berlin (winter): held until 08:00 Berlin = 07:00 UTC next day.
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 22, 30, 0).unwrap();
        assert_eq!(q.hold_until(now, berlin), Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap()));
        // 05:00 UTC = 06:00 Berlin: held until 07:00 UTC the same day.
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 5, 0, 0).unwrap();
        assert_eq!(q.hold_until(now, berlin), Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap()));
        // Midday: not quiet.
        assert_eq!(q.hold_until(Utc.with_ymd_and_hms(2026, 1, 11, 12, 0, 0).unwrap(), berlin), None);
        // A daytime window too.
        let q = QuietHours::parse("12:00", "13:00").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 12, 15, 0).unwrap();
        assert_eq!(q.hold_until(now, Tz::UTC), Some(Utc.with_ymd_and_hms(2026, 1, 11, 13, 0, 0).unwrap()));
    }

    #[test]
    fn delay_partitions_follow_the_due_hour() {
        let due = Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap();
        assert_eq!(delay_partition(due, 24), 7);
        assert_eq!(delay_partition(due, 4), 3);
    }

    #[test]
    fn priority_is_raised_never_lowered() {
        let mut p = policy(true, true);
        p.priority = "high".into();
        assert_eq!(effective_priority(Priority::Low, &p), Priority::High);
        p.priority = "low".into();
        assert_eq!(effective_priority(Priority::High, &p), Priority::High);
        assert_eq!(effective_priority(Priority::Normal, &p), Priority::Normal);
    }

    #[test]
    fn outcome_ids_are_deterministic_per_source_record() {
        let a = outcome_id("t:0:5", "e", "routed", Some("sms"), Some("d"));
        assert_eq!(a, outcome_id("t:0:5", "e", "routed", Some("sms"), Some("d")));
        assert_ne!(a, outcome_id("t:0:6", "e", "routed", Some("sms"), Some("d")));
        assert_ne!(a, outcome_id("t:0:5", "e", "duplicate", Some("sms"), Some("d")));
    }

    #[test]
    fn throttle_counts_hits_inside_the_window_and_recognises_a_counted_event() {
        let now = Utc::now();
        let hit = |id: &str, ago: i64| ThrottleHit { event_id: id.into(), at: now - ChronoDuration::seconds(ago) };
        let since = now - ChronoDuration::hours(1);
        let hits = vec![hit("a", 10), hit("b", 20), hit("old", 7200)];
        assert_eq!(throttle(&hits, "c", 3, since), Throttle::Admit, "the old hit is outside the window");
        assert_eq!(throttle(&hits, "c", 2, since), Throttle::Throttled);
        assert_eq!(throttle(&hits, "a", 2, since), Throttle::Counted, "re-processing an admitted event");
        assert_eq!(throttle(&[], "a", 0, since), Throttle::Throttled, "a zero limit admits nothing");
    }
}
