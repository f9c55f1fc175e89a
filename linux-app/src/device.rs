//! `/dev/vdaqN`: opening the card and its control ioctls.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vdaq_wire::control::{FlushReply, Status};
use vdaq_wire::event::Event;

use crate::uapi::{self, Events, Info, Stats};

/// An open vdaq character device.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    /// Opens `path` for reading.
    pub fn open(path: &str) -> io::Result<Self> {
        let c_path =
            CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call; open touches no
        // other memory of ours.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Device { fd })
    }

    /// The raw descriptor (for io_uring submissions).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Closes the descriptor now (reads still in flight keep the file alive in the kernel).
    pub fn close(self) {
        drop(self.fd);
    }

    /// An ioctl without argument.
    fn command(&self, request: u32) -> io::Result<()> {
        // SAFETY: a `_IO` request takes no argument; the kernel reads or writes none of our
        // memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as libc::Ioctl) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// An `_IOR` ioctl: the kernel fills a `T`.
    fn read_record<T: Copy>(&self, request: u32) -> io::Result<T> {
        let mut record = MaybeUninit::<T>::zeroed();
        // SAFETY: the request's size field is `size_of::<T>()` (uapi.rs, checked against the C
        // header by its test), so the kernel writes at most that many bytes into `record`.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                request as libc::Ioctl,
                record.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised, then filled by the kernel; every `T` used here is plain
        // integers and byte arrays, for which any bit pattern is valid.
        Ok(unsafe { record.assume_init() })
    }

    /// Identity, negotiated features and the configuration space.
    pub fn info(&self) -> io::Result<Info> {
        self.read_record(uapi::GET_CONFIG)
    }

    /// START.
    pub fn start(&self) -> io::Result<()> {
        self.command(uapi::START)
    }

    /// STOP.
    pub fn stop(&self) -> io::Result<()> {
        self.command(uapi::STOP)
    }

    /// GET_STATUS.
    pub fn status(&self) -> io::Result<Status> {
        self.read_record(uapi::STATUS)
    }

    /// FLUSH: the device returns every held read now.
    pub fn flush(&self) -> io::Result<FlushReply> {
        self.read_record(uapi::FLUSH)
    }

    /// The driver's counters.
    pub fn stats(&self) -> io::Result<Stats> {
        self.read_record(uapi::GET_STATS)
    }

    /// Takes the queued event records.
    pub fn events(&self) -> io::Result<Vec<Event>> {
        let mut all = Vec::new();
        loop {
            let batch: Events = self.read_record(uapi::READ_EVENTS)?;
            if batch.dropped > 0 {
                println!(
                    "vdaq-app: the driver's event ring dropped {} records",
                    batch.dropped
                );
            }
            let count = (batch.count as usize).min(uapi::EVENTS_MAX);
            all.extend_from_slice(&batch.events[..count]);
            if count < uapi::EVENTS_MAX {
                return Ok(all);
            }
        }
    }
}
