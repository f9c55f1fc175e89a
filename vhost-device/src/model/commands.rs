//! Control commands (START, STOP, CONFIGURE, FLUSH, TRIGGER, SET_TRIGGER, GET_STATUS,
//! RESET_COUNTERS), the STATUS reply and the configuration space.

use log::debug;
use vdaq_wire::buffer::flags;
use vdaq_wire::config::{DaqConfig, MODEL_LEN};
use vdaq_wire::control::{CommandStatus, Configure, FlushReply, Opcode, Status};
use vdaq_wire::zerocopy::{FromBytes, IntoBytes};
use vdaq_wire::{ClockMode, DeviceState, SampleFormat};

use super::settings::{Settings, SettingsError};
use super::{Card, Completion, Counters, ReadBuffer};

/// Outcome of a control command: status code and reply payload.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandReply {
    /// How the command ended.
    pub status: CommandStatus,
    /// Reply payload (empty unless the opcode has one and status is OK).
    pub payload: Vec<u8>,
}

impl CommandReply {
    pub(super) fn status(status: CommandStatus) -> Self {
        CommandReply {
            status,
            payload: Vec::new(),
        }
    }
}

impl<B: ReadBuffer> Card<B> {
    /// Starts the sample clock.
    pub fn start(&mut self, now_ns: u64) -> CommandStatus {
        match self.live.state {
            DeviceState::NeedsReset => CommandStatus::Busy,
            DeviceState::Running => CommandStatus::Ok,
            DeviceState::Stopped => {
                self.live.state = DeviceState::Running;
                if self.kept.deterministic {
                    // Virtual time: frame n is sampled at n × 10⁹ / rate, scenario time zero
                    // is frame 0.
                    self.live.clock.stream_started_ns = Some(0);
                    self.live.clock.origin_ns = self.virtual_time_ns(self.live.clock.next_frame);
                } else {
                    self.live.clock.stream_started_ns.get_or_insert(now_ns);
                    self.live.clock.origin_ns = now_ns;
                }
                self.live.clock.origin_frame = self.live.clock.next_frame;
                CommandStatus::Ok
            }
        }
    }

    /// Stops the sample clock: frames due up to now are sampled, moved into buffers, and the
    /// partly filled buffer completes with STOPPED.
    pub fn stop(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) -> CommandStatus {
        match self.live.state {
            DeviceState::NeedsReset => CommandStatus::Busy,
            DeviceState::Stopped => CommandStatus::Ok,
            DeviceState::Running => {
                if self.live.settings.clock == ClockMode::Paced && !self.kept.deterministic {
                    let due = self.due_frame(now_ns);
                    self.produce_until(due, now_ns, out);
                }
                self.end_overrun(now_ns);
                self.live.state = DeviceState::Stopped;
                self.drain(now_ns, true, out);
                if self
                    .live
                    .buffers
                    .posted
                    .front()
                    .is_some_and(|p| p.filled > 0)
                {
                    self.complete_front(flags::STOPPED, now_ns, out);
                }
                CommandStatus::Ok
            }
        }
    }

