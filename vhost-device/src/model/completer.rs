//! The completer: buffers the driver posted, filling them with frames, completing them (full,
//! latency bound, gaps, STOP, FLUSH) with their header, and interrupt coalescing.

use std::collections::VecDeque;

use log::warn;
use vdaq_wire::buffer::{flags, status as buffer_status, BufferHeader, HEADER_SIZE};
use vdaq_wire::event::kind;
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use super::fifo::Run;
use super::signal::SignalParams;
use super::source::FileSource;
use super::trigger::{scan_trigger, HwTrigger, TriggerState};
use super::{Card, Completion, ReadBuffer};

/// Posted buffers and the stream position of delivery.
pub(super) struct Buffers<B> {
    /// Posted buffers in the order they were made available; only the front one fills.
    pub(super) posted: VecDeque<Posted<B>>,
    /// Sequence number of the next completed buffer.
    pub(super) sequence: u64,
    /// Stream index right after the last frame put into a buffer.
    pub(super) delivered_end: u64,
    /// The next buffer starts a new stream segment (settings changed).
    pub(super) discontinuity: bool,
    /// Completions not yet signalled (interrupt coalescing).
    pub(super) unsignaled: u32,
    /// Real device time of the oldest unsignalled completion.
    pub(super) first_unsignaled_ns: Option<u64>,
}

impl<B> Default for Buffers<B> {
    fn default() -> Self {
        Buffers {
            posted: VecDeque::new(),
            sequence: 0,
            delivered_end: 0,
            discontinuity: false,
            unsignaled: 0,
            first_unsignaled_ns: None,
        }
    }
}

/// A posted buffer and what the device has put in it so far.
pub(super) struct Posted<B> {
    pub(super) buffer: B,
    /// Signal of the frames in the buffer (set when the first frame goes in).
    pub(super) signal: SignalKind,
    /// Clock origin of the frames in the buffer (frames of one buffer share one clock run).
    pub(super) origin_ns: u64,
    pub(super) capacity_frames: u64,
    pub(super) filled: u64,
    pub(super) first_frame: u64,
    pub(super) timestamp_ns: u64,
    pub(super) dropped_before: u64,
    pub(super) flags: u16,
    pub(super) trigger_frame: u32,
    /// Stream indices of the triggers that fired in this buffer, in the order found; their
    /// TRIGGER events are raised when the buffer completes, so that each names the `sequence`
    /// it really got (or none, if the buffer could not be written).
    pub(super) triggers: Vec<u64>,
    /// TRIGGER events of this buffer past what the backlog can hold, counted lost.
    pub(super) triggers_lost: u32,
    /// The payload's first byte as written (0 while empty).
    pub(super) first_byte: u8,
    pub(super) crc: crc32fast::Hasher,
}

impl<B> Posted<B> {
    /// The first frame goes in: the buffer's place in the stream and its header fields.
    fn open(
        &mut self,
        first_frame: u64,
        signal: SignalKind,
        origin_ns: u64,
        timestamp_ns: u64,
        dropped_before: u64,
        discontinuity: bool,
    ) {
        self.first_frame = first_frame;
        self.signal = signal;
        self.origin_ns = origin_ns;
        self.timestamp_ns = timestamp_ns;
        self.dropped_before = dropped_before;
        if dropped_before > 0 {
            self.flags |= flags::OVERRUN;
        }
        if discontinuity {
            self.flags |= flags::DISCONTINUITY;
        }
    }

    /// Records a trigger at frame `offset` within the buffer; the header keeps the earliest.
    fn mark_triggered(&mut self, offset: u64) {
        if self.flags & flags::TRIGGERED == 0 || offset < u64::from(self.trigger_frame) {
            self.flags |= flags::TRIGGERED;
            self.trigger_frame = offset as u32;
        }
        // More than the event backlog cannot be delivered anyway: those events are lost, and
        // counted when the buffer completes.
        if self.triggers.len() < vdaq_wire::event::EVENT_BACKLOG {
            self.triggers.push(self.first_frame + offset);
        } else {
            self.triggers_lost += 1;
        }
    }
}

/// What [`Renderer::write`] did.
struct Rendered {
    /// Frames the level/edge trigger fired at.
    fired: Vec<u64>,
    /// A write into the buffer failed; the frames after it were not written.
    write_failed: bool,
}

/// Renders frames block by block and writes them into a buffer, feeding the payload CRC and
/// the level/edge trigger on the way.
struct Renderer<'a> {
    params: SignalParams,
    frame_bytes: usize,
    crc: bool,
    scratch: &'a mut [u8],
    source: Option<&'a FileSource>,
    trigger: Option<(&'a HwTrigger, &'a mut TriggerState)>,
}

