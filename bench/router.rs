//! Router throughput, CPU and memory, next to the baselines it is held to, in one run.
//!
//! ```sh
//! scripts/stack up
//! cargo bench --bench router -- --users 10000 --requests 20000
//! cargo bench --bench router -- --users 1000000 --requests 20000
//! cargo bench --bench router -- --users 10000 --requests 20000 --dedup lwt
//! cargo bench --bench router -- --users 10000 --requests 40000 --profile  # + perf profile of the pipelined router
//! ```
//!
//! 1. An isolated environment (own topics, keyspace) on the real stack; N users preloaded,
//!    each with an email, an iPhone and an Android device and a preference row.
//! 2. M requests pre-produced (category `bench`: dedup, enrichment, preferences and a
//!    throttle check all on; 3 deliveries each), users drawn uniformly from the N.
//! 3. The release `herald router` with its batch steps one after another
//!    (`router.pipelined = false`), timed from its first fetch to its last outcome.
//! 4. Baselines over the same records: (a) a plain rdkafka consume → produce, 1 in 1 out,
//!    no transactions (for reference only); (b) a transactional passthrough through
//!    herald's own stage loop, read_committed in, each input producing the router's real
//!    outputs (its 3 deliveries and 3 outcomes of the first request, copied); (c) the store
//!    floor: the router's own store calls alone, shaped as it shapes them (see
//!    `store_floor`). Three runs of (a) and (b), the median counts.
//! 5. M fresh requests, and the release `herald router` pipelined (the default): the next
//!    batch is routed while the last one commits.
//!
//! Prints events/s of each, CPU per event of the processes involved (bench, broker and
//! store from the stack's pid files, the router), both routers' ratios to the store floor
//! (target ≥ 0.9) and to the transactional passthrough (target ≥ 0.35), router CPU per
//! event (target ≤ 60 µs) and peak RSS (VmHWM).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "procs.rs"]
mod procs;

use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::model::{now_ms, NotificationRequested, Priority};
use herald::store::{Device, Preference, User};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
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
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let users = arg("--users", 10_000);
    let mode = std::env::args().skip_while(|a| a != "--dedup").nth(1).unwrap_or_else(|| "keyed".into());
    let requests = arg("--requests", 20_000);
    println!("router bench: {users} users, {requests} requests, dedup {mode}");
    let env = Env::start_with(&CONFIG.replace("[router]\n", &format!("[router]\nbatch_max = {BATCH}\ndedup_mode = \"{mode}\"\n")), false).await;

    let started = Instant::now();
    futures::stream::iter(0..users).map(|i| preload(&env, i)).buffer_unordered(64).collect::<Vec<_>>().await;
    println!("preloaded {users} users in {:.1} s", started.elapsed().as_secs_f64());

    let topic = env.topic("requests");
    produce(&env, &topic, requests, users, 0).await;

    // CPU per event of each process a phase uses: this bench process, the broker, the store.
    let stack = [Some(std::process::id()), procs::stack_pid("kafka"), procs::stack_pid("cassandra")];
    let per_event = |before: &[f64], after: &[f64]| -> Vec<f64> { before.iter().zip(after).map(|(b, a)| (a - b) * 1e6 / requests as f64).collect() };

    // Router, batch steps one after another (router.pipelined = false): the figure before.
    let sequential = router_run(&env, "router-sequential", false, requests, &stack).await;

    // The router's real outputs for one request (3 deliveries, 3 outcomes), for the
    // transactional passthrough below.
    let sample = sample_outputs(&env).await;
    let sample_bytes: usize = sample.iter().map(|o| o.payload.as_ref().map_or(0, Vec::len) + o.key.as_ref().map_or(0, Vec::len)).sum();

    // A passthrough of 20k records takes a fraction of a second, so one run is at the mercy
    // of the machine's noise: three runs (each its own consumer group), the median counts.
    let cpu = procs::cpu_of(&stack);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(passthrough(&env, &topic, requests).await);
    }
    let pass_cpu: Vec<f64> = per_event(&cpu, &procs::cpu_of(&stack)).iter().map(|us| us / 3.0).collect();
    let passthrough = median(&mut runs);
    println!(
        "plain passthrough (1 in, 1 out, no transactions): {:.0} events/s; CPU per event: bench {:.0} µs, kafka {:.0} µs",
        requests as f64 / passthrough.as_secs_f64(),
        pass_cpu[0],
        pass_cpu[1]
    );

    let cpu = procs::cpu_of(&stack);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(transactional_passthrough(&env, &topic, requests, &sample).await);
    }
    let txn_cpu: Vec<f64> = per_event(&cpu, &procs::cpu_of(&stack)).iter().map(|us| us / 3.0).collect();
    let rates: Vec<String> = runs.iter().map(|d| format!("{:.0}", requests as f64 / d.as_secs_f64())).collect();
    let txn = median(&mut runs);
    let txn_rate = requests as f64 / txn.as_secs_f64();
    println!(
        "transactional passthrough (herald's stage loop, read_committed in, the router's {} outputs = {sample_bytes} bytes per input, pipelined): {txn_rate:.0} events/s (median of {})",
        sample.len(),
        rates.join(", ")
    );
    println!("  CPU per event: bench {:.0} µs, kafka {:.0} µs", txn_cpu[0], txn_cpu[1]);

    let cpu = procs::cpu_of(&stack);
    let floor = store_floor(&env, requests, users, &mode).await;
    let floor_cpu = per_event(&cpu, &procs::cpu_of(&stack));
    let floor_rate = requests as f64 / floor.as_secs_f64();
    println!("store floor (the router's own store calls alone, shaped as it shapes them): {floor_rate:.0} events/s");
    println!("  CPU per event: bench {:.0} µs, kafka {:.0} µs, store {:.0} µs", floor_cpu[0], floor_cpu[1], floor_cpu[2]);

    // Router, pipelined (the default): the figure after. Its own fresh requests.
    produce(&env, &topic, requests, users, requests).await;
    let pipelined = router_run(&env, "router", true, requests, &stack).await;

    for (name, r) in [("sequential", &sequential), ("pipelined", &pipelined)] {
        println!(
            "router {name:>10}: {:.0} events/s = {:.2} of the store floor (target >= 0.9), {:.2} of the transactional passthrough (target >= 0.35), {:.2} of the plain one; CPU per event: router {:.0} µs (target <= 60), kafka {:.0} µs, store {:.0} µs; peak RSS {:.1} MiB with {users} users",
            r.rate,
            r.rate / floor_rate,
            r.rate / txn_rate,
            r.rate * passthrough.as_secs_f64() / requests as f64,
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
            r.hwm_kb as f64 / 1024.0
        );
    }
    println!("pipelined / sequential = {:.2}", pipelined.rate / sequential.rate);
    // Where a batch's time goes: the router's own per-batch step timings (debug log).
    let log = plain(&env.log("router"));
    let steps: Vec<&str> = log.lines().filter(|l| l.contains("batch routed") || l.contains("batch committed")).collect();
    println!("last batches (router log):\n{}", steps[steps.len().saturating_sub(6)..].join("\n"));
}

