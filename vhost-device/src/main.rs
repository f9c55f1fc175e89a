//! `vhost-device-daq`: options → config → serve.

use std::process::ExitCode;

use vhost_device_daq::{cli, control, daemon, plot};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let options = match cli::parse(std::env::args_os()) {
        Ok(cli::Action::Serve(options)) => options,
        Ok(cli::Action::Exit(code)) => return code,
        Ok(cli::Action::Control { socket, request }) => {
            return match control::request(&socket, &request) {
                Ok(reply) => {
                    println!("{}", reply.line);
                    if reply.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(err) => {
                    eprintln!(
                        "vhost-device-daq: {err}; is the backend running with --control-socket?"
                    );
                    ExitCode::from(2)
                }
            };
        }
        Ok(cli::Action::Plot(args)) => {
            return match plot::run(&args) {
                Ok((output, summary)) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({ "png": output.display().to_string(), "waveform": summary })
                        );
                    } else {
                        eprintln!("vhost-device-daq: wrote {}: {summary}", output.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("vhost-device-daq: plot: {err}");
                    ExitCode::from(2)
                }
            };
        }
        Err(message) => {
            eprintln!("vhost-device-daq: {message}");
            return ExitCode::from(2);
        }
    };
    let config = match options.load_files() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("vhost-device-daq: {err}");
            return ExitCode::from(2);
        }
    };
    match daemon::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vhost-device-daq: {err}");
            ExitCode::FAILURE
        }
    }
}
