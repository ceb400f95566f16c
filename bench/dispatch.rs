//! Dispatcher throughput against the provider sandbox at 0 ms and 50 ms provider latency,
//! next to the sandbox's own maximum rate under plain HTTP load, in the same run.
//!
//! ```sh
//! scripts/stack up
//! cargo bench --bench dispatch -- --deliveries 10000 --rounds 3
//! HERALD_BENCH_BIN=/path/to/other/herald cargo bench --bench dispatch   # A/B of two builds
//! ```
//!
//! Per round:
//! 1. Baseline: the sandbox's maximum SendGrid rate, driven by a plain HTTP loop with 256
//!    requests in flight (no Kafka, no store).
//! 2. N email deliveries pre-produced; the release `herald dispatch --channel email` sends
//!    them; rate = N / (first to last `sent` outcome, read_committed). Then the same with
//!    50 ms of added provider latency (N new deliveries, same dispatcher group).
//!
//! Prints per run the rate, the CQL requests per delivery (Cassandra's own count of native
//! requests, `system_views.clients`), CPU per delivery of the dispatcher, Cassandra, Kafka
//! and the bench process (sandbox + counter), taken from the stack's pid files; then the
//! ratios: dispatcher / sandbox max (target ≥ 0.3) and 50 ms / 0 ms (target ≥ 0.9).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "procs.rs"]
mod procs;

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

/// One measured dispatcher run.
struct Run {
    rate: f64,
    cql_per_delivery: f64,
    /// µs per delivery: dispatcher, Cassandra, Kafka, bench process.
    cpu: [f64; 4],
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = arg("--deliveries", 10_000);
    let rounds = arg("--rounds", 3);
    let warmup = arg("--warmup", 10_000);
    println!("dispatch bench: {n} email deliveries per run, {rounds} round(s)");
    let sandbox = sandbox::start(SandboxConfig { listen: "127.0.0.1:0".into(), ..Default::default() }).await.unwrap();
    let url = sandbox.url();
    let config = common::env::sandbox_providers_toml(&url)
        + "\n[dispatch]\nbatch_max = 2000\nconcurrency = 1000\n[dispatch.limits.sendgrid]\nconcurrency = 1000\nrate_per_sec = 100000.0\n";
    let env = Env::start_with(&config, false).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
    let stack = [procs::stack_pid("cassandra"), procs::stack_pid("kafka")];
    if stack.iter().any(Option::is_none) {
        println!("note: no pid file for Cassandra or Kafka (scripts/stack); their CPU is not counted");
    }
    // Warm-up: the store's and the broker's JIT (a restarted Cassandra spends most of its
    // first minute compiling), the dispatcher group's first join.
    if warmup > 0 {
        let w = run(&env, &http, &url, warmup, 0, stack).await;
        print_run("warm-up", &w);
    }

    let mut ratios = Vec::new();
    let mut latency_ratios = Vec::new();
    for round in 1..=rounds {
        let max = sandbox_max_rate(&http, &url, 20_000).await;
        println!("round {round}: sandbox max (plain HTTP, 256 in flight): {max:.0} requests/s");
        let r0 = run(&env, &http, &url, n, 0, stack).await;
        print_run(" 0 ms", &r0);
        let r50 = run(&env, &http, &url, n, 50, stack).await;
        print_run("50 ms", &r50);
        let (ratio, lat) = (r0.rate / max, r50.rate / r0.rate);
        println!("round {round}: dispatcher / sandbox max = {ratio:.2} (target >= 0.3); 50 ms / 0 ms = {lat:.2} (target >= 0.9)");
        ratios.push(ratio);
        latency_ratios.push(lat);
    }
    println!("dispatcher / sandbox max: {} (median {:.2})", list(&ratios), median(&ratios));
    println!("50 ms / 0 ms:             {} (median {:.2})", list(&latency_ratios), median(&latency_ratios));
    sandbox.stop().await.ok();
}

fn print_run(what: &str, r: &Run) {
    println!(
        "  dispatcher, {what} provider latency: {:.0} deliveries/s; per delivery: {:.3} CQL requests, CPU dispatcher {:.0} µs, Cassandra {:.0} µs, Kafka {:.0} µs, bench+sandbox {:.0} µs",
        r.rate, r.cql_per_delivery, r.cpu[0], r.cpu[1], r.cpu[2], r.cpu[3]
    );
}

fn list(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// Native-protocol requests Cassandra has served on its current connections.
async fn cql_requests(env: &Env) -> i64 {
    let rows = env.store.session.query_unpaged("SELECT request_count FROM system_views.clients", ()).await.expect("system_views.clients");
    let rows = rows.into_rows_result().unwrap();
    rows.rows::<(Option<i64>,)>().unwrap().map(|r| r.unwrap().0.unwrap_or(0)).sum()
}

/// Produces `n` deliveries, runs the dispatcher with the provider's latency set, and measures
/// deliveries per second from the first to the last `sent` outcome.
async fn run(env: &Env, http: &reqwest::Client, url: &str, n: usize, latency_ms: u64, stack: [Option<u32>; 2]) -> Run {
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
            content: RenderedContent {
                subject: Some("Your bill".into()),
                html: Some("<p>Pay</p>".into()),
                text: Some("Pay".into()),
                ..Default::default()
            },
            attempt: 0,
            not_before: None,
            deadline: now_ms() + 3_600_000,
            created_at: now_ms(),
            last_error: None,
            last_provider: None,
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
    let (cql_before, bench_before) = (cql_requests(env).await, procs::cpu_seconds(std::process::id()));
    let stack_before = procs::cpu_of(&stack);
    // The production log level: the tests' debug logging costs the dispatcher CPU per delivery.
    env.spawn_env("dispatch", &["dispatch", "--channel", "email"], &[("RUST_LOG", "info")]);
    let pid = env.pid("dispatch").expect("dispatcher started");
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
    let dispatcher_cpu = procs::cpu_seconds(pid);
    let stack_after = procs::cpu_of(&stack);
    let (cql_after, bench_after) = (cql_requests(env).await, procs::cpu_seconds(std::process::id()));
    env.stop("dispatch", false);
    let per = |s: f64| s * 1e6 / n as f64;
    Run {
        rate: n as f64 / ((last - first).max(1) as f64 / 1000.0),
        cql_per_delivery: (cql_after - cql_before - 2) as f64 / n as f64,
        cpu: [per(dispatcher_cpu), per(stack_after[0] - stack_before[0]), per(stack_after[1] - stack_before[1]), per(bench_after - bench_before)],
    }
}

/// The sandbox's rate for valid SendGrid requests with 256 in flight.
async fn sandbox_max_rate(http: &reqwest::Client, url: &str, total: usize) -> f64 {
    http.put(format!("{url}/_sandbox/faults/sendgrid")).json(&json!({"latency_ms": 0, "error_rate": 0.0})).send().await.unwrap();
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
                let r = http.post(format!("{url}/v3/mail/send")).bearer_auth("SG.herald-dev.sandbox-key-not-real").json(&body).send().await.unwrap();
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
