//! One run: backend and QEMU as supervised child processes, the guest's serial console read
//! line by line (progress, first-sample marker, report), and a teardown that leaves no process
//! or socket behind on success, failure, timeout or Ctrl-C.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vdaq_wire::latency::{parse_buckets, BucketCount, LATENCY_PREFIX};
use vdaq_wire::report::{Report, FIRST_SAMPLE_LINE, PROGRESS_PREFIX, REPORT_PREFIX};
use vdaq_wire::VIRTIO_ID_DAQ;

/// Set by the Ctrl-C handler; every running session tears down when it sees it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// q35 with virtio-pci and MSI-X.
    Q35,
    /// microvm with virtio-mmio (IOAPIC interrupts).
    Microvm,
}

impl Machine {
    /// Name on the command line (`q35`, `microvm`).
    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

/// Accelerator actually used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's TCG.
    Tcg,
    /// KVM.
    Kvm,
}

impl Accel {
    /// Name as QEMU spells it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Which guest runs on the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// The bare-metal Rust guest (guest-app/, PVH boot).
    BareMetal,
    /// Debian's Linux kernel with the vdaq kernel module and the io_uring application
    /// (linux-driver/, linux-app/).
    Linux,
}

impl GuestKind {
    /// Name on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::BareMetal => "bare-metal",
            GuestKind::Linux => "linux",
        }
    }

    /// Guest memory (MiB) a run gets unless told otherwise.
    pub fn default_memory_mib(self) -> u32 {
        match self {
            // The bare-metal guest's heap is 160 MiB.
            GuestKind::BareMetal => 256,
            // Debian's kernel and the initramfs unpacked in memory.
            GuestKind::Linux => 512,
        }
    }
}

/// The guest's boot files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// A PVH ELF image (`-kernel`).
    BareMetal(PathBuf),
    /// A Linux kernel and its initramfs.
    Linux {
        /// `-kernel`.
        kernel: PathBuf,
        /// `-initrd`.
        initrd: PathBuf,
    },
}

impl GuestImage {
    /// Which kind of guest this is.
    pub fn kind(&self) -> GuestKind {
        match self {
            GuestImage::BareMetal(_) => GuestKind::BareMetal,
            GuestImage::Linux { .. } => GuestKind::Linux,
        }
    }
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Backend binary.
    pub backend: PathBuf,
    /// Guest image.
    pub guest: GuestImage,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// Backend options (after --socket-path).
    pub backend_args: Vec<String>,
    /// Guest command-line parameters (`vdaq.*=…`).
    pub guest_args: Vec<String>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Show live progress on stderr.
    pub progress: bool,
    /// Echo every guest console line.
    pub verbose: bool,
    /// Hot-unplug the card when the guest asks ([`REPLUG_TRIGGER`]), restart the backend, and
    /// plug a card in again (q35: the card sits behind a hot-pluggable PCIe root port).
    pub replug: bool,
    /// Forward this host port (127.0.0.1) to the guest's iiod (QEMU user networking, a
    /// virtio-net card).
    pub iiod_port: Option<u16>,
    /// Sample the backend's and QEMU's memory, descriptors and threads this often.
    pub sample_resources: Option<Duration>,
}

/// Port iiod listens on in the guest (libiio's default).
pub const IIOD_GUEST_PORT: u16 = 30431;

/// Console line the Linux guest prints once iiod serves the card.
pub const IIOD_READY: &str = "vdaq-init: iiod is serving";

/// Console line on which a `replug` run unplugs the card (the Linux guest's test tool prints it
/// once its reads are in flight).
pub const REPLUG_TRIGGER: &str = "vdaqtest: waiting for unplug";

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// The guest's report line (JSON), if it printed one.
    pub report_json: Option<String>,
    /// QEMU's exit status, if it exited.
    pub qemu_status: Option<ExitStatus>,
    /// Host time from QEMU start to the guest's first verified buffer.
    pub first_sample: Option<Duration>,
    /// Host time from QEMU start to QEMU exit.
    pub wall: Duration,
    /// Why the run was cut short, if it was.
    pub aborted: Option<String>,
    /// Last guest console lines (for diagnosing failures).
    pub console_tail: Vec<String>,
    /// The guest's progress lines: (guest ms since streaming began, payload bytes verified).
    pub progress: Vec<(u64, u64)>,
    /// The guest's latency histogram (non-empty buckets), if it printed one.
    pub latency: Vec<BucketCount>,
    /// Backend and QEMU usage through the run, if asked for.
    pub resources: Vec<crate::resources::Sample>,
}

