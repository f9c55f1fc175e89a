//! Telling the driver: used-buffer notifications as the driver's suppression allows, and
//! configuration-change notifications (NEEDS_RESET, settings changed without the driver).
//!
//! QEMU's generic vhost-user device (`vhost-user-base`, 9.x to at least 11.1) turns a
//! CONFIG_CHANGE_MSG into `virtio_notify_config(dev->vdev)` without checking that the vhost
//! device is started; while it is stopped (before DRIVER_OK, or once the driver reset the
//! device) `vdev` is NULL and QEMU dies of SIGSEGV. So this device sends the message only while
//! the frontend runs the device (`frontend_running`; a change made meanwhile is sent once it
//! does, or dropped by a reset, after which the driver reads the whole space anyway),
//! and on NEEDS_RESET it shows the fault nothing but the config space until the frontend has
//! taken the message: no event, no command reply, so the driver cannot reset the device (and
//! stop it) with the message still unread in the channel.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use log::{debug, info, warn};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
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
        if self.card.interrupts_withheld(self.now_ns()) {
            // Scripted (`no_interrupts`): the driver must find the used buffers itself.
            self.interrupts_withheld += 1;
            return;
        }
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

    /// Tells the driver, once, that the device entered NEEDS_RESET, and holds back every other
    /// sign of it until the frontend has taken the notification (see the module comment).
    pub(super) fn notify_needs_reset(&mut self) {
        if self.needs_reset_notified || self.config_notifier.is_none() {
            // Without the backend-request channel yet, `set_backend_req_fd` sends it.
            return;
        }
        // The virtio status byte belongs to the frontend; a config-change notification makes
        // the driver read `state` and see NEEDS_RESET (see the spec).
        if self.notify_config_change("entered NEEDS_RESET") {
            self.needs_reset_notified = true;
            self.announcing_since_ns = Some(self.now_ns());
        }
    }

    /// True while a NEEDS_RESET notification is on its way to the frontend: events and
    /// command replies wait. Bounded by [`ANNOUNCE_TIMEOUT_NS`] should a frontend never answer.
    pub(super) fn announcing_needs_reset(&mut self) -> bool {
        let Some(since) = self.announcing_since_ns else {
            return false;
        };
        let busy = self
            .config_notifier
            .as_ref()
            .is_some_and(ConfigNotifier::busy);
        if busy && self.now_ns().saturating_sub(since) <= ANNOUNCE_TIMEOUT_NS {
            return true;
        }
        if busy {
            warn!(
                "the frontend has not taken the NEEDS_RESET notification after {} ms; \
                 showing the fault to the driver anyway",
                ANNOUNCE_TIMEOUT_NS / 1_000_000
            );
        }
        self.announcing_since_ns = None;
        false
    }

    /// The frontend runs the device: a ring is started (SET_VRING_KICK), every started ring
    /// is enabled (QEMU disables them first when it stops the device), and none was stopped
    /// since the last reset (GET_VRING_BASE marks a ring not ready before it reaches this
    /// backend). Only then can QEMU's generic device take a configuration-change message. A
    /// ring the driver never set up does not count (QEMU starts only rings with an address).
    /// Known only once the event loop has handed the backend its rings (the first event).
    pub(super) fn frontend_running(&self) -> bool {
        let mut started = 0;
        for vring in &self.vrings {
            let state = vring.get_ref();
            if state.get_queue().ready() {
                if !state.is_enabled() {
                    return false;
                }
                started += 1;
            }
        }
        started > 0 && self.stopped_queues == 0
    }

    /// Sends the notification held while the frontend had the device stopped, once it runs.
    pub(super) fn send_held_config_change(&mut self) {
        if let Some(why) = self.held_config_change {
            if self.frontend_running() {
                self.notify_config_change(why);
            }
        }
    }

    /// Starts the thread that sends configuration-change notifications on `frontend`'s
    /// channel (and ends the previous connection's).
    pub(super) fn start_config_notifier(&mut self, frontend: Backend) {
        match ConfigNotifier::start(frontend) {
            Ok(notifier) => self.config_notifier = Some(notifier),
            Err(err) => warn!("cannot start the config-change notifier: {err}"),
        }
    }

    /// Sends the driver a configuration-change notification (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
    /// on the backend-request channel; the frontend turns it into a config interrupt and a new
    /// config generation). True if one is on its way; false if there is no channel, or the
    /// frontend has the device stopped (then it is held for the next start).
    pub(super) fn notify_config_change(&mut self, why: &'static str) -> bool {
        if self.config_notifier.is_none() {
            debug!("config change ({why}) not notified: no backend-request channel");
            return false;
        }
        if !self.frontend_running() {
            if self.held_config_change.is_none() {
                debug!("config change ({why}) held: the frontend has the device stopped");
                self.held_config_change = Some(why);
            }
            return false;
        }
        // One on its way covers every change held before it (the driver reads the whole space).
        self.held_config_change = None;
        let requested = self
            .config_notifier
            .as_ref()
            .is_some_and(|notifier| notifier.request(why));
        if requested {
            self.config_notifications += 1;
        } else {
            debug!("config change ({why}) covered by the notification still pending");
        }
        true
    }
}

