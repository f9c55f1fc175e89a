//! The guest application's report: one JSON line on the serial console, prefixed with
//! [`REPORT_PREFIX`], read by the launcher. The guest writes it with [`Report::write_json`]
//! (no allocator, no serde); the host parses it with serde (feature `serde`) into the same
//! struct, so the field list exists once.

use core::fmt::{self, Write};

use crate::check::StreamStats;

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
    /// Run mode ("stream", "overrun", "shutdown"; the Linux guest also "cancel", "close-pending").
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
    /// Notifications of new read buffers the driver sent the device (data-queue kicks, each a
    /// VM exit); 0 where the driver does not count them (the Linux guest).
    pub data_notifications: u64,
    /// Configuration-change notifications the driver took.
    pub config_interrupts: u64,
    /// Completions found by the re-check after re-enabling interrupts.
    pub found_on_recheck: u64,
    /// Reads the device rejected.
    pub rejected: u64,
    /// Reads with inconsistent used length or header.
    pub invalid: u64,
    /// Protocol violations of the device the driver detected (the first is named in
    /// `failure`).
    pub protocol_violations: u64,
    /// Events of kinds the driver does not know (ignored, as the spec says).
    pub unknown_events: u64,
    /// Reads in flight the application kept.
    pub reads_in_flight: u64,
    /// Bytes per read buffer.
    pub buffer_bytes: u64,
    /// Guest time spent streaming (ns).
    pub guest_time_ns: u64,
    /// Of that, the time the guest's CPU was idle, waiting for the device (ns): near
    /// `guest_time_ns`, the device or its notifications bound the rate; near 0, the guest does.
    pub guest_idle_ns: u64,
    /// Verified payload throughput in guest time (MiB/s).
    pub throughput_mib_s: f64,
    /// Same verification pass over buffers already in memory, no device (MiB/s); 0 if not run.
    pub consume_only_mib_s: f64,
    /// A fold over the same buffers, every byte read once and nothing checked (MiB/s): the
    /// guest's memory limit, the ceiling for `consume_only_mib_s`; 0 if not run.
    pub touch_only_mib_s: f64,
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
            ("data_notifications", self.data_notifications),
            ("config_interrupts", self.config_interrupts),
            ("found_on_recheck", self.found_on_recheck),
            ("rejected", self.rejected),
            ("invalid", self.invalid),
            ("protocol_violations", self.protocol_violations),
            ("unknown_events", self.unknown_events),
            ("reads_in_flight", self.reads_in_flight),
            ("buffer_bytes", self.buffer_bytes),
            ("guest_time_ns", self.guest_time_ns),
            ("guest_idle_ns", self.guest_idle_ns),
        ] {
            write!(out, ",\"{name}\":{value}")?;
        }
        out.write_str(",\"throughput_mib_s\":")?;
        json_f64(out, self.throughput_mib_s)?;
        out.write_str(",\"consume_only_mib_s\":")?;
        json_f64(out, self.consume_only_mib_s)?;
        out.write_str(",\"touch_only_mib_s\":")?;
        json_f64(out, self.touch_only_mib_s)?;
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

/// A device's counters just before a reset (GET_STATUS, or the Linux driver's record of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochCounters {
    /// Frames produced in the epoch.
    pub produced: u64,
    /// … delivered in buffers it completed before the reset …
    pub delivered: u64,
    /// … dropped …
    pub dropped: u64,
    /// … pending (in the FIFO or a partly filled buffer) at the reset.
    pub pending: u64,
}

impl EpochCounters {
    /// From a STATUS reply.
    pub fn from_status(status: &crate::control::Status) -> Self {
        EpochCounters {
            produced: status.frames_produced.get(),
            delivered: status.frames_delivered.get(),
            dropped: status.frames_dropped.get(),
            pending: status.frames_pending.get(),
        }
    }
}

