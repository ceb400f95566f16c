//! Outcome events from tracking and webhooks: Avro `DeliveryOutcome` on the outcomes topic
//! (keyed by event id, acknowledged) and rows in the notification log. Outcome ids are
//! derived from the provider's own event identity, so a redelivered webhook rewrites the
//! same log row (analytics dedup by `outcome_id`).

use rdkafka::producer::FutureRecord;
use sha2::{Digest, Sha256};

use super::store::DeliveryRef;
use super::{ApiError, ApiState};
use crate::model::{now_ms, DeliveryOutcome};
use crate::telemetry::events;

/// A deterministic outcome id from the parts that identify one provider event.
pub fn outcome_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The outcome `status` for the delivery `d` leads to.
pub fn outcome(d: &DeliveryRef, id: String, status: &str, provider: Option<&str>, reason: Option<String>) -> Option<DeliveryOutcome> {
    Some(DeliveryOutcome {
        outcome_id: id,
        event_id: d.event_id.clone()?,
        delivery_id: Some(d.delivery_id.clone()),
        user_id: d.user_id.clone(),
        category: d.category.clone(),
        channel: d.channel.clone(),
        provider: provider.map(str::to_string).or_else(|| d.provider.clone()),
        status: status.to_string(),
        reason,
        provider_message_id: d.provider_message_id.clone(),
        attempt: 0,
        latency_ms: None,
        occurred_at: now_ms(),
        requested_at: None,
    })
}

/// Produces the outcomes (waiting for every ack), then writes them to the log.
pub async fn emit(st: &ApiState, outcomes: &[DeliveryOutcome]) -> Result<(), ApiError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let topic = &st.topics.outcomes;
    let mut sends = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        let bytes = st.codec.encode(topic, o).await?;
        sends.push(async move {
            st.producer
                .send(FutureRecord::to(topic).key(o.event_id.as_bytes()).payload(&bytes), std::time::Duration::from_millis(st.cfg.produce_timeout_ms))
                .await
                .map_err(|(e, _)| ApiError::unavailable("produce outcome", &e))
        });
    }
    futures::future::try_join_all(sends).await?;
    events::produced("api", topic, outcomes.len() as u64);
    st.store.log_outcomes(outcomes).await?;
    for o in outcomes {
        events::outcome(o.channel.as_deref().unwrap_or(""), o.provider.as_deref().unwrap_or(""), &o.status);
    }
    Ok(())
}
