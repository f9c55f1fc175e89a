//! The sample clock: which frames are due at a device time (paced), filling buffers as fast
//! as they come (free-running), and virtual sample time (deterministic mode).

use vdaq_wire::buffer::flags;
use vdaq_wire::{ClockMode, DeviceState};

use super::fifo::Run;
use super::scenario::Timeline;
use super::{Card, Completion, ReadBuffer, NS_PER_SEC};

/// Where the clock stands.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Clock {
    /// Paced clock anchor: frame `origin_frame` was sampled at `origin_ns`.
    pub(super) origin_ns: u64,
    pub(super) origin_frame: u64,
    /// Stream index of the next frame to sample.
    pub(super) next_frame: u64,
    /// Device time of the first START since reset (scenario time zero).
    pub(super) stream_started_ns: Option<u64>,
    /// Latest real device time seen by `advance` (deterministic mode keeps virtual time
    /// apart from it).
    pub(super) real_now_ns: u64,
}

impl<B: ReadBuffer> Card<B> {
    /// Moves the card forward to `now_ns`: samples due frames, fills and completes buffers.
    pub fn advance(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        self.live.clock.real_now_ns = now_ns;
        match self.live.state {
            DeviceState::NeedsReset => return,
            DeviceState::Stopped => {
                // A stopped card still hands over what it sampled before STOP, and completes
                // the buffer that takes the last of it.
                self.drain(now_ns, true, out);
                if self.live.fifo.level == 0
                    && self
                        .live
                        .buffers
                        .posted
                        .front()
                        .is_some_and(|p| p.filled > 0)
                {
                    self.complete_front(flags::STOPPED, now_ns, out);
                }
                return;
            }
            DeviceState::Running => {}
        }
        if self.kept.deterministic && self.live.settings.clock == ClockMode::Paced {
            self.run_virtual(out);
            return;
        }
        self.run_timeline(now_ns);
        if self.live.state != DeviceState::Running {
            return;
        }
        match self.live.settings.clock {
            ClockMode::Paced => {
                let due = self.due_frame(now_ns);
                self.produce_until(due, now_ns, out);
                self.drain(now_ns, false, out);
                self.complete_expired(now_ns, out);
            }
            ClockMode::FreeRunning => self.free_run(now_ns, out),
        }
    }

    /// Frame the paced clock has reached at `now_ns` (exclusive).
    pub(super) fn due_frame(&self, now_ns: u64) -> u64 {
        let elapsed = u128::from(now_ns.saturating_sub(self.live.clock.origin_ns));
        let frames = elapsed * u128::from(self.live.settings.rate_hz) / NS_PER_SEC;
        self.live
            .clock
            .origin_frame
            .saturating_add(u64::try_from(frames).unwrap_or(u64::MAX))
    }

    /// Device time at which paced frame `frame` of `run` was sampled.
    pub(super) fn frame_time_ns(&self, run: &Run, frame: u64) -> u64 {
        if self.live.settings.clock == ClockMode::FreeRunning || self.live.settings.rate_hz == 0 {
            return run.origin_ns;
        }
        let offset = u128::from(frame.saturating_sub(run.origin_frame)) * NS_PER_SEC
            / u128::from(self.live.settings.rate_hz);
        run.origin_ns
            .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }

    /// Free-running clock: every posted buffer is filled with fresh frames right away.
    pub(super) fn free_run(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) {
        if now_ns < self.live.faults.stall_until_ns {
            return;
        }
        while let Some(front) = self.live.buffers.posted.front() {
            let mut count = front.capacity_frames - front.filled;
            // Frame-keyed scenario steps fire at their exact frame.
            if let Some(step) = self
                .live
                .faults
                .timeline
                .as_ref()
                .and_then(Timeline::next_frame_step)
            {
                if step <= self.live.clock.next_frame {
                    self.run_timeline(now_ns);
                    if self.live.state != DeviceState::Running
                        || now_ns < self.live.faults.stall_until_ns
                    {
                        return;
                    }
                    continue;
                }
                count = count.min(step - self.live.clock.next_frame);
            }
            let run = Run {
                first: self.live.clock.next_frame,
                len: count,
                origin_ns: now_ns,
                origin_frame: self.live.clock.next_frame,
            };
            let taken = self.fill_front(&run, count, now_ns, out);
            self.live.clock.next_frame += taken;
            self.live.counters.frames_produced += taken;
        }
    }

