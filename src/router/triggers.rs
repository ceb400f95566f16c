//! Turns an upstream domain event (any Avro record, e.g. `orders.shipped`) into a
//! NotificationRequested by configured field paths, so services need no herald-specific code.

use std::collections::HashMap;

use apache_avro::types::Value;

use crate::config::TriggerConfig;
use crate::model::{NotificationRequested, Priority};

/// The value at a dotted path (`customer.id`) of a record, through nullable unions.
pub fn field<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let mut v = value;
    for part in path.split('.') {
        v = unwrap_union(v);
        let Value::Record(fields) = v else { return None };
        v = &fields.iter().find(|(name, _)| name == part)?.1;
    }
    Some(unwrap_union(v))
}

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// A scalar as template text; `None` for null, records, arrays and bytes.
pub fn scalar(v: &Value) -> Option<String> {
    Some(match v {
        Value::String(s) | Value::Enum(_, s) => s.clone(),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => i.to_string(),
        Value::Long(l) | Value::TimestampMillis(l) | Value::TimestampMicros(l) | Value::TimeMicros(l) => l.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Uuid(u) => u.to_string(),
        _ => return None,
    })
}

/// Maps `value` (an event from `topic`) with trigger `t`; `Err` says which field is missing.
pub fn map(t: &TriggerConfig, topic: &str, value: &Value, occurred_at: i64) -> Result<NotificationRequested, String> {
    let get = |what: &str, path: &str| {
        field(value, path).and_then(scalar).ok_or_else(|| format!("trigger {topic}: {what} field '{path}' missing or not a scalar"))
    };
    let mut params = HashMap::new();
    for (name, path) in &t.params {
        params.insert(name.clone(), get(&format!("param {name}"), path)?);
    }
    Ok(NotificationRequested {
        event_id: format!("{topic}:{}", get("event id", &t.event_id)?),
        occurred_at,
        source: topic.to_string(),
        user_id: get("user id", &t.user_id)?,
        category: t.category.clone(),
        template_id: t.template.clone(),
        params,
        channels: (!t.channels.is_empty()).then(|| t.channels.clone()),
        priority: Priority::Normal,
        locale: None,
        expires_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Value {
        Value::Record(vec![
            ("order_id".into(), Value::String("o-1".into())),
            ("customer".into(), Value::Record(vec![("id".into(), Value::String("u-9".into()))])),
            ("total_cents".into(), Value::Long(1299)),
            ("carrier".into(), Value::Union(1, Box::new(Value::String("DHL".into())))),
            ("note".into(), Value::Union(0, Box::new(Value::Null))),
        ])
    }

    fn trigger() -> TriggerConfig {
        TriggerConfig {
            topic: "upstream.orders_shipped".into(),
            category: "shipping".into(),
            template: "order_shipped".into(),
            user_id: "customer.id".into(),
            event_id: "order_id".into(),
            params: [
                ("order".to_string(), "order_id".to_string()),
                ("carrier".to_string(), "carrier".to_string()),
                ("total".to_string(), "total_cents".to_string()),
            ]
            .into_iter()
            .collect(),
            channels: vec![],
        }
    }

    #[test]
    fn maps_paths_through_nested_records_and_unions() {
        let r = map(&trigger(), "orders.shipped", &order(), 5).unwrap();
        assert_eq!(r.event_id, "orders.shipped:o-1");
        assert_eq!(r.user_id, "u-9");
        assert_eq!(r.params["carrier"], "DHL");
        assert_eq!(r.params["total"], "1299");
        assert_eq!((r.category.as_str(), r.template_id.as_str(), r.occurred_at), ("shipping", "order_shipped", 5));
        assert!(r.channels.is_none());
    }

    #[test]
    fn a_missing_or_null_field_names_itself() {
        let mut t = trigger();
        t.params.insert("note".into(), "note".into());
        let e = map(&t, "orders.shipped", &order(), 5).unwrap_err();
        assert!(e.contains("'note'"), "{e}");
        let mut t = trigger();
        t.user_id = "buyer.id".into();
        assert!(map(&t, "orders.shipped", &order(), 5).unwrap_err().contains("buyer.id"));
    }
}
