//! docker-compose.yml cannot run here (no container engine), so this checks what can be
//! checked: it parses; it has Kafka, ScyllaDB, the registry and herald's roles; every
//! HERALD__ variable it sets is one herald reads; each role's command is a real subcommand;
//! and ports and broker settings agree with scripts/stack.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mut v: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml is valid YAML");
    v.apply_merge().expect("YAML merge keys resolve");
    v
}

fn services(v: &Value) -> &serde_yaml_ng::Mapping {
    v["services"].as_mapping().expect("services")
}

/// Compose interpolation as a deployment would see it: `${X:-default}` takes the default;
/// a required `${X:?…}` or `${X}` takes a well-formed sample value.
fn interpolate(value: &str, name: &str) -> String {
    let Some(start) = value.find("${") else { return value.to_string() };
    let end = value[start..].find('}').map(|e| start + e).unwrap_or(value.len() - 1);
    let inner = &value[start + 2..end];
    let replacement = match inner.split_once(":-") {
        Some((_, default)) => default.to_string(),
        // 32 bytes, base64, for keys; any text otherwise.
        None if name.ends_with("ENCRYPTION_KEY") => "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string(),
        None => "sample".to_string(),
    };
    format!("{}{}{}", &value[..start], replacement, interpolate(&value[end + 1..], name))
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
                    };
                    let k = k.as_str().unwrap().to_string();
                    let v = interpolate(&v, &k);
                    (k, v)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn herald_services(v: &Value) -> Vec<(String, &Value)> {
    services(v)
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("herald")))
        .map(|(k, s)| (k.as_str().unwrap().to_string(), s))
        .collect()
}

#[test]
fn has_the_backing_services_and_herald_roles() {
    let v = compose();
    let s = services(&v);
    for name in [
        "kafka",
        "scylla",
        "registry",
        "herald-setup",
        "herald-router",
        "herald-api",
        "herald-dispatch-apns",
        "herald-dispatch-fcm",
        "herald-dispatch-sms",
        "herald-dispatch-email",
    ] {
        assert!(s.contains_key(name), "service {name} missing");
    }
    assert!(s["kafka"]["image"].as_str().unwrap().starts_with("apache/kafka:4."));
    assert!(s["scylla"]["image"].as_str().unwrap().starts_with("scylladb/scylla"));
    assert!(s["registry"]["image"].as_str().unwrap().starts_with("apicurio/apicurio-registry:3."));
    assert!(!herald_services(&v).is_empty());
}

#[test]
fn every_herald_variable_is_one_herald_reads() {
    let v = compose();
    for (name, svc) in herald_services(&v) {
        let env = env_of(svc);
        for required in ["HERALD__KAFKA__BOOTSTRAP_SERVERS", "HERALD__STORE__CONTACT_POINTS", "HERALD__REGISTRY__URL"] {
            assert!(env.contains_key(required), "{name}: {required} missing");
        }
        // deny_unknown_fields + typed parsing: a misspelt or mistyped variable fails here.
        let config = herald::config::Config::load_from(None, env.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let hosts: Vec<&str> = config.kafka.bootstrap_servers.split(',').collect();
        assert!(hosts.iter().all(|h| services(&v).contains_key(h.split(':').next().unwrap())), "{name}: kafka host is not a service");
        assert!(config.registry.url.starts_with("http://registry:8081/"), "{name}: {}", config.registry.url);
    }
}

#[test]
fn every_role_command_is_a_herald_subcommand() {
    let v = compose();
    for (name, svc) in herald_services(&v) {
        let args: Vec<String> = svc["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: command must be a list"))
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(&args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name}: `herald {}` is not a command: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn ports_and_broker_settings_match_scripts_stack() {
    let stack = std::fs::read_to_string(root().join("scripts/stack")).unwrap();
    for (var, port) in [("HERALD_KAFKA_PORT", "9092"), ("HERALD_CQL_PORT", "9042"), ("HERALD_REGISTRY_PORT", "8081")] {
        assert!(stack.contains(&format!("${{{var}:-{port}}}")), "scripts/stack default of {var} is not {port}");
    }
    let v = compose();
    let s = services(&v);
    let published = |svc: &str| -> Vec<String> { s[svc]["ports"].as_sequence().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect() };
    assert!(published("kafka").contains(&"9092:9092".to_string()));
    assert!(published("scylla").contains(&"9042:9042".to_string()));
    assert!(published("registry").contains(&"8081:8081".to_string()));
    // Broker settings that matter to herald's behaviour must be the same in both places.
    let kafka = env_of(&s["kafka"]);
    let shared = [
        "auto.create.topics.enable",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "group.initial.rebalance.delay.ms",
        "num.partitions",
    ];
    for prop in shared {
        let var = format!("KAFKA_{}", prop.replace('.', "_").to_uppercase());
        let value = kafka.get(&var).unwrap_or_else(|| panic!("compose kafka lacks {var}"));
        assert!(stack.contains(&format!("\n{prop}={value}\n")), "scripts/stack does not set {prop}={value}");
    }
    let registry = env_of(&s["registry"]);
    assert_eq!(registry.get("APICURIO_CCOMPAT_USE_CANONICAL_HASH").map(String::as_str), Some("true"));
    assert!(stack.contains("-Dapicurio.ccompat.use-canonical-hash=true"));
}
