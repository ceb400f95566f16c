//! HTTP API load: `POST /v1/notifications` (signed, validated, produced to Kafka with
//! acks=all before the 202) next to a trivial axum endpoint, on the same machine in the same
//! run.
//!
//! ```sh
//! scripts/stack up
//! cargo bench --bench api -- --seconds 10 --concurrency 128 --rounds 3
//! ```
//!
//! 1. An isolated environment (own topics, keyspace) on the real stack; the release
//!    `herald api` binary; an admin app; the sample templates.
//! 2. Baseline: a trivial axum endpoint (POST, JSON in, 202 + JSON out) on its own 2-thread
//!    runtime in this process, driven closed-loop by `--concurrency` clients for `--seconds`.
//! 3. The API, driven the same way (each request signed with a fresh nonce).
//! 4. The API at half its measured rate, open-loop: requests scheduled at a fixed rate and
//!    sent by `--concurrency` clients (fixed connections, like wrk2), latency counted from
//!    each request's scheduled start, so queueing is not hidden.
//! 5. Controls at that same open-loop rate: the trivial endpoint (the tail this machine and
//!    client impose on any server), and Kafka alone (the API's producer settings, each
//!    record timed until its acks=all acknowledgement: the floor under the API's tail).
//!
//! Steps 2–5 run `--rounds` times (default 3) back to back. Prints requests/s and p50/p99
//! for each phase of each round, where the slow requests of the open-loop phase fall in
//! time, and the medians over the rounds of the ratio (target ≥ 0.3) and of the half-load
//! p99 (target ≤ 10 ms).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "procs.rs"]
mod procs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use herald::api::apps::{self, SecretBox};
use herald::api::auth::{sign_request, Scope};
use herald::api::store::ApiStore;
use tokio::sync::Mutex;

use common::env::Env;
use common::unique;

fn arg(name: &str, default: u64) -> u64 {
    arg_str(name, "").parse().unwrap_or(default)
}

/// The value after `name` on the command line, or `default`.
fn arg_str(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// CPU cores used by the API, this process (clients + trivial server), the broker and the
/// store.
struct Cores {
    api: f64,
    bench: f64,
    kafka: f64,
    store: f64,
}

impl std::fmt::Display for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cpu cores: api {:.2}, bench {:.2}, kafka {:.2}, store {:.2}", self.api, self.bench, self.kafka, self.store)
    }
}

/// The cores each used during `f`.
async fn with_cpu<T>(api: u32, f: impl std::future::Future<Output = T>) -> (T, Cores) {
    let pids = [Some(api), Some(std::process::id()), procs::stack_pid("kafka"), procs::stack_pid("cassandra")];
    let before = procs::cpu_of(&pids);
    let started = Instant::now();
    let out = f.await;
    let secs = started.elapsed().as_secs_f64();
    let used: Vec<f64> = procs::cpu_of(&pids).iter().zip(&before).map(|(a, b)| (a - b) / secs).collect();
    (out, Cores { api: used[0], bench: used[1], kafka: used[2], store: used[3] })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A request ready to send: target address, path, body, extra headers.
struct Prepared {
    addr: std::net::SocketAddr,
    path: &'static str,
    body: bytes::Bytes,
    headers: Vec<(&'static str, String)>,
}
type MakeRequest = Arc<dyn Fn(u64) -> Prepared + Send + Sync>;

/// One client's own keep-alive HTTP/1.1 connection (wrk's model: a fixed set of
/// connections, no pool to check out of, nothing parsed per request). The load generator
/// shares the two cores with the servers, so what it spends per request is CPU the servers
/// do not get; reconnects only after an error.
struct Conn {
    tx: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl Conn {
    fn new() -> Conn {
        Conn { tx: None }
    }

    async fn send(&mut self, p: &Prepared) -> bool {
        if self.tx.as_ref().is_none_or(|tx| tx.is_closed()) {
            let Ok(tcp) = tokio::net::TcpStream::connect(p.addr).await else { return false };
            let _ = tcp.set_nodelay(true);
            let Ok((tx, conn)) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await else { return false };
            tokio::spawn(conn);
            self.tx = Some(tx);
        }
        let tx = self.tx.as_mut().expect("connected");
        if tx.ready().await.is_err() {
            self.tx = None;
            return false;
        }
        let mut req = hyper::Request::post(p.path).header("host", "127.0.0.1").header("content-type", "application/json");
        for (k, v) in &p.headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(http_body_util::Full::new(p.body.clone())).expect("valid request");
        match tx.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().as_u16() == 202;
                ok && http_body_util::BodyExt::collect(resp.into_body()).await.is_ok()
            }
            Err(_) => {
                self.tx = None;
                false
            }
        }
    }
}

/// One connection per client, each behind an (uncontended) lock so a shared closure can
/// reach client `c`'s own.
type Conns = Arc<Vec<Mutex<Conn>>>;

fn conns(n: u64) -> Conns {
    Arc::new((0..n).map(|_| Mutex::new(Conn::new())).collect())
}

struct Stats {
    n: usize,
    errors: usize,
    seconds: f64,
    p50: Duration,
    p99: Duration,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.n as f64 / self.seconds
    }
    fn print(&self, what: &str) {
        println!(
            "{what:<34} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} ok, {} errors, {:.1} s)",
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.n,
            self.errors,
            self.seconds
        );
    }
}

