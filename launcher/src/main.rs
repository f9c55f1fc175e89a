//! `vdaq`: runs the virtual DAQ card end to end — backend, QEMU, bare-metal guest — and
//! reports what the guest verified. `vdaq bench` sweeps buffer sizes and reads in flight.

mod session;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use session::{Accel, Machine, RunConfig, RunOutcome, INTERRUPTED};
use tools::Kvm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AccelArg {
    /// KVM when it is hardware-backed, else TCG.
    Auto,
    /// KVM (fails if /dev/kvm is unusable).
    Kvm,
    /// QEMU's TCG.
    Tcg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Stream, verify every sample, then shut down draining every read.
    Stream,
    /// A slow application (deliberate per-buffer delay): the device overruns; every dropped
    /// frame must be reported.
    Overrun,
    /// Shut down while reads are in flight: every read must come back, the device must hold
    /// none.
    Shutdown,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Overrun => "overrun",
            Mode::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    S16,
    S32,
    F32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Clock {
    Paced,
    Free,
}

/// Options shared by runs and benchmarks.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Machine type (q35: virtio-pci + MSI-X; microvm: virtio-mmio + IOAPIC).
    #[arg(long, value_enum, default_value_t = Machine::Q35)]
    machine: Machine,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// QEMU binary (default: found or provisioned by ci/provision-qemu.sh).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Backend binary (default: beside this program, or built).
    #[arg(long)]
    backend: Option<PathBuf>,
    /// Guest image (default: built by images/build.sh).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Echo the guest console and the QEMU command line.
    #[arg(short, long)]
    verbose: bool,
}

/// One run.
#[derive(Args, Debug, Clone)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// What to exercise.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Streaming time in seconds of guest time.
    #[arg(short, long, default_value_t = 3.0)]
    duration: f64,
    /// Sample rate in Hz (paced clock).
    #[arg(short, long, default_value_t = 1_000_000)]
    rate: u32,
    /// Channels per frame.
    #[arg(short, long, default_value_t = 4)]
    channels: u16,
    /// Sample format.
    #[arg(long, value_enum, default_value_t = Format::S16)]
    format: Format,
    /// Sample clock: paced at --rate, or free-running (as fast as buffers come).
    #[arg(long, value_enum, default_value_t = Clock::Paced)]
    clock: Clock,
    /// Bytes per read buffer (header included).
    #[arg(short, long, default_value_t = 64 * 1024)]
    buffer_size: u32,
    /// Reads kept in flight.
    #[arg(long, default_value_t = 64)]
    reads: u32,
    /// Completed buffers per interrupt (device-side coalescing).
    #[arg(long, default_value_t = 1)]
    coalesce: u16,
    /// Ask for payload CRCs and verify them.
    #[arg(long)]
    crc: bool,
    /// Give up after this many seconds (default: duration + 60).
    #[arg(long)]
    timeout: Option<f64>,
    /// Print the guest's JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Scenario file for the backend (scripted faults; see scenarios/).
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Deterministic device: virtual sample time, bit-identical stream on every run.
    #[arg(long)]
    deterministic: bool,
    /// Stop after this many frames instead of after --duration.
    #[arg(long, default_value_t = 0)]
    frames: u64,
    /// Hash every consumed buffer (report field stream_hash).
    #[arg(long)]
    hash: bool,
    /// Signal source.
    #[arg(long, value_enum, default_value_t = Signal::Counter)]
    signal: Signal,
    /// Seed of the noise signal.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Signal {
    Counter,
    Sine,
    Square,
    Sawtooth,
    Noise,
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds per configuration (guest time).
    #[arg(short, long, default_value_t = 3.0)]
    duration: f64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sweep reads in flight × buffer sizes, free-running clock; print throughput, completion
    /// and interrupt rates, latency, boot-to-first-sample, and the guest's consume-only rate.
    Bench(BenchArgs),
}

/// Run the vdaq virtual DAQ card end to end: vhost-device-daq + QEMU + bare-metal guest.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

