//! Run parameters from the kernel command line (`vdaq.<name>=<value>` words).

/// Which transport QEMU gave the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// virtio-pci (q35).
    Pci,
    /// virtio-mmio (microvm).
    Mmio,
}

/// Run parameters.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub transport: TransportKind,
    /// "stream", "overrun" or "shutdown".
    pub mode: &'static str,
    pub duration_ms: u64,
    pub reads: usize,
    pub buffer: usize,
    pub crc: bool,
    /// Also measure the consume-only rate (benchmark).
    pub consume_only: bool,
    /// Deliberate delay per consumed buffer (µs): a slow application.
    pub consume_delay_us: u64,
    /// Before halting for the next interrupt, poll the used rings this long (µs; 0: halt at
    /// once): a buffer the device returns meanwhile is taken without the interrupt's round
    /// trip through the VMM (under TCG, q35, 8 × 4 KiB: 390 MB/s halting at once, 585 with
    /// 100 µs, the guest idle 82 % → 16 %).
    pub poll_us: u64,
    pub progress_ms: u64,
    /// Stop after this many frames (0: run for `duration_ms`).
    pub frames: u64,
    /// Hash every consumed buffer into the report's `stream_hash`.
    pub hash: bool,
}

fn value<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| {
        word.strip_prefix("vdaq.")
            .and_then(|rest| rest.strip_prefix(name))
            .and_then(|rest| rest.strip_prefix('='))
    })
}

fn number(cmdline: &str, name: &str, default: u64) -> u64 {
    value(cmdline, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Params {
    pub fn parse(cmdline: &'static str) -> Self {
        let mode = match value(cmdline, "mode") {
            Some("overrun") => "overrun",
            Some("shutdown") => "shutdown",
            _ => "stream",
        };
        let overrun = mode == "overrun";
        Params {
            transport: match value(cmdline, "transport") {
                Some("mmio") => TransportKind::Mmio,
                _ => TransportKind::Pci,
            },
            mode,
            duration_ms: number(cmdline, "duration_ms", 3000),
            reads: (number(cmdline, "reads", 64) as usize).clamp(1, vdaq_driver::DATA_QUEUE_SIZE),
            buffer: (number(cmdline, "buffer", 65536) as usize).max(256),
            crc: number(cmdline, "crc", 0) != 0,
            consume_only: number(cmdline, "consume_only", 0) != 0,
            consume_delay_us: number(
                cmdline,
                "consume_delay_us",
                if overrun { 20_000 } else { 0 },
            ),
            poll_us: number(cmdline, "poll_us", 50),
            progress_ms: number(cmdline, "progress_ms", 500),
            frames: number(cmdline, "frames", 0),
            hash: number(cmdline, "hash", 0) != 0,
        }
    }
}
