/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause) */
/*
 * vdaq: userspace ABI of the Linux driver for the vdaq virtio DAQ card.
 *
 * /dev/vdaqN: one read() (or one asynchronous read through io_uring or
 * Linux AIO) is one read buffer on the device's data queue. The device writes
 * a struct vdaq_buffer_header and then the frames straight into the caller's
 * buffer; the read returns the used length (64 + frame_count * frame size).
 * Control goes through the ioctls below.
 *
 * Every structure mirrors the wire format of docs/spec.md and the vdaq-wire
 * crate (wire/src/): little-endian (__le) fields that the driver passes
 * to and from the device unchanged, no pointers, no padding the compiler
 * could choose, the same size on 32-bit and 64-bit userspace.
 */
#ifndef _UAPI_LINUX_VDAQ_H
#define _UAPI_LINUX_VDAQ_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* Virtio device ID the card presents (borrowed, see docs/spec.md 5.x.1). */
#define VDAQ_VIRTIO_ID			21
#define VDAQ_FIRMWARE_MAJOR		1
#define VDAQ_CONFIG_SIZE		136
#define VDAQ_MODEL_LEN			24
#define VDAQ_MAX_CHANNELS		1024	/* spec 5.x.8 */
#define VDAQ_HEADER_SIZE		64
#define VDAQ_EVENT_SIZE			32
#define VDAQ_MAX_CHAIN_DESCRIPTORS	64

/* Device feature bits (virtio bit numbers). */
#define VDAQ_F_CRC32			0
#define VDAQ_F_TRIGGER			1

/* Sample formats, signals, clock modes, states (config space and headers). */
#define VDAQ_FORMAT_S16			1
#define VDAQ_FORMAT_S32			2
#define VDAQ_FORMAT_F32			3

#define VDAQ_SIGNAL_COUNTER		0
#define VDAQ_SIGNAL_SINE		1
#define VDAQ_SIGNAL_SQUARE		2
#define VDAQ_SIGNAL_SAWTOOTH		3
#define VDAQ_SIGNAL_NOISE		4
#define VDAQ_SIGNAL_FILE		5

#define VDAQ_CLOCK_PACED		0
#define VDAQ_CLOCK_FREE_RUNNING		1

#define VDAQ_STATE_STOPPED		0
#define VDAQ_STATE_RUNNING		1
#define VDAQ_STATE_NEEDS_RESET		2

/* struct vdaq_buffer_header.flags */
#define VDAQ_BUF_OVERRUN		0x01
#define VDAQ_BUF_FLUSHED		0x02
#define VDAQ_BUF_TRIGGERED		0x04
#define VDAQ_BUF_LATENCY		0x08
#define VDAQ_BUF_STOPPED		0x10
#define VDAQ_BUF_CRC_VALID		0x20
#define VDAQ_BUF_DISCONTINUITY		0x40
#define VDAQ_BUF_PAUSED			0x80
#define VDAQ_BUF_SIGNAL_CHANGED		0x100

/* struct vdaq_buffer_header.status */
#define VDAQ_BUF_STATUS_OK		0
#define VDAQ_BUF_STATUS_BAD_BUFFER	1

/* struct vdaq_event.kind */
#define VDAQ_EVENT_OVERRUN		1
#define VDAQ_EVENT_TRIGGER		2
#define VDAQ_EVENT_FAULT		3
#define VDAQ_EVENT_NEEDS_RESET		4

/* Fault codes (FAULT and NEEDS_RESET events, config fault_code). */
#define VDAQ_FAULT_QUEUE_CORRUPT	1
#define VDAQ_FAULT_FIRMWARE		2

/* struct vdaq_trigger.mode */
#define VDAQ_TRIGGER_OFF		0
#define VDAQ_TRIGGER_LEVEL_ABOVE	1
#define VDAQ_TRIGGER_LEVEL_BELOW	2
#define VDAQ_TRIGGER_RISING		3
#define VDAQ_TRIGGER_FALLING		4

