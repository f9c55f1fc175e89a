//! Loopback harness for vdaq: an in-process vhost-user frontend that shares memfd guest
//! memory with the real backend over a real Unix socket, sets up the rings, posts buffers and
//! takes the call eventfds as interrupts.
//!
//! - [`arena`]: the shared guest memory and a virtio-drivers `Hal` over it;
//! - [`transport`]: a virtio-drivers `Transport` implemented with vhost-user messages;
//! - [`rig`]: the reference driver (`vdaq-driver`) over that transport, with its interrupt
//!   thread, and the streaming loop tests and benchmarks share;
//! - [`process`]: the backend binary as a child process.

pub mod arena;
pub mod process;
pub mod rig;
pub mod transport;

pub use arena::{ArenaHal, DmaBuffer};
pub use process::BackendProcess;
pub use rig::{DriverRig, HostWait, LoopbackDriver, Resubmit, RigError};
pub use transport::{InterruptSource, InterruptThread, VhostUserTransport};

/// The backend arguments of the loopback benchmarks (`cargo bench`, `vdaq bench`): a
/// free-running clock, 4 channels × S16 counter, every buffer notified.
pub const BENCH_BACKEND_ARGS: [&str; 8] = [
    "--clock",
    "free",
    "--channels",
    "4",
    "--format",
    "s16",
    "--coalesce",
    "1",
];
