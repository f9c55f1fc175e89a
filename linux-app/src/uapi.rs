//! The vdaq kernel module's user-space ABI (`linux-driver/uapi/vdaq.h`), in Rust.
//!
//! Records the device defines (config space, STATUS, CONFIGURE, SET_TRIGGER, FLUSH reply,
//! events) are the wire crate's own types: the driver passes them through unchanged. Only the
//! driver's own records (`vdaq_info`, `vdaq_events`, `vdaq_stats`) are defined here. The test
//! at the bottom compiles the C header and checks every size and offset against these types.

// The whole ABI is here (and checked against the C header by the test below); the application
// uses only part of it.
#![allow(dead_code)]

use vdaq_wire::config::DaqConfig;
use vdaq_wire::event::Event;

/// `VDAQ_IOC_MAGIC`.
const MAGIC: u32 = 0xDA;

/// Linux's `_IOC(dir, type, nr, size)` (asm-generic layout, x86 and arm64 alike).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (MAGIC << 8) | nr
}
const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;

/// `VDAQ_IOC_GET_CONFIG`: identity, negotiated features, config space.
pub const GET_CONFIG: u32 = ioc(READ, 0x00, size_of::<Info>());
/// `VDAQ_IOC_CONFIGURE`.
pub const CONFIGURE: u32 = ioc(WRITE, 0x01, size_of::<vdaq_wire::control::Configure>());
/// `VDAQ_IOC_START`.
pub const START: u32 = ioc(NONE, 0x02, 0);
/// `VDAQ_IOC_STOP`.
pub const STOP: u32 = ioc(NONE, 0x03, 0);
/// `VDAQ_IOC_STATUS`.
pub const STATUS: u32 = ioc(READ, 0x04, size_of::<vdaq_wire::control::Status>());
/// `VDAQ_IOC_TRIGGER`.
pub const TRIGGER: u32 = ioc(NONE, 0x05, 0);
/// `VDAQ_IOC_SET_TRIGGER`.
pub const SET_TRIGGER: u32 = ioc(WRITE, 0x06, size_of::<vdaq_wire::control::TriggerConfig>());
/// `VDAQ_IOC_FLUSH`.
pub const FLUSH: u32 = ioc(READ, 0x07, size_of::<vdaq_wire::control::FlushReply>());
/// `VDAQ_IOC_RESET_COUNTERS`.
pub const RESET_COUNTERS: u32 = ioc(NONE, 0x08, 0);
/// `VDAQ_IOC_READ_EVENTS`.
pub const READ_EVENTS: u32 = ioc(READ, 0x09, size_of::<Events>());
/// `VDAQ_IOC_GET_STATS`.
pub const GET_STATS: u32 = ioc(READ, 0x0a, size_of::<Stats>());

/// `VDAQ_TRANSPORT_PCI`.
pub const TRANSPORT_PCI: u32 = 1;
/// `VDAQ_TRANSPORT_MMIO`.
pub const TRANSPORT_MMIO: u32 = 2;
/// `VDAQ_EVENTS_MAX`.
pub const EVENTS_MAX: usize = 16;

/// `struct vdaq_info`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Info {
    /// Negotiated virtio features.
    pub features: u64,
    /// Virtio device ID.
    pub device_id: u32,
    /// Virtio vendor ID.
    pub vendor_id: u32,
    /// Most reads in flight.
    pub data_queue_size: u32,
    /// Largest read always accepted.
    pub max_read_bytes: u32,
    /// Channels × sample size now.
    pub frame_bytes: u32,
    /// `TRANSPORT_*`.
    pub transport: u32,
    /// One read of the configuration space.
    pub config: DaqConfig,
}

/// `struct vdaq_events`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Events {
    /// Records in `events`.
    pub count: u32,
    /// Records lost since the last call.
    pub dropped: u32,
    /// The records, oldest first.
    pub events: [Event; EVENTS_MAX],
}

