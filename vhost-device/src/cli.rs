//! Command-line options, in rust-vmm vhost-device conventions plus QEMU's vhost-user
//! backend-program conventions (`--print-capabilities`, `--fd`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{error::ErrorKind, Parser};
use thiserror::Error;
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use crate::backend::{DeviceOptions, Recorder};
use crate::control::RequestError;
use crate::model::scenario::{Scenario, ScenarioError};
use crate::model::source::{FileSource, SourceError};
use crate::model::{Limits, Settings};
use crate::sandbox::SeccompMode;

/// Why the command line cannot be served. Each message is one line that names the fix; `main`
/// prints it and exits 2.
#[derive(Debug, Error)]
pub enum CliError {
    /// The options are misused.
    #[error("{0}")]
    Usage(String),
    /// `ctl` words that make no request.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The scenario file cannot be read.
    #[error("cannot read --scenario {}: {source}", path.display())]
    ScenarioRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The scenario file is invalid.
    #[error("--scenario {}: {source}; fix the file", path.display())]
    Scenario {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        source: ScenarioError,
    },
    /// The source file cannot be replayed.
    #[error("--source: {0}")]
    Source(#[from] SourceError),
    /// The recording file cannot be opened.
    #[error("cannot open --record {}: {source}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The source file has another channel count than the device.
    #[error("--source {} has {found} channels; pass --channels {found}", path.display())]
    SourceChannels {
        /// The file.
        path: PathBuf,
        /// Its channel count.
        found: u16,
    },
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// Where the daemon takes vhost-user connections from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Listen on these socket paths, one device each.
    Paths(Vec<PathBuf>),
    /// Serve the listening socket inherited as this fd.
    Fd(i32),
    /// Connect to a frontend listening here (and reconnect after every disconnect).
    Connect(PathBuf),
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Connection source.
    pub endpoint: Endpoint,
    /// Control socket per device (same order as the endpoint's sockets), if asked for.
    pub control_sockets: Vec<PathBuf>,
    /// Bounds on each control socket's clients.
    pub control_limits: crate::control::ControlLimits,
    /// Per-device options.
    pub device: DeviceOptions,
    /// What the sandbox does with a system call outside its allowlist.
    pub seccomp: SeccompMode,
}

/// A daemon configuration from the command line whose files (scenario, source) are named but
/// not read yet: parsing stays free of I/O, [`ServeOptions::load_files`] does the reading.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The configuration, without scenario and source.
    pub config: DaemonConfig,
    /// `--scenario`.
    pub scenario: Option<PathBuf>,
    /// `--source`.
    pub source: Option<PathBuf>,
    /// `--record`.
    pub record: Option<PathBuf>,
}

impl ServeOptions {
    /// Reads and checks the scenario and source files; returns the complete configuration.
    pub fn load_files(self) -> Result<DaemonConfig, CliError> {
        let mut config = self.config;
        if let Some(path) = self.scenario {
            let text = std::fs::read_to_string(&path).map_err(|source| CliError::ScenarioRead {
                path: path.clone(),
                source,
            })?;
            let scenario =
                Scenario::parse(&text).map_err(|source| CliError::Scenario { path, source })?;
            config.device.scenario = Some(std::sync::Arc::new(scenario));
        }
        let settings = config.device.settings;
        match self.source {
            None if settings.signal == SignalKind::File => {
                return Err(usage("--signal file needs --source FILE"));
            }
            None => {}
            Some(path) => {
                let source = FileSource::load(&path, settings.format, settings.channels)?;
                if source.channels != settings.channels {
                    return Err(CliError::SourceChannels {
                        path,
                        found: source.channels,
                    });
                }
                config.device.source = Some(std::sync::Arc::new(source));
            }
        }
        if let Some(path) = self.record {
            let file = Recorder::open_file(&path).map_err(|source| CliError::Record {
                path: path.clone(),
                source,
            })?;
            config.device.record = Some(std::sync::Arc::new(file));
        }
        Ok(config)
    }
}

