//! What to do after a provider answered: the dispatcher's pure decision table, including
//! failover to the route's next provider, retry levels with increasing delays,
//! Retry-After, jitter, and the last attempt.

use std::time::Duration;

use crate::providers::{Classification, Provider};

/// The dispatcher's next step for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Accepted by the provider.
    Sent { message_id: String },
    /// Dead address: deactivate it, no retry.
    Deactivate { reason: String },
    /// Try again now at provider `to` (the route's next one, whose circuit is closed).
    Failover { to: Provider, reason: String },
    /// Try again from retry level `level` (1-based) after `delay`.
    Retry { level: usize, delay: Duration, reason: String },
    /// Out of attempts: dead-letter and alert.
    DeadLetter { reason: String },
    /// Retrying cannot help.
    Fail { reason: String },
}

/// Decides the next step for a delivery at `attempt` (0 = first try) given the retry
/// levels' delays. A transient failure, a throttle or refused credentials retry: at once at
/// `failover` (another provider of the route whose circuit is closed, offered by the
/// dispatcher while the delivery has not been through every provider yet), else on the
/// next retry level. Throttling waits at least the provider's Retry-After; `jitter` in
/// [-1, 1] spreads a level's delay by that fraction (never below Retry-After). There are
/// `levels.len() + 1` attempts in all.
pub fn next(c: &Classification, attempt: i32, levels: &[Duration], jitter_sample: f64, failover: Option<Provider>) -> Next {
    let again = |retry_after: Option<Duration>, reason: &str| {
        let level = attempt.max(0) as usize + 1;
        let Some(base) = levels.get(level - 1) else {
            return Next::DeadLetter { reason: format!("gave up after {level} attempts: {reason}") };
        };
        if let Some(to) = failover {
            return Next::Failover { to, reason: reason.to_string() };
        }
        let spread = base.as_secs_f64() * jitter_sample.clamp(-1.0, 1.0);
        let jittered = Duration::from_secs_f64((base.as_secs_f64() + spread).max(0.0));
        let delay = jittered.max(retry_after.unwrap_or_default());
        Next::Retry { level, delay, reason: reason.to_string() }
    };
    match c {
        Classification::Sent { message_id } => Next::Sent { message_id: message_id.clone() },
        Classification::InvalidAddress { reason } => Next::Deactivate { reason: reason.clone() },
        Classification::Throttled { retry_after, reason } => again(*retry_after, reason),
        // A credential still refused after its refresh is as bad as a refused one.
        Classification::Transient { reason } | Classification::AuthFailed { reason } | Classification::Reauth { reason } => again(None, reason),
        Classification::Permanent { reason } => Next::Fail { reason: reason.clone() },
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
        assert!(matches!(next(&transient(), 0, &LEVELS, 0.0, None), Next::Retry { level: 1, delay, .. } if delay == Duration::from_secs(10)));
        assert!(matches!(next(&transient(), 1, &LEVELS, 0.0, None), Next::Retry { level: 2, delay, .. } if delay == Duration::from_secs(60)));
        assert!(matches!(next(&transient(), 2, &LEVELS, 0.0, None), Next::Retry { level: 3, delay, .. } if delay == Duration::from_secs(600)));
        assert!(matches!(next(&transient(), 3, &LEVELS, 0.0, None), Next::DeadLetter { .. }));
    }

    #[test]
    fn jitter_spreads_and_retry_after_is_a_floor() {
        let Next::Retry { delay, .. } = next(&transient(), 0, &LEVELS, 0.2, None) else { panic!() };
        assert_eq!(delay, Duration::from_secs(12));
        let Next::Retry { delay, .. } = next(&transient(), 0, &LEVELS, -0.2, None) else { panic!() };
        assert_eq!(delay, Duration::from_secs(8));
        let throttled = Classification::Throttled { retry_after: Some(Duration::from_secs(45)), reason: "429".into() };
        let Next::Retry { delay, .. } = next(&throttled, 0, &LEVELS, -0.2, None) else { panic!() };
        assert_eq!(delay, Duration::from_secs(45), "Retry-After wins over a shorter level");
    }

    #[test]
    fn failures_fail_over_at_once_while_attempts_remain() {
        let v = Some(Provider::Vonage);
        assert_eq!(next(&transient(), 0, &LEVELS, 0.0, v), Next::Failover { to: Provider::Vonage, reason: "503".into() });
        let throttled = Classification::Throttled { retry_after: Some(Duration::from_secs(45)), reason: "429".into() };
        assert!(matches!(next(&throttled, 0, &LEVELS, 0.0, v), Next::Failover { .. }), "Retry-After is the throttled provider's, not the next one's");
        let refused = Classification::AuthFailed { reason: "Twilio 401 20003".into() };
        assert!(matches!(next(&refused, 0, &LEVELS, 0.0, v), Next::Failover { .. }));
        assert!(
            matches!(next(&refused, 0, &LEVELS, 0.0, None), Next::Retry { level: 1, .. }),
            "refused credentials may be fixed: retried, not failed"
        );
        assert!(matches!(next(&transient(), 3, &LEVELS, 0.0, v), Next::DeadLetter { .. }), "no attempts left");
        assert!(matches!(next(&transient(), 0, &[], 0.0, v), Next::DeadLetter { .. }), "no retry levels: one attempt");
    }

    #[test]
    fn verdicts_do_not_retry() {
        let v = Some(Provider::Vonage);
        assert!(matches!(next(&Classification::InvalidAddress { reason: "Unregistered".into() }, 0, &LEVELS, 0.0, v), Next::Deactivate { .. }));
        assert!(matches!(next(&Classification::Permanent { reason: "BadTopic".into() }, 0, &LEVELS, 0.0, v), Next::Fail { .. }));
        assert_eq!(next(&Classification::Sent { message_id: "m".into() }, 2, &LEVELS, 0.0, v), Next::Sent { message_id: "m".into() });
    }
}
