//! Run parameters. The image's `/init` exports every `vdaq.NAME=VALUE` of the kernel command
//! line as `VDAQ_NAME`; the names and defaults are the bare-metal guest's (README, "Guest
//! parameters"), plus the Linux-only modes `cancel` and `close-pending`.

use std::fmt;

/// What the application does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Stream, verify, shut down.
    Stream,
    /// Stream with a slow consumer: the device must overrun and report every dropped frame.
    Overrun,
    /// Stream briefly, then check that shutdown gets every read back.
    Shutdown,
    /// Cancel a share of the reads in flight while streaming; each must come back.
    Cancel,
    /// Close the device with reads in flight; each must come back and the device hold none.
    ClosePending,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "stream" => Mode::Stream,
            "overrun" => Mode::Overrun,
            "shutdown" => Mode::Shutdown,
            "cancel" => Mode::Cancel,
            "close-pending" => Mode::ClosePending,
            _ => return None,
        })
    }

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Overrun => "overrun",
            Mode::Shutdown => "shutdown",
            Mode::Cancel => "cancel",
            Mode::ClosePending => "close-pending",
        }
    }
}

/// The application's parameters.
#[derive(Clone, Debug)]
pub struct Params {
    /// The character device.
    pub device: String,
    /// What to do.
    pub mode: Mode,
    /// Streaming time.
    pub duration_ms: u64,
    /// Reads kept in flight.
    pub reads: usize,
    /// Bytes per read (header included).
    pub buffer: usize,
    /// Require a valid payload CRC in every buffer (the module was loaded with `crc=1`).
    pub crc: bool,
    /// Time spent per consumed buffer (a deliberately slow application).
    pub consume_delay_us: u64,
    /// Progress line period.
    pub progress_ms: u64,
    /// Also measure the consume-only rate (benchmark), as the bare-metal guest does.
    pub consume_only: bool,
    /// Read into io_uring registered buffers (IORING_OP_READ_FIXED: io_uring pins them once,
    /// at registration) rather than with plain reads (the driver pins each read's pages).
    pub registered_buffers: bool,
}

/// A parameter with a value the application cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    name: &'static str,
    value: String,
    expected: &'static str,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vdaq.{}={} is not valid; use {}",
            self.name.to_ascii_lowercase(),
            self.value,
            self.expected
        )
    }
}

impl Params {
    /// Reads the parameters through `get` (the environment in the guest).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ParamError> {
        let number = |name: &'static str, default: u64, min: u64, max: u64| match get(&format!(
            "VDAQ_{name}"
        )) {
            None => Ok(default),
            Some(value) => value
                .parse::<u64>()
                .ok()
                .filter(|v| (min..=max).contains(v))
                .ok_or(ParamError {
                    name,
                    value,
                    expected: "a number in range",
                }),
        };
        let mode = match get("VDAQ_MODE") {
            None => Mode::Stream,
            Some(value) => Mode::parse(&value).ok_or(ParamError {
                name: "MODE",
                value,
                expected: "stream, overrun, shutdown, cancel or close-pending",
            })?,
        };
        Ok(Params {
            device: get("VDAQ_DEVICE").unwrap_or_else(|| "/dev/vdaq0".into()),
            mode,
            duration_ms: number("DURATION_MS", 3000, 1, 24 * 3_600_000)?,
            reads: number("READS", 16, 1, 256)? as usize,
            buffer: number("BUFFER", 65536, 128, 256 * 1024)? as usize,
            crc: number("CRC", 0, 0, 1)? == 1,
            // The bare-metal guest's overrun default: a consumer slower than the device.
            consume_delay_us: number(
                "CONSUME_DELAY_US",
                if mode == Mode::Overrun { 20_000 } else { 0 },
                0,
                1_000_000,
            )?,
            progress_ms: number("PROGRESS_MS", 500, 10, 60_000)?,
            consume_only: number("CONSUME_ONLY", 0, 0, 1)? == 1,
            registered_buffers: number("REGISTERED", 1, 0, 1)? == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<Params, ParamError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Params::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_match_the_bare_metal_guest() {
        let p = params(&[]).expect("defaults");
        assert_eq!(p.mode, Mode::Stream);
        assert_eq!(p.device, "/dev/vdaq0");
        assert_eq!((p.duration_ms, p.reads, p.buffer), (3000, 16, 65536));
        assert!(!p.crc);
        assert!(!p.consume_only);
        assert!(p.registered_buffers);
        assert!(
            !params(&[("VDAQ_REGISTERED", "0")])
                .expect("valid")
                .registered_buffers
        );
    }

    #[test]
    fn values_are_read_and_bad_ones_named() {
        let p = params(&[
            ("VDAQ_MODE", "close-pending"),
            ("VDAQ_READS", "64"),
            ("VDAQ_CRC", "1"),
        ])
        .expect("valid");
        assert_eq!(p.mode, Mode::ClosePending);
        assert_eq!(p.reads, 64);
        assert!(p.crc);
        let err = params(&[("VDAQ_READS", "0")]).expect_err("0 reads");
        assert_eq!(
            err.to_string(),
            "vdaq.reads=0 is not valid; use a number in range"
        );
        let err = params(&[("VDAQ_MODE", "fast")]).expect_err("unknown mode");
        assert!(err.to_string().contains("vdaq.mode=fast"));
    }
}
