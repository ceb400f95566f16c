//! `herald demo`: seeds sample contacts and templates, runs every role in-process (router,
//! the four dispatchers, and the provider sandbox they talk to), pushes sample events (good
//! ones, a duplicate, an unknown user, poison bytes, a broken template, an upstream trigger
//! event, a dead device token, a provider failing once) through the real stack, and prints
//! what came out at each stage.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::Config;
use crate::model::{now_ms, ChannelDelivery, DeliveryOutcome, NotificationRequested, Priority};
use crate::store::{Device, Preference, Store, Template, TemplateContent, User};
use crate::topology::Topology;

/// Runs the demo; `events` extra bill reminders are added to the fixed scenario.
pub async fn run(config: &Config, topology: &Topology, events: usize) -> anyhow::Result<()> {
    let store = Store::open(&config.store).await.context("opening the store (did `herald setup` run?)")?;
    seed_contacts(&store).await?;
    seed_templates(&store).await?;
    println!("demo: seeded users alice (email, phone, iPhone + Android), bob (email, phone; no email marketing), carol (one iPhone) and 5 templates");

    let codec = Codec::new(&config.registry)?;
    let producer = crate::kafka::producer(&config.kafka, "demo")?;
    let watch = Watch::start(config, topology).await?;

    let sandbox = crate::sandbox::start(config.sandbox.clone()).await.context("starting the provider sandbox (is sandbox.listen free?)")?;
    let http = reqwest::Client::new();
    // A dead iPhone token, and Twilio failing once: retried through herald.retry.sms.1.
    http.put(format!("{}/_sandbox/state", sandbox.url())).json(&serde_json::json!({ "apns_unregistered": [DEAD_TOKEN] })).send().await?;
    http.put(format!("{}/_sandbox/faults/twilio", sandbox.url())).json(&serde_json::json!({ "error": "503", "count": 1 })).send().await?;
    println!("demo: provider sandbox on {} (Twilio will fail once; one iPhone token is dead)", sandbox.url());

    let stop = CancellationToken::new();
    let mut roles = Vec::new();
    roles.push(tokio::spawn({
        let (config, topology, stop) = (config.clone(), topology.clone(), stop.clone());
        async move { crate::router::run(&config, &topology, stop).await }
    }));
    for channel in ["apns", "fcm", "sms", "email"] {
        roles.push(tokio::spawn({
            let (config, topology, stop) = (config.clone(), topology.clone(), stop.clone());
            async move { crate::dispatch::run(&config, &topology, channel, stop).await }
        }));
    }
    println!("demo: router and dispatchers (apns, fcm, sms, email) started in-process");

    let run_id = uuid::Uuid::now_v7().simple().to_string()[..12].to_string();
    let requests = topology.name("requests")?;
    let mut scenario: Vec<(String, String)> = Vec::new();
    let send = |req: NotificationRequested| {
        let (codec, producer, requests) = (&codec, &producer, requests);
        async move {
            let bytes = codec.encode(requests, &req).await?;
            produce(producer, requests, req.user_id.as_bytes(), &bytes).await?;
            anyhow::Ok(req.event_id)
        }
    };
    let bill = |i: usize| request(&run_id, &format!("bill-{i}"), "alice", "billing", "bill_due", &[("amount", &format!("{}.90 €", 20 + i))]);
    for i in 0..events.max(1) {
        scenario.push((send(bill(i)).await?, format!("bill reminder #{i} for alice")));
    }
    scenario.push((send(bill(0)).await?, "the same event id again (duplicate)".into()));
    let mut code = request(&run_id, "code", "bob", "security", "login_code", &[("code", "481516")]);
    code.priority = Priority::High;
    scenario.push((send(code).await?, "login code for bob (security, SMS)".into()));
    scenario.push((
        send(request(&run_id, "promo", "bob", "marketing", "promo", &[("n", "20%")])).await?,
        "promo for bob (opted out of email marketing)".into(),
    ));
    scenario.push((send(request(&run_id, "ghost", "nobody", "billing", "bill_due", &[("amount", "1")])).await?, "bill for an unknown user".into()));
    scenario.push((send(request(&run_id, "broken", "alice", "billing", "broken", &[])).await?, "template that needs a param nobody sent".into()));
    let (p, o) = produce(&producer, requests, b"garbage", b"{not avro}").await?;
    scenario.push((format!("dlq:{requests}:{p}:{o}"), "poison bytes on the requests topic".into()));
    let mut dead = request(&run_id, "dead-token", "carol", "billing", "bill_due", &[("amount", "5.00")]);
    dead.channels = Some(vec!["push".into()]);
    scenario.push((send(dead).await?, "push to carol, whose iPhone token APNs says is dead".into()));
    if let Ok(upstream) = topology.name("upstream.orders_shipped") {
        let order = format!("order-{run_id}");
        let value = order_shipped(&order, "alice");
        let bytes = codec.encode_value(upstream, value).await?;
        produce(&producer, upstream, order.as_bytes(), &bytes).await?;
        scenario.push((format!("{upstream}:{order}"), "upstream orders.shipped event (trigger)".into()));
    }
    println!("demo: produced {} records; waiting for the router's outcomes...\n", scenario.len());

    let ids: Vec<&str> = scenario.iter().map(|(id, _)| id.as_str()).collect();
    let seen = watch.until_settled(&ids, Duration::from_secs(90)).await;
    stop.cancel();
    for role in roles {
        role.await.context("role task")??;
    }
    let received: Vec<String> = ["apns", "fcm", "twilio", "vonage", "sendgrid", "mandrill"]
        .iter()
        .map(|p| {
            let (http, url) = (&http, sandbox.url());
            async move {
                let n = match http.get(format!("{url}/_sandbox/requests/{p}")).send().await {
                    Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0),
                    Err(_) => 0,
                };
                format!("{p} {n}")
            }
        })
        .collect::<futures::stream::FuturesOrdered<_>>()
        .collect()
        .await;
    sandbox.stop().await.ok();

    for (id, what) in &scenario {
        println!("▶ {what}\n  event {id}");
        let outcomes = seen.outcomes.get(id).cloned().unwrap_or_default();
        if outcomes.is_empty() {
            println!("    (no outcome yet)");
        }
        for o in outcomes {
            let reason = o.reason.map(|r| format!(" — {}", truncate(&r, 90))).unwrap_or_default();
            println!("    {:<14} {:<6}{reason}", o.status, o.channel.unwrap_or_default());
        }
        for o in seen.dispatch.get(id).into_iter().flatten() {
            let detail = o.provider_message_id.clone().map(|m| format!("id {}", truncate(&m, 40))).or(o.reason.clone()).unwrap_or_default();
            println!(
                "    {:<14} {:<6} via {:<8} attempt {} — {}",
                o.status,
                o.channel.clone().unwrap_or_default(),
                o.provider.clone().unwrap_or("-".into()),
                o.attempt,
                truncate(&detail, 70)
            );
        }
        for d in seen.deliveries.get(id).into_iter().flatten() {
            let c = &d.content;
            let text = c.subject.as_ref().or(c.title.as_ref()).or(c.body.as_ref()).cloned().unwrap_or_default();
            let sms = c.sms_encoding.as_ref().map(|e| format!(" [{e}, {} segment(s)]", c.sms_segments.unwrap_or(0))).unwrap_or_default();
            println!("    → {:<5} {:<28} {:?} \"{}\"{sms}", d.channel, truncate(&d.address, 28), d.priority, truncate(&text, 50));
        }
    }
    println!("\ndemo: requests the sandbox received per provider: {}", received.join(", "));
    println!("demo: every outcome above is on {} and in the notification_log table.", topology.name("outcomes")?);
    Ok(())
}

