//! `vdaq-app`: the vdaq Linux guest application. Opens `/dev/vdaq0`, keeps N reads in flight
//! through io_uring, verifies every sample, prints one `VDAQ-REPORT {…}` line (the bare-metal
//! guest's report) and exits 0 when every check passed. Parameters come from the environment
//! (`VDAQ_MODE`, `VDAQ_DURATION_MS`, … — the image's `/init` exports the kernel command line's
//! `vdaq.*`); see `params.rs`.

mod buffers;
mod cpu;
mod device;
mod params;
mod reader;
mod scans;
mod uapi;

use std::process::ExitCode;

use vdaq_wire::report::{Report, REPORT_PREFIX};

fn print_report(report: &Report<'_>) {
    let mut line = String::new();
    if report.write_json(&mut line).is_ok() {
        println!("{REPORT_PREFIX}{line}");
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("verify-scans") {
        use clap::Parser;
        let args = scans::ScanArgs::parse_from(std::env::args().skip(1));
        return match scans::run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                println!("vdaq-app verify-scans: {err}");
                ExitCode::from(2)
            }
        };
    }
    let params = match params::Params::from_lookup(|name| std::env::var(name).ok()) {
        Ok(params) => params,
        Err(err) => {
            println!("vdaq-app: {err}");
            print_report(&Report {
                failure: "invalid parameters",
                ..Report::default()
            });
            return ExitCode::from(2);
        }
    };
    if std::env::var("VDAQ_SYMBOLS").as_deref() == Ok("1") {
        // For ci/tcg-profile.sh: where this position-independent binary was loaded.
        println!(
            "vdaq-app: symbol main at {:#x}",
            main as fn() -> ExitCode as usize
        );
    }
    match reader::run(&params) {
        Ok(report) => {
            print_report(&report);
            if report.pass {
                ExitCode::SUCCESS
            } else {
                println!("vdaq-app: FAIL: {}", report.failure);
                ExitCode::FAILURE
            }
        }
        Err(reader::Fatal(what, err)) => {
            println!("vdaq-app: {what}: {err}");
            print_report(&Report {
                mode: params.mode.name(),
                failure: what,
                ..Report::default()
            });
            ExitCode::FAILURE
        }
    }
}
