// SPDX-License-Identifier: GPL-2.0
/*
 * vdaq: Linux driver for the vdaq virtio DAQ card (docs/spec.md).
 *
 * This file: probe and identity check, feature negotiation, the three
 * virtqueues, the top half (virtqueue callbacks) and the bottom half,
 * device reset with every read taken back (NEEDS_RESET recovery, removal),
 * sysfs counters and module init.
 *
 * Top half: each virtqueue callback disables further callbacks of its queue
 * and queues the bottom half, nothing else. Bottom half: a work item on a
 * high-priority workqueue, because completing a read unpins the caller's
 * pages with unpin_user_pages_dirty_lock(), which takes the page lock and
 * may sleep; a tasklet could not. It pops every used buffer of the three
 * queues, validates and completes it, re-enables callbacks and, if
 * virtqueue_enable_cb() reports buffers that arrived meanwhile, goes again.
 */

#include <linux/device.h>
#include <linux/idr.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/platform_device.h>
#include <linux/slab.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "vdaq.h"

static bool crc;
module_param(crc, bool, 0444);
MODULE_PARM_DESC(crc, "Negotiate VIRTIO_DAQ_F_CRC32 (payload CRCs), default off");

static bool trigger = true;
module_param(trigger, bool, 0444);
MODULE_PARM_DESC(trigger, "Negotiate VIRTIO_DAQ_F_TRIGGER, default on");

unsigned int vdaq_cmd_timeout_ms = 2000;
module_param_named(cmd_timeout_ms, vdaq_cmd_timeout_ms, uint, 0644);
MODULE_PARM_DESC(cmd_timeout_ms,
		 "Control command timeout before the device is reset (ms)");

unsigned int vdaq_watchdog_ms = 100;
module_param_named(watchdog_ms, vdaq_watchdog_ms, uint, 0644);
MODULE_PARM_DESC(watchdog_ms,
		 "While reads are posted, look for completions without an interrupt this often (ms, 0 = off)");

struct workqueue_struct *vdaq_wq;
struct kmem_cache *vdaq_req_cache;
static DEFINE_IDA(vdaq_ida);

static void vdaq_release(struct kref *kref)
{
	struct vdaq_dev *vd = container_of(kref, struct vdaq_dev, kref);

	kfree(vd->event_bufs);
	kfree(vd->ctrl);
	kfree(vd);
}

void vdaq_get(struct vdaq_dev *vd)
{
	kref_get(&vd->kref);
}

void vdaq_put(struct vdaq_dev *vd)
{
	kref_put(&vd->kref, vdaq_release);
}

/* True while the device is bound and its queues are usable. */
bool vdaq_alive(struct vdaq_dev *vd)
{
	unsigned long flags;
	bool alive;

	spin_lock_irqsave(&vd->lock, flags);
	alive = vd->ready && !vd->removing;
	spin_unlock_irqrestore(&vd->lock, flags);
	return alive;
}

/*
 * Reads the whole configuration space in 32-bit accesses, retried while
 * the generation changes. Counters may still tear (spec 5.x.4).
 * Caller holds ctrl_mutex with the device ready, or is probe/remove.
 */
void vdaq_read_config(struct vdaq_dev *vd, struct vdaq_config *cfg)
{
	struct virtio_device *vdev = vd->vdev;
	u32 *words = (u32 *)cfg;
	u32 gen, old;
	unsigned int i;

	BUILD_BUG_ON(sizeof(*cfg) != VDAQ_CONFIG_SIZE);
	gen = vdev->config->generation ? vdev->config->generation(vdev) : 0;
	do {
		old = gen;
		for (i = 0; i < VDAQ_CONFIG_SIZE / 4; i++)
			vdev->config->get(vdev, i * 4, &words[i], 4);
		gen = vdev->config->generation ?
		      vdev->config->generation(vdev) : 0;
	} while (gen != old);
}

/* Re-reads channels and format; caller holds ctrl_mutex (or probes). */
void vdaq_refresh_frame_bytes(struct vdaq_dev *vd)
{
	struct virtio_device *vdev = vd->vdev;
	unsigned int bytes;
	u16 channels;
	u8 format;

	channels = virtio_cread16(vdev, offsetof(struct vdaq_config, channels));
	format = virtio_cread8(vdev, offsetof(struct vdaq_config, format));
	bytes = vdaq_sample_bytes(format) * channels;
	spin_lock_irq(&vd->lock);
	vd->frame_bytes = bytes;
	vd->channels = channels;
	vd->format = format;
	spin_unlock_irq(&vd->lock);
	if (!bytes)
		dev_warn(&vdev->dev, "config: %u channels, format %u: no frame size\n",
			 channels, format);
}

/*
 * Device ID 21 is also VIRTIO_ID_SIGNAL_DIST: check the identity fields
 * (spec 5.x.1: firmware major 1, a NUL-padded ASCII model) and sane limits
 * before touching anything else. A newer minor version is accepted.
 */
