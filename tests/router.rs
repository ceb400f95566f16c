//! Router tests against the real stack: the `herald router` binary in an isolated
//! environment (own topics, keyspace, groups), fed through Kafka, observed on its output
//! topics with read_committed.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use herald::model::{now_ms, NotificationRequested, Priority};

use common::env::Env;
use common::unique;

const WAIT: Duration = Duration::from_secs(30);

/// Categories the tests add to the defaults: `promo` is throttled at 2 per day and never
/// held for quiet hours; shipping is not held either, so trigger tests do not wait.
const CATEGORIES: &str = r#"
[router.categories.promo]
opt_in_default = true
opt_out_allowed = true
priority = "low"
throttle_limit = 2
throttle_window = "1d"
quiet_hours = false

[router.categories.shipping]
quiet_hours = false
"#;

fn request(user: &str, category: &str, template: &str, params: &[(&str, &str)]) -> NotificationRequested {
    NotificationRequested {
        event_id: unique("evt"),
        occurred_at: now_ms(),
        source: "router-test".into(),
        user_id: user.into(),
        category: category.into(),
        template_id: template.into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        channels: None,
        priority: Priority::Normal,
        locale: None,
        expires_at: None,
    }
}

fn statuses(outcomes: &[herald::model::DeliveryOutcome]) -> Vec<(String, Option<String>)> {
    let mut s: Vec<_> = outcomes.iter().map(|o| (o.status.clone(), o.channel.clone())).collect();
    s.sort();
    s
}

fn has<'a>(status: &'a str, channel: Option<&'a str>) -> impl Fn(&[herald::model::DeliveryOutcome]) -> bool + 'a {
    move |os| os.iter().any(|o| o.status == status && o.channel.as_deref() == channel)
}

async fn start_router(extra: &str) -> Env {
    let env = Env::start(&format!("{CATEGORIES}\n{extra}")).await;
    env.spawn("router", &["router"]);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_paths() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = Env::start(&format!("{CATEGORIES}\n[telemetry]\nmetrics_listen = \"127.0.0.1:{port}\"\n")).await;
    let crashed = claimed_before_the_crash(&env).await;
    let one_batch = produced_for_one_batch(&env).await;
    env.spawn("router", &["router"]);
    futures::join!(
        redelivered_record_is_not_a_duplicate(&env, crashed),
        records_of_one_batch_see_each_other(&env, one_batch),
        routed_with_fan_out_to_every_device(&env),
        duplicate_event_id_is_not_delivered_twice(&env),
        unknown_user_no_address_and_opted_out(&env),
        expired_requests_are_not_routed(&env),
        template_error_goes_to_the_dlq(&env),
        poison_bytes_and_unknown_schema_ids_are_dead_lettered(&env),
        unknown_template_and_category_are_dead_lettered(&env),
        trigger_mapping_turns_an_upstream_event_into_deliveries(&env),
        contact_changes_reach_the_cache(&env),
    );
    // The binary turns transparent huge pages off for itself (see `no_transparent_huge_pages`).
    let status = std::fs::read_to_string(format!("/proc/{}/status", env.pid("router").unwrap())).unwrap();
    assert!(status.lines().any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])), "{status}");
    // The role's Prometheus endpoint: outcomes by channel/provider/outcome, and queue depth.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
        let ok = text.contains(r#"herald_outcomes_total{channel="email",provider="-",outcome="routed"}"#)
            && text.contains("herald_consumer_lag{role=\"router\"");
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics missing:\n{text}\n{}",
            env.log("router").lines().filter(|l| l.contains("stats")).take(6).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn routed_with_fan_out_to_every_device(env: &Env) {
    let user = unique("fan");
    env.user(&user, true, true, &[("ios", "aa11bb22"), ("android", "fcm-tok-1"), ("web", "fcm-web-1")], None).await;
    let mut req = request(&user, "billing", "bill_due", &[("amount", "12.30 €")]);
    req.locale = Some("en-GB".into());
    env.send(&req).await;
    let outcomes = env.wait_outcomes(&req.event_id, WAIT, |os| os.iter().filter(|o| o.status == "routed").count() == 4).await;
    assert_eq!(outcomes.len(), 4, "{:?}", statuses(&outcomes));
    let deliveries = env.wait_deliveries(&req.event_id, 4, WAIT).await;
    let mut channels: Vec<_> = deliveries.iter().map(|d| (d.channel.clone(), d.address.clone())).collect();
    channels.sort();
    assert_eq!(
        channels,
        vec![
            ("apns".into(), "aa11bb22".into()),
            ("email".into(), format!("{user}@example.com")),
            ("fcm".into(), "fcm-tok-1".into()),
            ("fcm".into(), "fcm-web-1".into()),
        ]
    );
    let email = deliveries.iter().find(|d| d.channel == "email").unwrap();
    assert_eq!(email.content.subject.as_deref(), Some("Your bill: 12.30 €"), "en-GB falls back to en, not the user's de");
    let html = email.content.html.as_deref().unwrap();
    assert!(html.contains("/t/c/") && !html.contains("href=\"https://example.com/pay\""), "tracked link: {html}");
    assert!(html.contains("/t/o/"), "open pixel: {html}");
    let push = deliveries.iter().find(|d| d.channel == "apns").unwrap();
    assert_eq!(push.content.title.as_deref(), Some("Bill due"));
    assert!(deliveries.iter().all(|d| d.deadline > now_ms() && d.attempt == 0));
    // Every outcome is also in the notification log.
    let log = env.store.log(&req.event_id).await.unwrap();
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log.iter().all(|r| r.source.as_deref() == Some(req.source.as_str())), "who asked, on every row: {log:?}");
}

