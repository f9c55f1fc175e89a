//! Loopback throughput benchmark (prints figures; asserts nothing about speed).
//!
//! Streams through the real backend process in free-running mode with the reference driver
//! (`vdaq-driver` over the loopback transport, the same loop the tests use) and verifies every
//! sample,
//! for 4 KiB and 64 KiB buffers; measures, in the same run, single-thread memcpy bandwidth
//! over the same memory footprint as the buffers in flight, and prints the ratio. A long run
//! prints the backend's RSS at start and end.
//!
//! `cargo bench -p vhost-device-daq --bench loopback_throughput` (`-- --quick` for a short run).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use vdaq_driver::DriverOptions;
use vdaq_loopback::{BackendProcess, DriverRig, Resubmit};
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::SampleFormat;

struct Figures {
    payload_bytes: u64,
    completions: u64,
    interrupts: u64,
    elapsed: Duration,
}

fn backend() -> BackendProcess {
    BackendProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &vdaq_loopback::BENCH_BACKEND_ARGS,
    )
    .expect("backend starts")
}

/// Streams for `duration` with `in_flight` buffers of `buffer_bytes`, verifying every sample.
/// `on_tick` runs about once a second.
fn run(
    backend: &BackendProcess,
    in_flight: usize,
    buffer_bytes: usize,
    duration: Duration,
    mut on_tick: impl FnMut(Duration),
) -> Figures {
    let mut rig = DriverRig::connect(
        backend.socket(),
        DriverOptions::default(),
        duration + Duration::from_secs(30),
    )
    .expect("connect");
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    let start = Instant::now();
    let interrupts_before = rig.interrupts();
    let mut next_tick = Duration::from_secs(1);
    rig.stream_until(
        &mut verifier,
        in_flight,
        buffer_bytes,
        Resubmit::Batched,
        |_| {
            let elapsed = start.elapsed();
            if elapsed >= next_tick {
                on_tick(elapsed);
                next_tick += Duration::from_secs(1);
            }
            elapsed >= duration
        },
    )
    .expect("every sample verifies");
    let elapsed = start.elapsed();
    let stats = verifier.stats();
    let interrupts = rig.interrupts() - interrupts_before;
    rig.driver.stop(&mut rig.wait).expect("STOP");
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.dropped_frames, 0);
    Figures {
        payload_bytes: stats.payload_bytes,
        completions: stats.buffers,
        interrupts,
        elapsed,
    }
}

/// Single-thread memcpy bandwidth (bytes copied per second) between two buffers of
/// `footprint` bytes each, fully touched beforehand.
fn memcpy_bandwidth(footprint: usize, duration: Duration) -> f64 {
    let source: Vec<u8> = (0..footprint).map(|i| i as u8).collect();
    let mut destination = vec![0u8; footprint];
    destination.copy_from_slice(&source);
    let start = Instant::now();
    let mut copied = 0u64;
    while start.elapsed() < duration {
        destination.copy_from_slice(black_box(&source));
        black_box(&mut destination);
        copied += footprint as u64;
    }
    copied as f64 / start.elapsed().as_secs_f64()
}

fn mib(bytes_per_second: f64) -> f64 {
    bytes_per_second / (1024.0 * 1024.0)
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let per_case = Duration::from_secs(if quick { 1 } else { 5 });
    let long_run = Duration::from_secs(if quick { 3 } else { 30 });
    let backend = backend();

    println!("vdaq loopback benchmark: free-running clock, 4 ch × s16, counter pattern, every sample verified");
    println!(
        "{:>8} {:>9} {:>10} {:>13} {:>14} {:>13} {:>15} {:>7}",
        "buffer",
        "in flight",
        "footprint",
        "verified MiB/s",
        "completions/s",
        "interrupts/s",
        "memcpy MiB/s",
        "ratio"
    );
    for (buffer_bytes, in_flight) in [(4096usize, 256usize), (64 * 1024, 256)] {
        let footprint = buffer_bytes * in_flight;
        let memcpy = memcpy_bandwidth(footprint, per_case);
        let figures = run(&backend, in_flight, buffer_bytes, per_case, |_| {});
        let seconds = figures.elapsed.as_secs_f64();
        let verified = figures.payload_bytes as f64 / seconds;
        println!(
            "{:>7}K {:>9} {:>8}Mi {:>13.0} {:>14.0} {:>13.0} {:>15.0} {:>6.1}%",
            buffer_bytes / 1024,
            in_flight,
            footprint / (1024 * 1024),
            mib(verified),
            figures.completions as f64 / seconds,
            figures.interrupts as f64 / seconds,
            mib(memcpy),
            100.0 * verified / memcpy,
        );
    }
    let dram = memcpy_bandwidth(256 << 20, per_case);
    println!(
        "context: memcpy over a 256 MiB footprint (DRAM-bound): {:.0} MiB/s",
        mib(dram)
    );

    let mut samples = Vec::new();
    let figures = run(&backend, 256, 64 * 1024, long_run, |at| {
        samples.push((at.as_secs(), backend.rss_kib()));
    });
    let rss_end = backend.rss_kib();
    // Measured once streaming is under way: the guest pages the backend has touched count in
    // its RSS, and they are a fixed set (the buffers in flight).
    let rss_start = samples.first().and_then(|&(_, rss)| rss);
    println!(
        "long run: {:.1} GiB verified in {:.0} s; backend RSS after 1 s {} KiB, at end {} KiB",
        figures.payload_bytes as f64 / (1u64 << 30) as f64,
        figures.elapsed.as_secs_f64(),
        rss_start.map_or("?".into(), |v| v.to_string()),
        rss_end.map_or("?".into(), |v| v.to_string()),
    );
    let trace: Vec<String> = samples
        .iter()
        .map(|(s, rss)| format!("{s}s:{}", rss.map_or("?".into(), |v| v.to_string())))
        .collect();
    println!("backend RSS (KiB) per second: {}", trace.join(" "));
}
