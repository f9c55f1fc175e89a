//! The backend under test as a separate process (the real `vhost-device-daq` binary), so the
//! loopback path crosses a real Unix socket and the backend's memory can be measured alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running backend; killed (and its socket removed) on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

/// A private directory for sockets, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vdaq-loopback-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl BackendProcess {
    /// Starts `binary --socket-path <private socket> <args>` and waits until it listens.
    pub fn spawn(binary: &Path, args: &[&str]) -> std::io::Result<Self> {
        Self::spawn_logging(binary, args, None)
    }

    /// Like [`Self::spawn`], the backend's log filtered by `log_filter` (`RUST_LOG` syntax)
    /// if given: a tool that prints its own tables keeps the backend's info lines out of them.
    pub fn spawn_logging(
        binary: &Path,
        args: &[&str],
        log_filter: Option<&str>,
    ) -> std::io::Result<Self> {
        let dir = TempDir::new()?;
        let socket = dir.0.join("daq.sock");
        let mut command = Command::new(binary);
        command
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null());
        if let Some(filter) = log_filter {
            command.env("RUST_LOG", filter);
        }
        let mut child = command.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "backend exited before listening: {status}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(std::io::Error::other("backend did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(BackendProcess {
            child,
            socket,
            _dir: dir,
        })
    }

    /// The socket to connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size of the backend in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
