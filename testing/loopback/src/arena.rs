//! Guest memory for the loopback frontend: one memfd, mapped shared here and handed to every
//! backend connection through SET_MEM_TABLE, plus the virtio-drivers [`Hal`] that allocates
//! rings and buffers from it.
//!
//! virtio-drivers' `Hal` has no `self` (a guest has one physical memory), so the arena is a
//! process-wide singleton; concurrent tests share it and each backend sees all of it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// Guest-physical address of the arena's first byte (not 0, so a stray null is never valid).
pub const GUEST_BASE: u64 = 0x10_0000;
/// Arena size. The memfd is sparse: untouched pages cost nothing.
pub const ARENA_SIZE: usize = 1 << 30;

/// The shared guest memory and its page allocator.
#[derive(Debug)]
pub struct Arena {
    memory: GuestMemoryMmap,
    host_base: usize,
    allocator: Mutex<PageAllocator>,
}

/// First-fit allocator of page runs, with coalescing on free.
#[derive(Debug)]
struct PageAllocator {
    /// Free runs as (first page, page count), sorted by first page.
    free: Vec<(usize, usize)>,
}

impl PageAllocator {
    fn alloc(&mut self, pages: usize) -> Option<usize> {
        let slot = self.free.iter().position(|&(_, len)| len >= pages)?;
        let (first, len) = self.free[slot];
        if len == pages {
            self.free.remove(slot);
        } else {
            self.free[slot] = (first + pages, len - pages);
        }
        Some(first)
    }

    fn release(&mut self, first: usize, pages: usize) {
        let slot = self.free.partition_point(|&(start, _)| start < first);
        self.free.insert(slot, (first, pages));
        // Merge with the neighbours so long runs stay available.
        if slot + 1 < self.free.len()
            && self.free[slot].0 + self.free[slot].1 == self.free[slot + 1].0
        {
            self.free[slot].1 += self.free[slot + 1].1;
            self.free.remove(slot + 1);
        }
        if slot > 0 && self.free[slot - 1].0 + self.free[slot - 1].1 == self.free[slot].0 {
            self.free[slot - 1].1 += self.free[slot].1;
            self.free.remove(slot);
        }
    }
}

static ARENA: OnceLock<Arena> = OnceLock::new();

/// The process-wide arena, created on first use.
pub fn arena() -> &'static Arena {
    ARENA.get_or_init(|| Arena::create().expect("cannot create the loopback guest memory"))
}

impl Arena {
    fn create() -> std::io::Result<Self> {
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"vdaq-loopback-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(ARENA_SIZE as u64)?;
        // Sealed at its size, as QEMU's memory-backend-memfd is (seal=on): the backend can
        // rely on the memory staying there.
        // SAFETY: F_ADD_SEALS with a seal mask only changes the seals of our own memfd.
        if unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(GUEST_BASE),
            ARENA_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|err| std::io::Error::other(err.to_string()))?;
        let host_base = memory
            .get_host_address(GuestAddress(GUEST_BASE))
            .map_err(|err| std::io::Error::other(err.to_string()))?
            as usize;
        Ok(Arena {
            memory,
            host_base,
            allocator: Mutex::new(PageAllocator {
                free: vec![(0, ARENA_SIZE / PAGE_SIZE)],
            }),
        })
    }

    /// The guest memory (its single region carries the memfd for SET_MEM_TABLE).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The region to announce to a backend.
    pub fn region(&self) -> &GuestRegionMmap {
        self.memory
            .find_region(GuestAddress(GUEST_BASE))
            .expect("the arena has one region")
    }

    /// Host (frontend) virtual address of guest-physical `paddr`, as vhost-user ring
    /// addresses are given.
    pub fn host_address(&self, paddr: u64) -> u64 {
        paddr - GUEST_BASE + self.host_base as u64
    }

    /// Guest-physical address of a host pointer inside the arena.
    pub fn guest_address(&self, host: usize) -> Option<u64> {
        let offset = host.checked_sub(self.host_base)?;
        (offset < ARENA_SIZE).then_some(GUEST_BASE + offset as u64)
    }

    /// Allocates `pages` zeroed pages: (guest-physical address, host pointer).
    pub fn alloc_pages(&self, pages: usize) -> Option<(u64, NonNull<u8>)> {
        let first = self.allocator.lock().ok()?.alloc(pages)?;
        let offset = first * PAGE_SIZE;
        let ptr = (self.host_base + offset) as *mut u8;
        // SAFETY: the run [offset, offset + pages × PAGE_SIZE) lies inside the mapping and was
        // just taken from the free list, so nobody else references it.
        unsafe { ptr.write_bytes(0, pages * PAGE_SIZE) };
        Some((GUEST_BASE + offset as u64, NonNull::new(ptr)?))
    }

    /// Returns pages allocated by [`Arena::alloc_pages`].
    pub fn free_pages(&self, paddr: u64, pages: usize) {
        let first = (paddr - GUEST_BASE) as usize / PAGE_SIZE;
        if let Ok(mut allocator) = self.allocator.lock() {
            allocator.release(first, pages);
        }
    }
}

/// A byte buffer in the arena, owned exclusively: the reference driver's DMA buffer over
/// the arena's HAL.
pub type DmaBuffer = vdaq_driver::DmaBuffer<ArenaHal>;

/// virtio-drivers HAL over the arena: DMA memory is arena pages, and buffers to share must
/// already live in the arena (allocate them as [`DmaBuffer`]s).
#[derive(Debug)]
pub struct ArenaHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, exclusively owned arena pages; share returns
// the guest-physical address of memory that is inside the shared arena, which the device sees
// at exactly that address.
unsafe impl Hal for ArenaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let (paddr, ptr) = arena()
            .alloc_pages(pages)
            .expect("loopback guest memory exhausted");
        (paddr as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        arena().free_pages(paddr, pages);
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the vhost-user transport has no MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let host = buffer.as_ptr().cast::<u8>() as usize;
        arena()
            .guest_address(host)
            .expect("buffers shared with the device must be allocated in the arena (DmaBuffer)")
            as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Shared memory: nothing to copy back.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_reuses_and_merges_freed_runs() {
        let mut allocator = PageAllocator {
            free: vec![(0, 10)],
        };
        let a = allocator.alloc(3).expect("a");
        let b = allocator.alloc(3).expect("b");
        assert_eq!((a, b), (0, 3));
        allocator.release(a, 3);
        allocator.release(b, 3);
        assert_eq!(allocator.free, vec![(0, 10)]);
        assert_eq!(allocator.alloc(11), None);
    }

    #[test]
    fn dma_buffers_are_visible_at_their_guest_address() {
        let mut buffer = DmaBuffer::new(100);
        buffer.as_mut_slice()[..4].copy_from_slice(b"vdaq");
        let host = buffer.as_slice().as_ptr() as usize;
        let paddr = arena().guest_address(host).expect("inside the arena");
        let mut read = [0u8; 4];
        vm_memory::Bytes::read_slice(arena().memory(), &mut read, GuestAddress(paddr))
            .expect("read back");
        assert_eq!(&read, b"vdaq");
    }
}
