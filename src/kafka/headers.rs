//! The Kafka headers herald writes and reads, and the one format of a record's position in
//! them. topology/topics.toml and README's "Dead letters" state the same contract.
//!
//! A dead-lettered record keeps the original's key, bytes and headers and gains two headers,
//! both UTF-8 text:
//!
//! - `herald-dlq-reason`: `<code>: <detail>`, `<code>` one of the outcome statuses of a
//!   dead letter (`rejected`, `template_error`, `dead_lettered`, …).
//! - `herald-dlq-source`: the [`Position`] it was consumed at, `topic:partition:offset`
//!   (`herald.delivery.email:3:1187`). Kafka topic names never contain `:`.

use std::fmt;
use std::str::FromStr;

use rdkafka::message::Message;

/// Why a record was dead-lettered (`<code>: <detail>`).
pub const DLQ_REASON: &str = "herald-dlq-reason";
/// Where a dead-lettered record was consumed: a [`Position`].
pub const DLQ_SOURCE: &str = "herald-dlq-source";
/// On a replayed copy: the [`Position`] of the record it copies (the DLQ's source, or the
/// replayed topic's own record).
pub const REPLAY_OF: &str = "herald-replay-of";
/// On a delay-topic record: when it is due (epoch milliseconds, decimal).
pub const DUE_AT: &str = "herald-due-at";

/// A record's place in Kafka, written `topic:partition:offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Position {
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Position {
        Position { topic: topic.into(), partition, offset }
    }

    /// Where `msg` was consumed.
    pub fn of<M: Message>(msg: &M) -> Position {
        Position::new(msg.topic(), msg.partition(), msg.offset())
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// Why a header value is not a [`Position`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not topic:partition:offset: {0:?}")]
pub struct BadPosition(pub String);

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Position, BadPosition> {
        let bad = || BadPosition(s.to_string());
        let mut parts = s.rsplitn(3, ':');
        let offset = parts.next().and_then(|o| o.parse::<i64>().ok()).filter(|o| *o >= 0).ok_or_else(bad)?;
        let partition = parts.next().and_then(|p| p.parse::<i32>().ok()).filter(|p| *p >= 0).ok_or_else(bad)?;
        let topic = parts.next().filter(|t| !t.is_empty() && !t.contains(':')).ok_or_else(bad)?;
        Ok(Position::new(topic, partition, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let p = Position::new("herald.delivery.email", 3, 1187);
        assert_eq!(p.to_string(), "herald.delivery.email:3:1187");
        assert_eq!("herald.delivery.email:3:1187".parse::<Position>(), Ok(p));
        for bad in ["", "t", "t:1", ":1:2", "t:x:2", "t:1:-2", "a:b:1:2", "t:1:2 "] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }
}
