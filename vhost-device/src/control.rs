//! Runtime control: a Unix socket speaking line-delimited JSON, to read statistics, adjust
//! delivery parameters and inject any scenario action while the device streams; and the
//! client behind `vhost-device-daq ctl`.
//!
//! Requests (one JSON object per line) and replies (one per request):
//! - `{"cmd":"stats"}` → `{"ok":true,"state":…,"settings":{…},"counters":{…}}`
//! - `{"cmd":"inject","action":"drop_interrupts","count":5}` (the scenario actions and their
//!   parameters: `count`, `duration_ms`, `code`) → `{"ok":true}`
//! - `{"cmd":"set","latency_us":2000,"coalesce_buffers":8,"watermark_frames":512}` (any
//!   subset; parameters that do not change the samples) → `{"ok":true,"settings":{…}}`
//!
//! Malformed or failing requests get `{"ok":false,"error":"…"}`; the connection stays open.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use log::{info, warn};
use serde_json::{json, Value};
use thiserror::Error;

use crate::backend::DaqBackend;
use crate::model::scenario::{Action, ActionFields};

/// The device a control socket talks to: replaced on every new vhost-user connection.
pub type DeviceSlot = Arc<Mutex<Option<Arc<RwLock<DaqBackend>>>>>;

/// Longest request line accepted (also the most a client's line can make this process buffer).
const MAX_REQUEST: usize = 64 * 1024;

/// Bounds on the control socket's clients, so that a flood of them, or clients that connect
/// and never speak, cannot take threads and memory from the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlLimits {
    /// Clients served at once; one more is answered with an error line and closed.
    pub max_clients: usize,
    /// A client that sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_clients: 8,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts a served client while it lives.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Control-socket errors (setup and client side).
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket could not be created or reached.
    #[error("control socket {path}: {source}")]
    Socket {
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Serves the control socket at `path` for the device in `slot`, in a background thread,
/// within `limits`.
pub fn serve(path: &Path, slot: DeviceSlot, limits: ControlLimits) -> Result<(), ControlError> {
    let socket_error = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => {
            return Err(socket_error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; pick another path",
            )))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(socket_error(err)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    info!("control socket on {}", path.display());
    thread::Builder::new()
        .name("vdaq control".into())
        .spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                match stream {
                    Ok(mut stream) => {
                        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_clients {
                            active.fetch_sub(1, Ordering::AcqRel);
                            let refusal = error(format!(
                                "{} control clients are connected already; close one and retry",
                                limits.max_clients
                            ));
                            let _ = writeln!(stream, "{refusal}");
                            continue;
                        }
                        let client = ClientSlot(active.clone());
                        let slot = slot.clone();
                        let spawned = thread::Builder::new()
                            .name("vdaq control client".into())
                            .spawn(move || {
                                serve_client(stream, &slot, limits.idle_timeout);
                                drop(client);
                            });
                        if let Err(err) = spawned {
                            warn!("control socket: cannot serve a client: {err}");
                        }
                    }
                    Err(err) => warn!("control socket: accept failed: {err}"),
                }
            }
        })
        .map_err(socket_error)?;
    Ok(())
}

