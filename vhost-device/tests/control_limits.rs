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
    let held: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&control).expect("a client within the cap"))
        .collect();
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
    let started = Instant::now();
    for client in &held {
        let line = read_line(client);
        assert!(line.contains("idle for"), "told why: {line}");
        assert_eq!(read_line(client), "");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed after about 1 s, not {waited:?}"
    );
    let mut client = UnixStream::connect(&control).expect("a place again");
    writeln!(client, r#"{{"cmd":"stats"}}"#).expect("send");
    let reply = read_line(&client);
    assert!(reply.contains("\"ok\":true"), "served: {reply}");
}
