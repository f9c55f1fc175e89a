//! Telling the driver: used-buffer notifications as the driver's suppression allows, and the
//! one configuration-change notification for NEEDS_RESET.

use log::{debug, info, warn};
use vhost::vhost_user::VhostUserFrontendReqHandler;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::DaqBackend;

impl DaqBackend {
    /// Puts a chain on `vring`'s used ring; a failure (the ring went away) is a guest error of
    /// `queue_name`, reported, never fatal.
    pub(super) fn put_used(
        &mut self,
        vring: &VringRwLock,
        queue_name: &'static str,
        head: u16,
        used_len: u32,
    ) {
        if let Err(err) = vring.add_used(head, used_len) {
            self.errors
                .report(queue_name, format_args!("add_used failed: {err}"));
        }
    }

    /// Notifies the driver if its notification suppression allows it.
    pub(super) fn signal(&mut self, vring: &VringRwLock) {
        if !self.event_idx && self.driver_suppresses_interrupts(vring) {
            return;
        }
        match vring.needs_notification() {
            Ok(true) => {
                if let Err(err) = vring.signal_used_queue() {
                    debug!("signal_used_queue failed: {err}");
                }
            }
            Ok(false) => {}
            Err(err) => self
                .errors
                .report("used", format_args!("cannot read used_event: {err}")),
        }
    }

    /// Without EVENT_IDX the driver suppresses interrupts with VIRTQ_AVAIL_F_NO_INTERRUPT,
    /// which virtio-queue 0.18 does not honour by itself.
    pub(super) fn driver_suppresses_interrupts(&self, vring: &VringRwLock) -> bool {
        const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
        let Some(mem) = self.memory() else {
            return false;
        };
        let avail = GuestAddress(vring.get_ref().get_queue().avail_ring());
        mem.memory()
            .read_obj::<u16>(avail)
            .is_ok_and(|flags| u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
    }

    pub(super) fn needs_reset(&mut self, fault_code: u32) {
        let now = self.now_ns();
        self.card.enter_needs_reset(fault_code, now);
        self.notify_needs_reset();
    }

    /// Tells the driver, once, that the device entered NEEDS_RESET.
    pub(super) fn notify_needs_reset(&mut self) {
        if self.needs_reset_notified || self.frontend.is_none() {
            // Without the backend-request channel yet, the next pump after it is set up
            // sends the notification.
            return;
        }
        self.needs_reset_notified = true;
        // The virtio status byte belongs to the frontend; a config-change notification makes
        // the driver read `state` and see NEEDS_RESET (see the spec).
        self.notify_config_change("entered NEEDS_RESET");
    }

    /// Sends the driver a configuration-change notification (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
    /// on the backend-request channel; the frontend turns it into a config interrupt and a new
    /// config generation).
    pub(super) fn notify_config_change(&mut self, why: &'static str) {
        let Some(frontend) = self.frontend.clone() else {
            debug!("config change ({why}) not notified: no backend-request channel");
            return;
        };
        self.config_notifications += 1;
        // Sent from its own thread: with REPLY_ACK the send waits for the frontend, which
        // first reads the new config space (GET_CONFIG), served under this backend's lock.
        let sent = std::thread::Builder::new()
            .name("vdaq config-change".into())
            .spawn(move || match frontend.handle_config_change() {
                Ok(_) => debug!("config change notified: {why}"),
                Err(err) => info!("config-change notification ({why}) not delivered: {err}"),
            });
        if let Err(err) = sent {
            warn!("cannot send config-change notification: {err}");
        }
    }
}
