//! Guest errors reported without letting a guest flood the log.

use log::{debug, warn};

/// Logs each kind of guest error once at warning level, then at debug level, so a hostile or
/// broken guest cannot flood the log.
#[derive(Debug, Default)]
pub(super) struct GuestErrorLog {
    seen: std::collections::HashSet<String>,
}

/// Distinct guest-error messages logged at warning level per connection: messages can carry
/// guest-chosen values, so the set is bounded; past it everything goes to debug level.
pub(super) const MAX_WARNED_GUEST_ERRORS: usize = 64;

impl GuestErrorLog {
    pub(super) fn report(&mut self, queue_name: &str, what: impl std::fmt::Display) {
        let message = format!("{queue_name} queue: {what}");
        if self.seen.len() < MAX_WARNED_GUEST_ERRORS && self.seen.insert(message.clone()) {
            warn!("{message} (further reports of this kind at debug level)");
        } else {
            debug!("{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_grow_the_error_log_past_its_bound() {
        let mut log = GuestErrorLog::default();
        for value in 0..10_000 {
            // Guest-chosen values make every message distinct.
            log.report(
                "data",
                format_args!("descriptor at {value:#x} outside memory"),
            );
        }
        assert_eq!(log.seen.len(), MAX_WARNED_GUEST_ERRORS);
        log.report("data", "descriptor at 0x0 outside memory");
        assert_eq!(
            log.seen.len(),
            MAX_WARNED_GUEST_ERRORS,
            "repeats add nothing"
        );
    }
}
