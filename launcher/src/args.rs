//! The command line: what `vdaq` and `vdaq bench` accept, how the accelerator choice is
//! checked against the host, and what a run's options mean for the backend and the guest.
//!
//! Sample format, clock and signal are the wire crate's own enums, named on the command line
//! exactly as the backend names them ([`SampleFormat::name`] and friends).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use vdaq_launcher::session::{Accel, GuestKind, Machine, RunConfig};
use vdaq_launcher::tools::{Kvm, Tools};

/// The accelerator asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when it is hardware-backed, else TCG.
    Auto,
    /// KVM (fails if /dev/kvm is unusable).
    Kvm,
    /// QEMU's TCG.
    Tcg,
}

/// Options that the chosen guest does not carry out.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GuestMismatch {
    /// A mode only the Linux guest has.
    #[error("--mode {0} needs the Linux guest; add --guest linux")]
    LinuxMode(&'static str),
    /// Hot-unplug needs a hot-pluggable bus.
    #[error(
        "--mode unplug needs --machine q35 (microvm's virtio-mmio devices are not hot-pluggable)"
    )]
    UnplugNeedsQ35,
    /// An option only the Linux guest has.
    #[error("{0} needs the Linux guest; add --guest linux")]
    LinuxOption(&'static str),
    /// Port 0 would be whatever the host picks, and nobody would know it.
    #[error("--iiod 0: give the host port to forward (e.g. --iiod 30431)")]
    IiodPort,
    /// The IIO modes capture through the IIO device, which reports no per-buffer latency or
    /// progress to draw.
    #[error(
        "--plot draws the stream modes' reports; --mode {0} has no latency or progress to draw"
    )]
    PlotMode(&'static str),
    /// An option only the bare-metal guest carries out.
    #[error("{0} is carried out by the bare-metal guest only; drop it or use --guest bare-metal")]
    BareMetalOnly(&'static str),
}

/// `--record FILE` where FILE exists.
#[derive(Debug, Error)]
#[error("--record {}: the file exists; remove it or name a new one", .0.display())]
pub struct RecordExists(pub PathBuf);

/// `--accel kvm` on a host without a usable /dev/kvm.
#[derive(Debug, Error)]
#[error("--accel kvm: /dev/kvm is missing or not accessible; use --accel tcg")]
pub struct KvmUnavailable;

impl AccelArg {
    /// The accelerator to use on a host with `kvm`.
    pub fn resolve(self, kvm: Kvm) -> Result<Accel, KvmUnavailable> {
        match (self, kvm) {
            (AccelArg::Tcg, _) => Ok(Accel::Tcg),
            (AccelArg::Kvm, Kvm::Absent) => Err(KvmUnavailable),
            (AccelArg::Kvm, _) => Ok(Accel::Kvm),
            (AccelArg::Auto, Kvm::Hardware) => Ok(Accel::Kvm),
            // Software-nested KVM runs guest code ~100x slower than TCG here.
            (AccelArg::Auto, _) => Ok(Accel::Tcg),
        }
    }
}

/// What a run exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Stream, verify every sample, then shut down draining every read.
    Stream,
    /// A slow application (deliberate per-buffer delay): the device overruns; every dropped
    /// frame must be reported.
    Overrun,
    /// Shut down while reads are in flight: every read must come back, the device must hold
    /// none.
    Shutdown,
    /// Linux guest: cancel a share of the reads in flight while streaming; each must come
    /// back cancelled or complete.
    Cancel,
    /// Linux guest: close the device with reads in flight; each must come back and the device
    /// hold none.
    ClosePending,
    /// Linux guest: remove the driver from the device (sysfs unbind, what module unload and
    /// hot-unplug run) with reads in flight; each must come back, then bind again and read.
    Unbind,
    /// Linux guest on q35: hot-unplug the card (QMP device_del) with reads in flight, restart
    /// the backend, plug a card in again; every read must come back and the new card stream.
    Unplug,
    /// Linux guest: capture through the driver's IIO device (sysfs scan elements and
    /// /dev/iio:deviceN, no libiio), verify every sample, change the rate through sysfs.
    IioRaw,
    /// Linux guest: capture with libiio's tools (iio_info, iio_attr, iio_readdev), verify every
    /// sample.
    Iio,
}