/// What `main` should do.
#[derive(Debug)]
pub enum Action {
    /// Read the named files, then run the daemon.
    Serve(ServeOptions),
    /// Exit now with this code (help, version, capabilities were printed).
    Exit(ExitCode),
    /// Send one request to a running backend's control socket.
    Control {
        /// The control socket.
        socket: PathBuf,
        /// The request line (JSON).
        request: String,
    },
    /// Draw a recording or source file as a PNG.
    Plot(crate::plot::PlotArgs),
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Talk to a running backend's control socket: `ctl SOCKET stats`,
    /// `ctl SOCKET inject stall duration_ms=100`, `ctl SOCKET set coalesce_buffers=8`, or a
    /// JSON request line.
    Ctl {
        /// The backend's --control-socket.
        socket: PathBuf,
        /// The request.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        request: Vec<String>,
    },
    /// Draw a recording (--record) or a source file as a PNG waveform: channels stacked,
    /// min/max envelopes, buffer boundaries, overrun gaps, triggers and discontinuities marked.
    Plot(crate::plot::PlotArgs),
    /// Print a shell completion script on stdout, e.g.
    /// `vhost-device-daq completions bash > /etc/bash_completion.d/vhost-device-daq`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The card's power-on settings and limits: the defaults of the options below.
const POWER_ON: Settings = Settings::POWER_ON;
const CARD_LIMITS: Limits = Limits::STANDARD;

/// vhost-user backend for vdaq, a virtual data-acquisition card.
#[derive(Parser, Debug)]
#[command(name = BINARY, version, propagate_version = true, about, long_about = None,
          args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Runtime control socket (line-delimited JSON: statistics, parameters, fault injection);
    /// with --socket-count N, PATH0 .. PATH{N-1}.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Control-socket clients served at once; one more is answered with an error and closed.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    control_clients: u16,

    /// Close a control-socket client that sends nothing for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    control_idle_secs: u32,

    /// Location of the vhost-user Unix domain socket. With --socket-count N > 1, the
    /// sockets are PATH0 .. PATH{N-1}.
    #[arg(short = 's', long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,

    /// Number of devices (one socket each).
    #[arg(short = 'c', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    socket_count: u16,

    /// Serve the already-listening vhost-user socket inherited as this file descriptor.
    #[arg(long, value_name = "FDNUM", conflicts_with = "connect")]
    fd: Option<i32>,

    /// Connect to a frontend that listens at PATH (QEMU: -chardev socket,server=on) instead
    /// of listening; after a disconnect, or when started later, connect again. A restarted
    /// backend thus finds a running VM again.
    #[arg(long, value_name = "PATH", conflicts_with = "socket_path")]
    connect: Option<PathBuf>,

    /// Print the backend's capabilities as JSON and exit (vhost-user backend convention).
    #[arg(long)]
    print_capabilities: bool,

    /// Paced sample rate in Hz.
    #[arg(short = 'r', long, default_value_t = POWER_ON.rate_hz)]
    rate: u32,

    /// Channels per frame.
    #[arg(long, default_value_t = POWER_ON.channels)]
    channels: u16,

    /// Sample format.
    #[arg(long, value_enum, default_value_t = POWER_ON.format)]
    format: SampleFormat,

    /// Signal source.
    #[arg(long, value_enum, default_value_t = POWER_ON.signal)]
    signal: SignalKind,

    /// Frequency of periodic signals, in Hz.
    #[arg(long, default_value_t = f64::from(POWER_ON.signal_freq_mhz) / 1000.0)]
    signal_freq: f64,

    /// Signal amplitude in per mille of full scale (0..=1000).
    #[arg(long, default_value_t = POWER_ON.amplitude_permille)]
    amplitude: u16,

    /// Seed of the noise source.
    #[arg(long, default_value_t = POWER_ON.seed)]
    seed: u64,

    /// Sample clock mode.
    #[arg(long, value_enum, default_value_t = POWER_ON.clock)]
    clock: ClockMode,

    /// Latency bound in µs: longest a sampled frame waits before its buffer completes.
    #[arg(long, default_value_t = POWER_ON.latency_us)]
    latency_us: u32,

    /// FIFO depth in frames.
    #[arg(long, default_value_t = CARD_LIMITS.fifo_frames)]
    fifo_frames: u32,