static int vdaq_check_identity(struct vdaq_dev *vd, bool at_probe)
{
	struct virtio_device *vdev = vd->vdev;
	struct vdaq_config cfg;
	u32 fw, formats;
	unsigned int i, len;
	u16 max_ch, ch;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "transport without a configuration space\n");
		return -ENODEV;
	}
	vdaq_read_config(vd, &cfg);
	fw = le32_to_cpu(cfg.firmware_version);
	if (fw >> 16 != VDAQ_FIRMWARE_MAJOR) {
		dev_err(&vdev->dev,
			"device ID %u is not a vdaq card: firmware_version %#x, need major %u\n",
			vdev->id.device, fw, VDAQ_FIRMWARE_MAJOR);
		return -ENODEV;
	}
	for (len = 0; len < VDAQ_MODEL_LEN && cfg.model[len]; len++)
		if (cfg.model[len] < 0x20 || cfg.model[len] > 0x7e)
			break;
	for (i = len; i < VDAQ_MODEL_LEN; i++)
		if (cfg.model[i])
			break;
	if (!len || i != VDAQ_MODEL_LEN) {
		dev_err(&vdev->dev,
			"device ID %u is not a vdaq card: model is not NUL-padded ASCII\n",
			vdev->id.device);
		return -ENODEV;
	}
	max_ch = le16_to_cpu(cfg.max_channels);
	ch = le16_to_cpu(cfg.channels);
	formats = le32_to_cpu(cfg.supported_formats);
	if (!max_ch || max_ch > VDAQ_MAX_CHANNELS || !ch || ch > max_ch ||
	    !vdaq_sample_bytes(cfg.format) || !(formats & BIT(cfg.format)) ||
	    !le32_to_cpu(cfg.min_rate_hz) ||
	    le32_to_cpu(cfg.min_rate_hz) > le32_to_cpu(cfg.max_rate_hz) ||
	    !le32_to_cpu(cfg.fifo_frames) || cfg.state > VDAQ_STATE_NEEDS_RESET) {
		dev_err(&vdev->dev,
			"vdaq card with an invalid config: channels %u/%u, formats %#x, format %u, rate %u..%u, fifo %u, state %u\n",
			ch, max_ch, formats, cfg.format,
			le32_to_cpu(cfg.min_rate_hz), le32_to_cpu(cfg.max_rate_hz),
			le32_to_cpu(cfg.fifo_frames), cfg.state);
		return -ENODEV;
	}
	if (at_probe)
		dev_info(&vdev->dev, "vdaq card \"%.*s\" firmware %u.%u, %u channels max, state %u\n",
			 len, cfg.model, fw >> 16, fw & 0xffff, max_ch, cfg.state);
	return 0;
}

/*
 * The device broke the protocol (vd->lock held): counted, the first kept for
 * VDAQ_IOC_GET_STATS, logged. The device is untrusted: nothing it returned
 * in violation is used.
 */
void vdaq_note_violation(struct vdaq_dev *vd, unsigned int code,
			 const char *what)
{
	lockdep_assert_held(&vd->lock);
	vd->cnt.violations++;
	if (!vd->cnt.first_violation)
		vd->cnt.first_violation = code;
	dev_err_ratelimited(vd->misc.this_device, "device violation: %s\n",
			    what);
}

/* The top half: for every queue, and for the shared MSI-X vector. */
static void vdaq_vq_callback(struct virtqueue *vq)
{
	struct vdaq_dev *vd = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&vd->lock, flags);
	virtqueue_disable_cb(vq);
	vd->cnt.interrupts++;
	spin_unlock_irqrestore(&vd->lock, flags);
	queue_work(vdaq_wq, &vd->bh_work);
}

/* vd->lock held. */
static void __vdaq_schedule_reset(struct vdaq_dev *vd)
{
	lockdep_assert_held(&vd->lock);
	if (vd->removing || vd->needs_reset)
		return;
	vd->needs_reset = true;
	queue_work(vdaq_wq, &vd->reset_work);
}

void vdaq_schedule_reset(struct vdaq_dev *vd, const char *why)
{
	unsigned long flags;
	bool scheduled;

	spin_lock_irqsave(&vd->lock, flags);
	scheduled = !vd->removing && !vd->needs_reset;
	__vdaq_schedule_reset(vd);
	spin_unlock_irqrestore(&vd->lock, flags);
	if (scheduled)
		dev_warn(vd->misc.this_device, "reset scheduled: %s\n", why);
	wake_up_all(&vd->wq);
}

static void vdaq_post_event_buf(struct vdaq_dev *vd, struct vdaq_event *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, sizeof(*buf));
	if (virtqueue_add_inbuf(vd->vqs[VDAQ_QUEUE_EVENT], &sg, 1, buf,
				GFP_ATOMIC))
		dev_warn_ratelimited(vd->misc.this_device,
				     "cannot repost an event buffer\n");
}

/*
 * Whether the header @h (NULL: none) of a read the device returned carries
 * the next `sequence` (the device numbers completed buffers one by one, spec
 * 5.x.6.1); vd->lock held. Reads without a completed header say nothing.
 */
static bool vdaq_sequence_follows(struct vdaq_dev *vd,
				  const struct vdaq_buffer_header *h)
{
	u64 sequence;

	if (!h || h->status != VDAQ_BUF_STATUS_OK)
		return true;
	sequence = le64_to_cpu(h->sequence);
	if (vd->sequence_known && sequence != vd->next_sequence)
		return false;
	vd->next_sequence = sequence + 1;
	vd->sequence_known = true;
	return true;
}

/*
 * A read the device returned out of order (reads complete in the order they
 * were made available, spec 5.x.6.2), with a sequence that skips, or from a
 * ring already untrusted: a stale used entry (a used index that jumped) for
 * pages the device may still write. They stay pinned, off the queue, until
 * the reset; vd->lock held.
 */
