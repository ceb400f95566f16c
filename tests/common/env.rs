//! An isolated herald environment on the real stack for role tests: its own topic names
//! (prefixed copies of topology/topics.toml, 2 partitions each), its own keyspace and
//! consumer groups, a config file, a collector of everything the roles wrote, and role
//! processes (the real `herald` binary) that tests can start, stop and SIGKILL.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::codec::Codec;
use herald::config::Config;
use herald::model::{ChannelDelivery, DeliveryOutcome, NotificationRequested};
use herald::store::{Device, Preference, Store, User};
use herald::topology::{Topology, ValueFormat};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::unique;

/// One record seen on an output topic.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Seen {
    Outcome(DeliveryOutcome),
    Delivery(ChannelDelivery),
    Dead { key: Option<Vec<u8>>, payload: Option<Vec<u8>>, headers: HashMap<String, String> },
}

/// A DLQ record: key, payload and headers.
pub type DeadLetter = (Option<Vec<u8>>, Option<Vec<u8>>, HashMap<String, String>);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: Config,
    pub topology: Topology,
    pub store: Arc<Store>,
    pub codec: Arc<Codec>,
    pub producer: FutureProducer,
    pub seen: Arc<Mutex<Vec<(String, Seen)>>>,
    roles: Mutex<Vec<(String, Child)>>,
}

impl Env {
    /// Creates topics, keyspace, subjects, seeds templates, starts the collector.
    /// `extra_toml` is appended to the generated config file (e.g. `[router]` settings).
    pub async fn start(extra_toml: &str) -> Env {
        Env::start_with(extra_toml, true).await
    }

    /// Like [`Env::start`]; `collect = false` skips the output collector (benchmarks count
    /// records themselves, without decoding them on the measured machine's CPU).
    pub async fn start_with(extra_toml: &str, collect: bool) -> Env {
        let id = unique("t");
        let dir = tempfile::tempdir().unwrap();
        let topo_text = herald::topology::BUILTIN
            .replace("name = \"herald.", &format!("name = \"{id}.herald."))
            .replace("name = \"orders.shipped\"", &format!("name = \"{id}.orders.shipped\""));
        // Short retry levels so retry paths finish within a test.
        let topo_text = regex_partitions(&topo_text)
            .replace("retry_delay = \"10s\"", "retry_delay = \"1s\"")
            .replace("retry_delay = \"1m\"", "retry_delay = \"2s\"")
            .replace("retry_delay = \"10m\"", "retry_delay = \"3s\"");
        let topo_path = dir.path().join("topics.toml");
        std::fs::write(&topo_path, &topo_text).unwrap();
        let config_path = dir.path().join("herald.toml");
        let toml =
            format!("[kafka]\ngroup_prefix = \"{id}\"\n[store]\nkeyspace = \"{id}\"\n[topology]\nfile = \"{}\"\n{extra_toml}\n", topo_path.display());
        std::fs::write(&config_path, toml).unwrap();
        let config = Config::load(Some(&config_path)).expect("env config");
        let topology = Topology::load(Some(&topo_path)).unwrap();
        herald::store::migrate::migrate(&config.store).await.expect("db migrate (is Cassandra up?)");
        herald::topology::reconcile(&config.kafka, &topology, true).await.expect("topology apply (is Kafka up?)");
        herald::schemas::register(&config.registry, &topology).await.expect("schemas register (is the registry up?)");
        let store = Arc::new(Store::open(&config.store).await.unwrap());
        herald::demo::seed_templates(&store).await.unwrap();
        let codec = Arc::new(Codec::new(&config.registry).unwrap());
        let producer = herald::kafka::producer(&config.kafka, "test").unwrap();
        let env =
            Env { dir, config_path, config, topology, store, codec, producer, seen: Arc::new(Mutex::new(Vec::new())), roles: Mutex::new(Vec::new()) };
        if collect {
            env.collect().await;
        }
        env
    }