fn serve_client(stream: UnixStream, slot: &DeviceSlot, idle_timeout: Duration) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let reply = match next_line(&mut reader, idle_timeout) {
            Line::Request(line) if line.trim().is_empty() => continue,
            Line::Request(line) => handle(line.trim(), slot),
            Line::TooLong => error(format!("request longer than {MAX_REQUEST} bytes")),
            Line::Idle => {
                let _ = writeln!(
                    writer,
                    "{}",
                    error(format!("idle for {idle_timeout:?}; closing"))
                );
                return;
            }
            Line::End => return,
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// What a client sent next.
enum Line {
    /// A line of at most [`MAX_REQUEST`] bytes (newline not included).
    Request(String),
    /// A longer line, skipped unread.
    TooLong,
    /// Nothing arrived for the idle timeout (also in the middle of a line).
    Idle,
    /// The client closed, or the connection failed.
    End,
}

/// Reads the next line, buffering at most [`MAX_REQUEST`] bytes of it, and waiting at most
/// `idle_timeout` for each piece: a client cannot hold its place by sending a line that never
/// ends.
fn next_line(reader: &mut BufReader<UnixStream>, idle_timeout: Duration) -> Line {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        if reader.buffer().is_empty() && !readable_within(reader.get_ref(), idle_timeout) {
            return Line::Idle;
        }
        let (used, done) = match reader.fill_buf() {
            Ok([]) | Err(_) => return Line::End,
            Ok(bytes) => {
                let (piece, done) = match bytes.iter().position(|&b| b == b'\n') {
                    Some(at) => (&bytes[..at], true),
                    None => (bytes, false),
                };
                if !too_long && line.len() + piece.len() <= MAX_REQUEST {
                    line.extend_from_slice(piece);
                } else {
                    too_long = true;
                    line = Vec::new();
                }
                (piece.len() + usize::from(done), done)
            }
        };
        reader.consume(used);
        if done {
            return if too_long {
                Line::TooLong
            } else {
                Line::Request(String::from_utf8_lossy(&line).into_owned())
            };
        }
    }
}

/// Whether `stream` has input (or its end) within `timeout`. poll(2) rather than a socket read
/// timeout: setsockopt is outside the sandbox's allowlist, poll is in it.
fn readable_within(stream: &UnixStream, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `fd` is one valid pollfd that lives across the call, and the count says one.
        let ready = unsafe { libc::poll(&mut fd, 1, timeout_ms) };
        match ready {
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            -1 | 0 => return false,
            _ => return true,
        }
    }
}

fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

/// Answers one request line.
pub fn handle(line: &str, slot: &DeviceSlot) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(err) => return error(format!("not JSON: {err}")),
    };
    let Some(cmd) = request.get("cmd").and_then(Value::as_str) else {
        return error("missing \"cmd\" (one of stats, inject, set)");
    };
    let device = slot.lock().ok().and_then(|current| current.clone());
    let Some(device) = device else {
        return error("no device (the backend is starting)");
    };
    let Ok(mut backend) = device.write() else {
        return error("device state unavailable");
    };
    match cmd {
        "stats" => stats(&backend),
        "inject" => {
            let field = |name: &str| request.get(name).and_then(Value::as_u64);
            let Some(name) = request.get("action").and_then(Value::as_str) else {
                return error("inject needs \"action\"");
            };
            let fields = ActionFields {
                count: field("count").map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
                duration_ms: field("duration_ms"),
                code: field("code").map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
                signal: request
                    .get("signal")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                freq_hz: request.get("freq_hz").and_then(Value::as_f64),
                amplitude: field("amplitude").map(|a| u16::try_from(a).unwrap_or(u16::MAX)),
                field: request
                    .get("field")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            match Action::from_fields(name, &fields) {
                Ok(action) => {
                    backend.inject(action);
                    json!({"ok": true})
                }
                Err(reason) => error(reason.to_string()),
            }
        }
        "set" => {
            let field = |name: &str| request.get(name).and_then(Value::as_u64);
            let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
            let to_u16 = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
            match backend.adjust(
                field("latency_us").map(to_u32),
                field("coalesce_buffers").map(to_u16),
                field("watermark_frames").map(to_u32),
            ) {
                Ok(()) => {
                    let mut reply = stats(&backend);
                    if let Some(object) = reply.as_object_mut() {
                        object.remove("counters");
                    }
                    reply
                }
                Err(reason) => error(reason.to_string()),
            }
        }
        other => error(format!(
            "unknown cmd \"{other}\" (one of stats, inject, set)"
        )),
    }
}

