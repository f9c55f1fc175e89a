//! A hostile vhost-user frontend against the real backend binary: memory tables that do not
//! fit their files (the class that used to end the process with SIGBUS), overlapping or
//! overflowing regions, descriptors that are not files. Each is refused (a NACK, since the
//! frontend asks for replies, then the connection ends) and the daemon serves the next
//! frontend, which streams.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

use vdaq_driver::DriverOptions;
use vdaq_loopback::{BackendProcess, DriverRig, Resubmit};
use vdaq_wire::check::StreamVerifier;
use vdaq_wire::SampleFormat;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const MIB: u64 = 1 << 20;

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"vdaq-hostile-frontend".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("set_len");
    file
}

/// A frontend that has negotiated replies, so a refused request fails at once.
fn frontend(socket: &Path) -> Frontend {
    let mut frontend = Frontend::connect(socket, 3).expect("connect");
    frontend.set_owner().expect("SET_OWNER");
    frontend.get_features().expect("GET_FEATURES");
    let offered = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    assert!(offered.contains(VhostUserProtocolFeatures::REPLY_ACK));
    frontend
        .set_protocol_features(
            offered & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ),
        )
        .expect("SET_PROTOCOL_FEATURES");
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
}

fn region(gpa: u64, size: u64, offset: u64, file: &File) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        // The frontend's own address of the region: only used to translate ring addresses.
        userspace_addr: 0x7f00_0000_0000_u64.wrapping_add(gpa),
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

#[test]
fn bad_memory_tables_are_refused_and_the_daemon_serves_the_next_frontend() {
    let mut backend = BackendProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &["--clock", "free"],
    )
    .expect("backend starts");
    let small = memfd(MIB);
    let large = memfd(2 * MIB);
    let dev_zero = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .expect("/dev/zero");
    let cases: [(&str, Vec<VhostUserMemoryRegionInfo>); 6] = [
        (
            "a region in a file the frontend could still shrink",
            vec![region(0, MIB, 0, &small)],
        ),
        (
            "a region twice the size of its file",
            vec![region(0, 2 * MIB, 0, &small)],
        ),
        (
            "a region starting at its file's end",
            vec![region(0, 64 * 1024, MIB, &small)],
        ),
        (
            "two regions overlapping in guest memory",
            vec![region(0, MIB, 0, &large), region(MIB / 2, MIB, MIB, &large)],
        ),
        (
            "a region whose guest range overflows",
            vec![region(u64::MAX - 4095, MIB, 0, &small)],
        ),
        (
            "a region that is no file's",
            vec![region(0, MIB, 0, &dev_zero)],
        ),
    ];
    for (what, table) in &cases {
        let frontend = frontend(backend.socket());
        assert!(
            frontend.set_mem_table(table).is_err(),
            "{what}: SET_MEM_TABLE refused"
        );
        drop(frontend);
        std::thread::sleep(Duration::from_millis(50));
        assert!(backend.is_running(), "{what}: the daemon survived");
    }
    // A table that fits is taken, and the card streams.
    let mut rig = DriverRig::connect(
        backend.socket(),
        DriverOptions::default(),
        Duration::from_secs(30),
    )
    .expect("connect");
    let mut verifier = StreamVerifier::new(SampleFormat::S16, 4, true);
    rig.driver.start(&mut rig.wait).expect("START");
    rig.stream(&mut verifier, 8, 4096, 10_000, Resubmit::Batched)
        .expect("stream");
    assert_eq!(verifier.stats().errors, 0);
    assert!(verifier.stats().frames > 0);
}

#[test]
fn ring_addresses_outside_the_memory_table_are_refused_and_the_daemon_survives() {
    let mut backend = BackendProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &["--clock", "free"],
    )
    .expect("backend starts");
    let memory = memfd(MIB);
    // SAFETY: F_ADD_SEALS with a seal mask only changes the seals of our own memfd.
    let sealed = unsafe {
        libc::fcntl(
            memory.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(sealed, 0);
    let table = [region(0, MIB, 0, &memory)];
    let base = table[0].userspace_addr;
    for (what, desc, avail, used) in [
        (
            "a descriptor table past the memory",
            base + MIB,
            base,
            base + 8192,
        ),
        (
            "an available ring before the memory",
            base,
            base - 4096,
            base + 8192,
        ),
        ("a used ring nowhere", base, base + 4096, 0x10),
    ] {
        let frontend = frontend(backend.socket());
        frontend
            .set_mem_table(&table)
            .expect("a table that fits is taken");
        frontend.set_vring_num(0, 256).expect("SET_VRING_NUM");
        let refused = frontend.set_vring_addr(
            0,
            &vhost::VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            },
        );
        assert!(refused.is_err(), "{what}: SET_VRING_ADDR refused");
        drop(frontend);
        std::thread::sleep(Duration::from_millis(50));
        assert!(backend.is_running(), "{what}: the daemon survived");
    }
}

#[test]
fn unsealed_memory_is_taken_when_the_operator_allows_it() {
    let backend = BackendProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_vhost-device-daq")),
        &["--clock", "free", "--allow-unsealed-memory"],
    )
    .expect("backend starts");
    let unsealed = memfd(MIB);
    let frontend = frontend(backend.socket());
    frontend
        .set_mem_table(&[region(0, MIB, 0, &unsealed)])
        .expect("taken with --allow-unsealed-memory");
    // One connection at a time: this one ends before the next is made.
    drop(frontend);
    // Still refused past the end of the file.
    let frontend = self::frontend(backend.socket());
    assert!(frontend
        .set_mem_table(&[region(0, 2 * MIB, 0, &unsealed)])
        .is_err());
}