async fn duplicate_event_id_is_not_delivered_twice(env: &Env) {
    let user = unique("dup");
    env.user(&user, false, true, &[], None).await;
    let req = request(&user, "security", "login_code", &[("code", "123456")]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("sms"))).await;
    env.send(&req).await; // a second record with the same event id
    env.wait_outcomes(&req.event_id, WAIT, has("duplicate", None)).await;
    // A third under another key (claimed by lightweight transaction, not by read) meets the
    // first one's claim just the same.
    let topic = env.topic("requests");
    env.send_raw(&topic, Some(b"elsewhere"), &env.codec.encode(&topic, &req).await.unwrap()).await;
    let os = env.wait_outcomes(&req.event_id, WAIT, |os| os.iter().filter(|o| o.status == "duplicate").count() == 2).await;
    assert_eq!(os.iter().filter(|o| o.status == "routed").count(), 1);
    let sms = &env.wait_deliveries(&req.event_id, 1, WAIT).await[0];
    assert_eq!(env.deliveries(&req.event_id).len(), 1);
    assert_eq!(sms.content.body.as_deref(), Some("Your code: 123456"));
    assert_eq!((sms.content.sms_encoding.as_deref(), sms.content.sms_segments), (Some("GSM-7"), Some(1)));
    assert_eq!(sms.priority, Priority::High, "security is high priority");
}

/// A crash after the dedup claim but before the Kafka commit: before the router starts,
/// a record is produced and claimed exactly as a router that died before committing would
/// have left it. The claim names the record, so reading it again is not a duplicate.
async fn claimed_before_the_crash(env: &Env) -> NotificationRequested {
    let user = unique("redeliver");
    env.user(&user, true, false, &[], None).await;
    let req = request(&user, "billing", "bill_due", &[("amount", "1")]);
    let topic = env.topic("requests");
    let (p, o) = env.send(&req).await;
    env.store.claim_event(&req.event_id, &topic, p, o, Duration::from_secs(3600)).await.unwrap();
    req
}

async fn redelivered_record_is_not_a_duplicate(env: &Env, req: NotificationRequested) {
    let os = env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
    assert!(!os.iter().any(|o| o.status == "duplicate"), "{:?}", statuses(&os));
    // ...while a different record carrying the same event id is one.
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("duplicate", None)).await;
}

/// Records produced before the router starts, so they arrive in its first batch, whose
/// store reads happen once for the whole batch: (a duplicate pair, three throttled promos,
/// a request for a template that does not exist yet).
struct OneBatch {
    duplicated: NotificationRequested,
    promos: Vec<NotificationRequested>,
    missing_template: NotificationRequested,
}

