/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vdaq: internal definitions of the Linux driver for the vdaq virtio DAQ card.
 *
 * Locking, outermost first:
 *   vd->ctrl_mutex	one control command at a time; held across device
 *			resets (recovery, teardown) so no command races them
 *   vd->lock		spinlock (irq-safe): the three virtqueues, the request
 *			list, the event ring, the state flags and counters,
 *			the IIO capture state (struct vdaq_iio)
 *
 * IIO callbacks run under the IIO core's own locks (indio_dev->mlock) and
 * take ctrl_mutex inside them; the driver never takes an IIO lock while it
 * holds ctrl_mutex.
 */
#ifndef _VDAQ_H
#define _VDAQ_H

#include <linux/completion.h>
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mutex.h>
#include <linux/scatterlist.h>
#include <linux/spinlock.h>
#include <linux/virtio.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "uapi/vdaq.h"

#define VDAQ_QUEUE_DATA		0
#define VDAQ_QUEUE_CONTROL	1
#define VDAQ_QUEUE_EVENT	2
#define VDAQ_QUEUE_COUNT	3

/* Control opcodes and statuses (docs/spec.md 5.x.6.8). */
#define VDAQ_CMD_START		1
#define VDAQ_CMD_STOP		2
#define VDAQ_CMD_CONFIGURE	3
#define VDAQ_CMD_TRIGGER	4
#define VDAQ_CMD_FLUSH		5
#define VDAQ_CMD_GET_STATUS	6
#define VDAQ_CMD_RESET_COUNTERS	7
#define VDAQ_CMD_SET_TRIGGER	8

#define VDAQ_STATUS_OK		0
#define VDAQ_STATUS_UNSUPPORTED	1
#define VDAQ_STATUS_INVALID	2
#define VDAQ_STATUS_BAD_SIZE	3
#define VDAQ_STATUS_BUSY	4

/* Event buffers kept posted, and records kept for VDAQ_IOC_READ_EVENTS. */
#define VDAQ_EVENT_BUFFERS	8
#define VDAQ_EVENT_RING		64

/* Largest command payload and reply payload the driver sends or takes. */
#define VDAQ_CMD_MAX		64
#define VDAQ_REPLY_MAX		128

struct vdaq_cmd_hdr {
	__le32 opcode;
	__le32 reserved;
};

struct vdaq_resp_hdr {
	__le32 status;
	__le32 reserved;
};

/* DMA-able command buffers (kmalloc'ed, one command at a time). */
struct vdaq_ctrl_buf {
	struct vdaq_cmd_hdr hdr;
	u8 payload[VDAQ_CMD_MAX];
	struct vdaq_resp_hdr resp;
	u8 reply[VDAQ_REPLY_MAX];
};

/*
 * Pages a read keeps inside its request, page array and scatterlist alike:
 * 64 KiB at any offset. Larger reads allocate both.
 */
#define VDAQ_INLINE_PAGES	17

enum vdaq_req_state {
	VDAQ_REQ_NEW,		/* prepared, not yet on the data queue */
	VDAQ_REQ_POSTED,	/* on vd->posted, the device may write it */
	VDAQ_REQ_DONE,		/* back from the device or taken back */
};

/*
 * One read: the caller's pages, pinned, as one descriptor chain. Pinned by
 * this driver (@pinned), or, for an io_uring registered buffer, by io_uring
 * itself from registration until the read completes.
 * A synchronous read waits on @done and frees the request; an asynchronous
 * one is completed and freed by the bottom half through @iocb->ki_complete.
 */
struct vdaq_req {
	struct list_head node;
	struct vdaq_dev *vd;
	struct kiocb *iocb;		/* NULL: synchronous read() */
	bool iio;			/* an IIO capture buffer (vdaq_iio.c) */
	bool in_flight;			/* IIO: posted, or being completed */
	void *kbuf;			/* IIO: the kmalloc'ed buffer */
	struct scatterlist sg;		/* IIO: the one entry of @sgt */
	fl_owner_t owner;		/* files of the submitter (for ->flush) */
	struct completion done;
	enum vdaq_req_state state;
	bool cancel;			/* cancellation asked for */
	long result;			/* bytes or -errno */
	size_t len;
	unsigned int nr_pages;
	struct page **pages;		/* @inline_pages, or allocated */
	bool pinned;			/* @pages are pinned by this driver */
	bool sg_inline;			/* @sgt is over @inline_sg */
	struct sg_table sgt;
	/* last: written before use, not when allocated (vdaq_alloc_req) */
	struct page *inline_pages[VDAQ_INLINE_PAGES];
	struct scatterlist inline_sg[VDAQ_INLINE_PAGES];
};

struct vdaq_counters {
	u64 completed;
	u64 errors;
	u64 invalid;
	u64 rejected;
	u64 reclaimed;
	u64 cancellations;
	u64 dropped_frames;
	u64 overrun_buffers;
	u64 events;
	u64 events_dropped;
	u64 interrupts;
	u64 bottom_halves;
	u64 found_on_recheck;
	u64 resets;
	u64 bytes;
	u64 watchdog_recoveries;
	u64 config_changes;
	u64 violations;
	u64 first_violation;
	u64 unknown_events;
	u64 resets_with_status;
	u64 before_reset_produced;
	u64 before_reset_delivered;
	u64 before_reset_dropped;
	u64 before_reset_pending;
	u64 data_notifications;
};

struct vdaq_dev {
	struct kref kref;
	struct virtio_device *vdev;	/* NULL once removed */
	int index;
	char name[16];
	struct miscdevice misc;
	bool misc_registered;

