//! Dispatcher tests on the real stack against the provider sandbox: deliveries produced to
//! the delivery topics, the real `herald dispatch` binary, the sandbox's request log and
//! fault injection, outputs read with read_committed.

mod common;

use std::time::Duration;

use herald::dispatch::store::{CqlDispatchStore, DispatchStore, SentRecord};
use herald::model::{delivery_id, now_ms, ChannelDelivery, Priority, RenderedContent};
use herald::sandbox::{self, RunningSandbox, SandboxConfig};
use serde_json::{json, Value};

use common::env::Env;
use common::unique;

const WAIT: Duration = Duration::from_secs(40);

struct Harness {
    env: Env,
    sandbox: RunningSandbox,
    http: reqwest::Client,
}

/// An environment whose providers point at a fresh in-process sandbox; retry delays are
/// 1 s / 2 s / 3 s and a circuit opens after 3 failures for 3 s. `dispatch`: more
/// `[dispatch]` settings.
async fn harness(dispatch: &str) -> Harness {
    harness_with("3s", dispatch).await
}

/// [`harness`] with circuits open for `open_for` after 3 failures.
async fn harness_with(open_for: &str, dispatch: &str) -> Harness {
    let sandbox = sandbox::start(SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() }).await.unwrap();
    let providers = common::env::sandbox_providers_toml(&sandbox.url());
    let config = format!("{providers}\n[dispatch]\nbreaker_failures = 3\nbreaker_open_for = \"{open_for}\"\n{dispatch}\n");
    let env = Env::start(&config).await;
    Harness { env, sandbox, http: reqwest::Client::new() }
}

impl Harness {
    async fn fault(&self, provider: &str, fault: Value) {
        let r = self.http.put(format!("{}/_sandbox/faults/{provider}", self.sandbox.url())).json(&fault).send().await.unwrap();
        assert!(r.status().is_success(), "fault: {}", r.text().await.unwrap());
    }

    async fn clear_faults(&self) {
        self.http.delete(format!("{}/_sandbox/faults", self.sandbox.url())).send().await.unwrap();
    }

    async fn state(&self, state: Value) {
        let r = self.http.put(format!("{}/_sandbox/state", self.sandbox.url())).json(&state).send().await.unwrap();
        assert!(r.status().is_success(), "state: {}", r.text().await.unwrap());
    }

    /// Everything the sandbox received for a provider.
    async fn received(&self, provider: &str) -> Vec<Value> {
        let v: Value = self.http.get(format!("{}/_sandbox/requests/{provider}", self.sandbox.url())).send().await.unwrap().json().await.unwrap();
        v.as_array().cloned().or_else(|| v["requests"].as_array().cloned()).unwrap_or_default()
    }

    /// Requests the sandbox answered that mention `needle` anywhere (path or body).
    async fn received_matching(&self, provider: &str, needle: &str) -> Vec<Value> {
        self.received(provider).await.into_iter().filter(|r| r.to_string().contains(needle)).collect()
    }

    /// The sent-log entry of a delivery, as the dispatcher reads it.
    async fn sent_log(&self, delivery_id: &str) -> Option<SentRecord> {
        let store = CqlDispatchStore::prepare(self.env.store.clone(), &self.env.config.store.keyspace).await.unwrap();
        store.sent_of(&[delivery_id]).await.unwrap().remove(delivery_id)
    }

    async fn deliver(&self, d: &ChannelDelivery) {
        let topic = self.env.topic(&format!("delivery.{}", d.channel));
        let bytes = self.env.codec.encode(&topic, d).await.unwrap();
        self.env.send_raw(&topic, Some(d.user_id.as_bytes()), &bytes).await;
    }
}