    /// Applies new settings (only while stopped). A change of the frame size returns every held
    /// buffer first, empty and FLUSHED, in order; otherwise held buffers stay held.
    pub fn configure(
        &mut self,
        settings: Settings,
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> CommandStatus {
        if self.live.state != DeviceState::Stopped {
            return CommandStatus::Busy;
        }
        if let Err(err) = settings.validate(&self.kept.limits) {
            debug!("CONFIGURE refused: {err}");
            return CommandStatus::Invalid;
        }
        if !self.source_fits(&settings) {
            debug!("CONFIGURE refused: the file signal needs a source with as many channels");
            return CommandStatus::Invalid;
        }
        if self.frames_pending() > 0 && settings != self.live.settings {
            // Frames sampled under the old settings are still on their way; refusing keeps
            // every buffer's header true to its payload.
            debug!("CONFIGURE refused: frames sampled under the old settings are pending");
            return CommandStatus::Busy;
        }
        let old = self.live.settings;
        let frame_bytes = |s: &Settings| s.format.sample_bytes() * usize::from(s.channels);
        if frame_bytes(&settings) != frame_bytes(&old) {
            // A held buffer's capacity in frames depends on the frame size, and some may no
            // longer hold one frame: all of them come back, empty and FLUSHED, in the order
            // they were made available (5.x.6.2 keeps completion order), before the reply.
            while !self.live.buffers.posted.is_empty() {
                self.complete_front(flags::FLUSHED, now_ns, out);
            }
        }
        let samples_change = (
            old.rate_hz,
            old.channels,
            old.format,
            old.signal,
            old.signal_freq_mhz,
            old.amplitude_permille,
            old.seed,
            old.clock,
        ) != (
            settings.rate_hz,
            settings.channels,
            settings.format,
            settings.signal,
            settings.signal_freq_mhz,
            settings.amplitude_permille,
            settings.seed,
            settings.clock,
        );
        if samples_change {
            self.live.buffers.discontinuity = true;
        }
        if settings != self.live.settings {
            // Nothing sampled under the old settings is pending (checked above): the signal
            // history is no longer needed. With the same settings, pending frames keep theirs.
            self.live.signal_segments.clear();
        }
        self.live.settings = settings;
        if self
            .live
            .trigger
            .armed
            .is_some_and(|t| t.channel >= settings.channels)
        {
            self.live.trigger.armed = None;
        }
        // Buffers still held have the frame size they were accepted with.
        CommandStatus::Ok
    }

    /// Changes delivery parameters that leave the samples alone, at any time.
    pub fn adjust(
        &mut self,
        latency_us: Option<u32>,
        coalesce_buffers: Option<u16>,
        watermark_frames: Option<u32>,
    ) -> Result<(), SettingsError> {
        let adjusted = Settings {
            latency_us: latency_us.unwrap_or(self.live.settings.latency_us),
            coalesce_buffers: coalesce_buffers.unwrap_or(self.live.settings.coalesce_buffers),
            watermark_frames: watermark_frames.unwrap_or(self.live.settings.watermark_frames),
            ..self.live.settings
        };
        adjusted.validate(&self.kept.limits)?;
        self.live.settings_changed |= adjusted != self.live.settings;
        self.live.settings = adjusted;
        Ok(())
    }

    /// Returns every held buffer now: FIFO contents go into them first, the rest complete
    /// empty, all flagged FLUSHED. Returns how many buffers were returned.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<Completion<B>>) -> u32 {
        // Counted from here: sampling the frames due now can itself complete buffers (a full
        // FIFO drains), and those are returned by this FLUSH too.
        let before = out.len();
        if self.live.state == DeviceState::Running
            && self.live.settings.clock == ClockMode::Paced
            && !self.kept.deterministic
        {
            let due = self.due_frame(now_ns);
            self.produce_until(due, now_ns, out);
        }
        self.drain(now_ns, true, out);
        while !self.live.buffers.posted.is_empty() {
            self.complete_front(flags::FLUSHED, now_ns, out);
        }
        (out.len() - before) as u32
    }

    /// Zeroes the counters (the stream position is kept).
    pub fn reset_counters(&mut self) {
        // Frames already sampled but not yet completed belong to the new window, so that
        // produced = delivered + dropped + pending keeps holding.
        self.live.counters = Counters {
            frames_produced: self.frames_pending(),
            ..Counters::default()
        };
    }

    /// STATUS reply.
    pub fn status(&self, now_ns: u64) -> Status {
        Status {
            device_time_ns: now_ns.into(),
            frames_produced: self.live.counters.frames_produced.into(),
            frames_delivered: self.live.counters.frames_delivered.into(),
            frames_dropped: self.live.counters.frames_dropped.into(),
            buffers_completed: self.live.counters.buffers_completed.into(),
            buffers_held: (self.live.buffers.posted.len() as u64).into(),
            frames_pending: self.frames_pending().into(),
            requests_rejected: self.live.counters.requests_rejected.into(),
            state: self.live.state as u8,
            reserved: [0; 7],
        }
    }

    /// The configuration space as the driver sees it now.
    pub fn config_space(&self) -> DaqConfig {
        let mut config = self.true_config_space();
        self.apply_config_lie(&mut config);
        config
    }