fn request(run: &str, id: &str, user: &str, category: &str, template: &str, params: &[(&str, &str)]) -> NotificationRequested {
    NotificationRequested {
        event_id: format!("demo-{run}-{id}"),
        occurred_at: now_ms(),
        source: "herald-demo".into(),
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

fn order_shipped(order: &str, user: &str) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    Value::Record(vec![
        ("order_id".into(), Value::String(order.into())),
        ("customer".into(), Value::Record(vec![("id".into(), Value::String(user.into())), ("name".into(), Value::Union(0, Box::new(Value::Null)))])),
        ("carrier".into(), Value::String("DHL".into())),
        ("tracking_code".into(), Value::String("JJD000390007".into())),
        ("shipped_at".into(), Value::TimestampMillis(now_ms())),
        ("note".into(), Value::Union(0, Box::new(Value::Null))),
    ])
}

async fn produce(producer: &FutureProducer, topic: &str, key: &[u8], payload: &[u8]) -> anyhow::Result<(i32, i64)> {
    let d = producer
        .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
    Ok((d.partition, d.offset))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// What the demo saw on the output topics.
#[derive(Default)]
struct Seen {
    /// Router outcomes by event id.
    outcomes: HashMap<String, Vec<DeliveryOutcome>>,
    /// Dispatcher outcomes (sent, retry_scheduled, invalid_address, ...) by event id.
    dispatch: HashMap<String, Vec<DeliveryOutcome>>,
    deliveries: HashMap<String, Vec<ChannelDelivery>>,
}

/// Dispatcher outcomes after which nothing more happens to a delivery.
const FINAL: [&str; 5] = ["sent", "failed", "invalid_address", "dead_lettered", "expired"];

impl Seen {
    /// Every routed delivery has a final dispatcher outcome.
    fn dispatched(&self) -> bool {
        self.outcomes.values().flatten().filter(|o| o.status == "routed").all(|r| {
            self.dispatch.get(&r.event_id).is_some_and(|ds| ds.iter().any(|d| d.delivery_id == r.delivery_id && FINAL.contains(&d.status.as_str())))
        })
    }
}

/// Reads the outcome and delivery topics (read_committed) from their current end.
struct Watch {
    consumer: StreamConsumer,
    codec: Codec,
    outcomes_topic: String,
}

impl Watch {
    async fn start(config: &Config, topology: &Topology) -> anyhow::Result<Watch> {
        let consumer: StreamConsumer = crate::kafka::client_config(&config.kafka, "demo-watch")
            .set("group.id", format!("herald-demo-watch-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut topics = vec![topology.topic("outcomes")?];
        for ch in ["apns", "fcm", "sms", "email"] {
            topics.push(topology.topic(&format!("delivery.{ch}"))?);
        }
        for t in topics {
            for p in 0..t.partitions {
                tpl.add_partition_offset(&t.name, p, Offset::End)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(Watch { consumer, codec: Codec::new(&config.registry)?, outcomes_topic: topology.name("outcomes")?.to_string() })
    }

    /// Collects until every id has an outcome and nothing new arrived for 3 s (or `within`).
    async fn until_settled(&self, ids: &[&str], within: Duration) -> Seen {
        let outcome_schema = crate::schemas::schema("DeliveryOutcome").expect("built-in schema");
        let delivery_schema = crate::schemas::schema("ChannelDelivery").expect("built-in schema");
        let mut seen = Seen::default();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let all = ids.iter().all(|id| seen.outcomes.contains_key(*id)) && seen.dispatched();
            let quiet = if all { Duration::from_secs(3) } else { Duration::from_secs(10) };
            let next = tokio::time::timeout(quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now())), self.consumer.recv()).await;
            let Ok(Ok(m)) = next else {
                if all || tokio::time::Instant::now() >= deadline {
                    return seen;
                }
                continue;
            };
            if m.topic() == self.outcomes_topic {
                if let Ok(o) = self.codec.decode::<DeliveryOutcome>(m.payload(), &outcome_schema).await {
                    let by_dispatcher = o.provider.is_some()
                        || ["retry_scheduled", "dead_lettered"].contains(&o.status.as_str())
                        || (o.status == "expired" && o.delivery_id.is_some());
                    let map = if by_dispatcher { &mut seen.dispatch } else { &mut seen.outcomes };
                    map.entry(o.event_id.clone()).or_default().push(o);
                }
            } else if let Ok(d) = self.codec.decode::<ChannelDelivery>(m.payload(), &delivery_schema).await {
                seen.deliveries.entry(d.event_id.clone()).or_default().push(d);
            }
        }
    }
}

/// An iPhone token the demo's sandbox treats as unregistered.
const DEAD_TOKEN: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

async fn seed_contacts(store: &Store) -> anyhow::Result<()> {
    for (id, email, phone, locale, tz) in [
        ("alice", "alice@example.com", "+4915112345678", "de-DE", "Europe/Berlin"),
        ("bob", "bob@example.org", "+14155550123", "en-US", "America/New_York"),
    ] {
        store
            .put_user(&User {
                user_id: id.into(),
                email: Some(email.into()),
                phone: Some(phone.into()),
                locale: Some(locale.into()),
                timezone: Some(tz.into()),
            })
            .await?;
    }
    for (i, (platform, token)) in
        [("ios", "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"), ("android", "fcm-demo-token-alice-pixel:APA91bH0demo")]
            .iter()
            .enumerate()
    {
        store
            .put_device(&Device {
                user_id: "alice".into(),
                device_id: format!("alice-{i}"),
                platform: platform.to_string(),
                token: token.to_string(),
                app_id: Some("com.example.app".into()),
                active: true,
            })
            .await?;
    }
    store.put_user(&User { user_id: "carol".into(), email: None, phone: None, locale: Some("en".into()), timezone: Some("UTC".into()) }).await?;
    store
        .put_device(&Device {
            user_id: "carol".into(),
            device_id: "carol-0".into(),
            platform: "ios".into(),
            token: DEAD_TOKEN.into(),
            app_id: Some("dev.herald.demo".into()),
            active: true,
        })
        .await?;
    store.put_preference(&Preference { user_id: "bob".into(), channel: "email".into(), category: "marketing".into(), opt_in: false }).await?;
    Ok(())
}

/// The sample templates (also used by the role tests): `bill_due` (email with tracking,
/// push, sms; en + de), `login_code` (sms), `promo` (email), `order_shipped` (push + email),
/// and `broken`, which needs a param no request sends.
pub async fn seed_templates(store: &Store) -> anyhow::Result<()> {
    let meta = |id: &str, category: &str, channels: &[&str]| Template {
        template_id: id.into(),
        category: category.into(),
        current_version: 1,
        default_channels: channels.iter().map(|c| c.to_string()).collect(),
        tracking: id == "bill_due",
        sample_params: BTreeMap::from([("amount", "9.99"), ("code", "123456"), ("n", "1")])
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    for t in [
        meta("bill_due", "billing", &["email", "push"]),
        meta("login_code", "security", &["sms"]),
        meta("promo", "marketing", &["email"]),
        meta("order_shipped", "shipping", &["push", "email"]),
        meta("broken", "billing", &["email"]),
    ] {
        store.put_template(&t).await?;
    }
    let email = |id: &str, locale: &str, subject: &str, html: &str| TemplateContent {
        template_id: id.into(),
        version: 1,
        channel: "email".into(),
        locale: locale.into(),
        subject: Some(subject.into()),
        html: Some(html.into()),
        text: Some("(see the HTML part)".into()),
        ..Default::default()
    };
    let push = |id: &str, title: &str, body: &str| TemplateContent {
        template_id: id.into(),
        version: 1,
        channel: "push".into(),
        locale: "en".into(),
        title: Some(title.into()),
        body: Some(body.into()),
        ..Default::default()
    };
    let sms = |id: &str, body: &str| TemplateContent {
        template_id: id.into(),
        version: 1,
        channel: "sms".into(),
        locale: "en".into(),
        body: Some(body.into()),
        ..Default::default()
    };
    for c in [
        email("bill_due", "en", "Your bill: {{ amount }}", "<p>Pay {{ amount }} <a href=\"https://example.com/pay\">now</a></p>"),
        email("bill_due", "de", "Ihre Rechnung: {{ amount }}", "<p>Bitte {{ amount }} <a href=\"https://example.com/pay\">zahlen</a></p>"),
        push("bill_due", "Bill due", "Pay {{ amount }}"),
        sms("bill_due", "Pay {{ amount }}"),
        sms("login_code", "Your code: {{ code }}"),
        email("promo", "en", "Deal {{ n }}", "<p>Offer {{ n }}</p>"),
        push("order_shipped", "Shipped", "Order {{ order_id }} via {{ carrier }}"),
        email("order_shipped", "en", "Order {{ order_id }} shipped", "<p>{{ carrier }}: {{ tracking_code }}</p>"),
        email("broken", "en", "Hi {{ missing_param }}", "<p>x</p>"),
    ] {
        store.put_template_content(&c).await?;
    }
    Ok(())
}
