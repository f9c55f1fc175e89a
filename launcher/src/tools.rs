//! Finding (and building or provisioning, when missing) what a run needs: the backend binary,
//! the guest image, a QEMU ≥ 10.2, and a usable accelerator.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::session::{GuestImage, GuestKind};

/// A tool could not be found, built or provisioned.
#[derive(Debug, Error)]
pub enum ToolError {
    /// A helper command failed.
    #[error("{what} failed ({status}); run `{command}` by hand to see why")]
    Failed {
        /// What was being done.
        what: &'static str,
        /// Exit status.
        status: String,
        /// The command.
        command: String,
    },
    /// A helper command could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A path given on the command line does not exist.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// The source tree (guest image builds, QEMU provisioning) is not where it was.
    #[error(
        "{} is not a vdaq source tree (no images/build.sh){}; set VDAQ_HOME to a clone, or \
         pass --qemu, --backend and --guest-image (or --linux-kernel and --linux-initrd)",
        root.display(),
        if *from_var { " as VDAQ_HOME says" } else { "" }
    )]
    NoSourceTree {
        /// Where it was looked for.
        root: PathBuf,
        /// Whether VDAQ_HOME named it.
        from_var: bool,
    },
}

/// The environment variable naming the vdaq source tree, for an installed `vdaq` whose
/// build tree has moved.
pub const SOURCE_TREE_VAR: &str = "VDAQ_HOME";