fn stats(backend: &DaqBackend) -> Value {
    let card = backend.card();
    let c = card.counters();
    let s = card.settings();
    json!({
        "ok": true,
        "state": format!("{:?}", card.state()),
        "settings": {
            "rate_hz": s.rate_hz,
            "channels": s.channels,
            "format": format!("{:?}", s.format),
            "signal": format!("{:?}", s.signal),
            "clock": format!("{:?}", s.clock),
            "latency_us": s.latency_us,
            "watermark_frames": s.watermark_frames,
            "coalesce_buffers": s.coalesce_buffers,
        },
        "counters": {
            "frames_produced": c.frames_produced,
            "frames_delivered": c.frames_delivered,
            "frames_dropped": c.frames_dropped,
            "frames_pending": card.frames_pending(),
            "buffers_completed": c.buffers_completed,
            "buffers_held": card.buffers_held(),
            "requests_rejected": c.requests_rejected,
            "events_lost": c.events_lost,
            "interrupts_dropped": c.interrupts_dropped,
            "buffers_corrupted": c.buffers_corrupted,
            "config_notifications": backend.config_notifications(),
        },
    })
}

/// A control socket's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The reply line (JSON), as the backend sent it.
    pub line: String,
    /// Whether the backend carried the request out (`"ok": true` in the reply).
    pub ok: bool,
}

/// Sends one request to a control socket and returns its reply.
pub fn request(socket: &Path, line: &str) -> Result<Reply, ControlError> {
    let socket_error = |source| ControlError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(socket_error)?;
    writeln!(stream, "{line}").map_err(socket_error)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(socket_error)?;
    let line = reply.trim_end().to_string();
    let ok = serde_json::from_str::<Value>(&line)
        .is_ok_and(|value| value.get("ok").and_then(Value::as_bool) == Some(true));
    Ok(Reply { line, ok })
}

/// Why `ctl` words make no request.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// No words at all.
    #[error("missing request; use e.g. `stats`, `inject stall duration_ms=100`")]
    Missing,
    /// `inject` without an action.
    #[error("inject needs an action, e.g. `inject drop_interrupts count=5`")]
    InjectNeedsAction,
    /// A parameter that is not `key=value`.
    #[error("\"{0}\" is not key=value")]
    NotKeyValue(String),
}

