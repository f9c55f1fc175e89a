//! vhost-user plumbing: turns vrings, kicks and timer ticks into calls on the [`Card`] model,
//! and completions back into used-ring entries and interrupts.
//!
//! Everything read from guest memory is treated as hostile: descriptor chains are validated
//! completely before the device writes a single byte, malformed requests get the answer the
//! specification defines (a status code, or used length 0), and nothing here panics on guest
//! input.
//!
//! | file | concern |
//! |---|---|
//! | `chain.rs` | descriptor-chain validation and segment I/O, the guest read buffer |
//! | `data_queue.rs` | read buffers in, completions out |
//! | `control_queue.rs` | control-request framing and execution |
//! | `event_queue.rs` | event buffers and event delivery |
//! | `notify.rs` | used-buffer and configuration-change notifications (the NEEDS_RESET announce) |
//! | `recorder.rs` | recording delivered buffers |
//! | `guest_errors.rs` | rate-limited reporting of guest errors |
//! | `memory_table.rs` | the frontend's memory regions checked against their files |
//! | `vhost_user.rs` | the `VhostUserBackendMut` implementation |
//! | `violations.rs` | the card breaking the virtqueue protocol on purpose (scripted) |

mod chain;
mod control_queue;
mod data_queue;
mod event_queue;
mod guest_errors;
mod memory_table;
mod notify;
mod recorder;
mod vhost_user;
mod violations;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::warn;
use thiserror::Error;
use vdaq_wire::event::fault;
use vdaq_wire::queue;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::model::{Card, Completion, Limits, Settings, SettingsError};

pub use chain::{ChainError, GuestBuffer};
use event_queue::EventSlot;
use guest_errors::GuestErrorLog;
pub use recorder::Recorder;
use vhost_user::to_io;

/// Guest memory as the backend sees it.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemorySnapshot = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// Epoll token of the sample-clock timer. Tokens up to `queue::COUNT` belong to the queues and
/// the library's exit event.
pub const TIMER_EVENT: u16 = queue::COUNT + 1;