fn delivery(channel: &str, user: &str, address: &str, device: Option<&str>) -> ChannelDelivery {
    let event = unique("evt");
    let content = match channel {
        "email" => {
            RenderedContent { subject: Some(format!("Hello {event}")), html: Some("<p>hi</p>".into()), text: Some("hi".into()), ..Default::default() }
        }
        "sms" => RenderedContent {
            body: Some(format!("Code for {event}")),
            sms_encoding: Some("GSM-7".into()),
            sms_segments: Some(1),
            ..Default::default()
        },
        _ => RenderedContent { title: Some("Hi".into()), body: Some(format!("Push {event}")), ..Default::default() },
    };
    ChannelDelivery {
        delivery_id: delivery_id(&event, channel, address),
        event_id: event,
        user_id: user.into(),
        category: "billing".into(),
        template_id: "bill_due".into(),
        channel: channel.into(),
        address: address.into(),
        device_id: device.map(str::to_string),
        locale: "en".into(),
        priority: Priority::Normal,
        content,
        attempt: 0,
        not_before: None,
        deadline: now_ms() + 3_600_000,
        created_at: now_ms(),
        last_error: None,
        last_provider: None,
    }
}

fn apns_token() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{u}{u}")
}

fn has<'a>(status: &'a str) -> impl Fn(&[herald::model::DeliveryOutcome]) -> bool + 'a {
    move |os| os.iter().any(|o| o.status == status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_sends_and_invalid_tokens_deactivate_devices() {
    let h = harness("").await;
    for ch in ["apns", "fcm", "sms", "email"] {
        h.env.spawn(&format!("dispatch-{ch}"), &["dispatch", "--channel", ch]);
    }
    let user = unique("u");
    let fcm_token = format!("{}:APA91b{}", unique("fcm"), "x".repeat(40));
    let cases = [
        delivery("apns", &user, &apns_token(), Some("d-ios")),
        delivery("fcm", &user, &fcm_token, Some("d-android")),
        delivery("sms", &user, "+4915112345678", None),
        delivery("email", &user, &format!("{user}@example.com"), None),
    ];
    for d in &cases {
        h.deliver(d).await;
    }
    for (d, provider) in cases.iter().zip(["apns", "fcm", "twilio", "sendgrid"]) {
        let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
        let sent = os.iter().find(|o| o.status == "sent").unwrap();
        assert_eq!(sent.provider.as_deref(), Some(provider));
        assert!(sent.provider_message_id.as_deref().is_some_and(|m| !m.is_empty()), "{sent:?}");
        let entry = h.sent_log(&d.delivery_id).await.expect("sent-log row");
        assert_eq!((entry.provider.as_str(), entry.provider_message_id.as_str()), (provider, sent.provider_message_id.as_deref().unwrap()));
    }
    assert_eq!(h.received_matching("twilio", &cases[2].event_id).await.len(), 1);

    // APNs says the token is dead: the device is deactivated, no retry.
    let token = apns_token();
    h.state(json!({"apns_unregistered": [token]})).await;
    h.env.user(&user, true, false, &[("ios", &token)], None).await; // device "<user>-d0"
    let d = delivery("apns", &user, &token, Some(&format!("{user}-d0")));
    h.deliver(&d).await;
    let os = h.env.wait_outcomes(&d.event_id, WAIT, has("invalid_address")).await;
    assert!(os.iter().all(|o| o.status != "retry_scheduled"));
    let devices = h.env.store.devices(&user).await.unwrap();
    assert!(!devices.iter().find(|x| x.token == token).unwrap().active, "device deactivated");

    // Twilio says the number is a landline (21614): the user's phone is marked dead, so the
    // router stops offering SMS for them.
    h.state(json!({"twilio_landline": ["+4915100000001"]})).await;
    let d = delivery("sms", &user, "+4915100000001", None);
    h.deliver(&d).await;
    h.env.wait_outcomes(&d.event_id, WAIT, has("invalid_address")).await;
    assert_eq!(h.env.store.contact_health(&user).await.unwrap().phone_active, Some(false));

    // An expired delivery is not sent.
    let mut d = delivery("sms", &user, "+4915199999999", None);
    d.deadline = now_ms() - 1;
    h.deliver(&d).await;
    h.env.wait_outcomes(&d.event_id, WAIT, has("expired")).await;
    assert!(h.received_matching("twilio", &d.event_id).await.is_empty(), "expired delivery reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_then_succeed_and_retry_after_is_honoured() {
    // One provider per route: a failure cannot fail over, so it goes through the retry levels.
    let h = harness("[dispatch.category_routes.billing]\nsms = [\"twilio\"]\nemail = [\"sendgrid\"]").await;
    h.env.spawn("dispatch-sms", &["dispatch", "--channel", "sms"]);
    h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
    // One 503 from Twilio, then success through retry topic 1.
    h.fault("twilio", json!({"error": "503", "count": 1})).await;
    let d = delivery("sms", &unique("u"), "+4915112340001", None);
    h.deliver(&d).await;
    let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
    let retry = os.iter().find(|o| o.status == "retry_scheduled").expect("a retry was scheduled");
    let sent = os.iter().find(|o| o.status == "sent").unwrap();
    assert_eq!((retry.attempt, sent.attempt), (0, 1));
    assert!(sent.occurred_at - retry.occurred_at >= 700, "waited for the retry delay (1 s ± 20%)");
    assert_eq!(h.received_matching("twilio", &d.event_id).await.len(), 2);

    // SendGrid 429 with Retry-After: 4 s, longer than the 1 s level delay.
    h.fault("sendgrid", json!({"error": "429", "retry_after_s": 4, "count": 1})).await;
    let d = delivery("email", &unique("u"), "retry-after@example.com", None);
    h.deliver(&d).await;
    let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
    let retry = os.iter().find(|o| o.status == "retry_scheduled").unwrap();
    let sent = os.iter().find(|o| o.status == "sent").unwrap();
    // SendGrid's reset is an epoch second, so a 4 s wait may end up to 1 s early; the level
    // delay alone would have been 1 s (± 20%).
    assert!(sent.occurred_at - retry.occurred_at >= 3_000, "Retry-After honoured: waited {} ms", sent.occurred_at - retry.occurred_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failure_dead_letters_with_an_alert() {
    let h = harness("").await;
    h.env.spawn("dispatch-fcm", &["dispatch", "--channel", "fcm"]);
    h.fault("fcm", json!({"error": "UNAVAILABLE", "error_rate": 1.0})).await;
    let d = delivery("fcm", &unique("u"), &format!("{}:APA91b{}", unique("t"), "y".repeat(40)), Some("dev"));
    h.deliver(&d).await;
    let os = h.env.wait_outcomes(&d.event_id, WAIT, has("dead_lettered")).await;
    assert_eq!(os.iter().filter(|o| o.status == "retry_scheduled").count(), 3, "three retries before giving up");
    let dl = os.iter().find(|o| o.status == "dead_lettered").unwrap();
    assert!(dl.reason.as_deref().unwrap().contains("fcm"), "{:?}", dl.reason);
    let dead = h.env.dead_letters();
    assert!(dead.iter().any(|(_, _, hd)| hd.get("herald-dlq-reason").is_some_and(|r| r.starts_with("dead_lettered"))), "DLQ record with reason");
    // The contract of topology/topics.toml, read as a plain Kafka client reads it: the DLQ
    // record carries the delivery's key and bytes and `herald-dlq-source` =
    // `topic:partition:offset` of the record the last attempt consumed (the last retry topic).
    let (_, payload, hd) = dead
        .iter()
        .find(|(key, _, _)| key.as_deref() == Some(d.user_id.as_bytes()))
        .expect("the delivery's DLQ record, keyed by its user id as on the delivery topic");
    assert!(payload.as_ref().is_some_and(|p| !p.is_empty()), "the original bytes");
    let source = hd.get("herald-dlq-source").expect("herald-dlq-source");
    let parts: Vec<&str> = source.split(':').collect();
    assert_eq!(parts.len(), 3, "topic:partition:offset, got {source:?}");
    assert_eq!(parts[0], h.env.topic("retry.fcm.3"), "consumed from the last retry topic: {source:?}");
    assert!(parts[1].parse::<i32>().is_ok() && parts[2].parse::<i64>().is_ok(), "numeric partition and offset: {source:?}");
    for absent in ["herald-dlq-source-topic", "herald-dlq-source-partition", "herald-dlq-source-offset"] {
        assert!(!hd.contains_key(absent), "{absent} is not part of the contract");
    }
    let log = h.env.log("dispatch-fcm");
    assert!(log.contains("ERROR") && log.contains("record dead-lettered") && log.contains("fcm"), "alert logged:\n{}", common::env::tail(&log, 10));
    assert_eq!(h.received_matching("fcm", &d.event_id).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_fails_over_per_delivery_and_traffic_returns() {
    let h = harness("").await;
    h.env.spawn("dispatch-sms", &["dispatch", "--channel", "sms"]);
    h.fault("twilio", json!({"error": "503", "error_rate": 1.0})).await;
    for i in 0..6 {
        let d = delivery("sms", &unique("u"), &format!("+49151123{i:05}"), None);
        h.deliver(&d).await;
        let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
        let sent = os.iter().find(|o| o.status == "sent").unwrap();
        assert_eq!(sent.provider.as_deref(), Some("vonage"), "delivery {i} sent by the route's next provider: {os:?}");
        let at_twilio = h.received_matching("twilio", &d.event_id).await.len();
        if i < 3 {
            // Before Twilio's circuit opens (3 failures): one attempt there, the next one at
            // once at Vonage, without waiting for a retry level.
            assert_eq!((at_twilio, sent.attempt), (1, 1), "delivery {i}: {os:?}");
            let retry = os.iter().find(|o| o.status == "retry_scheduled").unwrap();
            assert!(retry.reason.as_deref().unwrap().contains("failing over to vonage"), "{retry:?}");
            assert!(sent.occurred_at - retry.occurred_at < 700, "no retry delay: {} ms", sent.occurred_at - retry.occurred_at);
        } else {
            assert_eq!((at_twilio, sent.attempt), (0, 0), "delivery {i}: Twilio's circuit is open, Vonage takes the first attempt");
        }
    }
    // Twilio recovers; after the cool-down a probe closes its circuit and traffic returns.
    h.clear_faults().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut back = false;
    for i in 0..5 {
        let d = delivery("sms", &unique("u"), &format!("+49151199{i:05}"), None);
        h.deliver(&d).await;
        let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
        if os.iter().any(|o| o.status == "sent" && o.provider.as_deref() == Some("twilio")) {
            back = true;
            break;
        }
    }
    assert!(back, "traffic moved back to Twilio");
    assert!(h.env.log("dispatch-sms").contains("circuit breaker changed state"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_take_the_provider_out_of_rotation_and_alert() {
    let h = harness("").await;
    // Herald's Twilio auth token is wrong: the sandbox answers 401, error 20003.
    h.env.spawn_env("dispatch-sms", &["dispatch", "--channel", "sms"], &[("HERALD__PROVIDERS__TWILIO__AUTH_TOKEN", "not-the-token")]);
    let mut ds = Vec::new();
    for i in 0..6 {
        let d = delivery("sms", &unique("u"), &format!("+49151777{i:05}"), None);
        h.deliver(&d).await;
        let os = h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await;
        let sent = os.iter().find(|o| o.status == "sent").unwrap();
        assert_eq!(sent.provider.as_deref(), Some("vonage"), "delivery {i}: {os:?}");
        ds.push(d);
    }
    let mut at_twilio = 0;
    for d in &ds {
        at_twilio += h.received_matching("twilio", &d.event_id).await.len();
    }
    assert_eq!(at_twilio, 1, "one refusal takes Twilio out of rotation (it is not tried again for a minute)");
    let first = h.env.outcomes(&ds[0].event_id);
    assert!(
        first.iter().any(
            |o| o.status == "retry_scheduled" && o.reason.as_deref().is_some_and(|r| r.contains("20003") && r.contains("failing over to vonage"))
        ),
        "{first:?}"
    );
    let log = h.env.log("dispatch-sms");
    assert!(log.contains("ERROR") && log.contains("provider refused herald's credentials"), "alert logged:\n{}", common::env::tail(&log, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_every_provider_is_down_no_attempt_is_spent_and_all_go_after_recovery() {
    // Circuits stay open 10 s; every provider of the email route fails for 30 s.
    let h = harness_with("10s", "").await;
    h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
    let down = std::time::Instant::now();
    for p in ["sendgrid", "mandrill"] {
        h.fault(p, json!({"error_rate": 1.0})).await;
    }
    // A few deliveries meet the outage and open both circuits.
    let openers: Vec<ChannelDelivery> = (0..3).map(|i| delivery("email", &unique("u"), &format!("open{i}@example.com"), None)).collect();
    for d in &openers {
        h.deliver(d).await;
    }
    for d in &openers {
        h.env.wait_outcomes(&d.event_id, WAIT, |os| os.iter().filter(|o| o.status == "retry_scheduled").count() >= 2).await;
    }
    let before = h.received("sendgrid").await.len() + h.received("mandrill").await.len();
    // Now the channel is held: deliveries produced meanwhile spend no attempt, except the
    // probes (one per provider per 10 s).
    let mut ds = Vec::new();
    for i in 0..40 {
        let d = delivery("email", &unique("u"), &format!("held{i}@example.com"), None);
        h.deliver(&d).await;
        ds.push(d);
    }
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    let during = h.received("sendgrid").await.len() + h.received("mandrill").await.len() - before;
    h.clear_faults().await;
    let recovered = std::time::Instant::now();
    for d in ds.iter().chain(&openers) {
        h.env.wait_outcomes(&d.event_id, Duration::from_secs(60).saturating_sub(recovered.elapsed()), has("sent")).await;
    }
    let took = recovered.elapsed();
    let spent = ds.iter().flat_map(|d| h.env.outcomes(&d.event_id)).filter(|o| o.status == "retry_scheduled").count();
    eprintln!("every provider down: {during} provider requests while open (probes), {spent} attempts spent by 40 held deliveries, all sent {:.1} s after recovery", took.as_secs_f64());
    // 2 providers × at most 3 probes each in 30 s (+1 for a probe in flight at the edge).
    assert!(during <= 8, "{during} provider requests while every circuit was open");
    assert!(spent <= 8, "{spent} attempts spent while every circuit was open");
    assert!(ds.iter().all(|d| h.env.outcomes(&d.event_id).iter().all(|o| o.status != "dead_lettered")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_sigkilled_three_times_resends_only_within_the_window() {
    const LATENCY_MS: i64 = 30;
    const INTERVAL_MS: i64 = 5; // dispatch.write_interval_ms
    let h = harness(&format!("batch_max = 50\nwrite_interval_ms = {INTERVAL_MS}")).await;
    h.fault("sendgrid", json!({"latency_ms": LATENCY_MS, "error_rate": 0.0})).await;
    h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
    let mut ds = Vec::new();
    let mut kills = Vec::new();
    for i in 0..600 {
        let d = delivery("email", &format!("{}-{}", unique("k"), i % 10), &format!("kill{i}@example.com"), None);
        h.deliver(&d).await;
        ds.push(d);
        if i % 150 == 149 && kills.len() < 3 {
            // Mid-stream: the dispatcher has a batch in flight.
            h.env.wait_outcomes(&ds[i - 100].event_id, WAIT, has("sent")).await;
            kills.push(chrono::Utc::now());
            h.env.stop("dispatch-email", true);
            h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
        }
    }
    for d in &ds {
        h.env.wait_outcomes(&d.event_id, Duration::from_secs(90), has("sent")).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = h.received("sendgrid").await;
    let log = h.env.log("dispatch-email");
    // "One write": the longest group-commit write the dispatchers logged.
    let write_ms =
        log.split("write_ms=").skip(1).filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse::<i64>().ok()).max().unwrap_or(0);
    let window = LATENCY_MS + INTERVAL_MS + write_ms;
    let slack = 100; // scheduling on a loaded 2-core machine
    let (mut twice, mut ages) = (0, Vec::new());
    for d in &ds {
        let times: Vec<chrono::DateTime<chrono::Utc>> =
            received.iter().filter(|r| r.to_string().contains(&d.delivery_id)).map(|r| r["at"].as_str().unwrap().parse().unwrap()).collect();
        assert!(!times.is_empty(), "{} never reached SendGrid (lost)", d.delivery_id);
        let sent = h.env.outcomes(&d.event_id).into_iter().filter(|o| o.status == "sent").count();
        assert_eq!(sent, 1, "{}: exactly one committed 'sent' outcome", d.event_id);
        if times.len() > 1 {
            twice += times.len() - 1;
            let first = *times.iter().min().unwrap();
            // The kill that caught it: the first one after its first send.
            let age = kills.iter().map(|k| (*k - first).num_milliseconds()).filter(|ms| *ms >= -slack).min();
            ages.push((d.delivery_id.clone(), age));
        }
    }
    let uncertain = log.matches("in flight at a dispatcher that stopped").count();
    eprintln!(
        "after 3 SIGKILLs: 0 lost, {twice} sent twice of {}, {uncertain} counted as uncertain re-sends; window = provider latency {LATENCY_MS} ms + write interval {INTERVAL_MS} ms + one write (longest {write_ms} ms) = {window} ms; first send to kill of each: {:?}",
        ds.len(),
        ages.iter().map(|(_, a)| a.unwrap_or(-1)).collect::<Vec<_>>()
    );
    assert!(twice <= uncertain, "{twice} duplicate sends but only {uncertain} were counted as uncertain");
    for (id, age) in &ages {
        assert!(
            age.is_some_and(|a| a <= window + slack),
            "{id} was sent twice, but its first send was {age:?} ms before a kill (window {window} ms + {slack} ms)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_goes_first_when_backlogged() {
    // One send at a time, so the order of sends is the order of the dispatcher's choices.
    let h = harness("batch_max = 100\nconcurrency = 1\n[dispatch.limits.sendgrid]\nconcurrency = 1\nrate_per_sec = 1000.0").await;
    let mut low = Vec::new();
    for i in 0..20 {
        let mut d = delivery("email", &unique("u"), &format!("low{i}@example.com"), None);
        d.priority = Priority::Low;
        h.deliver(&d).await;
        low.push(d);
    }
    let mut high = delivery("email", &unique("u"), "urgent@example.com", None);
    high.priority = Priority::High;
    h.deliver(&high).await; // produced last, behind the backlog
    h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
    let sent_at = |os: Vec<herald::model::DeliveryOutcome>| os.into_iter().find(|o| o.status == "sent").unwrap().occurred_at;
    let high_at = sent_at(h.env.wait_outcomes(&high.event_id, WAIT, has("sent")).await);
    let mut earlier = 0;
    for d in &low {
        if sent_at(h.env.wait_outcomes(&d.event_id, WAIT, has("sent")).await) < high_at {
            earlier += 1;
        }
    }
    assert!(earlier <= 1, "{earlier} low-priority deliveries were sent before the high-priority one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notification_log_shows_what_the_dispatcher_sent() {
    let h = harness("").await;
    h.env.spawn("router", &["router"]);
    h.env.spawn("dispatch-email", &["dispatch", "--channel", "email"]);
    let user = unique("logu");
    h.env.user(&user, true, false, &[], None).await;
    let req = herald::model::NotificationRequested {
        event_id: unique("evt"),
        occurred_at: now_ms(),
        source: "dispatch-test".into(),
        user_id: user.clone(),
        category: "billing".into(),
        template_id: "bill_due".into(),
        params: [("amount".to_string(), "3.00".to_string())].into(),
        channels: Some(vec!["email".into()]),
        priority: Priority::Normal,
        locale: None,
        expires_at: None,
    };
    h.env.send(&req).await;
    let os = h.env.wait_outcomes(&req.event_id, WAIT, has("sent")).await;
    let sent = os.iter().find(|o| o.status == "sent").unwrap();
    // The dispatcher writes no log row for `sent`: its sent-log row is the entry.
    let log = h.env.store.log(&req.event_id).await.unwrap();
    let entry = log.iter().find(|r| r.status == "sent").unwrap_or_else(|| panic!("no sent entry in {log:?}"));
    assert_eq!(entry.outcome_id, sent.outcome_id, "the same id as the outcome on Kafka");
    assert_eq!((entry.provider.as_deref(), entry.provider_message_id.as_deref()), (Some("sendgrid"), sent.provider_message_id.as_deref()));
    assert_eq!(entry.recorded_at.timestamp_millis(), sent.occurred_at);
    assert!(log.iter().any(|r| r.status == "routed"), "{log:?}");
    assert_eq!(log.iter().filter(|r| r.status == "sent").count(), 1);
}