    /// The configuration space as the card's state says it should be.
    fn true_config_space(&self) -> DaqConfig {
        let mut model = [0u8; MODEL_LEN];
        let name = vdaq_wire::MODEL_NAME;
        model[..name.len()].copy_from_slice(name);
        let s = &self.live.settings;
        DaqConfig {
            max_channels: self.kept.limits.max_channels.into(),
            channels: s.channels.into(),
            supported_formats: SampleFormat::ALL
                .iter()
                .fold(0, |mask, f| mask | f.mask())
                .into(),
            min_rate_hz: self.kept.limits.min_rate_hz.into(),
            max_rate_hz: self.kept.limits.max_rate_hz.into(),
            rate_hz: s.rate_hz.into(),
            fifo_frames: self.kept.limits.fifo_frames.into(),
            watermark_frames: s.watermark_frames.into(),
            latency_us: s.latency_us.into(),
            signal_freq_mhz: s.signal_freq_mhz.into(),
            coalesce_buffers: s.coalesce_buffers.into(),
            amplitude_permille: s.amplitude_permille.into(),
            format: s.format as u8,
            signal: s.signal as u8,
            clock: s.clock as u8,
            state: self.live.state as u8,
            fault_code: self.live.fault_code.into(),
            seed: s.seed.into(),
            frames_produced: self.live.counters.frames_produced.into(),
            frames_delivered: self.live.counters.frames_delivered.into(),
            frames_dropped: self.live.counters.frames_dropped.into(),
            buffers_completed: self.live.counters.buffers_completed.into(),
            requests_rejected: self.live.counters.requests_rejected.into(),
            firmware_version: vdaq_wire::FIRMWARE_VERSION.into(),
            events_lost: self.live.counters.events_lost.into(),
            model,
            full_scale_uv: self.kept.limits.full_scale_uv.into(),
            // The backend knows its tick (DaqBackend::get_config fills it in).
            tick_us: 0.into(),
        }
    }

    /// Executes one control command whose header and payload were read from the guest.
    /// `payload` is exactly what followed the header; its size is checked here.
    pub fn execute(
        &mut self,
        op: u32,
        payload: &[u8],
        now_ns: u64,
        out: &mut Vec<Completion<B>>,
    ) -> CommandReply {
        let Some(op) = Opcode::from_code(op) else {
            return CommandReply::status(CommandStatus::Unsupported);
        };
        if payload.len() != op.payload_size() {
            return CommandReply::status(CommandStatus::BadSize);
        }
        if self.live.state == DeviceState::NeedsReset && op != Opcode::GetStatus {
            return CommandReply::status(CommandStatus::Busy);
        }
        match op {
            Opcode::Start => CommandReply::status(self.start(now_ns)),
            Opcode::Stop => CommandReply::status(self.stop(now_ns, out)),
            Opcode::Configure => {
                let Ok(cfg) = Configure::read_from_bytes(payload) else {
                    return CommandReply::status(CommandStatus::BadSize);
                };
                match Settings::from_wire(&cfg) {
                    Ok(settings) => CommandReply::status(self.configure(settings, now_ns, out)),
                    Err(err) => {
                        debug!("CONFIGURE refused: {err}");
                        CommandReply::status(CommandStatus::Invalid)
                    }
                }
            }
            Opcode::Trigger if !self.kept.trigger_enabled => {
                CommandReply::status(CommandStatus::Unsupported)
            }
            Opcode::Trigger => CommandReply::status(self.trigger()),
            Opcode::SetTrigger if !self.kept.trigger_enabled => {
                CommandReply::status(CommandStatus::Unsupported)
            }
            Opcode::SetTrigger => {
                match vdaq_wire::control::TriggerConfig::read_from_bytes(payload) {
                    Ok(config) => CommandReply::status(self.set_trigger(&config)),
                    Err(_) => CommandReply::status(CommandStatus::BadSize),
                }
            }
            Opcode::Flush => {
                let returned = self.flush(now_ns, out);
                CommandReply {
                    status: CommandStatus::Ok,
                    payload: FlushReply {
                        buffers_returned: returned.into(),
                        reserved: 0.into(),
                    }
                    .as_bytes()
                    .to_vec(),
                }
            }
            Opcode::GetStatus => CommandReply {
                status: CommandStatus::Ok,
                payload: self.status(now_ns).as_bytes().to_vec(),
            },
            Opcode::ResetCounters => {
                self.reset_counters();
                CommandReply::status(CommandStatus::Ok)
            }
        }
    }
}