/// Errors of this module that end the backend's setup (never caused by the guest).
#[derive(Debug, Error)]
pub enum BackendError {
    /// The device model refused the power-on settings.
    #[error("invalid device settings: {0}")]
    Settings(#[from] crate::model::SettingsError),
    /// A timer or event fd could not be created.
    #[error("cannot create {what}: {source}")]
    Fd {
        /// Which fd.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
}

/// Options of one device instance that are not acquisition settings.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Power-on acquisition settings.
    pub settings: Settings,
    /// Card limits (FIFO depth, rate range, channels).
    pub limits: Limits,
    /// Largest virtqueue size offered.
    pub queue_size: u16,
    /// Period of the device's sample-clock tick.
    pub tick: Duration,
    /// Scripted firmware behaviour, if any.
    pub scenario: Option<std::sync::Arc<crate::model::scenario::Scenario>>,
    /// Virtual sample time (see `Card::set_deterministic`).
    pub deterministic: bool,
    /// Samples for the `file` signal.
    pub source: Option<std::sync::Arc<crate::model::source::FileSource>>,
    /// The recording every delivered buffer is appended to ([`Recorder::open_file`]).
    pub record: Option<std::sync::Arc<std::fs::File>>,
    /// Accept guest memory in files the frontend could still shrink (not sealed).
    pub allow_unsealed_memory: bool,
    /// How long the running device keeps looking at the data queue's available ring after
    /// emptying it, before it asks the driver for a notification (zero: it asks at once).
    /// A notification costs the driver's vCPU a trip through QEMU and the host kernel to wake
    /// this process; polling spares it while the driver posts buffers back to back.
    pub poll: Duration,
}

/// Longest one data-queue event keeps polling, however much it finds (or the poll time if
/// longer): the timer, the control queue and the event queue wait meanwhile.
const POLL_PER_EVENT: Duration = Duration::from_millis(1);

/// The vhost-user backend of one vdaq device.
pub struct DaqBackend {
    card: Card<GuestBuffer>,
    options: DeviceOptions,
    mem: Option<GuestMemoryHandle>,
    event_idx: bool,
    acked_features: u64,
    epoch: Instant,
    timer: TimerFd,
    timer_armed: bool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    /// Sends configuration-change notifications on the backend-request channel, from a
    /// thread of its own (one per connection; see `notify.rs`).
    config_notifier: Option<notify::ConfigNotifier>,
    vrings: Vec<VringRwLock>,
    event_slots: VecDeque<EventSlot>,
    completions: Vec<Completion<GuestBuffer>>,
    errors: GuestErrorLog,
    /// Bit n set: queue n was stopped (GET_VRING_BASE) since the last reset.
    stopped_queues: u8,
    /// Appends every delivered buffer to a recording, if asked to.
    recorder: Option<Recorder>,
    /// Completed buffers held back by a scripted delay, oldest first.
    delayed: Vec<Completion<GuestBuffer>>,
    /// Descriptor heads of read buffers the device holds (a head made available again while
    /// held means the ring is corrupt, and holding it twice would grow without bound).
    held_reads: std::collections::HashSet<u16>,
    /// The driver was told about NEEDS_RESET (config-change notification sent).
    needs_reset_notified: bool,
    /// When the NEEDS_RESET notification went to the notifier thread, while the frontend has
    /// not taken it yet: events and command replies wait (see `notify.rs`).
    announcing_since_ns: Option<u64>,
    /// A command arrived while NEEDS_RESET was being announced; it is answered afterwards.
    control_deferred: bool,
    /// A configuration change made while the frontend had the device stopped, sent at the
    /// next start (QEMU's generic device cannot take one before).
    held_config_change: Option<&'static str>,
    /// Configuration-change notifications sent on the backend-request channel.
    config_notifications: u64,
    /// Closes this connection (a scenario's `disconnect`).
    connection: Option<vhost_user_backend::ShutdownHandle>,
    /// Command replies withheld by a scripted `reply_never`.
    withheld_replies: u64,
    /// Used-buffer interrupts withheld by a scripted `no_interrupts`.
    interrupts_withheld: u64,
}

impl std::fmt::Debug for DaqBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaqBackend")
            .field("card", &self.card)
            .field("event_idx", &self.event_idx)
            .finish_non_exhaustive()
    }
}

impl DaqBackend {
    /// A backend for one device with the given options.
    pub fn new(options: DeviceOptions) -> Result<Self, BackendError> {
        let mut card = Card::new(options.settings, options.limits)?;
        if let Some(scenario) = &options.scenario {
            card.set_scenario(scenario.as_ref().clone());
        }
        card.set_deterministic(options.deterministic);
        if let Some(source) = &options.source {
            card.set_source(source.clone());
        }
        let recorder = match &options.record {
            None => None,
            Some(file) => Some(Recorder::new(file).map_err(|source| BackendError::Fd {
                what: "recording file",
                source,
            })?),
        };
        let timer = TimerFd::new().map_err(|source| BackendError::Fd {
            what: "sample-clock timer",
            source: io::Error::from_raw_os_error(source.errno()),
        })?;
        set_nonblocking(&timer).map_err(|source| BackendError::Fd {
            what: "sample-clock timer",
            source,
        })?;
        let (exit_consumer, exit_notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|source| BackendError::Fd {
            what: "exit event",
            source,
        })?;
        Ok(DaqBackend {
            card,
            options,
            mem: None,
            event_idx: false,
            acked_features: 0,
            epoch: Instant::now(),
            timer,
            timer_armed: false,
            exit_consumer,
            exit_notifier,
            config_notifier: None,
            vrings: Vec::new(),
            event_slots: VecDeque::new(),
            completions: Vec::new(),
            errors: GuestErrorLog::default(),
            stopped_queues: 0,
            held_reads: std::collections::HashSet::new(),
            recorder,
            delayed: Vec::new(),
            needs_reset_notified: false,
            announcing_since_ns: None,
            control_deferred: false,
            held_config_change: None,
            config_notifications: 0,
            connection: None,
            withheld_replies: 0,
            interrupts_withheld: 0,
        })
    }