static void vdaq_suspect_req(struct vdaq_dev *vd, struct vdaq_req *req)
{
	lockdep_assert_held(&vd->lock);
	if (!vd->data_untrusted) {
		vdaq_note_violation(vd, VDAQ_VIOLATION_COMPLETION_ORDER,
				    "read completed out of order");
		vd->data_untrusted = true;
		__vdaq_schedule_reset(vd);
	}
	list_move_tail(&req->node, &vd->suspect);
	vd->nr_posted--;
	if (req->iio)
		vd->nr_iio_posted--;
	vd->nr_suspect++;
}

/* Pops every used buffer of queue @q; vd->lock held. Returns the count. */
static unsigned int vdaq_drain_queue(struct vdaq_dev *vd, unsigned int q,
				     struct list_head *done, bool repost)
{
	struct virtqueue *vq = vd->vqs[q];
	struct vdaq_buffer_header h, *header;
	struct vdaq_event *ev;
	struct vdaq_req *req;
	unsigned int len, n = 0;
	bool kick = false;
	void *token;

	while ((token = virtqueue_get_buf(vq, &len))) {
		n++;
		switch (q) {
		case VDAQ_QUEUE_DATA:
			req = token;
			/* one copy of the header serves every check */
			header = NULL;
			if (len >= VDAQ_HEADER_SIZE && len <= req->len &&
			    vdaq_read_header(req, &h))
				header = &h;
			if (vd->data_untrusted ||
			    req != list_first_entry(&vd->posted, struct vdaq_req,
						    node) ||
			    !vdaq_sequence_follows(vd, header)) {
				vdaq_suspect_req(vd, req);
				break;
			}
			list_del(&req->node);
			vd->nr_posted--;
			if (req->iio)
				vd->nr_iio_posted--;
			vdaq_validate_used(vd, req, len, header);
			req->state = VDAQ_REQ_DONE;
			list_add_tail(&req->node, done);
			break;
		case VDAQ_QUEUE_CONTROL:
			if (token != vd->ctrl)
				vdaq_note_violation(vd,
						    VDAQ_VIOLATION_REPLY_UNSOLICITED,
						    "unknown control token");
			else
				vdaq_ctrl_complete(vd, len);
			break;
		case VDAQ_QUEUE_EVENT:
			ev = token;
			if (len >= sizeof(*ev)) {
				unsigned int slot;

				vd->cnt.events++;
				if (vd->ring_len == VDAQ_EVENT_RING) {
					/* keep the newest: drop the oldest */
					vd->ring_head = (vd->ring_head + 1) %
							VDAQ_EVENT_RING;
					vd->ring_len--;
					vd->ring_dropped++;
					vd->cnt.events_dropped++;
				}
				slot = (vd->ring_head + vd->ring_len) %
				       VDAQ_EVENT_RING;
				vd->ring[slot] = *ev;
				vd->ring_len++;
				/* spec 5.x.6.9: unknown kinds change nothing */
				if (le32_to_cpu(ev->kind) < VDAQ_EVENT_OVERRUN ||
				    le32_to_cpu(ev->kind) > VDAQ_EVENT_NEEDS_RESET)
					vd->cnt.unknown_events++;
				vdaq_iio_event(vd, ev);
				if (le32_to_cpu(ev->kind) ==
				    VDAQ_EVENT_NEEDS_RESET) {
					dev_warn(vd->misc.this_device,
						 "NEEDS_RESET event, fault %llu\n",
						 le64_to_cpu(ev->arg0));
					__vdaq_schedule_reset(vd);
				}
			}
			if (repost) {
				vdaq_post_event_buf(vd, ev);
				kick = true;
			}
			break;
		}
	}
	if (kick)
		virtqueue_kick(vq);
	return n;
}

/* Completes the requests on @done; no locks held (may sleep). */
static void vdaq_complete_list(struct list_head *done)
{
	struct vdaq_req *req, *tmp;

	list_for_each_entry_safe(req, tmp, done, node) {
		list_del_init(&req->node);
		if (req->iio)
			vdaq_iio_complete(req);
		else
			vdaq_complete_req(req);
	}
}

/*
 * The lost-interrupt watchdog: while reads are posted, runs the bottom half
 * every watchdog_ms. Completions it finds although no interrupt came since
 * it last looked are counted in watchdog_recoveries.
 */
static void vdaq_watchdog(struct work_struct *work)
{
	struct vdaq_dev *vd = container_of(to_delayed_work(work),
					   struct vdaq_dev, watchdog);

	spin_lock_irq(&vd->lock);
	if (vd->ready && vd->nr_posted) {
		vd->watchdog_kick = vd->cnt.interrupts == vd->irqs_at_watchdog;
		vd->irqs_at_watchdog = vd->cnt.interrupts;
		queue_work(vdaq_wq, &vd->bh_work);
		if (vdaq_watchdog_ms && !vd->removing)
			queue_delayed_work(vdaq_wq, &vd->watchdog,
					   msecs_to_jiffies(vdaq_watchdog_ms));
	}
	spin_unlock_irq(&vd->lock);
}

