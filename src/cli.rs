//! The `herald` command line: one subcommand per role or operator task, each a thin shell
//! over the library (config load, telemetry, then the module that does the work).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::schemas::Registration;
use crate::topology::Topology;

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Notification platform: Kafka events to push, SMS and email")]
pub struct Cli {
    /// TOML config file (every setting also has a HERALD__SECTION__KEY env override).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Avro contracts in the schema registry.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Kafka topics declared in topology/topics.toml.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// The CQL store.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// db migrate + topology apply + schemas register, in that order.
    Setup,
    /// Checks that Kafka, the CQL store and the registry answer; exit 1 if any does not.
    Check,
    /// The router role: requests in, per-channel deliveries out (exactly once).
    Router,
    /// A dispatcher role: one channel's deliveries to its providers.
    Dispatch {
        /// apns | fcm | sms | email
        #[arg(long)]
        channel: String,
    },
    /// Re-drives dead letters to the topics they came from (or copies a topic's records).
    Replay {
        /// Topology id to read.
        #[arg(long, default_value = "dlq")]
        from: String,
        /// Topology id to write to (required unless reading the DLQ).
        #[arg(long)]
        to: Option<String>,
        /// Only DLQ records whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Only DLQ records that came from this topology id (e.g. requests).
        #[arg(long)]
        source: Option<String>,
        /// Only records at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Count, do not produce.
        #[arg(long)]
        dry_run: bool,
    },
    /// The HTTP API: signed app requests, tracking, provider webhooks (listens on api.listen).
    Api,
    /// Apps that may call the HTTP API (keys, scopes, secrets).
    Apps {
        #[command(subcommand)]
        action: AppsAction,
    },
    /// Pushes sample events end to end and prints what came out.
    Demo {
        /// How many sample events to push.
        #[arg(long, default_value_t = 5)]
        events: usize,
    },
    /// Prints the effective configuration (secrets redacted).
    Config,
    /// Serves the provider sandbox (APNs, FCM + OAuth, Twilio, Vonage, SendGrid, Mandrill
    /// look-alikes, control API under /_sandbox/) until Ctrl-C.
    Sandbox {
        /// Listen address (HTTP/1.1 and h2c on one port); default `sandbox.listen`.
        #[arg(long)]
        listen: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemasAction {
    /// Registers every topic's value schema (TopicNameStrategy), checking compatibility first.
    Register,
}

#[derive(Debug, Subcommand)]
pub enum TopologyAction {
    /// Creates missing topics and reconciles configs; reports drift it cannot fix.
    Apply,
    /// Reports what apply would change; exit 2 if anything differs.
    Plan,
}

#[derive(Debug, Subcommand)]
pub enum AppsAction {
    /// Creates an app and prints its key and secret (the secret is shown only here).
    Create {
        /// A human name (which service this is).
        #[arg(long)]
        name: String,
        /// Comma-separated: send, contacts, templates, status, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Limit `send` to these categories (comma-separated; default: all).
        #[arg(long, value_delimiter = ',')]
        categories: Vec<String>,
        /// Requests per second for this app (default: api.rate_limit_per_second).
        #[arg(long)]
        rate_limit: Option<u32>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Lists apps (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Gives an app a new secret; the old one works for api.rotation_grace more.
    Rotate {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Revokes an app for good.
    Revoke { key: String },
}

#[derive(Debug, Subcommand)]
pub enum DbAction {
    /// Creates the keyspace and applies pending cql/ migrations.
    Migrate,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(cli.command, Command::Demo { .. }) && std::env::var_os("RUST_LOG").is_none() {
        // The demo prints its own report; keep the roles it runs quiet unless asked.
        config.telemetry.log_filter = "warn,scylla=error,herald::telemetry=off".into();
    }
    if !matches!(cli.command, Command::Router | Command::Dispatch { .. }) {
        // Only long-running roles serve /metrics; one-shot commands share their config.
        config.telemetry.metrics_listen = None;
    }
    crate::telemetry::init(&config.telemetry)?;
    let topology = Topology::load(config.topology.file.as_deref())?;
    match cli.command {
        Command::Schemas { action: SchemasAction::Register } => {
            register(&config, &topology).await?;
        }
        Command::Topology { action } => {
            let apply = matches!(action, TopologyAction::Apply);
            let differs = topology_cmd(&config, &topology, apply).await?;
            if !apply && differs {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Db { action: DbAction::Migrate } => migrate(&config).await?,
        Command::Setup => {
            migrate(&config).await?;
            topology_cmd(&config, &topology, true).await?;
            register(&config, &topology).await?;
        }
        Command::Check => {
            if !check(&config).await {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Router => crate::router::run(&config, &topology, shutdown_on_signal()).await?,
        Command::Dispatch { channel } => crate::dispatch::run(&config, &topology, &channel, shutdown_on_signal()).await?,
        Command::Replay { from, to, reason, source, since, dry_run } => {
            let r = crate::replay::Replay { from, to, reason, source, since_ms: since.map(|t| t.timestamp_millis()), dry_run };
            let report = crate::replay::run(&config, &topology, &r).await.context("replay")?;
            for (topic, n) in &report.replayed {
                println!("replay: {n} record(s) {} {topic}", if dry_run { "would go to" } else { "replayed to" });
            }
            println!("replay: {} record(s) skipped by the filters", report.skipped);
        }
        Command::Api => crate::api::run(&config, &topology, shutdown_on_signal()).await?,
        Command::Apps { action } => apps_cmd(&config, &topology, action).await?,
        Command::Demo { events } => crate::demo::run(&config, &topology, events).await?,
        Command::Config => println!("{config:#?}"),
        Command::Sandbox { listen } => {
            let mut sandbox = config.sandbox.clone();
            if let Some(listen) = listen {
                sandbox.listen = listen;
            }
            crate::sandbox::run(sandbox).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled on SIGINT or SIGTERM: roles finish the batch in hand and commit.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; finishing the batch in hand");
        t.cancel();
    });
    token
}

async fn apps_cmd(config: &Config, topology: &Topology, action: AppsAction) -> anyhow::Result<()> {
    use crate::api::apps;
    let key = config.api.encryption_key_bytes().map_err(anyhow::Error::msg)?;
    let secrets = apps::SecretBox::new(&key);
    let store = crate::store::Store::open(&config.store).await.context("opening the store (did `herald setup` run?)")?;
    let api_store = crate::api::store::ApiStore::prepare(store.session.clone(), &config.store.keyspace).await?;
    let print_creds = |c: &apps::Credentials, json: bool| {
        if json {
            println!("{}", serde_json::json!({ "key": c.key, "secret": c.secret.expose() }));
        } else {
            println!("key:    {}\nsecret: {}\n(store the secret now: it is not shown again)", c.key, c.secret.expose());
        }
    };
    match action {
        AppsAction::Create { name, scopes, categories, rate_limit, json } => {
            let scopes = apps::parse_scopes(&scopes).map_err(anyhow::Error::msg)?;
            for c in &categories {
                anyhow::ensure!(config.router.categories.contains_key(c), "unknown category '{c}'");
            }
            let c = apps::create(&api_store, &secrets, &name, &scopes, &categories.into_iter().collect(), rate_limit).await?;
            print_creds(&c, json);
        }
        AppsAction::List { json } => {
            let list = apps::list(&api_store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for a in list {
                    let state = if a.revoked_at.is_some() { "revoked" } else { "active" };
                    let cats = if a.categories.is_empty() { "all".to_string() } else { a.categories.join(",") };
                    println!("{}  {:<8} {:<24} scopes={} categories={}", a.key, state, a.name, a.scopes.join(","), cats);
                }
            }
        }
        AppsAction::Rotate { key, json } => {
            let c = apps::rotate(&api_store, &secrets, &key, config.api.rotation_grace).await?;
            announce_app_change(config, topology, &key).await?;
            print_creds(&c, json);
        }
        AppsAction::Revoke { key } => {
            apps::revoke(&api_store, &key).await?;
            announce_app_change(config, topology, &key).await?;
            println!("revoked {key} (running API processes drop it now)");
        }
    }
    Ok(())
}

/// Tells every API process that app `key` changed (they drop their cached copy). When
/// Kafka cannot be reached the change is still stored and applies within
/// `api.app_cache_ttl`; the error says so.
async fn announce_app_change(config: &Config, topology: &Topology, key: &str) -> anyhow::Result<()> {
    let producer = crate::kafka::producer(&config.kafka, "apps")?;
    crate::changes::publish(&producer, topology.name("changes")?, "app", key).await.with_context(|| {
        format!(
            "the change to app {key} is stored, but API processes could not be told at once; they apply it within api.app_cache_ttl ({})",
            crate::config::duration::format(&config.api.app_cache_ttl)
        )
    })
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let r = crate::store::migrate::migrate(&config.store).await.context("db migrate")?;
    if r.keyspace_created {
        println!("db: created keyspace {}", config.store.keyspace);
    }
    for m in &r.applied {
        println!("db: applied {m}");
    }
    if r.applied.is_empty() {
        println!("db: up to date ({} migrations already applied)", r.already.len());
    }
    Ok(())
}

/// Returns whether anything differed from the declaration.
async fn topology_cmd(config: &Config, topology: &Topology, apply: bool) -> anyhow::Result<bool> {
    let r = crate::topology::reconcile(&config.kafka, topology, apply).await.context(if apply { "topology apply" } else { "topology plan" })?;
    let capped = topology.topics.iter().any(|t| t.replication_factor > r.max_replication);
    if capped {
        println!("topology: cluster has {} broker(s); replication factors capped at {}", r.brokers, r.max_replication);
    }
    for c in &r.changes {
        println!("topology: {}{c}", if apply && c.fixable() { "applied " } else { "" });
    }
    if r.changes.is_empty() {
        println!("topology: up to date ({} topics)", topology.topics.len());
    }
    let drift = r.drift().count();
    if drift > 0 {
        println!("topology: {drift} drift item(s) need an operator (see DRIFT lines)");
    }
    Ok(!r.changes.is_empty())
}

async fn register(config: &Config, topology: &Topology) -> anyhow::Result<()> {
    let done = crate::schemas::register(&config.registry, topology).await.context("schemas register")?;
    for r in done {
        match r {
            Registration::Unchanged { subject, id } => println!("schemas: {subject} unchanged (id {id})"),
            Registration::Registered { subject, id } => println!("schemas: {subject} registered (id {id})"),
        }
    }
    Ok(())
}

async fn check(config: &Config) -> bool {
    let (k, s, r) = tokio::join!(
        crate::kafka::check_reachable(&config.kafka),
        crate::store::connect(&config.store, None),
        crate::schemas::ping(&config.registry),
    );
    let mut ok = true;
    match k {
        Ok(info) => println!("kafka     ok  {} ({} broker(s), {} topics)", config.kafka.bootstrap_servers, info.brokers, info.topics.len()),
        Err(e) => {
            ok = false;
            println!("kafka     DOWN {e}");
        }
    }
    match s {
        Ok(_) => println!("store     ok  {}", config.store.contact_points.join(",")),
        Err(e) => {
            ok = false;
            println!("store     DOWN {e}");
        }
    }
    match r {
        Ok(subjects) => println!("registry  ok  {} ({} subjects)", config.registry.url, subjects.len()),
        Err(e) => {
            ok = false;
            println!("registry  DOWN {e}");
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// README's "Commands" block names every subcommand and every flag of each, so a flag
    /// added here and not there fails (as `herald replay --to` once did).
    #[test]
    fn readme_commands_block_names_every_subcommand_and_flag() {
        let readme = include_str!("../README.md");
        let block = readme.split("## Commands").nth(1).and_then(|s| s.split("```").nth(1)).expect("README has a Commands block");
        fn walk(cmd: &clap::Command, path: &str, block: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let here = format!("{path} {}", sub.get_name());
                let lines: Vec<&str> = block.lines().filter(|l| l.contains(sub.get_name())).collect();
                if lines.is_empty() {
                    missing.push(here.clone());
                }
                for arg in sub.get_arguments().filter(|a| !a.is_global_set()) {
                    if let Some(long) = arg.get_long() {
                        let flag = format!("--{long}");
                        if !block.lines().any(|l| l.contains(sub.get_name()) && l.contains(&flag)) {
                            missing.push(format!("{here} {flag}"));
                        }
                    }
                }
                walk(sub, &here, block, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "herald", block, &mut missing);
        assert!(missing.is_empty(), "README's Commands block lacks {missing:?}");
    }
}
