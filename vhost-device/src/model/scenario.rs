//! Scenario files: a timeline of scripted device ("firmware") behaviour, keyed by time since
//! START or by stream index, in TOML:
//!
//! ```toml
//! description = "lose five interrupts half a second in"
//! [[step]]
//! at_ms = 500
//! action = "drop_interrupts"
//! count = 5
//! ```
//!
//! Actions: `drop_interrupts` (count), `delay_completions` (duration_ms: completed buffers
//! are held back), `stall` (duration_ms: the FIFO is not drained),
//! `corrupt_crc` (count: buffers with a wrong CRC), `fault` (code: a FAULT event),
//! `needs_reset`, `trigger`, `disconnect` (close the vhost-user connection), and the
//! protocol violations of [`super::violations`] (`used_len_over`, `bad_header`, `reply_never`,
//! …).
//! Invalid files are rejected with the line and the reason.

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;
use vdaq_wire::SignalKind;

use super::violations::{ScriptedViolation, ViolationError};

/// Why a scenario file was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ScenarioError {
    /// 1-based line in the file.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// When a step fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// This long after START (ns of device time).
    Time(u64),
    /// When the stream reaches this frame index.
    Frame(u64),
}

/// What a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The next `count` interrupts (used-buffer notifications) are lost.
    DropInterrupts(u32),
    /// Buffers completed during the next this-many ns reach the used ring only when the
    /// window ends (or at FLUSH/STOP).
    DelayCompletions(u64),
    /// The FIFO is not drained for this long (ns): buffers wait, the FIFO may overrun.
    Stall(u64),
    /// The next `count` buffers with frames carry a wrong CRC (or a corrupted sample without
    /// CRC).
    CorruptCrc(u32),
    /// A FAULT event with this code.
    Fault(u32),
    /// The device enters NEEDS_RESET.
    NeedsReset,
    /// A software trigger.
    Trigger,
    /// The backend closes the vhost-user connection.
    Disconnect,
    /// From the next sampled frame on, the analog front end carries another signal (and
    /// optionally frequency and amplitude); the first buffer with it is flagged
    /// DISCONTINUITY.
    SetSignal {
        /// The new waveform.
        signal: SignalKind,
        /// New frequency (mHz), or unchanged.
        freq_mhz: Option<u32>,
        /// New amplitude (‰), or unchanged.
        amplitude_permille: Option<u16>,
    },
    /// The card breaks the protocol or the spec on purpose.
    Violate(ScriptedViolation),
}

/// Parameters an action may take (scenario step fields, control-socket request fields).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActionFields {
    /// `count`.
    pub count: Option<u32>,
    /// `duration_ms`.
    pub duration_ms: Option<u64>,
    /// `code`.
    pub code: Option<u32>,
    /// `signal` (counter, sine, square, sawtooth, noise, file).
    pub signal: Option<String>,
    /// `freq_hz`.
    pub freq_hz: Option<f64>,
    /// `amplitude` (‰).
    pub amplitude: Option<u16>,
    /// `field` (which field `bad_header` or `bad_config` makes lie).
    pub field: Option<String>,
}

/// Why a scenario step or a control-socket `inject` names no valid action.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ActionError {
    /// An action that counts something got no count (or 0).
    #[error("action \"{0}\" needs count >= 1")]
    NeedsCount(String),
    /// An action that lasts got no duration (or 0).
    #[error("action \"{0}\" needs duration_ms >= 1")]
    NeedsDuration(&'static str),
    /// `fault` without a code.
    #[error("action \"fault\" needs a code")]
    NeedsCode,
    /// `set_signal` without a known signal.
    #[error("action \"set_signal\" needs signal = counter, sine, square, sawtooth, noise or file")]
    NeedsSignal,
    /// A frequency outside what the config space can hold.
    #[error("freq_hz must be within 0 ..= 4294967")]
    Frequency,
    /// An amplitude above full scale.
    #[error("amplitude is in per mille: 0 ..= 1000")]
    Amplitude,
    /// A protocol violation with missing or bad parameters.
    #[error(transparent)]
    ScriptedViolation(#[from] ViolationError),
    /// No such action.
    #[error(
        "unknown action \"{0}\" (known: drop_interrupts, delay_completions, stall, \
         corrupt_crc, fault, needs_reset, trigger, disconnect, set_signal, and the violations {names})",
        names = super::violations::NAMES
    )]
    Unknown(String),
}

