//! The control queue: one request (header + payload, device-readable) and its reply
//! (device-writable) per chain, framed and size-checked here, executed by the card.

use std::io;

use vdaq_wire::control::{self, CommandStatus, Opcode};
use vdaq_wire::queue;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use log::warn;

use super::chain::{read_segments, validate_chain, write_segments};
use super::{DaqBackend, MemorySnapshot};
use crate::model::violations::{ScriptedViolation, UNDEFINED_STATUS};

impl DaqBackend {
    pub(super) fn process_control_queue(&mut self, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(control_vring) = vrings.get(usize::from(queue::CONTROL)) else {
            return Ok(());
        };
        // Buffers made available on dataq before a command was are the command's to act on
        // (a FLUSH returns them, a STOP sees them), whichever kick the event loop took first.
        if let Some(data_vring) = vrings.get(usize::from(queue::DATA)) {
            if data_vring.get_ref().is_enabled() {
                if let Err(err) = self.process_data_queue(data_vring) {
                    // The commands are answered all the same.
                    self.errors
                        .report("data", format_args!("before a command: {err}"));
                }
            }
        }
        // That may have run the clock into a scripted NEEDS_RESET: announce it first.
        if self.card.state() == vdaq_wire::DeviceState::NeedsReset {
            self.notify_needs_reset();
        }
        if self.announcing_needs_reset() {
            // A reply would show the driver NEEDS_RESET before the frontend took the
            // notification (notify.rs); `pump` answers once it has. (A control ring found
            // corrupt in the drain below enters NEEDS_RESET mid-drain; the chains after it
            // are answered BUSY at once: that driver broke its own ring.)
            self.control_deferred = true;
            self.update_timer();
            return Ok(());
        }
        self.drain_available(control_vring, "control", false, |this, chain, mem| {
            let head = chain.head_index();
            match this.execute_command(chain, mem, vrings) {
                Some(used_len) => {
                    this.put_used(control_vring, "control", head, used_len);
                    this.signal(control_vring);
                }
                // Scripted (`reply_never`): the chain stays with the device until reset.
                None => this.withheld_replies += 1,
            }
        })
    }

    /// Runs one control request; returns the used length of its reply, or None if a scripted
    /// violation withholds the reply.
    pub(super) fn execute_command(
        &mut self,
        chain: DescriptorChain<MemorySnapshot>,
        mem: &GuestMemoryMmap<()>,
        vrings: &[VringRwLock],
    ) -> Option<u32> {
        let layout = match validate_chain(chain, mem) {
            Ok(layout) => layout,
            Err(err) => {
                self.errors.report("control", err);
                self.card.count_rejected();
                return Some(0);
            }
        };
        let reply_space = layout.writable_bytes();
        if reply_space < control::HEADER_BYTES {
            self.errors
                .report("control", "no room for the reply header");
            self.card.count_rejected();
            return Some(0);
        }
        // A scripted protocol violation for this reply, if one is armed.
        let lie = self.card.take_violation(ScriptedViolation::is_reply);
        if lie == Some(ScriptedViolation::ReplyNever) {
            warn!("scripted violation: a command is never answered");
            return None;
        }
        let reply = |this: &mut Self, status: CommandStatus, payload: &[u8]| -> Option<u32> {
            let mut bytes = vec![0u8; control::HEADER_BYTES + payload.len()];
            let written = control::encode_reply(status, payload, &mut bytes)
                .map_err(|err| format!("{err:?}"))
                .and_then(|len| {
                    if lie == Some(ScriptedViolation::ReplyBadStatus) {
                        // The status is the reply's first field (spec 5.x.6.8).
                        bytes[..4].copy_from_slice(&UNDEFINED_STATUS.to_le_bytes());
                    }
                    write_segments(mem, &layout.writable, 0, &bytes[..len])
                        .map(|()| len)
                        .map_err(|err| err.to_string())
                });
            let used_len = match written {
                Ok(len) => len as u32,
                Err(err) => {
                    this.errors.report("control", err);
                    0
                }
            };
            Some(match lie {
                Some(ScriptedViolation::ReplyShort) => {
                    warn!("scripted violation: a reply's used length is under its header");
                    control::HEADER_BYTES as u32 / 2
                }
                Some(ScriptedViolation::ReplyLong) => {
                    warn!("scripted violation: a reply's used length is beyond its area");
                    u32::try_from(reply_space + 64).unwrap_or(u32::MAX)
                }
                Some(ScriptedViolation::ReplyBadStatus) => {
                    warn!("scripted violation: a reply with status {UNDEFINED_STATUS:#x}");
                    used_len
                }
                _ => used_len,
            })
        };
        let request_len = layout.readable_bytes();
        if !(control::HEADER_BYTES..=control::MAX_REQUEST_BYTES).contains(&request_len) {
            self.errors
                .report("control", format_args!("request of {request_len} bytes"));
            self.card.count_rejected();
            return reply(self, CommandStatus::BadSize, &[]);
        }
        let mut request = vec![0u8; request_len];
        if read_segments(mem, &layout.readable, 0, &mut request).is_err() {
            self.card.count_rejected();
            return reply(self, CommandStatus::BadSize, &[]);
        }
        let Ok((op, payload)) = control::decode_command(&request) else {
            return reply(self, CommandStatus::BadSize, &[]);
        };
        if Opcode::from_code(op)
            .is_some_and(|op| reply_space < control::HEADER_BYTES + op.reply_payload_size())
        {
            self.errors.report(
                "control",
                format_args!("reply area too small for opcode {op}"),
            );
            self.card.count_rejected();
            return reply(self, CommandStatus::BadSize, &[]);
        }
        let now = self.now_ns();
        let result = self.card.execute(op, payload, now, &mut self.completions);
        if result.status != CommandStatus::Ok {
            self.errors.report(
                "control",
                format_args!("opcode {op} answered with status {:?}", result.status),
            );
            if matches!(
                result.status,
                CommandStatus::Unsupported | CommandStatus::BadSize
            ) {
                self.card.count_rejected();
            }
        }
        // Data buffers completed by this command (STOP, FLUSH) reach the used ring before the
        // reply does, so a driver that sees the reply finds them already returned.
        if let Some(data) = vrings.get(usize::from(queue::DATA)) {
            self.publish_completions(data, true);
        }
        reply(self, result.status, &result.payload)
    }
}
