//! The retryable-versus-permanent contract every boundary error implements.
//!
//! Each boundary owns one error enum: [`crate::kafka::BusError`] (Kafka),
//! [`crate::store::StoreError`] (Scylla/Cassandra), [`crate::codec::CodecError`]
//! (Avro + registry), [`crate::schemas::SchemaError`] (registration) and
//! [`crate::topology::TopologyError`]. Callers decide between "try again later" and
//! "give up / dead-letter" through [`Classify`], never by matching on message text.

/// Whether trying the same operation again may succeed.
pub trait Classify {
    /// `true` when the failure is transient (a timeout, an unreachable peer, a 5xx);
    /// `false` when retrying the same input can never succeed (bad bytes, a missing field).
    fn is_retryable(&self) -> bool;
}