    /// Input range in mV: the voltage the full-scale sample value stands for (config space
    /// `full_scale_uv`; drivers scale samples by it). 0 = not stated.
    #[arg(long, default_value_t = CARD_LIMITS.full_scale_uv / 1000,
          value_parser = clap::value_parser!(u32).range(0..=4_294_967))]
    full_scale_mv: u32,

    /// FIFO watermark in frames (data moves into buffers at this level).
    #[arg(long, default_value_t = POWER_ON.watermark_frames)]
    watermark: u32,

    /// Completed buffers per interrupt (1 = no coalescing).
    #[arg(long, default_value_t = POWER_ON.coalesce_buffers)]
    coalesce: u16,

    /// Most channels a frame may carry (at most 1024).
    #[arg(long, default_value_t = CARD_LIMITS.max_channels, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_channels: u16,

    /// Largest virtqueue size offered to the driver (power of two).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,

    /// File the `file` signal replays (looping): a .vdaqrec recording, .wav, .csv, or raw
    /// samples in the device's format.
    #[arg(long, value_name = "FILE")]
    source: Option<PathBuf>,

    /// Record every buffer the device delivers to FILE (a .vdaqrec, replayable as --source).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,

    /// Deterministic mode: virtual sample time (frame n at n / rate), sampling exactly as far
    /// as posted buffers need, scenario steps at virtual times: the same run gives a
    /// bit-identical stream.
    #[arg(long)]
    deterministic: bool,

    /// Scenario file (TOML): scripted firmware behaviour and faults; see scenarios/.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,

    /// Accept guest memory in files the frontend can still shrink (not sealed against it, as
    /// QEMU's memory-backend-file is; its memory-backend-memfd is sealed). A frontend that
    /// truncates such a file under the running device kills the backend with SIGBUS.
    #[arg(long)]
    allow_unsealed_memory: bool,

    /// What happens to a thread that makes a system call outside the sandbox's allowlist once
    /// the daemon is set up (seccomp): `kill` the process, `log` it and let it through (to
    /// find what a new feature needs), or `none` (no sandbox).
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    seccomp: SeccompMode,

    /// While running, watch the data queue for new read buffers this many µs after taking
    /// the last before asking the driver for a notification (0: ask at once). Spares the guest the notifications
    /// while it posts buffers back to back, for a host core that spins meanwhile.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    poll_us: u32,

    /// Period of the device's clock tick, in µs.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    tick_us: u32,
}

