//! A minimal host-side vdaq driver over the loopback transport: enough to run the device
//! end to end (commands, read buffers, events) in tests and benchmarks. The reference
//! driver with the full top-half/bottom-half discipline is guest-driver/.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use vdaq_wire::config::DaqConfig;
use vdaq_wire::control::{self, CommandHeader, ResponseHeader, Status};
use vdaq_wire::event::{Event, EVENT_SIZE};
use vdaq_wire::{feature, queue, VIRTIO_ID_DAQ};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceType, Transport};
use zerocopy::{FromBytes, IntoBytes};

use crate::arena::{ArenaHal, DmaBuffer};
use crate::transport::{TransportError, VhostUserTransport};

/// Data-queue size the loopback driver uses.
pub const DATA_QUEUE_SIZE: usize = 256;
const CONTROL_QUEUE_SIZE: usize = 16;
const EVENT_QUEUE_SIZE: usize = 16;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Loopback driver errors.
#[derive(Debug, Error)]
pub enum DaqError {
    /// Connection setup failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A virtqueue operation failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_drivers::Error),
    /// The device did not answer in time.
    #[error("no reply to opcode {0} within {COMMAND_TIMEOUT:?}")]
    Timeout(u32),
    /// The device answered with a reply shorter than a header.
    #[error("malformed reply to opcode {0}")]
    BadReply(u32),
    /// A command's status was not OK.
    #[error("opcode {opcode} answered with status {status}")]
    Status {
        /// Opcode.
        opcode: u32,
        /// Status code.
        status: u32,
    },
}

/// The device as the loopback driver sees it.
pub struct LoopbackDaq {
    transport: VhostUserTransport,
    data: VirtQueue<ArenaHal, DATA_QUEUE_SIZE>,
    control: VirtQueue<ArenaHal, CONTROL_QUEUE_SIZE>,
    events: VirtQueue<ArenaHal, EVENT_QUEUE_SIZE>,
    reads_in_flight: HashMap<u16, DmaBuffer>,
    events_in_flight: HashMap<u16, DmaBuffer>,
    /// Interrupts (call-eventfd signals) seen on the data queue.
    pub data_interrupts: u64,
}

impl std::fmt::Debug for LoopbackDaq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackDaq")
            .field("reads_in_flight", &self.reads_in_flight.len())
            .field("data_interrupts", &self.data_interrupts)
            .finish_non_exhaustive()
    }
}

impl LoopbackDaq {
    /// Connects to the backend at `socket` and initialises the device: features
    /// (VERSION_1, EVENT_IDX, and CRC32 if `crc`), three queues, DRIVER_OK.
    pub fn connect(socket: &Path, crc: bool) -> Result<Self, DaqError> {
        let device_type =
            DeviceType::try_from(VIRTIO_ID_DAQ).map_err(|_| virtio_drivers::Error::Unsupported)?;
        let mut transport =
            VhostUserTransport::connect(socket, device_type, queue::COUNT, DATA_QUEUE_SIZE as u32)?;
        let mut wanted = (1u64 << feature::VIRTIO_F_VERSION_1) | (1 << feature::VIRTIO_F_EVENT_IDX);
        if crc {
            wanted |= 1 << feature::DAQ_F_CRC32;
        }
        let negotiated = transport.begin_init(vdaq_driver::Features(wanted)).0;
        let event_idx = negotiated & (1 << feature::VIRTIO_F_EVENT_IDX) != 0;
        let data = VirtQueue::new(&mut transport, queue::DATA, false, event_idx)?;
        let control = VirtQueue::new(&mut transport, queue::CONTROL, false, event_idx)?;
        let events = VirtQueue::new(&mut transport, queue::EVENT, false, event_idx)?;
        transport.finish_init();
        if let Some(err) = transport.error() {
            return Err(DaqError::Transport(TransportError::Setup(err)));
        }
        Ok(LoopbackDaq {
            transport,
            data,
            control,
            events,
            reads_in_flight: HashMap::new(),
            events_in_flight: HashMap::new(),
            data_interrupts: 0,
        })
    }

    /// Features agreed with the device.
    pub fn negotiated_features(&self) -> u64 {
        self.transport.negotiated_features()
    }

    /// Reads the whole configuration space.
    pub fn config(&self) -> Result<DaqConfig, DaqError> {
        Ok(self.transport.read_config_space::<DaqConfig>(0)?)
    }