async fn produced_for_one_batch(env: &Env) -> OneBatch {
    let user = unique("batch");
    env.user(&user, true, false, &[], None).await;
    let duplicated = request(&user, "billing", "bill_due", &[("amount", "3")]);
    env.send(&duplicated).await;
    env.send(&duplicated).await;
    let promos: Vec<_> = (0..3).map(|n| request(&user, "promo", "promo", &[("n", &n.to_string())])).collect();
    for p in &promos {
        env.send(p).await;
    }
    let missing_template = request(&user, "billing", &unique("later_tpl"), &[]);
    env.send(&missing_template).await;
    OneBatch { duplicated, promos, missing_template }
}

async fn records_of_one_batch_see_each_other(env: &Env, b: OneBatch) {
    // The second record of a pair in one batch is a duplicate of the first.
    let os = env.wait_outcomes(&b.duplicated.event_id, WAIT, |os| has("routed", Some("email"))(os) && has("duplicate", None)(os)).await;
    assert_eq!(os.iter().filter(|o| o.status == "routed").count(), 1, "{:?}", statuses(&os));
    env.wait_deliveries(&b.duplicated.event_id, 1, WAIT).await;
    assert_eq!(env.deliveries(&b.duplicated.event_id).len(), 1);

    // promo is limited to 2 per day: the batch counts its own admissions.
    let mut statuses_seen = Vec::new();
    for p in &b.promos {
        let os = env.wait_outcomes(&p.event_id, WAIT, |os| has("routed", Some("email"))(os) || has("throttled", Some("email"))(os)).await;
        statuses_seen.push(if has("routed", Some("email"))(&os) { "routed" } else { "throttled" });
    }
    assert_eq!(statuses_seen, ["routed", "routed", "throttled"]);

    // Refused before dedup (unknown template), then the template is published and the dead
    // letter replayed: the replay claims the event as its original record and is routed.
    let tpl = b.missing_template.template_id.clone();
    env.wait_outcomes(&b.missing_template.event_id, WAIT, has("rejected", None)).await;
    env.store
        .put_template(&herald::store::Template {
            template_id: tpl.clone(),
            category: "billing".into(),
            current_version: 1,
            default_channels: vec!["email".into()],
            tracking: false,
            sample_params: HashMap::new(),
        })
        .await
        .unwrap();
    env.store
        .put_template_content(&herald::store::TemplateContent {
            template_id: tpl.clone(),
            version: 1,
            channel: "email".into(),
            locale: "en".into(),
            subject: Some("Now it exists".into()),
            html: Some("<p>late</p>".into()),
            text: Some("late".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    template_changed_then_replay_one(env, &tpl, &tpl).await;
    let os = env.wait_outcomes(&b.missing_template.event_id, WAIT, has("routed", Some("email"))).await;
    assert!(!os.iter().any(|o| o.status == "duplicate"), "{:?}", statuses(&os));
}

async fn unknown_user_no_address_and_opted_out(env: &Env) {
    let req = request(&unique("ghost"), "billing", "bill_due", &[("amount", "1")]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("unknown_user", None)).await;

    let user = unique("partial");
    env.user(&user, true, false, &[], None).await; // email only: no devices, no phone
    env.opt_out(&user, "email", "billing").await;
    let mut req = request(&user, "billing", "bill_due", &[("amount", "1")]);
    req.channels = Some(vec!["email".into(), "push".into(), "sms".into()]);
    env.send(&req).await;
    let os = env.wait_outcomes(&req.event_id, WAIT, |os: &[herald::model::DeliveryOutcome]| os.len() >= 3).await;
    assert_eq!(
        statuses(&os),
        vec![("no_address".into(), Some("push".into())), ("no_address".into(), Some("sms".into())), ("opted_out".into(), Some("email".into())),]
    );
    assert!(env.deliveries(&req.event_id).is_empty());

    // Security codes cannot be opted out of.
    env.opt_out(&user, "email", "security").await;
    let mut req = request(&user, "security", "login_code", &[("code", "1")]);
    req.channels = Some(vec!["sms".into()]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("no_address", Some("sms"))).await;
}

async fn expired_requests_are_not_routed(env: &Env) {
    let user = unique("late");
    env.user(&user, false, true, &[], None).await;
    let mut req = request(&user, "billing", "bill_due", &[("amount", "1")]);
    req.expires_at = Some(now_ms() - 1);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("expired", None)).await;
    // A login code older than its category's 10-minute max age.
    let mut req = request(&user, "security", "login_code", &[("code", "1")]);
    req.occurred_at = now_ms() - 11 * 60_000;
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("expired", None)).await;
    assert!(env.deliveries(&req.event_id).is_empty());
}

async fn template_error_goes_to_the_dlq(env: &Env) {
    let user = unique("tplerr");
    env.user(&user, true, false, &[], None).await;
    let req = request(&user, "billing", "broken", &[]);
    env.send(&req).await;
    let os = env.wait_outcomes(&req.event_id, WAIT, has("template_error", None)).await;
    assert!(os[0].reason.as_deref().unwrap_or("").contains("missing_param"), "{:?}", os[0].reason);
    wait_dlq(env, |h| h.get("herald-dlq-reason").is_some_and(|r| r.starts_with("template_error") && r.contains("missing_param"))).await;
    assert!(env.deliveries(&req.event_id).is_empty());

    // The operator fixes the template and replays the dead letter: it is routed now, and
    // dedup recognises the replay as the original record, not as a duplicate.
    env.store
        .put_template_content(&herald::store::TemplateContent {
            template_id: "broken".into(),
            version: 1,
            channel: "email".into(),
            locale: "en".into(),
            subject: Some("Hi there".into()),
            html: Some("<p>fixed</p>".into()),
            text: Some("fixed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    template_changed_then_replay_one(env, "broken", "template_error").await;
    let os = env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
    assert!(!os.iter().any(|o| o.status == "duplicate"), "{:?}", statuses(&os));
}

/// What an operator does after fixing a template: announce the change (routers drop their
/// cached copy), then `herald replay` the dead letters whose reason contains `reason` back
/// onto the requests topic. Exactly one must match.
async fn template_changed_then_replay_one(env: &Env, template: &str, reason: &str) {
    let changes = herald::kafka::producer(&env.config.kafka, "test").unwrap();
    herald::changes::publish(&changes, &env.topic("changes"), "template", template).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["replay", "--reason", reason, "--source", "requests"])
        .env("HERALD_CONFIG", &env.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("1 record(s) replayed to"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

async fn poison_bytes_and_unknown_schema_ids_are_dead_lettered(env: &Env) {
    let topic = env.topic("requests");
    let marker = unique("poison");
    let (p, o) = env.send_raw(&topic, Some(marker.as_bytes()), b"definitely not avro").await;
    let src = format!("{topic}:{p}:{o}");
    let os = env.wait_outcomes(&format!("dlq:{src}"), WAIT, has("rejected", None)).await;
    assert!(os[0].reason.as_deref().unwrap().contains("Confluent"), "{:?}", os[0].reason);
    wait_dlq(env, |h| h.get("herald-dlq-source") == Some(&src)).await;
    let dead = env.dead_letters();
    let (key, payload, _) = dead.iter().find(|(_, _, h)| h.get("herald-dlq-source") == Some(&src)).unwrap();
    assert_eq!((key.as_deref(), payload.as_deref()), (Some(marker.as_bytes()), Some(&b"definitely not avro"[..])), "original bytes kept");

    let (p, o) = env.send_raw(&topic, Some(b"k"), &[0, 0x7f, 0xff, 0xff, 0xf1, 1, 2, 3]).await;
    let src = format!("{topic}:{p}:{o}");
    env.wait_outcomes(&format!("dlq:{src}"), WAIT, has("rejected", None)).await;
    // The partition kept moving: a good record after the poison is routed.
    let user = unique("after-poison");
    env.user(&user, true, false, &[], None).await;
    let req = request(&user, "billing", "bill_due", &[("amount", "2")]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
}

async fn unknown_template_and_category_are_dead_lettered(env: &Env) {
    let user = unique("unknowns");
    env.user(&user, true, false, &[], None).await;
    let req = request(&user, "billing", "no_such_template", &[]);
    env.send(&req).await;
    let os = env.wait_outcomes(&req.event_id, WAIT, has("rejected", None)).await;
    assert!(os[0].reason.as_deref().unwrap().contains("unknown template"));
    let req = request(&user, "astrology", "bill_due", &[("amount", "1")]);
    env.send(&req).await;
    let os = env.wait_outcomes(&req.event_id, WAIT, has("rejected", None)).await;
    assert!(os[0].reason.as_deref().unwrap().contains("unknown category"));
}

async fn trigger_mapping_turns_an_upstream_event_into_deliveries(env: &Env) {
    let user = unique("shopper");
    env.user(&user, true, false, &[("ios", "cc33dd44")], None).await;
    let topic = env.topic("upstream.orders_shipped");
    let order = unique("order");
    let event = apache_avro::types::Value::Record(vec![
        ("order_id".into(), apache_avro::types::Value::String(order.clone())),
        (
            "customer".into(),
            apache_avro::types::Value::Record(vec![
                ("id".into(), apache_avro::types::Value::String(user.clone())),
                ("name".into(), apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null))),
            ]),
        ),
        ("carrier".into(), apache_avro::types::Value::String("DHL".into())),
        ("tracking_code".into(), apache_avro::types::Value::String("JJD0099".into())),
        ("shipped_at".into(), apache_avro::types::Value::TimestampMillis(now_ms())),
        ("note".into(), apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null))),
    ]);
    let bytes = env.codec.encode_value(&topic, event).await.unwrap();
    env.send_raw(&topic, Some(order.as_bytes()), &bytes).await;
    let event_id = format!("{topic}:{order}");
    env.wait_outcomes(&event_id, WAIT, |os| os.iter().filter(|o| o.status == "routed").count() == 2).await;
    let ds = env.wait_deliveries(&event_id, 2, WAIT).await;
    let push = ds.iter().find(|d| d.channel == "apns").unwrap();
    assert_eq!(push.content.body.as_deref(), Some(format!("Order {order} via DHL").as_str()));
    assert_eq!(push.category, "shipping");
}

async fn contact_changes_reach_the_cache(env: &Env) {
    let user = unique("mover");
    env.user(&user, true, false, &[], None).await;
    let req = request(&user, "billing", "bill_due", &[("amount", "1")]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
    // The user is now cached; they add a phone, and the change is announced.
    env.user(&user, true, true, &[], None).await;
    let changes = herald::kafka::producer(&env.config.kafka, "test").unwrap();
    herald::changes::publish(&changes, &env.topic("changes"), "user", &user).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut req = request(&user, "billing", "bill_due", &[("amount", "1")]);
    req.channels = Some(vec!["sms".into()]);
    env.send(&req).await;
    env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("sms"))).await;
}

async fn wait_dlq(env: &Env, pred: impl Fn(&HashMap<String, String>) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !env.dead_letters().iter().any(|(_, _, h)| pred(h)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no matching DLQ record; have {:?}",
            env.dead_letters().iter().map(|d| &d.2).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Non-urgent categories wait for the end of the user's quiet hours on the delay topic and
/// are released by a paused partition resuming, not by a sleeping worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_hold_then_release() {
    let now = chrono::Utc::now();
    let start = (now - chrono::Duration::hours(1)).format("%H:%M:%S");
    let end_at = now + chrono::Duration::seconds(45);
    let end = end_at.format("%H:%M:%S");
    let env = start_router(&format!("[router]\nquiet_hours_start = \"{start}\"\nquiet_hours_end = \"{end}\"\n")).await;
    let user = unique("sleeper");
    env.user(&user, true, false, &[], Some("UTC")).await;
    let mut req = request(&user, "marketing", "promo", &[("n", "1")]);
    req.category = "marketing".into();
    env.send(&req).await;
    let held = env.wait_outcomes(&req.event_id, WAIT, has("held", None)).await;
    assert!(env.deliveries(&req.event_id).is_empty(), "nothing delivered while held");
    assert!(held[0].reason.as_deref().unwrap().contains("quiet hours"));
    // Urgent categories are not held.
    let code = request(&user, "billing", "bill_due", &[("amount", "1")]);
    env.send(&code).await;
    env.wait_outcomes(&code.event_id, WAIT, has("routed", Some("email"))).await;
    // Released after the window (the hold is at second precision; allow for the 0.5 s poll).
    let os = env.wait_outcomes(&req.event_id, Duration::from_secs(120), has("routed", Some("email"))).await;
    let routed = os.iter().find(|o| o.status == "routed").unwrap();
    assert!(
        routed.occurred_at >= end_at.timestamp_millis() - 1_000,
        "released {} ms before the window ended",
        end_at.timestamp_millis() - routed.occurred_at
    );
    assert_eq!(env.wait_deliveries(&req.event_id, 1, WAIT).await.len(), 1);
}

/// A router on small batches (so crashes and rebalances land mid-batch) and 20 users with
/// an email address and an iPhone.
async fn stream_env(tag: &str) -> (Env, Vec<String>) {
    let env = start_router("[router]\nbatch_max = 20\n").await;
    let users: Vec<String> = (0..20).map(|i| format!("{}-{i}", unique(tag))).collect();
    for u in &users {
        env.user(u, true, false, &[("ios", "ee55ff66")], None).await;
    }
    (env, users)
}

/// The output topics (read_committed) hold each event's two deliveries and two `routed`
/// outcomes exactly once, and no event was called a duplicate.
async fn each_routed_exactly_once(env: &Env, events: &[String]) {
    for e in events {
        env.wait_outcomes(e, Duration::from_secs(90), |os| os.iter().filter(|o| o.status == "routed").count() >= 2).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would show up by now
    for e in events {
        let ds = env.deliveries(e);
        let mut ids: Vec<_> = ds.iter().map(|d| d.delivery_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!((ds.len(), ids.len()), (2, 2), "event {e}: deliveries {:?}", ds.iter().map(|d| &d.channel).collect::<Vec<_>>());
        let routed = env.outcomes(e).iter().filter(|o| o.status == "routed").count();
        assert_eq!(routed, 2, "event {e}: routed outcomes");
        assert!(!env.outcomes(e).iter().any(|o| o.status == "duplicate"), "event {e} called a duplicate");
    }
}

/// Replicas join and leave while a stream is routed (one leaving while the group is still
/// settling); the outputs hold every expected delivery exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_joining_and_leaving_mid_stream_keep_outputs_exactly_once() {
    let (env, users) = stream_env("reb").await;
    let mut events = Vec::new();
    for i in 0..400 {
        let req = request(&users[i % users.len()], "billing", "bill_due", &[("amount", &i.to_string())]);
        events.push(req.event_id.clone());
        env.send(&req).await;
        if i == 100 {
            env.wait_outcomes(&events[0], WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
            env.spawn_env("router-b", &["router"], &[("HERALD__ROUTER__INSTANCE_ID", "b")]);
        }
        if i == 110 {
            // b leaves while the group is still settling (records fetched before a
            // revocation and after the reassignment end up in one batch).
            tokio::time::sleep(Duration::from_millis(300)).await;
            env.stop("router-b", false);
        }
        if i == 200 {
            env.spawn_env("router-c", &["router"], &[("HERALD__ROUTER__INSTANCE_ID", "c")]);
        }
        // c gets partitions, routes what is sent after that, then leaves.
        let wait_for = |what: &'static str| {
            let env = &env;
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !env.log("router-c").contains(what) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the third replica never logged '{what}':\n{}",
                        common::env::tail(&env.log("router-c"), 20)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if i == 300 {
            wait_for("partitions assigned").await;
        }
        if i == 350 {
            wait_for("batch committed").await;
            env.stop("router-c", false);
        }
    }
    each_routed_exactly_once(&env, &events).await;
}

/// SIGKILL the router in the middle of a stream; after a restart the output topics
/// (read_committed) hold every expected delivery exactly once. Then throttling state
/// survives another SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_keeps_outputs_exactly_once_and_throttle_state() {
    let (env, users) = stream_env("eos").await;
    let mut events = Vec::new();
    for i in 0..400 {
        let req = request(&users[i % users.len()], "billing", "bill_due", &[("amount", &i.to_string())]);
        events.push(req.event_id.clone());
        env.send(&req).await;
        if i == 150 {
            // Let it get going, then kill it mid-stream.
            let first = &events[0];
            env.wait_outcomes(first, WAIT, |os| os.iter().any(|o| o.status == "routed")).await;
            env.stop("router", true);
            env.spawn("router", &["router"]);
        }
    }
    each_routed_exactly_once(&env, &events).await;

    // promo: 2 per day per user × channel. Two pass, then SIGKILL, then the third is throttled.
    let user = unique("promo");
    env.user(&user, true, false, &[], None).await;
    for n in 0..2 {
        let req = request(&user, "promo", "promo", &[("n", &n.to_string())]);
        env.send(&req).await;
        env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
    }
    env.stop("router", true);
    env.spawn("router", &["router"]);
    let req = request(&user, "promo", "promo", &[("n", "3")]);
    env.send(&req).await;
    let os = env.wait_outcomes(&req.event_id, Duration::from_secs(60), has("throttled", Some("email"))).await;
    assert!(os[0].reason.as_deref().unwrap().contains("2 promo per 1d"), "{:?}", os[0].reason);
}

/// A router keeps the throttle state of the users it owns (records keyed by their user on
/// the requests topic) in memory, written through to the store: with a user's rows removed
/// from the store behind its back it still counts that user's sends. When the assignment
/// changes every replica forgets that state and reads the store again, so the limits kept
/// in CQL hold across the rebalance (and across restarts: the SIGKILL test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_throttle_state_is_held_in_memory_and_read_again_after_a_rebalance() {
    let env = start_router("").await;
    let (held, kept) = (unique("held"), unique("kept"));
    for user in [&held, &kept] {
        env.user(user, true, false, &[], None).await;
        for n in 0..2 {
            let req = request(user, "promo", "promo", &[("n", &n.to_string())]);
            env.send(&req).await;
            env.wait_outcomes(&req.event_id, WAIT, has("routed", Some("email"))).await;
        }
    }
    let ks = &env.config.store.keyspace;
    env.store
        .session
        .query_unpaged(format!("DELETE FROM {ks}.throttle_hits_by_user WHERE user_id = ? AND category = 'promo'"), (&held,))
        .await
        .unwrap();
    // A router reading the store would find no hits for `held` and admit this one.
    let third = request(&held, "promo", "promo", &[("n", "3")]);
    env.send(&third).await;
    env.wait_outcomes(&third.event_id, WAIT, has("throttled", Some("email"))).await;

    // A second replica joins: the assignment changes and every replica starts from the store.
    env.spawn_env("router-b", &["router"], &[("HERALD__ROUTER__INSTANCE_ID", "b")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(env.log("router-b").contains("partitions assigned") && env.log("router").contains("throttle cache emptied")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no rebalance seen:\n{}\n{}",
            common::env::tail(&env.log("router"), 10),
            common::env::tail(&env.log("router-b"), 10)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `kept`'s two hits are in CQL: its third is throttled by whichever replica owns it now.
    let kept_third = request(&kept, "promo", "promo", &[("n", "3")]);
    env.send(&kept_third).await;
    let os = env.wait_outcomes(&kept_third.event_id, Duration::from_secs(60), has("throttled", Some("email"))).await;
    assert!(os[0].reason.as_deref().unwrap().contains("2 promo per 1d"), "{:?}", os[0].reason);
    // `held`'s rows were removed (and its throttled third wrote none), so the store says it
    // has no hits: after the rebalance its next request gets through.
    let fourth = request(&held, "promo", "promo", &[("n", "4")]);
    env.send(&fourth).await;
    env.wait_outcomes(&fourth.event_id, Duration::from_secs(60), has("routed", Some("email"))).await;
}
