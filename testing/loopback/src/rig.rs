//! The reference driver (`vdaq-driver`) on the host, over the loopback transport, with
//! interrupts delivered asynchronously by a thread watching the call eventfds — exactly where
//! a guest's interrupt handler would run the top half. Tests and benchmarks drive the device
//! through this one driver; nothing here re-implements driver logic.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use vdaq_driver::irq::IrqState;
use vdaq_driver::{DaqDriver, DmaBuffer, DriverError, DriverOptions, ReadOutcome, Wait};
use vdaq_wire::check::{StreamError, StreamStats, StreamVerifier};
use vdaq_wire::{queue, VIRTIO_ID_DAQ};
use virtio_drivers::transport::DeviceType;

use crate::arena::ArenaHal;
use crate::process::BackendProcess;
use crate::transport::{InterruptThread, TransportError, VhostUserTransport};

/// The reference driver over the loopback transport.
pub type LoopbackDriver = DaqDriver<ArenaHal, VhostUserTransport>;

/// Why the rig could not be set up or a stream did not finish.
#[derive(Debug, Error)]
pub enum RigError {
    /// The vhost-user connection could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The driver refused the device or failed.
    #[error("driver: {0:?}")]
    Driver(DriverError),
    /// The backend process did not start.
    #[error("backend: {0}")]
    Backend(#[from] std::io::Error),
    /// The device ID is not one virtio-drivers knows.
    #[error("device ID {0} unknown to virtio-drivers")]
    DeviceId(u16),
    /// Nothing completed before the rig's deadline.
    #[error("stream stalled after {0:?}")]
    Stalled(StreamStats),
    /// A completed buffer failed verification.
    #[error("buffer failed verification: {0:?}")]
    Verify(StreamError),
    /// A read ended other than with data.
    #[error("read ended {0:?}")]
    Outcome(ReadOutcome),
}

impl From<DriverError> for RigError {
    fn from(err: DriverError) -> Self {
        RigError::Driver(err)
    }
}

/// The driver's [`Wait`] on the host: sleeps until the interrupt thread ran the top half, or
/// until the deadline passes.
#[derive(Debug)]
pub struct HostWait {
    signal: Arc<(Mutex<u64>, Condvar)>,
    seen: u64,
    /// Waits give up from here on.
    pub deadline: Instant,
}

impl Wait for HostWait {
    fn wait(&mut self) -> bool {
        let (count, changed) = &*self.signal;
        let Ok(mut count) = count.lock() else {
            return false;
        };
        while *count == self.seen {
            let now = Instant::now();
            if now >= self.deadline {
                return false;
            }
            match changed.wait_timeout(count, self.deadline - now) {
                Ok((guard, _)) => count = guard,
                Err(_) => return false,
            }
        }
        self.seen = *count;
        true
    }
}

/// How [`DriverRig::stream`] hands consumed buffers back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resubmit {
    /// One notification check per buffer.
    Each,
    /// All buffers of a completion pass, then one kick (the bare-metal guest's way).
    Batched,
}

/// The driver, its interrupt thread and its wait, connected to a running backend.
pub struct DriverRig {
    /// The reference driver.
    pub driver: LoopbackDriver,
    /// Its interrupt state (top half, pending flag, interrupt count).
    pub irq: &'static IrqState,
    /// The wait the driver's commands use; its deadline bounds the whole rig.
    pub wait: HostWait,
    _interrupts: InterruptThread,
    config_changes_while_stopped: Arc<std::sync::atomic::AtomicU64>,
    /// The backend, when the rig started it (dropped after the driver and its connection).
    backend: Option<BackendProcess>,
}

impl std::fmt::Debug for DriverRig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverRig")
            .field("driver", &self.driver)
            .field("interrupts", &self.irq.interrupts())
            .finish_non_exhaustive()
    }
}

impl DriverRig {
    /// Connects to the backend listening at `socket` and initialises the driver with
    /// `options`. Every wait of the rig gives up `timeout` from now.
    pub fn connect(
        socket: &Path,
        options: DriverOptions,
        timeout: Duration,
    ) -> Result<Self, RigError> {
        let device_type =
            DeviceType::try_from(VIRTIO_ID_DAQ).map_err(|_| RigError::DeviceId(VIRTIO_ID_DAQ))?;
        let transport = VhostUserTransport::connect(
            socket,
            device_type,
            queue::COUNT,
            vdaq_driver::DATA_QUEUE_SIZE as u32,
        )?;
        let source = transport.interrupt_source()?;
        let config_changes_while_stopped = transport.config_changes_while_stopped();
        // The driver's interrupt state must outlive the interrupt thread and the driver; a
        // rig lives for one test or benchmark case, so leaking this small struct is cheap.
        let irq: &'static IrqState = Box::leak(Box::new(IrqState::host()));
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let delivered = signal.clone();
        let interrupts = InterruptThread::spawn(source, move |config_changed| {
            if config_changed {
                irq.note_config_change();
            }
            irq.top_half();
            let (count, changed) = &*delivered;
            if let Ok(mut count) = count.lock() {
                *count += 1;
            }
            changed.notify_all();
        });
        let driver = DaqDriver::new(transport, irq, options)?;
        Ok(DriverRig {
            driver,
            irq,
            wait: HostWait {
                signal,
                seen: 0,
                deadline: Instant::now() + timeout,
            },
            _interrupts: interrupts,
            config_changes_while_stopped,
            backend: None,
        })
    }

