//! The FIFO between the sample clock and the buffers: accepting frames, overrun episodes,
//! and draining into posted buffers at the watermark or the latency bound.

use std::collections::VecDeque;

use log::debug;
use vdaq_wire::buffer::flags;
use vdaq_wire::event::{kind, OVERRUN_REPORT_INTERVAL_NS};

use super::{Card, Completion, ReadBuffer};

/// What the FIFO holds.
#[derive(Debug, Default)]
pub(super) struct Fifo {
    /// Runs of contiguous frames, oldest first.
    pub(super) runs: VecDeque<Run>,
    /// Frames held (the sum of the runs' lengths).
    pub(super) level: u64,
    /// Frames dropped in the overrun episode still going on and not yet reported.
    pub(super) drop_run: Option<DropRun>,
}

/// The unreported part of an overrun episode.
#[derive(Clone, Copy, Debug)]
pub(super) struct DropRun {
    first: u64,
    count: u64,
    /// Device time its first frame was dropped.
    since_ns: u64,
}

/// Contiguous frames in the FIFO, sampled in one clock run (START to STOP). A gap between
/// two runs is an overrun; a new clock origin is a pause.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) first: u64,
    pub(super) len: u64,
    /// Clock run the frames belong to: frame `origin_frame` was sampled at `origin_ns`.
    pub(super) origin_ns: u64,
    pub(super) origin_frame: u64,
}

impl<B: ReadBuffer> Card<B> {
    pub(super) fn produce_until(&mut self, due: u64, now_ns: u64, out: &mut Vec<Completion<B>>) {
        let depth = u64::from(self.kept.limits.fifo_frames);
        while self.live.clock.next_frame < due {
            let wanted = due - self.live.clock.next_frame;
            let mut space = depth - self.live.fifo.level;
            if space == 0 {
                // Like a DMA engine, move data out before declaring an overrun.
                self.drain(now_ns, false, out);
                space = depth - self.live.fifo.level;
                if space == 0 {
                    self.drop_frames(wanted, now_ns);
                    break;
                }
            }
            self.accept_frames(wanted.min(space), now_ns);
        }
    }

    pub(super) fn accept_frames(&mut self, count: u64, now_ns: u64) {
        self.end_overrun(now_ns);
        let first = self.live.clock.next_frame;
        let origin_ns = self.live.clock.origin_ns;
        match self.live.fifo.runs.back_mut() {
            Some(run) if run.first + run.len == first && run.origin_ns == origin_ns => {
                run.len += count
            }
            _ => self.live.fifo.runs.push_back(Run {
                first,
                len: count,
                origin_ns,
                origin_frame: self.live.clock.origin_frame,
            }),
        }
        self.live.fifo.level += count;
        self.live.clock.next_frame += count;
        self.live.counters.frames_produced += count;
    }

    pub(super) fn drop_frames(&mut self, count: u64, now_ns: u64) {
        let first = self.live.clock.next_frame;
        match &mut self.live.fifo.drop_run {
            Some(run) => run.count += count,
            None => {
                debug!("overrun: FIFO full and no buffer posted, dropping from frame {first}");
                self.live.fifo.drop_run = Some(DropRun {
                    first,
                    count,
                    since_ns: now_ns,
                });
            }
        }
        if self
            .live
            .fifo
            .drop_run
            .is_some_and(|run| now_ns.saturating_sub(run.since_ns) >= OVERRUN_REPORT_INTERVAL_NS)
        {
            // Still going on: report what is lost so far; the rest follows in later events.
            self.end_overrun(now_ns);
        }
        if let Some(trigger) = self.live.trigger.software_at {
            if trigger >= first && trigger < first + count {
                self.live.trigger.software_at = None;
                self.push_event(kind::TRIGGER, now_ns, trigger, u64::MAX);
            }
        }
        self.live.clock.next_frame += count;
        self.live.counters.frames_produced += count;
        self.live.counters.frames_dropped += count;
    }

    /// Closes the running overrun episode, if any, and reports it.
    pub(super) fn end_overrun(&mut self, now_ns: u64) {
        if let Some(run) = self.live.fifo.drop_run.take() {
            self.push_event(kind::OVERRUN, now_ns, run.count, run.first);
        }
    }

    /// Moves FIFO frames into posted buffers. Without `force`, only once the FIFO reached the
    /// watermark or its oldest frame is about to exceed the latency bound.
    pub(super) fn drain(&mut self, now_ns: u64, force: bool, out: &mut Vec<Completion<B>>) {
        if !force && now_ns < self.live.faults.stall_until_ns {
            // A scripted stall: the DMA engine moves nothing.
            return;
        }
        while self.live.fifo.level > 0 && !self.live.buffers.posted.is_empty() {
            if !force
                && self.live.fifo.level < u64::from(self.live.settings.watermark_frames)
                && !self.oldest_fifo_frame_expired(now_ns)
            {
                break;
            }
            let Some(run) = self.live.fifo.runs.front().copied() else {
                break;
            };
            let ending = self.live.buffers.posted.front().and_then(|p| {
                if p.filled == 0 {
                    None
                } else if p.first_frame + p.filled != run.first {
                    Some(0)
                } else if p.origin_ns != run.origin_ns {
                    Some(flags::PAUSED)
                } else {
                    None
                }
            });
            if let Some(reason) = ending {
                // Frames in one buffer are contiguous in index and time: an overrun gap (no
                // flag; the next buffer says OVERRUN) or a STOP/START pause ends the buffer.
                self.complete_front(reason, now_ns, out);
                continue;
            }
            let taken = self.fill_front(&run, run.len, now_ns, out);
            self.live.fifo.level -= taken;
            if let Some(front) = self.live.fifo.runs.front_mut() {
                front.first += taken;
                front.len -= taken;
                if front.len == 0 {
                    self.live.fifo.runs.pop_front();
                }
            }
        }
    }

    pub(super) fn oldest_fifo_frame_expired(&self, now_ns: u64) -> bool {
        self.live
            .fifo
            .runs
            .front()
            .is_some_and(|run| now_ns >= self.frame_time_ns(run, run.first) + self.latency_ns() / 2)
    }
}
