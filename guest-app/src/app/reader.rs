//! The application: keeps N reads in flight like overlapped I/O, drains completions the way a
//! completion port is drained, verifies every sample, halts while waiting, and reports.

use vdaq_driver::irq::IrqState;
use vdaq_driver::{DaqDriver, DmaBuffer, DriverError, DriverOptions, ReadOutcome, Wait};
use vdaq_wire::buffer::BufferHeader;
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::config::DaqConfig;
use vdaq_wire::event::kind;
use vdaq_wire::report::{
    trailing_drops, EpochCounters, Epochs, Report, FIRST_SAMPLE_LINE, PROGRESS_PREFIX,
};
use vdaq_wire::SampleFormat;
use virtio_drivers::transport::Transport;

use super::hal::GuestHal;
use super::params::Params;
use crate::arch::{interrupts, time};

/// How long completions may wait on the ring with no interrupt before the watchdog acts, at
/// least: longer when the device may legitimately hold the notification back (coalescing).
const WATCHDOG_NS: u64 = 30_000_000;

/// How long a command may go unanswered before the device counts as broken (spec [6.8-11]:
/// a device answers within 1 s).
const COMMAND_TIMEOUT_NS: u64 = 2_000_000_000;

/// Halts until an interrupt, with a deadline (the periodic timer guarantees wake-ups).
pub struct HaltWait {
    pub irq: &'static IrqState,
    pub deadline_ns: u64,
}

impl Wait for HaltWait {
    fn wait(&mut self) -> bool {
        halt_unless_pending(self.irq);
        time::now_ns() < self.deadline_ns
    }

    fn restart(&mut self) {
        self.deadline_ns = time::now_ns() + COMMAND_TIMEOUT_NS;
    }
}

/// Sleeps until the next interrupt unless work is already pending. Interrupts are disabled
/// around the check, and `wait_for_interrupt` re-enables them and halts in one step, so an
/// interrupt arriving after the check cannot be missed.
fn halt_unless_pending(irq: &IrqState) {
    interrupts::disable();
    if irq.is_pending() {
        interrupts::enable();
    } else {
        interrupts::wait_for_interrupt();
    }
}

