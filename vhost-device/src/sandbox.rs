//! The seccomp sandbox the daemon enters once it is set up (listening sockets bound, files
//! read): from then on every thread, including those started later for connections, may make
//! only the system calls serving vhost-user connections needs. The allowlist was taken from
//! `strace -f` of the daemon serving QEMU and the loopback frontend (connect, stream, reset,
//! disconnect, reconnect, control socket, recording), and is kept honest by the end-to-end
//! tests, which run with the default, `kill`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// What happens to a system call outside the allowlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS): a compromised backend cannot go further.
    #[default]
    Kill,
    /// The call is logged by the kernel (audit, `dmesg`) and allowed.
    Log,
    /// No sandbox.
    None,
}

/// The sandbox could not be entered.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The filter could not be built (a bug in the allowlist).
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}; run with --seccomp none to go without")]
    Install(String),
    /// Not a supported architecture.
    #[error("no seccomp allowlist for this architecture; run with --seccomp none")]
    Architecture,
}

/// The system calls allowed without conditions.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[libc::c_long] = &[
    // I/O on the sockets, eventfds, timerfd, epoll, the recording and the log.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // Connections: accepting and ending them (`--connect` adds socket and connect).
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    // Guest memory (SET_MEM_TABLE maps, a reset unmaps) and the heap.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads of each connection (vhost-user-backend's) and their synchronisation.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Time and randomness (hash maps are seeded).
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // A sleep, timed wait or poll interrupted by SIGSTOP/SIGCONT (a paused container, a
    // debugger attaching) resumes through this one.
    libc::SYS_restart_syscall,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    // Removing the sockets at SIGINT/SIGTERM.
    libc::SYS_unlink,
];

/// How many system calls the sandbox allows; `connects`: the daemon dials its frontend
/// (`--connect`), which adds `connect` and `socket` (AF_UNIX only).
pub fn allowlist_size(connects: bool) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        ALLOWED.len() + if connects { 2 } else { 0 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = connects;
        0
    }
}

/// The compiled filter for `mode` (`None` for [`SeccompMode::None`]); `connects` as for
/// [`allowlist_size`]. Only a daemon that dials its frontend may open sockets at all: a
/// compromised one could otherwise reach any Unix socket the process can (a container
/// runtime's, a QMP monitor).
pub fn filter(mode: SeccompMode, connects: bool) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        // Trap, not kill outright: the SIGSYS handler names the call, then ends the process.
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let build = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
        if connects {
            // New sockets only of the Unix family: --connect dials the frontend again after
            // every disconnect.
            let unix_only = SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )
            .map_err(build)?])
            .map_err(build)?;
            rules.insert(libc::SYS_socket, vec![unix_only]);
            rules.insert(libc::SYS_connect, Vec::new());
        }
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(build)?;
        BpfProgram::try_from(filter)
            .map(Some)
            .map_err(|e| SandboxError::Build(e.to_string()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mismatch, connects);
        Err(SandboxError::Architecture)
    }
}

/// The SIGSYS handler of `kill` mode: says which system call was stopped (so a missing
/// allowlist entry is found from the log), then ends the process as SIGSYS would.
extern "C" fn forbidden_call(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    /// Offset of `si_syscall` in a SIGSYS siginfo on Linux/x86_64 (after si_signo, si_errno,
    /// si_code, padding and si_call_addr): the libc crate has no accessor for it.
    const SI_SYSCALL: usize = 24;
    let mut line = *b"vhost-device-daq: sandbox: forbidden system call          \n";
    let field = info.cast::<u8>().wrapping_add(SI_SYSCALL).cast::<i32>();
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (128 bytes); the 4 bytes at
    // offset 24 are inside it.
    let number = unsafe { field.read_unaligned() };
    // Decimal digits without allocating (only async-signal-safe work here).
    let mut value = number.unsigned_abs();
    let mut end = line.len() - 2;
    loop {
        line[end] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || end == 49 {
            break;
        }
        end -= 1;
    }
    // SAFETY: write(2) is async-signal-safe and in the allowlist; the buffer is a live local.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    // SAFETY: _exit(2) is async-signal-safe; nothing may run after a forbidden call.
    unsafe { libc::_exit(128 + libc::SIGSYS) }
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask, default handler).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = forbidden_call as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGSYS only, from a fully initialised action.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SandboxError::Install(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

/// glibc's malloc works out its arena limit from the CPU count the first time a thread needs
/// a new arena past the eighth, by opening /sys/devices/system/cpu/online: under the filter
/// that open would end the process (seen with a ninth allocating thread). Setting the limit
/// now, to glibc's own default (8 per CPU), keeps malloc from ever looking.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a malloc tunable; M_ARENA_MAX takes any positive count.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } == 0 {
            log::warn!(
                "sandbox: cannot set malloc's arena limit; many threads may trip the filter"
            );
        }
    }
}

