//! `vdaq bench`: a sweep of reads in flight × buffer sizes on every usable accelerator, then
//! interrupt coalescing at a high paced rate, each printed as a table on stdout (with `--json`,
//! the tables go to stderr and stdout gets one JSON document of every figure).

use std::io::Write;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use vdaq_launcher::session::{self, Accel, GuestKind, INTERRUPTED};
use vdaq_launcher::tools::{self, Kvm, Tools};
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use crate::args::{BenchArgs, Common, Mode, RunArgs};
use vdaq_plot::sweep::Bar;

use crate::{plots, summary, Error};

/// Where the tables go, and the figures kept for `--json`.
struct Output {
    json: bool,
    figures: serde_json::Map<String, Value>,
}

impl Output {
    fn line(&self, text: std::fmt::Arguments<'_>) {
        // A closed stdout or stderr (a pipe's reader gone) ends nothing but the table.
        let _ = if self.json {
            writeln!(std::io::stderr(), "{text}")
        } else {
            writeln!(std::io::stdout(), "{text}")
        };
    }

    fn push(&mut self, table: &str, row: Value) {
        if let Value::Array(rows) = self
            .figures
            .entry(table)
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            rows.push(row);
        }
    }
}

macro_rules! say {
    ($out:expr) => { $out.line(format_args!("")) };
    ($out:expr, $($arg:tt)*) => { $out.line(format_args!($($arg)*)) };
}