/// Polls the used rings until `until_ns` (a busy poll, as NAPI's): true, with the bottom half
/// marked pending, once the device returned something or an interrupt came.
fn poll_used<T: Transport>(irq: &IrqState, driver: &DaqDriver<GuestHal, T>, until_ns: u64) -> bool {
    while time::now_ns() < until_ns {
        if irq.is_pending() {
            return true;
        }
        if driver.completions_waiting() {
            irq.raise();
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Consumes completions: verifies, measures latency, resubmits.
struct Consumer {
    /// Running hash of consumed buffers (FNV-1a over each buffer's CRC-32), while hashing.
    hash: Option<u64>,
    /// Frames after which hashing stops (0: never).
    hash_frames: u64,
    hashed_frames: u64,
    offset: i64,
    consume_delay_us: u64,
    latencies_us: vdaq_wire::latency::LatencyRecord,
    first_logged: bool,
    unexpected: u64,
    resubmit_failed: bool,
    /// The first verification error: it names the run's failure.
    first_error: Option<vdaq_wire::check::StreamError>,
}

impl Consumer {
    /// Drains every completion the bottom half produced, in order (a completion port).
    fn drain<T: Transport>(
        &mut self,
        driver: &mut DaqDriver<GuestHal, T>,
        verifier: &mut StreamVerifier,
        report: &mut Report<'static>,
        resubmit: bool,
    ) {
        while let Some(done) = driver.next_completion() {
            let now = time::now_ns();
            match done.outcome {
                ReadOutcome::Data(header) => {
                    self.hash_buffer(&done.buffer.as_slice()[..done.used_len], &header);
                    match verifier.check(done.buffer.as_slice(), done.used_len) {
                        Ok(_) => self.measure(&header, now, report),
                        Err(err) => {
                            self.first_error.get_or_insert(err);
                            if verifier.stats().errors <= 3 {
                                crate::println!("vdaq: buffer failed verification: {err:?}");
                            }
                        }
                    }
                }
                // Taken back after a device reset: accounted by the epoch, not an error.
                ReadOutcome::Reclaimed => {}
                other => {
                    self.unexpected += 1;
                    if self.unexpected <= 3 {
                        crate::println!("vdaq: read ended {other:?}");
                    }
                }
            }
            if self.consume_delay_us > 0 {
                // A deliberately slow application (overrun mode).
                time::delay_us(self.consume_delay_us);
            }
            if resubmit {
                match driver.submit_read_batched(done.buffer) {
                    Ok(_) => {}
                    // The device entered NEEDS_RESET while this buffer was being consumed: it
                    // takes no reads now, and the recovery below posts a fresh set.
                    Err((DriverError::NeedsReset, _)) => {}
                    Err((err, _)) => {
                        crate::println!("vdaq: resubmit failed: {err:?}");
                        self.resubmit_failed = true;
                    }
                }
            }
        }
        // One notification for everything resubmitted in this pass.
        driver.kick();
    }

    /// Folds a consumed buffer (header and payload) into the stream hash, until the frame
    /// limit is reached: the same buffers in the same order give the same hash.
    fn hash_buffer(&mut self, bytes: &[u8], header: &BufferHeader) {
        let Some(hash) = self.hash.as_mut() else {
            return;
        };
        if self.hash_frames > 0 && self.hashed_frames >= self.hash_frames {
            return;
        }
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        for byte in vdaq_wire::payload_crc32(bytes).to_le_bytes() {
            *hash = (*hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.hashed_frames += u64::from(header.frame_count.get());
    }

    fn measure(&mut self, header: &BufferHeader, now: u64, report: &mut Report<'static>) {
        if header.frame_count.get() == 0 {
            return;
        }
        if !self.first_logged {
            self.first_logged = true;
            report.first_sample_guest_ns = now;
            crate::println!("{FIRST_SAMPLE_LINE}");
        }
        // The first frame's device timestamp, on the guest clock.
        let sampled = header.timestamp_ns.get() as i64 - self.offset;
        let latency_us = (now as i64 - sampled).max(0) as u64 / 1000;
        self.latencies_us
            .record(latency_us.min(u64::from(u32::MAX)) as u32);
    }
}

/// Stream statistics summed over epochs.
#[derive(Default)]
struct ClosedStats {
    frames: u64,
    total: vdaq_wire::check::StreamStats,
}

impl ClosedStats {
    fn add(&mut self, stats: &vdaq_wire::check::StreamStats) {
        self.total += *stats;
        self.frames = self.total.frames;
    }

    fn total(&self) -> vdaq_wire::check::StreamStats {
        self.total
    }
}

/// Everything the run measured, turned into the report at the end.
pub struct Outcome {
    pub report: Report<'static>,
}

/// Runs the application on an initialised transport.
/// TLB flushes at the start of a stream, one every 2 ms (see [`grow_emulator_tlb`]).
const TLB_GROWTH_FLUSHES: u32 = 50;

/// Flushes the TLB (reloads CR3). QEMU's TCG keeps a software TLB that starts at 256 entries
/// and is resized only when the guest flushes it, growing while more than 70 % of it is in
/// use; this guest never changes address space, so without flushes the TLB stays too small
/// for 64 buffers of 64 KiB (1024 pages) and every pass over them refills it page by page (8 %
/// of the guest's time at that shape, from a host perf profile). A few flushes at the start
/// let it grow; after them none is needed. On hardware (KVM) each costs a few µs once.
fn grow_emulator_tlb() {
    x86_64::instructions::tlb::flush_all();
}

pub fn run<T: Transport>(
    transport: T,
    irq: &'static IrqState,
    params: &Params,
    transport_name: &'static str,
) -> Outcome {
    let mut report = Report {
        transport: transport_name,
        mode: params.mode,
        reads_in_flight: params.reads as u64,
        buffer_bytes: params.buffer as u64,
        ..Report::default()
    };
    let fail = |mut report: Report<'static>, why: &'static str| {
        report.pass = false;
        report.failure = why;
        report.interrupts = irq.interrupts();
        Outcome { report }
    };
    let options = DriverOptions {
        crc: params.crc,
        trigger: false,
    };
    let mut driver: DaqDriver<GuestHal, T> = match DaqDriver::new(transport, irq, options) {
        Ok(driver) => driver,
        Err(err) => {
            crate::println!("vdaq: driver init failed: {err:?}");
            return fail(
                report,
                match err {
                    DriverError::NotVdaq(_) => {
                        "device is not a usable vdaq card (identity or configuration space)"
                    }
                    DriverError::FeaturesRefused(_) => "device refused the features",
                    _ => "driver initialisation failed",
                },
            );
        }
    };
    let Ok(config) = driver.config() else {
        return fail(report, "cannot read the configuration space");
    };
    let Some(format) = SampleFormat::from_code(config.format) else {
        return fail(report, "unknown sample format");
    };
    let channels = config.channels.get();
    // Twice the longest a notification may be held back, so coalescing is never taken for a
    // lost interrupt: from the settings the driver goes by (re-read on each config change).
    let watchdog_after =
        |settings: &DaqConfig| WATCHDOG_NS.max(2 * settings.notification_delay_bound_ns());
    // Buffers whose header names the counter signal are checked sample by sample, whatever
    // the signal was at the start (a scenario may switch it while streaming).
    let counter = true;
    let mut verifier = StreamVerifier::new(format, channels, counter).require_crc(params.crc);
    let stream_ns = params.duration_ms * 1_000_000;
    let mut wait = HaltWait {
        irq,
        deadline_ns: time::now_ns() + stream_ns + 30_000_000_000,
    };

    // Correlate the device clock with ours: offset = device time − midpoint of a GET_STATUS
    // exchange; of several exchanges, the one with the shortest round trip bounds the error
    // best (as NTP does).
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..8 {
        let before = time::now_ns();
        let Ok(status) = driver.status(&mut wait) else {
            let why = driver
                .violation()
                .map_or("GET_STATUS failed", |v| v.describe());
            return fail(report, why);
        };
        let after = time::now_ns();
        let round_trip = after - before;
        let offset = status.device_time_ns.get() as i64 - ((before + after) / 2) as i64;
        if best.is_none_or(|(rtt, _)| round_trip < rtt) {
            best = Some((round_trip, offset));
        }
    }
    let (round_trip, offset) = best.unwrap_or((0, 0));
    crate::println!(
        "vdaq: device clock offset {offset} ns (± {} µs)",
        round_trip / 2000
    );
    report.clock_offset_ns = offset;

    for _ in 0..params.reads {
        if let Err((err, _)) = driver.submit_read(DmaBuffer::new(params.buffer)) {
            crate::println!("vdaq: submit failed: {err:?}");
            return fail(report, "cannot submit reads");
        }
    }
    if driver.start(&mut wait).is_err() {
        let why = driver.violation().map_or("START failed", |v| v.describe());
        return fail(report, why);
    }
    let start = time::now_ns();
    // Time halted waiting for an interrupt while streaming.
    let mut idle_ns = 0u64;
    let deadline = start + stream_ns;
    let mut next_progress = start + params.progress_ms * 1_000_000;
    let mut consumer = Consumer {
        hash: params.hash.then_some(0xcbf2_9ce4_8422_2325),
        hash_frames: params.frames,
        hashed_frames: 0,
        offset,
        consume_delay_us: params.consume_delay_us,
        latencies_us: vdaq_wire::latency::LatencyRecord::default(),
        first_logged: false,
        unexpected: 0,
        resubmit_failed: false,
        first_error: None,
    };
    let mut failure: Option<&'static str> = None;
    // Streams before a device reset (epochs) are verified and accounted on their own.
    let mut epochs = Epochs::default();
    let mut closed = ClosedStats::default();

    // The completion loop. The periodic tick wakes it at least every 10 ms; the watchdog
    // notices completions on the ring that no interrupt announced (a lost interrupt), runs the
    // bottom half anyway, and counts it.
    let mut watched_interrupts = irq.interrupts();
    let mut quiet_since = time::now_ns();
    let mut tlb_flushes = 0u32;
    loop {
        let now = time::now_ns();
        if tlb_flushes < TLB_GROWTH_FLUSHES && now >= start + u64::from(tlb_flushes) * 2_000_000 {
            grow_emulator_tlb();
            tlb_flushes += 1;
        }
        if irq.interrupts() != watched_interrupts || !driver.completions_waiting() {
            watched_interrupts = irq.interrupts();
            quiet_since = now;
        } else if !irq.is_pending() && now - quiet_since >= watchdog_after(driver.settings()) {
            report.watchdog_recoveries += 1;
            crate::println!("vdaq: watchdog: completions waiting without an interrupt; recovering");
            irq.raise();
            quiet_since = now;
        }
        driver.service();
        consumer.drain(&mut driver, &mut verifier, &mut report, true);
        if consumer.resubmit_failed {
            failure.get_or_insert("resubmit failed");
        }
        // A violation the driver cannot recover from by a reset, or a buffer that failed
        // verification, ends the run at once, named.
        if let Some(violation) = driver.violation().filter(|v| !v.resets_device()) {
            failure.get_or_insert(violation.describe());
        }
        if let Some(err) = &consumer.first_error {
            failure.get_or_insert(err.describe());
        }
        let now = time::now_ns();
        if now >= next_progress {
            let stats = verifier.stats();
            crate::println!(
                "{PROGRESS_PREFIX}{} {} {} {}",
                (now - start) / 1_000_000,
                closed.total().frames + stats.frames,
                closed.total().payload_bytes + stats.payload_bytes,
                irq.interrupts()
            );
            next_progress = now + params.progress_ms * 1_000_000;
        }
        if driver.needs_reset() {
            // The device gave up: take its counters, reset it, take every read back, and
            // stream again — a new epoch of the stream, accounted separately.
            crate::println!("vdaq: device needs reset; recovering");
            match driver.recover(&mut wait) {
                Ok(recovery) => {
                    consumer.drain(&mut driver, &mut verifier, &mut report, false);
                    let epoch_frames = verifier.stats().frames;
                    match &recovery.status {
                        Some(status) => {
                            if let Err(why) = epochs.close(
                                &EpochCounters::from_status(status),
                                epoch_frames,
                                verifier.stats().dropped_frames,
                            ) {
                                failure.get_or_insert(why);
                            }
                        }
                        None => {
                            failure.get_or_insert(
                                "device reset without its counters (control queue unusable)",
                            );
                        }
                    }
                    report.reset_recoveries += 1;
                    closed.add(&verifier.stats());
                    verifier = verifier.restarted();
                    for _ in 0..params.reads {
                        if let Err((err, _)) = driver.submit_read(DmaBuffer::new(params.buffer)) {
                            crate::println!("vdaq: submit after reset failed: {err:?}");
                            failure.get_or_insert("cannot submit reads after reset");
                        }
                    }
                    if driver.start(&mut wait).is_err() {
                        failure.get_or_insert("START after reset failed");
                    }
                }
                Err(err) => {
                    crate::println!("vdaq: recovery failed: {err:?}");
                    failure.get_or_insert("device needs reset and recovery failed");
                }
            }
        }
        let enough = params.frames > 0 && closed.frames + verifier.stats().frames >= params.frames;
        if (params.frames == 0 && now >= deadline) || enough || failure.is_some() {
            break;
        }
        let halted_at = time::now_ns();
        if !poll_used(irq, &driver, halted_at + params.poll_us * 1000) {
            halt_unless_pending(irq);
        }
        idle_ns += time::now_ns() - halted_at;
    }
    let stream_end = time::now_ns();

    // Shutdown: every read in flight must come back and the device must hold none.
    wait.deadline_ns = time::now_ns() + 30_000_000_000;
    let in_flight_at_shutdown = driver.in_flight() as u64;
    match driver.shutdown(&mut wait) {
        Ok(shutdown) => {
            report.shutdown_in_flight = shutdown.in_flight_at_start as u64;
            report.shutdown_returned = shutdown.returned as u64;
            report.device_held_after = shutdown.device_held_after;
            report.device_produced = epochs.produced + shutdown.status.frames_produced.get();
            report.device_delivered = epochs.delivered + shutdown.status.frames_delivered.get();
            report.device_dropped = epochs.dropped + shutdown.status.frames_dropped.get();
            report.device_pending = shutdown.status.frames_pending.get();
            report.frames_discarded_at_reset = epochs.discarded;
        }
        Err(err) => {
            crate::println!("vdaq: shutdown failed: {err:?}");
            failure.get_or_insert("shutdown failed");
            // The driver reset the device all the same and took every read back: what is
            // still in flight now was never returned.
            report.shutdown_in_flight = in_flight_at_shutdown;
            report.shutdown_returned = in_flight_at_shutdown - driver.in_flight() as u64;
        }
    }
    // The drained reads carry the stream's tail: verify them too.
    consumer.drain(&mut driver, &mut verifier, &mut report, false);
    let unexpected = consumer.unexpected;
    report.stream_hash = consumer.hash.unwrap_or(0);
    let latencies_us = consumer.latencies_us;
    while let Some(event) = driver.next_event() {
        match event.kind.get() {
            kind::OVERRUN => report.overrun_event_frames += event.arg0.get(),
            kind::FAULT => {
                report.fault_events += 1;
                crate::println!("vdaq: device FAULT event, code {}", event.arg0.get());
            }
            _ => {}
        }
    }

    // Frames the device dropped after the last buffer it returned cannot be in a header:
    // everything after the verified stream's end is pending or such trailing drops.
    let last_epoch_produced = report.device_produced - epochs.produced;
    let trailing = trailing_drops(
        last_epoch_produced,
        verifier.next_frame().unwrap_or(0),
        report.device_pending,
    );
    closed.add(&verifier.stats());
    let stats = closed.total();
    let driver_stats = driver.stats();
    report.record_stream(&stats, channels);
    report.interrupts = irq.interrupts();
    report.bottom_halves = driver_stats.bottom_halves;
    report.data_notifications = driver_stats.data_notifications;
    report.config_interrupts = driver_stats.config_changes;
    report.found_on_recheck = driver_stats.found_on_recheck;
    report.rejected = driver_stats.rejected;
    report.invalid = driver_stats.invalid;
    report.guest_time_ns = stream_end - start;
    report.guest_idle_ns = idle_ns;
    report.record_throughput();
    let histogram = latencies_us.finish(&mut report);
    crate::println!("{histogram}");
    if params.consume_only {
        (report.consume_only_mib_s, report.touch_only_mib_s) =
            consume_and_touch_only_rates(params, format, channels);
    }

    // The verdict.
    report.protocol_violations = driver_stats.violations;
    report.unknown_events = driver_stats.unknown_events;
    // A device violation comes first: what failed after it (a recovery without counters, a
    // shutdown) is its consequence. One the driver recovered from still fails the run: the
    // reads it spoiled are lost, and the device must be fixed.
    let failure = driver.violation().map(|v| v.describe()).or(failure);
    report.failure = failure.unwrap_or(if driver.needs_reset() {
        "device needs reset"
    } else {
        report
            .common_failure(unexpected, trailing + epochs.unreported_drops)
            .unwrap_or("")
    });
    report.pass = report.failure.is_empty();
    Outcome { report }
}

/// The consume-only rate (the same verification pass over buffers already in memory, no
/// device involved) and the touch-only rate (a fold over the same bytes: the guest's memory
/// limit), the wire crate's benchmarks shared with the Linux application. MiB/s of guest time.
fn consume_and_touch_only_rates(
    params: &Params,
    format: SampleFormat,
    channels: u16,
) -> (f64, f64) {
    let mut ring = alloc::vec![0u8; params.reads * params.buffer];
    let consume = vdaq_wire::check::consume_only_rate(
        format,
        channels,
        &mut ring,
        params.buffer,
        500_000_000,
        time::now_ns,
    );
    let touch = vdaq_wire::check::touch_only_rate(
        format,
        channels,
        &ring,
        params.buffer,
        500_000_000,
        time::now_ns,
    );
    (consume, touch)
}