/// Turns `ctl` words into a request: raw JSON as is, or `stats`, `inject ACTION [k=v…]`,
/// `set k=v…`.
pub fn request_from_words(words: &[String]) -> Result<String, RequestError> {
    let Some(first) = words.first() else {
        return Err(RequestError::Missing);
    };
    if first.starts_with('{') {
        return Ok(words.join(" "));
    }
    let mut object = serde_json::Map::new();
    object.insert("cmd".into(), json!(first));
    let mut rest = &words[1..];
    if first == "inject" {
        let Some(action) = rest.first() else {
            return Err(RequestError::InjectNeedsAction);
        };
        object.insert("action".into(), json!(action));
        rest = &rest[1..];
    }
    for word in rest {
        let Some((key, value)) = word.split_once('=') else {
            return Err(RequestError::NotKeyValue(word.clone()));
        };
        let value = value
            .parse::<u64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(value));
        object.insert(key.into(), value);
    }
    Ok(Value::Object(object).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceOptions;
    use crate::model::{Limits, Settings};
    use std::time::Duration;

    fn slot() -> DeviceSlot {
        let backend = DaqBackend::new(DeviceOptions {
            settings: Settings {
                rate_hz: 1000,
                channels: 2,
                signal_freq_mhz: 1000,
                amplitude_permille: 1000,
                seed: 1,
                latency_us: 1000,
                watermark_frames: 1,
                ..Settings::default()
            },
            limits: Limits::default(),
            queue_size: 16,
            tick: Duration::from_millis(1),
            scenario: None,
            deterministic: false,
            source: None,
            record: None,
            allow_unsealed_memory: false,
            poll: Duration::ZERO,
        })
        .expect("backend");
        Arc::new(Mutex::new(Some(Arc::new(RwLock::new(backend)))))
    }

    #[test]
    fn stats_inject_and_set_work_and_bad_requests_get_errors() {
        let slot = slot();
        let stats = handle(r#"{"cmd":"stats"}"#, &slot);
        assert_eq!(stats["ok"], true);
        assert_eq!(stats["settings"]["channels"], 2);
        assert_eq!(stats["state"], "Stopped");
        let injected = handle(r#"{"cmd":"inject","action":"fault","code":3}"#, &slot);
        assert_eq!(injected["ok"], true);
        let device = slot.lock().expect("lock").clone().expect("device");
        let event = device.write().expect("lock").pop_event_for_tests();
        assert_eq!(event.map(|e| e.arg0.get()), Some(3));
        // Protocol violations are scenario actions too, with their `field`.
        let injected = handle(r#"{"cmd":"inject","action":"unknown_event"}"#, &slot);
        assert_eq!(injected["ok"], true, "{injected}");
        let event = device.write().expect("lock").pop_event_for_tests();
        assert_eq!(
            event.map(|e| e.kind.get()),
            Some(crate::model::violations::UNKNOWN_EVENT_KIND)
        );
        let injected = handle(
            r#"{"cmd":"inject","action":"bad_config","field":"channels"}"#,
            &slot,
        );
        assert_eq!(injected["ok"], true, "{injected}");
        let config = device.read().expect("lock").card().config_space();
        assert_eq!(config.channels.get(), 0, "the config space lies now");
        let refused = handle(r#"{"cmd":"inject","action":"bad_header"}"#, &slot);
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("field = frame_count")),
            "{refused}"
        );
        let set = handle(r#"{"cmd":"set","coalesce_buffers":8}"#, &slot);
        assert_eq!(set["ok"], true, "{set}");
        assert_eq!(set["settings"]["coalesce_buffers"], 8);
        for bad in [
            "not json",
            r#"{"nocmd":1}"#,
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"inject"}"#,
            r#"{"cmd":"inject","action":"stall"}"#,
            r#"{"cmd":"inject","action":"warp"}"#,
            r#"{"cmd":"set","coalesce_buffers":0}"#,
            r#"{"cmd":"set","watermark_frames":99999999}"#,
        ] {
            let reply = handle(bad, &slot);
            assert_eq!(reply["ok"], false, "{bad}");
            assert!(
                reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{bad}"
            );
        }
    }

    #[test]
    fn words_become_requests() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            request_from_words(&words(&["inject", "stall", "duration_ms=100"])).expect("ok"),
            r#"{"action":"stall","cmd":"inject","duration_ms":100}"#
        );
        assert_eq!(
            request_from_words(&words(&["stats"])).expect("ok"),
            r#"{"cmd":"stats"}"#
        );
        assert!(request_from_words(&words(&["set", "latency"])).is_err());
        assert!(request_from_words(&[]).is_err());
    }

    /// A client's line can make the server buffer at most MAX_REQUEST bytes: a longer one is
    /// skipped unread and answered with an error, and the connection goes on.
    #[test]
    fn an_oversized_request_is_refused_without_buffering_it_and_the_client_goes_on() {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        serve(&path, slot(), ControlLimits::default()).expect("serve");
        let mut client = UnixStream::connect(&path).expect("connect");
        let huge = vec![b'x'; 16 * MAX_REQUEST];
        client.write_all(&huge).expect("send");
        client.write_all(b"\n{\"cmd\":\"stats\"}\n").expect("send");
        let mut replies = BufReader::new(client);
        let mut line = String::new();
        replies.read_line(&mut line).expect("first reply");
        assert!(line.contains("longer than"), "{line}");
        line.clear();
        replies.read_line(&mut line).expect("second reply");
        assert!(line.contains("\"ok\":true"), "served after it: {line}");
    }

    #[test]
    fn the_socket_answers_line_by_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        serve(&path, slot(), ControlLimits::default()).expect("serve");
        let reply = request(&path, r#"{"cmd":"stats"}"#).expect("reply");
        let value: Value = serde_json::from_str(&reply.line).expect("JSON reply");
        assert_eq!(value["ok"], true);
        assert!(reply.ok);
        let reply = request(&path, "garbage").expect("reply");
        assert!(reply.line.contains("\"ok\":false"));
        assert!(!reply.ok);
    }
}
