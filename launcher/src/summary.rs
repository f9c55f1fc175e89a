//! What a run reports: the human summary on stderr and, with `--json`, the guest's report on
//! stdout.

use vdaq_launcher::session::{GuestKind, Machine, RunConfig, RunOutcome};

/// Prints the summary of one run on stderr: what ran where, first sample, the guest's
/// figures and verdict (or its last console lines), and why the run was cut short.
pub fn print(config: &RunConfig, outcome: &RunOutcome) {
    eprintln!(
        "vdaq: {}{} / {} on {:?} ({}), wall {:.2} s",
        match config.guest.kind() {
            GuestKind::BareMetal => "",
            GuestKind::Linux => "Linux guest, ",
        },
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
            // What ended QEMU, when nothing the launcher did (a stop after the report, Ctrl-C,
            // a timeout) explains it.
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = outcome
                .qemu_status
                .and_then(|status| status.signal())
                .filter(|_| outcome.aborted.is_none())
            {
                eprintln!("  QEMU was killed by signal {signal} before the guest reported");
            }
            eprintln!("  no report from the guest");
            for line in &outcome.console_tail {
                eprintln!("  guest: {line}");
            }
        }
    }
    print_resources(&outcome.resources);
    if let Some(reason) = &outcome.aborted {
        eprintln!("  aborted: {reason}");
    }
}

/// The backend's and QEMU's memory, descriptors and threads over the run (`--sample-resources`):
/// first, lowest, highest and last value of each.
fn print_resources(samples: &[vdaq_launcher::resources::Sample]) {
    use vdaq_launcher::resources::{range, Sample, Usage};
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    eprintln!(
        "  resources, {} samples over {:.0} s (first / min / max / last):",
        samples.len(),
        (last.at_ms - first.at_ms) as f64 / 1000.0
    );
    type Quantity = (&'static str, fn(&Usage) -> u64);
    let quantities: [Quantity; 3] = [
        ("RSS KiB", |u| u.rss_kib),
        ("fds", |u| u.fds),
        ("threads", |u| u.threads),
    ];
    for (process, usage) in [
        ("backend", (|s: &Sample| s.backend) as fn(&Sample) -> Usage),
        ("QEMU", |s: &Sample| s.qemu),
    ] {
        let line: Vec<String> = quantities
            .iter()
            .filter_map(|(name, quantity)| {
                let r = range(samples, |s| quantity(&usage(s)))?;
                Some(format!(
                    "{name} {} / {} / {} / {}",
                    r.first, r.min, r.max, r.last
                ))
            })
            .collect();
        eprintln!("    {process}: {}", line.join(", "));
    }
}

/// Prints the guest's JSON report, as the guest wrote it, on stdout (`--json`); nothing if
/// the guest did not report.
pub fn print_json(outcome: &RunOutcome) {
    if let Some(json) = &outcome.report_json {
        println!("{json}");
    }
}