impl Mode {
    /// Name on the command line and in the guest parameters.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Overrun => "overrun",
            Mode::Shutdown => "shutdown",
            Mode::Cancel => "cancel",
            Mode::ClosePending => "close-pending",
            Mode::Unbind => "unbind",
            Mode::Unplug => "unplug",
            Mode::IioRaw => "iio-raw",
            Mode::Iio => "iio",
        }
    }
}

/// Parses a wire enum by its command-line name: every variant, or every one but the one
/// given to [`WireValue::except`].
///
/// Like clap's `value_enum`, except that `--help` lists the bare names: with `value_enum` it
/// would list every variant with the wire crate's doc comment, and the launcher's help names
/// the values only.
#[derive(Clone, Copy, Debug)]
pub struct WireValue<T: 'static> {
    name: fn(T) -> &'static str,
    except: Option<T>,
}

impl<T: ValueEnum + Copy + PartialEq + Send + Sync + 'static> WireValue<T> {
    /// Every variant, named by `name`.
    pub fn new(name: fn(T) -> &'static str) -> Self {
        WireValue { name, except: None }
    }

    /// Every variant but `value`.
    pub fn except(self, value: T) -> Self {
        WireValue {
            except: Some(value),
            ..self
        }
    }

    fn accepted(&self) -> impl Iterator<Item = T> + '_ {
        T::value_variants()
            .iter()
            .copied()
            .filter(|value| Some(*value) != self.except)
    }

    fn names(&self) -> impl Iterator<Item = PossibleValue> + '_ {
        self.accepted()
            .map(|value| PossibleValue::new((self.name)(value)))
    }
}

impl<T: ValueEnum + Copy + PartialEq + Send + Sync + 'static> TypedValueParser for WireValue<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        // Clap words the error for an unknown value (and for one that is not UTF-8: its lossy
        // form matches nothing) exactly as for a `value_enum` argument.
        let lossy = value.to_string_lossy();
        let given =
            PossibleValuesParser::new(self.names()).parse_ref(cmd, arg, OsStr::new(&*lossy))?;
        let ignore_case = arg.is_some_and(clap::Arg::is_ignore_case_set);
        self.accepted()
            .find(|value| PossibleValue::new((self.name)(*value)).matches(&given, ignore_case))
            .ok_or_else(|| clap::Error::new(ErrorKind::InvalidValue).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(self.names()))
    }
}

/// Options shared by runs and benchmarks.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Machine type (q35: virtio-pci + MSI-X; microvm: virtio-mmio + IOAPIC).
    #[arg(long, value_enum, default_value_t = Machine::Q35)]
    pub machine: Machine,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// QEMU binary (default: found or provisioned by ci/provision-qemu.sh).
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Backend binary (default: beside this program, or built).
    #[arg(long)]
    pub backend: Option<PathBuf>,
    /// Which guest drives the card: the bare-metal Rust guest, or Linux (Debian's kernel, the
    /// vdaq kernel module, the io_uring application).
    #[arg(long, value_enum, default_value_t = GuestKind::BareMetal)]
    pub guest: GuestKind,
    /// Bare-metal guest image (default: built by images/build.sh).
    #[arg(long, value_name = "ELF")]
    pub guest_image: Option<PathBuf>,
    /// Linux guest kernel (with --linux-initrd; default: built by images/build-linux.sh).
    #[arg(long, value_name = "BZIMAGE", requires = "linux_initrd")]
    pub linux_kernel: Option<PathBuf>,
    /// Linux guest initramfs (with --linux-kernel).
    #[arg(long, value_name = "CPIO", requires = "linux_kernel")]
    pub linux_initrd: Option<PathBuf>,
    /// Guest memory in MiB (default: 256 for the bare-metal guest, 512 for Linux).
    #[arg(long)]
    pub memory: Option<u32>,
    /// Echo the guest console and the QEMU command line.
    #[arg(short, long)]
    pub verbose: bool,
}

impl Common {
    /// QEMU, backend and guest image: as given, or found, built or provisioned; `libiio`: a
    /// Linux image with the libiio tools.
    pub fn tools(&self, libiio: bool) -> Result<Tools, vdaq_launcher::tools::ToolError> {
        Tools::find(
            self.qemu.as_deref(),
            self.backend.as_deref(),
            self.guest,
            self.guest_image.as_deref(),
            self.linux_kernel
                .as_deref()
                .zip(self.linux_initrd.as_deref()),
            libiio,
        )
    }

    /// Guest memory for this guest.
    pub fn memory_mib(&self) -> u32 {
        self.memory
            .unwrap_or_else(|| self.guest.default_memory_mib())
    }
}