fn median(runs: &mut [Duration]) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

/// Produces `n` requests (event ids from `first`), users drawn uniformly from `users`.
async fn produce(env: &Env, topic: &str, n: usize, users: usize, first: usize) {
    let started = Instant::now();
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64 ^ first as u64;
    let mut pending = Vec::with_capacity(n.min(10_000));
    for i in first..first + n {
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
        let bytes = env.codec.encode(topic, &req).await.unwrap();
        pending.push(env.producer.send_result(FutureRecord::to(topic).key(&user).payload(&bytes)).map_err(|(e, _)| e).unwrap());
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in pending.drain(..) {
        d.await.unwrap().unwrap();
    }
    println!("produced {n} requests in {:.1} s", started.elapsed().as_secs_f64());
}

/// One router run over the requests not yet routed.
struct RouterRun {
    rate: f64,
    /// CPU µs per event: router, broker, store (with its start-up).
    cpu: Vec<f64>,
    hwm_kb: u64,
}

async fn router_run(env: &Env, name: &str, pipelined: bool, n: usize, stack: &[Option<u32>; 3]) -> RouterRun {
    let since = now_ms();
    env.spawn_env(name, &["router"], &[("HERALD__ROUTER__PIPELINED", if pipelined { "true" } else { "false" })]);
    let pid = env.pid(name).expect("router running");
    let procs_now = [Some(pid), stack[1], stack[2]];
    let cpu = procs::cpu_of(&procs_now);
    // `--profile`: perf samples the pipelined router's CPU (software clock: this machine has
    // no hardware counters), reported by shared object and symbol after the run.
    let profile = (pipelined && std::env::args().any(|a| a == "--profile")).then(|| {
        let data = env.dir.path().join("router.perf.data");
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("--profile needs perf (Debian's linux-perf)");
        (child, data)
    });
    let (elapsed, hwm_kb) = wait_routed(env, name, n, pid, since).await;
    let cpu: Vec<f64> = cpu.iter().zip(procs::cpu_of(&procs_now)).map(|(b, a)| (a - b) * 1e6 / n as f64).collect();
    if let Some((mut child, data)) = profile {
        std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap();
        for sort in ["dso", "dso,sym"] {
            let report = std::process::Command::new("perf")
                .args(["report", "--stdio", "--no-children", "--percent-limit", "0.7", "--sort", sort, "-i"])
                .arg(&data)
                .output()
                .expect("perf report");
            let text = String::from_utf8_lossy(&report.stdout);
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(45).collect();
            println!("router profile by {sort} (perf, cpu-clock):\n{}", lines.join("\n"));
        }
    }
    env.stop(name, false);
    let rate = n as f64 / elapsed.as_secs_f64();
    println!("router ({name}, pipelined = {pipelined}): {n} records in {:.2} s = {rate:.0} events/s", elapsed.as_secs_f64());
    RouterRun { rate, cpu, hwm_kb }
}

/// The router's outputs for its first request: the first record of each delivery topic it
/// wrote and the first three outcomes (each one channel's `routed`).
async fn sample_outputs(env: &Env) -> Vec<herald::kafka::eos::Output> {
    let mut out = Vec::new();
    for (id, take) in [("delivery.email", 1), ("delivery.apns", 1), ("delivery.fcm", 1), ("outcomes", 3)] {
        let topic = env.topic(id);
        let consumer = env.committed_reader(&topic, "bench-sample");
        for _ in 0..take {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("a router output").unwrap();
            let headers =
                m.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
            out.push(herald::kafka::eos::Output {
                topic: topic.clone(),
                partition: None,
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
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
            Err(e) if attempt < 10 && herald::error::Classify::is_retryable(&e) => {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await
            }
            Err(e) => panic!("preload: {e}"),
        }
    }
}

async fn preload(env: &Env, i: usize) {
    let id = format!("u{i}");
    let user =
        User { user_id: id.clone(), email: Some(format!("{id}@example.com")), phone: None, locale: Some("en".into()), timezone: Some("UTC".into()) };
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

/// The router's own store calls and nothing else, shaped as the router shapes them, batch
/// by batch of [`BATCH`] events: first the reads, concurrently (the batch's dedup claims,
/// `IN` of 100, or claimed by lightweight transaction in `lwt` mode; the contacts of the
/// users herald's contacts cache lacks, through that cache; the throttle hits of the batch's
/// users the router has not read them for: it keeps the state of the users it owns), then
/// the writes, concurrently (claims and 3 notification-log rows per event as
/// one mutation per event, a throttle hit per channel). A router that deduplicates, enriches
/// and throttles against the CQL store cannot do less. Other event ids than the router's.
async fn store_floor(env: &Env, n: usize, users: usize, mode: &str) -> Duration {
    use herald::model::DeliveryOutcome;
    use herald::store::{DedupClaim, NewThrottleHit, ThrottleHit};
    let contacts = herald::router::contacts::Contacts::new(env.store.clone(), 50_000, Duration::from_secs(300));
    let ttl = Duration::from_secs(3600);
    let window = Duration::from_secs(86_400);
    let mut rng_state = 0x9e37_79b9_7f4a_7c15_u64;
    let events: Vec<(String, String)> = (0..n)
        .map(|i| {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            (format!("floor-{i}-{}", unique("e")), format!("u{}", rng_state as usize % users))
        })
        .collect();
    let mut throttle_read = std::collections::HashSet::new();
    let started = Instant::now();
    for (b, chunk) in events.chunks(BATCH).enumerate() {
        let claim = |i: usize| DedupClaim { source_topic: "floor".into(), partition: 0, offset: (b * BATCH + i) as i64 };
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let mut batch_users: Vec<&str> = chunk.iter().map(|(_, u)| u.as_str()).collect();
        batch_users.sort_unstable();
        batch_users.dedup();
        let transact: Vec<(&str, DedupClaim)> =
            if mode == "lwt" { ids.iter().enumerate().map(|(i, id)| (*id, claim(i))).collect() } else { Vec::new() };
        let read: &[&str] = if mode == "lwt" { &[] } else { &ids };
        // The router holds the throttle state of the users it owns (the bench's records
        // are keyed by their user) after reading it once; not in `lwt` mode, which trusts no key.
        let unseen: Vec<&str> = batch_users.iter().copied().filter(|u| mode == "lwt" || throttle_read.insert(u.to_string())).collect();
        let (owners, found, _contacts, _hits) = tokio::try_join!(
            env.store.claim_events(&transact, ttl),
            env.store.claims(read),
            contacts.load_many(&batch_users),
            env.store.throttle_hits("bench", &unseen),
        )
        .expect("floor: reads");
        let at = chrono::Utc::now();
        let mut claims = Vec::new();
        let mut log = Vec::new();
        let mut hits = Vec::new();
        for (i, (id, user)) in chunk.iter().enumerate() {
            if mode != "lwt" && !found.contains_key(id) && !owners.contains_key(id) {
                claims.push((id.as_str(), claim(i)));
            }
            for (ch, device) in [("email", None), ("apns", Some("d0")), ("fcm", Some("d1"))] {
                log.push((
                    DeliveryOutcome {
                        outcome_id: format!("{:064x}", b * BATCH + i),
                        event_id: id.clone(),
                        delivery_id: Some(format!("{:032x}{}", b * BATCH + i, device.unwrap_or("em"))),
                        user_id: Some(user.clone()),
                        category: Some("bench".into()),
                        channel: Some(ch.into()),
                        provider: None,
                        status: "routed".into(),
                        reason: None,
                        provider_message_id: None,
                        attempt: 0,
                        latency_ms: None,
                        occurred_at: now_ms(),
                        requested_at: Some(now_ms()),
                    },
                    Some("bench".to_string()),
                ));
            }
            for ch in ["email", "push"] {
                hits.push(NewThrottleHit {
                    user_id: user.clone(),
                    channel: ch.into(),
                    category: "bench".into(),
                    hit: ThrottleHit { event_id: id.clone(), at },
                    window,
                });
            }
        }
        tokio::try_join!(env.store.record_events(&claims, ttl, &log), env.store.put_throttle_hits(&hits)).expect("floor: writes");
    }
    started.elapsed()
}

/// herald's own stage loop (`kafka::eos::run`, pipelined as the router's) with no
/// processing: each input becomes the router's real outputs for one request (`sample`,
/// keyed by the input's key), produced with the offsets in one transaction per batch,
/// read_committed in. The Kafka limit the router is held to. First batch to last commit.
async fn transactional_passthrough(env: &Env, topic: &str, n: usize, sample: &[herald::kafka::eos::Output]) -> Duration {
    use herald::kafka::eos::{self, BatchResult, Output, Processor, StageError, StageSettings};
    use rdkafka::message::OwnedMessage;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Copy<'a> {
        sample: &'a [Output],
        first: std::sync::OnceLock<Instant>,
        committed: AtomicUsize,
        done: tokio::sync::Notify,
        n: usize,
    }
    impl Processor for Copy<'_> {
        async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
            self.first.get_or_init(Instant::now);
            let mut outputs = Vec::with_capacity(batch.len() * self.sample.len());
            for m in batch {
                for o in self.sample {
                    outputs.push(Output { key: m.key().map(<[u8]>::to_vec), ..o.clone() });
                }
            }
            Ok(BatchResult { outputs, holds: Vec::new() })
        }
        fn committed(&self, batch: &[OwnedMessage]) {
            if self.committed.fetch_add(batch.len(), Ordering::SeqCst) + batch.len() >= self.n {
                self.done.notify_one();
            }
        }
    }
    let settings = StageSettings {
        role: "bench-txn",
        group_id: unique("bench-txn"),
        topics: vec![topic.to_string()],
        transactional_id: unique("bench-txn"),
        batch_max: BATCH,
        batch_wait: Duration::from_millis(20),
        transaction_timeout: Duration::from_secs(10),
        pipelined: true,
    };
    let copy = Copy { sample, first: Default::default(), committed: AtomicUsize::new(0), done: tokio::sync::Notify::new(), n };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = eos::run(&env.config.kafka, &settings, &copy, shutdown.clone());
    let wait = async {
        tokio::time::timeout(Duration::from_secs(120), copy.done.notified()).await.expect("transactional passthrough stalled");
        let elapsed = copy.first.get().expect("processed").elapsed();
        shutdown.cancel();
        elapsed
    };
    let (ran, elapsed) = tokio::join!(run, wait);
    ran.expect("transactional passthrough");
    elapsed
}

/// Counts the router's outcome records (3 `routed` per request: email, iPhone, Android)
/// without decoding them. The time runs from the router's first fetch to its last outcome:
/// (from `since` on: earlier runs' records are skipped) first-to-last by the records' timestamps, plus what the first batch took before its
/// outputs went out (its step timings in the router's log). Then the peak RSS.
async fn wait_routed(env: &Env, name: &str, n: usize, pid: u32, since: i64) -> (Duration, u64) {
    let topic = env.topic("outcomes");
    let consumer = env.committed_reader(&topic, "bench-count");
    let (mut count, mut first, mut last) = (0usize, i64::MAX, 0i64);
    while count < 3 * n {
        let m = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("router stalled at {count}/{} outcomes\n{}", 3 * n, common::env::tail(&env.log(name), 20)))
            .unwrap();
        let ts = m.timestamp().to_millis().unwrap_or(0);
        if ts < since {
            continue; // an earlier run's
        }
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
    let before_first = first_batch_ms(&env.log(name));
    (Duration::from_millis((last - first).max(0) as u64 + before_first.max(1)), hwm)
}
