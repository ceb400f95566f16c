//! Outages of the shared stack under load: Kafka stopped for 20 s, the store SIGKILLed for
//! 20 s. Every role keeps running, and every delivery is reconciled against the outcome
//! topic (read_committed) and the sandbox's request log: lost and sent twice are counted.
//!
//! These tests stop services every other test uses, so this binary is not part of a plain
//! `cargo test` (`test = false` in Cargo.toml): `scripts/test` runs it last, one test at a
//! time. A guard starts whatever a test stopped again, even when the test fails.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald::model::{delivery_id, now_ms, ChannelDelivery, NotificationRequested, Priority, RenderedContent};
use herald::sandbox::{self, RunningSandbox, SandboxConfig};
use serde_json::Value;

use common::env::Env;
use common::unique;

/// One test at a time: each stops a shared service.
static SERIAL: Mutex<()> = Mutex::new(());

/// `scripts/stack <args>`; panics with its output when it fails.
fn stack(args: &[&str]) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack")).args(args).output().expect("scripts/stack runs");
    assert!(out.status.success(), "scripts/stack {args:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Starts `component` again when dropped (a failed test must not leave the stack down).
struct Restart(&'static str);

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack")).args(["start", self.0]).status();
    }
}

enum Outage {
    /// SIGTERM the broker, start it again after 20 s.
    Kafka,
    /// SIGKILL the store, start it again after 20 s.
    Store,
}

struct Load {
    env: Env,
    /// Where the email dispatcher serves /metrics.
    metrics: String,
    sandbox: RunningSandbox,
    http: reqwest::Client,
    /// delivery id → channel, for every delivery the test expects.
    expected: HashMap<String, &'static str>,
}

impl Load {
    /// A fresh environment; providers limited to 150 sends/s each, so the stream below
    /// takes some seconds to send.
    async fn start() -> Load {
        let sandbox = sandbox::start(SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() }).await.unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = common::env::sandbox_providers_toml(&sandbox.url())
            + &format!(
                "\n[api]\nlisten = \"127.0.0.1:{port}\"\n[dispatch]\nbatch_max = 200\n[dispatch.limits.sendgrid]\nconcurrency = 50\nrate_per_sec = 150.0\n[dispatch.limits.twilio]\nconcurrency = 50\nrate_per_sec = 150.0\n"
            );
        let env = Env::start(&config).await;
        let metrics = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        Load { env, metrics, sandbox, http: reqwest::Client::new(), expected: HashMap::new() }
    }

    /// The router, the API and the email and SMS dispatchers.
    fn spawn_roles(&self) {
        for role in ["router", "api"] {
            self.env.spawn(role, &[role]);
        }
        self.env.spawn_env("dispatch-email", &["dispatch", "--channel", "email"], &[("HERALD__TELEMETRY__METRICS_LISTEN", self.metrics.as_str())]);
        self.env.spawn("dispatch-sms", &["dispatch", "--channel", "sms"]);
    }

    /// Whether the email dispatcher's metrics say it is waiting for `dependency`.
    async fn waiting_for(&self, dependency: &str) -> bool {
        let text = match self.http.get(format!("http://{}/metrics", self.metrics)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        text.lines().any(|l| l.starts_with("herald_waiting{") && l.contains(&format!("dependency=\"{dependency}\"")) && l.ends_with(" 1"))
    }

    /// 300 requests through the router (email + SMS each) and 1,400 deliveries straight onto
    /// the delivery topics: 2,000 deliveries.
    async fn produce(&mut self) {
        for _ in 0..300 {
            let user = unique("fu");
            self.env.user(&user, true, true, &[], None).await;
            let event_id = unique("fevt");
            let sms_id = delivery_id(&event_id, "sms", "+4915112345678");
            let req = NotificationRequested {
                event_id: event_id.clone(),
                occurred_at: now_ms(),
                source: "faults-test".into(),
                user_id: user.clone(),
                category: "billing".into(),
                template_id: "bill_due".into(),
                // The SMS text carries its delivery id, so the sandbox's log can be reconciled.
                params: [("amount".to_string(), sms_id.clone())].into(),
                channels: Some(vec!["email".into(), "sms".into()]),
                priority: Priority::Normal,
                locale: None,
                expires_at: None,
            };
            self.expected.insert(delivery_id(&req.event_id, "email", &format!("{user}@example.com")), "email");
            self.expected.insert(sms_id, "sms");
            self.env.send(&req).await;
        }
        for i in 0..1_400 {
            let channel = if i % 2 == 0 { "email" } else { "sms" };
            let event = unique("fdel");
            let address = if channel == "email" { format!("f{i}@example.com") } else { format!("+491511{i:07}") };
            let id = delivery_id(&event, channel, &address);
            let content = match channel {
                "email" => RenderedContent { subject: Some("Hi".into()), text: Some("hi".into()), ..Default::default() },
                // The SMS text carries its delivery id, so the sandbox's log can be reconciled.
                _ => RenderedContent {
                    body: Some(format!("Code {id}")),
                    sms_encoding: Some("GSM-7".into()),
                    sms_segments: Some(1),
                    ..Default::default()
                },
            };
            let d = ChannelDelivery {
                delivery_id: id,
                event_id: event,
                user_id: unique("fu"),
                category: "billing".into(),
                template_id: "bill_due".into(),
                channel: channel.into(),
                address,
                device_id: None,
                locale: "en".into(),
                priority: Priority::Normal,
                content,
                attempt: 0,
                not_before: None,
                deadline: now_ms() + 3_600_000,
                created_at: now_ms(),
                last_error: None,
                last_provider: None,
            };
            self.expected.insert(d.delivery_id.clone(), if channel == "email" { "email" } else { "sms" });
            let topic = self.env.topic(&format!("delivery.{channel}"));
            let bytes = self.env.codec.encode(&topic, &d).await.unwrap();
            self.env.send_raw(&topic, Some(d.user_id.as_bytes()), &bytes).await;
        }
    }

    /// Requests the providers accepted, per delivery id. SendGrid's carry it in their
    /// custom args; the SMS texts of this test carry it in their body.
    async fn received(&self) -> HashMap<String, usize> {
        let mut by_delivery = HashMap::new();
        for (provider, channel) in [("sendgrid", "email"), ("mandrill", "email"), ("twilio", "sms"), ("vonage", "sms")] {
            let v: Value = self.http.get(format!("{}/_sandbox/requests/{provider}", self.sandbox.url())).send().await.unwrap().json().await.unwrap();
            let requests = v.as_array().cloned().or_else(|| v["requests"].as_array().cloned()).unwrap_or_default();
            for r in requests.iter().filter(|r| r["status"].as_u64().is_some_and(|s| s < 300)) {
                let ids: Vec<String> = hex_ids(&r.to_string()).into_iter().filter(|id| self.expected.get(id) == Some(&channel)).collect();
                assert!(ids.len() <= 1, "a {provider} request names several deliveries: {ids:?}");
                if let Some(id) = ids.into_iter().next() {
                    *by_delivery.entry(id).or_insert(0) += 1;
                }
            }
        }
        by_delivery
    }

    /// Deliveries with a committed `sent` outcome.
    fn sent(&self) -> usize {
        let seen = self.env.seen.lock().unwrap();
        let mut ids = std::collections::HashSet::new();
        for (_, s) in seen.iter() {
            if let common::env::Seen::Outcome(o) = s {
                if o.status == "sent" {
                    if let Some(d) = &o.delivery_id {
                        if self.expected.contains_key(d) {
                            ids.insert(d.clone());
                        }
                    }
                }
            }
        }
        ids.len()
    }
}

