//! The frontend's memory table, checked before anything reads or writes through it.
//!
//! vhost-user-backend maps every region of SET_MEM_TABLE as the frontend describes it, and
//! neither it nor vm-memory compares a region with the file behind it: a region that reaches
//! past the end of its file maps without complaint, and the first access to that part kills
//! the process with SIGBUS. (vhost checks that sizes are non-zero and sums do not overflow;
//! vm-memory refuses overlapping guest ranges.) This runs on the mapped table before the
//! backend takes it: every region must be a regular file's (a memfd or a file on tmpfs or
//! hugetlbfs, as QEMU shares memory) and lie inside it.
//!
//! A file that is not sealed against shrinking could still be truncated by the frontend after
//! the check; a memfd from QEMU's `memory-backend-memfd` is sealed (`seal=on`, its default).
//! The report counts such regions: the backend refuses them unless the operator allows them
//! (`--allow-unsealed-memory`, which QEMU's `memory-backend-file` needs).

use std::os::fd::AsRawFd;

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why a memory table is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryTableError {
    /// The file's size could not be read.
    #[error("region at guest address {gpa:#x}: fstat failed: {reason}")]
    Stat {
        /// Guest physical address of the region.
        gpa: u64,
        /// The error.
        reason: String,
    },
    /// The descriptor is not a regular file (a socket, pipe or device).
    #[error("region at guest address {gpa:#x}: the descriptor is not a regular file")]
    NotAFile {
        /// Guest physical address of the region.
        gpa: u64,
    },
    /// The region reaches past the end of its file.
    #[error(
        "region at guest address {gpa:#x}: bytes {offset:#x}..{end:#x} of a {file_size:#x}-byte \
         file (past its end)"
    )]
    PastEndOfFile {
        /// Guest physical address of the region.
        gpa: u64,
        /// Offset of the region in the file.
        offset: u64,
        /// End of the region in the file.
        end: u64,
        /// The file's size.
        file_size: u64,
    },
}

/// What the check found in an accepted table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryTableReport {
    /// Regions in the table.
    pub regions: usize,
    /// Regions whose file the frontend could still shrink (not sealed with F_SEAL_SHRINK).
    pub shrinkable: usize,
}

/// Checks every region of `memory` against its file.
pub fn check<B: vm_memory::bitmap::Bitmap>(
    memory: &GuestMemoryMmap<B>,
) -> Result<MemoryTableReport, MemoryTableError> {
    let mut report = MemoryTableReport::default();
    for region in memory.iter() {
        let gpa = region.start_addr().0;
        report.regions += 1;
        // Anonymous memory is this process's own (the frontend passes a descriptor with every
        // region, vhost checks that): it has no end to run past.
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let metadata = file_offset
            .file()
            .metadata()
            .map_err(|err| MemoryTableError::Stat {
                gpa,
                reason: err.to_string(),
            })?;
        if !metadata.is_file() {
            return Err(MemoryTableError::NotAFile { gpa });
        }
        let offset = file_offset.start();
        let end = offset.saturating_add(region.len());
        if end > metadata.len() {
            return Err(MemoryTableError::PastEndOfFile {
                gpa,
                offset,
                end,
                file_size: metadata.len(),
            });
        }
        if !sealed_against_shrinking(file_offset.file()) {
            report.shrinkable += 1;
        }
    }
    Ok(report)
}

fn sealed_against_shrinking(file: &std::fs::File) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's seals; on a file
    // that does not support seals it fails with EINVAL, which counts as unsealed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(test)]
mod tests {
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    use super::*;

    fn memfd(size: u64, seal: bool) -> std::fs::File {
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"vdaq-memory-table-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).expect("set_len");
        if seal {
            // SAFETY: F_ADD_SEALS with a seal mask only changes the memfd's seals.
            let sealed = unsafe {
                libc::fcntl(
                    file.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(sealed, 0, "F_ADD_SEALS");
        }
        file
    }

    /// A one-region table mapping `len` bytes of `file` from `offset` at guest address 0.
    fn table(file: std::fs::File, offset: u64, len: usize) -> GuestMemoryMmap<()> {
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len).expect("mmap");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
        GuestMemoryMmap::from_regions(vec![region]).expect("table")
    }

    #[test]
    fn a_region_inside_a_sealed_memfd_is_accepted() {
        let report = check(&table(memfd(1 << 20, true), 4096, (1 << 20) - 4096)).expect("ok");
        assert_eq!(
            report,
            MemoryTableReport {
                regions: 1,
                shrinkable: 0
            }
        );
    }

    #[test]
    fn an_unsealed_file_is_accepted_and_counted_as_shrinkable() {
        let report = check(&table(memfd(1 << 20, false), 0, 1 << 20)).expect("ok");
        assert_eq!(report.shrinkable, 1);
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused_before_anything_touches_it() {
        // Mapping succeeds (the kernel does not check); touching page 256 would SIGBUS.
        let err = check(&table(memfd(1 << 20, false), 0, 2 << 20)).expect_err("refused");
        assert_eq!(
            err,
            MemoryTableError::PastEndOfFile {
                gpa: 0,
                offset: 0,
                end: 2 << 20,
                file_size: 1 << 20
            }
        );
        let err = check(&table(memfd(1 << 20, true), 1 << 20, 4096)).expect_err("offset at EOF");
        assert!(err.to_string().contains("past its end"), "{err}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_regular_file_is_refused() {
        // /dev/zero maps, but is no file the frontend's memory can live in.
        let zero = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .expect("/dev/zero");
        let err = check(&table(zero, 0, 4096)).expect_err("refused");
        assert_eq!(err, MemoryTableError::NotAFile { gpa: 0 });
    }

    #[test]
    fn the_processs_own_anonymous_memory_has_nothing_to_check() {
        let region = MmapRegion::<()>::new(4096).expect("anonymous");
        let region = GuestRegionMmap::new(region, GuestAddress(0x1000)).expect("region");
        let memory = GuestMemoryMmap::from_regions(vec![region]).expect("table");
        assert_eq!(
            check(&memory),
            Ok(MemoryTableReport {
                regions: 1,
                shrinkable: 0
            })
        );
    }
}