impl RunOutcome {
    /// The parsed report.
    pub fn report(&self) -> Option<Report<'_>> {
        serde_json::from_str(self.report_json.as_deref()?).ok()
    }

    /// Takes the report or the latency histogram from a console line; whether it was one.
    fn take_result_line(&mut self, line: &str) -> bool {
        if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
            self.report_json = Some(json.to_string());
        } else if let Some(body) = line
            .strip_prefix(LATENCY_PREFIX)
            .or_else(|| (line == LATENCY_PREFIX.trim_end()).then_some(""))
        {
            // A malformed pair is skipped: the chart shows what could be read.
            self.latency = parse_buckets(body).flatten().collect();
        } else {
            return false;
        }
        true
    }

    /// Whether the guest exited through isa-debug-exit with code 0 (QEMU status 1).
    pub fn guest_passed(&self) -> bool {
        self.qemu_status.and_then(|s| s.code()) == Some(1)
    }
}

/// Session setup errors (everything after start-up is reported in [`RunOutcome`]).
#[derive(Debug, Error)]
pub enum SessionError {
    /// A child process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The backend did not create its socket.
    #[error("the backend did not listen on {0} within 10 s")]
    BackendNotListening(PathBuf),
    /// The backend ended before listening (it said why on stderr).
    #[error("the backend exited ({0}) before it listened; its message above says why")]
    BackendExited(ExitStatus),
    /// The unplug / re-plug sequence failed.
    #[error("re-plug: {0}")]
    Replug(#[from] crate::qmp::QmpError),
    /// The run directory could not be made.
    #[error("cannot create the run directory {path}: {source}")]
    RunDir {
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A child killed (and reaped) on drop, and killed by the kernel if the launcher dies.
struct Supervised {
    child: Child,
    name: &'static str,
}

impl Supervised {
    fn spawn(name: &'static str, command: &mut Command) -> Result<Self, SessionError> {
        let die_with_launcher = || {
            // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this (child) process's own death
            // signal; it is async-signal-safe.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: getppid has no preconditions and is async-signal-safe.
            if unsafe { libc::getppid() } == 1 {
                // The launcher is already gone (no allocation here: we are between fork and
                // exec).
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only makes the two
        // async-signal-safe calls above; it touches no memory shared with the parent.
        unsafe { command.pre_exec(die_with_launcher) };
        let child = command
            .spawn()
            .map_err(|source| SessionError::Spawn { what: name, source })?;
        Ok(Supervised { child, name })
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, a grace period, then SIGKILL.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill() on our own child's pid with a valid signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            eprintln!("vdaq: stopping {}", self.name);
            self.stop(Duration::from_millis(500));
        }
    }
}

/// A private directory for the run's socket; removed on drop. Stale ones from launchers
/// that were killed outright are removed at the next start.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self, SessionError> {
        let base = std::env::temp_dir();
        remove_stale_run_dirs(&base);
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("vdaq-run-{}-{n}", std::process::id()));
        // Private (0700) and new: a directory someone else prepared is refused, so nobody
        // can slip their own socket in front of QEMU and the shared guest memory.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| SessionError::RunDir {
                path: path.clone(),
                source,
            })?;
        Ok(RunDir(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn remove_stale_run_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vdaq-run-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // Only our own directories, and only those whose launcher is gone.
        let ours = std::os::unix::fs::MetadataExt::uid(&match entry.metadata() {
            Ok(meta) => meta,
            Err(_) => continue,
        }) == current_uid();
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn qemu_command(config: &RunConfig, socket: &Path, qmp: &Path) -> Command {
    let memory = format!("{}M", config.memory_mib);
    let mut command = Command::new(&config.qemu);
    command.args(["-nodefaults", "-display", "none", "-no-reboot"]);
    command.args(["-serial", "stdio", "-monitor", "none"]);
    command.args(["-m", &memory]);
    command.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
    ]);
    command.args(["-bios", "qboot.rom"]);
    command.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    command.args([
        "-chardev",
        &format!("socket,id=daq0,path={}", socket.display()),
    ]);
    let device_options = format!(
        "chardev=daq0,virtio-id={VIRTIO_ID_DAQ},num_vqs={},vq_size=256,config_size={}",
        vdaq_wire::queue::COUNT,
        vdaq_wire::config::CONFIG_SIZE
    );
    if config.replug {
        command.args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
    }
    match config.machine {
        Machine::Q35 => {
            command.args(["-machine", "q35,memory-backend=mem"]);
            if config.replug {
                command.args(["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"]);
                command.args([
                    "-device",
                    &format!("vhost-user-test-device-pci,{device_options},id=daq,bus=rp0"),
                ]);
            } else {
                command.args([
                    "-device",
                    &format!("vhost-user-test-device-pci,{device_options}"),
                ]);
            }
        }
        Machine::Microvm => {
            // With ACPI (microvm's default) Linux finds the virtio-mmio devices in the DSDT;
            // Debian's virtio_mmio has no `device=` command-line parameter to find them
            // without it. The bare-metal guest probes microvm's slots itself.
            command.args(["-machine", "microvm"]);
            command.args(["-numa", "node,memdev=mem"]);
            command.args(["-global", "virtio-mmio.force-legacy=false"]);
            command.args([
                "-device",
                &format!("vhost-user-test-device,{device_options}"),
            ]);
        }
    }
    if let Some(port) = config.iiod_port {
        command.args([
            "-netdev",
            &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:{IIOD_GUEST_PORT}"),
        ]);
        command.args([
            "-device",
            match config.machine {
                // No option ROM: qboot boots the kernel directly, and the ROM file is not
                // part of every QEMU package.
                Machine::Q35 => "virtio-net-pci,netdev=net0,romfile=",
                Machine::Microvm => "virtio-net-device,netdev=net0",
            },
        ]);
    }
    match config.accel {
        Accel::Tcg => {
            command.args(["-accel", "tcg", "-cpu", "max"]);
        }
        Accel::Kvm => {
            // This machine's software-nested KVM aborts on MSR 0x10a with -cpu host/max.
            command.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"]);
        }
    }
    let mut append = Vec::new();
    match &config.guest {
        GuestImage::BareMetal(image) => {
            command.arg("-kernel").arg(image);
        }
        GuestImage::Linux { kernel, initrd } => {
            command
                .arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initrd);
            // `cryptomgr.notests`: the kernel's crypto self-tests take ~1.4 s of a TCG boot here
            // and test nothing this guest uses. `mitigations=off`: the speculative-execution
            // mitigations (page-table isolation's two address-space switches per syscall above
            // all, each a full TLB flush in TCG) guard against nothing in a throwaway test VM,
            // and TCG does not speculate. `initcall_blacklist`: the SP800-108 KDF self-test
            // (374 ms under TCG, outside cryptomgr's switch) and boot-time kprobe events (125
            // ms), neither used here (initcall_debug). `init_on_alloc=0`: Debian zeroes every
            // slab and page allocation (hardening against leaks of stale data), a memset TCG
            // runs byte by byte; it took 4-5 % of the vCPU at 64 x 64 KiB (ci/tcg-profile.sh).
            append.extend(
                [
                    "console=ttyS0",
                    "quiet",
                    "cryptomgr.notests",
                    "mitigations=off",
                    "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace",
                    "init_on_alloc=0",
                ]
                .map(String::from),
            );
            if config.machine == Machine::Microvm {
                if let Some(khz) = crate::tools::host_tsc_khz() {
                    append.push(format!("tsc_early_khz={khz}"));
                }
            }
        }
    }
    append.push(format!(
        "vdaq.transport={}",
        match config.machine {
            Machine::Q35 => "pci",
            Machine::Microvm => "mmio",
        }
    ));
    append.extend(config.guest_args.iter().cloned());
    command.args(["-append", &append.join(" ")]);
    command
}