/// Every run of exactly 32 lowercase hex digits in `text` (delivery ids).
fn hex_ids(text: &str) -> Vec<String> {
    let is_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..=bytes.len() {
        if i < bytes.len() && is_hex(bytes[i]) {
            continue;
        }
        if i - start == 32 {
            out.push(text[start..i].to_string());
        }
        start = i + 1;
    }
    out
}

async fn outage_under_load(outage: Outage) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut load = Load::start().await;
    load.produce().await;
    load.spawn_roles();
    let total = load.expected.len();
    // Mid-stream: some sent, most not.
    let started = Instant::now();
    while load.sent() < total / 5 {
        assert!(started.elapsed() < Duration::from_secs(120), "only {} of {total} sent before the outage", load.sent());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = load.sent();
    let (component, name) = match outage {
        Outage::Kafka => ("kafka", "Kafka stopped"),
        Outage::Store => ("cassandra", "store SIGKILLed"),
    };
    let _restart = Restart(component);
    match outage {
        Outage::Kafka => stack(&["stop", "kafka"]),
        Outage::Store => stack(&["stop", "cassandra", "--kill"]),
    }
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let dependency = if matches!(outage, Outage::Kafka) { "kafka" } else { "store" };
    assert!(load.waiting_for(dependency).await, "the email dispatcher's metrics say it waits for {dependency}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(load.env.exited().is_empty(), "roles exited during the outage: {:?}", load.env.exited());
    stack(&["start", component]);
    let healthy = Instant::now();
    let outage_s = (healthy - down).as_secs_f64();
    while load.sent() < total {
        assert!(
            healthy.elapsed() < Duration::from_secs(120),
            "{name}: {} of {total} delivered {} s after the stack was healthy again\nemail dispatcher:\n{}",
            load.sent(),
            healthy.elapsed().as_secs(),
            common::env::tail(&load.env.log("dispatch-email"), 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let recovered = healthy.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = load.received().await;
    let lost = load.expected.keys().filter(|d| !received.contains_key(*d)).count();
    let twice: usize = load.expected.keys().filter_map(|d| received.get(d)).map(|n| n.saturating_sub(1)).sum();
    let exited = load.env.exited();
    eprintln!(
        "{name}: {total} deliveries ({before} sent before the outage); down {outage_s:.0} s; all sent {recovered:.1} s after it was healthy; lost {lost}, sent twice {twice}; roles exited: {exited:?}"
    );
    assert!(exited.is_empty(), "roles exited: {exited:?}");
    assert_eq!(lost, 0, "{name}: deliveries never reached a provider");
    assert_eq!(twice, 0, "{name}: deliveries sent twice");
    if matches!(outage, Outage::Kafka) {
        assert!(recovered <= 60.0, "all delivered {recovered:.0} s after Kafka was healthy (target 60 s)");
    }
    // The API is ready again too. Its store session reconnects on the driver's own backoff
    // (scylla 1.9: exponential, at most 10 s ± 15 % between tries), so it may lag the roles.
    let api = load.env.config.api.listen.clone();
    let mut last = String::new();
    let ready_after = loop {
        let answer = load.http.get(format!("http://{api}/readyz")).send().await;
        match answer {
            Ok(r) if r.status().as_u16() == 200 => break healthy.elapsed().as_secs_f64(),
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        assert!(healthy.elapsed() < Duration::from_secs(30), "{name}: the API is not ready 30 s after the stack was healthy: {last}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("{name}: the API was ready {ready_after:.1} s after the stack was healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stopped_for_20_s_under_load() {
    outage_under_load(Outage::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_sigkilled_for_20_s_under_load() {
    outage_under_load(Outage::Store).await;
}