/// The backend's own rate at one shape, no VM: the reference driver over the in-process
/// vhost-user frontend (`vdaq-loopback`), the same backend binary and stream (4 ch × S16
/// counter, free-running, every sample verified), for `duration` of host time. Verified MB/s
/// and completions/s; the device's ceiling, beside what a guest gets.
fn loopback_rate(
    backend: &std::path::Path,
    reads: u32,
    buffer: u32,
    duration: f64,
    poll_us: u32,
) -> Result<(f64, f64), String> {
    use std::time::{Duration, Instant};
    use vdaq_loopback::{BackendProcess, DriverRig, Resubmit};
    let run_for = Duration::from_secs_f64(duration.max(0.1));
    let poll = poll_us.to_string();
    let mut backend_args = vdaq_loopback::BENCH_BACKEND_ARGS.to_vec();
    backend_args.extend(["--poll-us", &poll]);
    let process = BackendProcess::spawn_logging(backend, &backend_args, Some("warn"))
        .map_err(|err| format!("loopback backend: {err}"))?;
    let mut rig = DriverRig::connect(
        process.socket(),
        vdaq_driver::DriverOptions::default(),
        run_for + Duration::from_secs(30),
    )
    .map_err(|err| format!("loopback: {err}"))?;
    let mut verifier = vdaq_wire::check::StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver
        .start(&mut rig.wait)
        .map_err(|err| format!("loopback START: {err:?}"))?;
    let start = Instant::now();
    rig.stream_until(
        &mut verifier,
        reads as usize,
        buffer as usize,
        Resubmit::Batched,
        |_| start.elapsed() >= run_for,
    )
    .map_err(|err| format!("loopback: {err}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = verifier.stats();
    // The driver (and its connection) ends before the backend process.
    drop(rig);
    drop(process);
    if stats.errors > 0 {
        return Err(format!(
            "loopback: {} buffers failed verification",
            stats.errors
        ));
    }
    Ok((
        stats.payload_bytes as f64 / 1e6 / seconds,
        stats.buffers as f64 / seconds,
    ))
}

/// One benchmark configuration: 4 ch × s16 counter stream, verified, no scenario.
fn configuration(
    common: &Common,
    duration: f64,
    rate: u32,
    clock: ClockMode,
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
        format: SampleFormat::S16,
        clock,
        buffer_size,
        reads,
        coalesce,
        latency_us: None,
        crc: false,
        timeout: None,
        json: false,
        scenario: None,
        deterministic: false,
        frames: 0,
        hash: false,
        poll_us: 0,
        plain_reads: false,
        iiod: None,
        fifo_frames: None,
        signal: SignalKind::Counter,
        seed: 0x5eed,
        record: None,
        plot: None,
        sample_resources: None,
    }
}

/// The Linux guest's two interfaces at the same paced rates, same run: the character device
/// (64 reads × 64 KiB through io_uring, zero-copy) and the IIO device (the driver's own
/// buffers, each frame pushed into the kfifo, read from /dev/iio:deviceN by `vdaqtest
/// iio-raw`). Verified MB/s and the share of frames the card dropped; `Ok(false)` if a run
/// failed.
fn iio_versus_chardev(
    common: &Common,
    tools: &Tools,
    duration: f64,
    out: &mut Output,
) -> Result<bool, Error> {
    say!(out);
    say!(
        out,
        "{:>10} {:>10} {:>14} {:>13} {:>10}",
        "interface",
        "rate Hz",
        "sampled MB/s",
        "verified MB/s",
        "dropped %"
    );
    let mut passed = true;
    for rate in [250_000u32, 1_000_000, 4_000_000] {
        for (name, mode) in [("chardev", Mode::Stream), ("iio", Mode::IioRaw)] {
            if INTERRUPTED.load(Ordering::Acquire) {
                return Ok(false);
            }
            let mut run = configuration(common, duration, rate, ClockMode::Paced, 65_536, 64, 1);
            run.mode = mode;
            let config = run.run_config(tools, Accel::Tcg, false);
            let outcome = session::run(&config)?;
            let Some(r) = outcome.report() else {
                summary::print(&config, &outcome);
                passed = false;
                continue;
            };
            passed &= r.pass && outcome.guest_passed();
            let seconds = r.guest_time_ns as f64 / 1e9;
            let frames = r.frames + r.dropped_frames;
            // Sampled: what the card produced while the guest read (`vdaqtest iio-raw` also
            // captures at half the rate), delivered or dropped; 4 × S16 = 8 bytes a frame.
            let sampled = frames as f64 * 8.0 / 1e6 / seconds.max(1e-9);
            let verified = if seconds > 0.0 {
                r.bytes as f64 / 1e6 / seconds
            } else {
                0.0
            };
            let dropped = 100.0 * r.dropped_frames as f64 / frames.max(1) as f64;
            say!(
                out,
                "{:>10} {:>10} {:>14.1} {:>13.1} {:>10.1}",
                name,
                rate,
                sampled,
                verified,
                dropped
            );
            out.push(
                "interfaces",
                json!({"interface": name, "rate_hz": rate, "sampled_mb_s": sampled,
                       "verified_mb_s": verified, "dropped_percent": dropped}),
            );
        }
    }
    Ok(passed)
}

/// Runs the benchmark; `Ok(false)` if a run failed or Ctrl-C cut the sweep short.
pub fn run(args: &BenchArgs) -> Result<bool, Error> {
    let mut out = Output {
        json: args.json,
        figures: serde_json::Map::new(),
    };
    let passed = sweep(args, &mut out)?;
    if args.json {
        out.figures.insert("passed".into(), Value::Bool(passed));
        println!("{}", Value::Object(out.figures));
    }
    Ok(passed)
}

fn sweep(args: &BenchArgs, out: &mut Output) -> Result<bool, Error> {
    if let Some(dir) = &args.plot {
        plots::prepare(dir)?;
    }
    // The guests to sweep, each with its tools (images built once here).
    let kinds = if args.compare_guests {
        vec![GuestKind::BareMetal, GuestKind::Linux]
    } else {
        vec![args.common.guest]
    };
    let mut guests = Vec::new();
    for kind in kinds {
        let common = Common {
            guest: kind,
            ..args.common.clone()
        };
        let tools = common.tools(false)?;
        guests.push((common, tools));
    }
    let tools = &guests[0].1;
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
    // The backend alone at each shape, same run: the ceiling the guests' figures are set by.
    const SHAPES: [(u32, u32); 4] = [(8, 4096), (8, 65536), (64, 4096), (64, 65536)];
    say!(
        out,
        "the card watches the data queue {} µs before asking for a notification (--poll-us)",
        args.poll_us
    );
    out.figures
        .insert("device_poll_us".into(), Value::from(args.poll_us));
    say!(
        out,
        "{:>6} {:>7} {:>14} {:>14}",
        "reads",
        "buffer",
        "loopback MB/s",
        "completions/s"
    );
    let mut loopback = Vec::new();
    for (reads, buffer) in SHAPES {
        if INTERRUPTED.load(Ordering::Acquire) {
            return Ok(false);
        }
        match loopback_rate(
            &tools.backend,
            reads,
            buffer,
            args.duration.min(2.0),
            args.poll_us,
        ) {
            Ok((verified, completions)) => {
                say!(
                    out,
                    "{reads:>6} {buffer:>7} {verified:>14.1} {completions:>14.0}"
                );
                out.push(
                    "loopback",
                    json!({"reads": reads, "buffer": buffer, "verified_mb_s": verified,
                           "completions_per_s": completions}),
                );
                loopback.push(((reads, buffer), verified));
            }
            Err(err) => {
                eprintln!("vdaq bench: {err}");
                all_passed = false;
            }
        }
    }
    let loopback_at = |reads: u32, buffer: u32| {
        loopback
            .iter()
            .find(|(shape, _)| *shape == (reads, buffer))
            .map_or(0.0, |&(_, rate)| rate)
    };
    say!(out);
    say!(
        out,
        "{:>10} {:>5} {:>7} {:>6} {:>7} {:>13} {:>13} {:>9} {:>7} {:>6} {:>7} {:>7} {:>12} {:>10} {:>7} {:>7} {:>7} {:>9}",
        "guest",
        "accel",
        "machine",
        "reads",
        "buffer",
        "verified MB/s",
        "completions/s",
        "irq/s",
        "kicks/c",
        "idle",
        "p50 µs",
        "p99 µs",
        "consume MB/s",
        "touch MB/s",
        "÷ cons",
        "c÷touch",
        "÷ loop",
        "first (s)"
    );
    // Verified MB/s and first-sample time per (accel, shape, guest), for the comparison.
    let mut figures: Vec<(Accel, u32, u32, GuestKind, f64, f64)> = Vec::new();
    let mut bars = Vec::new();
    for accel in accels {
        for (reads, buffer) in SHAPES {
            for (common, tools) in &guests {
                let mut run = configuration(
                    common,
                    args.duration,
                    1_000_000,
                    ClockMode::FreeRunning,
                    buffer,
                    reads,
                    1,
                );
                run.poll_us = args.poll_us;
                if INTERRUPTED.load(Ordering::Acquire) {
                    return Ok(false);
                }
                let mut config = run.run_config(tools, accel, false);
                config.guest_args.push("vdaq.consume_only=1".into());
                let outcome = session::run(&config)?;
                let Some(r) = outcome.report() else {
                    summary::print(&config, &outcome);
                    all_passed = false;
                    continue;
                };
                all_passed &= r.pass && outcome.guest_passed();
                let seconds = r.guest_time_ns as f64 / 1e9;
                let mb = |bytes: f64| bytes / 1e6;
                let verified = mb(r.bytes as f64) / seconds;
                let consume = r.consume_only_mib_s * 1.048_576;
                let touch = r.touch_only_mib_s * 1.048_576;
                let share = |part: f64, whole: f64| if whole > 0.0 { part / whole } else { 0.0 };
                let first = outcome.first_sample.map_or(f64::NAN, |d| d.as_secs_f64());
                figures.push((accel, reads, buffer, common.guest, verified, first));
                bars.push(Bar {
                    group: format!("{reads} × {} KiB", buffer / 1024),
                    series: format!("{} {}", common.guest.name(), accel.name()),
                    value: verified,
                    baseline: consume,
                });
                let completions = r.completions as f64 / seconds;
                let interrupts = r.interrupts as f64 / seconds;
                // Guest-to-device notifications per completion (each a VM exit).
                let kicks_per_completion =
                    r.data_notifications as f64 / r.completions.max(1) as f64;
                // The guest's CPU idle, waiting for the device: which side bounds the rate.
                let idle = share(r.guest_idle_ns as f64, r.guest_time_ns as f64);
                say!(
                    out,
                    "{:>10} {:>5} {:>7} {:>6} {:>7} {:>13.1} {:>13.0} {:>9.0} {:>7.3} {:>5.0}% {:>7} {:>7} {:>12.1} {:>10.1} {:>6.0}% {:>6.0}% {:>6.0}% {:>9.3}",
                    common.guest.name(),
                    accel.name(),
                    args.common.machine.name(),
                    reads,
                    buffer,
                    verified,
                    completions,
                    interrupts,
                    kicks_per_completion,
                    100.0 * idle,
                    r.latency_p50_us,
                    r.latency_p99_us,
                    consume,
                    touch,
                    100.0 * share(verified, consume),
                    100.0 * share(consume, touch),
                    100.0 * share(verified, loopback_at(reads, buffer)),
                    first,
                );
                out.push(
                    "sweep",
                    json!({
                        "guest": common.guest.name(), "accel": accel.name(),
                        "machine": args.common.machine.name(), "reads": reads, "buffer": buffer,
                        "verified_mb_s": verified, "completions_per_s": completions,
                        "interrupts_per_s": interrupts,
                        "data_notifications_per_completion": kicks_per_completion,
                        "guest_idle_share": idle,
                        "latency_p50_us": r.latency_p50_us,
                        "latency_p99_us": r.latency_p99_us, "consume_only_mb_s": consume,
                        "touch_only_mb_s": touch,
                        "verified_per_consume_only": share(verified, consume),
                        "consume_only_per_touch_only": share(consume, touch),
                        "verified_per_loopback": share(verified, loopback_at(reads, buffer)),
                        "first_sample_s": outcome.first_sample.map(|d| d.as_secs_f64()),
                    }),
                );
            }
        }
    }
    if let Some(dir) = &args.plot {
        plots::sweep_chart(dir, &bars)?;
    }
    if args.compare_guests {
        // The same shapes, the same run: Linux (kernel module + io_uring) against bare metal.
        say!(out);
        say!(
            out,
            "{:>5} {:>6} {:>11} {:>18} {:>13} {:>12} {:>13}",
            "accel",
            "reads",
            "buffer",
            "bare metal MB/s",
            "Linux MB/s",
            "Linux ÷ bm",
            "Linux first"
        );
        for &(accel, reads, buffer, kind, bare, _) in &figures {
            if kind != GuestKind::BareMetal {
                continue;
            }
            if let Some(&(.., linux, first)) = figures
                .iter()
                .find(|f| f.0 == accel && f.1 == reads && f.2 == buffer && f.3 == GuestKind::Linux)
            {
                let ratio = if bare > 0.0 { linux / bare } else { 0.0 };
                say!(
                    out,
                    "{:>5} {:>6} {:>11} {:>18.1} {:>13.1} {:>12.2} {:>12.3}s",
                    accel.name(),
                    reads,
                    buffer,
                    bare,
                    linux,
                    ratio,
                    first
                );
                out.push(
                    "guests",
                    json!({"accel": accel.name(), "reads": reads, "buffer": buffer,
                           "bare_metal_mb_s": bare, "linux_mb_s": linux,
                           "linux_per_bare_metal": ratio,
                           "linux_first_sample_s": if first.is_nan() { None } else { Some(first) }}),
                );
            }
        }
    }
    if let Some((common, tools)) = guests.iter().find(|(c, _)| c.guest == GuestKind::Linux) {
        all_passed &= iio_versus_chardev(common, tools, args.duration, out)?;
    }
    // Interrupt coalescing at a high paced rate: same throughput, far fewer interrupts.
    say!(out);
    say!(
        out,
        "{:>9} {:>13} {:>13} {:>9} {:>18}",
        "coalesce",
        "verified MB/s",
        "completions/s",
        "irq/s",
        "completions per irq"
    );
    for coalesce in [1u16, 16] {
        let run = configuration(
            &guests[0].0,
            args.duration,
            4_000_000,
            ClockMode::Paced,
            16 * 1024,
            64,
            coalesce,
        );
        if INTERRUPTED.load(Ordering::Acquire) {
            return Ok(false);
        }
        let config = run.run_config(tools, Accel::Tcg, false);
        let outcome = session::run(&config)?;
        let Some(r) = outcome.report() else {
            summary::print(&config, &outcome);
            all_passed = false;
            continue;
        };
        all_passed &= r.pass;
        let seconds = r.guest_time_ns as f64 / 1e9;
        let verified = r.bytes as f64 / 1e6 / seconds;
        let completions = r.completions as f64 / seconds;
        let interrupts = r.interrupts as f64 / seconds;
        let per_irq = r.completions as f64 / r.interrupts.max(1) as f64;
        say!(
            out,
            "{:>9} {:>13.1} {:>13.0} {:>9.0} {:>18.1}",
            coalesce,
            verified,
            completions,
            interrupts,
            per_irq
        );
        out.push(
            "coalescing",
            json!({"coalesce": coalesce, "verified_mb_s": verified,
                   "completions_per_s": completions, "interrupts_per_s": interrupts,
                   "completions_per_interrupt": per_irq}),
        );
    }
    Ok(all_passed)
}