impl Action {
    /// Builds an action from its name and parameters (a scenario step, or a control-socket
    /// request). The error names what is missing or unknown.
    pub fn from_fields(name: &str, fields: &ActionFields) -> Result<Self, ActionError> {
        let ActionFields {
            count,
            duration_ms,
            code,
            ..
        } = *fields;
        let need_count = || {
            count
                .filter(|&c| c > 0)
                .ok_or_else(|| ActionError::NeedsCount(name.to_owned()))
        };
        let need_duration = |action: &'static str| {
            duration_ms
                .filter(|&d| d > 0)
                .map(|ms| ms.saturating_mul(1_000_000))
                .ok_or(ActionError::NeedsDuration(action))
        };
        Ok(match name {
            "drop_interrupts" => Action::DropInterrupts(need_count()?),
            "delay_completions" => Action::DelayCompletions(need_duration("delay_completions")?),
            "corrupt_crc" => Action::CorruptCrc(need_count()?),
            "stall" => Action::Stall(need_duration("stall")?),
            "fault" => Action::Fault(code.ok_or(ActionError::NeedsCode)?),
            "needs_reset" => Action::NeedsReset,
            "trigger" => Action::Trigger,
            "disconnect" => Action::Disconnect,
            "set_signal" => {
                let signal = fields
                    .signal
                    .as_deref()
                    .and_then(|name| {
                        (0..=u8::MAX)
                            .map_while(SignalKind::from_code)
                            .find(|kind| kind.name() == name)
                    })
                    .ok_or(ActionError::NeedsSignal)?;
                let freq_mhz = match fields.freq_hz {
                    None => None,
                    Some(hz) if hz.is_finite() && (0.0..=4_294_967.0).contains(&hz) => {
                        Some((hz * 1000.0).round() as u32)
                    }
                    Some(_) => return Err(ActionError::Frequency),
                };
                if fields.amplitude.is_some_and(|a| a > 1000) {
                    return Err(ActionError::Amplitude);
                }
                Action::SetSignal {
                    signal,
                    freq_mhz,
                    amplitude_permille: fields.amplitude,
                }
            }
            other => {
                return match ScriptedViolation::from_fields(
                    other,
                    fields.field.as_deref(),
                    count,
                    duration_ms,
                )? {
                    Some(violation) => Ok(Action::Violate(violation)),
                    None => Err(ActionError::Unknown(other.to_owned())),
                }
            }
        })
    }
}

/// One timeline entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// When.
    pub at: At,
    /// What.
    pub action: Action,
    /// Line of the step in its file (for logs).
    pub line: usize,
}

/// A parsed scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    /// Free text.
    pub description: String,
    /// Steps, in file order.
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    description: String,
    #[serde(default)]
    step: Vec<Spanned<StepSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    at_ms: Option<u64>,
    at_frame: Option<u64>,
    action: String,
    count: Option<u32>,
    duration_ms: Option<u64>,
    code: Option<u32>,
    signal: Option<String>,
    freq_hz: Option<f64>,
    amplitude: Option<u16>,
    field: Option<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Scenario {
    /// Parses a scenario file's text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let file: FileSpec = toml::from_str(text).map_err(|err| ScenarioError {
            line: err.span().map_or(1, |span| line_of(text, span.start)),
            reason: err.message().to_string(),
        })?;
        let mut steps = Vec::new();
        for spanned in file.step {
            let line = line_of(text, spanned.span().start);
            let spec = spanned.into_inner();
            let bad = |reason: String| ScenarioError { line, reason };
            let at = match (spec.at_ms, spec.at_frame) {
                (Some(ms), None) => At::Time(ms.saturating_mul(1_000_000)),
                (None, Some(frame)) => At::Frame(frame),
                _ => return Err(bad("a step needs exactly one of at_ms or at_frame".into())),
            };
            let fields = ActionFields {
                count: spec.count,
                duration_ms: spec.duration_ms,
                code: spec.code,
                signal: spec.signal,
                freq_hz: spec.freq_hz,
                amplitude: spec.amplitude,
                field: spec.field,
            };
            let action =
                Action::from_fields(&spec.action, &fields).map_err(|err| bad(err.to_string()))?;
            steps.push(Step { at, action, line });
        }
        Ok(Scenario {
            description: file.description,
            steps,
        })
    }
}