/// Enters the sandbox: every thread of the process, now and later, is filtered.
pub fn enter(mode: SeccompMode, connects: bool) -> Result<(), SandboxError> {
    if mode == SeccompMode::Kill {
        install_sigsys_handler()?;
    }
    if let Some(program) = filter(mode, connects)? {
        fix_malloc_arena_limit();
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
        log::info!(
            "sandbox: seccomp allowlist of {} system calls, others {}",
            allowlist_size(connects),
            match mode {
                SeccompMode::Kill => "kill the process",
                _ => "are logged",
            }
        );
    }
    Ok(())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Runs `body` in a forked child that entered the sandbox; the child's wait status.
    fn in_sandboxed_child(mode: SeccompMode, connects: bool, body: fn() -> i32) -> libc::c_int {
        let program = filter(mode, connects).expect("filter").expect("a program");
        // SAFETY: the child only installs the prepared filter, makes raw system calls and
        // exits with _exit: nothing that needs the parent's other threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = match seccompiler::apply_filter(&program) {
                Ok(()) => body(),
                Err(_) => 100,
            };
            // SAFETY: _exit ends the child at once, without running the parent's handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; status is a live local.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        status
    }

    /// A system call the backend never needs: creating a directory.
    fn forbidden_call() -> i32 {
        // SAFETY: mkdirat of "/" only fails (EEXIST), or is stopped by the filter first.
        let rc = unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
        if rc < 0 {
            7 // ran, and failed as mkdir of / does
        } else {
            8
        }
    }

    fn unix_socket() -> i32 {
        // SAFETY: socket() only creates a socket (closed at once), or is stopped.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return 9;
        }
        // SAFETY: fd was just returned by socket().
        unsafe { libc::close(fd) };
        0
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket() only creates a socket (closed at once), or is stopped.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: fd was just returned by socket().
            unsafe { libc::close(fd) };
        }
        0
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn kill_mode_stops_a_forbidden_system_call_with_sigsys() {
        let status = in_sandboxed_child(SeccompMode::Kill, true, forbidden_call);
        assert!(killed_by_sigsys(status), "status {status:#x}");
        let status = in_sandboxed_child(SeccompMode::Kill, true, inet_socket);
        assert!(killed_by_sigsys(status), "no AF_INET socket");
        let status = in_sandboxed_child(SeccompMode::Kill, false, unix_socket);
        assert!(
            killed_by_sigsys(status),
            "without --connect no socket at all"
        );
    }

    #[test]
    fn allowed_calls_pass_and_log_mode_lets_the_forbidden_one_through() {
        let status = in_sandboxed_child(SeccompMode::Kill, true, unix_socket);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
        let status = in_sandboxed_child(SeccompMode::Log, false, forbidden_call);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            7,
            "the call ran (and failed: / exists)"
        );
    }

    #[test]
    fn kill_mode_names_the_call_and_exits_with_sigsys_status() {
        let status = in_sandboxed_child(SeccompMode::Kill, false, || {
            if install_sigsys_handler().is_err() {
                return 101;
            }
            forbidden_call_nr()
        });
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS);
    }

    fn forbidden_call_nr() -> i32 {
        // SAFETY: as in forbidden_call.
        unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
        0
    }

    #[test]
    fn none_mode_builds_no_filter_and_the_allowlist_has_no_duplicates() {
        assert!(filter(SeccompMode::None, true).expect("ok").is_none());
        let unique: std::collections::BTreeSet<_> = ALLOWED.iter().collect();
        assert_eq!(unique.len(), ALLOWED.len());
        for dial in [libc::SYS_socket, libc::SYS_connect] {
            assert!(!ALLOWED.contains(&dial), "only with --connect");
        }
        assert_eq!(allowlist_size(false), 59, "README states the sizes");
        assert_eq!(allowlist_size(true), 61);
    }
}