    /// Sends one command and waits for its reply; returns (status, reply payload).
    pub fn command_raw(&mut self, opcode: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), DaqError> {
        let mut request = DmaBuffer::new(size_of::<CommandHeader>() + payload.len());
        let header = CommandHeader {
            opcode: opcode.into(),
            reserved: 0.into(),
        };
        request.as_mut_slice()[..8].copy_from_slice(header.as_bytes());
        request.as_mut_slice()[8..].copy_from_slice(payload);
        let mut reply = DmaBuffer::new(size_of::<ResponseHeader>() + 128);
        // SAFETY: both buffers stay alive and untouched until pop_used below returns them.
        let token = unsafe {
            self.control
                .add(&[request.as_slice()], &mut [reply.as_mut_slice()])?
        };
        if self.control.should_notify() {
            self.transport.notify(queue::CONTROL);
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.control.peek_used() != Some(token) {
            let now = Instant::now();
            if now >= deadline {
                return Err(DaqError::Timeout(opcode));
            }
            let signalled = self.transport.wait_interrupt(deadline - now);
            if signalled.contains(&queue::DATA) {
                self.data_interrupts += 1;
            }
        }
        // SAFETY: the same buffers that were added with this token.
        let used = unsafe {
            self.control
                .pop_used(token, &[request.as_slice()], &mut [reply.as_mut_slice()])?
        } as usize;
        if used < size_of::<ResponseHeader>() {
            return Err(DaqError::BadReply(opcode));
        }
        let bytes = reply.as_slice();
        let status = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        Ok((status, bytes[8..used].to_vec()))
    }

    /// Sends one command that must succeed; returns its reply payload.
    pub fn command(&mut self, opcode: u32, payload: &[u8]) -> Result<Vec<u8>, DaqError> {
        match self.command_raw(opcode, payload)? {
            (control::status::OK, reply) => Ok(reply),
            (status, _) => Err(DaqError::Status { opcode, status }),
        }
    }

    /// GET_STATUS.
    pub fn status(&mut self) -> Result<Status, DaqError> {
        let reply = self.command(control::opcode::GET_STATUS, &[])?;
        Status::read_from_bytes(&reply).map_err(|_| DaqError::BadReply(control::opcode::GET_STATUS))
    }

    /// Posts a read buffer; the device owns it until it completes.
    pub fn post_read(&mut self, mut buffer: DmaBuffer) -> Result<u16, DaqError> {
        // SAFETY: the buffer is kept in `reads_in_flight` (its pages do not move) and not
        // touched until pop_used returns it.
        let token = unsafe { self.data.add(&[], &mut [buffer.as_mut_slice()])? };
        self.reads_in_flight.insert(token, buffer);
        Ok(token)
    }

    /// Tells the device about newly posted read buffers.
    ///
    /// Always kicks: virtio-drivers 0.13's `should_notify` compares the avail index with
    /// avail_event without modular arithmetic, so after the 16-bit index wraps it can say "no"
    /// when the device is waiting. A spurious kick only costs the backend one extra wake-up.
    /// (The reference guest driver implements the spec's vring_need_event instead.)
    pub fn notify_reads(&mut self) {
        self.transport.notify(queue::DATA);
    }

    /// Read buffers the device holds.
    pub fn reads_in_flight(&self) -> usize {
        self.reads_in_flight.len()
    }

    /// Waits up to `timeout` for an interrupt; counts data-queue ones.
    pub fn wait_interrupt(&mut self, timeout: Duration) -> bool {
        let signalled = self.transport.wait_interrupt(timeout);
        if signalled.contains(&queue::DATA) {
            self.data_interrupts += 1;
        }
        !signalled.is_empty()
    }

    /// Takes the next completed read buffer and its used length.
    pub fn pop_read(&mut self) -> Result<Option<(DmaBuffer, usize)>, DaqError> {
        let Some(token) = self.data.peek_used() else {
            return Ok(None);
        };
        let Some(mut buffer) = self.reads_in_flight.remove(&token) else {
            return Err(DaqError::Queue(virtio_drivers::Error::WrongToken));
        };
        // SAFETY: `buffer` is the one added with `token`.
        let used = unsafe {
            self.data
                .pop_used(token, &[], &mut [buffer.as_mut_slice()])?
        };
        Ok(Some((buffer, used as usize)))
    }

    /// Posts an event buffer.
    pub fn post_event_buffer(&mut self) -> Result<(), DaqError> {
        let mut buffer = DmaBuffer::new(EVENT_SIZE);
        // SAFETY: kept in `events_in_flight` until popped.
        let token = unsafe { self.events.add(&[], &mut [buffer.as_mut_slice()])? };
        self.events_in_flight.insert(token, buffer);
        if self.events.should_notify() {
            self.transport.notify(queue::EVENT);
        }
        Ok(())
    }

    /// Takes the next delivered event (None if none, or if the device returned the buffer
    /// empty).
    pub fn pop_event(&mut self) -> Result<Option<Event>, DaqError> {
        let Some(token) = self.events.peek_used() else {
            return Ok(None);
        };
        let Some(mut buffer) = self.events_in_flight.remove(&token) else {
            return Err(DaqError::Queue(virtio_drivers::Error::WrongToken));
        };
        // SAFETY: `buffer` is the one added with `token`.
        let used = unsafe {
            self.events
                .pop_used(token, &[], &mut [buffer.as_mut_slice()])?
        };
        if (used as usize) < EVENT_SIZE {
            return Ok(None);
        }
        Ok(Event::read_from_bytes(buffer.as_slice()).ok())
    }

    /// Resets the device (stops every ring, RESET_DEVICE).
    pub fn reset(&mut self) {
        self.transport
            .set_status(virtio_drivers::transport::DeviceStatus::empty());
    }
}

impl Drop for LoopbackDaq {
    fn drop(&mut self) {
        // Stop the rings before their memory returns to the arena, so the device never
        // writes into pages that are reused.
        self.reset();
    }
}
