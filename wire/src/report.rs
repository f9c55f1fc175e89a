//! The guest application's report: one JSON line on the serial console, prefixed with
//! [`REPORT_PREFIX`], read by the launcher. The guest writes it with [`Report::write_json`]
//! (no allocator, no serde); the host parses it with serde (feature `serde`) into the same
//! struct, so the field list exists once.

use core::fmt::{self, Write};

/// Prefix of the report line.
pub const REPORT_PREFIX: &str = "VDAQ-REPORT ";
/// Prefix of a progress line: `VDAQ-PROGRESS <guest ms> <frames> <bytes> <interrupts>`.
pub const PROGRESS_PREFIX: &str = "VDAQ-PROGRESS ";
/// Line the guest prints when its first buffer verified.
pub const FIRST_SAMPLE_LINE: &str = "VDAQ-FIRST-SAMPLE";

/// What the guest application measured and concluded.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Report<'a> {
    /// "pci" or "mmio".
    pub transport: &'a str,
    /// Run mode ("stream", "overrun", "shutdown", "bench").
    pub mode: &'a str,
    /// Whether every check passed.
    pub pass: bool,
    /// Why not, if not ("" when passed).
    pub failure: &'a str,
    /// Frames verified.
    pub frames: u64,
    /// Samples verified (frames × channels).
    pub samples: u64,
    /// Payload bytes verified.
    pub bytes: u64,
    /// Read completions consumed.
    pub completions: u64,
    /// Completions with no frames (flushed/stopped empty).
    pub empty_completions: u64,
    /// Frames the device reported dropped in buffer headers.
    pub dropped_frames: u64,
    /// Buffers flagged OVERRUN.
    pub overrun_buffers: u64,
    /// Frames reported in OVERRUN events.
    pub overrun_event_frames: u64,
    /// Buffers that failed verification (sequence gaps, unflagged frame gaps, bad samples…).
    pub verify_errors: u64,
    /// Buffers whose CRC was checked.
    pub crc_checked: u64,
    /// Buffers whose CRC did not match.
    pub crc_errors: u64,
    /// Times the lost-interrupt watchdog found completions no interrupt announced.
    pub watchdog_recoveries: u64,
    /// FAULT events received.
    pub fault_events: u64,
    /// Device resets the application recovered from (NEEDS_RESET → reset → stream again).
    pub reset_recoveries: u64,
    /// Frames pending in the device at a reset that no returned buffer carried.
    pub frames_discarded_at_reset: u64,
    /// Hash of every buffer consumed (header and payload, in order), if asked for; 0 if not.
    pub stream_hash: u64,
    /// Interrupts taken.
    pub interrupts: u64,
    /// Bottom-half runs.
    pub bottom_halves: u64,
    /// Completions found by the re-check after re-enabling interrupts.
    pub found_on_recheck: u64,
    /// Reads the device rejected.
    pub rejected: u64,
    /// Reads with inconsistent used length or header.
    pub invalid: u64,
    /// Reads in flight the application kept.
    pub reads_in_flight: u64,
    /// Bytes per read buffer.
    pub buffer_bytes: u64,
    /// Guest time spent streaming (ns).
    pub guest_time_ns: u64,
    /// Verified payload throughput in guest time (MiB/s).
    pub throughput_mib_s: f64,
    /// Same verification pass over buffers already in memory, no device (MiB/s); 0 if not run.
    pub consume_only_mib_s: f64,
    /// Device timestamp of a buffer's first frame to its consumption: median (µs).
    pub latency_p50_us: u64,
    /// … 99th percentile (µs).
    pub latency_p99_us: u64,
    /// … maximum (µs).
    pub latency_max_us: u64,
    /// Device clock minus guest clock (ns), from a GET_STATUS exchange.
    pub clock_offset_ns: i64,
    /// Guest time from boot to the first verified buffer (ns).
    pub first_sample_guest_ns: u64,
    /// Device counters at the end: frames produced …
    pub device_produced: u64,
    /// … delivered …
    pub device_delivered: u64,
    /// … dropped …
    pub device_dropped: u64,
    /// … pending.
    pub device_pending: u64,
    /// Reads in flight when shutdown began.
    pub shutdown_in_flight: u64,
    /// Reads returned during shutdown.
    pub shutdown_returned: u64,
    /// Buffers the device still held after shutdown (must be 0).
    pub device_held_after: u64,
}

/// Writes `value` as a JSON string (quotes, backslashes and control characters escaped).
fn json_string(out: &mut impl Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}

/// JSON number for an f64 (JSON has no NaN or infinity).
fn json_f64(out: &mut impl Write, value: f64) -> fmt::Result {
    if value.is_finite() {
        write!(out, "{value:.3}")
    } else {
        out.write_str("0")
    }
}

