//! Foundation tests against the real stack (Kafka, Cassandra, Apicurio registry), started by
//! `scripts/test`: Avro round trip through Kafka, every table through the scylla driver,
//! idempotent setup commands, and fast, clear errors for bad configuration.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald::codec::Codec;
use herald::model::*;
use herald::schemas::Registration;
use herald::store::*;
use herald::topology::{Change, Topology};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use common::{config, migrated_store_config, unique};

fn sample_request(event_id: &str) -> NotificationRequested {
    NotificationRequested {
        event_id: event_id.into(),
        occurred_at: now_ms(),
        source: "foundation-test".into(),
        user_id: "user-42".into(),
        category: "billing".into(),
        template_id: "bill_due".into(),
        params: HashMap::from([("amount".into(), "12.30".into()), ("due".into(), "2026-12-01".into())]),
        channels: Some(vec!["email".into(), "push".into()]),
        priority: Priority::High,
        locale: Some("de-DE".into()),
        expires_at: Some(now_ms() + 3_600_000),
    }
}

/// Topics and subjects exist before the Kafka tests use them (apply/register are idempotent,
/// so concurrent tests may both run this).
async fn ensure_topology_and_schemas() -> Topology {
    let c = config();
    let t = Topology::builtin();
    herald::topology::reconcile(&c.kafka, &t, true).await.expect("topology apply");
    herald::schemas::register(&c.registry, &t).await.expect("schemas register");
    t
}

#[tokio::test]
async fn avro_notification_requested_round_trips_through_kafka() {
    let t = ensure_topology_and_schemas().await;
    let c = config();
    let topic = t.name("requests").unwrap();
    let codec = Codec::new(&c.registry).unwrap();
    let sent = sample_request(&unique("evt"));
    let bytes = codec.encode(topic, &sent).await.expect("encode with schema_registry_converter");
    assert_eq!(bytes[0], 0, "Confluent magic byte");

    let producer = herald::kafka::producer(&c.kafka, "test").unwrap();
    let (partition, offset) = producer
        .send(FutureRecord::to(topic).key(&sent.user_id).payload(&bytes), Duration::from_secs(10))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
        .expect("produce (acks=all)");

    let consumer: StreamConsumer =
        herald::kafka::client_config(&c.kafka, "test").set("group.id", unique("herald-test")).set("enable.auto.commit", "false").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).unwrap();
    consumer.assign(&tpl).unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await.expect("record consumed within 20 s").expect("consume");
    assert_eq!(msg.key(), Some(sent.user_id.as_bytes()));
    let reader = herald::schemas::schema("NotificationRequested").unwrap();
    let got: NotificationRequested = codec.decode(msg.payload(), &reader).await.expect("decode");
    assert_eq!(got, sent);

    // herald's encoder writes exactly what schema_registry_converter's encode_struct writes
    // (the same schema id and Avro body), for every record kind it produces.
    let converter = schema_registry_converter::async_impl::avro::AvroEncoder::new(herald::schemas::sr_settings(&c.registry).unwrap());
    let by_converter =
        |topic: &str| schema_registry_converter::schema_registry_common::SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
    assert_eq!(bytes, converter.encode_struct(&sent, &by_converter(topic)).await.unwrap(), "NotificationRequested");
    let delivery = ChannelDelivery {
        delivery_id: delivery_id(&sent.event_id, "email", "a@example.com"),
        event_id: sent.event_id.clone(),
        user_id: sent.user_id.clone(),
        category: sent.category.clone(),
        template_id: sent.template_id.clone(),
        channel: "email".into(),
        address: "a@example.com".into(),
        device_id: None,
        locale: "en".into(),
        priority: Priority::High,
        content: RenderedContent {
            title: Some("t".into()),
            body: Some("b\u{e9}".into()),
            data: [("k".to_string(), "v".to_string())].into(),
            subject: Some("s".into()),
            ..Default::default()
        },
        attempt: 2,
        not_before: Some(1),
        deadline: 2,
        created_at: 3,
        last_error: Some("e".into()),
        last_provider: None,
    };
    let dt = t.name("delivery.email").unwrap();
    assert_eq!(codec.encode(dt, &delivery).await.unwrap(), converter.encode_struct(&delivery, &by_converter(dt)).await.unwrap(), "ChannelDelivery");
    let outcome = DeliveryOutcome {
        outcome_id: "o".into(),
        event_id: sent.event_id.clone(),
        delivery_id: Some(delivery.delivery_id.clone()),
        user_id: None,
        category: Some("billing".into()),
        channel: Some("email".into()),
        provider: Some("sendgrid".into()),
        status: "sent".into(),
        reason: None,
        provider_message_id: Some("m".into()),
        attempt: 1,
        latency_ms: Some(12),
        occurred_at: 4,
        requested_at: Some(3),
    };
    let ot = t.name("outcomes").unwrap();
    assert_eq!(codec.encode(ot, &outcome).await.unwrap(), converter.encode_struct(&outcome, &by_converter(ot)).await.unwrap(), "DeliveryOutcome");
    // And decodes them straight from the bytes (the writer's schema is herald's own) to the
    // same values as through a resolved Avro value.
    let bytes = codec.encode(dt, &delivery).await.unwrap();
    let got: ChannelDelivery = codec.decode(Some(&bytes), &herald::schemas::schema("ChannelDelivery").unwrap()).await.unwrap();
    assert_eq!(got, delivery);
    let bytes = codec.encode(ot, &outcome).await.unwrap();
    let got: DeliveryOutcome = codec.decode(Some(&bytes), &herald::schemas::schema("DeliveryOutcome").unwrap()).await.unwrap();
    assert_eq!(got, outcome);
    let mut truncated = bytes.clone();
    truncated.truncate(bytes.len() - 3);
    let err = codec.decode::<DeliveryOutcome>(Some(&truncated), &herald::schemas::schema("DeliveryOutcome").unwrap()).await.unwrap_err();
    assert!(matches!(err, herald::codec::CodecError::Poison(_)), "{err}");
}

