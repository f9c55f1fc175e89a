//! `vdaq`: runs the virtual DAQ card end to end — backend, QEMU, bare-metal guest — and
//! reports what the guest verified. `vdaq bench` sweeps buffer sizes and reads in flight.
//!
//! Options ([`args`]) → one run (here) or the benchmark ([`mod@bench`]) → exit code: 0 passed,
//! 1 failed, 2 could not run.

mod args;
mod bench;
mod man;
mod plots;
mod summary;

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use thiserror::Error;

use args::{Cli, Cmd, GuestMismatch, KvmUnavailable, Mode, RecordExists, RunArgs};
use vdaq_launcher::session::{self, SessionError, INTERRUPTED};
use vdaq_launcher::tools::{self, ToolError};

/// Why a command could not run at all (exit code 2), as opposed to a run that failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The accelerator asked for is not available.
    #[error(transparent)]
    Accel(#[from] KvmUnavailable),
    /// An option the chosen guest does not carry out.
    #[error(transparent)]
    Guest(#[from] GuestMismatch),
    /// QEMU, the backend or the guest image could not be found, built or provisioned.
    #[error(transparent)]
    Tools(#[from] ToolError),
    /// The backend or QEMU could not be started.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// `--record` names a file that exists.
    #[error(transparent)]
    Record(#[from] RecordExists),
    /// The charts could not be drawn.
    #[error(transparent)]
    Plots(#[from] plots::PlotsError),
}

/// One run: summary on stderr, `--json` report on stdout; whether it passed.
fn run(args: &RunArgs) -> Result<bool, Error> {
    args.check_guest()?;
    args.check_files()?;
    if let Some(dir) = &args.plot {
        plots::prepare(dir)?;
    }
    let accel = args.common.accel.resolve(tools::kvm())?;
    let tools = args
        .common
        .tools(args.mode == Mode::Iio || args.iiod.is_some())?;
    let config = args.run_config(&tools, accel, true);
    let outcome = session::run(&config)?;
    if args.iiod.is_some() {
        // A serving session ends with Ctrl-C; anything else ended it early.
        let interrupted = INTERRUPTED.load(Ordering::Acquire);
        if !interrupted {
            summary::print(&config, &outcome);
        }
        return Ok(interrupted);
    }
    summary::print(&config, &outcome);
    if args.json {
        summary::print_json(&outcome);
    }
    let passed = outcome.aborted.is_none()
        && outcome.guest_passed()
        && outcome.report().is_some_and(|r| r.pass);
    if let Some(dir) = &args.plot {
        // The run's verdict comes first: charts that cannot be drawn after a failed run are
        // reported, and the exit says the run failed.
        if let Err(err) = plots::run_charts(dir, &outcome, &tools.backend, args.record.as_deref()) {
            if passed {
                return Err(err.into());
            }
            eprintln!("vdaq: {err}");
        }
    }
    Ok(passed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Release)) {
        eprintln!("vdaq: cannot install the Ctrl-C handler: {err}");
    }
    let result = match &cli.command {
        Some(Cmd::Bench(args)) => bench::run(args),
        Some(Cmd::Completions { shell }) => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "vdaq", &mut std::io::stdout());
            Ok(true)
        }
        None => run(&cli.run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("vdaq: {err}");
            ExitCode::from(2)
        }
    }
}
