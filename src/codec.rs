//! Avro encoding and decoding of herald's records in the Confluent wire format
//! (magic byte, 4-byte schema id, Avro body), with schemas fetched from the registry.
//!
//! Decoding resolves the writer's schema against herald's own reader schema, so older and
//! newer producers both decode (defaults fill new fields). Errors say whether the record
//! is poison (never decodable: bad bytes, unknown schema id, missing fields) or the
//! registry is merely unavailable (retry).

use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{from_value, Schema};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::RegistryConfig;
use crate::error::Classify;
use crate::schemas::{self, SchemaError};

/// Errors at the serialisation boundary.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes can never be decoded into this record (dead-letter them).
    #[error("undecodable record: {0}")]
    Poison(String),
    /// The registry could not be asked; the same bytes may decode later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// Encoding our own value failed (a bug or a schema not registered).
    #[error("cannot encode for topic {topic}: {detail}")]
    Encode { topic: String, detail: String },
}

impl Classify for CodecError {
    fn is_retryable(&self) -> bool {
        matches!(self, CodecError::Unavailable(_))
    }
}

/// Encoder + decoder pair sharing one registry configuration; cheap to share via `Arc`.
pub struct Codec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Per topic: the schema id and a writer for its latest value schema, built once.
    writers: std::sync::RwLock<std::collections::HashMap<String, Arc<TopicWriter>>>,
    /// Per writer schema id and reader name: a reader straight from the bytes
    /// when the two schemas are one.
    readers: std::sync::RwLock<std::collections::HashMap<u32, Vec<(Option<apache_avro::schema::Name>, Option<Arc<GenericDatumReader<'static>>>)>>>,
}

/// A topic's value schema, ready to write: its registry id and a datum writer over it.
struct TopicWriter {
    id: u32,
    writer: GenericDatumWriter<'static>,
}

impl Codec {
    pub fn new(cfg: &RegistryConfig) -> Result<Codec, SchemaError> {
        Ok(Codec {
            encoder: AvroEncoder::new(schemas::sr_settings(cfg)?),
            decoder: AvroDecoder::new(schemas::sr_settings(cfg)?),
            writers: Default::default(),
            readers: Default::default(),
        })
    }