/// Parses the command line (no file is read here). `Err` is a one-line message for exit
/// code 2.
pub fn parse<I, T>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(err) => {
            return match err.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    // clap renders help and version itself.
                    let _ = err.print();
                    Ok(Action::Exit(ExitCode::SUCCESS))
                }
                _ => Err(usage(one_line(&err))),
            };
        }
    };
    match args.command {
        Some(Command::Ctl { socket, request }) => {
            let request = crate::control::request_from_words(&request)?;
            return Ok(Action::Control { socket, request });
        }
        Some(Command::Plot(plot)) => return Ok(Action::Plot(plot)),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut command(), BINARY, &mut std::io::stdout());
            return Ok(Action::Exit(ExitCode::SUCCESS));
        }
        None => {}
    }
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return Ok(Action::Exit(ExitCode::SUCCESS));
    }
    let endpoint = match (&args.socket_path, args.fd) {
        (None, None) if args.connect.is_some() => {
            if args.socket_count != 1 {
                return Err(usage("--connect serves one device; drop --socket-count"));
            }
            Endpoint::Connect(args.connect.clone().unwrap_or_default())
        }
        (Some(path), None) => Endpoint::Paths(socket_paths(path, args.socket_count)),
        (None, Some(fd)) if fd >= 0 => {
            if args.socket_count != 1 {
                return Err(usage("--fd serves one device; drop --socket-count"));
            }
            Endpoint::Fd(fd)
        }
        (None, Some(fd)) => {
            return Err(usage(format!(
                "--fd {fd} is not a file descriptor; pass the inherited socket's number"
            )))
        }
        _ => {
            return Err(usage(
                "missing --socket-path; pass --socket-path PATH (or --fd FDNUM)",
            ))
        }
    };
    if !args.queue_size.is_power_of_two() {
        return Err(usage(format!(
            "--queue-size {} is not a power of two; use e.g. 256 or 1024",
            args.queue_size
        )));
    }
    let settings = Settings {
        rate_hz: args.rate,
        channels: args.channels,
        format: args.format,
        signal: args.signal,
        signal_freq_mhz: hz_to_mhz(args.signal_freq).ok_or_else(|| {
            usage(format!(
                "--signal-freq {} is out of range; use 0 to 4294967 Hz",
                args.signal_freq
            ))
        })?,
        amplitude_permille: args.amplitude,
        seed: args.seed,
        clock: args.clock,
        latency_us: args.latency_us,
        watermark_frames: args.watermark,
        coalesce_buffers: args.coalesce,
    };
    let limits = Limits {
        max_channels: args.max_channels,
        fifo_frames: args.fifo_frames,
        full_scale_uv: args.full_scale_mv * 1000,
        ..Limits::default()
    };
    if args.fifo_frames == 0 {
        return Err(usage("--fifo-frames must be at least 1"));
    }
    settings
        .validate(&limits)
        .map_err(|err| usage(format!("{err}; fix the matching option (see --help)")))?;
    if args.deterministic && settings.clock != ClockMode::Paced {
        return Err(usage(
            "--deterministic needs the paced clock; drop --clock free",
        ));
    }
    if args.record.is_some() && args.socket_count != 1 {
        return Err(usage(
            "--record records one device; drop --socket-count (or run one backend per device)",
        ));
    }
    let control_sockets = match (&args.control_socket, &endpoint) {
        (None, _) => Vec::new(),
        (Some(path), Endpoint::Paths(paths)) => socket_paths(path, paths.len() as u16),
        (Some(path), Endpoint::Fd(_) | Endpoint::Connect(_)) => vec![path.clone()],
    };
    Ok(Action::Serve(ServeOptions {
        config: DaemonConfig {
            endpoint,
            control_sockets,
            control_limits: crate::control::ControlLimits {
                max_clients: usize::from(args.control_clients),
                idle_timeout: std::time::Duration::from_secs(u64::from(args.control_idle_secs)),
            },
            device: DeviceOptions {
                settings,
                limits,
                queue_size: args.queue_size,
                tick: Duration::from_micros(u64::from(args.tick_us)),
                scenario: None,
                deterministic: args.deterministic,
                source: None,
                record: None,
                allow_unsealed_memory: args.allow_unsealed_memory,
                poll: Duration::from_micros(u64::from(args.poll_us)),
            },
            seccomp: args.seccomp,
        },
        scenario: args.scenario,
        source: args.source,
        record: args.record,
    }))
}

fn hz_to_mhz(hz: f64) -> Option<u32> {
    let mhz = (hz * 1000.0).round();
    (hz.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&mhz)).then_some(mhz as u32)
}

/// Socket paths for `count` devices: PATH itself for one, PATH0..PATH{N-1} for more.
fn socket_paths(path: &std::path::Path, count: u16) -> Vec<PathBuf> {
    if count == 1 {
        return vec![path.to_path_buf()];
    }
    (0..count)
        .map(|i| {
            let mut name = path.as_os_str().to_owned();
            name.push(i.to_string());
            PathBuf::from(name)
        })
        .collect()
}

/// clap's first error line plus where to look, e.g.
/// `error: unexpected argument '--foo' found; see --help`.
fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    format!("{first}; run with --help for the valid options")
}

/// The program's name, in completions and man pages.
const BINARY: &str = "vhost-device-daq";

