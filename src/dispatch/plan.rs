//! What to do after a provider answered: the dispatcher's pure decision table, including
//! retry levels with increasing delays, Retry-After, jitter, and the last attempt.

use std::time::Duration;

use crate::providers::Classification;

/// The dispatcher's next step for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Accepted by the provider.
    Sent { message_id: String },
    /// Dead address: deactivate it, no retry.
    Deactivate { reason: String },
    /// Try again from retry level `level` (1-based) after `delay`.
    Retry { level: usize, delay: Duration, reason: String },
    /// Out of retries: dead-letter and alert.
    DeadLetter { reason: String },
    /// Retrying cannot help.
    Fail { reason: String },
}

/// Decides the next step for a delivery at `attempt` (0 = first try) given the retry
/// levels' delays. Throttling waits at least the provider's Retry-After; `jitter` in [0, 1)
/// spreads retries by ± that fraction of the level's delay (never below Retry-After).
pub fn next(c: &Classification, attempt: i32, levels: &[Duration], jitter_sample: f64) -> Next {
    let retry = |retry_after: Option<Duration>, reason: &str| {
        let level = attempt.max(0) as usize + 1;
        match levels.get(level - 1) {
            None => Next::DeadLetter { reason: format!("gave up after {level} attempts: {reason}") },
            Some(base) => {
                let spread = base.as_secs_f64() * jitter_sample.clamp(-1.0, 1.0);
                let jittered = Duration::from_secs_f64((base.as_secs_f64() + spread).max(0.0));
                let delay = jittered.max(retry_after.unwrap_or_default());
                Next::Retry { level, delay, reason: reason.to_string() }
            }
        }
    };
    match c {
        Classification::Sent { message_id } => Next::Sent { message_id: message_id.clone() },
        Classification::InvalidAddress { reason } => Next::Deactivate { reason: reason.clone() },
        Classification::Throttled { retry_after, reason } => retry(*retry_after, reason),
        Classification::Transient { reason } => retry(None, reason),
        Classification::Permanent { reason } | Classification::Reauth { reason } => Next::Fail { reason: reason.clone() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEVELS: [Duration; 3] = [Duration::from_secs(10), Duration::from_secs(60), Duration::from_secs(600)];

    fn transient() -> Classification {
        Classification::Transient { reason: "503".into() }
    }

    #[test]
    fn retries_climb_the_levels_then_dead_letter() {
        assert!(matches!(next(&transient(), 0, &LEVELS, 0.0), Next::Retry { level: 1, delay, .. } if delay == Duration::from_secs(10)));
        assert!(matches!(next(&transient(), 1, &LEVELS, 0.0), Next::Retry { level: 2, delay, .. } if delay == Duration::from_secs(60)));
        assert!(matches!(next(&transient(), 2, &LEVELS, 0.0), Next::Retry { level: 3, delay, .. } if delay == Duration::from_secs(600)));
        assert!(matches!(next(&transient(), 3, &LEVELS, 0.0), Next::DeadLetter { .. }));
    }

    #[test]
    fn jitter_spreads_and_retry_after_is_a_floor() {
        let Next::Retry { delay, .. } = next(&transient(), 0, &LEVELS, 0.2) else { panic!() };
        assert_eq!(delay, Duration::from_secs(12));
        let Next::Retry { delay, .. } = next(&transient(), 0, &LEVELS, -0.2) else { panic!() };
        assert_eq!(delay, Duration::from_secs(8));
        let throttled = Classification::Throttled { retry_after: Some(Duration::from_secs(45)), reason: "429".into() };
        let Next::Retry { delay, .. } = next(&throttled, 0, &LEVELS, -0.2) else { panic!() };
        assert_eq!(delay, Duration::from_secs(45), "Retry-After wins over a shorter level");
    }

    #[test]
    fn verdicts_do_not_retry() {
        assert!(matches!(next(&Classification::InvalidAddress { reason: "Unregistered".into() }, 0, &LEVELS, 0.0), Next::Deactivate { .. }));
        assert!(matches!(next(&Classification::Permanent { reason: "BadTopic".into() }, 0, &LEVELS, 0.0), Next::Fail { .. }));
        assert!(matches!(next(&Classification::Reauth { reason: "expired".into() }, 0, &LEVELS, 0.0), Next::Fail { .. }));
        assert_eq!(next(&Classification::Sent { message_id: "m".into() }, 2, &LEVELS, 0.0), Next::Sent { message_id: "m".into() });
    }
}