/* The device configuration space (wire: config::DaqConfig), 136 bytes. */
struct vdaq_config {
	__le16 max_channels;
	__le16 channels;
	__le32 supported_formats;
	__le32 min_rate_hz;
	__le32 max_rate_hz;
	__le32 rate_hz;
	__le32 fifo_frames;
	__le32 watermark_frames;
	__le32 latency_us;
	__le32 signal_freq_mhz;
	__le16 coalesce_buffers;
	__le16 amplitude_permille;
	__u8 format;
	__u8 signal;
	__u8 clock;
	__u8 state;
	__le32 fault_code;
	__le64 seed;
	__le64 frames_produced;
	__le64 frames_delivered;
	__le64 frames_dropped;
	__le64 buffers_completed;
	__le64 requests_rejected;
	__le32 firmware_version;
	__le32 events_lost;
	__u8 model[VDAQ_MODEL_LEN];
	__le32 full_scale_uv;		/* uV of full scale (S16 2^15, S32 2^31); 0 unknown */
	__le32 tick_us;			/* time step (us), firmware >= 1.1; 0 unknown */
};

/* Header at offset 0 of every completed read (wire: buffer::BufferHeader). */
struct vdaq_buffer_header {
	__le64 sequence;
	__le64 first_frame;
	__le64 timestamp_ns;
	__le64 dropped_frames;
	__le32 frame_count;
	__le32 trigger_frame;
	__le32 crc32;
	__le16 flags;
	__u8 status;
	__u8 format;
	__le16 channels;
	__u8 signal;
	__u8 reserved0;
	__le32 rate_hz;
	__le64 reserved1;
};

/* CONFIGURE payload (wire: control::Configure), 40 bytes. */
struct vdaq_configure {
	__le32 rate_hz;
	__le32 latency_us;
	__le32 watermark_frames;
	__le32 signal_freq_mhz;
	__le16 channels;
	__le16 coalesce_buffers;
	__le16 amplitude_permille;
	__u8 format;
	__u8 signal;
	__le64 seed;
	__u8 clock;
	__u8 reserved[7];		/* zero */
};

/* SET_TRIGGER payload (wire: control::TriggerConfig), 16 bytes. */
struct vdaq_trigger {
	__u8 mode;
	__u8 reserved;			/* zero */
	__le16 channel;
	__le32 threshold_ppm;		/* two's complement, +-1000000 */
	__le32 pre_frames;
	__le32 post_frames;
};

/* GET_STATUS reply (wire: control::Status), 72 bytes. */
struct vdaq_status {
	__le64 device_time_ns;
	__le64 frames_produced;
	__le64 frames_delivered;
	__le64 frames_dropped;
	__le64 buffers_completed;
	__le64 buffers_held;
	__le64 frames_pending;
	__le64 requests_rejected;
	__u8 state;
	__u8 reserved[7];
};

/* FLUSH reply (wire: control::FlushReply), 8 bytes. */
struct vdaq_flush_reply {
	__le32 buffers_returned;
	__le32 reserved;
};

/* One event record (wire: event::Event), 32 bytes. */
struct vdaq_event {
	__le32 kind;
	__le32 reserved;
	__le64 timestamp_ns;
	__le64 arg0;
	__le64 arg1;
};

/* VDAQ_IOC_GET_CONFIG: identity, negotiated features, config space. */
struct vdaq_info {
	__u64 features;			/* negotiated virtio features */
	__u32 device_id;		/* virtio device ID */
	__u32 vendor_id;		/* virtio vendor ID */
	__u32 data_queue_size;		/* most reads in flight */
	__u32 max_read_bytes;		/* largest read always accepted */
	__u32 frame_bytes;		/* channels * sample size now */
	__u32 transport;		/* VDAQ_TRANSPORT_* */
	struct vdaq_config config;	/* one read of the config space */
};

#define VDAQ_TRANSPORT_UNKNOWN		0
#define VDAQ_TRANSPORT_PCI		1
#define VDAQ_TRANSPORT_MMIO		2

/* VDAQ_IOC_READ_EVENTS: takes up to VDAQ_EVENTS_MAX queued event records. */
#define VDAQ_EVENTS_MAX			16
struct vdaq_events {
	__u32 count;			/* out: records in events[] */
	__u32 dropped;			/* out: records lost since the last call */
	struct vdaq_event events[VDAQ_EVENTS_MAX];
};

