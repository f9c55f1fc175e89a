//! `vdaq bench`: a sweep of reads in flight × buffer sizes on every usable accelerator, then
//! interrupt coalescing at a high paced rate, each printed as a table on stdout.

use std::sync::atomic::Ordering;

use vdaq_launcher::session::{self, Accel, GuestKind, INTERRUPTED};
use vdaq_launcher::tools::{self, Kvm, Tools};
use vdaq_wire::{ClockMode, SampleFormat, SignalKind};

use crate::args::{BenchArgs, Common, Mode, RunArgs};
use vdaq_plot::sweep::Bar;

use crate::{plots, summary, Error};

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
fn iio_versus_chardev(common: &Common, tools: &Tools, duration: f64) -> Result<bool, Error> {
    println!();
    println!(
        "{:>10} {:>10} {:>14} {:>13} {:>10}",
        "interface", "rate Hz", "sampled MB/s", "verified MB/s", "dropped %"
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
            println!(
                "{:>10} {:>10} {:>14.1} {:>13.1} {:>10.1}",
                name,
                rate,
                sampled,
                if seconds > 0.0 {
                    r.bytes as f64 / 1e6 / seconds
                } else {
                    0.0
                },
                100.0 * r.dropped_frames as f64 / frames.max(1) as f64
            );
        }
    }
    Ok(passed)
}

/// Runs the benchmark; `Ok(false)` if a run failed or Ctrl-C cut the sweep short.
pub fn run(args: &BenchArgs) -> Result<bool, Error> {
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
    println!(
        "{:>10} {:>5} {:>7} {:>6} {:>11} {:>13} {:>12} {:>9} {:>9} {:>12} {:>13} {:>7} {:>11}",
        "guest",
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
    // Verified MB/s and first-sample time per (accel, shape, guest), for the comparison.
    let mut figures: Vec<(Accel, u32, u32, GuestKind, f64, f64)> = Vec::new();
    let mut bars = Vec::new();
    for accel in accels {
        for (reads, buffer) in [(8u32, 4096u32), (8, 65536), (64, 4096), (64, 65536)] {
            for (common, tools) in &guests {
                let run = configuration(
                    common,
                    args.duration,
                    1_000_000,
                    ClockMode::FreeRunning,
                    buffer,
                    reads,
                    1,
                );
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
                let first = outcome.first_sample.map_or(f64::NAN, |d| d.as_secs_f64());
                figures.push((accel, reads, buffer, common.guest, verified, first));
                bars.push(Bar {
                    group: format!("{reads} × {} KiB", buffer / 1024),
                    series: format!("{} {}", common.guest.name(), accel.name()),
                    value: verified,
                    baseline: consume,
                });
                println!(
                "{:>10} {:>5} {:>7} {:>6} {:>11} {:>13.1} {:>12.0} {:>9.0} {:>9} {:>12} {:>13.1} {:>6.0}% {:>11.3}",
                common.guest.name(),
                accel.name(),
                args.common.machine.name(),
                reads,
                buffer,
                verified,
                r.completions as f64 / seconds,
                r.interrupts as f64 / seconds,
                r.latency_p50_us,
                r.latency_p99_us,
                consume,
                if consume > 0.0 { 100.0 * verified / consume } else { 0.0 },
                first,
            );
            }
        }
    }
    if let Some(dir) = &args.plot {
        plots::sweep_chart(dir, &bars)?;
    }
    if args.compare_guests {
        // The same shapes, the same run: Linux (kernel module + io_uring) against bare metal.
        println!();
        println!(
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
                println!(
                    "{:>5} {:>6} {:>11} {:>18.1} {:>13.1} {:>12.2} {:>12.3}s",
                    accel.name(),
                    reads,
                    buffer,
                    bare,
                    linux,
                    if bare > 0.0 { linux / bare } else { 0.0 },
                    first
                );
            }
        }
    }
    if let Some((common, tools)) = guests.iter().find(|(c, _)| c.guest == GuestKind::Linux) {
        all_passed &= iio_versus_chardev(common, tools, args.duration)?;
    }
    // Interrupt coalescing at a high paced rate: same throughput, far fewer interrupts.
    println!();
    println!(
        "{:>9} {:>13} {:>13} {:>9} {:>18}",
        "coalesce", "verified MB/s", "completions/s", "irq/s", "completions per irq"
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