/// How long a NEEDS_RESET notification may take before the fault is shown regardless (checked
/// at each clock tick). QEMU answers as soon as its main loop runs, milliseconds on a loaded
/// host; a frontend that never answers must not freeze the device for long.
pub(super) const ANNOUNCE_TIMEOUT_NS: u64 = 1_000_000_000;

/// The thread that sends configuration-change notifications, and what it is asked to send.
///
/// A thread of its own: with REPLY_ACK a send waits for the frontend, which first reads the
/// new config space (GET_CONFIG), served under the backend's lock. At most one notification
/// waits: changes made before it is sent are covered by it (the driver reads the whole
/// space), so a flood of changes piles up neither threads nor messages. A mutex and a condvar
/// rather than a channel: they need only futex(2), inside the sandbox's allowlist.
pub(super) struct ConfigNotifier {
    shared: Arc<(Mutex<NotifierState>, Condvar)>,
}

#[derive(Default)]
struct NotifierState {
    pending: Option<&'static str>,
    /// Sent, and (with REPLY_ACK) not yet answered by the frontend.
    in_flight: bool,
    closed: bool,
}

impl ConfigNotifier {
    fn start(frontend: Backend) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(NotifierState::default()), Condvar::new()));
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("vdaq config-change".into())
            .spawn(move || {
                let (state, wake) = &*worker;
                loop {
                    let why = {
                        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                        while state.pending.is_none() && !state.closed {
                            state = wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                        }
                        if state.closed {
                            // The connection ended: nothing may be sent on its channel.
                            return;
                        }
                        match state.pending.take() {
                            Some(why) => {
                                state.in_flight = true;
                                why
                            }
                            None => return,
                        }
                    };
                    match frontend.handle_config_change() {
                        Ok(_) => debug!("config change notified: {why}"),
                        Err(err) => {
                            info!("config-change notification ({why}) not delivered: {err}")
                        }
                    }
                    state
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .in_flight = false;
                }
            })?;
        Ok(ConfigNotifier { shared })
    }

    /// A notification waits to be sent, or the frontend has not answered the last one yet.
    fn busy(&self) -> bool {
        let (state, _) = &*self.shared;
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.pending.is_some() || state.in_flight
    }

    /// Drops a notification not sent yet (the device was reset: the driver reads the whole
    /// space again, and the frontend has the device stopped). One already sent is beyond recall.
    pub(super) fn cancel_pending(&self) {
        let (state, _) = &*self.shared;
        state.lock().unwrap_or_else(PoisonError::into_inner).pending = None;
    }

    /// Asks for a notification; false if one is pending already (it covers this change).
    fn request(&self, why: &'static str) -> bool {
        let (state, wake) = &*self.shared;
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.pending.is_some() {
            return false;
        }
        state.pending = Some(why);
        wake.notify_one();
        true
    }
}

impl Drop for ConfigNotifier {
    fn drop(&mut self) {
        let (state, wake) = &*self.shared;
        state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        wake.notify_one();
    }
}