/// One run.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Machine, accelerator, tools.
    #[command(flatten)]
    pub common: Common,
    /// What to exercise.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    pub mode: Mode,
    /// Streaming time in seconds of guest time.
    #[arg(short, long, default_value_t = 3.0)]
    pub duration: f64,
    /// Sample rate in Hz (paced clock).
    #[arg(short, long, default_value_t = 1_000_000)]
    pub rate: u32,
    /// Channels per frame (up to 1024; above 64 the card is built with that many).
    #[arg(short, long, default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(vdaq_wire::MAX_CHANNELS)))]
    pub channels: u16,
    /// Sample format.
    #[arg(long, value_parser = WireValue::new(SampleFormat::name),
          default_value = SampleFormat::S16.name())]
    pub format: SampleFormat,
    /// Sample clock: paced at --rate, or free-running (as fast as buffers come).
    #[arg(long, value_parser = WireValue::new(ClockMode::name),
          default_value = ClockMode::Paced.name())]
    pub clock: ClockMode,
    /// Bytes per read buffer (header included).
    #[arg(short, long, default_value_t = 64 * 1024)]
    pub buffer_size: u32,
    /// Reads kept in flight.
    #[arg(long, default_value_t = 64)]
    pub reads: u32,
    /// Completed buffers per interrupt (device-side coalescing).
    #[arg(long, default_value_t = 1)]
    pub coalesce: u16,
    /// The card's latency bound in µs (the longest a sampled frame waits for its buffer to
    /// complete, and with --coalesce > 1 for the interrupt); the backend's default if absent.
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u32).range(1..))]
    pub latency_us: Option<u32>,
    /// Ask for payload CRCs and verify them.
    #[arg(long)]
    pub crc: bool,
    /// Give up after this many seconds (default: duration + 60).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Print the guest's JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Scenario file for the backend (scripted faults; see scenarios/).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Deterministic device: virtual sample time, bit-identical stream on every run.
    #[arg(long)]
    pub deterministic: bool,
    /// Stop after this many frames instead of after --duration.
    #[arg(long, default_value_t = 0)]
    pub frames: u64,
    /// Hash every consumed buffer (report field stream_hash).
    #[arg(long)]
    pub hash: bool,
    /// The card's FIFO depth in frames (default: the backend's; 4096 in --mode overrun).
    #[arg(long)]
    pub fifo_frames: Option<u32>,
    /// How long the card, holding no read buffer, watches the data queue for new ones before
    /// it asks the guest for a notification, in µs (0: it asks at once). Spares the guest
    /// its notifications, for a host core spinning meanwhile; `vdaq bench` uses 200.
    #[arg(long, default_value_t = 0, value_name = "US",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub poll_us: u32,
    /// Linux guest: plain io_uring reads, the driver pinning each read's pages, instead of
    /// reads into io_uring registered buffers (READ_FIXED: pinned once, at registration).
    #[arg(long)]
    pub plain_reads: bool,
    /// Linux guest: serve the card with iiod on this host port (QEMU user networking,
    /// 127.0.0.1 only) instead of running a test; the VM runs until Ctrl-C. Then e.g.
    /// `iio_info -u ip:127.0.0.1:PORT`.
    #[arg(long, value_name = "PORT", conflicts_with_all = ["mode", "json", "scenario"])]
    pub iiod: Option<u16>,
    /// Signal source.
    // `file` needs a --source the launcher does not pass on, so it is not offered.
    #[arg(long, value_parser = WireValue::new(SignalKind::name).except(SignalKind::File),
          default_value = SignalKind::Counter.name())]
    pub signal: SignalKind,
    /// Seed of the noise signal.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Have the backend record every buffer it delivers to FILE (a new .vdaqrec: replayable
    /// with `vhost-device-daq --signal file --source FILE`, drawn by `vhost-device-daq plot`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// After the run, write charts into DIR: latency.png (the guest's latency histogram),
    /// throughput.png (verified throughput over guest time), waveform.png with --record, and
    /// plots.json (what each shows).
    #[arg(long, value_name = "DIR", conflicts_with = "iiod")]
    pub plot: Option<PathBuf>,
    /// Sample the backend's and QEMU's resident memory, open descriptors and threads every
    /// SECS seconds and print how they went (a soak: `--duration 1800 --sample-resources 5`).
    #[arg(long, value_name = "SECS", value_parser = positive_seconds)]
    pub sample_resources: Option<f64>,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("{text}: give seconds between 0.1 and 3600")),
    }
}

