//! The application: N reads in flight on the card through io_uring (the completion-port
//! counterpart), completions consumed in order of arrival, every sample verified with the wire
//! crate's verifier, and the same report as the bare-metal guest.

use std::collections::BTreeSet;
use std::io;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE};
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::event::kind;
use vdaq_wire::report::{
    trailing_drops, EpochCounters, Epochs, Report, FIRST_SAMPLE_LINE, PROGRESS_PREFIX,
};
use vdaq_wire::violation::Violation;
use vdaq_wire::zerocopy::FromBytes;
use vdaq_wire::SampleFormat;

use crate::buffers::BufferPool;
use crate::cpu::CpuTimes;
use crate::device::Device;
use crate::params::{Mode, Params};
use crate::uapi;

/// `user_data` bit of cancel requests (reads carry their buffer index).
const CANCEL_TAG: u64 = 1 << 63;
/// How long the reads a cancel was aimed at may take to come back after their FLUSH.
const CANCEL_WINDOW: Duration = Duration::from_millis(500);
/// How long shutdown waits for every read to come back.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Nanoseconds on `clock`.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The first protocol violation of the device the driver detected, if any.
fn violation(device: &Device) -> Option<Violation> {
    device
        .stats()
        .ok()
        .and_then(|stats| Violation::from_code(stats.first_violation))
}

/// `result`, or — when the device broke the protocol, which is why a command failed — its
/// default: the run goes on to report the violation, not the failed command.
fn unless_violation<T: Default>(
    device: &Device,
    result: io::Result<T>,
    what: &'static str,
) -> Result<T, Fatal> {
    match result {
        Ok(value) => Ok(value),
        Err(err) if violation(device).is_some() => {
            println!("vdaq-app: {what} after a device violation: {err}");
            Ok(T::default())
        }
        Err(err) => Err(Fatal(what, err)),
    }
}

