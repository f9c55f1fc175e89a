//! The card breaking the virtqueue protocol on purpose (scenario actions and `ctl inject`, see
//! `model/violations.rs`): used lengths over the buffer or under the header, used ids out of
//! range or not in flight, a buffer completed twice, a used index that jumps, interrupt storms
//! and silence. Replies are broken in `control_queue.rs`, where they are written.

use log::warn;
use vdaq_wire::buffer::HEADER_SIZE;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use super::DaqBackend;
use crate::model::violations::ScriptedViolation;
use crate::model::Completion;

use super::GuestBuffer;

/// Bytes of the used ring before its first element (flags, idx).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used element (id, len).
const USED_ELEMENT: u64 = 8;
/// Interrupts of a storm sent at one pump (the clock ticks every millisecond by default).
const STORM_BURST: u32 = 20;

impl DaqBackend {
    /// Puts a completed read on the data ring, committing an armed ring violation with it.
    pub(super) fn put_read(&mut self, vring: &VringRwLock, completion: &Completion<GuestBuffer>) {
        let head = completion.buffer.head;
        let used_len = completion.used_len;
        let Some(violation) = self.card.take_violation(ScriptedViolation::is_data_ring) else {
            self.put_used(vring, "data", head, used_len);
            return;
        };
        warn!("scripted violation on dataq (buffer {head}): {violation:?}");
        let size = QueueT::size(vring.get_ref().get_queue());
        match violation {
            ScriptedViolation::UsedLenOverBuffer => {
                let over = completion.buffer.capacity.saturating_add(64);
                self.put_used(vring, "data", head, u32::try_from(over).unwrap_or(u32::MAX));
            }
            ScriptedViolation::UsedLenUnderHeader => {
                self.put_used(vring, "data", head, HEADER_SIZE as u32 / 2)
            }
            ScriptedViolation::UsedIdOutOfRange => {
                self.put_used_raw(vring, u32::from(size), used_len);
                self.put_used(vring, "data", head, used_len);
            }
            ScriptedViolation::UsedIdNotInFlight => {
                // A descriptor the device does not hold (never made available, or returned).
                let idle = (0..size).find(|id| *id != head && !self.held_reads.contains(id));
                match idle {
                    Some(id) => self.put_used_raw(vring, u32::from(id), used_len),
                    // Every descriptor is held: the one just completed is no longer in flight
                    // once its entry is read.
                    None => self.put_used_raw(vring, u32::from(head), used_len),
                }
                self.put_used(vring, "data", head, used_len);
            }
            ScriptedViolation::CompleteTwice => {
                self.put_used(vring, "data", head, used_len);
                self.put_used(vring, "data", head, used_len);
            }
            ScriptedViolation::UsedIndexJump(count) => {
                self.put_used(vring, "data", head, used_len);
                let count = if count == 0 { size } else { count };
                self.jump_used_index(vring, count);
            }
            other => {
                warn!("{other:?} is not a dataq violation");
                self.put_used(vring, "data", head, used_len);
            }
        }
        // Make sure the driver looks, whatever its notification suppression says.
        if let Err(err) = vring.signal_used_queue() {
            warn!("signal_used_queue failed: {err}");
        }
    }

    /// Writes a used element as given (virtio-queue refuses ids beyond the queue size, which is
    /// the point here) and publishes it.
    fn put_used_raw(&mut self, vring: &VringRwLock, id: u32, len: u32) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let next = queue.next_used();
        let slot = u64::from(next % queue.size().max(1));
        let ring = GuestAddress(queue.used_ring());
        let written = ring
            .checked_add(USED_RING_HEADER + slot * USED_ELEMENT)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(ring))
            .and_then(|element| {
                mem.write_obj(id.to_le(), element)?;
                mem.write_obj(len.to_le(), element.unchecked_add(4))
            });
        let next = next.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let published = written.and_then(|()| mem.write_obj(next.to_le(), ring.unchecked_add(2)));
        match published {
            Ok(()) => queue.set_next_used(next),
            Err(err) => {
                drop(state);
                self.errors.report(
                    "data",
                    format_args!("scripted used entry not written: {err}"),
                );
            }
        }
    }

    /// Moves the used index `count` entries ahead with nothing written.
    fn jump_used_index(&mut self, vring: &VringRwLock, count: u16) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let next = queue.next_used().wrapping_add(count);
        let idx = GuestAddress(queue.used_ring()).unchecked_add(2);
        match mem.write_obj(next.to_le(), idx) {
            Ok(()) => queue.set_next_used(next),
            Err(err) => {
                drop(state);
                self.errors.report(
                    "data",
                    format_args!("scripted used index not written: {err}"),
                );
            }
        }
    }

    /// Sends the next burst of the data-queue interrupts an armed interrupt storm owes; the
    /// rest follow at the next pumps (clock ticks), so that the frontend sees many separate
    /// signals rather than one eventfd count, and the device keeps answering meanwhile.
    pub(super) fn commit_interrupt_storm(&mut self, vring: &VringRwLock) {
        let storm = self.card.take_interrupt_storm();
        if storm == 0 {
            return;
        }
        let burst = storm.min(STORM_BURST);
        for _ in 0..burst {
            if let Err(err) = vring.signal_used_queue() {
                warn!("signal_used_queue failed: {err}");
                return;
            }
        }
        self.card.owe_interrupt_storm(storm - burst);
    }
}