    /// Applies a scripted action now (control socket).
    pub fn inject(&mut self, action: crate::model::scenario::Action) {
        let now = self.now_ns();
        self.card.apply(action, now);
        // Take effect now (events, NEEDS_RESET, disconnect), not at the guest's next kick.
        if !self.vrings.is_empty() {
            let vrings = self.vrings.clone();
            self.pump(&vrings);
        }
    }

    /// Changes delivery parameters that leave the samples alone (control socket).
    pub fn adjust(
        &mut self,
        latency_us: Option<u32>,
        coalesce_buffers: Option<u16>,
        watermark_frames: Option<u32>,
    ) -> Result<(), SettingsError> {
        self.card
            .adjust(latency_us, coalesce_buffers, watermark_frames)?;
        if self.card.take_settings_changed() {
            self.notify_config_change("settings changed by the control socket");
        }
        Ok(())
    }

    /// Takes the next pending device event (tests).
    #[cfg(test)]
    pub fn pop_event_for_tests(&mut self) -> Option<vdaq_wire::event::Event> {
        self.card.pop_event()
    }

    /// Configuration-change notifications sent so far on this connection.
    pub fn config_notifications(&self) -> u64 {
        self.config_notifications
    }

    /// Command replies a scripted `reply_never` withheld, and used-buffer interrupts a
    /// scripted `no_interrupts` withheld, on this connection.
    pub fn withheld(&self) -> (u64, u64) {
        (self.withheld_replies, self.interrupts_withheld)
    }

    /// Lets the backend close its own connection (scenario `disconnect`).
    pub fn set_connection(&mut self, handle: vhost_user_backend::ShutdownHandle) {
        self.connection = Some(handle);
    }

    /// The sample-clock timer's fd, to register with the daemon's epoll loop as
    /// [`TIMER_EVENT`].
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    /// The device model (for tests and statistics).
    pub fn card(&self) -> &Card<GuestBuffer> {
        &self.card
    }

    /// Device clock: ns since this backend was created.
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn memory(&self) -> Option<GuestMemoryHandle> {
        self.mem.clone()
    }

    /// Pops every available chain of `vring`, handing each to `take`. Follows the EVENT_IDX
    /// protocol: notifications are off while draining and the ring is re-checked after
    /// turning them back on, so a buffer made available in between is not missed. With
    /// `poll`, the ring is watched for [`DeviceOptions::poll`] after it is empty, before
    /// notifications go back on.
    fn drain_available(
        &mut self,
        vring: &VringRwLock,
        queue_name: &'static str,
        poll: bool,
        mut take: impl FnMut(&mut Self, DescriptorChain<MemorySnapshot>, &GuestMemoryMmap<()>),
    ) -> io::Result<()> {
        let Some(mem_handle) = self.memory() else {
            return Ok(());
        };
        let event_start = Instant::now();
        // Without EVENT_IDX notifications stay on, except while polling (NO_NOTIFY).
        let suppress = self.event_idx || (poll && !self.options.poll.is_zero());
        loop {
            if suppress {
                vring.disable_notification().map_err(to_io)?;
            }
            let mem = mem_handle.memory();
            let chains = {
                let mut state = vring.get_mut();
                state
                    .get_queue_mut()
                    .iter(mem_handle.memory())
                    .map(|iter| iter.collect::<Vec<_>>())
            };
            let chains = match chains {
                Ok(chains) => chains,
                // A kick racing the frontend stopping the ring: nothing to do.
                Err(virtio_queue::Error::QueueNotReady) => return Ok(()),
                Err(err) => {
                    // The avail index is nonsense: the ring cannot be trusted any more.
                    self.errors
                        .report(queue_name, format_args!("corrupt ring: {err}"));
                    self.needs_reset(fault::QUEUE_CORRUPT);
                    return Ok(());
                }
            };
            let size = virtio_queue::QueueT::size(vring.get_ref().get_queue());
            for chain in chains {
                if chain.head_index() >= size {
                    // An available-ring entry naming no descriptor: nothing can be returned
                    // for it (a used entry needs a valid id), so the ring cannot be trusted.
                    // Found by fuzzing (fuzz/, data_queue).
                    self.errors.report(
                        queue_name,
                        format_args!("available entry names descriptor {}", chain.head_index()),
                    );
                    self.needs_reset(fault::QUEUE_CORRUPT);
                    continue;
                }
                take(self, chain, &mem);
            }
            if poll && self.poll_for_available(vring, &mem, event_start) {
                continue;
            }
            if !suppress || !vring.enable_notification().map_err(to_io)? {
                return Ok(());
            }
        }
    }

