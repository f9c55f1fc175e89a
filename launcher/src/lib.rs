//! The launcher's reusable pieces, shared by the `vdaq` binary and the end-to-end tests:
//! [`tools`] finds (or builds, or provisions) what a run needs and probes KVM; [`session`]
//! runs backend, QEMU and guest once and collects what the guest reported.

pub mod qmp;
pub mod resources;
pub mod session;
pub mod tools;