/* The bottom half. */
static void vdaq_bh(struct work_struct *work)
{
	struct vdaq_dev *vd = container_of(work, struct vdaq_dev, bh_work);
	unsigned int q, n, found = 0;
	LIST_HEAD(done);
	bool first, watchdog;

	spin_lock_irq(&vd->lock);
	if (!vd->ready) {
		spin_unlock_irq(&vd->lock);
		return;
	}
	vd->cnt.bottom_halves++;
	watchdog = vd->watchdog_kick && vd->cnt.interrupts == vd->irqs_at_watchdog;
	vd->watchdog_kick = false;
	for (q = 0; q < VDAQ_QUEUE_COUNT; q++) {
		first = true;
		do {
			virtqueue_disable_cb(vd->vqs[q]);
			n = vdaq_drain_queue(vd, q, &done, true);
			found += n;
			if (!first)
				vd->cnt.found_on_recheck += n;
			first = false;
			/* false: buffers arrived since the drain, go again */
		} while (!virtqueue_enable_cb(vd->vqs[q]) &&
			 !virtqueue_is_broken(vd->vqs[q]));
		/*
		 * The virtio core refused a used entry (an id out of range or
		 * naming no buffer head) and marked the ring broken: only a
		 * reset brings the queue back.
		 */
		if (virtqueue_is_broken(vd->vqs[q]) && !vd->needs_reset &&
		    !vd->removing) {
			vdaq_note_violation(vd, VDAQ_VIOLATION_USED_ID_REFUSED,
					    "used id out of range or naming no buffer");
			__vdaq_schedule_reset(vd);
		}
	}
	if (watchdog && found)
		vd->cnt.watchdog_recoveries++;
	spin_unlock_irq(&vd->lock);
	vdaq_complete_list(&done);
	wake_up_all(&vd->wq);
}

static void vdaq_config_changed(struct virtio_device *vdev)
{
	struct vdaq_dev *vd = vdev->priv;
	unsigned long flags;

	/* Read `state` in process context: the reset work does it. */
	spin_lock_irqsave(&vd->lock, flags);
	vd->cnt.config_changes++;
	if (!vd->removing)
		queue_work(vdaq_wq, &vd->reset_work);
	spin_unlock_irqrestore(&vd->lock, flags);
}

/* Creates the queues, posts the event buffers, sets DRIVER_OK. */
static int vdaq_setup(struct vdaq_dev *vd)
{
	static const char * const names[VDAQ_QUEUE_COUNT] = {
		"data", "control", "event"
	};
	vq_callback_t *cbs[VDAQ_QUEUE_COUNT] = {
		vdaq_vq_callback, vdaq_vq_callback, vdaq_vq_callback
	};
	struct virtio_device *vdev = vd->vdev;
	struct virtqueue *vqs[VDAQ_QUEUE_COUNT];
	unsigned int i;
	int err;

	err = virtio_find_vqs(vdev, VDAQ_QUEUE_COUNT, vqs, cbs, names, NULL);
	if (err) {
		dev_err(&vdev->dev, "cannot set up the virtqueues: %d\n", err);
		return err;
	}
	spin_lock_irq(&vd->lock);
	memcpy(vd->vqs, vqs, sizeof(vqs));
	vd->dataq_size = virtqueue_get_vring_size(vqs[VDAQ_QUEUE_DATA]);
	for (i = 0; i < VDAQ_EVENT_BUFFERS; i++)
		vdaq_post_event_buf(vd, &vd->event_bufs[i]);
	vd->ctrl_busy = false;
	vd->ctrl_stuck = false;
	vd->needs_reset = false;
	vd->data_untrusted = false;
	vd->sequence_known = false;
	spin_unlock_irq(&vd->lock);

	virtio_device_ready(vdev);
	virtqueue_kick(vqs[VDAQ_QUEUE_EVENT]);
	vdaq_refresh_frame_bytes(vd);

	spin_lock_irq(&vd->lock);
	vd->ready = true;
	spin_unlock_irq(&vd->lock);
	/* a callback that ran before `ready` left its queue disabled */
	queue_work(vdaq_wq, &vd->bh_work);
	return 0;
}

/*
 * Resets the device and takes every buffer back; ctrl_mutex held (or the
 * device not yet visible). Reads the device returned before the reset
 * complete with their data; reads it still held complete with @err.
 */
static void vdaq_teardown(struct vdaq_dev *vd, int err)
{
	struct virtio_device *vdev = vd->vdev;
	unsigned int q, reclaimed = 0;
	struct vdaq_req *req, *next;
	LIST_HEAD(done);
	void *token;

	spin_lock_irq(&vd->lock);
	vd->ready = false;
	spin_unlock_irq(&vd->lock);

	/*
	 * After the reset the device touches no ring or buffer; with
	 * vhost-user the rings stop first and the backend completes what it
	 * held as by FLUSH. The transport synchronises its interrupt
	 * handlers, so no callback runs after this, and the bottom half can
	 * be cancelled: this function drains the rings itself.
	 */
	virtio_reset_device(vdev);
	cancel_work_sync(&vd->bh_work);

	spin_lock_irq(&vd->lock);
	for (q = 0; q < VDAQ_QUEUE_COUNT; q++)
		vdaq_drain_queue(vd, q, &done, false);
	/* the device is reset: reads it returned out of order are ours now */
	list_for_each_entry_safe(req, next, &vd->suspect, node) {
		list_move_tail(&req->node, &done);
		vd->nr_suspect--;
		req->state = VDAQ_REQ_DONE;
		req->result = err;
		vd->cnt.reclaimed++;
		vd->cnt.errors++;
		reclaimed++;
	}
	while ((token = virtqueue_detach_unused_buf(vd->vqs[VDAQ_QUEUE_DATA]))) {
		req = token;
		list_del(&req->node);
		vd->nr_posted--;
		if (req->iio)
			vd->nr_iio_posted--;
		req->state = VDAQ_REQ_DONE;
		req->result = err;
		vd->cnt.reclaimed++;
		vd->cnt.errors++;
		reclaimed++;
		list_add_tail(&req->node, &done);
	}
	if (virtqueue_detach_unused_buf(vd->vqs[VDAQ_QUEUE_CONTROL]))
		vdaq_ctrl_complete(vd, 0);
	while (virtqueue_detach_unused_buf(vd->vqs[VDAQ_QUEUE_EVENT]))
		;
	WARN_ON(vd->nr_posted || !list_empty(&vd->posted));
	vd->ctrl_busy = false;
	/* reset: the card is STOPPED, whoever started it */
	vd->chardev_started = false;
	spin_unlock_irq(&vd->lock);

	vdev->config->del_vqs(vdev);
	memset(vd->vqs, 0, sizeof(vd->vqs));
	vdaq_complete_list(&done);
	if (reclaimed)
		dev_info(&vdev->dev, "%u reads taken back at reset (%d)\n",
			 reclaimed, err);
	wake_up_all(&vd->wq);
}

