//! A `Hal` for unit tests: DMA memory is ordinary host heap memory and a physical address is
//! the virtual address (no IOMMU, no bounce buffers).
//!
//! Every live DMA allocation and every buffer currently shared with the device is recorded in
//! a registry. The fake device ([`super::device`]) asks the registry before it touches an
//! address the driver gave it, so a descriptor or ring that points at memory the driver never
//! allocated, has already freed, or did not share in that direction makes the test fail with a
//! message instead of corrupting the heap. That registry is also what makes the fake device's
//! raw memory accesses sound.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;

use super::std::sync::{Mutex, MutexGuard, PoisonError};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The fake HAL: `paddr == vaddr`.
#[derive(Debug)]
pub struct FakeHal;

/// One buffer shared with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Share {
    len: usize,
    device_writes: bool,
}

#[derive(Debug)]
struct Registry {
    /// Live DMA allocations: start → length in bytes.
    dma: BTreeMap<usize, usize>,
    /// Buffers shared with the device and not yet unshared: start → shares starting there.
    shared: BTreeMap<usize, Vec<Share>>,
}

/// Shared by every test thread: addresses of live allocations are unique process-wide.
static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    dma: BTreeMap::new(),
    shared: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // A test that panicked while holding the lock leaves the map consistent (every update is
    // a single insert or remove), so the other tests may go on using it.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout: whole pages")
}

/// Whether `addr..addr + len` lies inside one live DMA allocation.
pub fn is_live_dma(addr: u64, len: usize) -> bool {
    let Ok(addr) = usize::try_from(addr) else {
        return false;
    };
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let registry = registry();
    registry
        .dma
        .range(..=addr)
        .next_back()
        .is_some_and(|(&start, &size)| end <= start + size)
}

/// Panics unless `addr..addr + len` lies inside one live DMA allocation (the device's view of
/// ring memory: the virtqueue's descriptor table and rings come from `dma_alloc`).
pub fn check_dma(addr: u64, len: usize, what: &str) {
    assert!(
        is_live_dma(addr, len),
        "device access to {what} at {addr:#x}+{len} is outside live DMA memory"
    );
}

/// Panics unless `addr..addr + len` lies inside a buffer the driver shared with the device and
/// has not unshared, in the direction the access needs, and inside live DMA memory.
pub fn check_shared(addr: u64, len: usize, device_writes: bool, what: &str) {
    let start = usize::try_from(addr).expect("address fits usize");
    let end = start.checked_add(len).expect("descriptor end overflows");
    {
        let registry = registry();
        let shared = registry
            .shared
            .range(..=start)
            .rev()
            .any(|(&base, shares)| {
                shares
                    .iter()
                    .any(|share| end <= base + share.len && share.device_writes == device_writes)
            });
        assert!(
            shared,
            "device access to {what} at {addr:#x}+{len} (device writes: {device_writes}) is \
             not inside a buffer shared with the device in that direction"
        );
    }
    check_dma(addr, len, what);
}

// SAFETY: dma_alloc returns zeroed, page-aligned memory of the requested number of pages that
// nothing else uses until dma_dealloc; paddr == vaddr is the device's view of host memory in
// these tests; share returns the buffer's own address, valid as long as the buffer is, which
// the caller of share guarantees until unshare.
unsafe impl Hal for FakeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        assert_ne!(pages, 0, "dma_alloc of zero pages");
        let layout = layout(pages);
        // SAFETY: the layout has a non-zero size (pages ≥ 1) and a power-of-two alignment.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::alloc::handle_alloc_error(layout);
        };
        let addr = ptr.as_ptr().expose_provenance();
        registry().dma.insert(addr, layout.size());
        (addr as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let addr = vaddr.as_ptr().expose_provenance();
        assert_eq!(paddr, addr as PhysAddr, "dma_dealloc: paddr is not vaddr");
        let layout = layout(pages);
        {
            let mut registry = registry();
            let size = registry.dma.remove(&addr);
            assert_eq!(
                size,
                Some(layout.size()),
                "dma_dealloc of {addr:#x} ({pages} pages) that dma_alloc did not return"
            );
            // Buffers freed while still shared (a queue dropped after a device reset, without
            // pop_used) are shared no more: a device access to them must fail.
            let end = addr + layout.size();
            let inside: Vec<usize> = registry.shared.range(addr..end).map(|(&k, _)| k).collect();
            for key in inside {
                registry.shared.remove(&key);
            }
        }
        // SAFETY: the caller passes what dma_alloc returned (checked against the registry
        // above), so `vaddr` was allocated with exactly this layout and is freed once.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        let addr = usize::try_from(paddr).expect("MMIO address fits usize");
        NonNull::new(core::ptr::with_exposed_provenance_mut(addr)).expect("MMIO address not null")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let device_writes = match direction {
            BufferDirection::DeviceToDriver => true,
            BufferDirection::DriverToDevice => false,
            BufferDirection::Both => panic!("share with BufferDirection::Both"),
        };
        let addr = buffer.cast::<u8>().as_ptr().expose_provenance();
        registry().shared.entry(addr).or_default().push(Share {
            len: buffer.len(),
            device_writes,
        });
        addr as PhysAddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, _direction: BufferDirection) {
        let addr = buffer.cast::<u8>().as_ptr().expose_provenance();
        assert_eq!(paddr, addr as PhysAddr, "unshare: paddr is not the buffer");
        let mut registry = registry();
        let shares = registry
            .shared
            .get_mut(&addr)
            .expect("unshare of a buffer that is not shared");
        let position = shares
            .iter()
            .position(|share| share.len == buffer.len())
            .expect("unshare with a length that was not shared");
        shares.swap_remove(position);
        if shares.is_empty() {
            registry.shared.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::std::panic::catch_unwind;

    #[test]
    fn registry_follows_allocations_and_shares() {
        let (paddr, vaddr) = FakeHal::dma_alloc(1, BufferDirection::DeviceToDriver);
        assert!(is_live_dma(paddr, PAGE_SIZE));
        assert!(!is_live_dma(paddr, PAGE_SIZE + 1));
        let buffer = NonNull::slice_from_raw_parts(vaddr, 100);
        // SAFETY: `buffer` lies in the page just allocated, which stays allocated until the
        // dealloc below.
        let shared = unsafe { FakeHal::share(buffer, BufferDirection::DeviceToDriver) };
        assert_eq!(shared, paddr, "paddr == vaddr");
        check_shared(paddr + 10, 90, true, "the test buffer");
        let too_far = catch_unwind(|| check_shared(paddr, 101, true, "past it"));
        assert!(too_far.is_err(), "an access past the buffer fails");
        let wrong_way = catch_unwind(|| check_shared(paddr, 1, false, "read"));
        assert!(
            wrong_way.is_err(),
            "a device-writable buffer is not device-readable"
        );
        // SAFETY: the buffer was shared just above with this address and direction.
        unsafe { FakeHal::unshare(paddr, buffer, BufferDirection::DeviceToDriver) };
        let unshared = catch_unwind(|| check_shared(paddr, 1, true, "unshared"));
        assert!(
            unshared.is_err(),
            "an unshared buffer is the driver's again"
        );
        // SAFETY: what dma_alloc returned, freed once.
        assert_eq!(unsafe { FakeHal::dma_dealloc(paddr, vaddr, 1) }, 0);
        assert!(!is_live_dma(paddr, 1));
    }
}