    /// Encodes `value` with the latest schema of subject `<topic>-value`.
    ///
    /// The schema is fetched once per topic (as the converter's own cache does) and its
    /// writer kept: a record is then one buffer, the 5-byte Confluent header followed by the
    /// Avro body, serialised in place (the converter's `encode_struct` re-resolves the schema,
    /// takes a map entry lock and copies the body behind the header on every call).
    pub async fn encode<T: Serialize>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let cached = self.writers.read().unwrap_or_else(|e| e.into_inner()).get(topic).cloned();
        let w = match cached {
            Some(w) => w,
            None => self.writer(topic).await?,
        };
        let mut buf = Vec::with_capacity(256);
        buf.push(0);
        buf.extend_from_slice(&w.id.to_be_bytes());
        w.writer.write_ser(&mut buf, value).map_err(|e| CodecError::Encode { topic: topic.to_string(), detail: e.to_string() })?;
        Ok(buf)
    }

    /// The topic's writer, from the registry (the latest schema of `<topic>-value`).
    async fn writer(&self, topic: &str) -> Result<Arc<TopicWriter>, CodecError> {
        let err = |e: schema_registry_converter::error::SRCError| {
            if e.retriable {
                CodecError::Unavailable(e.to_string())
            } else {
                CodecError::Encode { topic: topic.to_string(), detail: e.to_string() }
            }
        };
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
        let subject = strategy.get_subject().map_err(err)?;
        let schema = self.encoder.get_schema_and_id(&subject, strategy).await.map_err(err)?;
        let mut writers = self.writers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = writers.get(topic) {
            return Ok(w.clone());
        }
        // Once per topic and process (the writer borrows its schema for as long as it lives).
        let parsed: &'static Schema = Box::leak(Box::new(schema.parsed.clone()));
        let writer =
            GenericDatumWriter::builder(parsed).build().map_err(|e| CodecError::Encode { topic: topic.to_string(), detail: e.to_string() })?;
        let w = Arc::new(TopicWriter { id: schema.id, writer });
        writers.insert(topic.to_string(), w.clone());
        Ok(w)
    }

    /// Encodes a generic Avro value with the latest schema of `<topic>-value`.
    pub async fn encode_value(&self, topic: &str, value: apache_avro::types::Value) -> Result<Vec<u8>, CodecError> {
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
        self.encoder.encode_value(value, &strategy).await.map_err(|e| CodecError::Encode { topic: topic.to_string(), detail: e.to_string() })
    }

    /// Decodes Confluent-framed bytes with the writer's schema only (upstream events whose
    /// shape herald does not own; fields are then read by path).
    pub async fn decode_value(&self, bytes: Option<&[u8]>) -> Result<apache_avro::types::Value, CodecError> {
        let bytes = framed(bytes)?;
        self.decoder.decode(Some(bytes)).await.map(|d| d.value).map_err(decode_err)
    }

    /// Decodes Confluent-framed bytes into `T`, resolving against `reader` (herald's schema).
    pub async fn decode<T: DeserializeOwned>(&self, bytes: Option<&[u8]>, reader: &Schema) -> Result<T, CodecError> {
        let bytes = framed(bytes)?;
        // The writer's schema is herald's own (the usual case): deserialise straight from the
        // bytes. Otherwise resolve writer against reader through an Avro value.
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        if let Some(direct) = self.direct_reader(id, reader).await? {
            return direct.read_deser::<T>(&mut &bytes[5..]).map_err(|e| CodecError::Poison(format!("does not fit {}: {e}", name_of(reader))));
        }
        let decoded = self.decoder.decode(Some(bytes)).await.map_err(decode_err)?;
        let resolved = decoded.value.resolve(reader).map_err(|e| CodecError::Poison(format!("does not match {}: {e}", name_of(reader))))?;
        from_value::<T>(&resolved).map_err(|e| CodecError::Poison(format!("does not fit {}: {e}", name_of(reader))))
    }
}

/// The bytes, if they look like the Confluent wire format (magic 0 + 4-byte schema id).
fn framed(bytes: Option<&[u8]>) -> Result<&[u8], CodecError> {
    match bytes {
        None | Some([]) => Err(CodecError::Poison("empty payload".into())),
        Some(b) if b[0] != 0 || b.len() < 5 => Err(CodecError::Poison("not Confluent-framed Avro (no magic byte 0 + schema id)".into())),
        Some(b) => Ok(b),
    }
}

fn decode_err(e: schema_registry_converter::error::SRCError) -> CodecError {
    if e.retriable {
        CodecError::Unavailable(e.to_string())
    } else {
        CodecError::Poison(e.to_string())
    }
}

impl Codec {
    /// A reader for schema `id` when it is `reader` itself (same canonical form), built once
    /// per (id, reader's name); `None` when the writer's schema differs and must be resolved.
    /// herald has one reader schema per record name (`schemas::schema`).
    async fn direct_reader(&self, id: u32, reader: &Schema) -> Result<Option<Arc<GenericDatumReader<'static>>>, CodecError> {
        let name = reader.name();
        if let Some(known) = self.readers.read().unwrap_or_else(|e| e.into_inner()).get(&id).and_then(|v| v.iter().find(|(n, _)| n.as_ref() == name))
        {
            return Ok(known.1.clone());
        }
        let writer = self.decoder.get_schema(id).await.map_err(decode_err)?;
        let direct = if writer.parsed.canonical_form() == reader.canonical_form() {
            // Once per schema id and process (the reader borrows its schema while it lives).
            let parsed: &'static Schema = Box::leak(Box::new(writer.parsed.clone()));
            let r = GenericDatumReader::builder(parsed).build().map_err(|e| CodecError::Poison(format!("schema {id}: {e}")))?;
            Some(Arc::new(r))
        } else {
            None
        };
        self.readers.write().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().push((name.cloned(), direct.clone()));
        Ok(direct)
    }
}

