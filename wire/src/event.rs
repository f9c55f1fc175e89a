//! Event queue: the driver posts device-writable buffers of at least [`EVENT_SIZE`] bytes; the
//! device writes one [`Event`] into each.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of one event in bytes.
pub const EVENT_SIZE: usize = 32;

/// How many raised events the device keeps until they are written into event-queue buffers;
/// a further one is lost and counted in `events_lost`.
pub const EVENT_BACKLOG: usize = 64;

/// While an overrun lasts the device reports it at this interval (device-clock ns): the frames
/// lost so far, then the rest at its end.
pub const OVERRUN_REPORT_INTERVAL_NS: u64 = 100_000_000;

/// Event types.
pub mod kind {
    /// Frames were lost to overrun. `arg0` = frames lost, `arg1` = stream index of the first.
    pub const OVERRUN: u32 = 1;
    /// A trigger fired. `arg0` = stream index of the trigger frame, `arg1` = buffer sequence.
    pub const TRIGGER: u32 = 2;
    /// A device fault. `arg0` = fault code (see [`super::fault`]), `arg1` = detail.
    pub const FAULT: u32 = 3;
    /// The device entered NEEDS_RESET. `arg0` = fault code.
    pub const NEEDS_RESET: u32 = 4;
}

/// Fault codes carried by FAULT and NEEDS_RESET events and the config space's `fault_code`.
pub mod fault {
    /// The driver broke a virtqueue invariant (e.g. avail index moved by more than the size).
    pub const QUEUE_CORRUPT: u32 = 1;
    /// The device's firmware model raised a fault (scripted).
    pub const FIRMWARE: u32 = 2;
}

/// One event.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Event {
    /// One of [`kind`].
    pub kind: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Device clock (ns) when the event happened.
    pub timestamp_ns: U64,
    /// First argument, per kind.
    pub arg0: U64,
    /// Second argument, per kind.
    pub arg1: U64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn event_layout_matches_spec() {
        assert_eq!(size_of::<Event>(), EVENT_SIZE);
        assert_eq!(offset_of!(Event, kind), 0);
        assert_eq!(offset_of!(Event, timestamp_ns), 8);
        assert_eq!(offset_of!(Event, arg0), 16);
        assert_eq!(offset_of!(Event, arg1), 24);
    }
}
