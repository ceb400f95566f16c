//! Router throughput and memory, next to a plain rdkafka passthrough in the same run.
//!
//! ```sh
//! scripts/stack up
//! cargo bench --bench router -- --users 10000 --requests 20000
//! cargo bench --bench router -- --users 1000000 --requests 20000
//! cargo bench --bench router -- --users 10000 --requests 20000 --dedup lwt
//! ```
//!
//! 1. An isolated environment (own topics, keyspace) on the real stack; N users preloaded,
//!    each with an email, an iPhone and an Android device and a preference row.
//! 2. M requests pre-produced (category `bench`: dedup, enrichment, preferences and a
//!    throttle check all on; 3 deliveries each), users drawn uniformly from the N.
//! 3. Baseline: a plain rdkafka consume → produce of the same M records (no processing,
//!    no transactions), timed from first to last record; three runs, the median counts.
//! 4. A store floor: the same number of dedup claims made batch by batch in the router's
//!    dedup mode (lightweight transactions, or a read and a write), which any router that
//!    deduplicates against the CQL store must do at least, and nothing else; timed.
//! 5. The release `herald router` binary over the same records, timed from its first fetch
//!    to its last outcome; its peak RSS (VmHWM) read from /proc.
//!
//! Prints events/s for each and the CPU time per event of the processes involved (bench,
//! broker, store; for the router run the router itself), the router/passthrough ratio
//! (target ≥ 0.5), the router's share of the dedup floor, and the router's peak RSS.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "procs.rs"]
mod procs;

use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::model::{now_ms, NotificationRequested, Priority};
use herald::store::{Device, Preference, User};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use common::env::Env;
use common::unique;

/// The router's batch size here (`router.batch_max`), also the dedup floor's.
const BATCH: usize = 4000;

/// The router's config here; `batch_max` ([`BATCH`]) and `dedup_mode` are added per run.
const CONFIG: &str = r#"
[router]
batch_wait_ms = 20
concurrency = 128
cache_max_entries = 50000

