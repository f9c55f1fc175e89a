//! The virtio-drivers `Hal` for the guest: DMA memory from the heap, physical = virtual
//! (the arch layer identity-maps the low 4 GiB).

use core::alloc::Layout;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The guest's HAL.
#[derive(Debug)]
pub struct GuestHal;

fn layout(pages: usize) -> Layout {
    // PAGE_SIZE is a power of two and pages × PAGE_SIZE fits the heap, so this cannot fail.
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("page layout")
}

// SAFETY: dma_alloc returns zeroed, page-aligned heap memory owned by the caller until
// dma_dealloc; all memory is identity-mapped, so a pointer's value is its physical address,
// which is what share and mmio_phys_to_virt rely on.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout(pages)) };
        let ptr = NonNull::new(ptr).expect("guest heap exhausted");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller passes back exactly what dma_alloc returned for `pages`.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