impl Renderer<'_> {
    /// Writes frames `first .. first + count` at `buffer`'s fill point.
    fn write<B: ReadBuffer>(&mut self, buffer: &mut Posted<B>, first: u64, count: u64) -> Rendered {
        let params = self.params;
        let frame_bytes = self.frame_bytes;
        // The S16 counter is periodic: its bytes come straight from the wire crate's table,
        // one copy into guest memory; other signals are rendered into the scratch block.
        let from_table = params.kind == SignalKind::Counter && params.format == SampleFormat::S16;
        let block_bytes = if from_table {
            2 * vdaq_wire::pattern::S16_PERIOD
        } else {
            self.scratch.len()
        };
        let frames_per_block = (block_bytes / frame_bytes).max(1) as u64;
        let channels = u64::from(params.channels);
        let mut rendered = Rendered {
            fired: Vec::new(),
            write_failed: false,
        };
        let mut done = 0;
        while done < count {
            let n = frames_per_block.min(count - done);
            let bytes = n as usize * frame_bytes;
            let block: &[u8] = if from_table {
                vdaq_wire::pattern::s16_counter_window((first + done) * channels, bytes / 2)
            } else {
                let scratch = &mut self.scratch[..bytes];
                match (self.source, params.kind) {
                    (Some(source), SignalKind::File) => {
                        source.render(params.format, first + done, scratch)
                    }
                    _ => params.render(first + done, scratch),
                }
                scratch
            };
            if let Some((trigger, state)) = &mut self.trigger {
                rendered.fired.extend(scan_trigger(
                    trigger,
                    state,
                    params.format,
                    params.channels,
                    first + done,
                    block,
                ));
            }
            if self.crc {
                buffer.crc.update(block);
            }
            if buffer.filled + done == 0 {
                // Kept for a scripted corruption without CRC, which flips the byte actually
                // written, whatever the signal (a file's samples cannot be rendered again).
                buffer.first_byte = block.first().copied().unwrap_or(0);
            }
            let offset = (buffer.filled + done) as usize * frame_bytes;
            if buffer.buffer.write_payload(offset, block).is_err() {
                rendered.write_failed = true;
                break;
            }
            done += n;
        }
        rendered
    }
}

impl<B: ReadBuffer> Card<B> {
    /// Accepts a posted buffer. A buffer too small for one frame is returned at once with a
    /// BAD_BUFFER header.
    pub fn post(&mut self, buffer: B, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let frame_bytes = self.frame_bytes() as u64;
        let capacity_frames = buffer.payload_capacity() as u64 / frame_bytes;
        if capacity_frames == 0 {
            self.reject_buffer(buffer, now_ns, out);
            return;
        }
        self.live.buffers.posted.push_back(Posted {
            buffer,
            signal: self.live.settings.signal,
            origin_ns: 0,
            capacity_frames: capacity_frames.min(u64::from(u32::MAX)),
            filled: 0,
            first_frame: 0,
            timestamp_ns: 0,
            dropped_before: 0,
            flags: 0,
            trigger_frame: 0,
            triggers: Vec::new(),
            triggers_lost: 0,
            first_byte: 0,
            crc: crc32fast::Hasher::new(),
        });
    }

    /// Answers a buffer that cannot hold a single frame: header with BAD_BUFFER, no frames.
    pub(super) fn reject_buffer(
        &mut self,
        mut buffer: B,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) {
        self.live.counters.requests_rejected += 1;
        let header = BufferHeader {
            timestamp_ns: now_ns.into(),
            status: buffer_status::BAD_BUFFER,
            format: self.live.settings.format as u8,
            channels: self.live.settings.channels.into(),
            ..Default::default()
        };
        let used_len = match buffer.write_header(&header) {
            Ok(()) => HEADER_SIZE as u32,
            Err(_) => 0,
        };
        self.note_completion(now_ns);
        out.push(Completion { buffer, used_len });
    }

    /// Completes the front buffer if it holds frames older than the latency bound.
    pub(super) fn complete_expired(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let latency = self.latency_ns();
        while let Some(front) = self.live.buffers.posted.front() {
            if front.filled > 0 && now_ns >= front.timestamp_ns.saturating_add(latency) {
                self.complete_front(flags::LATENCY, now_ns, out);
            } else {
                break;
            }
        }
    }