impl RunArgs {
    /// Refuses options the chosen guest would silently ignore.
    pub fn check_guest(&self) -> Result<(), GuestMismatch> {
        if self.plot.is_some() && matches!(self.mode, Mode::Iio | Mode::IioRaw) {
            return Err(GuestMismatch::PlotMode(self.mode.name()));
        }
        match self.common.guest {
            GuestKind::BareMetal if self.iiod.is_some() => {
                Err(GuestMismatch::LinuxOption("--iiod"))
            }
            GuestKind::BareMetal if self.plain_reads => {
                Err(GuestMismatch::LinuxOption("--plain-reads"))
            }
            GuestKind::BareMetal => match self.mode {
                Mode::Cancel
                | Mode::ClosePending
                | Mode::Unbind
                | Mode::Unplug
                | Mode::IioRaw
                | Mode::Iio => Err(GuestMismatch::LinuxMode(self.mode.name())),
                _ => Ok(()),
            },
            GuestKind::Linux
                if self.mode == Mode::Unplug && self.common.machine != Machine::Q35 =>
            {
                Err(GuestMismatch::UnplugNeedsQ35)
            }
            GuestKind::Linux if self.frames > 0 => Err(GuestMismatch::BareMetalOnly("--frames")),
            GuestKind::Linux if self.hash => Err(GuestMismatch::BareMetalOnly("--hash")),
            GuestKind::Linux if self.iiod == Some(0) => Err(GuestMismatch::IiodPort),
            GuestKind::Linux => Ok(()),
        }
    }

    /// The run these options describe, with `tools` on `accel`; `progress` shows live
    /// progress.
    /// `--record` must name a new file: the backend appends to an existing one, and a plot
    /// of it would mix two runs.
    pub fn check_files(&self) -> Result<(), RecordExists> {
        match &self.record {
            Some(path) if path.exists() => Err(RecordExists(path.clone())),
            _ => Ok(()),
        }
    }

