//! `vhost-device-daq`: options → config → serve.

use std::process::ExitCode;

use vhost_device_daq::{cli, daemon};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match cli::parse(std::env::args_os()) {
        Ok(cli::Action::Serve(config)) => config,
        Ok(cli::Action::Exit(code)) => return code,
        Err(message) => {
            eprintln!("vhost-device-daq: {message}");
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
