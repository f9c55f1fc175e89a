//! The ways a device can break the virtio protocol or this specification that a driver
//! detects, named once for every driver and report: a driver treats the device as untrusted,
//! and a run that meets one names it (spec 5.x.7, "the device is untrusted").

/// A protocol violation a driver detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A read's used length exceeds the buffer posted.
    UsedLengthOverBuffer,
    /// A read's used length is non-zero but shorter than the header.
    UsedLengthUnderHeader,
    /// A read's header announces another payload size than its used length covers.
    HeaderLength,
    /// A read's header names another format or channel count than configured.
    HeaderConfiguration,
    /// A read's header is malformed (undefined status, unknown format).
    HeaderMalformed,
    /// A used entry names no descriptor (id ≥ queue size).
    UsedIdOutOfRange,
    /// A used entry names a descriptor that is not in flight (never posted, or already
    /// returned: a buffer completed twice, or a used index that jumped).
    UsedIdNotInFlight,
    /// A read with data completed while an older accepted read was still in flight.
    CompletionOrder,
    /// A used entry the driver's virtio core refused (an id out of range, or one naming no
    /// buffer head: Linux marks the ring broken without saying which to the driver).
    UsedIdRefused,
    /// A command reply shorter than the reply header.
    ReplyShort,
    /// A command reply's used length beyond the reply area.
    ReplyLong,
    /// A command reply with a status code the spec does not define.
    ReplyStatus,
    /// A command the device never answered.
    ReplyMissing,
    /// A control-queue buffer returned while no command waits.
    ReplyUnsolicited,
    /// The configuration space holds impossible values (or not a vdaq card's identity).
    ConfigImpossible,
}

impl Violation {
    /// What happened, for a report's `failure` and logs.
    pub const fn describe(self) -> &'static str {
        match self {
            Violation::UsedLengthOverBuffer => "device violation: used length beyond the buffer",
            Violation::UsedLengthUnderHeader => "device violation: used length under the header",
            Violation::HeaderLength => {
                "device violation: header frame count disagrees with the used length"
            }
            Violation::HeaderConfiguration => {
                "device violation: header format or channels contradict the configuration"
            }
            Violation::HeaderMalformed => "device violation: malformed buffer header",
            Violation::UsedIdOutOfRange => "device violation: used id names no descriptor",
            Violation::UsedIdNotInFlight => {
                "device violation: used id names a buffer not in flight"
            }
            Violation::CompletionOrder => "device violation: read completed out of order",
            Violation::UsedIdRefused => {
                "device violation: used id out of range or naming no buffer (ring broken)"
            }
            Violation::ReplyShort => "device violation: command reply shorter than its header",
            Violation::ReplyLong => "device violation: command reply beyond its area",
            Violation::ReplyStatus => "device violation: command reply with undefined status",
            Violation::ReplyMissing => "device violation: command never answered",
            Violation::ReplyUnsolicited => {
                "device violation: control buffer returned with no command waiting"
            }
            Violation::ConfigImpossible => {
                "device violation: configuration space holds impossible values"
            }
        }
    }

    /// Whether the driver recovers from it by resetting the device (the rings cannot be
    /// trusted, or a command is stuck), rather than failing the run.
    pub const fn resets_device(self) -> bool {
        matches!(
            self,
            Violation::UsedIdOutOfRange
                | Violation::UsedIdNotInFlight
                | Violation::CompletionOrder
                | Violation::UsedIdRefused
                | Violation::ReplyUnsolicited
        )
    }
}

impl Violation {
    /// Every violation, in code order.
    pub const ALL: [Violation; 15] = [
        Violation::UsedLengthOverBuffer,
        Violation::UsedLengthUnderHeader,
        Violation::HeaderLength,
        Violation::HeaderConfiguration,
        Violation::HeaderMalformed,
        Violation::UsedIdOutOfRange,
        Violation::UsedIdNotInFlight,
        Violation::CompletionOrder,
        Violation::UsedIdRefused,
        Violation::ReplyShort,
        Violation::ReplyLong,
        Violation::ReplyStatus,
        Violation::ReplyMissing,
        Violation::ReplyUnsolicited,
        Violation::ConfigImpossible,
    ];

    /// The code a driver reports it by (the Linux driver's `VDAQ_VIOLATION_*`, in
    /// `struct vdaq_stats`): 1 and up, 0 meaning none.
    /// Codes are part of the Linux driver's ABI: never renumbered, new ones appended.
    pub const fn code(self) -> u64 {
        match self {
            Violation::UsedLengthOverBuffer => 1,
            Violation::UsedLengthUnderHeader => 2,
            Violation::HeaderLength => 3,
            Violation::HeaderConfiguration => 4,
            Violation::HeaderMalformed => 5,
            Violation::UsedIdOutOfRange => 6,
            Violation::UsedIdNotInFlight => 7,
            Violation::CompletionOrder => 8,
            Violation::UsedIdRefused => 9,
            Violation::ReplyShort => 10,
            Violation::ReplyLong => 11,
            Violation::ReplyStatus => 12,
            Violation::ReplyMissing => 13,
            Violation::ReplyUnsolicited => 14,
            Violation::ConfigImpossible => 15,
        }
    }

    /// The violation of a code, None for 0 and unknown codes.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::Violation;

    #[test]
    fn codes_round_trip_and_start_at_one() {
        for (i, v) in Violation::ALL.iter().enumerate() {
            assert_eq!(v.code(), i as u64 + 1);
            assert_eq!(Violation::from_code(v.code()), Some(*v));
        }
        assert_eq!(Violation::from_code(0), None);
        assert_eq!(Violation::from_code(16), None);
    }

    #[test]
    fn every_violation_has_its_own_description() {
        let all = Violation::ALL;
        for (i, a) in all.iter().enumerate() {
            assert!(a.describe().starts_with("device violation: "));
            for b in &all[i + 1..] {
                assert_ne!(a.describe(), b.describe(), "{a:?} {b:?}");
            }
        }
    }
}
