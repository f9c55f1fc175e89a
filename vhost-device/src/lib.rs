//! `vhost-device-daq`: the vdaq virtual data-acquisition card as a vhost-user backend.
//!
//! - [`model`]: the card (clock, FIFO, completer, commands), free of any vhost type;
//! - [`backend`]: vrings and descriptors ⇄ model calls;
//! - [`cli`]: command-line options → device options;
//! - [`daemon`]: sockets, connections, reconnection;
//! - [`control`]: the runtime control socket (statistics, parameters, fault injection);
//! - [`plot`]: `plot`, a recording or source file drawn as a PNG waveform;
//! - [`sandbox`]: the seccomp allowlist the daemon enters once it is set up.

pub mod backend;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod model;
pub mod plot;
pub mod sandbox;