fn choose_accel(wanted: AccelArg) -> Result<Accel, String> {
    match (wanted, tools::kvm()) {
        (AccelArg::Tcg, _) => Ok(Accel::Tcg),
        (AccelArg::Kvm, Kvm::Absent) => {
            Err("--accel kvm: /dev/kvm is missing or not accessible; use --accel tcg".into())
        }
        (AccelArg::Kvm, _) => Ok(Accel::Kvm),
        (AccelArg::Auto, Kvm::Hardware) => Ok(Accel::Kvm),
        // Software-nested KVM runs guest code ~100x slower than TCG here.
        (AccelArg::Auto, _) => Ok(Accel::Tcg),
    }
}

struct Tools {
    qemu: PathBuf,
    backend: PathBuf,
    guest: PathBuf,
}

fn tools(common: &Common) -> Result<Tools, String> {
    let err = |e: tools::ToolError| e.to_string();
    Ok(Tools {
        qemu: tools::qemu(common.qemu.as_deref()).map_err(err)?,
        backend: tools::backend(common.backend.as_deref()).map_err(err)?,
        guest: tools::guest_image(common.guest.as_deref()).map_err(err)?,
    })
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::S16 => "s16",
        Format::S32 => "s32",
        Format::F32 => "f32",
    }
}

fn run_config(args: &RunArgs, tools: &Tools, accel: Accel, progress: bool) -> RunConfig {
    let mut backend_args = vec![
        "--rate".to_string(),
        args.rate.to_string(),
        "--channels".into(),
        args.channels.to_string(),
        "--format".into(),
        format_name(args.format).into(),
        "--clock".into(),
        match args.clock {
            Clock::Paced => "paced",
            Clock::Free => "free",
        }
        .into(),
        "--coalesce".into(),
        args.coalesce.to_string(),
        "--queue-size".into(),
        "256".into(),
    ];
    backend_args.extend([
        "--signal".into(),
        format!("{:?}", args.signal).to_lowercase(),
        "--seed".into(),
        args.seed.to_string(),
    ]);
    if args.deterministic {
        backend_args.push("--deterministic".into());
    }
    if let Some(scenario) = &args.scenario {
        backend_args.push("--scenario".into());
        backend_args.push(
            std::fs::canonicalize(scenario)
                .unwrap_or_else(|_| scenario.clone())
                .display()
                .to_string(),
        );
    }
    if args.mode == Mode::Overrun {
        // A FIFO far smaller than the slow application's backlog makes the overrun certain.
        backend_args.extend([
            "--fifo-frames".into(),
            "4096".into(),
            "--watermark".into(),
            "64".into(),
        ]);
    }
    let guest_args = vec![
        format!("vdaq.mode={}", args.mode.name()),
        format!("vdaq.duration_ms={}", (args.duration * 1000.0) as u64),
        format!("vdaq.reads={}", args.reads),
        format!("vdaq.buffer={}", args.buffer_size),
        format!("vdaq.crc={}", u8::from(args.crc)),
        format!("vdaq.frames={}", args.frames),
        format!("vdaq.hash={}", u8::from(args.hash)),
    ];
    RunConfig {
        qemu: tools.qemu.clone(),
        backend: tools.backend.clone(),
        guest: tools.guest.clone(),
        machine: args.common.machine,
        accel,
        memory_mib: args.common.memory,
        backend_args,
        guest_args,
        timeout: Duration::from_secs_f64(args.timeout.unwrap_or(args.duration + 60.0)),
        progress,
        verbose: args.common.verbose,
    }
}