/// Device accounting summed over the epochs (streams between device resets) closed so far;
/// each epoch's stream is verified on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epochs {
    /// Frames produced in closed epochs.
    pub produced: u64,
    /// Frames verified in closed epochs.
    pub delivered: u64,
    /// Frames dropped in closed epochs.
    pub dropped: u64,
    /// Frames pending at a reset that no returned buffer carried.
    pub discarded: u64,
    /// Drops of closed epochs that no header reported (after their last returned buffer).
    pub unreported_drops: u64,
}

impl Epochs {
    /// Closes an epoch: `before` is the device's counters just before the reset, `verified`
    /// the frames the application verified in the epoch (including reads the reset returned
    /// with data), `reported_drops` the drops its headers reported.
    pub fn close(
        &mut self,
        before: &EpochCounters,
        verified: u64,
        reported_drops: u64,
    ) -> Result<(), &'static str> {
        if verified < before.delivered || verified - before.delivered > before.pending {
            return Err("frames verified before a reset disagree with the device's counters");
        }
        if reported_drops > before.dropped {
            return Err("more drops reported in headers than the device counted");
        }
        self.produced += before.produced;
        self.delivered += verified;
        self.dropped += before.dropped;
        self.discarded += before.pending - (verified - before.delivered);
        self.unreported_drops += before.dropped - reported_drops;
        Ok(())
    }
}

/// The value at `per_mille` ‰ of `sorted` (0 when empty).
pub fn percentile(sorted: &[u32], per_mille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = (sorted.len() * per_mille / 1000).min(sorted.len() - 1);
    u64::from(sorted[index])
}

/// Frames the device dropped after the last buffer it returned: they can be in no header. The
/// stream verified up to `stream_end_frame`; everything the device produced after it is either
/// still pending or such a trailing drop.
pub fn trailing_drops(produced: u64, stream_end_frame: u64, pending: u64) -> u64 {
    produced
        .saturating_sub(stream_end_frame)
        .saturating_sub(pending)
}

impl Report<'_> {
    /// Fills the stream fields from the verifier's totals (`channels` per frame).
    pub fn record_stream(&mut self, stats: &StreamStats, channels: u16) {
        self.frames = stats.frames;
        self.samples = stats.frames * u64::from(channels);
        self.bytes = stats.payload_bytes;
        self.completions = stats.buffers;
        self.empty_completions = stats.empty_buffers;
        self.dropped_frames = stats.dropped_frames;
        self.overrun_buffers = stats.overrun_buffers;
        self.verify_errors = stats.errors;
        self.crc_checked = stats.crc_checked;
        self.crc_errors = stats.crc_errors;
    }

    /// Verified throughput from `bytes` and `guest_time_ns`.
    pub fn record_throughput(&mut self) {
        self.throughput_mib_s =
            self.bytes as f64 / (1024.0 * 1024.0) / (self.guest_time_ns as f64 / 1e9);
    }

    /// Fills throughput (over `guest_time_ns`, set before) and latency percentiles from the
    /// per-buffer latencies, sorted.
    pub fn record_timing(&mut self, sorted_latencies_us: &[u32]) {
        self.record_throughput();
        self.latency_p50_us = percentile(sorted_latencies_us, 500);
        self.latency_p99_us = percentile(sorted_latencies_us, 990);
        self.latency_max_us = sorted_latencies_us.last().copied().map_or(0, u64::from);
    }

    /// The checks every guest's run must pass (after the guest's own), in order; the first
    /// that fails, or `None`. `unexpected_reads` are reads that ended other than with data or
    /// as the application expected; `unreported_drops` are the device's drops no header could
    /// carry (see [`trailing_drops`]).
    pub fn common_failure(
        &self,
        unexpected_reads: u64,
        unreported_drops: u64,
    ) -> Option<&'static str> {
        let accounted = self.device_produced
            == self.device_delivered
                + self.device_dropped
                + self.frames_discarded_at_reset
                + self.device_pending;
        Some(if self.frames == 0 {
            "no data arrived"
        } else if self.interrupts == 0 {
            "data arrived without interrupts"
        } else if self.crc_errors > 0 {
            "payload CRC mismatch"
        } else if self.verify_errors > 0 {
            "samples failed verification"
        } else if unexpected_reads > 0 || self.invalid > 0 {
            "reads ended without data"
        } else if self.frames != self.device_delivered {
            "verified frames differ from frames the device delivered"
        } else if self.dropped_frames + unreported_drops != self.device_dropped {
            "dropped frames not all reported in buffer headers"
        } else if !accounted {
            "produced != delivered + dropped + discarded + pending"
        } else if self.shutdown_returned != self.shutdown_in_flight || self.device_held_after != 0 {
            "shutdown left reads in the device"
        } else if self.mode == "overrun" && self.dropped_frames == 0 {
            "overrun mode saw no overrun"
        } else {
            return None;
        })
    }
}