/// The vdaq source tree, where the guest images are built and QEMU is provisioned:
/// `$VDAQ_HOME` if set, else the tree this binary was built from (also when installed with
/// `cargo install --path launcher`, which builds from the clone in place).
pub fn source_tree() -> Result<PathBuf, ToolError> {
    let built_from = || {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let (root, from_var) = match std::env::var_os(SOURCE_TREE_VAR).filter(|v| !v.is_empty()) {
        Some(dir) => (PathBuf::from(dir), true),
        None => (built_from(), false),
    };
    if root.join("images/build.sh").is_file() {
        Ok(root)
    } else {
        Err(ToolError::NoSourceTree { root, from_var })
    }
}

/// Runs `program args` in the source tree with stdout captured (stderr passes through, so
/// build progress shows) and returns the stdout lines.
fn run_lines(what: &'static str, program: &Path, args: &[&str]) -> Result<Vec<String>, ToolError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let output = Command::new(program)
        .args(args)
        .current_dir(source_tree()?)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ToolError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ToolError::Failed {
            what,
            status: output.status.to_string(),
            command,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .collect())
}

fn run_last_line(what: &'static str, program: &Path, args: &[&str]) -> Result<String, ToolError> {
    Ok(run_lines(what, program, args)?.pop().unwrap_or_default())
}

/// The backend binary: `explicit` if given; else next to this executable (cargo puts all of a
/// workspace's binaries in one directory, and `cargo install` both into one bin/); else on
/// PATH; else built with cargo in the source tree.
pub fn backend(explicit: Option<&Path>) -> Result<PathBuf, ToolError> {
    if let Some(path) = explicit {
        return existing(path);
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vhost-device-daq")))
        .filter(|path| path.exists())
    {
        return Ok(beside);
    }
    // Installed on its own (`cargo install --path vhost-device` into another root).
    if let Some(on_path) = std::env::var_os("PATH").and_then(|paths| {
        // Absolute entries only: an empty or relative one would mean the current directory.
        std::env::split_paths(&paths)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join("vhost-device-daq"))
            .find(|path| path.is_file())
    }) {
        eprintln!("vdaq: using {} (found on PATH)", on_path.display());
        return Ok(on_path);
    }
    eprintln!("vdaq: building vhost-device-daq (release)…");
    let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
    run_last_line(
        "building the backend",
        &cargo,
        &[
            "build",
            "--release",
            "-p",
            "vhost-device-daq",
            "--bin",
            "vhost-device-daq",
        ],
    )?;
    // Where cargo put it: CARGO_TARGET_DIR when set (relative to the directory cargo ran in,
    // the repository root), else the workspace's target/.
    let root = source_tree()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    existing(&target_dir.join("release/vhost-device-daq"))
}

/// The guest image: `explicit` if given, else built by `images/build.sh` (a no-op when current).
pub fn guest_image(explicit: Option<&Path>) -> Result<PathBuf, ToolError> {
    if let Some(path) = explicit {
        return existing(path);
    }
    let path = run_last_line(
        "building the guest image",
        &source_tree()?.join("images/build.sh"),
        &[],
    )?;
    existing(Path::new(&path))
}

/// The Linux guest's kernel and initramfs: `explicit` if given, else built by
/// `images/build-linux.sh` (Debian's kernel, the vdaq module, busybox and the application;
/// quick when current). Its last two stdout lines are the two paths.
/// `libiio`: the image with Debian's libiio tools and iiod (`images/build-linux.sh --libiio`).
pub fn linux_image(
    explicit: Option<(&Path, &Path)>,
    libiio: bool,
) -> Result<GuestImage, ToolError> {
    if let Some((kernel, initrd)) = explicit {
        return Ok(GuestImage::Linux {
            kernel: existing(kernel)?,
            initrd: existing(initrd)?,
        });
    }
    eprintln!("vdaq: building the Linux guest image if needed (images/build-linux.sh)…");
    let mut lines = run_lines(
        "building the Linux guest image",
        &source_tree()?.join("images/build-linux.sh"),
        if libiio { &["--libiio"] } else { &[] },
    )?;
    let initrd = lines.pop().unwrap_or_default();
    let kernel = lines.pop().unwrap_or_default();
    Ok(GuestImage::Linux {
        kernel: existing(Path::new(&kernel))?,
        initrd: existing(Path::new(&initrd))?,
    })
}

/// QEMU: `explicit` if given, else what `ci/provision-qemu.sh` finds or provisions.
pub fn qemu(explicit: Option<&Path>) -> Result<PathBuf, ToolError> {
    if let Some(path) = explicit {
        return existing(path);
    }
    let path = run_last_line(
        "finding or provisioning QEMU >= 10.2",
        &source_tree()?.join("ci/provision-qemu.sh"),
        &[],
    )?;
    existing(Path::new(&path))
}

/// Everything a run needs, located.
#[derive(Clone, Debug)]
pub struct Tools {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Backend binary.
    pub backend: PathBuf,
    /// Guest image.
    pub guest: GuestImage,
}

impl Tools {
    /// Each of QEMU, backend and guest image (in this order): the explicit path if given,
    /// else found, built or provisioned as [`qemu`], [`backend`], [`guest_image`] and
    /// [`linux_image`] do.
    pub fn find(
        qemu: Option<&Path>,
        backend: Option<&Path>,
        guest: GuestKind,
        image: Option<&Path>,
        linux: Option<(&Path, &Path)>,
        libiio: bool,
    ) -> Result<Self, ToolError> {
        Ok(Tools {
            qemu: self::qemu(qemu)?,
            backend: self::backend(backend)?,
            guest: match guest {
                GuestKind::BareMetal => GuestImage::BareMetal(guest_image(image)?),
                GuestKind::Linux => linux_image(linux, libiio)?,
            },
        })
    }
}

fn existing(path: &Path) -> Result<PathBuf, ToolError> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(ToolError::Missing(path.to_path_buf()))
    }
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 50 ms (x86_64 only).
///
/// A Linux guest on microvm (no HPET, no PM timer) calibrates its TSC against the PIT, which
/// under TCG on a busy host fails about every other boot and hangs it; under TCG and KVM the
/// guest's TSC runs at the host's rate, so passing this as `tsc_early_khz=` skips the
/// calibration.
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::time::{Duration, Instant};
        /// A (clock, TSC) pair read as close together as the host allows: the TSC is read
        /// between two clock reads, and of several tries the tightest bracket is kept, so a
        /// preemption cannot skew the rate.
        fn sample(epoch: Instant) -> (u128, u64) {
            let mut best = (u128::MAX, 0u128, 0u64);
            for _ in 0..5 {
                let before = epoch.elapsed().as_nanos();
                // SAFETY: RDTSC reads the time-stamp counter; it has no memory effects.
                let tsc = unsafe { core::arch::x86_64::_rdtsc() };
                let after = epoch.elapsed().as_nanos();
                if after - before < best.0 {
                    best = (after - before, (before + after) / 2, tsc);
                }
            }
            (best.1, best.2)
        }
        let epoch = Instant::now();
        let (ns_start, tsc_start) = sample(epoch);
        std::thread::sleep(Duration::from_millis(50));
        let (ns_end, tsc_end) = sample(epoch);
        let ns = u64::try_from(ns_end.saturating_sub(ns_start)).unwrap_or(0);
        (ns > 0 && tsc_end > tsc_start).then(|| (tsc_end - tsc_start) * 1_000_000 / ns)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// What kind of KVM this machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kvm {
    /// No usable /dev/kvm.
    Absent,
    /// Software-nested KVM (kvm_pvm): works but is far slower than TCG.
    SoftwareNested,
    /// Hardware-backed KVM.
    Hardware,
}

/// Probes /dev/kvm.
pub fn kvm() -> Kvm {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        Kvm::Absent
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        Kvm::SoftwareNested
    } else {
        Kvm::Hardware
    }
}
