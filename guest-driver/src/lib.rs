//! Reference driver for the vdaq virtio DAQ device (`docs/spec.md`), `no_std`, on
//! `virtio-drivers`.
//!
//! The structure follows an acquisition-card driver:
//! - [`irq::IrqState::top_half`] runs in interrupt context: acknowledge, mask the line,
//!   mark work pending — nothing else;
//! - [`DaqDriver::service`] is the bottom half: pop used buffers, validate them against what
//!   was submitted, complete requests, unmask, then re-check the rings so no completion that
//!   arrived in between is lost;
//! - a cancel-safe request table owns every submitted buffer until the device returns it;
//!   [`DaqDriver::shutdown`] drains them all before resetting the device.
//!
//! The driver never touches the interrupt controller or page tables: the application passes
//! a [`virtio_drivers::Hal`], an [`irq::InterruptLine`] to mask/unmask, and a [`Wait`] that
//! sleeps until the next interrupt. It is generic over [`virtio_drivers::transport::Transport`],
//! so the same code runs in the guest (PCI with MSI-X, MMIO) and in host tests (a vhost-user
//! loopback transport against the real backend).

#![no_std]

extern crate alloc;

pub mod dma;
mod driver;
#[cfg(test)]
mod driver_tests;
/// The scripted fake device, for this crate's tests and (feature `fake`) the fuzz targets.
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod irq;
pub mod mmio;
pub mod pci;

pub use dma::DmaBuffer;
pub use driver::{
    Completion, DaqDriver, DriverError, DriverOptions, DriverStats, Features, ReadOutcome,
    RecoveryReport, RequestId, ShutdownReport, Wait, DATA_QUEUE_SIZE,
};
