// SPDX-License-Identifier: GPL-2.0
/*
 * vdaq: control-queue commands.
 *
 * One command at a time (vd->ctrl_mutex): the request header and payload and
 * the reply area live in one kmalloc'ed buffer, posted as one chain (a
 * device-readable part, then a device-writable part). The submitter sleeps
 * until the bottom half sees the reply, or until vdaq_cmd_timeout_ms passes.
 * After a timeout the buffer still belongs to the device: the control queue
 * is marked stuck, no further command is sent and a reset is scheduled, which
 * takes the buffer back.
 */

#include <linux/errno.h>
#include <linux/jiffies.h>
#include <linux/scatterlist.h>
#include <linux/string.h>

#include "vdaq.h"

static int vdaq_status_to_errno(u32 status)
{
	switch (status) {
	case VDAQ_STATUS_OK:
		return 0;
	case VDAQ_STATUS_UNSUPPORTED:
		return -EOPNOTSUPP;
	case VDAQ_STATUS_INVALID:
		return -EINVAL;
	case VDAQ_STATUS_BUSY:
		return -EBUSY;
	case VDAQ_STATUS_BAD_SIZE:
	default:
		return -EPROTO;
	}
}

/* Called by the bottom half (vd->lock held) when the reply came back. */
void vdaq_ctrl_complete(struct vdaq_dev *vd, unsigned int used)
{
	lockdep_assert_held(&vd->lock);
	if (!vd->ctrl_busy) {
		vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_UNSOLICITED,
				    "control reply nobody waits for");
		return;
	}
	vd->ctrl_used = used;
	vd->ctrl_busy = false;
	complete(&vd->ctrl_done);
}

/*
 * Sends one command and waits for its reply; vd->ctrl_mutex held.
 * Returns 0 with @reply_len bytes of reply payload in @reply, or -errno:
 * the device's status as an errno, -ETIMEDOUT (a reset is scheduled),
 * -EPROTO (malformed reply), -EIO/-ENODEV (no usable device).
 */
int __vdaq_command(struct vdaq_dev *vd, u32 opcode, const void *payload,
		   size_t payload_len, void *reply, size_t reply_len)
{
	struct vdaq_ctrl_buf *ctrl = vd->ctrl;
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	unsigned long timeout = msecs_to_jiffies(vdaq_cmd_timeout_ms);
	unsigned long slice = msecs_to_jiffies(vdaq_watchdog_ms ?: 100);
	unsigned long deadline;
	unsigned int used, status;
	bool notify;
	int err;

	lockdep_assert_held(&vd->ctrl_mutex);
	if (payload_len > VDAQ_CMD_MAX || reply_len > VDAQ_REPLY_MAX)
		return -EINVAL;

	spin_lock_irq(&vd->lock);
	if (!vd->ready || vd->ctrl_stuck) {
		spin_unlock_irq(&vd->lock);
		return vd->removing ? -ENODEV : -EIO;
	}
	ctrl->hdr.opcode = cpu_to_le32(opcode);
	ctrl->hdr.reserved = 0;
	if (payload_len)
		memcpy(ctrl->payload, payload, payload_len);
	memset(&ctrl->resp, 0, sizeof(ctrl->resp));
	memset(ctrl->reply, 0, sizeof(ctrl->reply));
	sg_init_one(&out, &ctrl->hdr, sizeof(ctrl->hdr) + payload_len);
	sg_init_one(&in, &ctrl->resp, sizeof(ctrl->resp) + reply_len);
	reinit_completion(&vd->ctrl_done);
	err = virtqueue_add_sgs(vd->vqs[VDAQ_QUEUE_CONTROL], sgs, 1, 1, ctrl,
				GFP_ATOMIC);
	if (err) {
		spin_unlock_irq(&vd->lock);
		return -EIO;
	}
	vd->ctrl_busy = true;
	notify = virtqueue_kick_prepare(vd->vqs[VDAQ_QUEUE_CONTROL]);
	spin_unlock_irq(&vd->lock);
	if (notify)
		virtqueue_notify(vd->vqs[VDAQ_QUEUE_CONTROL]);

	/*
	 * Waits in slices of the watchdog period, running the bottom half
	 * after each: a reply whose interrupt was lost (or withheld) is found
	 * then, not at the timeout.
	 */
	deadline = jiffies + timeout;
	while (!wait_for_completion_timeout(&vd->ctrl_done, slice)) {
		if (time_after_eq(jiffies, deadline))
			break;
		queue_work(vdaq_wq, &vd->bh_work);
	}
	if (!completion_done(&vd->ctrl_done)) {
		spin_lock_irq(&vd->lock);
		if (vd->ctrl_busy) {
			vd->ctrl_stuck = true;
			vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_MISSING,
					    "command never answered");
			spin_unlock_irq(&vd->lock);
			dev_err(vd->misc.this_device,
				"command %u: no reply within %u ms, resetting the device\n",
				opcode, vdaq_cmd_timeout_ms);
			vdaq_schedule_reset(vd, "command timeout");
			return -ETIMEDOUT;
		}
		spin_unlock_irq(&vd->lock);
	}

	used = vd->ctrl_used;
	if (!used)
		return -EPROTO;	/* used length 0: the device refused the chain */
	err = 0;
	status = le32_to_cpu(ctrl->resp.status);
	spin_lock_irq(&vd->lock);
	if (used > sizeof(ctrl->resp) + reply_len) {
		vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_LONG,
				    "command reply beyond its area");
		err = -EPROTO;
	} else if (used < sizeof(ctrl->resp)) {
		vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_SHORT,
				    "command reply shorter than its header");
		err = -EPROTO;
	} else if (status > VDAQ_STATUS_BUSY) {
		vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_STATUS,
				    "command reply with undefined status");
		err = -EPROTO;
	}
	spin_unlock_irq(&vd->lock);
	if (err)
		return err;
	err = vdaq_status_to_errno(status);
	if (err)
		return err;
	if (used < sizeof(ctrl->resp) + reply_len) {
		/* an OK reply without its payload */
		spin_lock_irq(&vd->lock);
		vdaq_note_violation(vd, VDAQ_VIOLATION_REPLY_SHORT,
				    "command reply shorter than its payload");
		spin_unlock_irq(&vd->lock);
		return -EPROTO;
	}
	if (reply_len)
		memcpy(reply, ctrl->reply, reply_len);
	return 0;
}

int vdaq_command(struct vdaq_dev *vd, u32 opcode, const void *payload,
		 size_t payload_len, void *reply, size_t reply_len)
{
	int err;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	err = __vdaq_command(vd, opcode, payload, payload_len, reply,
			     reply_len);
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

/* FLUSH: the device returns every read buffer it holds; ctrl_mutex held. */
int vdaq_flush_locked(struct vdaq_dev *vd, u32 *returned)
{
	struct vdaq_flush_reply reply;
	int err;

	err = __vdaq_command(vd, VDAQ_CMD_FLUSH, NULL, 0, &reply,
			     sizeof(reply));
	if (!err && returned)
		*returned = le32_to_cpu(reply.buffers_returned);
	return err;
}
