//! A virtio-drivers [`Transport`] whose "device" is a vhost-user backend: status, features,
//! queue setup and config accesses become vhost-user messages, notifications are kick
//! eventfds, and interrupts are call eventfds. Any driver written against virtio-drivers'
//! `Transport` can thereby run on the host against the real backend.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::error;
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::arena::arena;

/// Errors while setting up a loopback connection.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A vhost-user request failed.
    #[error("vhost-user {request} failed: {source}")]
    VhostUser {
        /// Which request.
        request: &'static str,
        /// Cause.
        source: vhost::Error,
    },
    /// A request failed during device initialisation.
    #[error("device initialisation failed: {0}")]
    Setup(String),
    /// An eventfd or epoll operation failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

fn vu(request: &'static str) -> impl FnOnce(vhost::Error) -> TransportError {
    move |source| TransportError::VhostUser { request, source }
}

/// What [`InterruptSource::wait`] returns for a configuration-change notification.
pub const CONFIG_SIGNAL: u16 = u16::MAX;

/// How long the relay takes to handle a backend request. QEMU serves the channel from its main
/// loop, which lags the vCPU by milliseconds on a loaded host; a device that lets the driver
/// act on a fault before the frontend took its notification is caught by this lag.
const RELAY_LATENCY: std::time::Duration = std::time::Duration::from_millis(50);

/// The frontend's side of the backend-request channel: what QEMU does with a
/// CONFIG_CHANGE_MSG (a new config generation and a configuration-change interrupt).
struct ConfigChangeRelay {
    generation: Arc<AtomicU32>,
    interrupt: EventFd,
    /// The driver has the device running (DRIVER_OK, not reset since).
    started: Arc<AtomicBool>,
    /// Resets so far: one during the relay's lag means QEMU would have stopped the device
    /// with the message still unread.
    resets: Arc<AtomicU64>,
    /// Messages that came while the device was stopped. QEMU's generic device dies of
    /// SIGSEGV on each (it notifies through the vhost device's `vdev`, NULL while stopped);
    /// this relay counts them, and drops them as QEMU cannot deliver them either.
    while_stopped: Arc<AtomicU64>,
}

impl VhostUserFrontendReqHandler for ConfigChangeRelay {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let resets_before = self.resets.load(Ordering::Acquire);
        let started_before = self.started.load(Ordering::Acquire);
        std::thread::sleep(RELAY_LATENCY);
        let stopped_meanwhile = self.resets.load(Ordering::Acquire) != resets_before;
        if !started_before || stopped_meanwhile || !self.started.load(Ordering::Acquire) {
            self.while_stopped.fetch_add(1, Ordering::AcqRel);
            return Ok(0);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.interrupt.write(1)?;
        Ok(0)
    }
}

struct QueueFds {
    kick: EventFd,
    call: EventFd,
    configured: bool,
}

