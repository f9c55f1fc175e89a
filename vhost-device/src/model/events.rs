//! The event backlog (OVERRUN, TRIGGER, FAULT, NEEDS_RESET records waiting for an
//! event-queue buffer) and entering NEEDS_RESET.

use log::warn;
use vdaq_wire::event::{kind, Event, EVENT_BACKLOG};
use vdaq_wire::DeviceState;

use super::{Card, ReadBuffer};

impl<B: ReadBuffer> Card<B> {
    /// Counts an event that could not be delivered.
    pub fn count_event_lost(&mut self) {
        self.live.counters.events_lost += 1;
    }

    /// Next pending event, oldest first.
    pub fn pop_event(&mut self) -> Option<Event> {
        self.live.events.pop_front()
    }

    /// Whether events wait for an event-queue buffer.
    pub fn has_events(&self) -> bool {
        !self.live.events.is_empty()
    }

    pub(super) fn push_event(&mut self, event_kind: u32, now_ns: u64, arg0: u64, arg1: u64) {
        if self.live.events.len() >= EVENT_BACKLOG {
            self.live.counters.events_lost += 1;
            return;
        }
        self.live.events.push_back(Event {
            kind: event_kind.into(),
            reserved: 0.into(),
            timestamp_ns: now_ns.into(),
            arg0: arg0.into(),
            arg1: arg1.into(),
        });
    }

    /// Enters NEEDS_RESET: the device stops and completes nothing until it is reset.
    pub fn enter_needs_reset(&mut self, fault_code: u32, now_ns: u64) {
        if self.live.state == DeviceState::NeedsReset {
            return;
        }
        warn!("device enters NEEDS_RESET (fault code {fault_code})");
        self.live.state = DeviceState::NeedsReset;
        self.live.fault_code = fault_code;
        self.push_event(kind::NEEDS_RESET, now_ns, u64::from(fault_code), 0);
    }
}