/* NEEDS_RESET (event or config `state`), a stuck command, a dead device. */
static void vdaq_reset_work(struct work_struct *work)
{
	struct vdaq_dev *vd = container_of(work, struct vdaq_dev, reset_work);
	struct virtio_device *vdev = vd->vdev;
	struct vdaq_status st;
	bool need, dead;
	int err;

	mutex_lock(&vd->ctrl_mutex);
	spin_lock_irq(&vd->lock);
	need = vd->needs_reset || vd->ctrl_stuck;
	dead = vd->ctrl_stuck;
	if (vd->removing || !vd->ready) {
		spin_unlock_irq(&vd->lock);
		goto out;
	}
	spin_unlock_irq(&vd->lock);
	if (vdaq_check_identity(vd, false)) {
		/*
		 * Spec 5.x.4: values no vdaq card can have (after a
		 * configuration change). Nothing the device says can be
		 * trusted: reset it, return every read, leave it down.
		 */
		spin_lock_irq(&vd->lock);
		vdaq_note_violation(vd, VDAQ_VIOLATION_CONFIG_IMPOSSIBLE,
				    "configuration space holds impossible values");
		spin_unlock_irq(&vd->lock);
		vdaq_teardown(vd, -EPROTO);
		virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED);
		goto out;
	}
	if (!need && virtio_cread8(vdev, offsetof(struct vdaq_config, state)) ==
	    VDAQ_STATE_NEEDS_RESET) {
		dev_warn(&vdev->dev, "config state NEEDS_RESET, fault %u\n",
			 virtio_cread32(vdev, offsetof(struct vdaq_config,
						       fault_code)));
		need = true;
	}
	if (!need)
		goto out;
	/* GET_STATUS still answers in NEEDS_RESET: log the counters. */
	if (!dead &&
	    !__vdaq_command(vd, VDAQ_CMD_GET_STATUS, NULL, 0, &st, sizeof(st))) {
		dev_info(&vdev->dev,
			 "before reset: produced %llu delivered %llu dropped %llu pending %llu held %llu\n",
			 le64_to_cpu(st.frames_produced),
			 le64_to_cpu(st.frames_delivered),
			 le64_to_cpu(st.frames_dropped),
			 le64_to_cpu(st.frames_pending),
			 le64_to_cpu(st.buffers_held));
		vdaq_iio_reset_loss(vd, le64_to_cpu(st.frames_pending));
		spin_lock_irq(&vd->lock);
		vd->cnt.resets_with_status++;
		vd->cnt.before_reset_produced += le64_to_cpu(st.frames_produced);
		vd->cnt.before_reset_delivered += le64_to_cpu(st.frames_delivered);
		vd->cnt.before_reset_dropped += le64_to_cpu(st.frames_dropped);
		vd->cnt.before_reset_pending += le64_to_cpu(st.frames_pending);
		spin_unlock_irq(&vd->lock);
	}
	/*
	 * Counted before the reads are taken back, so that an application
	 * that sees them come back -EIO finds the reset counted.
	 */
	spin_lock_irq(&vd->lock);
	vd->cnt.resets++;
	spin_unlock_irq(&vd->lock);
	vdaq_teardown(vd, -EIO);
	if (dead) {
		/*
		 * A device that stopped answering (a dead vhost-user backend)
		 * is left reset and down: initialising it again would make
		 * QEMU's generic vhost-user device start rings without a
		 * backend (it aborts). Removal and re-plug bring a new one.
		 */
		dev_err(&vdev->dev,
			"device does not answer: reset, every read returned, device left down until removed\n");
		goto out;
	}

	/* Initialise again, as after power-on: reset, ACK, DRIVER, features. */
	virtio_add_status(vdev, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	virtio_add_status(vdev, VIRTIO_CONFIG_S_DRIVER);
	err = vdev->config->finalize_features(vdev);
	if (!err) {
		virtio_add_status(vdev, VIRTIO_CONFIG_S_FEATURES_OK);
		if (!(vdev->config->get_status(vdev) &
		      VIRTIO_CONFIG_S_FEATURES_OK))
			err = -ENODEV;
	}
	if (!err)
		err = vdaq_setup(vd);
	if (err) {
		virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED);
		dev_err(&vdev->dev, "re-initialisation after reset failed: %d\n",
			err);
	} else {
		dev_info(&vdev->dev, "device reset and initialised again\n");
		vdaq_iio_resume(vd);
	}
out:
	mutex_unlock(&vd->ctrl_mutex);
	wake_up_all(&vd->wq);
}

