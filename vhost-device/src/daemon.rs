//! Sockets and connections: one device per socket; each connection gets a freshly reset
//! device, and the daemon keeps listening after a frontend disconnects (or misbehaves), so a
//! rebooted or restarted VM finds it again.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::thread;

use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BackendError, DaqBackend, DeviceOptions, TIMER_EVENT};
use crate::cli::{DaemonConfig, Endpoint};
use crate::control::DeviceSlot;

/// Why the daemon stopped (connection errors are not among them: those are logged).
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: vhost::vhost_user::Error,
    },
    /// `--fd` does not name a listening Unix socket.
    #[error("--fd {fd}: {reason}")]
    BadFd {
        /// The fd number.
        fd: i32,
        /// What is wrong with it.
        reason: String,
    },
    /// Device setup failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The vhost-user daemon could not be set up.
    #[error("vhost-user daemon setup failed: {0}")]
    Daemon(vhost_user_backend::Error),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(crate::control::ControlError),
    /// The sandbox could not be entered.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// A device thread panicked (a bug).
    #[error("device thread for {0} panicked")]
    ThreadPanic(String),
}

/// Serves every configured socket until the process is stopped.
///
/// Once its sockets are bound and its files open, the daemon enters the sandbox
/// ([`crate::sandbox`]) before it takes the first connection.
pub fn serve(config: DaemonConfig) -> Result<(), DaemonError> {
    let seccomp = config.seccomp;
    match config.endpoint {
        Endpoint::Connect(path) => {
            remove_sockets_on_termination(config.control_sockets.clone());
            let slot = control_slot(config.control_sockets.first(), config.control_limits)?;
            crate::sandbox::enter(seccomp, true)?;
            let name = path.display().to_string();
            serve_connections(Connections::Connect(path), name, config.device, slot)
        }
        Endpoint::Fd(fd) => {
            remove_sockets_on_termination(config.control_sockets.clone());
            let listener = inherited_listener(fd)?;
            let slot = control_slot(config.control_sockets.first(), config.control_limits)?;
            crate::sandbox::enter(seccomp, false)?;
            serve_listener(Listener::from(listener), "fd".into(), config.device, slot)
        }
        Endpoint::Paths(paths) => {
            let mut owned = paths.clone();
            owned.extend(config.control_sockets.iter().cloned());
            remove_sockets_on_termination(owned);
            // Bind every socket before serving any, so a bad path fails the daemon at once
            // and the sandbox is entered with all of them open.
            let mut listeners = Vec::new();
            for (index, path) in paths.into_iter().enumerate() {
                let slot = control_slot(config.control_sockets.get(index), config.control_limits)?;
                let listener =
                    Listener::new(&path, true).map_err(|source| DaemonError::Listen {
                        path: path.clone(),
                        source,
                    })?;
                info!("listening on {}", path.display());
                listeners.push((path, listener, slot));
            }
            crate::sandbox::enter(seccomp, false)?;
            let mut threads = Vec::new();
            for (path, listener, slot) in listeners {
                let device = config.device.clone();
                let name = path.display().to_string();
                threads.push((
                    name.clone(),
                    thread::Builder::new()
                        .name(format!("vdaq {name}"))
                        .spawn(move || serve_listener(listener, name, device, slot))
                        .map_err(|err| {
                            DaemonError::Backend(BackendError::Fd {
                                what: "device thread",
                                source: err,
                            })
                        })?,
                ));
            }
            for (name, thread) in threads {
                thread
                    .join()
                    .map_err(|_| DaemonError::ThreadPanic(name))??;
            }
            Ok(())
        }
    }
}

/// Where connections come from.
enum Connections {
    /// Accept them on a listening socket.
    Listen(Listener),
    /// Connect to a frontend's listening socket (`--connect`), again after every disconnect.
    Connect(PathBuf),
}

/// Serves connections forever, one at a time, each with a fresh device.
fn serve_listener(
    listener: Listener,
    name: String,
    device: DeviceOptions,
    slot: DeviceSlot,
) -> Result<(), DaemonError> {
    serve_connections(Connections::Listen(listener), name, device, slot)
}