[router.categories.bench]
opt_in_default = true
opt_out_allowed = true
priority = "normal"
throttle_limit = 1000000
throttle_window = "1d"
quiet_hours = false
"#;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let users = arg("--users", 10_000);
    let mode = std::env::args().skip_while(|a| a != "--dedup").nth(1).unwrap_or_else(|| "keyed".into());
    let requests = arg("--requests", 20_000);
    println!("router bench: {users} users, {requests} requests, dedup {mode}");
    let env = Env::start_with(&CONFIG.replace("[router]\n", &format!("[router]\nbatch_max = {BATCH}\ndedup_mode = \"{mode}\"\n")), false).await;

    let started = Instant::now();
    futures::stream::iter(0..users)
        .map(|i| preload(&env, i))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    println!("preloaded {users} users in {:.1} s", started.elapsed().as_secs_f64());

    let topic = env.topic("requests");
    let started = Instant::now();
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    let mut pending = Vec::with_capacity(requests);
    for i in 0..requests {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let user = format!("u{}", rng_state as usize % users);
        let req = NotificationRequested {
            event_id: format!("bench-{i}-{}", unique("e")),
            occurred_at: now_ms(),
            source: "bench".into(),
            user_id: user.clone(),
            category: "bench".into(),
            template_id: "bill_due".into(),
            params: [("amount".to_string(), format!("{i}.00"))].into(),
            channels: Some(vec!["email".into(), "push".into()]),
            priority: Priority::Normal,
            locale: None,
            expires_at: None,
        };
        let bytes = env.codec.encode(&topic, &req).await.unwrap();
        pending.push(env.producer.send_result(FutureRecord::to(&topic).key(&user).payload(&bytes)).map_err(|(e, _)| e).unwrap());
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in pending.drain(..) {
        d.await.unwrap().unwrap();
    }
    println!("produced {requests} requests in {:.1} s", started.elapsed().as_secs_f64());

    // CPU per event of each process a phase uses: this bench process, the broker, the store.
    let stack = [Some(std::process::id()), procs::stack_pid("kafka"), procs::stack_pid("cassandra")];
    let per_event = |before: &[f64], after: &[f64]| -> Vec<f64> { before.iter().zip(after).map(|(b, a)| (a - b) * 1e6 / requests as f64).collect() };

    // A passthrough of 20k records takes a fraction of a second, so one run is at the mercy
    // of the machine's noise: three runs (each its own consumer group), the median counts.
    let cpu = procs::cpu_of(&stack);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(passthrough(&env, &topic, requests).await);
    }
    let pass_cpu: Vec<f64> = per_event(&cpu, &procs::cpu_of(&stack)).iter().map(|us| us / 3.0).collect();
    let rates: Vec<String> = runs.iter().map(|d| format!("{:.0}", requests as f64 / d.as_secs_f64())).collect();
    runs.sort();
    let passthrough = runs[1];
    println!("passthrough: {requests} records in {:.2} s = {:.0} events/s (median of {} events/s)", passthrough.as_secs_f64(), requests as f64 / passthrough.as_secs_f64(), rates.join(", "));
    println!("  CPU per event: bench {:.0} µs, kafka {:.0} µs, store {:.0} µs", pass_cpu[0], pass_cpu[1], pass_cpu[2]);

    let cpu = procs::cpu_of(&stack);
    let floor = dedup_floor(&env, requests, &mode).await;
    let floor_cpu = per_event(&cpu, &procs::cpu_of(&stack));
    let floor_kind = if mode == "lwt" { "claimed by lightweight transaction" } else { "read + written" };
    println!(
        "dedup floor: {requests} claims {floor_kind} in {:.2} s = {:.0} events/s ({:.2} of the passthrough)",
        floor.as_secs_f64(),
        requests as f64 / floor.as_secs_f64(),
        passthrough.as_secs_f64() / floor.as_secs_f64()
    );
    println!("  CPU per event: bench {:.0} µs, kafka {:.0} µs, store {:.0} µs", floor_cpu[0], floor_cpu[1], floor_cpu[2]);

    env.spawn("router", &["router"]);
    let pid = env.pid("router").expect("router running");
    let procs_now = [Some(pid), stack[1], stack[2]];
    let cpu = procs::cpu_of(&procs_now);
    let (elapsed, hwm_kb) = wait_routed(&env, requests, pid).await;
    let router_cpu = per_event(&cpu, &procs::cpu_of(&procs_now));
    let router_rate = requests as f64 / elapsed.as_secs_f64();
    let pass_rate = requests as f64 / passthrough.as_secs_f64();
    println!("router:      {requests} records in {:.2} s = {router_rate:.0} events/s", elapsed.as_secs_f64());
    println!("  CPU per event: router {:.0} µs, kafka {:.0} µs, store {:.0} µs (with its start-up)", router_cpu[0], router_cpu[1], router_cpu[2]);
    println!("ratio router/passthrough = {:.3} (target >= 0.5); router/dedup floor = {:.2}", router_rate / pass_rate, router_rate * floor.as_secs_f64() / requests as f64);
    println!("router peak RSS (VmHWM) = {:.1} MiB with {users} users", hwm_kb as f64 / 1024.0);
    // Where a batch's time goes: the router's own per-batch step timings (debug log).
    let log = plain(&env.log("router"));
    let steps: Vec<&str> = log.lines().filter(|l| l.contains("batch routed") || l.contains("batch committed")).collect();
    println!("last batches (router log):\n{}", steps[steps.len().saturating_sub(6)..].join("\n"));
}

