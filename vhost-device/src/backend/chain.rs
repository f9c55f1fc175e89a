//! Descriptor chains from the guest: validated completely before the device touches a byte,
//! then read and written as a list of segments in guest memory.

use thiserror::Error;
use vdaq_wire::buffer::{BufferHeader, HEADER_SIZE, MAX_CHAIN_DESCRIPTORS};
use vdaq_wire::zerocopy::IntoBytes;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap, Permissions,
};

use super::{GuestMemoryHandle, MemorySnapshot};
use crate::model::{BufferWriteError, ReadBuffer};

/// What is wrong with a descriptor chain the guest made available.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainError {
    /// A device-readable descriptor where only device-writable ones may be.
    #[error("device-readable descriptor in a device-writable buffer")]
    WrongDirection,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor's address range is not (entirely) guest memory.
    #[error("descriptor outside guest memory")]
    OutOfBounds,
    /// The chain loops, points past the table, or has a bad indirect table.
    #[error("broken descriptor chain (loop, bad next index or bad indirect table)")]
    Broken,
    /// More descriptors than the device accepts.
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors in one chain")]
    TooManyDescriptors,
    /// More bytes than a used length can describe (4 GiB).
    #[error("chain longer than 4 GiB")]
    TooLong,
    /// A buffer whose descriptor head the device already holds (the driver reused it).
    #[error("buffer made available again while the device still holds it")]
    AlreadyHeld,
    /// Not even room for the header.
    #[error("chain too short for the header")]
    TooShort,
}

/// One contiguous piece of a descriptor chain in guest memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) addr: GuestAddress,
    pub(super) len: usize,
}

/// Device-readable and device-writable parts of a validated chain.
#[derive(Debug, Default)]
pub(super) struct ChainLayout {
    pub(super) readable: Vec<Segment>,
    pub(super) writable: Vec<Segment>,
}

impl ChainLayout {
    pub(super) fn writable_bytes(&self) -> usize {
        self.writable.iter().map(|s| s.len).sum()
    }

    pub(super) fn readable_bytes(&self) -> usize {
        self.readable.iter().map(|s| s.len).sum()
    }
}

/// Walks `chain`, checking every descriptor before anything is written: direction order
/// (readable first), bounds, length, and that the chain ended where its last descriptor says.
pub(super) fn validate_chain(
    chain: DescriptorChain<MemorySnapshot>,
    mem: &GuestMemoryMmap<()>,
) -> Result<ChainLayout, ChainError> {
    let mut layout = ChainLayout::default();
    let mut count = 0;
    let mut total: u64 = 0;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let len = desc.len() as usize;
        total += u64::from(desc.len());
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !mem.check_range(desc.addr(), len, access) {
            return Err(ChainError::OutOfBounds);
        }
        let segment = Segment {
            addr: desc.addr(),
            len,
        };
        if desc.is_write_only() {
            layout.writable.push(segment);
        } else if layout.writable.is_empty() {
            layout.readable.push(segment);
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
        last_has_next = desc.has_next();
    }
    // The iterator stops early, without an error, on loops, out-of-range next indices and bad
    // indirect tables; a last descriptor that still claims a successor gives it away.
    if count == 0 || last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(layout)
}

/// The pieces of bytes `offset .. offset + len` of the area made of `segments`: for each, where
/// it starts in guest memory and which bytes of the `len` it covers. None if the area is too
/// small, so callers touch nothing. Allocation-free: it runs for every block written.
pub(super) fn segment_pieces(
    segments: &[Segment],
    offset: usize,
    len: usize,
) -> Option<impl Iterator<Item = Option<(GuestAddress, std::ops::Range<usize>)>> + '_> {
    let total: usize = segments.iter().map(|s| s.len).sum();
    if offset.checked_add(len)? > total {
        return None;
    }
    let mut skip = offset;
    let mut done = 0;
    Some(segments.iter().filter_map(move |segment| {
        if done == len {
            return None;
        }
        if skip >= segment.len {
            skip -= segment.len;
            return None;
        }
        let n = (segment.len - skip).min(len - done);
        // An address overflow yields None inside: the caller fails.
        let piece = segment
            .addr
            .checked_add(skip as u64)
            .map(|addr| (addr, done..done + n));
        done += n;
        skip = 0;
        Some(piece)
    }))
}

/// Writes `data` at byte `offset` of the area made of `segments`. Fails without writing
/// anything if the area is too small.
pub(super) fn write_segments(
    mem: &GuestMemoryMmap<()>,
    segments: &[Segment],
    offset: usize,
    data: &[u8],
) -> Result<(), BufferWriteError> {
    let error = BufferWriteError {
        offset,
        len: data.len(),
    };
    let pieces =
        segment_pieces(segments, offset, data.len()).ok_or(BufferWriteError { ..error })?;
    for piece in pieces {
        let (addr, range) = piece.ok_or(BufferWriteError { ..error })?;
        mem.write_slice(&data[range], addr)
            .map_err(|_| BufferWriteError { ..error })?;
    }
    Ok(())
}

/// Reads `out.len()` bytes from byte `offset` of the area made of `segments`.
pub(super) fn read_segments(
    mem: &GuestMemoryMmap<()>,
    segments: &[Segment],
    offset: usize,
    out: &mut [u8],
) -> Result<(), ()> {
    for piece in segment_pieces(segments, offset, out.len()).ok_or(())? {
        let (addr, range) = piece.ok_or(())?;
        mem.read_slice(&mut out[range], addr).map_err(|_| ())?;
    }
    Ok(())
}

/// A read buffer posted on the data queue, validated, in guest memory.
#[derive(Debug)]
pub struct GuestBuffer {
    pub(super) head: u16,
    pub(super) writable: Vec<Segment>,
    pub(super) capacity: usize,
    pub(super) mem: GuestMemoryHandle,
}

impl ReadBuffer for GuestBuffer {
    fn payload_capacity(&self) -> usize {
        self.capacity - HEADER_SIZE
    }

    fn write_payload(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferWriteError> {
        let mem = self.mem.memory();
        write_segments(&mem, &self.writable, HEADER_SIZE + offset, data)
    }

    fn write_header(&mut self, header: &BufferHeader) -> Result<(), BufferWriteError> {
        let mem = self.mem.memory();
        write_segments(&mem, &self.writable, 0, header.as_bytes())
    }
}
