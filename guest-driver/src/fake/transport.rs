//! A [`Transport`] whose device is a test: every register the driver reads or writes is a
//! field of [`DeviceState`], shared with the test's [`super::FakeDevice`] through an
//! `Arc<Mutex<…>>`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::std::sync::{Mutex, MutexGuard, PoisonError};
use vdaq_wire::{queue, VIRTIO_ID_DAQ};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Number of virtqueues (index with `usize::from(queue::…)`).
pub const QUEUES: usize = queue::COUNT as usize;

/// A virtqueue as the driver set it up, plus the device's own ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Queue size the driver chose; 0 when the queue is not set up.
    pub size: u32,
    /// Descriptor table address.
    pub descriptors: PhysAddr,
    /// Driver area (available ring) address.
    pub driver_area: PhysAddr,
    /// Device area (used ring) address.
    pub device_area: PhysAddr,
    /// Next available-ring index the device will take.
    pub last_avail: u16,
    /// Used-ring index the device will write next (what it last published as `used.idx`).
    pub used_idx: u16,
}

/// Everything the fake device exposes through the transport.
#[derive(Debug)]
pub struct DeviceState {
    /// Feature bits the device offers.
    pub device_features: u64,
    /// Feature bits the driver wrote, most recent last.
    pub driver_features: Vec<u64>,
    /// Device status now.
    pub status: DeviceStatus,
    /// Every status value the driver wrote, in order.
    pub status_writes: Vec<DeviceStatus>,
    /// When set, the device does not accept the features the driver wrote: writing
    /// FEATURES_OK leaves the bit clear (virtio 1.x, 3.1.1 step 6).
    pub refuse_features: bool,
    /// Largest queue size the device allows, per queue.
    pub max_queue_size: [u32; QUEUES],
    /// Configuration space bytes (normally a [`vdaq_wire::config::DaqConfig`]; a test may
    /// truncate it).
    pub config: Vec<u8>,
    /// Configuration generation.
    pub config_generation: u32,
    /// Config-space writes the driver attempted (the device ignores them).
    pub config_writes: u32,
    /// Config-space reads the driver made.
    pub config_reads: u32,
    /// Queues as set up.
    pub queues: [QueueState; QUEUES],
    /// Notifications per queue.
    pub notifications: [u32; QUEUES],
    /// Device resets (status 0 written).
    pub resets: u32,
    /// Interrupt-status bits `ack_interrupt` reports (and clears).
    pub interrupt_status: u32,
    /// Queue indices the driver passed that do not exist (the device has exactly 3 queues).
    pub bad_queue_indices: Vec<u16>,
    /// Runs once, at the next reset, before the device forgets its queues (a vhost-user
    /// device returns the buffers it holds when its rings stop).
    pub on_reset: ResetHook,
}

/// What the device does at the next reset.
#[derive(Default)]
pub struct ResetHook(pub Option<Box<dyn FnOnce() + Send>>);

impl core::fmt::Debug for ResetHook {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ResetHook(set)"
        } else {
            "ResetHook(none)"
        })
    }
}

impl DeviceState {
    /// The device after power-on, offering `device_features`, with configuration `config`.
    pub fn new(device_features: u64, config: Vec<u8>) -> Self {
        DeviceState {
            device_features,
            driver_features: Vec::new(),
            status: DeviceStatus::empty(),
            status_writes: Vec::new(),
            refuse_features: false,
            max_queue_size: [1024; QUEUES],
            config,
            config_generation: 0,
            config_writes: 0,
            config_reads: 0,
            queues: [QueueState::default(); QUEUES],
            notifications: [0; QUEUES],
            resets: 0,
            interrupt_status: 0,
            bad_queue_indices: Vec::new(),
            on_reset: ResetHook::default(),
        }
    }

    fn queue_mut(&mut self, queue: u16) -> Option<&mut QueueState> {
        let state = self.queues.get_mut(usize::from(queue));
        if state.is_none() {
            self.bad_queue_indices.push(queue);
        }
        state
    }
}

/// Locks the shared state, whether or not another holder panicked.
pub fn lock(state: &Mutex<DeviceState>) -> MutexGuard<'_, DeviceState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The driver's side of the fake device.
#[derive(Debug)]
pub struct FakeDaqTransport {
    state: Arc<Mutex<DeviceState>>,
}

impl FakeDaqTransport {
    /// A transport onto `state`.
    pub fn new(state: Arc<Mutex<DeviceState>>) -> Self {
        FakeDaqTransport { state }
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        lock(&self.state)
    }
}

impl Transport for FakeDaqTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(VIRTIO_ID_DAQ).expect("the vdaq ID is a known virtio device type")
    }

    fn read_device_features(&mut self) -> u64 {
        self.state().device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.state().driver_features.push(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        let state = self.state();
        state
            .max_queue_size
            .get(usize::from(queue))
            .copied()
            .unwrap_or(0)
    }

    fn notify(&mut self, queue: u16) {
        let mut state = self.state();
        match state.notifications.get_mut(usize::from(queue)) {
            Some(count) => *count += 1,
            None => state.bad_queue_indices.push(queue),
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.state().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            // The hook works on the rings through the device handle, which takes the lock.
            let hook = self.state().on_reset.0.take();
            if let Some(hook) = hook {
                hook();
            }
        }
        let mut state = self.state();
        state.status_writes.push(status);
        if status.is_empty() {
            // Reset: the device forgets its queues and its ring positions (the driver's ring
            // memory is untouched).
            state.resets += 1;
            state.queues = [QueueState::default(); QUEUES];
            state.interrupt_status = 0;
            state.status = status;
            return;
        }
        state.status = if state.refuse_features {
            status - DeviceStatus::FEATURES_OK
        } else {
            status
        };
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
        let mut state = self.state();
        if let Some(queue) = state.queue_mut(queue) {
            *queue = QueueState {
                size,
                descriptors,
                driver_area,
                device_area,
                last_avail: 0,
                used_idx: 0,
            };
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        let mut state = self.state();
        if let Some(queue) = state.queue_mut(queue) {
            *queue = QueueState::default();
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        let state = self.state();
        state
            .queues
            .get(usize::from(queue))
            .is_some_and(|queue| queue.descriptors != 0)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut state = self.state();
        let bits = core::mem::take(&mut state.interrupt_status);
        InterruptStatus::from_bits_truncate(bits)
    }

    fn read_config_generation(&self) -> u32 {
        self.state().config_generation
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let mut state = self.state();
        state.config_reads += 1;
        let end = offset
            .checked_add(size_of::<T>())
            .ok_or(Error::ConfigSpaceTooSmall)?;
        let bytes = state
            .config
            .get(offset..end)
            .ok_or(Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> Result<(), Error> {
        // The vdaq configuration space is read-only: writes are ignored (spec 5.x.7).
        self.state().config_writes += 1;
        Ok(())
    }
}