    /// Starts the backend `binary` with `args` and connects to it; the backend lives as long
    /// as the rig.
    pub fn spawn(
        binary: &Path,
        args: &[&str],
        options: DriverOptions,
        timeout: Duration,
    ) -> Result<Self, RigError> {
        let backend = BackendProcess::spawn(binary, args)?;
        let mut rig = DriverRig::connect(backend.socket(), options, timeout)?;
        rig.backend = Some(backend);
        Ok(rig)
    }

    /// The backend process, when the rig started it.
    pub fn backend(&self) -> Option<&BackendProcess> {
        self.backend.as_ref()
    }

    /// Configuration-change messages the backend sent while the device was stopped: each would
    /// have crashed QEMU's generic vhost-user device.
    pub fn config_changes_while_stopped(&self) -> u64 {
        self.config_changes_while_stopped
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Interrupts the top half has taken so far.
    pub fn interrupts(&self) -> u64 {
        self.irq.interrupts()
    }

    /// Keeps `in_flight` reads (new ones of `buffer_bytes`) submitted, consumes completions
    /// in order, verifies every sample and resubmits, until the verifier has seen `frames`
    /// frames; sleeps only when there is nothing to consume.
    pub fn stream(
        &mut self,
        verifier: &mut StreamVerifier,
        in_flight: usize,
        buffer_bytes: usize,
        frames: u64,
        resubmit: Resubmit,
    ) -> Result<(), RigError> {
        self.stream_until(verifier, in_flight, buffer_bytes, resubmit, |verifier| {
            verifier.stats().frames >= frames
        })
    }

    /// [`DriverRig::stream`] until `done` says so (checked after each completion pass).
    pub fn stream_until(
        &mut self,
        verifier: &mut StreamVerifier,
        in_flight: usize,
        buffer_bytes: usize,
        resubmit: Resubmit,
        mut done: impl FnMut(&StreamVerifier) -> bool,
    ) -> Result<(), RigError> {
        while self.driver.in_flight() < in_flight {
            self.driver
                .submit_read(DmaBuffer::new(buffer_bytes))
                .map_err(|(err, _)| err)?;
        }
        while !done(verifier) {
            self.driver.service();
            if self.driver.needs_reset() {
                // The device stopped streaming (an event or a configuration change said so):
                // nothing more will complete until the application recovers.
                return Err(RigError::Driver(DriverError::NeedsReset));
            }
            let mut consumed = false;
            while let Some(read) = self.driver.next_completion() {
                consumed = true;
                match read.outcome {
                    ReadOutcome::Data(_) => {
                        verifier
                            .check(read.buffer.as_slice(), read.used_len)
                            .map_err(RigError::Verify)?;
                    }
                    other => return Err(RigError::Outcome(other)),
                }
                match resubmit {
                    Resubmit::Each => self.driver.submit_read(read.buffer),
                    Resubmit::Batched => self.driver.submit_read_batched(read.buffer),
                }
                .map_err(|(err, _)| err)?;
            }
            if resubmit == Resubmit::Batched {
                self.driver.kick();
            }
            if !consumed && !self.irq.is_pending() && !self.wait.wait() {
                return Err(RigError::Stalled(verifier.stats()));
            }
        }
        Ok(())
    }

    /// STOP, then FLUSH, then verifies every returned read; returns how many FLUSH returned.
    pub fn stop_and_drain(&mut self, verifier: &mut StreamVerifier) -> Result<u32, RigError> {
        self.driver.stop(&mut self.wait)?;
        let returned = self.driver.flush(&mut self.wait)?;
        while let Some(read) = self.driver.next_completion() {
            if let ReadOutcome::Data(_) = read.outcome {
                verifier
                    .check(read.buffer.as_slice(), read.used_len)
                    .map_err(RigError::Verify)?;
            }
        }
        Ok(returned)
    }
}
