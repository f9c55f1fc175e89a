//! The control socket's bounds against the real backend (sandbox on): a flood of clients is
//! refused past the cap while the device streams, and clients that never speak are closed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vdaq_driver::DriverOptions;
use vdaq_loopback::{DriverRig, Resubmit};
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::SampleFormat;

fn read_line(stream: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read");
    line
}

#[test]
fn a_flood_of_control_clients_is_capped_idle_ones_are_closed_and_the_device_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("ctl.sock");
    let control_arg = control.display().to_string();
    let mut rig = DriverRig::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &[
            "--clock",
            "free",
            "--control-socket",
            &control_arg,
            "--control-clients",
            "3",
            "--control-idle-secs",
            "1",
        ],
        DriverOptions::default(),
        Duration::from_secs(30),
    )
    .expect("backend and driver");
    let mut held: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&control).expect("a client within the cap"))
        .collect();
    // One of them starts a line and never ends it: that is no way to keep a place either.
    held[2].write_all(b"{\"cmd\":").expect("half a request");
    let connected = Instant::now();
    // Past the cap: one error line, then the end.
    for _ in 0..20 {
        let refused = UnixStream::connect(&control).expect("connect");
        let line = read_line(&refused);
        assert!(
            line.contains("3 control clients are connected already"),
            "refused with a reason: {line}"
        );
        assert_eq!(read_line(&refused), "", "and closed");
    }
    // The device streams meanwhile.
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    rig.stream(&mut verifier, 8, 4096, 50_000, Resubmit::Batched)
        .expect("stream under the flood");
    assert_eq!(verifier.stats().errors, 0);
    // Clients that never speak are closed after the idle timeout, which frees their places.
    for client in &held {
        let line = read_line(client);
        assert!(line.contains("idle for"), "told why: {line}");
        assert_eq!(read_line(client), "");
    }
    let waited = connected.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after about 1 s, not {waited:?}"
    );
    let mut client = UnixStream::connect(&control).expect("a place again");
    writeln!(client, r#"{{"cmd":"stats"}}"#).expect("send");
    let reply = read_line(&client);
    assert!(reply.contains("\"ok\":true"), "served: {reply}");
}

/// Many threads allocating under the sandbox: glibc's malloc, at its ninth arena, used to
/// open /sys/devices/system/cpu/online to size its arena limit, which the filter forbids, and
/// the process ended (SIGSYS). The sandbox sets the limit before it starts.
#[test]
fn twenty_control_clients_at_once_run_under_the_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("ctl.sock");
    let control_arg = control.display().to_string();
    let mut backend = vdaq_loopback::BackendProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &["--control-socket", &control_arg, "--control-clients", "32"],
    )
    .expect("backend");
    let clients: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&control).expect("connect"))
        .collect();
    for round in 0..5 {
        for mut client in &clients {
            writeln!(client, r#"{{"cmd":"stats"}}"#).expect("send");
        }
        for client in &clients {
            let reply = read_line(client);
            assert!(reply.contains("\"ok\":true"), "round {round}: {reply}");
        }
    }
    assert!(
        backend.is_running(),
        "the sandbox let every thread allocate"
    );
}