static int vdaq_validate(struct virtio_device *vdev)
{
	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "device without VIRTIO_F_VERSION_1\n");
		return -ENODEV;
	}
	if (!crc)
		__virtio_clear_bit(vdev, VDAQ_F_CRC32);
	if (!trigger)
		__virtio_clear_bit(vdev, VDAQ_F_TRIGGER);
	return 0;
}

/* sysfs: the driver's counters, on the misc device (/sys/class/misc/vdaqN). */
static struct vdaq_dev *dev_to_vdaq(struct device *dev)
{
	struct miscdevice *misc = dev_get_drvdata(dev);

	return container_of(misc, struct vdaq_dev, misc);
}

#define VDAQ_COUNTER_ATTR(field)					\
static ssize_t field##_show(struct device *dev,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct vdaq_dev *vd = dev_to_vdaq(dev);				\
	u64 v;								\
									\
	spin_lock_irq(&vd->lock);					\
	v = vd->cnt.field;						\
	spin_unlock_irq(&vd->lock);					\
	return sysfs_emit(buf, "%llu\n", v);				\
}									\
static DEVICE_ATTR_RO(field)

VDAQ_COUNTER_ATTR(completed);
VDAQ_COUNTER_ATTR(errors);
VDAQ_COUNTER_ATTR(invalid);
VDAQ_COUNTER_ATTR(rejected);
VDAQ_COUNTER_ATTR(reclaimed);
VDAQ_COUNTER_ATTR(cancellations);
VDAQ_COUNTER_ATTR(dropped_frames);
VDAQ_COUNTER_ATTR(overrun_buffers);
VDAQ_COUNTER_ATTR(events);
VDAQ_COUNTER_ATTR(events_dropped);
VDAQ_COUNTER_ATTR(interrupts);
VDAQ_COUNTER_ATTR(bottom_halves);
VDAQ_COUNTER_ATTR(config_changes);
VDAQ_COUNTER_ATTR(found_on_recheck);
VDAQ_COUNTER_ATTR(resets);
VDAQ_COUNTER_ATTR(bytes);
VDAQ_COUNTER_ATTR(watchdog_recoveries);
VDAQ_COUNTER_ATTR(violations);
VDAQ_COUNTER_ATTR(first_violation);
VDAQ_COUNTER_ATTR(unknown_events);
VDAQ_COUNTER_ATTR(data_notifications);

static ssize_t pending_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct vdaq_dev *vd = dev_to_vdaq(dev);
	unsigned int v;

	spin_lock_irq(&vd->lock);
	v = vd->nr_posted;
	spin_unlock_irq(&vd->lock);
	return sysfs_emit(buf, "%u\n", v);
}
static DEVICE_ATTR_RO(pending);

static ssize_t features_show(struct device *dev, struct device_attribute *attr,
			     char *buf)
{
	struct vdaq_dev *vd = dev_to_vdaq(dev);

	return sysfs_emit(buf, "%#llx\n", vd->vdev->features);
}
static DEVICE_ATTR_RO(features);

static ssize_t state_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	static const char * const names[] = { "stopped", "running",
					      "needs_reset" };
	struct vdaq_dev *vd = dev_to_vdaq(dev);
	ssize_t ret;
	u8 state;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		ret = sysfs_emit(buf, "down\n");
	} else {
		state = virtio_cread8(vd->vdev,
				      offsetof(struct vdaq_config, state));
		ret = state < ARRAY_SIZE(names) ?
		      sysfs_emit(buf, "%s\n", names[state]) :
		      sysfs_emit(buf, "%u\n", state);
	}
	mutex_unlock(&vd->ctrl_mutex);
	return ret;
}
static DEVICE_ATTR_RO(state);

static struct attribute *vdaq_attrs[] = {
	&dev_attr_completed.attr,
	&dev_attr_errors.attr,
	&dev_attr_invalid.attr,
	&dev_attr_rejected.attr,
	&dev_attr_reclaimed.attr,
	&dev_attr_cancellations.attr,
	&dev_attr_pending.attr,
	&dev_attr_dropped_frames.attr,
	&dev_attr_overrun_buffers.attr,
	&dev_attr_events.attr,
	&dev_attr_events_dropped.attr,
	&dev_attr_interrupts.attr,
	&dev_attr_bottom_halves.attr,
	&dev_attr_config_changes.attr,
	&dev_attr_found_on_recheck.attr,
	&dev_attr_resets.attr,
	&dev_attr_bytes.attr,
	&dev_attr_watchdog_recoveries.attr,
	&dev_attr_violations.attr,
	&dev_attr_first_violation.attr,
	&dev_attr_unknown_events.attr,
	&dev_attr_data_notifications.attr,
	&dev_attr_features.attr,
	&dev_attr_state.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vdaq);

