//! Loopback harness for vdaq: an in-process vhost-user frontend that shares memfd guest
//! memory with the real backend over a real Unix socket, sets up the rings, posts buffers and
//! takes the call eventfds as interrupts.
//!
//! - [`arena`]: the shared guest memory and a virtio-drivers `Hal` over it;
//! - [`transport`]: a virtio-drivers `Transport` implemented with vhost-user messages;
//! - [`daq`]: a small vdaq driver on top, for tests and benchmarks;
//! - [`process`]: the backend binary as a child process.

pub mod arena;
pub mod daq;
pub mod process;
pub mod transport;

pub use arena::{ArenaHal, DmaBuffer};
pub use daq::LoopbackDaq;
pub use process::BackendProcess;
pub use transport::{InterruptSource, InterruptThread, VhostUserTransport};