fn stats(mut lat: Vec<Duration>, errors: usize, seconds: f64) -> Stats {
    lat.sort();
    let pick = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default();
    Stats { n: lat.len(), errors, seconds, p50: pick(0.50), p99: pick(0.99) }
}

/// `concurrency` clients back to back for `seconds`.
async fn closed_loop(conns: &Conns, make: MakeRequest, concurrency: u64, seconds: u64) -> Stats {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let results = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..concurrency as usize {
        let (conns, make, results, counter) = (conns.clone(), make.clone(), results.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            let mut conn = conns[c].lock().await;
            while Instant::now() < until {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let request = make(i);
                let t = Instant::now();
                if conn.send(&request).await {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            let mut r = results.lock().await;
            r.0.extend(lat);
            r.1 += errors;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let r = results.lock().await;
    stats(r.0.clone(), r.1, elapsed)
}

/// One unit of open-loop work, (client, request index): `true` when it succeeded.
type Work = Arc<dyn Fn(usize, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync>;

/// Requests started at a fixed `rate` for `seconds`, each timed from its scheduled start.
///
/// Every request is built (and signed) before the clock starts, as wrk2 prepares its
/// requests: the load generator shares the machine's two cores with the server, and its
/// own per-request work would otherwise be part of what is measured.
async fn open_loop(conns: &Conns, make: MakeRequest, rate: f64, seconds: u64, clients: u64) -> Stats {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000_000_000);
    let total = (rate * seconds as f64) as u64;
    let first = NEXT.fetch_add(total, std::sync::atomic::Ordering::Relaxed);
    let prepared: Arc<Vec<Prepared>> = Arc::new((first..first + total).map(|i| make(i)).collect());
    let conns = conns.clone();
    let work: Work = Arc::new(move |c, i| {
        let (conns, prepared) = (conns.clone(), prepared.clone());
        Box::pin(async move { conns[c].lock().await.send(&prepared[i as usize]).await })
    });
    settle().await;
    open_loop_with(work, rate, seconds, clients).await
}

/// The API's own view, from its request histogram: (sends answered within 10 ms, all).
async fn server_side(http: &reqwest::Client, base: &str) -> (f64, f64) {
    let text = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return (0.0, 0.0),
    };
    let count = |le: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("herald_api_request_duration_seconds_bucket{")
                    && l.contains("route=\"/v1/notifications\"")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (count("0.01"), count("+Inf"))
}

/// A pause between phases, so one phase's aftermath (the broker flushing what the last
/// closed loop produced) is not charged to the next.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// `work` scheduled at a fixed `rate` for `seconds` and carried out by `clients` workers
/// (a fixed connection pool, as a real client has; wrk2's method), each timed from its
/// scheduled start: when a worker is still busy with its previous request, the wait counts
/// against the latency, so queueing is not hidden (no coordinated omission), but a stall
/// cannot turn into a storm of new connections from the load generator itself.
async fn open_loop_with(work: Work, rate: f64, seconds: u64, clients: u64) -> Stats {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * seconds as f64) as u64;
    // Request i belongs to client i % clients and is due at started + i × interval; each
    // client sleeps until its next request is due (wrk2's per-connection schedule), so no
    // shared queue or hand-off between clients adds latency of the generator's own.
    let started = tokio::time::Instant::now() + Duration::from_millis(20);
    let wall = chrono::Utc::now() + chrono::Duration::milliseconds(20);
    let mut workers = Vec::new();
    for client in 0..clients.min(total.max(1)) {
        let work = work.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in (client..total).step_by(clients as usize) {
                let due = started + interval * i as u32;
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                let ok = work(client as usize, i).await;
                done.push((i, ok, due.elapsed(), sent - due));
            }
            done
        }));
    }
    let mut results = Vec::with_capacity(total as usize);
    for w in workers {
        results.extend(w.await.unwrap());
    }
    results.sort_by_key(|(i, _, _, _)| *i);
    // A slow request either started late (its client was still busy with the previous one,
    // or this process was not scheduled) or took long once sent.
    let late = results.iter().filter(|(_, _, d, l)| *d > Duration::from_millis(10) && *l > Duration::from_millis(5)).count();
    let long = results.iter().filter(|(_, _, d, l)| *d > Duration::from_millis(10) && d.saturating_sub(*l) > Duration::from_millis(10)).count();
    println!("  of the requests over 10 ms: {late} started over 5 ms late, {long} took over 10 ms once sent");
    let tasks = results.into_iter().map(|(_, ok, d, _)| (ok, d));
    let (mut lat, mut errors) = (Vec::new(), 0);
    // Where the slow requests fall in time: stalls show up as a few bad 100 ms windows.
    let mut slow_windows: std::collections::BTreeMap<u64, usize> = Default::default();
    for (i, t) in tasks.enumerate() {
        match t {
            (true, d) => {
                if d > Duration::from_millis(10) {
                    *slow_windows.entry((interval * i as u32).as_millis() as u64 / 100).or_default() += 1;
                }
                lat.push(d)
            }
            (false, _) => errors += 1,
        }
    }
    let slow: usize = slow_windows.values().sum();
    let mut worst: Vec<_> = slow_windows.iter().collect();
    worst.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    let worst: Vec<String> = worst.iter().take(8).map(|(w, n)| format!("{:.1}s:{n}", **w as f64 / 10.0)).collect();
    println!(
        "open loop from {}: {slow} requests over 10 ms, in {} of {} 100 ms windows; worst: {}",
        wall.format("%H:%M:%S%.3f"),
        slow_windows.len(),
        seconds * 10,
        worst.join(" ")
    );
    stats(lat, errors, seconds as f64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = arg("--seconds", 10);
    // Enough clients that the API is CPU-bound, not bound by Kafka's acks=all round trip.
    let concurrency = arg("--concurrency", 128);
    let port = free_port();
    // `--replay-guard shared`: every signature also claimed in the store (several replicas).
    let guard = arg_str("--replay-guard", "process");
    println!("api bench: {concurrency} concurrent clients, {seconds} s per phase, replay guard {guard}");
    let env = Env::start_with(
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\nrate_limit_per_second = 0\nreplay_guard = \"{guard}\"\n[telemetry]\nlog_filter = \"warn\"\n"),
        false,
    )
    .await;
    env.spawn("api", &["api"]);
    let api_pid = env.pid("api").expect("api running");
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency as usize).build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "api did not become ready:\n{}", env.log("api"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key = env.config.api.encryption_key_bytes().unwrap();
    let api_store = ApiStore::prepare(env.store.session.clone(), &env.config.store.keyspace).await.unwrap();
    let creds = apps::create(&api_store, &SecretBox::new(&key), "bench", &[Scope::Admin].into(), &Default::default(), None).await.unwrap();
    let (app_key, secret) = (creds.key.clone(), creds.secret.expose().to_string());

    // Baseline: a trivial axum endpoint on its own runtime.
    let trivial_port = free_port();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async move {
            let app = axum::Router::new().route(
                "/v1/notifications",
                post(|axum::Json(v): axum::Json<serde_json::Value>| async move {
                    (axum::http::StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "status": "accepted", "event_id": v["user_id"] })))
                }),
            );
            let l = tokio::net::TcpListener::bind(("127.0.0.1", trivial_port)).await.unwrap();
            // The API's socket settings, so the baseline differs only in what it does.
            let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, app).await.unwrap();
        });
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let run = unique("r");
    let body = move |i: u64| {
        serde_json::to_vec(&serde_json::json!({ "user_id": format!("bench-{run}-{i}"), "template_id": "bill_due", "params": { "amount": "9.99" }, "channels": ["email"] })).unwrap()
    };
    let trivial: MakeRequest = {
        let body = body.clone();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], trivial_port));
        Arc::new(move |i| Prepared { addr, path: "/v1/notifications", body: body(i).into(), headers: Vec::new() })
    };
    let signed: MakeRequest = Arc::new({
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        move |i| {
            let b = body(i);
            let headers =
                sign_request(&app_key, &secret, "POST", "/v1/notifications", &b, chrono::Utc::now().timestamp(), Some(&format!("bench-nonce-{i}")));
            Prepared { addr, path: "/v1/notifications", body: b.into(), headers }
        }
    });
    // Each server gets its own set of connections, kept across phases.
    let (trivial_conns, api_conns) = (conns(concurrency), conns(concurrency));

    // Warm up both (connections, registry schema lookups, template cache), long enough for a
    // freshly started broker too: its JIT compiles the produce path under the first seconds
    // of load (the first round after a stack start measured the broker at 0.6 cores and the
    // API at half its later rate with a 2 s warm-up).
    closed_loop(&trivial_conns, trivial.clone(), concurrency, 2).await;
    closed_loop(&api_conns, signed.clone(), concurrency, 8).await;

    // Rounds, each measuring all three back to back: the machine is shared, so one round
    // can land on someone else's burst; the medians are the figures, every round is shown.
    let rounds = arg("--rounds", 3);
    let (mut ratios, mut p99s, mut control_p99s, mut kafka_p99s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let produce: Work = {
        let producer: rdkafka::producer::FutureProducer = herald::kafka::client_config(&env.config.kafka, "bench")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", env.config.api.producer_linger_ms.to_string())
            .set("compression.type", "lz4")
            .create()
            .unwrap();
        let topic = env.topic("requests");
        Arc::new(move |_, i| {
            let (producer, topic) = (producer.clone(), topic.clone());
            Box::pin(async move {
                let key = format!("bench-user-{}", 1_000_000_000 + i);
                let payload = vec![b'x'; 160];
                let record = rdkafka::producer::FutureRecord::to(&topic).key(&key).payload(&payload);
                producer.send(record, Duration::from_secs(30)).await.is_ok()
            })
        })
    };
    for round in 1..=rounds {
        println!("-- round {round}/{rounds}");
        let base_stats = closed_loop(&trivial_conns, trivial.clone(), concurrency, seconds).await;
        base_stats.print("trivial axum endpoint (closed loop)");
        let (api_stats, cpu) = with_cpu(api_pid, closed_loop(&api_conns, signed.clone(), concurrency, seconds)).await;
        api_stats.print("POST /v1/notifications (closed loop)");
        println!("  {cpu}; API CPU per request {:.0} µs", cpu.api / api_stats.rate().max(1.0) * 1e6);
        let before = server_side(&http, &base).await;
        let (half, cpu) = with_cpu(api_pid, open_loop(&api_conns, signed.clone(), api_stats.rate() / 2.0, seconds, concurrency)).await;
        half.print(&format!("POST /v1/notifications @ {:.0}/s", api_stats.rate() / 2.0));
        let after = server_side(&http, &base).await;
        let (fast, all) = (after.0 - before.0, after.1 - before.1);
        println!(
            "  inside the API (its histogram, arrival to answer): {:.0} of {all:.0} over 10 ms ({:.2}%)",
            all - fast,
            100.0 * (all - fast) / all.max(1.0)
        );
        println!("  {cpu}");
        // Control: the trivial endpoint at the same open-loop rate. Its tail is what this
        // machine and client give any server at that rate (stalls it shares are not herald's).
        let control = open_loop(&trivial_conns, trivial.clone(), api_stats.rate() / 2.0, seconds, concurrency).await;
        control.print(&format!("trivial endpoint @ {:.0}/s (control)", api_stats.rate() / 2.0));
        control_p99s.push(control.p99.as_secs_f64() * 1e3);
        // Second control: Kafka alone. The API's producer settings, records of a request's
        // size, produced open-loop at the same rate, each timed until Kafka's ack.
        settle().await;
        let kafka = open_loop_with(produce.clone(), api_stats.rate() / 2.0, seconds, concurrency).await;
        kafka.print(&format!("Kafka produce acks=all @ {:.0}/s (control)", api_stats.rate() / 2.0));
        kafka_p99s.push(kafka.p99.as_secs_f64() * 1e3);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("machine load average (1/5/15 min): {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
        ratios.push(api_stats.rate() / base_stats.rate());
        p99s.push(half.p99);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let shown = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
    let mut p99_ms: Vec<f64> = p99s.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    println!(
        "ratios by round: {}   half-load p99 (ms) by round: {}   control p99 (ms) by round: {}",
        shown(&ratios),
        shown(&p99_ms),
        shown(&control_p99s)
    );
    println!("Kafka-alone p99 (ms) by round: {}", shown(&kafka_p99s));
    println!(
        "median control p99 at the same open-loop rate: trivial endpoint {:.2} ms, Kafka produce alone {:.2} ms",
        median(&mut control_p99s),
        median(&mut kafka_p99s)
    );
    let (ratio, p99) = (median(&mut ratios), median(&mut p99_ms));
    println!(
        "median ratio {ratio:.2} (target >= 0.3: {})   median half-load p99 {p99:.2} ms (target <= 10 ms: {})",
        if ratio >= 0.3 { "met" } else { "NOT met" },
        if p99 <= 10.0 { "met" } else { "NOT met" }
    );
}
