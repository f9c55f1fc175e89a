//! The reference driver against a device that breaks the rules: used entries with any id and
//! length, headers with any fields, events of any kind and length, command replies of any
//! size and status, configuration changes. The driver must never panic, never let a buffer
//! go twice, and account for every read it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdaq_driver::fake::{
    self, FakeDaqTransport, FakeDevice, FakeHal, FakeWait, CAUSE_CONFIG_CHANGE, CAUSE_USED_BUFFER,
};
use vdaq_driver::{DaqDriver, DmaBuffer, DriverOptions};
use vdaq_fuzz::Input;
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE};
use vdaq_wire::event::Event;
use vdaq_wire::{feature, queue, SampleFormat};

type Driver = DaqDriver<FakeHal, FakeDaqTransport>;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (device, transport) = FakeDevice::new(
        feature::DEVICE_FEATURES,
        &fake::config(SampleFormat::S32, 2),
    );
    let Ok(mut driver) = Driver::new(transport, device.irq(), DriverOptions::default()) else {
        return;
    };
    let mut submitted = 0u64;
    let mut steps = 0;
    while !input.is_empty() && steps < 128 {
        steps += 1;
        match input.u8() % 10 {
            0 | 1 => {
                let len = HEADER_SIZE + usize::from(input.u16() % 2048);
                if driver.submit_read(DmaBuffer::new(len)).is_ok() {
                    submitted += 1;
                }
            }
            // The device fills the next read with a header of its choosing.
            2 | 3 => {
                if device.avail_pending(queue::DATA) == 0 {
                    continue;
                }
                let chain = device.take_read();
                let header = BufferHeader {
                    sequence: u64::from(input.u16()).into(),
                    first_frame: u64::from(input.u32()).into(),
                    timestamp_ns: u64::from(input.u32()).into(),
                    dropped_frames: u64::from(input.u8()).into(),
                    frame_count: u32::from(input.u16()).into(),
                    trigger_frame: u32::from(input.u8()).into(),
                    flags: input.u16().into(),
                    status: input.u8() % 3,
                    format: input.u8() % 5,
                    channels: u16::from(input.u8() % 4).into(),
                    ..Default::default()
                };
                let payload_len = usize::from(input.u8());
                let payload = input.take(payload_len).to_vec();
                let written = device.fill_read(&chain, &header, &payload);
                let used = match input.u8() % 4 {
                    0 => written as u32,
                    1 => 0,
                    _ => input.u32(),
                };
                device.complete(&chain, used);
                device.interrupt(CAUSE_USED_BUFFER);
            }
            // A used entry with any id and length (ids the driver never gave included).
            4 => {
                let q = u16::from(input.u8() % 3);
                let id = u32::from(input.u16());
                let len = input.u32();
                device.put_used(q, id, len);
                device.interrupt(CAUSE_USED_BUFFER);
            }
            // An event of any kind and length.
            5 => {
                if device.avail_pending(queue::EVENT) == 0 {
                    continue;
                }
                let event = Event {
                    kind: u32::from(input.u8() % 8).into(),
                    arg0: u64::from(input.u32()).into(),
                    arg1: u64::from(input.u32()).into(),
                    ..Default::default()
                };
                device.send_event(&event, u32::from(input.u8()));
                device.interrupt(CAUSE_USED_BUFFER);
            }
            // A command, answered with any status and reply bytes (or not at all).
            6 => {
                let op = u32::from(input.u8() % 9);
                let status = u32::from(input.u8() % 6);
                let reply_len = usize::from(input.u8() % 96);
                let reply = input.take(reply_len).to_vec();
                let used = u32::from(input.u8());
                let raw = input.u8() & 1 != 0;
                let mut wait = FakeWait::new(&device).then(move |device| {
                    let command = device.take_command();
                    if raw {
                        device.reply_raw(&command, &reply, used);
                    } else {
                        device.reply(&command, status, &reply);
                    }
                });
                let payload = vec![0; vdaq_wire::control::command_payload_size(op).unwrap_or(0)];
                let _ = driver.command_raw(op, &payload, &mut wait);
            }
            // A configuration change, maybe with impossible values.
            7 => {
                let state = input.u8() % 4;
                let channels = input.u16();
                device.set_config(|c| {
                    c.state = state;
                    c.channels = channels.into();
                });
                device.interrupt(CAUSE_CONFIG_CHANGE);
            }
            8 => {
                let id = driver.in_flight() as u64;
                let _ = driver.cancel(vdaq_driver::RequestId(id));
            }
            _ => {}
        }
        driver.service();
        while driver.next_completion().is_some() {}
        while driver.next_event().is_some() {}
        assert!(
            driver.in_flight() as u64 <= submitted,
            "no read appears from nowhere"
        );
    }
});