fn print_summary(config: &RunConfig, outcome: &RunOutcome) {
    eprintln!(
        "vdaq: {} / {} on {:?} ({}), wall {:.2} s",
        config
            .guest_args
            .first()
            .map_or("", |m| m.trim_start_matches("vdaq.mode=")),
        match config.machine {
            Machine::Q35 => "virtio-pci + MSI-X",
            Machine::Microvm => "virtio-mmio + IOAPIC",
        },
        config.machine,
        config.accel.name(),
        outcome.wall.as_secs_f64()
    );
    if let Some(first) = outcome.first_sample {
        eprintln!(
            "  first verified sample {:.3} s after QEMU started",
            first.as_secs_f64()
        );
    }
    match outcome.report() {
        Some(r) => {
            eprintln!(
                "  verified {} frames ({:.1} MiB) in {} completions over {:.2} s guest time: {:.1} MiB/s",
                r.frames,
                r.bytes as f64 / (1024.0 * 1024.0),
                r.completions,
                r.guest_time_ns as f64 / 1e9,
                r.throughput_mib_s
            );
            eprintln!(
                "  interrupts {} (bottom halves {}, found on re-check {}), latency p50 {} µs p99 {} µs",
                r.interrupts, r.bottom_halves, r.found_on_recheck, r.latency_p50_us, r.latency_p99_us
            );
            eprintln!(
                "  device: produced {} = delivered {} + dropped {} + pending {}; dropped reported in headers {}, in events {}",
                r.device_produced, r.device_delivered, r.device_dropped, r.device_pending, r.dropped_frames, r.overrun_event_frames
            );
            eprintln!(
                "  shutdown: {} reads in flight, {} returned, device holds {}",
                r.shutdown_in_flight, r.shutdown_returned, r.device_held_after
            );
            if r.watchdog_recoveries + r.crc_errors + r.fault_events + r.reset_recoveries > 0 {
                eprintln!(
                    "  faults: {} lost-interrupt recoveries, {} CRC mismatches, {} FAULT events, \
                     {} device resets recovered ({} frames discarded at reset)",
                    r.watchdog_recoveries,
                    r.crc_errors,
                    r.fault_events,
                    r.reset_recoveries,
                    r.frames_discarded_at_reset
                );
            }
            if r.pass {
                eprintln!("  PASS");
            } else {
                eprintln!("  FAIL: {}", r.failure);
            }
        }
        None => {
            eprintln!("  no report from the guest");
            for line in &outcome.console_tail {
                eprintln!("  guest: {line}");
            }
        }
    }
    if let Some(reason) = &outcome.aborted {
        eprintln!("  aborted: {reason}");
    }
}

fn run_once(args: &RunArgs) -> Result<bool, String> {
    let accel = choose_accel(args.common.accel)?;
    let tools = tools(&args.common)?;
    let config = run_config(args, &tools, accel, true);
    let outcome = session::run(&config).map_err(|e| e.to_string())?;
    print_summary(&config, &outcome);
    if args.json {
        if let Some(json) = &outcome.report_json {
            println!("{json}");
        }
    }
    let passed = outcome.aborted.is_none()
        && outcome.guest_passed()
        && outcome.report().is_some_and(|r| r.pass);
    Ok(passed)
}

/// One benchmark configuration: 4 ch × s16 counter stream, verified, no scenario.
fn bench_run(
    common: &Common,
    duration: f64,
    rate: u32,
    clock: Clock,
    buffer_size: u32,
    reads: u32,
    coalesce: u16,
) -> RunArgs {
    RunArgs {
        common: common.clone(),
        mode: Mode::Stream,
        duration,
        rate,
        channels: 4,
        format: Format::S16,
        clock,
        buffer_size,
        reads,
        coalesce,
        crc: false,
        timeout: None,
        json: false,
        scenario: None,
        deterministic: false,
        frames: 0,
        hash: false,
        signal: Signal::Counter,
        seed: 0x5eed,
    }
}