    pub fn run_config(&self, tools: &Tools, accel: Accel, progress: bool) -> RunConfig {
        let mut backend_args = vec![
            "--rate".to_string(),
            self.rate.to_string(),
            "--channels".into(),
            self.channels.to_string(),
            "--format".into(),
            self.format.name().into(),
            "--clock".into(),
            self.clock.name().into(),
            "--coalesce".into(),
            self.coalesce.to_string(),
            "--queue-size".into(),
            "256".into(),
            "--signal".into(),
            self.signal.name().into(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        if let Some(latency_us) = self.latency_us {
            backend_args.extend(["--latency-us".into(), latency_us.to_string()]);
        }
        if self.channels > 64 {
            // The reference card has 64 channels unless built with more.
            backend_args.extend(["--max-channels".into(), self.channels.to_string()]);
        }
        if self.deterministic {
            backend_args.push("--deterministic".into());
        }
        if let Some(record) = &self.record {
            // The backend may run from another directory: give it an absolute path.
            let absolute = std::path::absolute(record).unwrap_or_else(|_| record.clone());
            backend_args.extend(["--record".into(), absolute.display().to_string()]);
        }
        if let Some(scenario) = &self.scenario {
            backend_args.push("--scenario".into());
            backend_args.push(
                std::fs::canonicalize(scenario)
                    .unwrap_or_else(|_| scenario.clone())
                    .display()
                    .to_string(),
            );
        }
        if self.mode == Mode::Overrun {
            // A FIFO far smaller than the slow application's backlog makes the overrun certain.
            backend_args.extend([
                "--fifo-frames".into(),
                self.fifo_frames.unwrap_or(4096).to_string(),
                "--watermark".into(),
                "64".into(),
            ]);
        } else if let Some(frames) = self.fifo_frames {
            backend_args.extend(["--fifo-frames".into(), frames.to_string()]);
        }
        if self.poll_us > 0 {
            backend_args.extend(["--poll-us".into(), self.poll_us.to_string()]);
        }
        let mode = if self.iiod.is_some() {
            "iiod"
        } else {
            self.mode.name()
        };
        let mut guest_args = vec![
            format!("vdaq.mode={mode}"),
            format!("vdaq.duration_ms={}", (self.duration * 1000.0) as u64),
            format!("vdaq.reads={}", self.reads),
            format!("vdaq.buffer={}", self.buffer_size),
            format!("vdaq.crc={}", u8::from(self.crc)),
            format!("vdaq.frames={}", self.frames),
            format!("vdaq.hash={}", u8::from(self.hash)),
        ];
        if self.plot.is_some() {
            guest_args.push(format!("vdaq.progress_ms={}", crate::plots::PROGRESS_MS));
        }
        if self.plain_reads {
            guest_args.push("vdaq.registered=0".into());
        }
        RunConfig {
            qemu: tools.qemu.clone(),
            backend: tools.backend.clone(),
            guest: tools.guest.clone(),
            machine: self.common.machine,
            accel,
            memory_mib: self.common.memory_mib(),
            backend_args,
            guest_args,
            timeout: match self.iiod {
                // Serving until Ctrl-C.
                Some(_) => Duration::from_secs(u64::from(u32::MAX)),
                None => Duration::from_secs_f64(self.timeout.unwrap_or(self.duration + 60.0)),
            },
            progress,
            verbose: self.common.verbose,
            replug: self.mode == Mode::Unplug,
            iiod_port: self.iiod,
            sample_resources: self
                .sample_resources
                .map(vdaq_launcher::resources::interval),
        }
    }
}

/// `vdaq bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Machine, accelerator, tools.
    #[command(flatten)]
    pub common: Common,
    /// Seconds per configuration (guest time).
    #[arg(short, long, default_value_t = 3.0)]
    pub duration: f64,
    /// Sweep both guests, bare metal and Linux, shape by shape in the same run, and print
    /// Linux's throughput as a share of the bare-metal guest's.
    #[arg(long)]
    pub compare_guests: bool,
    /// Also draw the sweep as DIR/bench.png (verified MB/s per shape and guest, the
    /// consume-only rate as a tick), with DIR/plots.json.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Print every figure as one JSON document on stdout (the tables go to stderr).
    #[arg(long)]
    pub json: bool,
    /// How long the card watches the data queue before asking for a notification, in µs, in
    /// the sweep and the loopback baseline (see `vdaq --poll-us`; 0 turns polling off).
    #[arg(long, default_value_t = 200, value_name = "US",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub poll_us: u32,
}

/// Subcommands (without one, `vdaq` runs once).
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Sweep reads in flight × buffer sizes, free-running clock; print throughput, completion
    /// and interrupt rates, notifications per completion, the guest's idle share, latency,
    /// boot-to-first-sample, and beside them the backend's loopback rate (no VM) and the
    /// guest's consume-only (verification alone) and touch-only (a fold: its memory limit)
    /// rates, with the ratios.
    Bench(BenchArgs),
    /// Print a shell completion script on stdout, e.g.
    /// `vdaq completions bash > ~/.local/share/bash-completion/completions/vdaq`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Run the vdaq virtual DAQ card end to end: vhost-device-daq + QEMU + bare-metal guest.
#[derive(Parser, Debug)]
#[command(
    name = "vdaq",
    version,
    propagate_version = true,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// `bench`, or none for one run.
    #[command(subcommand)]
    pub command: Option<Cmd>,
    /// The run's options (when there is no subcommand).
    #[command(flatten)]
    pub run: RunArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vdaq").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        parse(args).expect("valid command line").run
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wire_values_default_as_before() {
        let run = run_args(&[]);
        assert_eq!(run.format, SampleFormat::S16);
        assert_eq!(run.clock, ClockMode::Paced);
        assert_eq!(run.signal, SignalKind::Counter);
    }

    #[test]
    fn wire_values_parse_by_their_command_line_names() {
        for format in SampleFormat::ALL {
            assert_eq!(run_args(&["--format", format.name()]).format, format);
        }
        for clock in [ClockMode::Paced, ClockMode::FreeRunning] {
            assert_eq!(run_args(&["--clock", clock.name()]).clock, clock);
        }
        for name in ["counter", "sine", "square", "sawtooth", "noise"] {
            assert_eq!(run_args(&["--signal", name]).signal.name(), name);
        }
    }

    #[test]
    fn unknown_values_and_the_file_signal_are_refused() {
        for args in [
            ["--signal", "file"],
            ["--format", "S16"],
            ["--clock", "free-running"],
        ] {
            let err = parse(&args).expect_err("refused");
            assert_eq!(err.kind(), ErrorKind::InvalidValue, "{args:?}");
        }
        let err = parse(&["--signal", "file"]).expect_err("refused");
        assert!(err
            .to_string()
            .contains("[possible values: counter, sine, square, sawtooth, noise]"));
    }

