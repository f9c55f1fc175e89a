//! The event queue: device-writable buffers the driver keeps posted, filled with event
//! records as the card raises them.

use std::io;

use vdaq_wire::event::{fault, EVENT_SIZE};
use vdaq_wire::zerocopy::IntoBytes;
use vhost_user_backend::VringRwLock;
use vm_memory::GuestAddressSpace;

use super::chain::{validate_chain, write_segments, ChainError, Segment};
use super::DaqBackend;

/// A device-writable buffer posted on the event queue.
#[derive(Debug)]
pub(super) struct EventSlot {
    pub(super) head: u16,
    pub(super) writable: Vec<Segment>,
}

impl DaqBackend {
    pub(super) fn process_event_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        self.drain_available(vring, "event", false, |this, chain, mem| {
            let head = chain.head_index();
            if this.event_slots.iter().any(|slot| slot.head == head) {
                this.errors.report("event", ChainError::AlreadyHeld);
                this.needs_reset(fault::QUEUE_CORRUPT);
                return;
            }
            match validate_chain(chain, mem) {
                Ok(layout)
                    if layout.readable.is_empty() && layout.writable_bytes() >= EVENT_SIZE =>
                {
                    this.event_slots.push_back(EventSlot {
                        head,
                        writable: layout.writable,
                    });
                }
                Ok(_) => this.reject_event_buffer(vring, head, ChainError::TooShort),
                Err(err) => this.reject_event_buffer(vring, head, err),
            }
        })
    }

    pub(super) fn reject_event_buffer(&mut self, vring: &VringRwLock, head: u16, err: ChainError) {
        self.errors.report("event", err);
        self.card.count_rejected();
        self.put_used(vring, "event", head, 0);
        self.signal(vring);
    }

    /// Moves pending events into posted event buffers.
    pub(super) fn deliver_events(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let mut delivered = false;
        while self.card.has_events() && !self.event_slots.is_empty() {
            let (Some(slot), Some(event)) = (self.event_slots.pop_front(), self.card.pop_event())
            else {
                break;
            };
            let used_len = match write_segments(&mem, &slot.writable, 0, event.as_bytes()) {
                Ok(()) => EVENT_SIZE as u32,
                Err(err) => {
                    self.errors.report("event", err);
                    self.card.count_event_lost();
                    0
                }
            };
            self.put_used(vring, "event", slot.head, used_len);
            delivered = true;
        }
        if delivered {
            self.signal(vring);
        }
    }
}