#[cfg(test)]
mod verdict_tests {
    use super::{percentile, trailing_drops, EpochCounters, Epochs, Report};

    #[test]
    fn epochs_account_every_frame_across_resets_and_refuse_what_cannot_be() {
        let mut epochs = Epochs::default();
        let before = EpochCounters {
            produced: 100,
            delivered: 60,
            dropped: 10,
            pending: 30,
        };
        // 60 delivered before the reset, 20 of the 30 pending returned by it.
        assert_eq!(epochs.close(&before, 80, 4), Ok(()));
        assert_eq!(
            epochs,
            Epochs {
                produced: 100,
                delivered: 80,
                dropped: 10,
                discarded: 10,
                unreported_drops: 6,
            }
        );
        let mut other = Epochs::default();
        assert!(other.close(&before, 59, 0).is_err(), "fewer than delivered");
        assert!(
            other.close(&before, 91, 0).is_err(),
            "more than delivered + pending"
        );
        assert!(
            other.close(&before, 80, 11).is_err(),
            "more drops than counted"
        );
        assert_eq!(other, Epochs::default(), "nothing counted when refused");
    }

    #[test]
    fn common_failure_names_the_first_broken_rule() {
        let good = Report {
            mode: "stream",
            frames: 100,
            interrupts: 3,
            device_produced: 130,
            device_delivered: 100,
            device_dropped: 20,
            dropped_frames: 15,
            device_pending: 10,
            shutdown_in_flight: 4,
            shutdown_returned: 4,
            ..Report::default()
        };
        assert_eq!(good.common_failure(0, 5), None);
        assert_eq!(
            good.common_failure(0, 4),
            Some("dropped frames not all reported in buffer headers")
        );
        assert_eq!(good.common_failure(1, 5), Some("reads ended without data"));
        let held = Report {
            device_held_after: 1,
            ..good.clone()
        };
        assert_eq!(
            held.common_failure(0, 5),
            Some("shutdown left reads in the device")
        );
        let overrun = Report {
            mode: "overrun",
            dropped_frames: 0,
            device_dropped: 5,
            device_produced: 115,
            ..good.clone()
        };
        assert_eq!(
            overrun.common_failure(0, 5),
            Some("overrun mode saw no overrun")
        );
        assert_eq!(percentile(&[1, 2, 3, 4], 500), 3);
        assert_eq!(percentile(&[], 990), 0);
        assert_eq!(trailing_drops(100, 80, 5), 15);
        assert_eq!(trailing_drops(10, 80, 5), 0);
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
            data_notifications: 9,
            config_interrupts: 121,
            found_on_recheck: 13,
            rejected: 14,
            invalid: 15,
            protocol_violations: 151,
            unknown_events: 152,
            reads_in_flight: 16,
            buffer_bytes: 17,
            guest_time_ns: 18,
            guest_idle_ns: 7,
            throughput_mib_s: 19.5,
            consume_only_mib_s: 20.25,
            touch_only_mib_s: 40.5,
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