impl Report<'_> {
    /// Writes the report as one JSON object (no newline).
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        out.write_str("{\"transport\":")?;
        json_string(out, self.transport)?;
        out.write_str(",\"mode\":")?;
        json_string(out, self.mode)?;
        write!(out, ",\"pass\":{}", self.pass)?;
        out.write_str(",\"failure\":")?;
        json_string(out, self.failure)?;
        for (name, value) in [
            ("frames", self.frames),
            ("samples", self.samples),
            ("bytes", self.bytes),
            ("completions", self.completions),
            ("empty_completions", self.empty_completions),
            ("dropped_frames", self.dropped_frames),
            ("overrun_buffers", self.overrun_buffers),
            ("overrun_event_frames", self.overrun_event_frames),
            ("verify_errors", self.verify_errors),
            ("crc_checked", self.crc_checked),
            ("crc_errors", self.crc_errors),
            ("watchdog_recoveries", self.watchdog_recoveries),
            ("fault_events", self.fault_events),
            ("stream_hash", self.stream_hash),
            ("reset_recoveries", self.reset_recoveries),
            ("frames_discarded_at_reset", self.frames_discarded_at_reset),
            ("interrupts", self.interrupts),
            ("bottom_halves", self.bottom_halves),
            ("found_on_recheck", self.found_on_recheck),
            ("rejected", self.rejected),
            ("invalid", self.invalid),
            ("reads_in_flight", self.reads_in_flight),
            ("buffer_bytes", self.buffer_bytes),
            ("guest_time_ns", self.guest_time_ns),
        ] {
            write!(out, ",\"{name}\":{value}")?;
        }
        out.write_str(",\"throughput_mib_s\":")?;
        json_f64(out, self.throughput_mib_s)?;
        out.write_str(",\"consume_only_mib_s\":")?;
        json_f64(out, self.consume_only_mib_s)?;
        for (name, value) in [
            ("latency_p50_us", self.latency_p50_us),
            ("latency_p99_us", self.latency_p99_us),
            ("latency_max_us", self.latency_max_us),
        ] {
            write!(out, ",\"{name}\":{value}")?;
        }
        write!(out, ",\"clock_offset_ns\":{}", self.clock_offset_ns)?;
        for (name, value) in [
            ("first_sample_guest_ns", self.first_sample_guest_ns),
            ("device_produced", self.device_produced),
            ("device_delivered", self.device_delivered),
            ("device_dropped", self.device_dropped),
            ("device_pending", self.device_pending),
            ("shutdown_in_flight", self.shutdown_in_flight),
            ("shutdown_returned", self.shutdown_returned),
            ("device_held_after", self.device_held_after),
        ] {
            write!(out, ",\"{name}\":{value}")?;
        }
        out.write_char('}')
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    extern crate std;
    use super::*;
    use std::string::String;

    #[test]
    fn the_guest_encoding_parses_back_into_the_same_report() {
        let report = Report {
            transport: "pci",
            mode: "stream",
            pass: false,
            failure: "verification failed",
            frames: 1,
            samples: 2,
            bytes: 3,
            completions: 4,
            empty_completions: 5,
            dropped_frames: 6,
            overrun_buffers: 7,
            overrun_event_frames: 8,
            verify_errors: 9,
            crc_checked: 10,
            crc_errors: 101,
            watchdog_recoveries: 102,
            fault_events: 103,
            stream_hash: u64::MAX - 1,
            reset_recoveries: 104,
            frames_discarded_at_reset: 105,
            interrupts: 11,
            bottom_halves: 12,
            found_on_recheck: 13,
            rejected: 14,
            invalid: 15,
            reads_in_flight: 16,
            buffer_bytes: 17,
            guest_time_ns: 18,
            throughput_mib_s: 19.5,
            consume_only_mib_s: 20.25,
            latency_p50_us: 21,
            latency_p99_us: 22,
            latency_max_us: 23,
            clock_offset_ns: -24,
            first_sample_guest_ns: 25,
            device_produced: 26,
            device_delivered: 27,
            device_dropped: 28,
            device_pending: 29,
            shutdown_in_flight: 30,
            shutdown_returned: 31,
            device_held_after: 32,
        };
        let mut json = String::new();
        report.write_json(&mut json).expect("write");
        let parsed: Report = serde_json::from_str(&json).expect("parses as Report");
        assert_eq!(parsed, report);
    }

    #[test]
    fn strings_are_escaped() {
        let report = Report {
            failure: "odd \"quote\" \\ and\nnewline",
            ..Report::default()
        };
        let mut json = String::new();
        report.write_json(&mut json).expect("write");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(value["failure"], "odd \"quote\" \\ and\nnewline");
    }
}