    /// Watches the available ring of `vring` (notifications still off) for up to
    /// [`DeviceOptions::poll`], and no later than [`POLL_PER_EVENT`] (or the poll time) after
    /// `event_start`.
    /// True if a buffer was made available meanwhile. Only while the card runs: a stopped
    /// card fills nothing.
    fn poll_for_available(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap<()>,
        event_start: Instant,
    ) -> bool {
        if self.options.poll.is_zero() || self.card.state() != vdaq_wire::DeviceState::Running {
            return false;
        }
        let deadline = (Instant::now() + self.options.poll)
            .min(event_start + self.options.poll.max(POLL_PER_EVENT));
        let mut spins = 0u32;
        loop {
            let made_available = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                virtio_queue::QueueT::avail_idx(queue, mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|avail| avail.0 != virtio_queue::QueueT::next_avail(queue))
            };
            if made_available {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                // Two cores here: QEMU's main loop (which injects the interrupts) may be
                // waiting for this one.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// After any event: advance the card, publish what completed, deliver events, keep the
    /// timer running exactly while the card has time-driven work.
    fn pump(&mut self, vrings: &[VringRwLock]) {
        let now = self.now_ns();
        self.card.advance(now, &mut self.completions);
        // Before anything is published: the NEEDS_RESET notification goes first (notify.rs).
        if self.card.state() == vdaq_wire::DeviceState::NeedsReset {
            self.notify_needs_reset();
        }
        if self.card.take_settings_changed() {
            self.notify_config_change("settings changed while running");
        }
        self.send_held_config_change();
        let announcing = self.announcing_needs_reset();
        if let Some(data) = vrings.get(usize::from(queue::DATA)) {
            self.publish_completions(data, false);
            self.commit_interrupt_storm(data);
        }
        // Events wait while a scripted delay holds completed buffers back: a TRIGGER event
        // must not overtake the buffer it names (spec 5.x.6.9).
        if self.delayed.is_empty() && !announcing {
            if let Some(events) = vrings.get(usize::from(queue::EVENT)) {
                if self.card.has_events() && self.event_slots.is_empty() {
                    // Event buffers made available whose kick this device has not seen (yet):
                    // take them rather than let events wait for the next kick.
                    if let Err(err) = self.process_event_queue(events) {
                        self.errors.report("event", format_args!("{err}"));
                    }
                }
                self.deliver_events(events);
            }
        }
        if self.control_deferred && !announcing {
            self.control_deferred = false;
            if let Err(err) = self.process_control_queue(vrings) {
                self.errors.report("control", format_args!("{err}"));
            }
        }
        if self.card.take_disconnect_request() {
            match &self.connection {
                Some(handle) => {
                    warn!("scenario: closing the vhost-user connection");
                    handle.shutdown();
                }
                None => warn!("scenario: disconnect requested but no connection handle"),
            }
        }
        self.update_timer();
    }

    fn update_timer(&mut self) {
        let wanted = self.card.wants_ticks()
            || !self.delayed.is_empty()
            || self.card.storm_pending()
            || self.announcing_since_ns.is_some();
        if wanted == self.timer_armed {
            return;
        }
        let result = if wanted {
            self.timer.reset(self.options.tick, Some(self.options.tick))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = wanted,
            Err(err) => warn!(
                "cannot {} the sample-clock timer: {err}",
                if wanted { "arm" } else { "disarm" }
            ),
        }
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own reads flags and touches no memory.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own only changes its status flags.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
