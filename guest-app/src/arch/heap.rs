//! The `#[global_allocator]`: `linked_list_allocator`'s heap over the linker-reserved region
//! `__heap_start..__heap_end` (160 MiB, see linker.ld), behind a lock taken with interrupts
//! disabled so that interrupt handlers may allocate too. The region lies outside the ELF image
//! (neither loaded nor zeroed), and is checked against the PVH memory map at init.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};

use linked_list_allocator::Heap;
use spin::Mutex;

use super::boot::MemoryRegion;
use super::interrupts::without_interrupts;

struct LockedHeap(Mutex<Heap>);

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap(Mutex::new(Heap::empty()));

// SAFETY: allocation is delegated to `linked_list_allocator::Heap`, which upholds the
// GlobalAlloc contract; the mutex (taken with interrupts disabled on this single CPU) gives it
// exclusive access.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        without_interrupts(|| {
            self.0
                .lock()
                .allocate_first_fit(layout)
                .map_or(ptr::null_mut(), NonNull::as_ptr)
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(ptr) = NonNull::new(ptr) else {
            return;
        };
        without_interrupts(|| {
            // SAFETY: the GlobalAlloc contract: `ptr` came from `alloc` with this `layout`.
            unsafe { self.0.lock().deallocate(ptr, layout) }
        });
    }
}

extern "C" {
    static __heap_start: u8;
    static __heap_end: u8;
    static __stack_bottom: u8;
}

/// The heap region, from the linker script.
pub(super) fn region() -> (usize, usize) {
    let start = (&raw const __heap_start) as usize;
    let end = (&raw const __heap_end) as usize;
    (start, end)
}

/// Hands the heap region to the allocator after checking that stack and heap are RAM.
pub(super) fn init(memory_map: &[MemoryRegion]) {
    let (start, end) = region();
    let stack_bottom = (&raw const __stack_bottom) as u64;
    if !memory_map.is_empty() {
        let covered = memory_map
            .iter()
            .any(|r| r.is_ram() && r.addr <= stack_bottom && r.end() >= end as u64);
        assert!(
            covered,
            "stack+heap {stack_bottom:#x}..{end:#x} is not RAM: give the guest more memory (-m)"
        );
    }
    without_interrupts(|| {
        // SAFETY: start..end is reserved for the heap by the linker script, lies in RAM (checked
        // above), is identity-mapped and used by nothing else; init runs once.
        unsafe { ALLOCATOR.0.lock().init(start as *mut u8, end - start) }
    });
}