static int vdaq_probe(struct virtio_device *vdev)
{
	struct vdaq_dev *vd;
	int err;

	vd = kzalloc(sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return -ENOMEM;
	kref_init(&vd->kref);
	spin_lock_init(&vd->lock);
	mutex_init(&vd->ctrl_mutex);
	init_completion(&vd->ctrl_done);
	INIT_LIST_HEAD(&vd->posted);
	INIT_LIST_HEAD(&vd->suspect);
	INIT_WORK(&vd->bh_work, vdaq_bh);
	INIT_WORK(&vd->cancel_work, vdaq_cancel_work);
	INIT_WORK(&vd->reset_work, vdaq_reset_work);
	INIT_DELAYED_WORK(&vd->poll_work, vdaq_poll_work);
	INIT_DELAYED_WORK(&vd->watchdog, vdaq_watchdog);
	init_waitqueue_head(&vd->wq);
	vd->vdev = vdev;
	vd->index = -1;
	vdev->priv = vd;

	vd->ctrl = kzalloc(sizeof(*vd->ctrl), GFP_KERNEL);
	vd->event_bufs = kcalloc(VDAQ_EVENT_BUFFERS, sizeof(*vd->event_bufs),
				 GFP_KERNEL);
	if (!vd->ctrl || !vd->event_bufs) {
		err = -ENOMEM;
		goto err_free;
	}
	err = vdaq_check_identity(vd, true);
	if (err)
		goto err_free;
	err = ida_alloc(&vdaq_ida, GFP_KERNEL);
	if (err < 0)
		goto err_free;
	vd->index = err;
	snprintf(vd->name, sizeof(vd->name), "vdaq%d", vd->index);
	/* dev_*() on misc.this_device before it exists prints "(NULL device)" */
	vd->misc.this_device = &vdev->dev;

	err = vdaq_setup(vd);
	if (err)
		goto err_ida;

	vd->misc.minor = MISC_DYNAMIC_MINOR;
	vd->misc.name = vd->name;
	vd->misc.fops = &vdaq_fops;
	vd->misc.parent = &vdev->dev;
	vd->misc.groups = vdaq_groups;
	err = misc_register(&vd->misc);
	if (err) {
		dev_err(&vdev->dev, "misc_register: %d\n", err);
		vd->misc.this_device = &vdev->dev;
		mutex_lock(&vd->ctrl_mutex);
		vdaq_teardown(vd, -ENODEV);
		mutex_unlock(&vd->ctrl_mutex);
		goto err_ida;
	}
	vd->misc_registered = true;
	dev_info(&vdev->dev, "%s: data queue %u, features%s%s\n", vd->name,
		 vd->dataq_size,
		 virtio_has_feature(vdev, VDAQ_F_CRC32) ? " crc32" : "",
		 virtio_has_feature(vdev, VDAQ_F_TRIGGER) ? " trigger" : "");
	/* last: its callbacks may use everything above; failure is not fatal */
	vdaq_iio_register(vd);
	return 0;

err_ida:
	ida_free(&vdaq_ida, vd->index);
err_free:
	vdev->priv = NULL;
	vdaq_put(vd);
	return err;
}

/*
 * Removal (unbind, module unload, hot-unplug): no new opens or reads; STOP
 * and FLUSH so the device returns every read with the data it has; check
 * with GET_STATUS that it holds none; reset; take back whatever is left
 * (-ECANCELED). Open files keep the struct (kref) and get -ENODEV.
 */
static void vdaq_remove(struct virtio_device *vdev)
{
	struct vdaq_dev *vd = vdev->priv;
	unsigned long deadline;
	struct vdaq_status st;
	unsigned int before;
	int tries, err = 0;

	/*
	 * First the IIO device: unregistering disables its buffer, which
	 * stops the capture and takes its buffers back while the device is
	 * still fully usable (docs/linux-driver.md, "IIO device").
	 */
	vdaq_iio_unregister(vd);

	spin_lock_irq(&vd->lock);
	vd->removing = true;
	before = vd->nr_posted;
	spin_unlock_irq(&vd->lock);
	wake_up_all(&vd->wq);
	if (vd->misc_registered)
		misc_deregister(&vd->misc);
	vd->misc.this_device = &vdev->dev;
	cancel_work_sync(&vd->reset_work);
	cancel_work_sync(&vd->cancel_work);
	cancel_delayed_work_sync(&vd->poll_work);

	mutex_lock(&vd->ctrl_mutex);
	if (READ_ONCE(vd->ready)) {
		__vdaq_command(vd, VDAQ_CMD_STOP, NULL, 0, NULL, 0);
		for (tries = 0; tries < 3; tries++) {
			err = vdaq_flush_locked(vd, NULL);
			if (err)
				break;
			deadline = msecs_to_jiffies(vdaq_cmd_timeout_ms);
			if (wait_event_timeout(vd->wq, !READ_ONCE(vd->nr_posted),
					       deadline))
				break;
		}
		if (!err && !__vdaq_command(vd, VDAQ_CMD_GET_STATUS, NULL, 0,
					    &st, sizeof(st)))
			dev_info(&vdev->dev,
				 "removal: %u reads were in flight, %u still posted, device holds %llu\n",
				 before, READ_ONCE(vd->nr_posted),
				 le64_to_cpu(st.buffers_held));
	}
	if (vd->vqs[VDAQ_QUEUE_DATA])
		vdaq_teardown(vd, -ECANCELED);
	mutex_unlock(&vd->ctrl_mutex);
	/* every IIO buffer is back and freed: the IIO device goes with devres */
	spin_lock_irq(&vd->lock);
	vd->iio = NULL;
	spin_unlock_irq(&vd->lock);
	/* not re-armed: removing is set, nothing is posted */
	cancel_delayed_work_sync(&vd->watchdog);

	ida_free(&vdaq_ida, vd->index);
	vdev->priv = NULL;
	vdaq_put(vd);
}

static const struct virtio_device_id vdaq_id_table[] = {
	{ VDAQ_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vdaq_id_table);

static const unsigned int vdaq_features[] = {
	VDAQ_F_CRC32,
	VDAQ_F_TRIGGER,
};

static struct virtio_driver vdaq_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = vdaq_id_table,
	.feature_table = vdaq_features,
	.feature_table_size = ARRAY_SIZE(vdaq_features),
	.validate = vdaq_validate,
	.probe = vdaq_probe,
	.remove = vdaq_remove,
	.config_changed = vdaq_config_changed,
};

/* uapi/vdaq.h mirrors the wire crate: the sizes and offsets of its layout tests. */
static void __init vdaq_check_layouts(void)
{
	BUILD_BUG_ON(sizeof(struct vdaq_config) != 136);
	BUILD_BUG_ON(offsetof(struct vdaq_config, coalesce_buffers) != 36);
	BUILD_BUG_ON(offsetof(struct vdaq_config, format) != 40);
	BUILD_BUG_ON(offsetof(struct vdaq_config, state) != 43);
	BUILD_BUG_ON(offsetof(struct vdaq_config, fault_code) != 44);
	BUILD_BUG_ON(offsetof(struct vdaq_config, seed) != 48);
	BUILD_BUG_ON(offsetof(struct vdaq_config, requests_rejected) != 88);
	BUILD_BUG_ON(offsetof(struct vdaq_config, firmware_version) != 96);
	BUILD_BUG_ON(offsetof(struct vdaq_config, events_lost) != 100);
	BUILD_BUG_ON(offsetof(struct vdaq_config, model) != 104);
	BUILD_BUG_ON(offsetof(struct vdaq_config, full_scale_uv) != 128);
	BUILD_BUG_ON(offsetof(struct vdaq_config, tick_us) != 132);
	BUILD_BUG_ON(sizeof(struct vdaq_buffer_header) != VDAQ_HEADER_SIZE);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, frame_count) != 32);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, flags) != 44);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, status) != 46);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, format) != 47);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, channels) != 48);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, signal) != 50);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, rate_hz) != 52);
	BUILD_BUG_ON(offsetof(struct vdaq_buffer_header, reserved1) != 56);
	BUILD_BUG_ON(sizeof(struct vdaq_configure) != 40);
	BUILD_BUG_ON(offsetof(struct vdaq_configure, channels) != 16);
	BUILD_BUG_ON(offsetof(struct vdaq_configure, format) != 22);
	BUILD_BUG_ON(offsetof(struct vdaq_configure, seed) != 24);
	BUILD_BUG_ON(offsetof(struct vdaq_configure, clock) != 32);
	BUILD_BUG_ON(sizeof(struct vdaq_trigger) != 16);
	BUILD_BUG_ON(offsetof(struct vdaq_trigger, threshold_ppm) != 4);
	BUILD_BUG_ON(offsetof(struct vdaq_trigger, post_frames) != 12);
	BUILD_BUG_ON(sizeof(struct vdaq_status) != 72);
	BUILD_BUG_ON(offsetof(struct vdaq_status, buffers_held) != 40);
	BUILD_BUG_ON(offsetof(struct vdaq_status, state) != 64);
	BUILD_BUG_ON(sizeof(struct vdaq_flush_reply) != 8);
	BUILD_BUG_ON(sizeof(struct vdaq_event) != VDAQ_EVENT_SIZE);
	BUILD_BUG_ON(offsetof(struct vdaq_event, arg0) != 16);
	BUILD_BUG_ON(sizeof(struct vdaq_info) != 168);
	BUILD_BUG_ON(sizeof(struct vdaq_events) != 8 + VDAQ_EVENTS_MAX * 32);
	BUILD_BUG_ON(sizeof(struct vdaq_stats) != 27 * 8);
	BUILD_BUG_ON(sizeof(struct vdaq_cmd_hdr) != 8);
	BUILD_BUG_ON(sizeof(struct vdaq_resp_hdr) != 8);
	BUILD_BUG_ON(offsetof(struct vdaq_ctrl_buf, payload) != 8);
}