/// `struct vdaq_stats`: the driver's counters.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Stats {
    /// Reads completed with data.
    pub completed: u64,
    /// Reads completed with an error.
    pub errors: u64,
    /// Completions with a bad length or header.
    pub invalid: u64,
    /// Used length 0 or BAD_BUFFER.
    pub rejected: u64,
    /// Reads taken back by a reset.
    pub reclaimed: u64,
    /// Cancellation requests.
    pub cancellations: u64,
    /// Reads the device holds now.
    pub pending: u64,
    /// Sum of the headers' `dropped_frames`.
    pub dropped_frames: u64,
    /// Headers flagged OVERRUN.
    pub overrun_buffers: u64,
    /// Event records received.
    pub events: u64,
    /// Event records lost (ring full).
    pub events_dropped: u64,
    /// Virtqueue callbacks (top halves).
    pub interrupts: u64,
    /// Bottom-half runs.
    pub bottom_halves: u64,
    /// Buffers found by the re-check after re-enabling callbacks.
    pub found_on_recheck: u64,
    /// Device resets (recoveries).
    pub resets: u64,
    /// Bytes returned by reads.
    pub bytes: u64,
    /// Lost interrupts the driver's watchdog covered.
    pub watchdog_recoveries: u64,
    /// Configuration-change notifications.
    pub config_changes: u64,
    /// Protocol violations of the device the driver detected.
    pub violations: u64,
    /// The first one's code (`vdaq_wire::violation::Violation::code`), 0 if none.
    pub first_violation: u64,
    /// Events of kinds the driver ignores.
    pub unknown_events: u64,
    /// Resets whose device counters the driver read first (the sums below cover those).
    pub resets_with_status: u64,
    /// Frames the device had produced just before each reset, summed.
    pub before_reset_produced: u64,
    /// … delivered …
    pub before_reset_delivered: u64,
    /// … dropped …
    pub before_reset_dropped: u64,
    /// … pending.
    pub before_reset_pending: u64,
    /// Notifications of the data queue the driver sent (kicks).
    pub data_notifications: u64,
}

#[cfg(test)]
mod tests {
    //! The C header against these types and the wire crate's: compiled with the host's C
    //! compiler, every size and offset printed and compared.

    use std::mem::offset_of;
    use std::path::Path;
    use std::process::Command;

    use vdaq_wire::buffer::BufferHeader;
    use vdaq_wire::config::DaqConfig;
    use vdaq_wire::control::{Configure, FlushReply, Status, TriggerConfig};
    use vdaq_wire::event::Event;

    use super::*;