    /// Deterministic mode: the paced clock runs in virtual time. Frame n is sampled at
    /// n × 10⁹ / rate_hz ns, the device samples exactly as far as posted buffers need (the
    /// driver is never too slow), buffers complete when full (or on STOP/FLUSH), and scenario
    /// steps fire at virtual times, so the same settings, scenario and buffer sizes give a
    /// bit-identical stream — fault points included — on every run, however fast the host.
    pub fn set_deterministic(&mut self, deterministic: bool) {
        self.kept.deterministic = deterministic;
    }

    pub(super) fn virtual_time_ns(&self, frame: u64) -> u64 {
        let rate = u128::from(self.live.settings.rate_hz.max(1));
        u64::try_from(u128::from(frame) * NS_PER_SEC / rate).unwrap_or(u64::MAX)
    }

    /// Deterministic mode's replacement for the paced clock (see [`Card::set_deterministic`]).
    pub(super) fn run_virtual(&mut self, out: &mut Vec<Completion<B>>) {
        loop {
            let now = self.virtual_time_ns(self.live.clock.next_frame);
            self.run_timeline(now);
            if self.live.state != DeviceState::Running {
                return;
            }
            if self.live.faults.stall_until_frame > self.live.clock.next_frame {
                // A stall: the stalled stretch is sampled at once (up to the next scenario
                // step, which must fire at its exact frame); the FIFO keeps what fits and the
                // rest is dropped.
                let mut count = self.live.faults.stall_until_frame - self.live.clock.next_frame;
                if let Some(step) = self
                    .live
                    .faults
                    .timeline
                    .as_ref()
                    .and_then(|t| t.next_frame(self.live.settings.rate_hz))
                    .filter(|&step| step > self.live.clock.next_frame)
                {
                    count = count.min(step - self.live.clock.next_frame);
                }
                let space = u64::from(self.kept.limits.fifo_frames) - self.live.fifo.level;
                if space > 0 {
                    self.accept_frames(count.min(space), now);
                }
                if count > space {
                    self.drop_frames(count - space, now);
                }
                continue;
            }
            if self.live.buffers.posted.is_empty() {
                return;
            }
            if self.live.fifo.level > 0 {
                self.drain(now, true, out);
                continue;
            }
            let Some(front) = self.live.buffers.posted.front() else {
                return;
            };
            if front.filled > 0 && front.first_frame + front.filled != self.live.clock.next_frame {
                // Frames were dropped since this buffer's last one: it ends here.
                self.complete_front(0, now, out);
                continue;
            }
            let mut count = front.capacity_frames - front.filled;
            // Stop at the next scenario step so it fires at its exact frame.
            if let Some(step_frame) = self
                .live
                .faults
                .timeline
                .as_ref()
                .and_then(|t| t.next_frame(self.live.settings.rate_hz))
            {
                if step_frame > self.live.clock.next_frame {
                    count = count.min(step_frame - self.live.clock.next_frame);
                }
            }
            // The clock run the FIFO's frames get too (set at START), so that a buffer filled
            // partly from the FIFO and partly directly is one run, not a pause.
            let run = Run {
                first: self.live.clock.next_frame,
                len: count,
                origin_ns: self.live.clock.origin_ns,
                origin_frame: self.live.clock.origin_frame,
            };
            self.end_overrun(now);
            let taken = self.fill_front(&run, count, now, out);
            self.live.clock.next_frame += taken;
            self.live.counters.frames_produced += taken;
        }
    }
}