/// The command-line definition, for tools that render it (the man pages, docs/man/).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// The `--print-capabilities` document (docs/interop/vhost-user.json in QEMU).
pub fn capabilities_json() -> String {
    serde_json::json!({
        "type": "daq",
        "features": [],
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and, for the daemon, reads the named files: `main`'s two steps.
    fn parse_args(args: &[&str]) -> Result<Action, String> {
        match parse(std::iter::once("vhost-device-daq").chain(args.iter().copied())) {
            Ok(Action::Serve(options)) => match options.clone().load_files() {
                Ok(_) => Ok(Action::Serve(options)),
                Err(err) => Err(err.to_string()),
            },
            other => other.map_err(|err| err.to_string()),
        }
    }

    fn config(args: &[&str]) -> DaemonConfig {
        match parse_args(args) {
            Ok(Action::Serve(options)) => options.load_files().expect("files load"),
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_a_valid_device() {
        let config = config(&["-s", "/tmp/daq.sock"]);
        assert_eq!(
            config.endpoint,
            Endpoint::Paths(vec!["/tmp/daq.sock".into()])
        );
        assert_eq!(config.device.settings.rate_hz, 100_000);
        assert_eq!(config.device.settings.signal, SignalKind::Counter);
    }

    #[test]
    fn the_input_range_reaches_the_config_space() {
        assert_eq!(config(&["-s", "x"]).device.limits.full_scale_uv, 10_000_000);
        let config = config(&["-s", "x", "--full-scale-mv", "2500"]);
        assert_eq!(config.device.limits.full_scale_uv, 2_500_000);
        let message =
            parse_args(&["-s", "x", "--full-scale-mv", "5000000"]).expect_err("µV overflow");
        assert!(message.contains("full-scale-mv"), "{message}");
    }

    #[test]
    fn connect_mode_is_an_endpoint_of_its_own() {
        let config = config(&["--connect", "/run/qemu-daq.sock"]);
        assert_eq!(
            config.endpoint,
            Endpoint::Connect("/run/qemu-daq.sock".into())
        );
        for args in [
            &["--connect", "a", "--socket-path", "b"][..],
            &["--connect", "a", "--fd", "3"][..],
            &["--connect", "a", "--socket-count", "2"][..],
        ] {
            let message = parse_args(args).expect_err("conflicting endpoints");
            assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn socket_count_suffixes_the_path() {
        let config = config(&["--socket-path", "/tmp/d", "--socket-count", "3"]);
        assert_eq!(
            config.endpoint,
            Endpoint::Paths(vec!["/tmp/d0".into(), "/tmp/d1".into(), "/tmp/d2".into()])
        );
    }

    #[test]
    fn device_options_are_applied() {
        let config = config(&[
            "-s",
            "x",
            "--rate",
            "48000",
            "--channels",
            "8",
            "--format",
            "f32",
            "--signal",
            "sine",
            "--signal-freq",
            "440.5",
            "--clock",
            "free",
            "--coalesce",
            "8",
        ]);
        let s = config.device.settings;
        assert_eq!(s.rate_hz, 48_000);
        assert_eq!(s.channels, 8);
        assert_eq!(s.format, SampleFormat::F32);
        assert_eq!(s.signal, SignalKind::Sine);
        assert_eq!(s.signal_freq_mhz, 440_500);
        assert_eq!(s.clock, ClockMode::FreeRunning);
        assert_eq!(s.coalesce_buffers, 8);
    }

    #[test]
    fn misuse_gives_one_line_naming_the_fix() {
        for (args, needle) in [
            (&["--socket-path"][..], "--socket-path"),
            (&["-s", "x", "--bogus"][..], "--bogus"),
            (&[][..], "--socket-path"),
            (&["-s", "x", "--channels", "0"][..], "channel count 0"),
            (&["-s", "x", "--watermark", "999999"][..], "watermark"),
            (&["-s", "x", "--queue-size", "100"][..], "power of two"),
            (&["-s", "x", "--fd", "3"][..], "--fd"),
            (&["-s", "x", "--format", "u8"][..], "u8"),
            (
                &["-s", "x", "--scenario", "/nonexistent.toml"][..],
                "/nonexistent.toml",
            ),
        ] {
            let message = parse_args(args).expect_err("misuse must fail");
            assert!(!message.contains('\n'), "one line: {message:?}");
            assert!(message.contains(needle), "{message:?} names {needle}");
        }
    }

    #[test]
    fn capabilities_are_json_with_type_and_features() {
        let value: serde_json::Value =
            serde_json::from_str(&capabilities_json()).expect("valid JSON");
        assert_eq!(value["type"], "daq");
        assert!(value["features"].is_array());
    }
}
