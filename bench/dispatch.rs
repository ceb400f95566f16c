//! Dispatcher throughput against the provider sandbox at 0 ms and 50 ms provider latency,
//! next to the sandbox's own maximum rate under plain HTTP load, in the same run.
//!
//! ```sh
//! scripts/stack up
//! cargo bench --bench dispatch -- --deliveries 5000
//! ```
//!
//! 1. An isolated environment (own topics, keyspace) and an in-process sandbox.
//! 2. Baseline: the sandbox's maximum SendGrid rate, driven by a plain reqwest loop with
//!    256 requests in flight (no Kafka, no store).
//! 3. N email deliveries pre-produced; the release `herald dispatch --channel email` sends
//!    them; rate = N / (first to last `sent` outcome). Then the same with 50 ms of added
//!    provider latency (N new deliveries, same dispatcher group).
//!
//! Prints the three rates, the 50 ms / 0 ms ratio (target ≥ 0.8: concurrency hides
//! latency) and the dispatcher's share of the sandbox's maximum.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::model::{delivery_id, now_ms, ChannelDelivery, Priority, RenderedContent};
use herald::sandbox::{self, SandboxConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use serde_json::json;

use common::env::Env;
use common::unique;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = arg("--deliveries", 5_000);
    println!("dispatch bench: {n} email deliveries per run");
    let sandbox = sandbox::start(SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() }).await.unwrap();
    let url = sandbox.url();
    let config = common::env::sandbox_providers_toml(&url)
        + "\n[dispatch]\nbatch_max = 1000\nconcurrency = 1000\n[dispatch.limits.sendgrid]\nconcurrency = 1000\nrate_per_sec = 100000.0\n";
    let env = Env::start_with(&config, false).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();

    // Keep the sandbox's request journal from growing without bound during the runs.
    let max = sandbox_max_rate(&http, &url, 20_000).await;
    println!("sandbox max (plain HTTP, 256 in flight): {max:.0} requests/s");

    let rate0 = run(&env, &http, &url, n, 0).await;
    println!("dispatcher, 0 ms provider latency:  {rate0:.0} deliveries/s");
    let rate50 = run(&env, &http, &url, n, 50).await;
    println!("dispatcher, 50 ms provider latency: {rate50:.0} deliveries/s");
    println!("ratio 50 ms / 0 ms = {:.2} (target >= 0.8)", rate50 / rate0);
    println!("dispatcher (0 ms) / sandbox max = {:.2}", rate0 / max);
    sandbox.stop().await.ok();
}

/// Produces `n` deliveries, runs the dispatcher with the provider's latency set, and returns
/// deliveries per second from the first to the last `sent` outcome.
async fn run(env: &Env, http: &reqwest::Client, url: &str, n: usize, latency_ms: u64) -> f64 {
    http.delete(format!("{url}/_sandbox/requests")).send().await.unwrap();
    http.put(format!("{url}/_sandbox/faults/sendgrid")).json(&json!({"latency_ms": latency_ms, "error_rate": 0.0})).send().await.unwrap();
    let topic = env.topic("delivery.email");
    let tag = unique("run");
    let mut pending = Vec::new();
    for i in 0..n {
        let event = format!("{tag}-{i}");
        let address = format!("b{i}@example.com");
        let d = ChannelDelivery {
            delivery_id: delivery_id(&event, "email", &address),
            event_id: event,
            user_id: format!("user{}", i % 1000),
            category: "billing".into(),
            template_id: "bill_due".into(),
            channel: "email".into(),
            address,
            device_id: None,
            locale: "en".into(),
            priority: Priority::Normal,
            content: RenderedContent { subject: Some("Your bill".into()), html: Some("<p>Pay</p>".into()), text: Some("Pay".into()), ..Default::default() },
            attempt: 0,
            not_before: None,
            deadline: now_ms() + 3_600_000,
            created_at: now_ms(),
            last_error: None,
        };
        let bytes = env.codec.encode(&topic, &d).await.unwrap();
        pending.push(env.producer.send_result(FutureRecord::to(&topic).key(&d.user_id).payload(&bytes)).map_err(|(e, _)| e).unwrap());
        if pending.len() >= 5_000 {
            for p in pending.drain(..) {
                p.await.unwrap().unwrap();
            }
        }
    }
    for p in pending.drain(..) {
        p.await.unwrap().unwrap();
    }
    let counter: StreamConsumer = herald::kafka::client_config(&env.config.kafka, "bench-count")
        .set("group.id", unique("bench-count"))
        .set("auto.offset.reset", "latest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let outcomes = env.topic("outcomes");
    counter.subscribe(&[outcomes.as_str()]).unwrap();
    // Let the counter join before the dispatcher writes anything.
    let _ = tokio::time::timeout(Duration::from_secs(3), counter.recv()).await;
    env.spawn("dispatch", &["dispatch", "--channel", "email"]);
    let (mut count, mut first, mut last) = (0usize, i64::MAX, 0i64);
    while count < n {
        let m = tokio::time::timeout(Duration::from_secs(120), counter.recv())
            .await
            .unwrap_or_else(|_| panic!("dispatcher stalled at {count}/{n}\n{}", common::env::tail(&env.log("dispatch"), 20)))
            .unwrap();
        let ts = m.timestamp().to_millis().unwrap_or(0);
        first = first.min(ts);
        last = last.max(ts);
        count += 1;
    }
    env.stop("dispatch", false);
    n as f64 / ((last - first).max(1) as f64 / 1000.0)
}

/// The sandbox's rate for valid SendGrid requests with 256 in flight.
async fn sandbox_max_rate(http: &reqwest::Client, url: &str, total: usize) -> f64 {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    futures::stream::iter(0..total)
        .map(|i| {
            let (http, done) = (http.clone(), done.clone());
            async move {
                let body = json!({
                    "personalizations": [{"to": [{"email": format!("m{i}@example.com")}]}],
                    "from": {"email": "notifications@herald.dev"},
                    "subject": "Your bill",
                    "content": [{"type": "text/plain", "value": "Pay"}]
                });
                let r = http
                    .post(format!("{url}/v3/mail/send"))
                    .bearer_auth("SG.herald-dev.sandbox-key-not-real")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202);
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    http.delete(format!("{url}/_sandbox/requests")).send().await.unwrap();
    rate
}