fn serve_connections(
    mut connections: Connections,
    name: String,
    device: DeviceOptions,
    slot: DeviceSlot,
) -> Result<(), DaemonError> {
    let mut waiting_logged = false;
    loop {
        let backend = Arc::new(RwLock::new(DaqBackend::new(device.clone())?));
        if let Ok(mut current) = slot.lock() {
            *current = Some(backend.clone());
        }
        let timer_fd = backend
            .read()
            .map_err(|_| DaemonError::ThreadPanic(name.clone()))?
            .timer_fd();
        let mut daemon = VhostUserDaemon::new(
            "vhost-device-daq".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(DaemonError::Daemon)?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(timer_fd, EventSet::IN, u64::from(TIMER_EVENT))
                .map_err(|source| BackendError::Fd {
                    what: "timer registration",
                    source,
                })?;
        }
        let started = match &mut connections {
            Connections::Listen(listener) => daemon.start(listener),
            Connections::Connect(path) => daemon.start_client(&path.to_string_lossy()),
        };
        if let Err(err) = started {
            // Accept failed (e.g. the peer vanished during the handshake), or the frontend
            // is not listening (yet): try again, without spinning.
            match &connections {
                Connections::Listen(_) => warn!("{name}: accepting a connection failed: {err}"),
                Connections::Connect(path) if !waiting_logged => {
                    info!(
                        "{name}: waiting for a frontend at {}: {err}",
                        path.display()
                    );
                    waiting_logged = true;
                }
                Connections::Connect(_) => {}
            }
            stop_workers(&backend);
            thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        waiting_logged = false;
        info!("{name}: frontend connected");
        if let (Some(handle), Ok(mut device)) = (daemon.shutdown_handle(), backend.write()) {
            device.set_connection(handle);
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("{name}: frontend disconnected; waiting for the next connection"),
            Err(err) => warn!(
                "{name}: connection ended with an error: {err}; waiting for the next connection"
            ),
        }
        stop_workers(&backend);
        if let Ok(mut device) = backend.write() {
            vhost_user_backend::VhostUserBackendMut::reset_device(&mut *device);
        };
    }
}

/// The slot a device's control socket (if any) reads the current device from.
fn control_slot(
    control_socket: Option<&PathBuf>,
    limits: crate::control::ControlLimits,
) -> Result<DeviceSlot, DaemonError> {
    let slot = DeviceSlot::default();
    if let Some(path) = control_socket {
        crate::control::serve(path, slot.clone(), limits).map_err(DaemonError::Control)?;
    }
    Ok(slot)
}

/// Ends the epoll worker threads of a finished connection.
fn stop_workers(backend: &Arc<RwLock<DaqBackend>>) {
    match backend.read() {
        Ok(backend) => {
            if let Some((_, notifier)) =
                vhost_user_backend::VhostUserBackendMut::exit_event(&*backend, 0)
            {
                if let Err(err) = notifier.notify() {
                    error!("cannot stop the device worker thread: {err}");
                }
            }
        }
        Err(_) => error!("device state poisoned; worker thread left running"),
    }
}

/// Takes ownership of an inherited fd after checking it is a listening socket.
fn inherited_listener(fd: i32) -> Result<UnixListener, DaemonError> {
    let bad = |reason: &str| DaemonError::BadFd {
        fd,
        reason: reason.to_string(),
    };
    // SAFETY: F_GETFD only queries the fd's flags; it fails with EBADF if fd is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(
            "not an open file descriptor; pass the inherited socket's number",
        ));
    }
    let mut listening: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the out-pointers refer to live locals of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(bad("not a socket; pass a listening Unix socket"));
    }
    if listening == 0 {
        return Err(bad(
            "is a connected socket; this backend needs a listening Unix socket \
             (use --socket-path, or pass a socket in listen state)",
        ));
    }
    // SAFETY: the fd is open (checked above) and, by the backend-program convention, handed
    // to this process to own; nothing else in the process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}

/// On SIGINT/SIGTERM, remove the sockets this daemon created and exit.
fn remove_sockets_on_termination(paths: Vec<PathBuf>) {
    let result = ctrlc::set_handler(move || {
        for path in &paths {
            remove_socket(path);
        }
        std::process::exit(0);
    });
    if let Err(err) = result {
        warn!("cannot install the termination handler: {err}");
    }
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => warn!("cannot remove {}: {err}", path.display()),
    }
}
