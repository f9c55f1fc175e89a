//! The read buffers: one anonymous mapping cut into page-aligned buffers, on transparent huge
//! pages where the kernel gives them. A buffer inside one 2 MiB page is physically contiguous,
//! so the driver pins one folio per read and hands the device a single segment instead of a
//! descriptor per 4 KiB page (what DAQ applications do with their DMA buffers on real cards).

use std::io;
use std::ptr::NonNull;

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// `count` buffers of `len` bytes each, every one starting on a page boundary.
pub struct BufferPool {
    /// Start of the whole mapping (what `munmap` takes).
    mapping: NonNull<u8>,
    mapping_len: usize,
    /// First buffer: `mapping` rounded up to a huge page.
    first: NonNull<u8>,
    stride: usize,
    len: usize,
    count: usize,
    leaked: bool,
}

impl BufferPool {
    pub fn new(count: usize, len: usize) -> io::Result<Self> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        if count == 0 || len == 0 {
            return Err(invalid());
        }
        let stride = len.checked_next_multiple_of(PAGE).ok_or_else(invalid)?;
        let total = stride.checked_mul(count).ok_or_else(invalid)?;
        // One huge page more than needed, so the buffers can start on a huge-page boundary.
        let mapping_len = total.checked_add(HUGE_PAGE).ok_or_else(invalid)?;
        // SAFETY: a fresh private anonymous mapping: no existing memory is affected.
        let mapping = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapping_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapping == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mapping = NonNull::new(mapping.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        let offset =
            (mapping.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - mapping.as_ptr() as usize;
        // SAFETY: `offset < HUGE_PAGE`, so `first .. first + total` lies inside the mapping.
        let first = unsafe { mapping.add(offset) };
        // SAFETY: advice on a range of our own mapping. Without THP (or with it disabled) the
        // call fails and the buffers stay on 4 KiB pages: slower, still correct.
        unsafe { libc::madvise(first.as_ptr().cast(), total, libc::MADV_HUGEPAGE) };
        // SAFETY: as above. This faults every page in now (as a DAQ application prefaults its
        // DMA buffers), so no read pays for it while streaming; where the advice is unknown
        // (before Linux 5.14) the driver's pinning faults them in instead.
        unsafe { libc::madvise(first.as_ptr().cast(), total, libc::MADV_POPULATE_WRITE) };
        Ok(BufferPool {
            mapping,
            mapping_len,
            first,
            stride,
            len,
            count,
            leaked: false,
        })
    }

    /// How much of the process's anonymous memory sits on transparent huge pages, in KiB
    /// (`/proc/self/smaps_rollup`), for the start-up line: the buffers are most of it.
    pub fn huge_page_kib() -> Option<u64> {
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Bytes per buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Start of buffer `index` (`index < count`), for the kernel to write.
    pub fn ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.count, "buffer {index} of {}", self.count);
        // SAFETY: `index < count`, so the offset stays inside the mapping (see `new`).
        unsafe { self.first.add(index * self.stride).as_ptr() }
    }

    /// Every buffer as an iovec, in index order: what io_uring registers for READ_FIXED.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|index| libc::iovec {
                iov_base: self.ptr(index).cast(),
                iov_len: self.len,
            })
            .collect()
    }

    /// The bytes of buffer `index`. Callers hold no read in flight on it (the kernel writes it
    /// then): `Reader` calls this only for buffers whose completion it has taken.
    pub fn slice(&self, index: usize) -> &[u8] {
        // SAFETY: `ptr` checks the index; the mapping holds `len` initialised bytes there
        // (zero-filled by mmap, then written by the kernel), and no read is in flight on them
        // (the caller's contract above), so nothing writes them while borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr(index), self.len) }
    }

    /// Keeps the mapping for the rest of the process: reads still in flight may write it.
    pub fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: the mapping made in `new`, unmapped once; no read is in flight on it
            // (otherwise `leak` was called).
            unsafe {
                libc::munmap(self.mapping.as_ptr().cast(), self.mapping_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_disjoint_and_zeroed() {
        let pool = BufferPool::new(3, 5000).expect("mapped");
        assert_eq!(pool.len(), 5000);
        assert_eq!(pool.ptr(0) as usize % HUGE_PAGE, 0);
        for i in 0..3 {
            assert_eq!(pool.ptr(i) as usize % PAGE, 0);
            assert!(pool.slice(i).iter().all(|&b| b == 0));
        }
        assert!(pool.ptr(1) as usize >= pool.ptr(0) as usize + 5000);
        let iovecs = pool.iovecs();
        assert_eq!(iovecs.len(), 3);
        assert_eq!(iovecs[2].iov_base.cast::<u8>(), pool.ptr(2));
        assert_eq!(iovecs[2].iov_len, 5000);
        assert!(BufferPool::new(0, 4096).is_err());
        assert!(BufferPool::new(usize::MAX / 2, 4096).is_err());
    }

    #[test]
    #[should_panic(expected = "buffer 3 of 3")]
    fn an_index_past_the_pool_is_refused() {
        let _ = BufferPool::new(3, 4096).expect("mapped").ptr(3);
    }
}