	spinlock_t lock;			/* see the top of this file */
	struct virtqueue *vqs[VDAQ_QUEUE_COUNT];
	bool ready;			/* queues set up, reads accepted */
	bool removing;
	bool needs_reset;		/* recovery scheduled */
	struct list_head posted;	/* struct vdaq_req, oldest first */
	/*
	 * Reads the device returned out of order: it may still write into
	 * them (a stale used entry), so they complete only after the reset.
	 */
	struct list_head suspect;
	unsigned int nr_suspect;
	/*
	 * The data queue's used ring cannot be trusted since a violation:
	 * every read it returns goes to `suspect` until the reset.
	 */
	bool data_untrusted;
	/* `sequence` of the next completed buffer with a header, if known */
	u64 next_sequence;
	bool sequence_known;
	unsigned int nr_posted;		/* all of @posted */
	unsigned int nr_iio_posted;	/* of which IIO capture buffers */
	bool chardev_started;		/* START through /dev/vdaqN, no STOP since */
	bool iio_claimed;		/* the IIO buffer is enabled (vdaq_iio.c) */
	bool iio_events;		/* an IIO threshold event has the trigger */
	struct vdaq_iio *iio;		/* NULL: no IIO device */
	unsigned int frame_bytes;	/* 0: unknown format */
	u16 channels;			/* as configured (config space) */
	u8 format;
	unsigned int dataq_size;
	struct vdaq_counters cnt;

	/* event records for VDAQ_IOC_READ_EVENTS, oldest first */
	struct vdaq_event ring[VDAQ_EVENT_RING];
	unsigned int ring_head, ring_len, ring_dropped;
	struct vdaq_event *event_bufs;	/* VDAQ_EVENT_BUFFERS, DMA-able */

	struct mutex ctrl_mutex;	/* one command at a time */
	struct vdaq_ctrl_buf *ctrl;
	struct completion ctrl_done;
	unsigned int ctrl_used;
	bool ctrl_busy;			/* a command is on the control queue */
	bool ctrl_stuck;		/* it timed out: only a reset frees it */

	struct work_struct bh_work;	/* the bottom half */
	struct work_struct cancel_work;	/* FLUSH for cancelled reads */
	struct work_struct reset_work;	/* NEEDS_RESET recovery */
	struct delayed_work poll_work;	/* re-evaluates poll() while running */
	struct delayed_work watchdog;	/* finds completions whose IRQ was lost */
	bool watchdog_kick;		/* the watchdog queued the bottom half */
	u64 irqs_at_watchdog;

	wait_queue_head_t wq;		/* poll(), space in the data queue */
	atomic_t open_count;
};

extern struct workqueue_struct *vdaq_wq;
extern struct kmem_cache *vdaq_req_cache;
extern const struct file_operations vdaq_fops;
extern unsigned int vdaq_cmd_timeout_ms;
extern unsigned int vdaq_watchdog_ms;

/* vdaq_main.c */
void vdaq_put(struct vdaq_dev *vd);
void vdaq_get(struct vdaq_dev *vd);
void vdaq_schedule_reset(struct vdaq_dev *vd, const char *why);
void vdaq_refresh_frame_bytes(struct vdaq_dev *vd);
void vdaq_note_violation(struct vdaq_dev *vd, unsigned int code,
			 const char *what);
void vdaq_read_config(struct vdaq_dev *vd, struct vdaq_config *cfg);
bool vdaq_alive(struct vdaq_dev *vd);

/* vdaq_chardev.c */
void vdaq_complete_req(struct vdaq_req *req);
bool vdaq_read_header(struct vdaq_req *req, struct vdaq_buffer_header *h);
void vdaq_validate_used(struct vdaq_dev *vd, struct vdaq_req *req,
			unsigned int used, const struct vdaq_buffer_header *h);
void vdaq_cancel_work(struct work_struct *work);
void vdaq_poll_work(struct work_struct *work);
int vdaq_add_req_locked(struct vdaq_dev *vd, struct vdaq_req *req,
			bool *notify);
bool vdaq_chardev_streaming(struct vdaq_dev *vd);

/* vdaq_iio.c */
void vdaq_iio_register(struct vdaq_dev *vd);
void vdaq_iio_unregister(struct vdaq_dev *vd);
void vdaq_iio_complete(struct vdaq_req *req);
void vdaq_iio_resume(struct vdaq_dev *vd);
void vdaq_iio_reset_loss(struct vdaq_dev *vd, u64 pending);
void vdaq_iio_event(struct vdaq_dev *vd, const struct vdaq_event *ev);

/* vdaq_ctrl.c */
int vdaq_command(struct vdaq_dev *vd, u32 opcode, const void *payload,
		 size_t payload_len, void *reply, size_t reply_len);
int __vdaq_command(struct vdaq_dev *vd, u32 opcode, const void *payload,
		   size_t payload_len, void *reply, size_t reply_len);
int vdaq_flush_locked(struct vdaq_dev *vd, u32 *returned);
void vdaq_ctrl_complete(struct vdaq_dev *vd, unsigned int used);

/* Bytes per sample of a format code; 0 for a code the driver does not know. */
static inline unsigned int vdaq_sample_bytes(u8 format)
{
	switch (format) {
	case VDAQ_FORMAT_S16:
		return 2;
	case VDAQ_FORMAT_S32:
	case VDAQ_FORMAT_F32:
		return 4;
	default:
		return 0;
	}
}

#endif /* _VDAQ_H */