/// A vhost-user connection presented as a virtio transport.
pub struct VhostUserTransport {
    frontend: RefCell<Frontend>,
    device_type: DeviceType,
    device_features: u64,
    driver_features: u64,
    protocol_features_offered: bool,
    status: DeviceStatus,
    max_queue_size: u32,
    queues: Vec<QueueFds>,
    interrupts: InterruptSource,
    config_generation: Arc<AtomicU32>,
    device_started: Arc<AtomicBool>,
    resets: Arc<AtomicU64>,
    config_changes_while_stopped: Arc<AtomicU64>,
    first_error: RefCell<Option<String>>,
    /// Declared last: dropped after the frontend connection, whose end makes the backend
    /// close its side of the channel as well.
    _backend_requests: Option<BackendRequests>,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to the backend listening at `socket`, negotiates protocol features and shares
    /// the loopback guest memory. `device_type` is what the driver will be told (vhost-user
    /// has no device-ID query; the frontend decides, as QEMU's `virtio-id` does).
    pub fn connect(
        socket: &Path,
        device_type: DeviceType,
        num_queues: u16,
        max_queue_size: u32,
    ) -> Result<Self, TransportError> {
        let mut frontend =
            Frontend::connect(socket, u64::from(num_queues)).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol_features_offered = features & protocol_bit != 0;
        let mut negotiated = VhostUserProtocolFeatures::empty();
        if protocol_features_offered {
            let offered = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            let wanted = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ
                    | VhostUserProtocolFeatures::RESET_DEVICE);
            frontend
                .set_protocol_features(wanted)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
            negotiated = wanted;
            if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request waits for the backend's acknowledgement, so no setting is
                // still in flight when the first kick arrives.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let region = VhostUserMemoryRegionInfo::from_guest_region(arena().region())
            .map_err(vu("describe memory"))?;
        frontend
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;
        let epoll = Epoll::new().map_err(|source| TransportError::Os {
            what: "epoll",
            source,
        })?;
        let config_generation = Arc::new(AtomicU32::new(0));
        let device_started = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let config_changes_while_stopped = Arc::new(AtomicU64::new(0));
        let config_interrupt = EventFd::new(EFD_NONBLOCK).map_err(|source| TransportError::Os {
            what: "config eventfd",
            source,
        })?;
        let backend_requests = if negotiated.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            Some(serve_backend_requests(
                &mut frontend,
                negotiated.contains(VhostUserProtocolFeatures::REPLY_ACK),
                ConfigChangeRelay {
                    generation: config_generation.clone(),
                    started: device_started.clone(),
                    resets: resets.clone(),
                    while_stopped: config_changes_while_stopped.clone(),
                    interrupt: config_interrupt.try_clone().map_err(|source| {
                        TransportError::Os {
                            what: "config eventfd clone",
                            source,
                        }
                    })?,
                },
            )?)
        } else {
            None
        };
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&config_interrupt),
                EpollEvent::new(EventSet::IN, u64::from(CONFIG_SIGNAL)),
            )
            .map_err(|source| TransportError::Os {
                what: "epoll add",
                source,
            })?;
        let mut queues = Vec::new();
        let mut calls = Vec::new();
        for index in 0..num_queues {
            let fds = QueueFds {
                kick: EventFd::new(EFD_NONBLOCK).map_err(|source| TransportError::Os {
                    what: "kick eventfd",
                    source,
                })?,
                call: EventFd::new(EFD_NONBLOCK).map_err(|source| TransportError::Os {
                    what: "call eventfd",
                    source,
                })?,
                configured: false,
            };
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&fds.call),
                    EpollEvent::new(EventSet::IN, u64::from(index)),
                )
                .map_err(|source| TransportError::Os {
                    what: "epoll add",
                    source,
                })?;
            calls.push(fds.call.try_clone().map_err(|source| TransportError::Os {
                what: "call eventfd clone",
                source,
            })?);
            queues.push(fds);
        }
        let interrupts = InterruptSource {
            epoll: std::sync::Arc::new(epoll),
            calls: std::sync::Arc::new(calls),
            config: std::sync::Arc::new(config_interrupt),
        };
        Ok(VhostUserTransport {
            frontend: RefCell::new(frontend),
            device_type,
            device_features: features & !protocol_bit,
            driver_features: 0,
            protocol_features_offered,
            status: DeviceStatus::empty(),
            max_queue_size,
            queues,
            interrupts,
            config_generation,
            device_started,
            resets,
            config_changes_while_stopped,
            first_error: RefCell::new(None),
            _backend_requests: backend_requests,
        })
    }

    /// The first vhost-user error seen since connecting, if any (transport methods cannot
    /// return errors, so they are kept here).
    pub fn error(&self) -> Option<String> {
        self.first_error.borrow().clone()
    }

    /// Configuration-change messages the backend sent while the device was stopped (each one
    /// would crash QEMU's generic vhost-user device); shared, so it can be read once the
    /// transport belongs to a driver.
    pub fn config_changes_while_stopped(&self) -> Arc<AtomicU64> {
        self.config_changes_while_stopped.clone()
    }

    /// Features both sides agreed on.
    pub fn negotiated_features(&self) -> u64 {
        self.driver_features
    }

    fn record<T>(&self, request: &str, result: vhost::Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                error!("vhost-user {request} failed: {err}");
                self.first_error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("{request}: {err}"));
                None
            }
        }
    }

    /// Waits up to `timeout` for the device to signal any queue (an interrupt), and consumes
    /// the signals that arrived. Returns the queues that were signalled.
    pub fn wait_interrupt(&self, timeout: Duration) -> Vec<u16> {
        self.interrupts.wait(timeout)
    }

    /// A handle on the call eventfds that can wait for interrupts from another thread (an
    /// "interrupt controller" for a driver that owns this transport).
    pub fn interrupt_source(&self) -> Result<InterruptSource, TransportError> {
        self.interrupts.try_clone()
    }
}

