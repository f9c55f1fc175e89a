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
    // Connections: accepting, connecting (--connect), ending them.
    libc::SYS_accept4,
    libc::SYS_connect,
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
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    // Removing the sockets at SIGINT/SIGTERM.
    libc::SYS_unlink,
];

/// How many system calls the sandbox allows (`socket` counts once, for AF_UNIX only).
pub fn allowlist_size() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        ALLOWED.len() + 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// The compiled filter for `mode` (`None` for [`SeccompMode::None`]).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    #[cfg(target_arch = "x86_64")]
    {
        let build = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
        // New sockets only of the Unix family (--connect dials the frontend's socket again).
        let unix_only = SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(build)?])
        .map_err(build)?;
        rules.insert(libc::SYS_socket, vec![unix_only]);
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(build)?;
        BpfProgram::try_from(filter)
            .map(Some)
            .map_err(|e| SandboxError::Build(e.to_string()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = mismatch;
        Err(SandboxError::Architecture)
    }
}

/// Enters the sandbox: every thread of the process, now and later, is filtered.
pub fn enter(mode: SeccompMode) -> Result<(), SandboxError> {
    if let Some(program) = filter(mode)? {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
        log::info!(
            "sandbox: seccomp allowlist of {} system calls, others {}",
            allowlist_size(),
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

    /// Runs `body` in a forked child that entered the sandbox in `mode`; the child's wait status.
    fn in_sandboxed_child(mode: SeccompMode, body: fn() -> i32) -> libc::c_int {
        let program = filter(mode).expect("filter").expect("a program");
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
        // SAFETY: mkdirat with an invalid path pointer would fail with EFAULT; the filter acts
        // before the kernel looks at the arguments.
        let rc = unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
        if rc < 0 {
            7 // ran, and failed as mkdir of / does (EEXIST)
        } else {
            8
        }
    }

    fn allowed_calls() -> i32 {
        // SAFETY: getpid and an AF_UNIX socket are in the allowlist; the socket is closed.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return 9;
        }
        // SAFETY: fd was just returned by socket().
        unsafe { libc::close(fd) };
        0
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket() with these arguments only creates a socket, or is stopped.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: fd was just returned by socket().
            unsafe { libc::close(fd) };
        }
        0
    }

    #[test]
    fn kill_mode_stops_a_forbidden_system_call_with_sigsys() {
        let status = in_sandboxed_child(SeccompMode::Kill, forbidden_call);
        assert!(libc::WIFSIGNALED(status), "killed, status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = in_sandboxed_child(SeccompMode::Kill, inet_socket);
        assert!(
            libc::WIFSIGNALED(status),
            "an AF_INET socket is not allowed"
        );
    }

    #[test]
    fn allowed_calls_pass_and_log_mode_lets_the_forbidden_one_through() {
        let status = in_sandboxed_child(SeccompMode::Kill, allowed_calls);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
        let status = in_sandboxed_child(SeccompMode::Log, forbidden_call);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            7,
            "the call ran (and failed: / exists)"
        );
    }

    #[test]
    fn none_mode_builds_no_filter_and_the_allowlist_has_no_duplicates() {
        assert!(filter(SeccompMode::None).expect("ok").is_none());
        let unique: std::collections::BTreeSet<_> = ALLOWED.iter().collect();
        assert_eq!(unique.len(), ALLOWED.len());
        assert!(
            !ALLOWED.contains(&libc::SYS_socket),
            "socket has its own rule"
        );
        assert_eq!(allowlist_size(), 60, "README states the size");
    }
}