fn name_of(s: &Schema) -> String {
    s.name().map(|n| n.fullname(None)).unwrap_or_else(|| "schema".into())
}

#[cfg(test)]
#[allow(deprecated)] // the datum helpers are the shortest way to round-trip in a test
mod tests {
    use std::collections::HashMap;

    use apache_avro::{from_avro_datum, to_avro_datum, to_value};

    use crate::model::*;
    use crate::schemas::schema;

    fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(record: &str, value: &T) {
        let s = schema(record).unwrap();
        let v = to_value(value).unwrap().resolve(&s).unwrap();
        let bytes = to_avro_datum(&s, v).unwrap();
        let back = from_avro_datum(&s, &mut &bytes[..], None).unwrap();
        let back: T = apache_avro::from_value(&back).unwrap();
        assert_eq!(&back, value);
    }

    #[test]
    fn model_types_match_their_schemas() {
        roundtrip(
            "NotificationRequested",
            &NotificationRequested {
                event_id: "e1".into(),
                occurred_at: 1_700_000_000_123,
                source: "billing".into(),
                user_id: "u1".into(),
                category: "billing".into(),
                template_id: "bill_due".into(),
                params: HashMap::from([("amount".into(), "12.30".into())]),
                channels: Some(vec!["email".into(), "push".into()]),
                priority: Priority::High,
                locale: None,
                expires_at: Some(1_700_000_600_000),
            },
        );
        roundtrip(
            "ChannelDelivery",
            &ChannelDelivery {
                delivery_id: delivery_id("e1", "sms", "+15550001"),
                event_id: "e1".into(),
                user_id: "u1".into(),
                category: "security".into(),
                template_id: "login_code".into(),
                channel: "sms".into(),
                address: "+15550001".into(),
                device_id: None,
                locale: "en".into(),
                priority: Priority::Low,
                content: RenderedContent {
                    body: Some("Your code is 123456".into()),
                    sms_encoding: Some("GSM-7".into()),
                    sms_segments: Some(1),
                    ..Default::default()
                },
                attempt: 2,
                not_before: Some(5),
                deadline: 1_700_000_600_000,
                created_at: 1_700_000_000_000,
                last_error: Some("503".into()),
                last_provider: Some("twilio".into()),
            },
        );
        roundtrip(
            "DeliveryOutcome",
            &DeliveryOutcome {
                outcome_id: "o1".into(),
                event_id: "e1".into(),
                delivery_id: None,
                user_id: Some("u1".into()),
                category: None,
                channel: Some("sms".into()),
                provider: Some("twilio".into()),
                status: "sent".into(),
                reason: None,
                provider_message_id: Some("SM123".into()),
                attempt: 0,
                latency_ms: Some(42),
                occurred_at: 1_700_000_000_000,
                requested_at: None,
            },
        );
    }

    #[test]
    fn an_old_writer_without_optional_fields_still_decodes() {
        // A producer on a schema that lacked `locale` and `expires_at`.
        let old = apache_avro::Schema::parse_str(
            r#"{"type":"record","name":"NotificationRequested","namespace":"io.herald.v1","fields":[
            {"name":"event_id","type":"string"},{"name":"occurred_at","type":"long"},
            {"name":"source","type":"string"},{"name":"user_id","type":"string"},
            {"name":"category","type":"string"},{"name":"template_id","type":"string"}]}"#,
        )
        .unwrap();
        let mut rec = apache_avro::types::Record::new(&old).unwrap();
        for (k, v) in [("event_id", "e"), ("source", "s"), ("user_id", "u"), ("category", "c"), ("template_id", "t")] {
            rec.put(k, v);
        }
        rec.put("occurred_at", 7i64);
        let bytes = to_avro_datum(&old, rec).unwrap();
        let reader = schema("NotificationRequested").unwrap();
        let v = from_avro_datum(&old, &mut &bytes[..], Some(&reader)).unwrap();
        let n: NotificationRequested = apache_avro::from_value(&v).unwrap();
        assert_eq!(n.priority, Priority::Normal);
        assert!(n.params.is_empty() && n.channels.is_none() && n.expires_at.is_none());
    }
}