    #[test]
    fn backend_and_guest_get_the_command_line_names() {
        let tools = Tools {
            qemu: "qemu".into(),
            backend: "backend".into(),
            guest: vdaq_launcher::session::GuestImage::BareMetal("guest".into()),
        };
        let run = run_args(&["--format", "f32", "--clock", "free", "--signal", "sawtooth"]);
        let config = run.run_config(&tools, Accel::Tcg, false);
        let backend = config.backend_args.join(" ");
        assert!(backend.starts_with("--rate 1000000 --channels 4 --format f32 --clock free "));
        assert!(backend.contains("--signal sawtooth --seed 24301"));
        assert_eq!(config.guest_args[0], "vdaq.mode=stream");
    }

    #[test]
    fn accel_resolves_as_before() {
        assert_eq!(AccelArg::Tcg.resolve(Kvm::Hardware).ok(), Some(Accel::Tcg));
        assert!(AccelArg::Kvm.resolve(Kvm::Absent).is_err());
        assert_eq!(
            AccelArg::Kvm.resolve(Kvm::SoftwareNested).ok(),
            Some(Accel::Kvm)
        );
        assert_eq!(AccelArg::Auto.resolve(Kvm::Hardware).ok(), Some(Accel::Kvm));
        assert_eq!(
            AccelArg::Auto.resolve(Kvm::SoftwareNested).ok(),
            Some(Accel::Tcg)
        );
    }

    #[test]
    fn options_the_guest_cannot_carry_out_are_refused_before_anything_starts() {
        let check = |args: &[&str]| run_args(args).check_guest();
        assert_eq!(check(&["--plot", "d"]), Ok(()));
        assert_eq!(
            check(&["--guest", "linux", "--mode", "iio", "--plot", "d"]),
            Err(GuestMismatch::PlotMode("iio"))
        );
        assert_eq!(
            check(&["--guest", "linux", "--mode", "iio-raw", "--plot", "d"]),
            Err(GuestMismatch::PlotMode("iio-raw"))
        );
        assert_eq!(
            check(&["--mode", "cancel"]),
            Err(GuestMismatch::LinuxMode("cancel"))
        );
        assert_eq!(
            check(&["--guest", "linux", "--hash"]),
            Err(GuestMismatch::BareMetalOnly("--hash"))
        );
        assert_eq!(
            check(&["--plain-reads"]),
            Err(GuestMismatch::LinuxOption("--plain-reads"))
        );
        assert_eq!(check(&["--guest", "linux", "--plain-reads"]), Ok(()));
    }

    #[test]
    fn plain_reads_reach_the_linux_application() {
        let tools = Tools {
            qemu: "qemu".into(),
            backend: "backend".into(),
            guest: vdaq_launcher::session::GuestImage::BareMetal("guest".into()),
        };
        let registered = run_args(&["--guest", "linux"]).run_config(&tools, Accel::Tcg, false);
        assert!(!registered
            .guest_args
            .iter()
            .any(|a| a.contains("registered")));
        let plain = run_args(&["--guest", "linux", "--plain-reads"]);
        let config = plain.run_config(&tools, Accel::Tcg, false);
        assert!(config.guest_args.contains(&"vdaq.registered=0".to_string()));
    }

    #[test]
    fn plot_asks_the_guest_for_frequent_progress_and_record_reaches_the_backend() {
        let tools = Tools {
            qemu: "qemu".into(),
            backend: "backend".into(),
            guest: vdaq_launcher::session::GuestImage::BareMetal("guest.elf".into()),
        };
        let run = run_args(&["--plot", "d", "--record", "/tmp/x.vdaqrec"]);
        let config = run.run_config(&tools, Accel::Tcg, false);
        assert!(config
            .guest_args
            .contains(&"vdaq.progress_ms=100".to_string()));
        let at = config
            .backend_args
            .iter()
            .position(|a| a == "--record")
            .expect("--record passed on");
        assert_eq!(config.backend_args[at + 1], "/tmp/x.vdaqrec");
        let plain = run_args(&[]).run_config(&tools, Accel::Tcg, false);
        assert!(!plain.guest_args.iter().any(|a| a.contains("progress_ms")));
        assert!(!plain.backend_args.iter().any(|a| a == "--record"));
    }
}