#[tokio::test]
async fn poison_bytes_and_unknown_schema_ids_are_permanent_errors() {
    use herald::codec::CodecError;
    use herald::error::Classify;
    let c = config();
    let codec = Codec::new(&c.registry).unwrap();
    let reader = herald::schemas::schema("NotificationRequested").unwrap();
    let e = codec.decode::<NotificationRequested>(Some(b"{\"json\": true}"), &reader).await.unwrap_err();
    assert!(matches!(e, CodecError::Poison(_)) && !e.is_retryable(), "{e}");
    // Magic byte, then a schema id nobody registered.
    let e = codec.decode::<NotificationRequested>(Some(&[0, 0x7f, 0xff, 0xff, 0xf0, 2, 3]), &reader).await.unwrap_err();
    assert!(!e.is_retryable(), "unknown schema id must be poison, got {e}");
}

#[tokio::test]
async fn every_table_writes_and_reads_through_the_scylla_driver() {
    let c = migrated_store_config().await;
    let store = Store::open(&c.store).await.expect("open store");

    let user = User {
        user_id: "u1".into(),
        email: Some("u1@example.com".into()),
        phone: Some("+4915112345678".into()),
        locale: Some("de-DE".into()),
        timezone: Some("Europe/Berlin".into()),
    };
    store.put_user(&user).await.unwrap();
    assert_eq!(store.user("u1").await.unwrap(), Some(user));
    assert_eq!(store.user("nobody").await.unwrap(), None);

    // One user, many devices.
    let devices: Vec<Device> = [("ios", "aa11"), ("android", "fcm-1"), ("web", "fcm-web-1")]
        .iter()
        .enumerate()
        .map(|(i, (platform, token))| Device {
            user_id: "u1".into(),
            device_id: format!("d{i}"),
            platform: platform.to_string(),
            token: token.to_string(),
            app_id: Some("com.example".into()),
            active: i != 2,
        })
        .collect();
    for d in &devices {
        store.put_device(d).await.unwrap();
    }
    let mut got = store.devices("u1").await.unwrap();
    got.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(got, devices);
    assert_eq!(store.token_owner("fcm-1").await.unwrap(), Some(("u1".into(), "d1".into())));

    let pref = Preference { user_id: "u1".into(), channel: "sms".into(), category: "marketing".into(), opt_in: false };
    store.put_preference(&pref).await.unwrap();
    assert_eq!(store.preferences("u1").await.unwrap(), vec![pref.clone()]);

    // The router's bulk read: rows, health, devices and preferences of many users, across
    // IN chunks (150 more users, every third with a device); unknown users are missing.
    for i in 0..150 {
        let id = format!("bulk-{i}");
        store.put_user(&User { user_id: id.clone(), email: Some(format!("{id}@example.com")), ..Default::default() }).await.unwrap();
        if i % 3 == 0 {
            store
                .put_device(&Device {
                    user_id: id.clone(),
                    device_id: "d0".into(),
                    platform: "ios".into(),
                    token: format!("tok-{id}"),
                    app_id: None,
                    active: true,
                })
                .await
                .unwrap();
        }
    }
    store.set_contact_active("bulk-4", "email", false).await.unwrap();
    let mut wanted: Vec<String> = (0..150).map(|i| format!("bulk-{i}")).collect();
    wanted.extend(["u1".to_string(), "nobody".to_string()]);
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let bulk = store.contacts_of(&wanted).await.unwrap();
    assert_eq!((bulk.len(), bulk.contains_key("nobody")), (151, false));
    let mut u1 = bulk["u1"].devices.clone();
    u1.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!((&bulk["u1"].user, &u1, &bulk["u1"].preferences), (&store.user("u1").await.unwrap().unwrap(), &devices, &vec![pref]));
    assert_eq!((bulk["bulk-3"].devices.len(), bulk["bulk-4"].devices.len()), (1, 0));
    assert_eq!(bulk["bulk-4"].health, store.contact_health("bulk-4").await.unwrap());
    assert_eq!(bulk["bulk-4"].health.email_active, Some(false));

    let tpl = Template {
        template_id: "bill_due".into(),
        category: "billing".into(),
        current_version: 1,
        default_channels: vec!["email".into(), "push".into()],
        tracking: true,
        sample_params: HashMap::from([("amount".into(), "1.00".into())]),
    };
    store.put_template(&tpl).await.unwrap();
    assert_eq!(store.template("bill_due").await.unwrap(), Some(tpl));
    let content = TemplateContent {
        template_id: "bill_due".into(),
        version: 1,
        channel: "email".into(),
        locale: "en".into(),
        subject: Some("Your bill of {{ amount }}".into()),
        html: Some("<p>Pay {{ amount }}</p>".into()),
        text: Some("Pay {{ amount }}".into()),
        ..Default::default()
    };
    store.put_template_content(&content).await.unwrap();
    assert_eq!(store.template_contents("bill_due", 1).await.unwrap(), vec![content]);

    // Dedup claims: the first record owns the id; its redelivery still maps to it.
    let ttl = Duration::from_secs(3600);
    let first = store.claim_event("e1", "herald.requests", 3, 100, ttl).await.unwrap();
    assert_eq!(first, DedupClaim { source_topic: "herald.requests".into(), partition: 3, offset: 100 });
    let again = store.claim_event("e1", "herald.requests", 3, 100, ttl).await.unwrap();
    assert_eq!(again, first, "redelivery of the same record finds its own claim");
    let other = store.claim_event("e1", "herald.requests", 5, 7, ttl).await.unwrap();
    assert_eq!(other, first, "another record with the same event_id sees the first owner");

    // Batch forms: many claims at once (LWT), and the read/write halves used when one
    // writer owns each event id (router.dedup_mode = single_writer), read with IN.
    let claim = |p: i32, o: i64| DedupClaim { source_topic: "herald.requests".into(), partition: p, offset: o };
    let owners = store.claim_events(&[("e1", claim(9, 9)), ("e3", claim(2, 20))], ttl).await.unwrap();
    assert_eq!(owners["e1"], first, "an existing claim keeps its owner");
    assert_eq!(owners["e3"], claim(2, 20));
    let many: Vec<String> = (0..250).map(|i| format!("sw-{i}")).collect();
    let ids: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(store.claims(&ids).await.unwrap().is_empty());
    let writes: Vec<(&str, DedupClaim)> = ids.iter().step_by(2).map(|id| (*id, claim(1, 9))).collect();
    store.put_claims(&writes, ttl).await.unwrap();
    let found = store.claims(&ids).await.unwrap();
    assert_eq!(found.len(), 125, "every written claim read back across IN chunks");
    assert_eq!(found["sw-0"], claim(1, 9));
    assert!(!found.contains_key("sw-1"));

    // Throttle hits: written per user × channel × category, read per category for many
    // users and every channel at once.
    let at = chrono::Utc::now();
    let hit = |u: &str, ch: &str, cat: &str, e: &str| NewThrottleHit {
        user_id: u.into(),
        channel: ch.into(),
        category: cat.into(),
        hit: ThrottleHit { event_id: e.into(), at },
        window: Duration::from_secs(3600),
    };
    let written = [
        hit("t1", "email", "promo", "a"),
        hit("t2", "email", "promo", "c"),
        hit("t1", "push", "promo", "a"),
        hit("t1", "email", "promo", "b"),
        hit("t1", "email", "news", "d"),
    ];
    store.put_throttle_hits(&written).await.unwrap();
    let hits = store.throttle_hits("promo", &["t1", "t2", "t3"]).await.unwrap();
    let key = |u: &str, ch: &str| (u.to_string(), ch.to_string());
    assert_eq!(hits[&key("t1", "email")].len(), 2);
    assert_eq!(hits[&key("t1", "push")].iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), ["a"], "per channel");
    assert_eq!(hits[&key("t2", "email")][0].event_id, "c");
    assert_eq!(hits.len(), 3, "nothing for t3, nothing from another category: {hits:?}");
    assert_eq!(store.throttle_hits("news", &["t1"]).await.unwrap()[&key("t1", "email")][0].event_id, "d");

    let outcome = DeliveryOutcome {
        outcome_id: "o1".into(),
        event_id: "e1".into(),
        delivery_id: Some("d1".into()),
        user_id: Some("u1".into()),
        category: Some("billing".into()),
        channel: Some("email".into()),
        provider: Some("sendgrid".into()),
        status: "sent".into(),
        reason: None,
        provider_message_id: Some("msg-1".into()),
        attempt: 0,
        latency_ms: Some(12),
        occurred_at: now_ms(),
        requested_at: None,
    };
    store.log_outcome(&outcome).await.unwrap();
    let log = store.log("e1").await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].status.as_str(), log[0].provider_message_id.as_deref(), log[0].source.as_deref()), ("sent", Some("msg-1"), None));

    // A routed batch's writes: claims and log rows of one event in one batch, whole events
    // per batch; 30 events × (claim + 3 rows) span several batches, one event has rows
    // only, another a claim only.
    let events: Vec<String> = (0..30).map(|i| format!("rec-{i}")).collect();
    let claims: Vec<(&str, DedupClaim)> = events.iter().filter(|e| *e != "rec-7").map(|e| (e.as_str(), claim(4, 44))).collect();
    // Each row carries who asked, except rec-3's (a record that did not decode).
    let outcomes: Vec<(DeliveryOutcome, Option<String>)> = events
        .iter()
        .filter(|e| *e != "rec-9")
        .flat_map(|e| {
            let source = (e != "rec-3").then(|| format!("api:hk_{e}"));
            (0..3)
                .map(|k| {
                    (
                        DeliveryOutcome { outcome_id: format!("{e}-o{k}"), event_id: e.clone(), status: "routed".into(), ..outcome.clone() },
                        source.clone(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    store.record_events(&claims, ttl, &outcomes).await.unwrap();
    let ids: Vec<&str> = events.iter().map(String::as_str).collect();
    let found = store.claims(&ids).await.unwrap();
    assert_eq!((found.len(), found.get("rec-7"), found.get("rec-9")), (29, None, Some(&claim(4, 44))));
    for e in &events {
        let rows = store.log(e).await.unwrap();
        let want = if e == "rec-9" { 0 } else { 3 };
        assert_eq!(rows.len(), want, "log rows of {e}");
        assert!(rows.iter().all(|r| r.status == "routed"));
        let source = (e != "rec-3").then(|| format!("api:hk_{e}"));
        assert!(rows.iter().all(|r| r.source == source), "source of {e}: {rows:?}");
    }
}

#[tokio::test]
async fn db_migrate_is_idempotent() {
    let c = migrated_store_config().await;
    let again = herald::store::migrate::migrate(&c.store).await.unwrap();
    assert!(!again.keyspace_created);
    assert!(again.applied.is_empty(), "second run applied {:?}", again.applied);
    assert_eq!(again.already.len(), herald::store::migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn topology_apply_is_idempotent_and_reports_drift() {
    let c = config();
    let t = Topology::builtin();
    herald::topology::reconcile(&c.kafka, &t, true).await.expect("first apply");
    let second = herald::topology::reconcile(&c.kafka, &t, true).await.expect("second apply");
    assert!(second.changes.is_empty(), "second apply changed {:?}", second.changes);
    assert!(!second.applied);

    // A topic of our own, then drifted by hand: apply restores the config, reports partitions.
    let name = unique("herald.test.drift");
    let mut mine = Topology::parse(
        &format!(
            "[defaults]\npartitions=2\nreplication_factor=3\nmin_insync_replicas=2\nretention=\"1d\"\ncleanup=\"delete\"\n\
             [[topic]]\nid=\"t\"\nname=\"{name}\"\nkey=\"k\"\nvalue=\"raw\"\n"
        ),
        "test",
    )
    .unwrap();
    herald::topology::reconcile(&c.kafka, &mine, true).await.unwrap();
    mine.topics[0].retention_ms = 3_600_000;
    mine.topics[0].partitions = 3;
    let plan = herald::topology::reconcile(&c.kafka, &mine, false).await.unwrap();
    assert!(plan.changes.iter().any(|ch| matches!(ch, Change::Config { key, .. } if key == "retention.ms")), "{:?}", plan.changes);
    assert!(plan.changes.iter().any(|ch| matches!(ch, Change::Drift { .. })), "{:?}", plan.changes);
    herald::topology::reconcile(&c.kafka, &mine, true).await.unwrap();
    let after = herald::topology::reconcile(&c.kafka, &mine, false).await.unwrap();
    assert!(after.changes.iter().all(|ch| !ch.fixable()), "left after apply: {:?}", after.changes);
    assert_eq!(after.drift().count(), 1, "partition drift stays reported");
}

#[tokio::test]
async fn schemas_register_is_idempotent() {
    let c = config();
    let t = Topology::builtin();
    herald::topology::reconcile(&c.kafka, &t, true).await.unwrap();
    herald::schemas::register(&c.registry, &t).await.expect("first register");
    let second = herald::schemas::register(&c.registry, &t).await.expect("second register");
    assert!(!second.is_empty());
    for r in &second {
        assert!(matches!(r, Registration::Unchanged { .. }), "second run changed {r:?}");
    }
    // One subject per Avro topic, TopicNameStrategy.
    let subjects = herald::schemas::ping(&c.registry).await.unwrap();
    for s in ["herald.requests-value", "herald.delivery.sms-value", "herald.outcomes-value"] {
        assert!(subjects.iter().any(|x| x == s), "{s} missing from {subjects:?}");
    }
}

#[tokio::test]
async fn an_incompatible_schema_change_is_refused() {
    // A subject of our own, holding the real NotificationRequested; then a change that
    // adds a required field without a default must be refused before registering.
    let c = config();
    let topic = unique("herald.test.compat");
    let t = Topology::parse(
        &format!(
            "[defaults]\npartitions=1\nreplication_factor=1\nmin_insync_replicas=1\nretention=\"1d\"\ncleanup=\"delete\"\n\
             [[topic]]\nid=\"t\"\nname=\"{topic}\"\nkey=\"k\"\nvalue=\"avro:NotificationRequested\"\n"
        ),
        "test",
    )
    .unwrap();
    herald::schemas::register(&c.registry, &t).await.unwrap();
    let mut v: serde_json::Value = serde_json::from_str(herald::schemas::contract("NotificationRequested").unwrap().text).unwrap();
    v["fields"].as_array_mut().unwrap().push(serde_json::json!({"name": "tenant", "type": "string", "doc": "no default"}));
    let err = herald::schemas::register_text(&c.registry, &format!("{topic}-value"), &v.to_string()).await.unwrap_err();
    assert!(matches!(err, herald::schemas::SchemaError::Incompatible { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_services_fail_fast_with_a_clear_error() {
    let mut c = config();
    c.kafka.bootstrap_servers = "127.0.0.1:1".into();
    c.store.contact_points = vec!["127.0.0.1:1".into()];
    c.registry.url = "http://127.0.0.1:1/apis/ccompat/v7".into();

    let started = Instant::now();
    let e = herald::kafka::check_reachable(&c.kafka).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(15), "kafka took {:?}", started.elapsed());
    assert!(e.contains("127.0.0.1:1") && e.contains("not reachable"), "{e}");

    let started = Instant::now();
    let e = herald::store::connect(&c.store, None).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(15), "store took {:?}", started.elapsed());
    assert!(e.contains("127.0.0.1:1") && e.contains("not reachable"), "{e}");

    let started = Instant::now();
    let e = herald::schemas::ping(&c.registry).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(15), "registry took {:?}", started.elapsed());
    assert!(e.contains("127.0.0.1:1"), "{e}");
}

#[test]
fn the_binary_reports_a_wrong_kafka_port_within_seconds() {
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["topology", "apply"])
        .env("HERALD__KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    assert!(stderr.contains("error: topology apply") && stderr.contains("127.0.0.1:1 is not reachable"), "{stderr}");
}

#[test]
fn a_config_typo_is_named_not_ignored() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(["config"]).env("HERALD__STORE__CONTACT_POINT", "x:9042").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("contact_point"), "{stderr}");
}

/// The stage loop's pipelining (the router's): batch N commits on its own task while batch
/// N+1 is collected and processed. Here N's transaction fails (one of its outputs names a
/// partition that does not exist) while N+1 is in flight: N+1 must be dropped and read
/// again after N, or its outputs would be committed and then produced once more when N is
/// read again. Every input comes out exactly once (read_committed), and N+1's records were
/// processed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_stage_whose_transaction_aborts_reads_the_batch_in_flight_again() {
    use herald::kafka::eos::{self, BatchResult, Output, Processor, StageError, StageSettings};
    use rdkafka::message::OwnedMessage;
    use std::sync::Mutex;

    struct Copy {
        out: String,
        calls: Mutex<Vec<Vec<String>>>,
    }
    impl Processor for Copy {
        async fn process(&self, batch: &[OwnedMessage]) -> Result<BatchResult, StageError> {
            let ids: Vec<String> = batch.iter().map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()).collect();
            let call = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(ids.clone());
                calls.len()
            };
            let mut outputs: Vec<Output> = ids
                .iter()
                .map(|id| Output {
                    topic: self.out.clone(),
                    key: Some(id.clone().into_bytes()),
                    payload: Some(id.clone().into_bytes()),
                    ..Default::default()
                })
                .collect();
            match call {
                // The first batch's transaction cannot commit: partition 99 does not exist.
                1 => outputs.push(Output { topic: self.out.clone(), partition: Some(99), payload: Some(b"x".to_vec()), ..Default::default() }),
                // The second is still being processed when the first one's commit fails.
                2 => tokio::time::sleep(Duration::from_millis(500)).await,
                _ => {}
            }
            Ok(BatchResult { outputs, holds: Vec::new() })
        }
    }

    let env = common::env::Env::start_with("", false).await;
    let (input, out) = (env.topic("dlq"), env.topic("outcomes"));
    let n = 400;
    for i in 0..n {
        let id = format!("r{i:04}");
        env.producer.send(FutureRecord::to(&input).key(&id).payload(&id), Duration::from_secs(10)).await.unwrap();
    }
    let settings = StageSettings {
        role: "test-stage",
        group_id: unique("stage"),
        topics: vec![input.clone()],
        transactional_id: unique("stage-tx"),
        batch_max: 50,
        batch_wait: Duration::from_millis(20),
        transaction_timeout: Duration::from_secs(10),
        pipelined: true,
    };
    let processor = std::sync::Arc::new(Copy { out: out.clone(), calls: Mutex::new(Vec::new()) });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stage = tokio::spawn({
        let (kafka, processor, shutdown) = (env.config.kafka.clone(), processor.clone(), shutdown.clone());
        async move { eos::run(&kafka, &settings, processor.as_ref(), shutdown).await }
    });

    let consumer = env.committed_reader(&out, "test-read");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} inputs came out", seen.len());
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            *seen.entry(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()).or_default() += 1;
        }
    }
    // Anything produced twice would arrive within a moment of the rest.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await {
            *seen.entry(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()).or_default() += 1;
        }
    }
    shutdown.cancel();
    stage.await.unwrap().expect("the stage stops cleanly");

    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).map(|(id, _)| id.clone()).collect();
    assert!(twice.is_empty(), "inputs that came out twice: {twice:?}");
    assert!(!seen.contains_key("x"), "the aborted batch's bad output never commits");
    let calls = processor.calls.lock().unwrap().clone();
    assert!(calls.len() >= 4, "calls: {}", calls.len());
    let in_flight = &calls[1];
    let again = calls[2..].iter().flatten().filter(|id| in_flight.contains(id)).count();
    assert_eq!(again, in_flight.len(), "the batch in flight when the first one aborted is read again whole");
    assert!(calls[2..].iter().flatten().any(|id| calls[0].contains(id)), "the aborted batch is read again");
}