    /// Renders up to `count` frames from the start of `run` into the front buffer; completes
    /// it when full. Returns the frames taken.
    pub(super) fn fill_front(
        &mut self,
        run: &Run,
        count: u64,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> u64 {
        let first = run.first;
        // Frames of one buffer share one signal: a change ends the buffer being filled.
        if self.signal_changes_at(first)
            && self
                .live
                .buffers
                .posted
                .front()
                .is_some_and(|p| p.filled > 0 && p.first_frame < first)
        {
            self.complete_front(flags::SIGNAL_CHANGED, now_ns, out);
            return 0;
        }
        let count = match self.signal_change_after(first) {
            Some(change) if change < first + count => change - first,
            _ => count,
        };
        let signal_changed_here = self.signal_changes_at(first);
        // Segments fully behind the delivered stream are no longer needed.
        while self.live.signal_segments.len() > 1
            && self.live.signal_segments[1].0 <= self.live.buffers.delivered_end
        {
            self.live.signal_segments.pop_front();
        }
        let frame_bytes = self.frame_bytes();
        let params = self.signal_at(first);
        let crc_enabled = self.kept.crc_enabled;
        let frame_time = self.frame_time_ns(run, first);
        let free_running = self.live.settings.clock == ClockMode::FreeRunning;
        let discontinuity = std::mem::take(&mut self.live.buffers.discontinuity);
        let delivered_end = self.live.buffers.delivered_end;
        let trigger_at = self.live.trigger.software_at;
        let Some(front) = self.live.buffers.posted.front_mut() else {
            return 0;
        };
        if front.filled == 0 {
            front.open(
                first,
                params.kind,
                run.origin_ns,
                if free_running { now_ns } else { frame_time },
                first.saturating_sub(delivered_end),
                discontinuity || signal_changed_here,
            );
        }
        let taken = count.min(front.capacity_frames - front.filled);
        let triggered = trigger_at.filter(|&trigger| trigger >= first && trigger < first + taken);
        if let Some(trigger) = triggered {
            // The header records the buffer's first trigger; every trigger raises an event.
            front.mark_triggered(front.filled + trigger - first);
        }
        let mut renderer = Renderer {
            params,
            frame_bytes,
            crc: crc_enabled,
            scratch: &mut self.kept.scratch,
            source: self.kept.source.as_deref(),
            trigger: self
                .live
                .trigger
                .armed
                .as_ref()
                .map(|armed| (armed, &mut self.live.trigger.scan)),
        };
        let rendered = renderer.write(front, first, taken);
        for &frame in &rendered.fired {
            front.mark_triggered(frame - front.first_frame);
        }
        front.filled += taken;
        self.live.buffers.delivered_end = first + taken;
        if triggered.is_some() {
            self.live.trigger.software_at = None;
        }
        if rendered.write_failed {
            self.return_unwritable_front(now_ns, out);
            return taken;
        }
        let full = self
            .live
            .buffers
            .posted
            .front()
            .is_some_and(|p| p.filled == p.capacity_frames);
        if full {
            self.complete_front(0, now_ns, out);
        }
        taken
    }

    /// The front buffer's memory became unwritable: its frames are gone. They count as
    /// dropped, the buffer is returned empty, and the next buffer's header reports them in
    /// `dropped_frames`.
    fn return_unwritable_front(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let Some(broken) = self.live.buffers.posted.pop_front() else {
            return;
        };
        // Back to before this buffer's drops too, so the next header reports them.
        self.live.buffers.delivered_end = broken.first_frame - broken.dropped_before;
        self.live.counters.frames_dropped += broken.filled;
        self.live.counters.requests_rejected += 1;
        warn!("read buffer became unwritable; returning it with used length 0");
        // Its trigger frames are lost with it: the events say so, as for a dropped frame.
        self.raise_trigger_events(&broken.triggers, broken.triggers_lost, u64::MAX, now_ns);
        self.note_completion(now_ns);
        out.push(Completion {
            buffer: broken.buffer,
            used_len: 0,
        });
    }

    /// Completes the front buffer with what it holds.
    pub(super) fn complete_front(
        &mut self,
        extra_flags: u16,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) {
        let Some(mut posted) = self.live.buffers.posted.pop_front() else {
            return;
        };
        let frame_bytes = self.frame_bytes();
        if posted.filled == 0 {
            // Returned empty (flush/stop): it starts where the next delivered frame would, and
            // reports the frames dropped since the last delivered one, so every drop shows up
            // in some header as long as any buffer completes after it.
            posted.first_frame = self
                .live
                .fifo
                .runs
                .front()
                .map_or(self.live.clock.next_frame, |run| run.first);
            posted.timestamp_ns = now_ns;
            posted.dropped_before = posted
                .first_frame
                .saturating_sub(self.live.buffers.delivered_end);
            if posted.dropped_before > 0 {
                posted.flags |= flags::OVERRUN;
            }
            self.live.buffers.delivered_end = posted.first_frame;
        }
        let mut header_flags = posted.flags | extra_flags;
        let mut crc = if self.kept.crc_enabled {
            header_flags |= flags::CRC_VALID;
            posted.crc.clone().finalize()
        } else {
            0
        };
        if self.live.faults.corrupt_buffers > 0 && posted.filled > 0 {
            // Scripted corruption: a CRC that does not match, or without CRC a wrong first
            // sample byte.
            self.live.faults.corrupt_buffers -= 1;
            self.live.counters.buffers_corrupted += 1;
            if self.kept.crc_enabled {
                crc ^= 0x5a5a_5a5a;
            } else {
                let _ = posted.buffer.write_payload(0, &[posted.first_byte ^ 0xff]);
            }
        }
        let mut header = BufferHeader {
            sequence: self.live.buffers.sequence.into(),
            first_frame: posted.first_frame.into(),
            timestamp_ns: posted.timestamp_ns.into(),
            dropped_frames: posted.dropped_before.into(),
            frame_count: (posted.filled as u32).into(),
            trigger_frame: posted.trigger_frame.into(),
            crc32: crc.into(),
            flags: header_flags.into(),
            status: buffer_status::OK,
            format: self.live.settings.format as u8,
            channels: self.live.settings.channels.into(),
            signal: posted.signal as u8,
            reserved0: 0,
            rate_hz: match self.live.settings.clock {
                ClockMode::Paced => self.live.settings.rate_hz,
                ClockMode::FreeRunning => 0,
            }
            .into(),
            reserved1: 0.into(),
        };
        if posted.filled > 0 {
            self.apply_header_lie(&mut header);
        }
        let used_len = match posted.buffer.write_header(&header) {
            Ok(()) => HEADER_SIZE + posted.filled as usize * frame_bytes,
            Err(err) => {
                warn!("read buffer header write failed: {err}");
                self.live.counters.requests_rejected += 1;
                self.live.counters.frames_dropped += posted.filled;
                self.raise_trigger_events(&posted.triggers, posted.triggers_lost, u64::MAX, now_ns);
                // The frames (and the drops before them) go into the next header.
                self.live.buffers.delivered_end = posted.first_frame - posted.dropped_before;
                self.note_completion(now_ns);
                out.push(Completion {
                    buffer: posted.buffer,
                    used_len: 0,
                });
                return;
            }
        };
        let sequence = self.live.buffers.sequence;
        self.live.buffers.sequence += 1;
        self.live.counters.buffers_completed += 1;
        self.live.counters.frames_delivered += posted.filled;
        self.raise_trigger_events(&posted.triggers, posted.triggers_lost, sequence, now_ns);
        self.note_completion(now_ns);
        out.push(Completion {
            buffer: posted.buffer,
            used_len: u32::try_from(used_len).unwrap_or(u32::MAX),
        });
    }

    /// One TRIGGER event per trigger frame, in stream order, naming the buffer (`sequence`,
    /// or all-ones when the frame did not reach the driver).
    fn raise_trigger_events(&mut self, triggers: &[u64], lost: u32, sequence: u64, now_ns: u64) {
        let mut frames = triggers.to_vec();
        frames.sort_unstable();
        for frame in frames {
            self.push_event(kind::TRIGGER, now_ns, frame, sequence);
        }
        for _ in 0..lost {
            self.count_event_lost();
        }
    }

    pub(super) fn note_completion(&mut self, now_ns: u64) {
        self.live.buffers.unsignaled += 1;
        // Interrupt coalescing runs on real time, also in deterministic mode, where `now_ns`
        // inside the sampling loop is virtual.
        let real = self.real_time_ns(now_ns);
        self.live.buffers.first_unsignaled_ns.get_or_insert(real);
    }

    /// Whether to notify the driver now (interrupt coalescing): after `coalesce_buffers`
    /// completions, once the oldest unsignaled completion reached the latency bound, or at
    /// once with `force`. Resets the coalescing state when it says yes.
    pub fn take_notification(&mut self, now_ns: u64, force: bool) -> bool {
        if self.live.buffers.unsignaled == 0 {
            return false;
        }
        let due = force
            || self.live.buffers.unsignaled >= u32::from(self.live.settings.coalesce_buffers)
            || self
                .live
                .buffers
                .first_unsignaled_ns
                .is_some_and(|t| now_ns >= t.saturating_add(self.latency_ns()));
        if due {
            self.live.buffers.unsignaled = 0;
            self.live.buffers.first_unsignaled_ns = None;
            if self.live.faults.drop_interrupts > 0 {
                // Scripted: this interrupt is lost.
                self.live.faults.drop_interrupts -= 1;
                self.live.counters.interrupts_dropped += 1;
                return false;
            }
        }
        due
    }

    /// Whether completed buffers must be held back at `now_ns` (a scripted delay).
    pub fn completions_delayed(&self, now_ns: u64) -> bool {
        now_ns < self.live.faults.delay_completions_until_ns
    }
}