/// A log without its terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How long the router's first batch took before its outputs went out: the step timings
/// (`stage_ms`, `prefetch_ms`, `decide_ms`, `flush_ms`) of the first "batch routed" line.
fn first_batch_ms(log: &str) -> u64 {
    let log = plain(log);
    let Some(line) = log.lines().find(|l| l.contains("batch routed")) else { return 0 };
    ["stage_ms=", "prefetch_ms=", "decide_ms=", "flush_ms="]
        .iter()
        .filter_map(|k| line.split(k).nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Retries a store write that timed out (the preload saturates Cassandra on purpose).
async fn retry<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), herald::store::StoreError>>,
{
    for attempt in 0.. {
        match f().await {
            Ok(()) => return,
            Err(e) if attempt < 10 && herald::error::Classify::is_retryable(&e) => tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await,
            Err(e) => panic!("preload: {e}"),
        }
    }
}

async fn preload(env: &Env, i: usize) {
    let id = format!("u{i}");
    let user = User { user_id: id.clone(), email: Some(format!("{id}@example.com")), phone: None, locale: Some("en".into()), timezone: Some("UTC".into()) };
    retry(|| env.store.put_user(&user)).await;
    for (n, platform) in ["ios", "android"].iter().enumerate() {
        let device = Device {
            user_id: id.clone(),
            device_id: format!("{id}-{n}"),
            platform: platform.to_string(),
            token: format!("{id}-token-{platform}"),
            app_id: None,
            active: true,
        };
        retry(|| env.store.put_device(&device)).await;
    }
    let pref = Preference { user_id: id, channel: "sms".into(), category: "bench".into(), opt_in: false };
    retry(|| env.store.put_preference(&pref)).await;
}

/// Consumes `n` records from `topic` and produces each to a scratch topic, as fast as
/// rdkafka goes; first to last record.
async fn passthrough(env: &Env, topic: &str, n: usize) -> Duration {
    let out = env.topic("dlq"); // any existing topic with raw values; the router never reads it
    let consumer: StreamConsumer = herald::kafka::client_config(&env.config.kafka, "bench-pass")
        .set("group.id", unique("bench-pass"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let producer: FutureProducer = herald::kafka::producer(&env.config.kafka, "bench-pass").unwrap();
    let mut first = None;
    for _ in 0..n {
        let m = consumer.recv().await.unwrap();
        first.get_or_insert_with(Instant::now);
        let mut rec = FutureRecord::<[u8], [u8]>::to(&out);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(p) = m.payload() {
            rec = rec.payload(p);
        }
        let mut rec = rec;
        loop {
            match producer.send_result(rec) {
                Ok(_) => break,
                Err((_, r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    tokio::task::block_in_place(|| producer.flush(Duration::from_secs(30))).unwrap();
    first.unwrap().elapsed()
}

/// The least store work any router deduplicating against the CQL store does, in the
/// router's dedup mode, with nothing else, batch by batch of [`BATCH`] events as the
/// router takes them: `lwt` claims each event id with a lightweight transaction (as the
/// router's prefetch does); `keyed` (the bench's records are keyed by their user) and
/// `single_writer` read the claims (`IN`, 100 ids a request) and write the new ones
/// (unlogged batches). Other event ids than the router's, so the router's run
/// starts from the same empty claims table.
async fn dedup_floor(env: &Env, n: usize, mode: &str) -> Duration {
    use herald::store::DedupClaim;
    let ids: Vec<String> = (0..n).map(|i| format!("floor-{i}-{}", unique("e"))).collect();
    let ttl = Duration::from_secs(3600);
    let started = Instant::now();
    for (b, chunk) in ids.chunks(BATCH).enumerate() {
        let claim = |i: usize| DedupClaim { source_topic: "floor".into(), partition: 0, offset: (b * BATCH + i) as i64 };
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        if mode == "lwt" {
            let claims: Vec<(&str, DedupClaim)> = chunk.iter().enumerate().map(|(i, id)| (*id, claim(i))).collect();
            env.store.claim_events(&claims, ttl).await.expect("floor: claim events");
            continue;
        }
        let found = env.store.claims(&chunk).await.expect("floor: read claims");
        let claims: Vec<(&str, DedupClaim)> = chunk.iter().enumerate().filter(|(_, id)| !found.contains_key(**id)).map(|(i, id)| (*id, claim(i))).collect();
        env.store.put_claims(&claims, ttl).await.expect("floor: write claims");
    }
    started.elapsed()
}

/// Counts the router's outcome records (3 `routed` per request: email, iPhone, Android)
/// without decoding them. The time runs from the router's first fetch to its last outcome:
/// first-to-last by the records' timestamps, plus what the first batch took before its
/// outputs went out (its step timings in the router's log). Then the peak RSS.
async fn wait_routed(env: &Env, n: usize, pid: u32) -> (Duration, u64) {
    let topic = env.topic("outcomes");
    let consumer: StreamConsumer = herald::kafka::client_config(&env.config.kafka, "bench-count")
        .set("group.id", unique("bench-count"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[topic.as_str()]).unwrap();
    let (mut count, mut first, mut last) = (0usize, i64::MAX, 0i64);
    while count < 3 * n {
        let m = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("router stalled at {count}/{} outcomes\n{}", 3 * n, common::env::tail(&env.log("router"), 20)))
            .unwrap();
        let ts = m.timestamp().to_millis().unwrap_or(0);
        first = first.min(ts);
        last = last.max(ts);
        count += 1;
    }
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let before_first = first_batch_ms(&env.log("router"));
    (Duration::from_millis((last - first).max(0) as u64 + before_first.max(1)), hwm)
}
