//! `--record`: every delivered buffer, exactly as the driver got it, appended to a file.

use std::io;

use log::warn;
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE};
use vdaq_wire::zerocopy::FromBytes;
use vm_memory::GuestAddressSpace;

use super::chain::{read_segments, GuestBuffer};

/// Appends delivered buffers (header and payload, exactly as the driver got them) to a
/// recording file: `VDAQREC1` then the buffers back to back (`model::source` reads it).
pub struct Recorder {
    file: std::io::BufWriter<std::fs::File>,
    scratch: Vec<u8>,
    failed: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens (or creates) the recording at `path` for appending, with the magic written if
    /// the file is new. Done once at start-up: the sandbox lets no file be opened later.
    pub fn open_file(path: &std::path::Path) -> io::Result<std::fs::File> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            file.write_all(crate::model::source::RECORDING_MAGIC)?;
        }
        Ok(file)
    }

    /// A recorder appending to `file` (from [`Recorder::open_file`]; each connection gets its
    /// own descriptor of it).
    pub(super) fn new(file: &std::fs::File) -> io::Result<Self> {
        let file = file.try_clone()?;
        Ok(Recorder {
            file: std::io::BufWriter::new(file),
            scratch: Vec::new(),
            failed: false,
        })
    }

    pub(super) fn record(&mut self, buffer: &GuestBuffer, used: usize) {
        use std::io::Write;
        /// Bytes copied per step: the buffer is streamed to the file, never held whole.
        const CHUNK: usize = 64 * 1024;
        if self.failed || used < HEADER_SIZE {
            return;
        }
        let mem = buffer.mem.memory();
        let mut header = [0u8; HEADER_SIZE];
        let delivered = read_segments(&mem, &buffer.writable, 0, &mut header).is_ok()
            && BufferHeader::read_from_bytes(&header)
                .is_ok_and(|header| header.status == vdaq_wire::buffer::status::OK);
        if !delivered {
            // Only buffers with status OK: rejected ones carry nothing to replay.
            return;
        }
        self.scratch.resize(CHUNK, 0);
        let mut offset = 0;
        while offset < used {
            let n = CHUNK.min(used - offset);
            let chunk = &mut self.scratch[..n];
            if read_segments(&mem, &buffer.writable, offset, chunk).is_err() {
                return;
            }
            if let Err(err) = self.file.write_all(chunk) {
                warn!("recording stopped: {err}");
                self.failed = true;
                return;
            }
            offset += n;
        }
    }
}

impl Recorder {
    pub(super) fn flush(&mut self) {
        use std::io::Write;
        if let Err(err) = self.file.flush() {
            warn!("recording: {err}");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}
