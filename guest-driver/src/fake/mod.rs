//! A scripted fake vdaq device for the driver's unit tests, after virtio-drivers'
//! `transport/fake.rs` and `hal/fake.rs` (which are private to that crate's own tests):
//!
//! - [`FakeHal`]: DMA memory is host heap memory, physical address == virtual address, with a
//!   registry of live allocations and shared buffers that the device checks every access
//!   against;
//! - [`FakeDaqTransport`]: the driver's view — features, status, the configuration space as
//!   [`DaqConfig`] bytes, queue addresses, interrupt status — all in a [`DeviceState`] the test
//!   shares through an `Arc<Mutex<…>>`;
//! - [`FakeDevice`]: the test's view — takes the driver's available chains from the split
//!   rings in host memory, writes replies, puts any `(id, len)` on a used ring and raises the
//!   interrupt the driver's top half handles;
//! - [`FakeWait`]: a [`crate::Wait`] that plays the device's next scripted step on every wait.
//!
//! Every vdaq layout and number comes from `vdaq_wire`; only the virtio ring layout (virtio
//! 1.x, 2.7) is spelled out here.

extern crate std;

pub mod device;
pub mod hal;
pub mod transport;

pub use device::{Chain, FakeDevice, FakeWait, CAUSE_CONFIG_CHANGE, CAUSE_USED_BUFFER};
pub use hal::FakeHal;
pub use transport::FakeDaqTransport;

use vdaq_wire::config::{DaqConfig, MODEL_LEN};
use vdaq_wire::{ClockMode, DeviceState as DaqState, SampleFormat, SignalKind, FIRMWARE_VERSION};

/// A power-on configuration space of a vdaq device streaming `channels` × `format`.
pub fn config(format: SampleFormat, channels: u16) -> DaqConfig {
    let mut model = [0; MODEL_LEN];
    model[..vdaq_wire::MODEL_NAME.len()].copy_from_slice(vdaq_wire::MODEL_NAME);
    let supported = SampleFormat::ALL
        .iter()
        .fold(0, |mask, format| mask | format.mask());
    DaqConfig {
        max_channels: 16.into(),
        channels: channels.into(),
        supported_formats: supported.into(),
        min_rate_hz: 1.into(),
        max_rate_hz: 1_000_000.into(),
        rate_hz: 48_000.into(),
        fifo_frames: 4096.into(),
        watermark_frames: 64.into(),
        latency_us: 10_000.into(),
        signal_freq_mhz: 1000.into(),
        coalesce_buffers: 1.into(),
        amplitude_permille: 1000.into(),
        format: format as u8,
        signal: SignalKind::Counter as u8,
        clock: ClockMode::Paced as u8,
        state: DaqState::Stopped as u8,
        fault_code: 0.into(),
        seed: 0.into(),
        frames_produced: 0.into(),
        frames_delivered: 0.into(),
        frames_dropped: 0.into(),
        buffers_completed: 0.into(),
        requests_rejected: 0.into(),
        firmware_version: FIRMWARE_VERSION.into(),
        events_lost: 0.into(),
        model,
        full_scale_uv: 10_000_000.into(),
        tick_us: 1000.into(),
    }
}