/// Why the run could not be carried out at all.
#[derive(Debug)]
pub struct Fatal(pub &'static str, pub io::Error);

/// The buffer indices with a read in flight, one flag per buffer: the streaming loop's
/// inserts and removes allocate nothing (a `BTreeSet` allocated and freed nodes per read).
#[derive(Debug)]
/// Reads that came back ahead of the stream, by sequence number: a vector sorted with the
/// lowest sequence last, its capacity the number of buffers (each is parked at most once), so
/// parking never allocates. A map would allocate and free a node as reads come and go, and
/// musl's allocator hands the memory back each time: an munmap and a TLB flush per read.
struct Parked {
    /// (sequence, buffer index, used length), sequences descending.
    reads: Vec<(u64, usize, usize)>,
}

impl Parked {
    fn new(buffers: usize) -> Self {
        Parked {
            reads: Vec::with_capacity(buffers),
        }
    }

    fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    fn position(&self, sequence: u64) -> Result<usize, usize> {
        self.reads
            .binary_search_by(|&(parked, _, _)| sequence.cmp(&parked))
    }

    fn contains(&self, sequence: u64) -> bool {
        self.position(sequence).is_ok()
    }

    /// Parks a read; false if its sequence is parked already.
    fn insert(&mut self, sequence: u64, index: usize, used: usize) -> bool {
        match self.position(sequence) {
            Ok(_) => false,
            Err(at) => {
                self.reads.insert(at, (sequence, index, used));
                true
            }
        }
    }

    /// The parked read with the lowest sequence.
    fn first(&self) -> Option<(u64, usize, usize)> {
        self.reads.last().copied()
    }

    fn pop_first(&mut self) -> Option<(u64, usize, usize)> {
        self.reads.pop()
    }

    fn clear(&mut self) {
        self.reads.clear();
    }
}

struct InFlight {
    flags: Vec<bool>,
    count: usize,
}

impl InFlight {
    fn new(buffers: usize) -> Self {
        InFlight {
            flags: vec![false; buffers],
            count: 0,
        }
    }

    fn insert(&mut self, index: usize) {
        if let Some(flag) = self.flags.get_mut(index).filter(|f| !**f) {
            *flag = true;
            self.count += 1;
        }
    }

    /// Whether `index` was in flight.
    fn remove(&mut self, index: &usize) -> bool {
        match self.flags.get_mut(*index).filter(|f| **f) {
            Some(flag) => {
                *flag = false;
                self.count -= 1;
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.count
    }

    fn contains(&self, index: usize) -> bool {
        self.flags.get(index).copied().unwrap_or(false)
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The indices in flight, ascending.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.flags
            .iter()
            .enumerate()
            .filter(|(_, &f)| f)
            .map(|(i, _)| i)
    }
}

/// The reads, their buffers and what came back.
struct Reader<'p> {
    params: &'p Params,
    ring: IoUring,
    fd: types::Fd,
    /// Declared after `ring`, so dropped after it: the ring may have the buffers registered.
    buffers: BufferPool,
    /// The buffers are registered with the ring: reads are READ_FIXED of their index.
    registered: bool,
    /// Channels per frame of the stream.
    channels: u16,
    /// Reads in flight, by buffer index: their buffers belong to the kernel.
    in_flight: InFlight,
    /// The completions of one drain, kept from drain to drain.
    done: Vec<(u64, i32)>,
    /// Reads that came back with data, by the sequence number in their header, until the
    /// stream reaches them: io_uring posts completions in the order its task work runs, not
    /// in the order the device completed the reads.
    waiting: Parked,
    /// Sequence number the stream continues with.
    next_sequence: u64,
    verifier: StreamVerifier,
    /// Device clock minus ours.
    offset_ns: i64,
    latencies_us: vdaq_wire::latency::LatencyRecord,
    first_sample_logged: bool,
    /// Reads that ended with an error other than cancellation.
    unexpected: u64,
    /// Reads that ended cancelled.
    cancelled: u64,
    /// Reads a cancel was aimed at that have not come back yet.
    cancel_targets: BTreeSet<usize>,
    /// Cancel requests answered.
    cancels_answered: u64,
    /// A read came back -EPROTO: the driver found the device breaking the protocol.
    violation_seen: bool,
    /// Reads that came back -EIO: taken back by a device reset (or refused by the device).
    reclaimed: u64,
    /// Recovering from a device reset: reads without frames are not verified (the ones the
    /// old device returned and the ones the new one holds cannot be told apart, and carry no
    /// samples); reads with frames are the old stream's.
    recovering: bool,
    /// Stream totals of the epochs a device reset closed.
    closed: vdaq_wire::check::StreamStats,
    /// The first verification error: it names the run's failure.
    first_error: Option<vdaq_wire::check::StreamError>,
}

impl Reader<'_> {
    fn submit(&mut self, index: usize) -> io::Result<()> {
        let (ptr, len) = (self.buffers.ptr(index), self.buffers.len() as u32);
        let read = if self.registered {
            // `index` fits: at most 256 reads (params).
            opcode::ReadFixed::new(self.fd, ptr, len, index as u16)
                .offset(0)
                .build()
        } else {
            opcode::Read::new(self.fd, ptr, len).offset(0).build()
        }
        .user_data(index as u64);
        // SAFETY: the buffer stays allocated and untouched by us until this read's completion
        // arrives: it is in `in_flight` until then, and `Reader`'s drop leaks every buffer
        // while any read is in flight (also when unwinding).
        unsafe { self.ring.submission().push(&read) }
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        self.in_flight.insert(index);
        Ok(())
    }

    fn cancel(&mut self, index: usize) -> io::Result<()> {
        let cancel = opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(CANCEL_TAG | index as u64);
        // SAFETY: a cancel request refers to no memory of ours.
        unsafe { self.ring.submission().push(&cancel) }
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        self.cancel_targets.insert(index);
        Ok(())
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Takes every completion waiting and consumes the reads the stream has reached, in
    /// sequence order; resubmits consumed reads when `resubmit`. Returns how many reads came
    /// back.
    fn drain(&mut self, report: &mut Report<'_>, resubmit: bool) -> io::Result<usize> {
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        done.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let mut reads = 0;
        for &(user_data, result) in &done {
            if user_data & CANCEL_TAG != 0 {
                // 0: cancelled while still queued in io-wq; -EALREADY: the driver holds it;
                // -ENOENT: it completed already. The read's own completion follows either way.
                self.cancels_answered += 1;
                continue;
            }
            let index = user_data as usize;
            if !self.in_flight.remove(&index) {
                self.unexpected += 1;
                continue;
            }
            reads += 1;
            let cancel_aimed = self.cancel_targets.remove(&index);
            let sequence = usize::try_from(result)
                .ok()
                .filter(|&used| used >= HEADER_SIZE)
                .and_then(|_| {
                    BufferHeader::read_from_bytes(&self.buffers.slice(index)[..HEADER_SIZE]).ok()
                })
                .map(|header| header.sequence.get());
            match sequence {
                // The read the stream continues with, none parked: consumed at once (the
                // common case, which so allocates nothing).
                Some(sequence) if sequence == self.next_sequence && self.waiting.is_empty() => {
                    self.next_sequence = sequence + 1;
                    self.consume_now(index, result, report, resubmit, cancel_aimed)?;
                }
                // Ahead of the stream: parked until the stream reaches it.
                Some(sequence)
                    if sequence >= self.next_sequence && !self.waiting.contains(sequence) =>
                {
                    self.waiting.insert(sequence, index, result as usize);
                }
                // No data, a sequence seen twice or one the stream has passed: judged at once
                // (the verifier reports what is wrong with it).
                _ => self.consume_now(index, result, report, resubmit, cancel_aimed)?,
            }
        }
        self.done = done;
        self.release(report, resubmit)?;
        Ok(reads)
    }

    /// Consumes waiting reads in sequence order as far as the stream has reached. When no read
    /// is in flight any more, nothing can fill a gap: the lowest goes to the verifier anyway
    /// (which reports the gap).
    fn release(&mut self, report: &mut Report<'_>, resubmit: bool) -> io::Result<()> {
        while let Some((sequence, index, used)) = self.waiting.first() {
            if sequence != self.next_sequence && !self.in_flight.is_empty() {
                return Ok(());
            }
            self.waiting.pop_first();
            self.next_sequence = sequence + 1;
            self.consume_now(index, used as i32, report, resubmit, false)?;
        }
        Ok(())
    }

    fn consume_now(
        &mut self,
        index: usize,
        result: i32,
        report: &mut Report<'_>,
        resubmit: bool,
        cancel_aimed: bool,
    ) -> io::Result<()> {
        self.consume(index, result, report, cancel_aimed);
        if self.params.consume_delay_us > 0 {
            std::thread::sleep(Duration::from_micros(self.params.consume_delay_us));
        }
        if resubmit {
            self.submit(index)?;
        }
        Ok(())
    }

    /// Judges one read. -ECANCELED is expected only for a read a cancel was aimed at (the
    /// driver never discards data otherwise: docs/linux-driver.md).
    fn consume(&mut self, index: usize, result: i32, report: &mut Report<'_>, cancel_aimed: bool) {
        if result == -libc::ECANCELED && cancel_aimed {
            self.cancelled += 1;
            return;
        }
        if result == -libc::EPROTO {
            // The driver found a protocol violation in this read (VDAQ_IOC_GET_STATS names it).
            self.violation_seen = true;
        }
        if result == -libc::EIO {
            // Taken back by a device reset: the stream loop recovers (or judges it).
            self.reclaimed += 1;
            return;
        }
        let Ok(used) = usize::try_from(result) else {
            self.unexpected += 1;
            if self.unexpected <= 3 {
                println!(
                    "vdaq-app: read ended: {}",
                    io::Error::from_raw_os_error(-result)
                );
            }
            return;
        };
        let now = now_ns();
        if self.recovering
            && BufferHeader::read_from_bytes(&self.buffers.slice(index)[..HEADER_SIZE])
                .is_ok_and(|header| header.frame_count.get() == 0)
        {
            return;
        }
        match self.verifier.check(self.buffers.slice(index), used) {
            Ok(header) if header.frame_count.get() > 0 => {
                if !self.first_sample_logged {
                    self.first_sample_logged = true;
                    report.first_sample_guest_ns = clock_ns(libc::CLOCK_BOOTTIME);
                    println!("{FIRST_SAMPLE_LINE}");
                }
                let sampled = header.timestamp_ns.get() as i64 - self.offset_ns;
                let latency_us = (now as i64 - sampled).max(0) as u64 / 1000;
                self.latencies_us
                    .record(latency_us.min(u64::from(u32::MAX)) as u32);
            }
            Ok(_) => {}
            Err(err) => {
                self.first_error.get_or_insert(err);
                if self.verifier.stats().errors <= 3 {
                    println!("vdaq-app: buffer failed verification: {err:?}");
                }
            }
        }
    }

    /// Waits until every read in flight came back, or `timeout` passed. `flush` (when the
    /// device is still open) hands back reads that reached the device after an earlier FLUSH:
    /// io_uring issues each read from an io-wq worker, so a read submitted before the FLUSH
    /// can be posted to the device after it.
    fn collect_all(
        &mut self,
        report: &mut Report<'_>,
        timeout: Duration,
        flush: Option<&Device>,
    ) -> io::Result<usize> {
        let deadline = now_ns() + timeout.as_nanos() as u64;
        let mut returned = 0;
        while !self.in_flight.is_empty() && now_ns() < deadline {
            self.wait(Duration::from_millis(50))?;
            let came_back = self.drain(report, false)?;
            returned += came_back;
            if came_back == 0 && !self.in_flight.is_empty() {
                if let Some(device) = flush {
                    device.flush()?;
                }
            }
        }
        self.release(report, false)?;
        Ok(returned)
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if !self.in_flight.is_empty() {
            // The kernel may still write these buffers: never free them under a read.
            println!(
                "vdaq-app: {} reads never came back; keeping their buffers",
                self.in_flight.len()
            );
            self.buffers.leak();
        }
    }
}

/// Runs the application; the report says whether every check passed.
pub fn run<'p>(params: &'p Params) -> Result<Report<'p>, Fatal> {
    let mut report = Report {
        mode: params.mode.name(),
        reads_in_flight: params.reads as u64,
        buffer_bytes: params.buffer as u64,
        ..Report::default()
    };
    let device = Device::open(&params.device).map_err(|e| Fatal("cannot open the device", e))?;
    let info = device
        .info()
        .map_err(|e| Fatal("VDAQ_IOC_GET_CONFIG failed", e))?;
    report.transport = match info.transport {
        uapi::TRANSPORT_PCI => "pci",
        uapi::TRANSPORT_MMIO => "mmio",
        _ => "unknown",
    };
    let format = SampleFormat::from_code(info.config.format).ok_or_else(|| {
        Fatal(
            "unknown sample format",
            io::Error::from(io::ErrorKind::InvalidData),
        )
    })?;
    let channels = info.config.channels.get();
    if params.reads > info.data_queue_size as usize || params.buffer > info.max_read_bytes as usize
    {
        return Err(Fatal(
            "vdaq.reads or vdaq.buffer exceeds what the driver accepts (data_queue_size, \
             max_read_bytes of VDAQ_IOC_GET_CONFIG)",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    // Buffers whose header names the counter signal are checked sample by sample.
    let verifier = StreamVerifier::new(format, channels, true).require_crc(params.crc);

    // Device clock minus ours, from the GET_STATUS exchange with the shortest round trip.
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..8 {
        let before = now_ns();
        let status = device
            .status()
            .map_err(|e| Fatal("VDAQ_IOC_STATUS failed", e))?;
        let after = now_ns();
        let offset = status.device_time_ns.get() as i64 - ((before + after) / 2) as i64;
        if best.is_none_or(|(rtt, _)| after - before < rtt) {
            best = Some((after - before, offset));
        }
    }
    let (round_trip, offset_ns) = best.unwrap_or((0, 0));
    println!(
        "vdaq-app: {} on {}, {channels} ch {}, device clock offset {offset_ns} ns (± {} µs)",
        params.device,
        report.transport,
        format.name(),
        round_trip / 2000
    );
    report.clock_offset_ns = offset_ns;

    let entries = (params.reads * 2).next_power_of_two() as u32;
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| Fatal("io_uring_setup failed", e))?;
    let buffers = BufferPool::new(params.reads, params.buffer)
        .map_err(|e| Fatal("cannot allocate read buffers", e))?;
    let registered = params.registered_buffers && {
        // SAFETY: the buffers stay mapped while the ring exists: `Reader` drops the ring
        // before the pool, and leaks the pool while reads are in flight.
        match unsafe { ring.submitter().register_buffers(&buffers.iovecs()) } {
            Ok(()) => true,
            Err(err) => {
                println!("vdaq-app: cannot register the buffers ({err}): plain reads");
                false
            }
        }
    };
    println!(
        "vdaq-app: {}",
        if registered {
            "reads into io_uring registered buffers (READ_FIXED, pinned once)"
        } else {
            "plain io_uring reads (the driver pins each read)"
        }
    );
    if let Some(kib) = BufferPool::huge_page_kib() {
        println!(
            "vdaq-app: {} KiB of buffers, {kib} KiB on huge pages",
            params.reads * params.buffer / 1024
        );
    }
    let mut reader = Reader {
        params,
        ring,
        fd: types::Fd(device.raw_fd()),
        buffers,
        registered,
        channels,
        in_flight: InFlight::new(params.reads),
        done: Vec::with_capacity(2 * params.reads),
        waiting: Parked::new(params.reads),
        next_sequence: 0,
        verifier,
        offset_ns,
        latencies_us: vdaq_wire::latency::LatencyRecord::default(),
        first_sample_logged: false,
        unexpected: 0,
        cancelled: 0,
        cancel_targets: BTreeSet::new(),
        cancels_answered: 0,
        violation_seen: false,
        reclaimed: 0,
        recovering: false,
        closed: vdaq_wire::check::StreamStats::default(),
        first_error: None,
    };
    stream(&mut reader, device, &mut report)?;
    if params.consume_only {
        let mut ring = vec![0u8; params.reads * params.buffer];
        report.consume_only_mib_s = vdaq_wire::check::consume_only_rate(
            format,
            channels,
            &mut ring,
            params.buffer,
            500_000_000,
            now_ns,
        );
        report.touch_only_mib_s = vdaq_wire::check::touch_only_rate(
            format,
            channels,
            &ring,
            params.buffer,
            500_000_000,
            now_ns,
        );
    }
    Ok(report)
}

fn stream(reader: &mut Reader<'_>, device: Device, report: &mut Report<'_>) -> Result<(), Fatal> {
    let params = reader.params;
    device
        .start()
        .map_err(|e| Fatal("VDAQ_IOC_START failed", e))?;
    for index in 0..params.reads {
        reader
            .submit(index)
            .map_err(|e| Fatal("cannot queue reads", e))?;
    }
    let cpu_at_start = CpuTimes::now();
    let start = now_ns();
    let stream_ns = params.duration_ms * 1_000_000;
    let deadline = start + stream_ns;
    let mut next_progress = start + params.progress_ms * 1_000_000;
    let mut cancel_done = false;
    let mut cancel_late = 0;
    let mut failure: Option<&'static str> = None;
    let io_error = |e| Fatal("io_uring failed", e);
    let mut close_early = false;
    let mut epochs = Epochs::default();
    let mut recovery = Recovery::new(&device);
    while now_ns() < deadline {
        reader.wait(Duration::from_millis(10)).map_err(io_error)?;
        reader.drain(report, true).map_err(io_error)?;
        if recovery.needed(reader, &device) {
            if let Err(why) = recovery.recover(reader, &device, report, &mut epochs) {
                failure.get_or_insert(why);
                break;
            }
        }
        // A device violation or a buffer that failed verification ends the run at once.
        if reader.first_error.is_some() || reader.violation_seen {
            break;
        }
        let now = now_ns();
        if now >= next_progress {
            // Every epoch's frames so far.
            let mut stats = reader.closed;
            stats += reader.verifier.stats();
            let interrupts = device.stats().map_or(0, |s| s.interrupts);
            // The driver keeps the last 64 event records: take them as they come.
            finish_events(&device, report);
            println!(
                "{PROGRESS_PREFIX}{} {} {} {interrupts}",
                (now - start) / 1_000_000,
                stats.frames,
                stats.payload_bytes
            );
            next_progress = now + params.progress_ms * 1_000_000;
            if violation(&device).is_some() {
                break;
            }
        }
        if now >= start + stream_ns / 2 {
            match params.mode {
                Mode::Cancel if !cancel_done => {
                    // Cancel every other read in flight; FLUSH hands the ones the device holds
                    // back (io_uring cannot cancel a read the driver posted).
                    let targets: Vec<usize> = reader.in_flight.iter().step_by(2).collect();
                    for index in targets {
                        reader.cancel(index).map_err(io_error)?;
                    }
                    reader.wait(Duration::from_millis(1)).map_err(io_error)?;
                    let targets = reader.cancel_targets.len();
                    let flushed = device
                        .flush()
                        .map_err(|e| Fatal("VDAQ_IOC_FLUSH failed", e))?;
                    // Every read a cancel was aimed at must be back soon after the FLUSH, long
                    // before the stream ends (not by the shutdown's FLUSH).
                    let window_end = now_ns() + CANCEL_WINDOW.as_nanos() as u64;
                    while !reader.cancel_targets.is_empty() && now_ns() < window_end {
                        reader.wait(Duration::from_millis(10)).map_err(io_error)?;
                        reader.drain(report, true).map_err(io_error)?;
                    }
                    cancel_late = reader.cancel_targets.len();
                    cancel_done = true;
                    println!(
                        "vdaq-app: cancelled {targets} reads in flight ({} cancel requests \
                         answered), FLUSH returned {}; {} back within {CANCEL_WINDOW:?}, {} \
                         cancelled",
                        reader.cancels_answered,
                        flushed.buffers_returned.get(),
                        targets - cancel_late,
                        reader.cancelled
                    );
                }
                Mode::ClosePending => {
                    close_early = true;
                    break;
                }
                _ => {}
            }
        }
    }
    let stream_end = now_ns();
    if let (Some(before), Some(after)) = (cpu_at_start, CpuTimes::now()) {
        let share = after.since(before);
        println!("vdaq-app: CPU while streaming: {share}");
        report.guest_idle_ns = (share.idle_fraction() * (stream_end - start) as f64) as u64;
    }

    // Shutdown: every read in flight must come back.
    let mut in_flight_at_start = reader.in_flight.len() as u64;
    let (status, device_violation) = if close_early {
        // close() with reads pending in the device: the driver must take this process's
        // reads back. Stop first, and wait until every read in flight reached the device
        // (io-wq may still be posting some; a read not yet issued when the fd goes would
        // fail with EBADF and never reach the driver).
        device
            .stop()
            .map_err(|e| Fatal("VDAQ_IOC_STOP failed", e))?;
        let posted_by = now_ns() + 2_000_000_000;
        loop {
            reader.wait(Duration::from_millis(10)).map_err(io_error)?;
            reader.drain(report, false).map_err(io_error)?;
            let pending = device.stats().map_or(0, |s| s.pending);
            if pending >= reader.in_flight.len() as u64 || now_ns() >= posted_by {
                break;
            }
        }
        println!(
            "vdaq-app: closing the device with {} reads pending in it",
            reader.in_flight.len()
        );
        in_flight_at_start = reader.in_flight.len() as u64;
        device.close();
        let returned = reader
            .collect_all(report, SHUTDOWN_TIMEOUT, None)
            .map_err(io_error)?;
        report.shutdown_returned = returned as u64;
        let again = Device::open(&params.device).map_err(|e| Fatal("cannot reopen", e))?;
        let status = again
            .status()
            .map_err(|e| Fatal("VDAQ_IOC_STATUS failed", e))?;
        finish_events(&again, report);
        fill_driver_stats(&again, report);
        (status, violation(&again))
    } else {
        // Reads resubmitted in the last pass go to the kernel first, so the FLUSH below
        // finds them in the device.
        reader.ring.submit().map_err(io_error)?;
        unless_violation(&device, device.stop(), "VDAQ_IOC_STOP failed")?;
        unless_violation(&device, device.flush(), "VDAQ_IOC_FLUSH failed")?;
        let returned = reader
            .collect_all(report, SHUTDOWN_TIMEOUT, Some(&device))
            .map_err(io_error)?;
        report.shutdown_returned = returned as u64;
        let status = unless_violation(&device, device.status(), "VDAQ_IOC_STATUS failed")?;
        finish_events(&device, report);
        fill_driver_stats(&device, report);
        (status, violation(&device))
    };
    report.shutdown_in_flight = in_flight_at_start;
    report.device_held_after = status.buffers_held.get();
    report.device_produced = epochs.produced + status.frames_produced.get();
    report.device_delivered = epochs.delivered + status.frames_delivered.get();
    report.device_dropped = epochs.dropped + status.frames_dropped.get();
    report.device_pending = status.frames_pending.get();
    report.frames_discarded_at_reset = epochs.discarded;

    let mut stats = reader.closed;
    stats += reader.verifier.stats();
    report.record_stream(&stats, reader.channels);
    report.guest_time_ns = stream_end - start;
    report.record_throughput();
    let histogram = std::mem::take(&mut reader.latencies_us).finish(report);
    println!("{histogram}");

    // Drops after the last epoch's last returned buffer can be in no header.
    let trailing = trailing_drops(
        status.frames_produced.get(),
        reader.verifier.next_frame().unwrap_or(0),
        report.device_pending,
    ) + epochs.unreported_drops;
    // Reads taken back with no reset to explain them ended without data.
    let unexpected = reader.unexpected + (reader.reclaimed - recovery.reclaimed_handled);
    if reader.cancelled > 0 {
        println!("vdaq-app: {} reads came back cancelled", reader.cancelled);
    }
    // A device violation first (what failed after it is its consequence), then this
    // application's own checks, then every guest's.
    failure = device_violation
        .map(Violation::describe)
        .or(failure)
        .or(reader.first_error.as_ref().map(|err| err.describe()))
        .or(if !reader.in_flight.is_empty() {
            Some("reads in flight never came back")
        } else if params.mode == Mode::Cancel && (!cancel_done || cancel_late > 0) {
            Some("cancelled reads did not all come back")
        } else {
            None
        })
        .or_else(|| report.common_failure(unexpected, trailing));
    report.failure = failure.unwrap_or("");
    report.pass = failure.is_none();
    Ok(())
}

/// Streaming again after the driver reset the device (NEEDS_RESET, a broken ring): the
/// reads it took back came back -EIO; the epoch they ended is accounted with the counters the
/// driver read just before the reset, and a new one begins.
struct Recovery {
    /// Reads -EIO that a recovery has accounted for.
    reclaimed_handled: u64,
    /// The driver's reset counters at the last epoch's start.
    resets: u64,
    resets_with_status: u64,
    before: EpochCounters,
}

impl Recovery {
    fn new(device: &Device) -> Self {
        let stats = device.stats().unwrap_or_default();
        Recovery {
            reclaimed_handled: 0,
            resets: stats.resets,
            resets_with_status: stats.resets_with_status,
            before: counters_before_reset(&stats),
        }
    }

    /// Whether the driver reset the device since the last look (or reads came back -EIO).
    fn needed(&self, reader: &Reader<'_>, device: &Device) -> bool {
        reader.reclaimed > self.reclaimed_handled
            || device
                .stats()
                .is_ok_and(|stats| stats.resets != self.resets)
    }

    fn recover(
        &mut self,
        reader: &mut Reader<'_>,
        device: &Device,
        report: &mut Report<'_>,
        epochs: &mut Epochs,
    ) -> Result<(), &'static str> {
        // Every read comes back: the ones the reset took back (the driver completes them all
        // before it counts the reset), and, by FLUSH, the ones posted to the new device since
        // (it is stopped: they are empty).
        if let Some(violation) = violation(device) {
            // The driver reset the device because it broke the protocol: the run fails,
            // named (every read still comes back: shutdown collects them).
            return Err(violation.describe());
        }
        reader.recovering = true;
        let collected = reader.collect_all(report, SHUTDOWN_TIMEOUT, Some(device));
        reader.recovering = false;
        collected.map_err(|_| "io_uring failed during a recovery")?;
        let stats = device
            .stats()
            .map_err(|_| "VDAQ_IOC_GET_STATS failed during a recovery")?;
        if stats.resets == self.resets {
            return Err("reads ended without data");
        }
        if stats.resets - self.resets != stats.resets_with_status - self.resets_with_status {
            return Err("device reset without its counters (control queue unusable)");
        }
        println!("vdaq-app: the device was reset; streaming again");
        let total = counters_before_reset(&stats);
        let before = EpochCounters {
            produced: total.produced - self.before.produced,
            delivered: total.delivered - self.before.delivered,
            dropped: total.dropped - self.before.dropped,
            pending: total.pending - self.before.pending,
        };
        let epoch = reader.verifier.stats();
        epochs.close(&before, epoch.frames, epoch.dropped_frames)?;
        reader.closed += epoch;
        report.reset_recoveries += stats.resets - self.resets;
        *self = Recovery {
            reclaimed_handled: reader.reclaimed,
            resets: stats.resets,
            resets_with_status: stats.resets_with_status,
            before: total,
        };
        // A new epoch: a fresh stream from the reset device, continuing after the empty
        // buffers the FLUSH above returned (each completed buffer takes a sequence number,
        // and the device counts them in `buffers_completed`).
        let status = device
            .status()
            .map_err(|_| "VDAQ_IOC_STATUS failed after a reset")?;
        let sequence = status.buffers_completed.get();
        reader.verifier = reader.verifier.restarted().expecting_sequence(sequence);
        reader.next_sequence = sequence;
        reader.waiting.clear();
        device.start().map_err(|_| "START after reset failed")?;
        for index in 0..reader.params.reads {
            if !reader.in_flight.contains(index) {
                reader
                    .submit(index)
                    .map_err(|_| "cannot submit reads after reset")?;
            }
        }
        Ok(())
    }
}

fn counters_before_reset(stats: &uapi::Stats) -> EpochCounters {
    EpochCounters {
        produced: stats.before_reset_produced,
        delivered: stats.before_reset_delivered,
        dropped: stats.before_reset_dropped,
        pending: stats.before_reset_pending,
    }
}

fn finish_events(device: &Device, report: &mut Report<'_>) {
    for event in device.events().unwrap_or_default() {
        match event.kind.get() {
            kind::OVERRUN => report.overrun_event_frames += event.arg0.get(),
            kind::FAULT => {
                report.fault_events += 1;
                println!("vdaq-app: device FAULT event, code {}", event.arg0.get());
            }
            _ => {}
        }
    }
}

fn fill_driver_stats(device: &Device, report: &mut Report<'_>) {
    if let Ok(stats) = device.stats() {
        report.interrupts = stats.interrupts;
        report.bottom_halves = stats.bottom_halves;
        report.config_interrupts = stats.config_changes;
        report.found_on_recheck = stats.found_on_recheck;
        report.rejected = stats.rejected;
        report.invalid = stats.invalid;
        report.watchdog_recoveries = stats.watchdog_recoveries;
        report.protocol_violations = stats.violations;
        report.unknown_events = stats.unknown_events;
        report.data_notifications = stats.data_notifications;
    }
}

#[cfg(test)]
mod tests {
    use super::{InFlight, Parked};

    #[test]
    fn parked_reads_come_out_lowest_sequence_first_without_growing() {
        let mut parked = Parked::new(4);
        for (sequence, index) in [(12, 0), (10, 1), (13, 2), (11, 3)] {
            assert!(parked.insert(sequence, index, 100 + index));
        }
        assert!(!parked.insert(13, 3, 0), "a sequence is parked once");
        assert!(parked.contains(11) && !parked.contains(14));
        assert_eq!(parked.reads.capacity(), 4);
        let mut order = Vec::new();
        while let Some((sequence, index, used)) = parked.first() {
            assert_eq!(parked.pop_first(), Some((sequence, index, used)));
            order.push((sequence, index, used));
        }
        assert_eq!(
            order,
            [(10, 1, 101), (11, 3, 103), (12, 0, 100), (13, 2, 102)]
        );
        assert!(parked.is_empty());
        parked.insert(1, 0, 0);
        parked.clear();
        assert!(parked.is_empty());
    }

    #[test]
    fn in_flight_counts_each_index_once_and_lists_them_in_order() {
        let mut set = InFlight::new(8);
        assert!(set.is_empty());
        for index in [5, 1, 5, 7, 9] {
            set.insert(index); // 5 twice, 9 beyond the buffers: ignored
        }
        assert_eq!(set.len(), 3);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1, 5, 7]);
        assert!(set.remove(&5));
        assert!(!set.remove(&5), "not in flight any more");
        assert!(!set.remove(&9));
        assert_eq!(set.iter().step_by(2).collect::<Vec<_>>(), vec![1]);
        assert_eq!(set.len(), 2);
    }
}