fn wait_for_socket(socket: &Path, backend: &mut Supervised) -> Result<(), SessionError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = backend.try_wait() {
            return Err(SessionError::BackendExited(status));
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::Acquire) {
            return Err(SessionError::BackendNotListening(socket.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn spawn_backend(config: &RunConfig, socket: &Path) -> Result<Supervised, SessionError> {
    let mut backend_command = Command::new(&config.backend);
    backend_command
        .arg("--socket-path")
        .arg(socket)
        .args(&config.backend_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let mut backend = Supervised::spawn("vhost-device-daq", &mut backend_command)?;
    wait_for_socket(socket, &mut backend)?;
    Ok(backend)
}

/// Unplugs the card, restarts the backend and plugs a card in again, through QMP: stock QEMU's
/// generic vhost-user device cannot reconnect to a restarted backend in place (NOTES), so a
/// backend restart without restarting the VM is a re-plug.
fn replug(
    config: &RunConfig,
    qmp_path: &Path,
    socket: &Path,
    backend: &mut Supervised,
) -> Result<(), SessionError> {
    use serde_json::json;
    let mut qmp = crate::qmp::Qmp::connect(qmp_path, Duration::from_secs(5))?;
    qmp.execute("device_del", json!({ "id": "daq" }))?;
    // The guest's PCIe hotplug handling completes the removal (its driver drains first).
    qmp.wait_event("DEVICE_DELETED", Duration::from_secs(30))?;
    qmp.execute("chardev-remove", json!({ "id": "daq0" }))?;
    backend.stop(Duration::from_secs(2));
    let _ = std::fs::remove_file(socket);
    *backend = spawn_backend(config, socket)?;
    qmp.execute(
        "chardev-add",
        json!({
            "id": "daq0",
            "backend": { "type": "socket", "data": {
                "addr": { "type": "unix", "data": { "path": socket.display().to_string() } },
                "server": false,
            } },
        }),
    )?;
    qmp.execute(
        "device_add",
        json!({
            "driver": "vhost-user-test-device-pci",
            "id": "daq",
            "bus": "rp0",
            "chardev": "daq0",
            "virtio-id": VIRTIO_ID_DAQ,
            "num_vqs": vdaq_wire::queue::COUNT,
            "vq_size": 256,
            "config_size": vdaq_wire::config::CONFIG_SIZE,
        }),
    )?;
    Ok(())
}

/// Runs the guest once.
pub fn run(config: &RunConfig) -> Result<RunOutcome, SessionError> {
    let dir = RunDir::create()?;
    let socket = dir.0.join("daq.sock");
    let qmp_path = dir.0.join("qmp.sock");
    let mut backend = spawn_backend(config, &socket)?;

    let mut qemu_cmd = qemu_command(config, &socket, &qmp_path);
    qemu_cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    if config.verbose {
        eprintln!("vdaq: {qemu_cmd:?}");
    }
    let started = Instant::now();
    let mut qemu = Supervised::spawn("QEMU", &mut qemu_cmd)?;
    let (lines_tx, lines) = mpsc::channel::<String>();
    if let Some(stdout) = qemu.child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
    }

    let mut outcome = RunOutcome {
        report_json: None,
        qemu_status: None,
        first_sample: None,
        wall: Duration::ZERO,
        aborted: None,
        console_tail: Vec::new(),
        progress: Vec::new(),
        latency: Vec::new(),
        resources: Vec::new(),
    };
    let deadline = started + config.timeout;
    let mut next_sample = started;
    let mut progress_shown = false;
    loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if outcome.take_result_line(&line) {
                } else if config.replug && line.contains(REPLUG_TRIGGER) {
                    outcome.console_tail.push(line.clone());
                    eprintln!(
                        "vdaq: unplugging the card, restarting the backend, plugging it in again"
                    );
                    if let Err(err) = replug(config, &qmp_path, &socket, &mut backend) {
                        outcome.aborted = Some(err.to_string());
                        break;
                    }
                } else if let Some(port) = config.iiod_port.filter(|_| line.starts_with(IIOD_READY))
                {
                    outcome.console_tail.push(line.clone());
                    eprintln!(
                        "vdaq: iiod serves the card: iio_info -u ip:127.0.0.1:{port}  (Ctrl-C stops the VM)"
                    );
                } else if line == FIRST_SAMPLE_LINE {
                    outcome.first_sample.get_or_insert(started.elapsed());
                } else if let Some(progress) = line.strip_prefix(PROGRESS_PREFIX) {
                    if let Some((ms, bytes)) = progress_point(progress) {
                        outcome.progress.push((ms, bytes));
                    }
                    if config.progress {
                        show_progress(progress);
                        progress_shown = true;
                    }
                } else {
                    if config.verbose {
                        eprintln!("guest: {line}");
                    }
                    outcome.console_tail.push(line);
                    if outcome.console_tail.len() > 40 {
                        outcome.console_tail.remove(0);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // QEMU closed its console: it is exiting.
                outcome.qemu_status = qemu.stop(Duration::from_secs(5));
                break;
            }
        }
        if let Some(status) = qemu.try_wait() {
            // Drain what the console still holds.
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                if !outcome.take_result_line(line.trim_end()) {
                    outcome.console_tail.push(line);
                }
            }
            outcome.qemu_status = Some(status);
            break;
        }
        if INTERRUPTED.load(Ordering::Acquire) {
            outcome.aborted = Some("interrupted (Ctrl-C)".into());
            break;
        }
        if Instant::now() > deadline {
            outcome.aborted = Some(format!("timed out after {:?}", config.timeout));
            break;
        }
        if backend.try_wait().is_some() {
            outcome.aborted = Some("the backend exited during the run".into());
            break;
        }
        if let Some(every) = config.sample_resources {
            if Instant::now() >= next_sample {
                let (Some(backend), Some(qemu)) = (
                    crate::resources::usage(backend.child.id()),
                    crate::resources::usage(qemu.child.id()),
                ) else {
                    continue;
                };
                outcome.resources.push(crate::resources::Sample {
                    at_ms: started.elapsed().as_millis() as u64,
                    backend,
                    qemu,
                });
                next_sample = Instant::now() + every;
            }
        }
    }
    if progress_shown {
        eprintln!();
    }
    outcome.wall = started.elapsed();
    if outcome.qemu_status.is_none() {
        outcome.qemu_status = qemu.stop(Duration::from_secs(2));
    }
    drop(qemu);
    backend.stop(Duration::from_secs(2));
    drop(backend);
    drop(dir);
    Ok(outcome)
}

/// (guest ms, payload bytes) of a progress line's body.
fn progress_point(progress: &str) -> Option<(u64, u64)> {
    let mut fields = progress.split_ascii_whitespace().map(str::parse::<u64>);
    let ms = fields.next()?.ok()?;
    let _frames = fields.next()?.ok()?;
    let bytes = fields.next()?.ok()?;
    Some((ms, bytes))
}

fn show_progress(progress: &str) {
    let fields: Vec<u64> = progress
        .split_ascii_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    if let [ms, frames, bytes, interrupts, ..] = fields[..] {
        let seconds = ms as f64 / 1000.0;
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let rate = if seconds > 0.0 { mib / seconds } else { 0.0 };
        eprint!(
            "\r  t={seconds:6.1}s  frames={frames:<12} verified={mib:9.1} MiB  {rate:8.1} MiB/s  interrupts={interrupts:<10}"
        );
        let _ = std::io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    use vdaq_wire::report::Report;

    /// The Linux image's /init writes the report itself when a C test tool ran (modes unbind,
    /// unplug, iio…): its field list must be the report's, or the launcher cannot parse it.
    #[test]
    fn the_linux_init_reports_every_field_of_the_report() {
        let init =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../images/linux/init"))
                .expect("images/linux/init");
        let list = init
            .split("for f in ")
            .nth(1)
            .and_then(|rest| rest.split("; do").next())
            .expect("the field loop of report()");
        let from_init: Vec<&str> = list
            .split_whitespace()
            .filter(|word| *word != "\\")
            .collect();
        let value = serde_json::to_value(Report::default()).expect("serialisable");
        let object = value.as_object().expect("an object");
        let fixed = ["transport", "mode", "pass", "failure"];
        let from_report: Vec<&str> = object
            .keys()
            .map(String::as_str)
            .filter(|key| !fixed.contains(key))
            .collect();
        let mut sorted_init = from_init.clone();
        sorted_init.sort_unstable();
        let mut sorted_report = from_report.clone();
        sorted_report.sort_unstable();
        assert_eq!(sorted_init, sorted_report);
    }
}