fn bench(args: &BenchArgs) -> Result<bool, String> {
    let tools = tools(&args.common)?;
    let mut accels = vec![Accel::Tcg];
    match tools::kvm() {
        Kvm::Hardware => accels.push(Accel::Kvm),
        Kvm::SoftwareNested => eprintln!(
            "vdaq bench: KVM here is software-nested (kvm_pvm), far slower than TCG; \
             KVM figures are skipped (run on a machine with hardware KVM to get them)"
        ),
        Kvm::Absent => eprintln!("vdaq bench: no usable /dev/kvm; KVM figures are skipped"),
    }
    let mut all_passed = true;
    println!(
        "{:>5} {:>7} {:>6} {:>11} {:>13} {:>12} {:>9} {:>9} {:>12} {:>13} {:>7} {:>11}",
        "accel",
        "machine",
        "reads",
        "buffer",
        "verified MB/s",
        "completions/s",
        "irq/s",
        "p50 µs",
        "p99 µs",
        "consume MB/s",
        "ratio",
        "first (s)"
    );
    for accel in accels {
        for (reads, buffer) in [(8u32, 4096u32), (8, 65536), (64, 4096), (64, 65536)] {
            let run = bench_run(
                &args.common,
                args.duration,
                1_000_000,
                Clock::Free,
                buffer,
                reads,
                1,
            );
            if INTERRUPTED.load(Ordering::Acquire) {
                return Ok(false);
            }
            let mut config = run_config(&run, &tools, accel, false);
            config.guest_args.push("vdaq.consume_only=1".into());
            let outcome = session::run(&config).map_err(|e| e.to_string())?;
            let Some(r) = outcome.report() else {
                print_summary(&config, &outcome);
                all_passed = false;
                continue;
            };
            all_passed &= r.pass && outcome.guest_passed();
            let seconds = r.guest_time_ns as f64 / 1e9;
            let mb = |bytes: f64| bytes / 1e6;
            let verified = mb(r.bytes as f64) / seconds;
            let consume = r.consume_only_mib_s * 1.048_576;
            println!(
                "{:>5} {:>7} {:>6} {:>11} {:>13.1} {:>12.0} {:>9.0} {:>9} {:>12} {:>13.1} {:>6.0}% {:>11.3}",
                accel.name(),
                format!("{:?}", args.common.machine).to_lowercase(),
                reads,
                buffer,
                verified,
                r.completions as f64 / seconds,
                r.interrupts as f64 / seconds,
                r.latency_p50_us,
                r.latency_p99_us,
                consume,
                if consume > 0.0 { 100.0 * verified / consume } else { 0.0 },
                outcome.first_sample.map_or(f64::NAN, |d| d.as_secs_f64()),
            );
        }
    }
    // Interrupt coalescing at a high paced rate: same throughput, far fewer interrupts.
    println!();
    println!(
        "{:>9} {:>13} {:>13} {:>9} {:>18}",
        "coalesce", "verified MB/s", "completions/s", "irq/s", "completions per irq"
    );
    for coalesce in [1u16, 16] {
        let run = bench_run(
            &args.common,
            args.duration,
            4_000_000,
            Clock::Paced,
            16 * 1024,
            64,
            coalesce,
        );
        if INTERRUPTED.load(Ordering::Acquire) {
            return Ok(false);
        }
        let config = run_config(&run, &tools, Accel::Tcg, false);
        let outcome = session::run(&config).map_err(|e| e.to_string())?;
        let Some(r) = outcome.report() else {
            print_summary(&config, &outcome);
            all_passed = false;
            continue;
        };
        all_passed &= r.pass;
        let seconds = r.guest_time_ns as f64 / 1e9;
        println!(
            "{:>9} {:>13.1} {:>13.0} {:>9.0} {:>18.1}",
            coalesce,
            r.bytes as f64 / 1e6 / seconds,
            r.completions as f64 / seconds,
            r.interrupts as f64 / seconds,
            r.completions as f64 / r.interrupts.max(1) as f64
        );
    }
    Ok(all_passed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Release)) {
        eprintln!("vdaq: cannot install the Ctrl-C handler: {err}");
    }
    let result = match &cli.command {
        Some(Cmd::Bench(args)) => bench(args),
        None => run_once(&cli.run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("vdaq: {message}");
            ExitCode::from(2)
        }
    }
}