/// Where a running scenario stands.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    steps: Vec<Step>,
    fired: Vec<bool>,
}

impl Timeline {
    /// A timeline over `scenario`'s steps, none fired.
    pub fn new(scenario: &Scenario) -> Self {
        Timeline {
            steps: scenario.steps.clone(),
            fired: vec![false; scenario.steps.len()],
        }
    }

    /// The earliest frame index of a frame-keyed step not yet fired.
    pub fn next_frame_step(&self) -> Option<u64> {
        self.steps
            .iter()
            .zip(&self.fired)
            .filter(|(step, fired)| !**fired && matches!(step.at, At::Frame(_)))
            .filter_map(|(step, _)| match step.at {
                At::Frame(frame) => Some(frame),
                At::Time(_) => None,
            })
            .min()
    }

    /// The earliest frame index at which a step not yet fired is due, at `rate_hz`.
    pub fn next_frame(&self, rate_hz: u32) -> Option<u64> {
        self.steps
            .iter()
            .zip(&self.fired)
            .filter(|(_, fired)| !**fired)
            .map(|(step, _)| match step.at {
                At::Frame(frame) => frame,
                At::Time(ns) => {
                    let frames = (u128::from(ns) * u128::from(rate_hz)).div_ceil(1_000_000_000);
                    u64::try_from(frames).unwrap_or(u64::MAX)
                }
            })
            .min()
    }

