//! A minimal QMP client (QEMU's JSON machine protocol over a Unix socket): enough to unplug
//! and re-plug the card while the guest runs.
//!
//! Hand-rolled because it is a handful of JSON lines over a socket: no maintained Rust QMP
//! crate fits a synchronous launcher without pulling in an async runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered with an error.
    #[error("QMP {command}: {message}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's description.
        message: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("QMP: unexpected reply {0}")]
    Protocol(String),
    /// An awaited event did not come.
    #[error("QMP: no {0} event within {1:?}")]
    Timeout(&'static str, Duration),
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` (retrying for `timeout` while QEMU starts) and
    /// enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(err) => return Err(err.into()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_string()))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}")?;
        loop {
            let reply = self.read()?;
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    message: error["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            if reply.get("event").is_some() {
                self.events.push(reply);
            }
        }
    }

    /// Waits up to `timeout` for the event `name` (or takes one already received).
    pub fn wait_event(&mut self, name: &'static str, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(at));
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(name, timeout));
            }
            match self.read() {
                Ok(event) if event.get("event").is_some() => self.events.push(event),
                Ok(_) => {}
                Err(QmpError::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(err),
            }
        }
    }
}