impl Transport for VhostUserTransport {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.driver_features = driver_features & self.device_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.max_queue_size
    }

    fn notify(&mut self, queue: u16) {
        if let Some(fds) = self.queues.get(usize::from(queue)) {
            if let Err(err) = fds.kick.write(1) {
                error!("kick of queue {queue} failed: {err}");
            }
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let before = self.status;
        if status.is_empty() && before.contains(DeviceStatus::DRIVER_OK) {
            // Device reset: stop every ring, then reset the backend.
            self.device_started.store(false, Ordering::Release);
            self.resets.fetch_add(1, Ordering::AcqRel);
            for queue in 0..self.queues.len() {
                self.queue_unset(queue as u16);
            }
            let result = self.frontend.borrow_mut().reset_device();
            self.record("RESET_DEVICE", result);
        }
        if status.contains(DeviceStatus::FEATURES_OK) && !before.contains(DeviceStatus::FEATURES_OK)
        {
            let mut features = self.driver_features;
            if self.protocol_features_offered {
                features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            }
            let result = self.frontend.borrow().set_features(features);
            self.record("SET_FEATURES", result);
        }
        if status.contains(DeviceStatus::DRIVER_OK) && !before.contains(DeviceStatus::DRIVER_OK) {
            // As QEMU's vhost_dev_start: the device counts as started before its rings are.
            self.device_started.store(true, Ordering::Release);
            for queue in 0..self.queues.len() {
                if self.queues[queue].configured {
                    let result = self.frontend.borrow_mut().set_vring_enable(queue, true);
                    self.record("SET_VRING_ENABLE", result);
                }
            }
        }
        self.status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let index = usize::from(queue);
        let Some(fds) = self.queues.get(index) else {
            return;
        };
        let arena = arena();
        let config = VringConfigData {
            queue_max_size: size as u16,
            queue_size: size as u16,
            flags: 0,
            desc_table_addr: arena.host_address(descriptors),
            used_ring_addr: arena.host_address(device_area),
            avail_ring_addr: arena.host_address(driver_area),
            log_addr: None,
        };
        let frontend = self.frontend.borrow();
        let steps: [(&str, vhost::Result<()>); 5] = [
            ("SET_VRING_NUM", frontend.set_vring_num(index, size as u16)),
            ("SET_VRING_ADDR", frontend.set_vring_addr(index, &config)),
            ("SET_VRING_BASE", frontend.set_vring_base(index, 0)),
            ("SET_VRING_CALL", frontend.set_vring_call(index, &fds.call)),
            ("SET_VRING_KICK", frontend.set_vring_kick(index, &fds.kick)),
        ];
        drop(frontend);
        for (request, result) in steps {
            self.record(request, result);
        }
        self.queues[index].configured = true;
        if self.status.contains(DeviceStatus::DRIVER_OK) {
            let result = self.frontend.borrow_mut().set_vring_enable(index, true);
            self.record("SET_VRING_ENABLE", result);
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        let index = usize::from(queue);
        if !self.queues.get(index).is_some_and(|q| q.configured) {
            return;
        }
        let result = self.frontend.borrow().get_vring_base(index);
        self.record("GET_VRING_BASE", result);
        self.queues[index].configured = false;
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.queues
            .get(usize::from(queue))
            .is_some_and(|q| q.configured)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut status = InterruptStatus::empty();
        for fds in &self.queues {
            if fds.call.read().is_ok() {
                status |= InterruptStatus::QUEUE_INTERRUPT;
            }
        }
        status
    }

    fn read_config_generation(&self) -> u32 {
        // As QEMU's: vhost-user has no generation counter of its own, so the frontend counts
        // configuration-change notifications (GET_CONFIG returns one consistent snapshot).
        self.config_generation.load(Ordering::Acquire)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let size = size_of::<T>();
        let buf = vec![0u8; size];
        let result = self.frontend.borrow_mut().get_config(
            offset as u32,
            size as u32,
            VhostUserConfigFlags::WRITABLE,
            &buf,
        );
        let (_, payload) = self
            .record("GET_CONFIG", result)
            .ok_or(virtio_drivers::Error::IoError)?;
        T::read_from_bytes(&payload).map_err(|_| virtio_drivers::Error::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let result = self.frontend.borrow_mut().set_config(
            offset as u32,
            VhostUserConfigFlags::WRITABLE,
            value.as_bytes(),
        );
        self.record("SET_CONFIG", result)
            .ok_or(virtio_drivers::Error::IoError)
    }
}

/// The call eventfds of a connection, as an interrupt source.
#[derive(Clone)]
pub struct InterruptSource {
    epoll: std::sync::Arc<Epoll>,
    calls: std::sync::Arc<Vec<EventFd>>,
    config: std::sync::Arc<EventFd>,
}

impl std::fmt::Debug for InterruptSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptSource").finish_non_exhaustive()
    }
}