    /// Steps due at `elapsed_ns` since START and stream index `next_frame`, each returned
    /// once.
    pub fn due(&mut self, elapsed_ns: u64, next_frame: u64) -> Vec<Step> {
        let mut due = Vec::new();
        for (step, fired) in self.steps.iter().zip(self.fired.iter_mut()) {
            let reached = match step.at {
                At::Time(at) => elapsed_ns >= at,
                At::Frame(at) => next_frame >= at,
            };
            if reached && !*fired {
                *fired = true;
                due.push(*step);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_action() {
        let scenario = Scenario::parse(
            r#"
description = "all of them"
[[step]]
at_ms = 10
action = "drop_interrupts"
count = 3
[[step]]
at_frame = 1000
action = "stall"
duration_ms = 50
[[step]]
at_ms = 20
action = "corrupt_crc"
count = 1
[[step]]
at_ms = 30
action = "fault"
code = 7
[[step]]
at_ms = 40
action = "needs_reset"
[[step]]
at_ms = 50
action = "trigger"
[[step]]
at_ms = 60
action = "disconnect"
[[step]]
at_ms = 70
action = "delay_completions"
duration_ms = 5
"#,
        )
        .expect("valid");
        assert_eq!(scenario.description, "all of them");
        assert_eq!(scenario.steps.len(), 8);
        assert_eq!(
            scenario.steps[7].action,
            Action::DelayCompletions(5_000_000)
        );
        assert_eq!(scenario.steps[0].action, Action::DropInterrupts(3));
        assert_eq!(scenario.steps[0].at, At::Time(10_000_000));
        assert_eq!(scenario.steps[1].at, At::Frame(1000));
        assert_eq!(scenario.steps[1].action, Action::Stall(50_000_000));
        assert_eq!(scenario.steps[3].action, Action::Fault(7));
        assert_eq!(scenario.steps[1].line, 7);
    }

    #[test]
    fn invalid_files_name_the_line_and_the_reason() {
        for (text, line, needle) in [
            (
                "[[step]]\nat_ms = 1\naction = \"explode\"\n",
                1,
                "unknown action",
            ),
            (
                "\n\n[[step]]\naction = \"trigger\"\n",
                3,
                "exactly one of at_ms or at_frame",
            ),
            (
                "[[step]]\nat_ms = 1\naction = \"drop_interrupts\"\n",
                1,
                "needs count",
            ),
            (
                "[[step]]\nat_ms = 1\naction = \"stall\"\n",
                1,
                "duration_ms",
            ),
            (
                "[[step]]\nat_ms = 1\naction = \"trigger\"\ncolour = 3\n",
                4,
                "unknown field",
            ),
            (
                "[[step]]\nat_ms = \"soon\"\naction = \"trigger\"\n",
                2,
                "invalid type",
            ),
            ("[[step]\n", 1, ""),
        ] {
            let err = Scenario::parse(text).expect_err("invalid");
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.reason.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn parses_every_protocol_violation_and_names_what_a_bad_one_lacks() {
        use super::super::violations::{ConfigLie, HeaderLie};
        let step = |action: &str, extra: &str| {
            let text = format!("[[step]]\nat_ms = 1\naction = \"{action}\"\n{extra}");
            Scenario::parse(&text).map(|s| s.steps[0].action)
        };
        for (action, extra, expected) in [
            ("used_len_over", "", ScriptedViolation::UsedLenOverBuffer),
            (
                "used_len_under_header",
                "",
                ScriptedViolation::UsedLenUnderHeader,
            ),
            (
                "used_id_out_of_range",
                "",
                ScriptedViolation::UsedIdOutOfRange,
            ),
            (
                "used_id_not_in_flight",
                "",
                ScriptedViolation::UsedIdNotInFlight,
            ),
            ("complete_twice", "", ScriptedViolation::CompleteTwice),
            ("used_index_jump", "", ScriptedViolation::UsedIndexJump(0)),
            (
                "used_index_jump",
                "count = 5",
                ScriptedViolation::UsedIndexJump(5),
            ),
            (
                "bad_header",
                "field = \"timestamp\"",
                ScriptedViolation::Header(HeaderLie::Timestamp),
            ),
            ("reply_short", "", ScriptedViolation::ReplyShort),
            ("reply_long", "", ScriptedViolation::ReplyLong),
            ("reply_bad_status", "", ScriptedViolation::ReplyBadStatus),
            ("reply_never", "", ScriptedViolation::ReplyNever),
            (
                "bad_config",
                "field = \"max_channels\"",
                ScriptedViolation::Config(ConfigLie::MaxChannels),
            ),
            ("unknown_event", "", ScriptedViolation::UnknownEvent),
            (
                "interrupt_storm",
                "count = 9",
                ScriptedViolation::InterruptStorm(9),
            ),
            (
                "no_interrupts",
                "duration_ms = 2",
                ScriptedViolation::NoInterrupts(2_000_000),
            ),
        ] {
            assert_eq!(
                step(action, extra),
                Ok(Action::Violate(expected)),
                "{action} {extra}"
            );
        }
        for (action, extra, needle) in [
            ("bad_header", "", "field = frame_count"),
            ("bad_header", "field = \"colour\"", "field = frame_count"),
            ("bad_config", "", "field = channels"),
            ("interrupt_storm", "", "count 1 ..= 100000"),
            ("interrupt_storm", "count = 100001", "count 1 ..= 100000"),
            ("no_interrupts", "", "duration_ms"),
            ("used_index_jump", "count = 0", "count 1 ..= 32768"),
        ] {
            let err = step(action, extra).expect_err(action);
            assert!(err.reason.contains(needle), "{action} {extra}: {err}");
        }
        let unknown = step("explode", "").expect_err("unknown");
        assert!(unknown.reason.contains("reply_never"), "{unknown}");
    }

    #[test]
    fn steps_fire_once_when_due() {
        let scenario = Scenario::parse(
            "[[step]]\nat_ms = 5\naction = \"trigger\"\n[[step]]\nat_frame = 100\naction = \"needs_reset\"\n",
        )
        .expect("valid");
        let mut timeline = Timeline::new(&scenario);
        assert!(timeline.due(4_000_000, 0).is_empty());
        assert_eq!(timeline.due(5_000_000, 0).len(), 1);
        assert!(timeline.due(6_000_000, 99).is_empty());
        assert_eq!(timeline.due(7_000_000, 100)[0].action, Action::NeedsReset);
        assert!(timeline.due(u64::MAX, u64::MAX).is_empty());
    }
}