    /// The pid of a running role.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.roles.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    pub fn topic(&self, id: &str) -> String {
        self.topology.name(id).unwrap().to_string()
    }

    /// Starts `herald <args>` with this env's config; output goes to a log file in the env dir.
    pub fn spawn(&self, name: &str, args: &[&str]) {
        self.spawn_env(name, args, &[]);
    }

    /// Like [`Env::spawn`], with extra environment variables (e.g. a second replica's
    /// `HERALD__ROUTER__INSTANCE_ID`).
    pub fn spawn_env(&self, name: &str, args: &[&str], vars: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).unwrap();
        // Benches compare builds with HERALD_BENCH_BIN (another `herald` binary); tests never set it.
        let bin = std::env::var_os("HERALD_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_herald").into());
        let child = Command::new(bin)
            .args(args)
            .env("HERALD_CONFIG", &self.config_path)
            .env("RUST_LOG", "info,scylla=warn,herald=debug")
            .envs(vars.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.roles.lock().unwrap().push((name.to_string(), child));
    }

    /// SIGKILL (no goodbye) or SIGTERM (graceful) a role and wait for it to exit.
    pub fn stop(&self, name: &str, kill: bool) {
        let mut roles = self.roles.lock().unwrap();
        let Some(pos) = roles.iter().position(|(n, _)| n == name) else { panic!("no role {name}") };
        let (_, mut child) = roles.remove(pos);
        let sig = if kill { "-KILL" } else { "-TERM" };
        Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{name} did not exit after {sig}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Roles that exited on their own, with their exit status.
    pub fn exited(&self) -> Vec<String> {
        self.roles
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(|(name, child)| child.try_wait().ok().flatten().map(|status| format!("{name} ({status})")))
            .collect()
    }

    /// The role's log so far (for assertion messages).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Produces a request (Avro, registry) keyed by user; returns (partition, offset).
    pub async fn send(&self, req: &NotificationRequested) -> (i32, i64) {
        let topic = self.topic("requests");
        // A registry call that failed in transit is retried, as herald's producers do (it
        // happened once at the start of a fault test on a loaded machine); a refusal is not.
        let mut tries = 0;
        let bytes = loop {
            match self.codec.encode(&topic, req).await {
                Ok(b) => break b,
                Err(e @ herald::codec::CodecError::Unavailable(_)) if tries < 5 => {
                    tries += 1;
                    eprintln!("env.send: registry unavailable ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("encode a request: {e}"),
            }
        };
        self.send_raw(&topic, Some(req.user_id.as_bytes()), &bytes).await
    }

    pub async fn send_raw(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> (i32, i64) {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        let d = self.producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        (d.partition, d.offset)
    }

    /// Outcomes recorded for `event_id` so far.
    pub fn outcomes(&self, event_id: &str) -> Vec<DeliveryOutcome> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Outcome(o) if o.event_id == event_id => Some(o.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn deliveries(&self, event_id: &str) -> Vec<ChannelDelivery> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Delivery(d) if d.event_id == event_id => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Dead { key, payload, headers } => Some((key.clone(), payload.clone(), headers.clone())),
                _ => None,
            })
            .collect()
    }

    /// Waits until `pred` holds for the outcomes of `event_id`, or panics with what was seen.
    pub async fn wait_outcomes(&self, event_id: &str, within: Duration, pred: impl Fn(&[DeliveryOutcome]) -> bool) -> Vec<DeliveryOutcome> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.outcomes(event_id);
            if pred(&got) {
                return got;
            }
            if Instant::now() > deadline {
                let statuses: Vec<_> = got.iter().map(|o| (o.status.clone(), o.channel.clone(), o.reason.clone())).collect();
                panic!(
                    "event {event_id}: condition not met within {within:?}; outcomes so far: {statuses:?}\nrouter log tail:\n{}",
                    tail(&self.log("router"), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `n` deliveries of `event_id` were collected (outcomes and deliveries are
    /// different topics, so one can be seen before the other).
    pub async fn wait_deliveries(&self, event_id: &str, n: usize, within: Duration) -> Vec<ChannelDelivery> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.deliveries(event_id);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "event {event_id}: {} of {n} deliveries within {within:?}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A consumer of `topic` from its start, read_committed, in a group of its own.
    pub fn committed_reader(&self, topic: &str, tag: &str) -> StreamConsumer {
        let consumer: StreamConsumer = herald::kafka::client_config(&self.config.kafka, tag)
            .set("group.id", unique(tag))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        consumer
    }

    /// Reads every output topic from the start, read_committed, into `seen`.
    async fn collect(&self) {
        let consumer: StreamConsumer = herald::kafka::client_config(&self.config.kafka, "collector")
            .set("group.id", unique("collector"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut kinds = HashMap::new();
        for t in &self.topology.topics {
            let kind = match (&t.value, t.id.as_str()) {
                (_, "outcomes") => "outcome",
                (_, "dlq") => "dead",
                (ValueFormat::Avro(r), id) if r == "ChannelDelivery" && id.starts_with("delivery.") => "delivery",
                _ => continue,
            };
            kinds.insert(t.name.clone(), kind);
            for p in 0..t.partitions {
                tpl.add_partition_offset(&t.name, p, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&tpl).unwrap();
        let (seen, codec) = (self.seen.clone(), self.codec.clone());
        let outcome_schema = herald::schemas::schema("DeliveryOutcome").unwrap();
        let delivery_schema = herald::schemas::schema("ChannelDelivery").unwrap();
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else { continue };
                let topic = m.topic().to_string();
                let item = match kinds.get(&topic).copied() {
                    Some("outcome") => Seen::Outcome(codec.decode(m.payload(), &outcome_schema).await.expect("outcome decodes")),
                    Some("delivery") => Seen::Delivery(codec.decode(m.payload(), &delivery_schema).await.expect("delivery decodes")),
                    _ => Seen::Dead {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
                            })
                            .unwrap_or_default(),
                    },
                };
                seen.lock().unwrap().push((topic, item));
            }
        });
    }

    /// A user with email, phone and the given devices (platform, token), plus preferences.
    pub async fn user(&self, id: &str, email: bool, phone: bool, devices: &[(&str, &str)], timezone: Option<&str>) {
        self.store
            .put_user(&User {
                user_id: id.into(),
                email: email.then(|| format!("{id}@example.com")),
                phone: phone.then(|| "+4915112345678".into()),
                locale: Some("de-DE".into()),
                timezone: timezone.map(str::to_string),
            })
            .await
            .unwrap();
        for (i, (platform, token)) in devices.iter().enumerate() {
            self.store
                .put_device(&Device {
                    user_id: id.into(),
                    device_id: format!("{id}-d{i}"),
                    platform: platform.to_string(),
                    token: token.to_string(),
                    app_id: Some("com.example.app".into()),
                    active: true,
                })
                .await
                .unwrap();
        }
    }

    pub async fn opt_out(&self, user: &str, channel: &str, category: &str) {
        self.store
            .put_preference(&Preference { user_id: user.into(), channel: channel.into(), category: category.into(), opt_in: false })
            .await
            .unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, mut child) in self.roles.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // HERALD_TEST_KEEP=1 keeps the env dir (config, role logs) for a look afterwards.
        if std::env::var_os("HERALD_TEST_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

/// Every topic with 2 partitions (the delay topic keeps 24: it partitions by hour).
fn regex_partitions(text: &str) -> String {
    let mut out = String::new();
    let mut in_delay = false;
    for line in text.lines() {
        if line.starts_with("id = ") {
            in_delay = line.contains("\"delay\"");
        }
        if line.starts_with("partitions = ") && !in_delay {
            out.push_str("partitions = 2\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `config/sandbox.toml` pointed at a sandbox on `url`, with absolute dev-key paths.
pub fn sandbox_providers_toml(url: &str) -> String {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/sandbox/dev-keys");
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sandbox.toml"))
        .unwrap()
        .replace("http://127.0.0.1:8090", url)
        .replace("\"sandbox/dev-keys", &format!("\"{keys}"))
        .replace("listen = \"127.0.0.1:8090\"", "listen = \"127.0.0.1:0\"")
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