/* VDAQ_IOC_GET_STATS: the driver's counters (the same as in sysfs). */
struct vdaq_stats {
	__u64 completed;		/* reads completed with data */
	__u64 errors;			/* reads completed with an error */
	__u64 invalid;			/* completions with a bad length/header */
	__u64 rejected;			/* used length 0 or BAD_BUFFER */
	__u64 reclaimed;		/* reads taken back by a reset */
	__u64 cancellations;		/* cancellation requests */
	__u64 pending;			/* reads held by the device now */
	__u64 dropped_frames;		/* sum of header dropped_frames */
	__u64 overrun_buffers;		/* headers flagged OVERRUN */
	__u64 events;			/* event records received */
	__u64 events_dropped;		/* records lost, ring full */
	__u64 interrupts;		/* virtqueue callbacks */
	__u64 bottom_halves;		/* bottom-half runs */
	__u64 found_on_recheck;		/* buffers found after re-enable */
	__u64 resets;			/* device resets (recoveries) */
	__u64 bytes;			/* bytes returned by reads */
	__u64 watchdog_recoveries;	/* lost interrupts the watchdog covered */
	__u64 config_changes;		/* configuration-change notifications */
	__u64 violations;		/* device protocol violations detected */
	__u64 first_violation;		/* VDAQ_VIOLATION_* of the first, 0 none */
	__u64 unknown_events;		/* events of kinds this driver ignores */
	/*
	 * The device's counters just before each reset it recovered from,
	 * summed (GET_STATUS still answers in NEEDS_RESET): an application
	 * closes its stream's epoch with them. Resets whose counters could
	 * not be read are resets - resets_with_status.
	 */
	__u64 resets_with_status;
	__u64 before_reset_produced;
	__u64 before_reset_delivered;
	__u64 before_reset_dropped;
	__u64 before_reset_pending;
	__u64 data_notifications;	/* data-queue notifications sent */
};

/*
 * Protocol violations of the device the driver detects (vdaq_stats), the
 * codes of vdaq_wire::violation::Violation.
 */
#define VDAQ_VIOLATION_USED_LEN_OVER		1	/* used length > buffer */
#define VDAQ_VIOLATION_USED_LEN_UNDER_HEADER	2	/* 0 < used < header */
#define VDAQ_VIOLATION_HEADER_LENGTH		3	/* frame_count vs used */
#define VDAQ_VIOLATION_HEADER_CONFIGURATION	4	/* format/channels */
#define VDAQ_VIOLATION_HEADER_MALFORMED		5	/* status, format code */
#define VDAQ_VIOLATION_USED_ID_OUT_OF_RANGE	6
#define VDAQ_VIOLATION_USED_ID_NOT_IN_FLIGHT	7
#define VDAQ_VIOLATION_COMPLETION_ORDER		8	/* before older reads */
#define VDAQ_VIOLATION_USED_ID_REFUSED		9	/* the ring broke */
#define VDAQ_VIOLATION_REPLY_SHORT		10
#define VDAQ_VIOLATION_REPLY_LONG		11
#define VDAQ_VIOLATION_REPLY_STATUS		12	/* undefined status */
#define VDAQ_VIOLATION_REPLY_MISSING		13	/* never answered */
#define VDAQ_VIOLATION_REPLY_UNSOLICITED	14
#define VDAQ_VIOLATION_CONFIG_IMPOSSIBLE	15

#define VDAQ_IOC_MAGIC			0xDA

#define VDAQ_IOC_GET_CONFIG	_IOR(VDAQ_IOC_MAGIC, 0x00, struct vdaq_info)
#define VDAQ_IOC_CONFIGURE	_IOW(VDAQ_IOC_MAGIC, 0x01, struct vdaq_configure)
#define VDAQ_IOC_START		_IO(VDAQ_IOC_MAGIC, 0x02)
#define VDAQ_IOC_STOP		_IO(VDAQ_IOC_MAGIC, 0x03)
#define VDAQ_IOC_STATUS		_IOR(VDAQ_IOC_MAGIC, 0x04, struct vdaq_status)
#define VDAQ_IOC_TRIGGER	_IO(VDAQ_IOC_MAGIC, 0x05)
#define VDAQ_IOC_SET_TRIGGER	_IOW(VDAQ_IOC_MAGIC, 0x06, struct vdaq_trigger)
#define VDAQ_IOC_FLUSH		_IOR(VDAQ_IOC_MAGIC, 0x07, struct vdaq_flush_reply)
#define VDAQ_IOC_RESET_COUNTERS	_IO(VDAQ_IOC_MAGIC, 0x08)
#define VDAQ_IOC_READ_EVENTS	_IOR(VDAQ_IOC_MAGIC, 0x09, struct vdaq_events)
#define VDAQ_IOC_GET_STATS	_IOR(VDAQ_IOC_MAGIC, 0x0a, struct vdaq_stats)

#endif /* _UAPI_LINUX_VDAQ_H */
