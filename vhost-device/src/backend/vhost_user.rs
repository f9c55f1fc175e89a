//! The `VhostUserBackendMut` implementation: features, config space, memory, vring
//! lifecycle and the event loop's dispatch.

use std::io;

use log::{debug, error, warn};
use vdaq_wire::config::CONFIG_SIZE;
use vdaq_wire::zerocopy::IntoBytes;
use vdaq_wire::{feature, queue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{memory_table, DaqBackend, GuestMemoryHandle, TIMER_EVENT};

pub(super) fn to_io(err: virtio_queue::Error) -> io::Error {
    io::Error::other(err.to_string())
}

impl VhostUserBackendMut for DaqBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(queue::COUNT)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.options.queue_size)
    }

    fn features(&self) -> u64 {
        feature::DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked_features = features;
        self.card
            .set_crc_enabled(features & (1 << feature::DAQ_F_CRC32) != 0);
        self.card
            .set_trigger_enabled(features & (1 << feature::DAQ_F_TRIGGER) != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        if let Some(recorder) = &mut self.recorder {
            recorder.flush();
        }
        self.stopped_queues = 0;
        self.needs_reset_notified = false;
        self.announcing_since_ns = None;
        self.control_deferred = false;
        // The next driver reads the whole config space at initialisation; a notification
        // still waiting for the notifier thread would reach a stopped device.
        self.held_config_change = None;
        if let Some(notifier) = &self.config_notifier {
            notifier.cancel_pending();
        }
        let released = self.card.reset();
        self.delayed.clear();
        self.held_reads.clear();
        self.event_slots.clear();
        self.completions.clear();
        debug!("device reset; {} read buffers released", released.len());
        self.update_timer();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = self.card.config_space();
        config
            .tick_us
            .set(u32::try_from(self.options.tick.as_micros()).unwrap_or(u32::MAX));
        let bytes = config.as_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SIZE => bytes[start..end].to_vec(),
            _ => {
                debug!("GET_CONFIG outside the {CONFIG_SIZE}-byte config space: {offset}+{size}");
                Vec::new()
            }
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The configuration space is read-only (settings change through CONFIGURE, which
        // answers with a status); writes are ignored, as the spec says.
        self.errors.report(
            "config",
            format_args!("ignored write of {} bytes at offset {offset}", buf.len()),
        );
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryHandle) -> io::Result<()> {
        // Refusing fails the SET_MEM_TABLE request (a NACK with REPLY_ACK) and ends the
        // connection; the daemon resets the card and serves the next one.
        let refused = match memory_table::check(&mem.memory()) {
            Ok(report) if report.shrinkable == 0 => None,
            Ok(report) if self.options.allow_unsealed_memory => {
                warn!(
                    "{} of {} memory regions are in files the frontend can still shrink (not \
                     sealed); truncating one while the device uses it would kill this process",
                    report.shrinkable, report.regions
                );
                None
            }
            Ok(report) => Some(format!(
                "{} of {} memory regions are in files the frontend could shrink under the \
                 device (not sealed with F_SEAL_SHRINK); seal them (QEMU: memory-backend-memfd) \
                 or pass --allow-unsealed-memory",
                report.shrinkable, report.regions
            )),
            Err(err) => Some(err.to_string()),
        };
        match refused {
            None => {
                self.mem = Some(mem);
                Ok(())
            }
            Some(reason) => {
                error!("memory table refused: {reason}");
                // vhost-user-backend has already published the table to the rings: drop every
                // buffer the card holds now, so that no clock tick writes through it before
                // the connection ends.
                self.mem = None;
                self.reset_device();
                Err(io::Error::new(io::ErrorKind::InvalidInput, reason))
            }
        }
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.start_config_notifier(backend);
        if self.card.state() == vdaq_wire::DeviceState::NeedsReset {
            // The fault came before the channel: the driver is told now (or once it runs).
            self.notify_needs_reset();
            self.update_timer();
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit_consumer.try_clone().ok()?,
            self.exit_notifier.try_clone().ok()?,
        ))
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        let all_queues = (1u8 << queue::COUNT) - 1;
        // Buffers the device holds must not outlive the ring: return them before the
        // frontend reads the ring base, so a paused or reset driver gets every one back.
        match u16::try_from(queue_index) {
            Ok(queue::DATA) => self.release_held_buffers("data queue stopped"),
            Ok(queue::EVENT) => {
                if let Some(vring) = self.vrings.get(usize::from(queue::EVENT)).cloned() {
                    while let Some(slot) = self.event_slots.pop_front() {
                        self.put_used(&vring, "event", slot.head, 0);
                    }
                    self.signal(&vring);
                }
                self.event_slots.clear();
            }
            _ => {}
        }
        if let Ok(index) = u8::try_from(queue_index) {
            self.stopped_queues |= 1u8.checked_shl(u32::from(index)).unwrap_or(0);
        }
        if self.stopped_queues & all_queues == all_queues {
            // The frontend stopped every ring: the driver reset the device (QEMU's generic
            // vhost-user device sends no reset message of its own), so the card resets too.
            self.stopped_queues = 0;
            self.reset_device();
        }
        self.update_timer();
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if self.vrings.is_empty() {
            self.vrings = vrings.to_vec();
        }
        if evset != EventSet::IN {
            debug!("unexpected event set {evset:?} for event {device_event}");
        }
        let result = match device_event {
            queue::DATA => match vrings.get(usize::from(queue::DATA)) {
                Some(vring) => self.process_data_queue(vring),
                None => Ok(()),
            },
            queue::CONTROL => self.process_control_queue(vrings),
            queue::EVENT => match vrings.get(usize::from(queue::EVENT)) {
                Some(vring) => self.process_event_queue(vring),
                None => Ok(()),
            },
            TIMER_EVENT => {
                // Expiration count is not needed: the card works from the clock, not ticks.
                if let Err(err) = self.timer.wait() {
                    if err.errno() != libc::EAGAIN {
                        debug!("timer read failed: {err}");
                    }
                }
                Ok(())
            }
            other => {
                warn!("unknown device event {other}");
                Ok(())
            }
        };
        if let Err(err) = result {
            // A queue-level failure is the guest's doing; report it and keep serving.
            self.errors
                .report("vring", format_args!("event {device_event}: {err}"));
        }
        self.pump(vrings);
        Ok(())
    }
}