    /// (C expression, value the Rust side has).
    fn expectations() -> Vec<(&'static str, u64)> {
        let u = |v: usize| v as u64;
        let mut list = vec![
            ("sizeof(struct vdaq_config)", u(size_of::<DaqConfig>())),
            (
                "offsetof(struct vdaq_config, rate_hz)",
                u(offset_of!(DaqConfig, rate_hz)),
            ),
            (
                "offsetof(struct vdaq_config, format)",
                u(offset_of!(DaqConfig, format)),
            ),
            (
                "offsetof(struct vdaq_config, state)",
                u(offset_of!(DaqConfig, state)),
            ),
            (
                "offsetof(struct vdaq_config, seed)",
                u(offset_of!(DaqConfig, seed)),
            ),
            (
                "offsetof(struct vdaq_config, firmware_version)",
                u(offset_of!(DaqConfig, firmware_version)),
            ),
            (
                "offsetof(struct vdaq_config, model)",
                u(offset_of!(DaqConfig, model)),
            ),
            (
                "offsetof(struct vdaq_config, full_scale_uv)",
                u(offset_of!(DaqConfig, full_scale_uv)),
            ),
            (
                "sizeof(struct vdaq_buffer_header)",
                u(size_of::<BufferHeader>()),
            ),
            (
                "offsetof(struct vdaq_buffer_header, timestamp_ns)",
                u(offset_of!(BufferHeader, timestamp_ns)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, frame_count)",
                u(offset_of!(BufferHeader, frame_count)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, flags)",
                u(offset_of!(BufferHeader, flags)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, status)",
                u(offset_of!(BufferHeader, status)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, channels)",
                u(offset_of!(BufferHeader, channels)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, signal)",
                u(offset_of!(BufferHeader, signal)),
            ),
            (
                "offsetof(struct vdaq_buffer_header, rate_hz)",
                u(offset_of!(BufferHeader, rate_hz)),
            ),
            ("sizeof(struct vdaq_configure)", u(size_of::<Configure>())),
            (
                "offsetof(struct vdaq_configure, channels)",
                u(offset_of!(Configure, channels)),
            ),
            (
                "offsetof(struct vdaq_configure, seed)",
                u(offset_of!(Configure, seed)),
            ),
            (
                "offsetof(struct vdaq_configure, clock)",
                u(offset_of!(Configure, clock)),
            ),
            ("sizeof(struct vdaq_trigger)", u(size_of::<TriggerConfig>())),
            (
                "offsetof(struct vdaq_trigger, post_frames)",
                u(offset_of!(TriggerConfig, post_frames)),
            ),
            ("sizeof(struct vdaq_status)", u(size_of::<Status>())),
            (
                "offsetof(struct vdaq_status, buffers_held)",
                u(offset_of!(Status, buffers_held)),
            ),
            (
                "offsetof(struct vdaq_status, state)",
                u(offset_of!(Status, state)),
            ),
            (
                "sizeof(struct vdaq_flush_reply)",
                u(size_of::<FlushReply>()),
            ),
            ("sizeof(struct vdaq_event)", u(size_of::<Event>())),
            (
                "offsetof(struct vdaq_event, arg1)",
                u(offset_of!(Event, arg1)),
            ),
            ("sizeof(struct vdaq_info)", u(size_of::<Info>())),
            (
                "offsetof(struct vdaq_info, transport)",
                u(offset_of!(Info, transport)),
            ),
            (
                "offsetof(struct vdaq_info, config)",
                u(offset_of!(Info, config)),
            ),
            ("sizeof(struct vdaq_events)", u(size_of::<Events>())),
            (
                "offsetof(struct vdaq_events, events)",
                u(offset_of!(Events, events)),
            ),
            ("sizeof(struct vdaq_stats)", u(size_of::<Stats>())),
            (
                "offsetof(struct vdaq_stats, watchdog_recoveries)",
                u(offset_of!(Stats, watchdog_recoveries)),
            ),
            (
                "offsetof(struct vdaq_stats, config_changes)",
                u(offset_of!(Stats, config_changes)),
            ),
            (
                "offsetof(struct vdaq_stats, first_violation)",
                u(offset_of!(Stats, first_violation)),
            ),
            (
                "offsetof(struct vdaq_stats, unknown_events)",
                u(offset_of!(Stats, unknown_events)),
            ),
            (
                "offsetof(struct vdaq_stats, before_reset_pending)",
                u(offset_of!(Stats, before_reset_pending)),
            ),
            (
                "offsetof(struct vdaq_stats, data_notifications)",
                u(offset_of!(Stats, data_notifications)),
            ),
            ("VDAQ_IOC_GET_CONFIG", u64::from(GET_CONFIG)),
            ("VDAQ_IOC_CONFIGURE", u64::from(CONFIGURE)),
            ("VDAQ_IOC_START", u64::from(START)),
            ("VDAQ_IOC_STOP", u64::from(STOP)),
            ("VDAQ_IOC_STATUS", u64::from(STATUS)),
            ("VDAQ_IOC_TRIGGER", u64::from(TRIGGER)),
            ("VDAQ_IOC_SET_TRIGGER", u64::from(SET_TRIGGER)),
            ("VDAQ_IOC_FLUSH", u64::from(FLUSH)),
            ("VDAQ_IOC_RESET_COUNTERS", u64::from(RESET_COUNTERS)),
            ("VDAQ_IOC_READ_EVENTS", u64::from(READ_EVENTS)),
            ("VDAQ_IOC_GET_STATS", u64::from(GET_STATS)),
            ("VDAQ_VIRTIO_ID", u64::from(vdaq_wire::VIRTIO_ID_DAQ)),
            ("VDAQ_HEADER_SIZE", u(vdaq_wire::buffer::HEADER_SIZE)),
            ("VDAQ_EVENT_SIZE", u(vdaq_wire::event::EVENT_SIZE)),
            ("VDAQ_CONFIG_SIZE", u(vdaq_wire::config::CONFIG_SIZE)),
            ("VDAQ_MODEL_LEN", u(vdaq_wire::config::MODEL_LEN)),
            ("VDAQ_MAX_CHANNELS", u64::from(vdaq_wire::MAX_CHANNELS)),
            ("VDAQ_F_CRC32", u64::from(vdaq_wire::feature::DAQ_F_CRC32)),
            (
                "VDAQ_F_TRIGGER",
                u64::from(vdaq_wire::feature::DAQ_F_TRIGGER),
            ),
            (
                "VDAQ_FIRMWARE_MAJOR",
                u64::from(vdaq_wire::FIRMWARE_VERSION >> 16),
            ),
            ("VDAQ_EVENTS_MAX", u(EVENTS_MAX)),
            ("VDAQ_TRANSPORT_PCI", u64::from(TRANSPORT_PCI)),
            ("VDAQ_TRANSPORT_MMIO", u64::from(TRANSPORT_MMIO)),
        ];
        // The violation codes the driver reports, as the wire crate numbers them.
        use vdaq_wire::violation::Violation;
        let codes = [
            (
                "VDAQ_VIOLATION_USED_LEN_OVER",
                Violation::UsedLengthOverBuffer,
            ),
            (
                "VDAQ_VIOLATION_USED_LEN_UNDER_HEADER",
                Violation::UsedLengthUnderHeader,
            ),
            ("VDAQ_VIOLATION_HEADER_LENGTH", Violation::HeaderLength),
            (
                "VDAQ_VIOLATION_HEADER_CONFIGURATION",
                Violation::HeaderConfiguration,
            ),
            (
                "VDAQ_VIOLATION_HEADER_MALFORMED",
                Violation::HeaderMalformed,
            ),
            (
                "VDAQ_VIOLATION_USED_ID_OUT_OF_RANGE",
                Violation::UsedIdOutOfRange,
            ),
            (
                "VDAQ_VIOLATION_USED_ID_NOT_IN_FLIGHT",
                Violation::UsedIdNotInFlight,
            ),
            (
                "VDAQ_VIOLATION_COMPLETION_ORDER",
                Violation::CompletionOrder,
            ),
            ("VDAQ_VIOLATION_USED_ID_REFUSED", Violation::UsedIdRefused),
            ("VDAQ_VIOLATION_REPLY_SHORT", Violation::ReplyShort),
            ("VDAQ_VIOLATION_REPLY_LONG", Violation::ReplyLong),
            ("VDAQ_VIOLATION_REPLY_STATUS", Violation::ReplyStatus),
            ("VDAQ_VIOLATION_REPLY_MISSING", Violation::ReplyMissing),
            (
                "VDAQ_VIOLATION_REPLY_UNSOLICITED",
                Violation::ReplyUnsolicited,
            ),
            (
                "VDAQ_VIOLATION_CONFIG_IMPOSSIBLE",
                Violation::ConfigImpossible,
            ),
        ];
        assert_eq!(
            codes.len(),
            Violation::ALL.len(),
            "every violation has a code"
        );
        for (name, violation) in codes {
            list.push((name, violation.code()));
        }
        list
    }

