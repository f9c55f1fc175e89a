//! Buffers the device can write: whole pages from the `Hal`'s DMA allocator.

use core::marker::PhantomData;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// A byte buffer in DMA memory, owned exclusively (like a `Box<[u8]>`).
#[derive(Debug)]
pub struct DmaBuffer<H: Hal> {
    paddr: PhysAddr,
    ptr: NonNull<u8>,
    len: usize,
    pages: usize,
    _hal: PhantomData<H>,
}

// SAFETY: the buffer owns its pages exclusively; nothing else aliases them.
unsafe impl<H: Hal> Send for DmaBuffer<H> {}

impl<H: Hal> DmaBuffer<H> {
    /// A zeroed buffer of `len` bytes (rounded up to whole pages internally).
    pub fn new(len: usize) -> Self {
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let (paddr, ptr) = H::dma_alloc(pages, BufferDirection::DeviceToDriver);
        DmaBuffer {
            paddr,
            ptr,
            len,
            pages,
            _hal: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in pages this value owns exclusively, allocated zeroed.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<H: Hal> Drop for DmaBuffer<H> {
    fn drop(&mut self) {
        // SAFETY: paddr, ptr and pages are exactly what dma_alloc returned, freed once.
        unsafe {
            H::dma_dealloc(self.paddr, self.ptr, self.pages);
        }
    }
}
