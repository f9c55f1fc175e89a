//! The data queue: read buffers in (validated, handed to the card), completed buffers out
//! (recorded, put on the used ring, notified as coalescing allows).

use std::io;

use log::info;
use vdaq_wire::buffer::HEADER_SIZE;
use vdaq_wire::event::fault;
use vdaq_wire::queue;
use vhost_user_backend::VringRwLock;

use super::chain::{validate_chain, ChainError, GuestBuffer};
use super::DaqBackend;

impl DaqBackend {
    pub(super) fn process_data_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem_handle) = self.memory() else {
            return Ok(());
        };
        self.drain_available(vring, "data", true, |this, chain, mem| {
            let head = chain.head_index();
            if this.held_reads.contains(&head) {
                this.errors.report("data", ChainError::AlreadyHeld);
                this.needs_reset(fault::QUEUE_CORRUPT);
                return;
            }
            let buffer = validate_chain(chain, mem).and_then(|layout| {
                if !layout.readable.is_empty() {
                    return Err(ChainError::WrongDirection);
                }
                let capacity = layout.writable_bytes();
                if capacity < HEADER_SIZE {
                    return Err(ChainError::TooShort);
                }
                Ok(GuestBuffer {
                    head,
                    writable: layout.writable,
                    capacity,
                    mem: mem_handle.clone(),
                })
            });
            match buffer {
                Ok(buffer) => {
                    let now = this.now_ns();
                    this.held_reads.insert(head);
                    this.card.post(buffer, now, &mut this.completions);
                    // Fill and return right away where the clock allows (free-running), so
                    // the driver can consume this buffer while the next one is being filled.
                    this.card.advance(now, &mut this.completions);
                    this.publish_completions(vring, false);
                }
                Err(err) => {
                    this.errors.report("data", err);
                    this.card.count_rejected();
                    this.put_used(vring, "data", head, 0);
                    this.signal(vring);
                }
            }
        })
    }

    /// Puts completed read buffers on the used ring and notifies the driver when the
    /// coalescing policy (or `force`) says so.
    pub(super) fn publish_completions(&mut self, vring: &VringRwLock, force: bool) {
        let now = self.now_ns();
        if !force && self.card.completions_delayed(now) {
            // A scripted delay: hold completed buffers back until the window ends.
            self.delayed.append(&mut self.completions);
            return;
        }
        let mut ready = std::mem::take(&mut self.delayed);
        ready.append(&mut self.completions);
        for completion in ready.drain(..) {
            self.held_reads.remove(&completion.buffer.head);
            if let Some(recorder) = &mut self.recorder {
                // Before add_used: the driver cannot have touched the buffer yet.
                recorder.record(&completion.buffer, completion.used_len as usize);
            }
            self.put_read(vring, &completion);
        }
        // The emptied vector keeps its capacity for the next completions.
        self.completions = ready;
        let now = self.now_ns();
        if self.card.take_notification(now, force) {
            self.signal(vring);
        }
    }

    pub(super) fn release_held_buffers(&mut self, reason: &str) {
        let now = self.now_ns();
        let returned = self.card.flush(now, &mut self.completions);
        if returned > 0 {
            info!("{reason}: returned {returned} held read buffers as flushed");
        }
        if let Some(data) = self.vrings.get(usize::from(queue::DATA)).cloned() {
            self.publish_completions(&data, true);
        } else {
            self.completions.clear();
        }
    }
}
