//! `herald demo`: seeds sample contacts, pushes sample NotificationRequested events through
//! the real stack and prints what came out at each stage that exists so far.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::Codec;
use crate::config::Config;
use crate::model::{now_ms, NotificationRequested, Priority};
use crate::store::{Device, Preference, Store, User};
use crate::topology::Topology;

/// Runs the demo with `events` sample events.
pub async fn run(config: &Config, topology: &Topology, events: usize) -> anyhow::Result<()> {
    let store = Store::open(&config.store).await.context("opening the store")?;
    seed_contacts(&store).await?;
    println!("demo: seeded users alice (email, phone, 2 devices) and bob (email only)");

    let codec = Codec::new(&config.registry)?;
    let requests = topology.name("requests")?;
    let producer = crate::kafka::producer(&config.kafka, "demo")?;
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut sent = Vec::new();
    for i in 0..events {
        let (user, category, template, priority) = if i % 2 == 0 {
            ("alice", "billing", "bill_due", Priority::Normal)
        } else {
            ("bob", "security", "login_code", Priority::High)
        };
        let ev = NotificationRequested {
            event_id: format!("demo-{run_id}-{i}"),
            occurred_at: now_ms(),
            source: "herald-demo".into(),
            user_id: user.into(),
            category: category.into(),
            template_id: template.into(),
            params: HashMap::from([("amount".into(), format!("{}.00", 10 + i)), ("code".into(), format!("{:06}", 123456 + i))]),
            channels: None,
            priority,
            locale: None,
            expires_at: None,
        };
        let bytes = codec.encode(requests, &ev).await?;
        let (partition, offset) = producer
            .send(FutureRecord::to(requests).key(&ev.user_id).payload(&bytes), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {requests}: {e}"))
            .map(|d| (d.partition, d.offset))?;
        sent.push((ev.event_id.clone(), partition, offset));
    }
    println!("demo: produced {} NotificationRequested events to {requests} (Avro, acks=all)", sent.len());

    // Read the same records back, as the router would, and decode them.
    let consumer: StreamConsumer = crate::kafka::client_config(&config.kafka, "demo-reader")
        .set("group.id", format!("herald-demo-{run_id}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut lowest: HashMap<i32, i64> = HashMap::new();
    for (_, p, o) in &sent {
        let e = lowest.entry(*p).or_insert(*o);
        *e = (*e).min(*o);
    }
    for (p, o) in &lowest {
        tpl.add_partition_offset(requests, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    let reader = crate::schemas::schema("NotificationRequested")?;
    let mut seen = 0;
    println!("demo: consumed back from {requests}:");
    while seen < sent.len() {
        let msg = tokio::time::timeout(Duration::from_secs(15), consumer.recv())
            .await
            .context("timed out reading the demo events back")??;
        let ev: NotificationRequested = codec.decode(msg.payload(), &reader).await?;
        if !ev.event_id.starts_with(&format!("demo-{run_id}")) {
            continue;
        }
        seen += 1;
        println!(
            "  p{}@{:<6} {:<44} user={:<6} {:<9} {:<10} priority={:?}",
            msg.partition(),
            msg.offset(),
            ev.event_id,
            ev.user_id,
            ev.category,
            ev.template_id,
            ev.priority
        );
    }
    for (user, _) in [("alice", ()), ("bob", ())] {
        let u = store.user(user).await?.context("seeded user vanished")?;
        let devices = store.devices(user).await?;
        println!(
            "demo: {user}: email={} phone={} devices={}",
            u.email.as_deref().unwrap_or("-"),
            u.phone.as_deref().unwrap_or("-"),
            devices.iter().filter(|d| d.active).map(|d| d.platform.as_str()).collect::<Vec<_>>().join(",")
        );
    }
    println!("demo: the events wait in {requests} for the router role (herald router), not built yet.");
    Ok(())
}

async fn seed_contacts(store: &Store) -> anyhow::Result<()> {
    store
        .put_user(&User {
            user_id: "alice".into(),
            email: Some("alice@example.com".into()),
            phone: Some("+4915112345678".into()),
            locale: Some("de-DE".into()),
            timezone: Some("Europe/Berlin".into()),
        })
        .await?;
    store
        .put_user(&User {
            user_id: "bob".into(),
            email: Some("bob@example.org".into()),
            phone: None,
            locale: Some("en-US".into()),
            timezone: Some("America/New_York".into()),
        })
        .await?;
    for (platform, token) in [
        ("ios", "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"),
        ("android", "fcm-demo-token-alice-pixel:APA91bH0demo"),
    ] {
        store
            .put_device(&Device {
                user_id: "alice".into(),
                device_id: crate::model::delivery_id(platform, token, "device")[..16].to_string(),
                platform: platform.into(),
                token: token.into(),
                app_id: Some("com.example.app".into()),
                active: true,
            })
            .await?;
    }
    store
        .put_preference(&Preference {
            user_id: "bob".into(),
            channel: "sms".into(),
            category: "marketing".into(),
            opt_in: false,
        })
        .await?;
    Ok(())
}