impl InterruptSource {
    fn try_clone(&self) -> Result<Self, TransportError> {
        Ok(self.clone())
    }

    /// Waits up to `timeout` for any queue's call eventfd or a configuration change; consumes
    /// what was signalled and returns those queue indices ([`CONFIG_SIGNAL`] for the config).
    pub fn wait(&self, timeout: Duration) -> Vec<u16> {
        let mut events = [EpollEvent::default(); 8];
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let count = loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(count) => break count,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    error!("epoll wait failed: {err}");
                    return Vec::new();
                }
            }
        };
        let mut signalled = Vec::new();
        for event in &events[..count] {
            let queue = event.data() as u16;
            if queue == CONFIG_SIGNAL {
                if self.config.read().is_ok() {
                    signalled.push(queue);
                }
            } else if let Some(call) = self.calls.get(usize::from(queue)) {
                // Reading resets the eventfd counter: signals collapse, as on an
                // edge-triggered interrupt line.
                if call.read().is_ok() {
                    signalled.push(queue);
                }
            }
        }
        signalled
    }
}

/// A thread that turns call-eventfd signals into calls of `on_interrupt`, asynchronously to
/// the driver, like an interrupt controller. Stops when dropped.
pub struct InterruptThread {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for InterruptThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptThread").finish_non_exhaustive()
    }
}

impl InterruptThread {
    /// Starts delivering `source`'s signals to `on_interrupt`, whose argument says whether a
    /// configuration change was among them (the cause an ISR read would show).
    pub fn spawn(source: InterruptSource, on_interrupt: impl Fn(bool) + Send + 'static) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Acquire) {
                let signalled = source.wait(Duration::from_millis(20));
                if !signalled.is_empty() {
                    on_interrupt(signalled.contains(&CONFIG_SIGNAL));
                }
            }
        });
        InterruptThread {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for InterruptThread {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread serving the backend-request channel. vhost's `FrontendReqHandler` keeps its own
/// copy of the channel's other end, so the thread would never see the channel close: on drop,
/// a shutdown of its socket ends the wait, and the thread is joined.
struct BackendRequests {
    /// A second descriptor of the handler's socket (the same socket: shutting it down ends
    /// the handler's receive).
    socket: std::os::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BackendRequests {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on a descriptor this struct owns; it only changes the socket's
        // state, which both descriptors share.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Hands the backend its request channel and serves it from a thread of its own, until the
/// backend closes its end or the returned guard is dropped.
fn serve_backend_requests(
    frontend: &mut Frontend,
    reply_ack: bool,
    relay: ConfigChangeRelay,
) -> Result<BackendRequests, TransportError> {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    let mut handler =
        FrontendReqHandler::new(Arc::new(relay)).map_err(|err| TransportError::VhostUser {
            request: "backend-request channel",
            source: err.into(),
        })?;
    handler.set_reply_ack_flag(reply_ack);
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .map_err(vu("SET_BACKEND_REQ_FD"))?;
    // SAFETY: the handler owns this descriptor and is alive here; the borrow ends before the
    // handler moves into its thread, and only a duplicate is kept.
    let socket = unsafe { BorrowedFd::borrow_raw(handler.as_raw_fd()) }
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| TransportError::Os {
            what: "backend-request socket",
            source,
        })?;
    let thread = std::thread::Builder::new()
        .name("vhost-user backend requests".into())
        .spawn(move || while handler.handle_request().is_ok() {})
        .map_err(|source| TransportError::Os {
            what: "backend-request thread",
            source,
        })?;
    Ok(BackendRequests {
        socket,
        thread: Some(thread),
    })
}