static void vdaq_req_ctor(void *object)
{
	struct vdaq_req *req = object;

	INIT_LIST_HEAD(&req->node);
}

static int __init vdaq_init(void)
{
	int err;

	vdaq_check_layouts();
	/*
	 * A read's request comes from here. The constructor also exempts the
	 * cache from init_on_alloc (on in Debian's kernels), which would zero
	 * all of a request, inline arrays included, on every read: a memset
	 * that TCG runs byte by byte (5 % of a TCG guest's time at 64 KiB).
	 * vdaq_alloc_req() sets every field a read uses.
	 */
	vdaq_req_cache = kmem_cache_create("vdaq_req", sizeof(struct vdaq_req),
					   __alignof__(struct vdaq_req), 0,
					   vdaq_req_ctor);
	if (!vdaq_req_cache)
		return -ENOMEM;
	vdaq_wq = alloc_workqueue("vdaq", WQ_HIGHPRI, 0);
	if (!vdaq_wq) {
		kmem_cache_destroy(vdaq_req_cache);
		return -ENOMEM;
	}
	err = register_virtio_driver(&vdaq_driver);
	if (err) {
		destroy_workqueue(vdaq_wq);
		kmem_cache_destroy(vdaq_req_cache);
	}
	return err;
}

static void __exit vdaq_exit(void)
{
	/* removes every device: each drains and resets, see vdaq_remove() */
	unregister_virtio_driver(&vdaq_driver);
	destroy_workqueue(vdaq_wq);
	kmem_cache_destroy(vdaq_req_cache);
}

module_init(vdaq_init);
module_exit(vdaq_exit);

MODULE_DESCRIPTION("vdaq virtio data-acquisition card");
MODULE_LICENSE("GPL");
