//! The control queue: one request (header + payload, device-readable) and its reply
//! (device-writable) per chain, framed and size-checked here, executed by the card.

use std::io;

use vdaq_wire::control::{self, CommandStatus, Opcode};
use vdaq_wire::queue;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::chain::{read_segments, validate_chain, write_segments};
use super::{DaqBackend, MemorySnapshot};

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
        self.drain_available(control_vring, "control", |this, chain, mem| {
            let head = chain.head_index();
            let used_len = this.execute_command(chain, mem, vrings);
            this.put_used(control_vring, "control", head, used_len);
            this.signal(control_vring);
        })
    }

    /// Runs one control request; returns the used length of its reply.
    pub(super) fn execute_command(
        &mut self,
        chain: DescriptorChain<MemorySnapshot>,
        mem: &GuestMemoryMmap<()>,
        vrings: &[VringRwLock],
    ) -> u32 {
        let layout = match validate_chain(chain, mem) {
            Ok(layout) => layout,
            Err(err) => {
                self.errors.report("control", err);
                self.card.count_rejected();
                return 0;
            }
        };
        let reply_space = layout.writable_bytes();
        if reply_space < control::HEADER_BYTES {
            self.errors
                .report("control", "no room for the reply header");
            self.card.count_rejected();
            return 0;
        }
        let reply = |this: &mut Self, status: CommandStatus, payload: &[u8]| -> u32 {
            let mut bytes = vec![0u8; control::HEADER_BYTES + payload.len()];
            let written = control::encode_reply(status, payload, &mut bytes)
                .map_err(|err| format!("{err:?}"))
                .and_then(|len| {
                    write_segments(mem, &layout.writable, 0, &bytes[..len])
                        .map(|()| len)
                        .map_err(|err| err.to_string())
                });
            match written {
                Ok(len) => len as u32,
                Err(err) => {
                    this.errors.report("control", err);
                    0
                }
            }
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