    #[test]
    fn the_c_header_matches_the_wire_crate_and_this_module() {
        let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../linux-driver/uapi/vdaq.h");
        let dir = std::env::temp_dir().join(format!("vdaq-uapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let expectations = expectations();
        let mut program = format!(
            "#include <stddef.h>\n#include <stdio.h>\n#include \"{}\"\nint main(void)\n{{\n",
            header.display()
        );
        for (expression, _) in &expectations {
            program.push_str(&format!(
                "\tprintf(\"%llu\\n\", (unsigned long long)({expression}));\n"
            ));
        }
        program.push_str("\treturn 0;\n}\n");
        let source = dir.join("layout.c");
        let binary = dir.join("layout");
        std::fs::write(&source, program).expect("write the C program");
        let compiled = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("a C compiler (cc) runs");
        assert!(
            compiled.status.success(),
            "the uapi header compiles: {}",
            String::from_utf8_lossy(&compiled.stderr)
        );
        let output = Command::new(&binary).output().expect("layout program runs");
        let printed: Vec<u64> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.parse().expect("a number per line"))
            .collect();
        assert_eq!(printed.len(), expectations.len());
        for ((expression, rust), c) in expectations.iter().zip(&printed) {
            assert_eq!(c, rust, "{expression}: C says {c}, Rust says {rust}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
