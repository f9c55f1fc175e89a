// SPDX-License-Identifier: GPL-2.0
/*
 * vdaq: the card as an Industrial I/O device, beside /dev/vdaqN
 * (docs/linux-driver.md, "IIO device").
 *
 * Channels in_voltage0..N-1 (N = the card's channels at probe) and a
 * timestamp; scale, offset, sampling_frequency; a kfifo buffer. Enabling the
 * buffer claims the card's stream: the driver posts its own kmalloc'ed read
 * buffers on the data queue and STARTs the card; the bottom half validates
 * each completed buffer like a /dev/vdaqN read, pushes its frames as scans
 * and posts it again. Disabling STOPs, FLUSHes and waits for every buffer.
 *
 * While the buffer is enabled, /dev/vdaqN reads, START, STOP, FLUSH and
 * CONFIGURE get -EBUSY; while /dev/vdaqN has the stream (a read posted, or
 * a START not followed by STOP) enabling the buffer gets -EBUSY.
 *
 * The card's hardware trigger (SET_TRIGGER, one channel at a time) is
 * offered as IIO threshold events, rising and falling, on every voltage
 * channel: enabling one arms the card's RISING or FALLING trigger on that
 * channel (and disables any other, the card has one); each TRIGGER event
 * record of the card becomes an IIO event.
 *
 * A capture buffer is owned by the device while posted and by the completion
 * path (the bottom half, or a reset's teardown: never both at once) until
 * it is posted again or set idle; @outstanding counts both. Only idle
 * buffers are freed; one the device never returned is left to the
 * completion path ("orphan"), which frees it when it comes back, at the
 * latest when the device is reset at removal.
 */

#include <linux/bitops.h>
#include <linux/delay.h>
#include <linux/iio/buffer.h>
#include <linux/iio/events.h>
#include <linux/iio/iio.h>
#include <linux/iio/kfifo_buf.h>
#include <linux/iio/sysfs.h>
#include <linux/math64.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/units.h>
#include <linux/virtio_config.h>

#include "vdaq.h"

/* Voltage channels an IIO device can have (the reference card's maximum). */
#define VDAQ_IIO_MAX_CHANNELS	64
/* Capture buffers kept posted, and the size of each, header included. */
#define VDAQ_IIO_BUFS		8
#define VDAQ_IIO_BUF_BYTES	SZ_64K

struct vdaq_iio {
	struct vdaq_dev *vd;
	struct iio_dev *indio_dev;
	struct iio_chan_spec chans[VDAQ_IIO_MAX_CHANNELS + 1];
	int rate_avail[3];		/* [min, step, max] */
	unsigned int channels;		/* registered: the card's at probe */
	u8 format;			/* registered: the card's at probe */
	unsigned int sample_bytes;
	u32 full_scale_uv;		/* 0: unknown */
	unsigned int watermark;		/* of the IIO buffer, in scans */

	/* the trigger: changed under ctrl_mutex and vd->lock */
	int ev_chan;			/* channel armed, -1: none */
	enum iio_event_direction ev_dir;
	int thresh[VDAQ_IIO_MAX_CHANNELS][2];	/* raw; [0] rising, [1] falling */

	/* capture state, under vd->lock */
	bool repost;			/* completed buffers go back to the card */
	bool push;			/* completed buffers' frames are pushed */
	bool orphan;			/* buffer disabled, some still posted */
	unsigned int pushing;		/* completions inside vdaq_iio_push() */
	unsigned int outstanding;	/* buffers posted or being completed */
	unsigned int nbufs;
	struct vdaq_req *bufs[VDAQ_IIO_BUFS];
	unsigned int nscan;		/* enabled voltage channels */
	u8 scan_chan[VDAQ_IIO_MAX_CHANNELS];
	bool have_next;
	u64 next_frame;			/* stream index after the last pushed */
	struct vdaq_configure settings;	/* the capture's, for a reset */

	/* counters since probe, under vd->lock */
	u64 dropped_card;		/* sum of the headers' dropped_frames */
	u64 dropped_gap;		/* frames of buffers the driver rejected */
	u64 dropped_full;		/* scans the IIO buffer had no room for */
	u64 invalid_buffers;		/* completions not pushed: error, bad header */
	u64 scans;			/* scans pushed */
	u64 resets;			/* device resets during a capture */

	/* one scan; only the completion path uses it (serialised) */
	u8 scan[VDAQ_IIO_MAX_CHANNELS * 4 + sizeof(s64)] __aligned(8);
};

static void vdaq_iio_settings(const struct vdaq_config *cfg,
			      struct vdaq_configure *c)
{
	memset(c, 0, sizeof(*c));
	c->rate_hz = cfg->rate_hz;
	c->latency_us = cfg->latency_us;
	c->watermark_frames = cfg->watermark_frames;
	c->signal_freq_mhz = cfg->signal_freq_mhz;
	c->channels = cfg->channels;
	c->coalesce_buffers = cfg->coalesce_buffers;
	c->amplitude_permille = cfg->amplitude_permille;
	c->format = cfg->format;
	c->signal = cfg->signal;
	c->seed = cfg->seed;
	c->clock = cfg->clock;
}

static void vdaq_iio_free_buf(struct vdaq_req *req)
{
	kfree(req->kbuf);
	kfree(req);
}

static struct vdaq_req *vdaq_iio_alloc_buf(struct vdaq_dev *vd, size_t len)
{
	struct vdaq_req *req;

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!req)
		return NULL;
	/* kmalloc memory: physically contiguous, one descriptor */
	req->kbuf = kmalloc(len, GFP_KERNEL);
	if (!req->kbuf) {
		kfree(req);
		return NULL;
	}
	INIT_LIST_HEAD(&req->node);
	init_completion(&req->done);
	req->vd = vd;
	req->iio = true;
	req->len = len;
	sg_init_one(&req->sg, req->kbuf, len);
	/* vdaq_validate_used() reads the header through the table */
	req->sgt.sgl = &req->sg;
	req->sgt.nents = 1;
	req->sgt.orig_nents = 1;
	return req;
}

/* Posts every idle capture buffer; vd->lock held. Returns how many. */
static unsigned int vdaq_iio_post_idle(struct vdaq_iio *iio, bool *notify)
{
	struct vdaq_dev *vd = iio->vd;
	unsigned int i, n = 0;
	int err;

	lockdep_assert_held(&vd->lock);
	for (i = 0; i < iio->nbufs; i++) {
		struct vdaq_req *req = iio->bufs[i];

		if (!req || req->in_flight)
			continue;
		err = vdaq_add_req_locked(vd, req, notify);
		if (err) {
			dev_warn_ratelimited(&iio->indio_dev->dev,
					     "cannot post a capture buffer: %d\n",
					     err);
			break;
		}
		req->in_flight = true;
		iio->outstanding++;
		n++;
	}
	return n;
}

/* Every frame lost to the IIO buffer: the dropped_frames attribute. Under vd->lock. */
static u64 vdaq_iio_dropped(const struct vdaq_iio *iio)
{
	return iio->dropped_card + iio->dropped_gap + iio->dropped_full;
}

/*
 * Pushes the frames of a valid completion (the bottom half or a reset's
 * teardown, never both at once, so iio->scan needs no lock).
 * vdaq_validate_used() has checked the used length against its own copy of
 * the header; the device may not be trusted to leave the buffer alone
 * afterwards, so the frame count is taken from the used length and the
 * header copied once more here is checked against the registered layout.
 */
static void vdaq_iio_push(struct vdaq_iio *iio, struct vdaq_req *req)
{
	struct iio_dev *indio_dev = iio->indio_dev;
	struct vdaq_dev *vd = iio->vd;
	unsigned int frame_bytes = iio->channels * iio->sample_bytes;
	unsigned int used = req->result, ss = iio->sample_bytes;
	u64 first, dropped, gap = 0, full = 0, total;
	struct vdaq_buffer_header h;
	u32 frames, rate, i, k;
	const u8 *frame;
	s64 ts0, ts;
	bool back;

	memcpy(&h, req->kbuf, sizeof(h));
	frames = (used - VDAQ_HEADER_SIZE) / frame_bytes;
	if (h.format != iio->format || le16_to_cpu(h.channels) != iio->channels ||
	    (used - VDAQ_HEADER_SIZE) % frame_bytes ||
	    le32_to_cpu(h.frame_count) != frames) {
		spin_lock_irq(&vd->lock);
		iio->invalid_buffers++;
		spin_unlock_irq(&vd->lock);
		dev_warn_ratelimited(&indio_dev->dev,
				     "buffer with format %u, %u channels, %u frames in %u bytes: not pushed\n",
				     h.format, le16_to_cpu(h.channels),
				     le32_to_cpu(h.frame_count), used);
		return;
	}
	first = le64_to_cpu(h.first_frame);
	dropped = le64_to_cpu(h.dropped_frames);
	ts0 = (s64)le64_to_cpu(h.timestamp_ns);
	rate = le32_to_cpu(h.rate_hz);

	spin_lock_irq(&vd->lock);
	/* frames the card delivered in a buffer this driver rejected */
	back = iio->have_next && first < iio->next_frame + dropped;
	if (iio->have_next && first > iio->next_frame + dropped)
		gap = first - iio->next_frame - dropped;
	iio->have_next = true;
	iio->next_frame = first + frames;
	spin_unlock_irq(&vd->lock);
	if (back)
		dev_warn_ratelimited(&indio_dev->dev,
				     "stream went back to frame %llu\n", first);

	frame = (const u8 *)req->kbuf + VDAQ_HEADER_SIZE;
	for (i = 0; i < frames; i++, frame += frame_bytes) {
		u8 *p = iio->scan;

		for (k = 0; k < iio->nscan; k++, p += ss)
			memcpy(p, frame + iio->scan_chan[k] * ss, ss);
		/* paced clock: frame i was sampled i sample periods later */
		ts = ts0;
		if (rate)
			ts += div_u64((u64)i * NSEC_PER_SEC, rate);
		/* -EBUSY: the kfifo is full, the scan is lost (counted) */
		if (iio_push_to_buffers_with_timestamp(indio_dev, iio->scan, ts))
			full++;
	}

	spin_lock_irq(&vd->lock);
	iio->dropped_card += dropped;
	iio->dropped_gap += gap;
	iio->dropped_full += full;
	iio->scans += frames - full;
	total = vdaq_iio_dropped(iio);
	spin_unlock_irq(&vd->lock);
	/* never silently: every lost frame is counted and logged */
	if (dropped || gap || full)
		dev_warn_ratelimited(&indio_dev->dev,
				     "frames lost before frame %llu: %llu by the card, %llu in rejected buffers, %llu with the IIO buffer full (%llu in all)\n",
				     first, dropped, gap, full, total);
}

/* A capture buffer came back (no locks held): push, then post it again. */
void vdaq_iio_complete(struct vdaq_req *req)
{
	struct vdaq_dev *vd = req->vd;
	struct vdaq_iio *iio = vd->iio;
	bool push, notify = false, release = false;
	unsigned int i;
	int err;

	spin_lock_irq(&vd->lock);
	push = iio->push;
	if (push && req->result <= 0)
		iio->invalid_buffers++;
	if (push)
		iio->pushing++;
	else if (req->result > VDAQ_HEADER_SIZE)
		/* data of a buffer back after the capture ended: lost, counted */
		iio->dropped_gap += (req->result - VDAQ_HEADER_SIZE) /
				    (iio->channels * iio->sample_bytes);
	spin_unlock_irq(&vd->lock);
	if (push && req->result > 0)
		vdaq_iio_push(iio, req);

	spin_lock_irq(&vd->lock);
	if (push && !--iio->pushing)
		wake_up_all(&vd->wq);
	if (iio->repost) {
		err = vdaq_add_req_locked(vd, req, &notify);
		if (!err) {
			spin_unlock_irq(&vd->lock);
			if (notify)
				virtqueue_notify(vd->vqs[VDAQ_QUEUE_DATA]);
			return;
		}
		/* no device now (a reset): vdaq_iio_resume() posts it */
		if (err != -EIO && err != -ENODEV)
			dev_warn_ratelimited(&iio->indio_dev->dev,
					     "cannot post a capture buffer again: %d\n",
					     err);
	}
	req->in_flight = false;
	iio->outstanding--;
	if (iio->orphan) {
		for (i = 0; i < iio->nbufs; i++)
			if (iio->bufs[i] == req)
				iio->bufs[i] = NULL;
		release = true;
		/* the last orphan is back: the stream is free again */
		if (!iio->outstanding) {
			iio->orphan = false;
			vd->iio_claimed = false;
		}
	}
	spin_unlock_irq(&vd->lock);
	if (release)
		vdaq_iio_free_buf(req);
	wake_up_all(&vd->wq);
}

/*
 * Threshold in millionths of full scale, to within a count: rounded down
 * for rising (fires at the first value >= @raw), up for falling (<= @raw).
 */
static s32 vdaq_iio_ppm(struct vdaq_iio *iio, int raw, bool falling)
{
	unsigned int bits = iio->format == VDAQ_FORMAT_S16 ? 15 : 31;
	s64 v = (s64)raw * MICRO;

	if (falling)
		v += (1LL << bits) - 1;
	return v >> bits;	/* arithmetic shift: floor */
}

/* SET_TRIGGER for @chan (-1: off); ctrl_mutex held. */
static int vdaq_iio_arm(struct vdaq_iio *iio, int chan,
			enum iio_event_direction dir)
{
	struct vdaq_dev *vd = iio->vd;
	bool falling = dir == IIO_EV_DIR_FALLING;
	struct vdaq_trigger t;
	s32 ppm;
	int err;

	lockdep_assert_held(&vd->ctrl_mutex);
	memset(&t, 0, sizeof(t));
	if (chan >= 0) {
		ppm = vdaq_iio_ppm(iio, iio->thresh[chan][falling], falling);
		t.mode = falling ? VDAQ_TRIGGER_FALLING : VDAQ_TRIGGER_RISING;
		t.channel = cpu_to_le16(chan);
		t.threshold_ppm = cpu_to_le32(ppm);
		/* re-armed at the next frame: every crossing is an event */
		t.post_frames = cpu_to_le32(1);
	}
	err = __vdaq_command(vd, VDAQ_CMD_SET_TRIGGER, &t, sizeof(t), NULL, 0);
	if (err && chan >= 0)
		return err;
	/* disarming: forget it even if the device is gone */
	spin_lock_irq(&vd->lock);
	iio->ev_chan = chan;
	iio->ev_dir = dir;
	vd->iio_events = chan >= 0;
	spin_unlock_irq(&vd->lock);
	return err;
}

/* A TRIGGER event record of the card (vd->lock held, the bottom half). */
void vdaq_iio_event(struct vdaq_dev *vd, const struct vdaq_event *ev)
{
	struct vdaq_iio *iio = vd->iio;

	lockdep_assert_held(&vd->lock);
	if (!iio || iio->ev_chan < 0 ||
	    le32_to_cpu(ev->kind) != VDAQ_EVENT_TRIGGER)
		return;
	/* the card's clock, like the scans' timestamps */
	iio_push_event(iio->indio_dev,
		       IIO_UNMOD_EVENT_CODE(IIO_VOLTAGE, iio->ev_chan,
					    IIO_EV_TYPE_THRESH, iio->ev_dir),
		       (s64)le64_to_cpu(ev->timestamp_ns));
}

static int vdaq_iio_read_event_config(struct iio_dev *indio_dev,
				      const struct iio_chan_spec *chan,
				      enum iio_event_type type,
				      enum iio_event_direction dir)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);

	return READ_ONCE(iio->ev_chan) == chan->channel &&
	       READ_ONCE(iio->ev_dir) == dir;
}

static int vdaq_iio_write_event_config(struct iio_dev *indio_dev,
				       const struct iio_chan_spec *chan,
				       enum iio_event_type type,
				       enum iio_event_direction dir,
				       int state)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;
	int err = 0;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd))
		err = -ENODEV;
	else if (state)
		err = vdaq_iio_arm(iio, chan->channel, dir);
	else if (iio->ev_chan == chan->channel && iio->ev_dir == dir)
		err = vdaq_iio_arm(iio, -1, dir);
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

static int vdaq_iio_read_event_value(struct iio_dev *indio_dev,
				     const struct iio_chan_spec *chan,
				     enum iio_event_type type,
				     enum iio_event_direction dir,
				     enum iio_event_info info, int *val,
				     int *val2)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;

	if (info != IIO_EV_INFO_VALUE)
		return -EINVAL;
	mutex_lock(&vd->ctrl_mutex);
	*val = iio->thresh[chan->channel][dir == IIO_EV_DIR_FALLING];
	mutex_unlock(&vd->ctrl_mutex);
	return IIO_VAL_INT;
}

static int vdaq_iio_write_event_value(struct iio_dev *indio_dev,
				      const struct iio_chan_spec *chan,
				      enum iio_event_type type,
				      enum iio_event_direction dir,
				      enum iio_event_info info, int val,
				      int val2)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;
	bool falling = dir == IIO_EV_DIR_FALLING;
	int err = 0;

	if (info != IIO_EV_INFO_VALUE || val2)
		return -EINVAL;
	/* raw counts of the registered format (the card: +-full scale) */
	if (iio->format == VDAQ_FORMAT_S16 && (val < S16_MIN || val > S16_MAX))
		return -EINVAL;
	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	iio->thresh[chan->channel][falling] = val;
	/* armed with it now: arm again with the new value */
	if (iio->ev_chan == chan->channel && iio->ev_dir == dir)
		err = vdaq_alive(vd) ? vdaq_iio_arm(iio, chan->channel, dir) :
		      -ENODEV;
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

static const struct iio_event_spec vdaq_iio_events[] = {
	{
		.type = IIO_EV_TYPE_THRESH,
		.dir = IIO_EV_DIR_RISING,
		.mask_separate = BIT(IIO_EV_INFO_VALUE) | BIT(IIO_EV_INFO_ENABLE),
	}, {
		.type = IIO_EV_TYPE_THRESH,
		.dir = IIO_EV_DIR_FALLING,
		.mask_separate = BIT(IIO_EV_INFO_VALUE) | BIT(IIO_EV_INFO_ENABLE),
	},
};

/* The capture part of vdaq_iio_resume(); ctrl_mutex held. */
static void vdaq_iio_restart(struct vdaq_iio *iio)
{
	struct vdaq_dev *vd = iio->vd;
	bool notify = false;
	int err;

	err = __vdaq_command(vd, VDAQ_CMD_CONFIGURE, &iio->settings,
			     sizeof(iio->settings), NULL, 0);
	vdaq_refresh_frame_bytes(vd);
	if (!err) {
		spin_lock_irq(&vd->lock);
		vdaq_iio_post_idle(iio, &notify);
		spin_unlock_irq(&vd->lock);
		if (notify)
			virtqueue_notify(vd->vqs[VDAQ_QUEUE_DATA]);
		err = __vdaq_command(vd, VDAQ_CMD_START, NULL, 0, NULL, 0);
	}
	if (err)
		dev_err(&iio->indio_dev->dev,
			"capture not resumed after the device reset (%d): disable and enable the buffer\n",
			err);
	else
		dev_warn(&iio->indio_dev->dev,
			 "capture resumed after a device reset: the card's stream restarts at frame 0\n");
}

/*
 * After a reset and re-initialisation (ctrl_mutex held): the card is STOPPED
 * with its power-on settings and every capture buffer is back. A capture in
 * progress resumes: CONFIGURE the capture's settings, post, START. The card
 * counts the stream from frame 0 again.
 */
/*
 * A reset is about to discard what the card holds (its FIFO and the partly
 * filled buffer, @pending frames): lost to a running capture, so counted.
 */
void vdaq_iio_reset_loss(struct vdaq_dev *vd, u64 pending)
{
	struct vdaq_iio *iio = vd->iio;

	lockdep_assert_held(&vd->ctrl_mutex);
	if (!iio || !pending)
		return;
	spin_lock_irq(&vd->lock);
	if (iio->repost)
		iio->dropped_card += pending;
	else
		pending = 0;
	spin_unlock_irq(&vd->lock);
	if (pending)
		dev_warn_ratelimited(&iio->indio_dev->dev,
				     "%llu frames lost in the device reset\n",
				     pending);
}

void vdaq_iio_resume(struct vdaq_dev *vd)
{
	struct vdaq_iio *iio = vd->iio;
	bool run;

	lockdep_assert_held(&vd->ctrl_mutex);
	if (!iio)
		return;
	spin_lock_irq(&vd->lock);
	run = iio->repost;
	if (run) {
		iio->resets++;
		iio->have_next = false;
	}
	spin_unlock_irq(&vd->lock);
	if (run)
		vdaq_iio_restart(iio);
	/* a reset disarms the card's trigger: arm it again (after CONFIGURE) */
	if (iio->ev_chan >= 0 && vdaq_iio_arm(iio, iio->ev_chan, iio->ev_dir))
		dev_err(&iio->indio_dev->dev,
			"threshold event not armed again after the device reset\n");
}

/*
 * Ends a capture: STOP; let the card move what its FIFO still holds into
 * the (reposted) buffers, so none is pending for a later CONFIGURE; then
 * stop reposting, FLUSH and wait for every buffer. A device that does not
 * return them is reset (which takes every buffer back).
 */
static void vdaq_iio_stop(struct vdaq_iio *iio)
{
	unsigned long wait = msecs_to_jiffies(vdaq_cmd_timeout_ms);
	struct vdaq_dev *vd = iio->vd;
	struct vdaq_status st;
	int tries;

	mutex_lock(&vd->ctrl_mutex);
	if (vdaq_alive(vd)) {
		__vdaq_command(vd, VDAQ_CMD_STOP, NULL, 0, NULL, 0);
		for (tries = 0; tries < 20; tries++) {
			if (__vdaq_command(vd, VDAQ_CMD_GET_STATUS, NULL, 0,
					   &st, sizeof(st)) ||
			    !st.frames_pending)
				break;
			if (vdaq_flush_locked(vd, NULL))
				break;
			usleep_range(10000, 20000);
		}
	}
	spin_lock_irq(&vd->lock);
	iio->repost = false;
	spin_unlock_irq(&vd->lock);
	for (tries = 0; tries < 3 && READ_ONCE(iio->outstanding); tries++) {
		if (!vdaq_alive(vd) || vdaq_flush_locked(vd, NULL))
			break;
		/* the device put the buffers on the used ring before the reply */
		wait_event_timeout(vd->wq, !READ_ONCE(iio->outstanding), wait);
	}
	mutex_unlock(&vd->ctrl_mutex);
	if (READ_ONCE(iio->outstanding) && vdaq_alive(vd)) {
		vdaq_schedule_reset(vd, "IIO capture buffers not returned");
		wait_event_timeout(vd->wq, !READ_ONCE(iio->outstanding),
				   2 * wait + HZ);
	}
	spin_lock_irq(&vd->lock);
	iio->push = false;
	spin_unlock_irq(&vd->lock);
	/*
	 * A completion that saw push set may still be pushing: the IIO core
	 * takes the buffer off its list after predisable.
	 */
	wait_event(vd->wq, !READ_ONCE(iio->pushing));
}

/*
 * Checks that the card still has the registered layout and that
 * /dev/vdaqN does not have the stream; claims the stream.
 */
static int vdaq_iio_preenable(struct iio_dev *indio_dev)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;
	struct vdaq_config cfg;
	unsigned int bit, n = 0;
	bool chardev = false;
	int err = 0;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		err = -ENODEV;
		goto out;
	}
	vdaq_read_config(vd, &cfg);
	if (cfg.format == VDAQ_FORMAT_F32) {
		dev_err(&indio_dev->dev,
			"the card samples F32 and IIO has no floating-point scan type: configure S16 or S32 through /dev/%s\n",
			vd->name);
		err = -EINVAL;
		goto out;
	}
	if (cfg.format != iio->format ||
	    le16_to_cpu(cfg.channels) != iio->channels) {
		dev_err(&indio_dev->dev,
			"the card has %u channels of format %u now, this IIO device %u of format %u (its channels are fixed at probe): configure them back, or bind the driver again\n",
			le16_to_cpu(cfg.channels), cfg.format, iio->channels,
			iio->format);
		err = -EINVAL;
		goto out;
	}
	for_each_set_bit(bit, indio_dev->active_scan_mask,
			 indio_dev->masklength)
		if (bit < iio->channels)
			iio->scan_chan[n++] = bit;

	spin_lock_irq(&vd->lock);
	if (iio->outstanding) {
		err = -EBUSY;	/* buffers of the last capture still posted */
	} else if (vdaq_chardev_streaming(vd)) {
		err = -EBUSY;
		chardev = true;
	} else {
		vd->iio_claimed = true;
		iio->nscan = n;
	}
	spin_unlock_irq(&vd->lock);
	if (chardev)
		dev_info(&indio_dev->dev,
			 "/dev/%s has the stream (a read posted, or started): buffer not enabled\n",
			 vd->name);
out:
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

/* Allocates and posts the capture buffers, STARTs the card. */
static int vdaq_iio_postenable(struct iio_dev *indio_dev)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;
	unsigned int frame_bytes = iio->channels * iio->sample_bytes;
	unsigned int i, nbufs, posted;
	struct vdaq_config cfg;
	bool notify = false;
	u64 frames;
	size_t len;
	int err = 0;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		err = -ENODEV;
		goto out;
	}
	vdaq_read_config(vd, &cfg);
	vdaq_iio_settings(&cfg, &iio->settings);
	/*
	 * Each buffer holds one latency bound of frames (completions come
	 * about every latency_us), at least the IIO watermark (one completion
	 * wakes a reader), at most VDAQ_IIO_BUF_BYTES. Eight of them keep
	 * eight latency bounds posted, the spec asks for one.
	 */
	frames = div_u64((u64)le32_to_cpu(cfg.rate_hz) *
			 le32_to_cpu(cfg.latency_us), USEC_PER_SEC);
	frames = max_t(u64, frames, iio->watermark);
	frames = clamp_t(u64, frames, 1,
			 (VDAQ_IIO_BUF_BYTES - VDAQ_HEADER_SIZE) / frame_bytes);
	len = VDAQ_HEADER_SIZE + frames * frame_bytes;
	nbufs = min_t(unsigned int, VDAQ_IIO_BUFS, vd->dataq_size);

	for (i = 0; i < nbufs; i++) {
		struct vdaq_req *req = vdaq_iio_alloc_buf(vd, len);

		if (!req) {
			err = -ENOMEM;
			break;
		}
		spin_lock_irq(&vd->lock);
		iio->bufs[i] = req;
		iio->nbufs = i + 1;
		spin_unlock_irq(&vd->lock);
	}
	if (err)
		goto out;	/* postdisable frees them */

	spin_lock_irq(&vd->lock);
	iio->repost = true;
	iio->push = true;
	iio->have_next = false;
	posted = vdaq_iio_post_idle(iio, &notify);
	spin_unlock_irq(&vd->lock);
	if (notify)
		virtqueue_notify(vd->vqs[VDAQ_QUEUE_DATA]);
	if (posted != nbufs)
		err = -EIO;
	if (!err)
		err = __vdaq_command(vd, VDAQ_CMD_START, NULL, 0, NULL, 0);
	if (!err)
		dev_dbg(&indio_dev->dev, "capture: %u buffers of %llu frames\n",
			nbufs, frames);
out:
	mutex_unlock(&vd->ctrl_mutex);
	if (err) {
		/* predisable does not run after a failed postenable */
		vdaq_iio_stop(iio);
		dev_err(&indio_dev->dev, "capture not started: %d\n", err);
	}
	return err;
}

static int vdaq_iio_predisable(struct iio_dev *indio_dev)
{
	vdaq_iio_stop(iio_priv(indio_dev));
	return 0;
}

/* Frees the idle capture buffers, releases the stream. */
static int vdaq_iio_postdisable(struct iio_dev *indio_dev)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_req *idle[VDAQ_IIO_BUFS];
	struct vdaq_dev *vd = iio->vd;
	unsigned int i, n = 0, left;

	spin_lock_irq(&vd->lock);
	for (i = 0; i < iio->nbufs; i++) {
		struct vdaq_req *req = iio->bufs[i];

		if (!req || req->in_flight)
			continue;
		idle[n++] = req;
		iio->bufs[i] = NULL;
	}
	left = iio->outstanding;
	iio->orphan = left > 0;
	iio->repost = false;
	iio->push = false;
	/* with buffers still posted the stream stays claimed until they are back */
	if (!left)
		vd->iio_claimed = false;
	spin_unlock_irq(&vd->lock);
	for (i = 0; i < n; i++)
		vdaq_iio_free_buf(idle[i]);
	if (left)
		dev_err(&indio_dev->dev,
			"%u capture buffers still with the device: freed when it returns them\n",
			left);
	wake_up_all(&vd->wq);
	return 0;
}

static const struct iio_buffer_setup_ops vdaq_iio_setup_ops = {
	.preenable = vdaq_iio_preenable,
	.postenable = vdaq_iio_postenable,
	.predisable = vdaq_iio_predisable,
	.postdisable = vdaq_iio_postdisable,
};

/* raw x scale = mV: full scale (2^15, 2^31, 1.0) is full_scale_uv uV. */
static int vdaq_iio_scale(struct vdaq_iio *iio, int *val, int *val2)
{
	unsigned int bits;
	u32 rem;
	u64 pv;

	if (!iio->full_scale_uv) {
		*val = 1;	/* unknown input range: raw counts */
		return IIO_VAL_INT;
	}
	switch (iio->format) {
	case VDAQ_FORMAT_S16:
		bits = 15;
		break;
	case VDAQ_FORMAT_S32:
		bits = 31;
		break;
	default:
		bits = 0;
		break;
	}
	/* in 1e-9 mV: uV * 1e6 fits easily in 64 bits */
	pv = DIV_ROUND_CLOSEST_ULL((u64)iio->full_scale_uv * MICRO, 1ULL << bits);
	*val = div_u64_rem(pv, NANO, &rem);
	*val2 = rem;
	return IIO_VAL_INT_PLUS_NANO;
}

static int vdaq_iio_read_raw(struct iio_dev *indio_dev,
			     struct iio_chan_spec const *chan, int *val,
			     int *val2, long mask)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	struct vdaq_dev *vd = iio->vd;
	int ret;

	switch (mask) {
	case IIO_CHAN_INFO_SCALE:
		return vdaq_iio_scale(iio, val, val2);
	case IIO_CHAN_INFO_OFFSET:
		*val = 0;
		return IIO_VAL_INT;
	case IIO_CHAN_INFO_SAMP_FREQ:
		if (mutex_lock_killable(&vd->ctrl_mutex))
			return -EINTR;
		ret = -ENODEV;
		if (vdaq_alive(vd)) {
			*val = virtio_cread32(vd->vdev,
					      offsetof(struct vdaq_config,
						       rate_hz));
			ret = IIO_VAL_INT;
		}
		mutex_unlock(&vd->ctrl_mutex);
		return ret;
	default:
		return -EINVAL;
	}
}

/* CONFIGURE with the current settings but the rate; buffer disabled. */
static int vdaq_iio_set_rate(struct vdaq_iio *iio, u32 rate)
{
	struct vdaq_dev *vd = iio->vd;
	struct vdaq_configure c;
	struct vdaq_config cfg;
	bool busy;
	int err = 0;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		err = -ENODEV;
		goto out;
	}
	spin_lock_irq(&vd->lock);
	busy = vdaq_chardev_streaming(vd);
	spin_unlock_irq(&vd->lock);
	if (busy) {
		err = -EBUSY;	/* /dev/vdaqN has the stream */
		goto out;
	}
	vdaq_read_config(vd, &cfg);
	if (le32_to_cpu(cfg.rate_hz) == rate)
		goto out;
	vdaq_iio_settings(&cfg, &c);
	c.rate_hz = cpu_to_le32(rate);
	err = __vdaq_command(vd, VDAQ_CMD_CONFIGURE, &c, sizeof(c), NULL, 0);
	vdaq_refresh_frame_bytes(vd);
out:
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

static int vdaq_iio_write_raw(struct iio_dev *indio_dev,
			      struct iio_chan_spec const *chan, int val,
			      int val2, long mask)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);
	int err;

	if (mask != IIO_CHAN_INFO_SAMP_FREQ)
		return -EINVAL;
	/* whole Hz within the card's limits */
	if (val2 || val < iio->rate_avail[0] || val > iio->rate_avail[2])
		return -EINVAL;
	/* -EBUSY while the buffer is enabled; keeps it disabled meanwhile */
	err = iio_device_claim_direct_mode(indio_dev);
	if (err)
		return err;
	err = vdaq_iio_set_rate(iio, val);
	iio_device_release_direct_mode(indio_dev);
	return err;
}

static int vdaq_iio_read_avail(struct iio_dev *indio_dev,
			       struct iio_chan_spec const *chan,
			       const int **vals, int *type, int *length,
			       long mask)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);

	if (mask != IIO_CHAN_INFO_SAMP_FREQ)
		return -EINVAL;
	*vals = iio->rate_avail;
	*type = IIO_VAL_INT;
	*length = ARRAY_SIZE(iio->rate_avail);
	return IIO_AVAIL_RANGE;
}

/* The core tells the buffer's watermark before enabling it. */
static int vdaq_iio_set_watermark(struct iio_dev *indio_dev, unsigned int val)
{
	struct vdaq_iio *iio = iio_priv(indio_dev);

	iio->watermark = val;
	return 0;
}

enum {
	VDAQ_IIO_DROPPED,
	VDAQ_IIO_DROPPED_CARD,
	VDAQ_IIO_DROPPED_GAP,
	VDAQ_IIO_DROPPED_FULL,
	VDAQ_IIO_INVALID,
	VDAQ_IIO_SCANS,
	VDAQ_IIO_RESETS,
};

static ssize_t vdaq_iio_counter_show(struct device *dev,
				     struct device_attribute *attr, char *buf)
{
	struct vdaq_iio *iio = iio_priv(dev_to_iio_dev(dev));
	struct vdaq_dev *vd = iio->vd;
	u64 v;

	spin_lock_irq(&vd->lock);
	switch (to_iio_dev_attr(attr)->address) {
	case VDAQ_IIO_DROPPED:
		v = vdaq_iio_dropped(iio);
		break;
	case VDAQ_IIO_DROPPED_CARD:
		v = iio->dropped_card;
		break;
	case VDAQ_IIO_DROPPED_GAP:
		v = iio->dropped_gap;
		break;
	case VDAQ_IIO_DROPPED_FULL:
		v = iio->dropped_full;
		break;
	case VDAQ_IIO_INVALID:
		v = iio->invalid_buffers;
		break;
	case VDAQ_IIO_SCANS:
		v = iio->scans;
		break;
	default:
		v = iio->resets;
		break;
	}
	spin_unlock_irq(&vd->lock);
	return sysfs_emit(buf, "%llu\n", v);
}

static IIO_DEVICE_ATTR(dropped_frames, 0444, vdaq_iio_counter_show, NULL,
		       VDAQ_IIO_DROPPED);
static IIO_DEVICE_ATTR(dropped_frames_card, 0444, vdaq_iio_counter_show, NULL,
		       VDAQ_IIO_DROPPED_CARD);
static IIO_DEVICE_ATTR(dropped_frames_rejected, 0444, vdaq_iio_counter_show,
		       NULL, VDAQ_IIO_DROPPED_GAP);
static IIO_DEVICE_ATTR(dropped_frames_buffer_full, 0444,
		       vdaq_iio_counter_show, NULL, VDAQ_IIO_DROPPED_FULL);
static IIO_DEVICE_ATTR(invalid_buffers, 0444, vdaq_iio_counter_show, NULL,
		       VDAQ_IIO_INVALID);
static IIO_DEVICE_ATTR(scans, 0444, vdaq_iio_counter_show, NULL,
		       VDAQ_IIO_SCANS);
static IIO_DEVICE_ATTR(resets, 0444, vdaq_iio_counter_show, NULL,
		       VDAQ_IIO_RESETS);

static struct attribute *vdaq_iio_attrs[] = {
	&iio_dev_attr_dropped_frames.dev_attr.attr,
	&iio_dev_attr_dropped_frames_card.dev_attr.attr,
	&iio_dev_attr_dropped_frames_rejected.dev_attr.attr,
	&iio_dev_attr_dropped_frames_buffer_full.dev_attr.attr,
	&iio_dev_attr_invalid_buffers.dev_attr.attr,
	&iio_dev_attr_scans.dev_attr.attr,
	&iio_dev_attr_resets.dev_attr.attr,
	NULL,
};

static const struct attribute_group vdaq_iio_attr_group = {
	.attrs = vdaq_iio_attrs,
};

static const struct iio_info vdaq_iio_info = {
	.read_raw = vdaq_iio_read_raw,
	.write_raw = vdaq_iio_write_raw,
	.read_avail = vdaq_iio_read_avail,
	.hwfifo_set_watermark = vdaq_iio_set_watermark,
	.read_event_config = vdaq_iio_read_event_config,
	.write_event_config = vdaq_iio_write_event_config,
	.read_event_value = vdaq_iio_read_event_value,
	.write_event_value = vdaq_iio_write_event_value,
	.attrs = &vdaq_iio_attr_group,
};

static int __vdaq_iio_register(struct vdaq_dev *vd)
{
	struct device *dev = &vd->vdev->dev;
	struct iio_dev *indio_dev;
	struct vdaq_config cfg;
	struct vdaq_iio *iio;
	unsigned int i, ch;
	bool alive;
	int err;

	mutex_lock(&vd->ctrl_mutex);
	alive = vdaq_alive(vd);
	if (alive)
		vdaq_read_config(vd, &cfg);
	mutex_unlock(&vd->ctrl_mutex);
	if (!alive)
		return -ENODEV;
	ch = le16_to_cpu(cfg.channels);
	/*
	 * A second read of the config space: an untrusted device may answer
	 * differently than at the identity check, and a zero frame size would
	 * be a division by zero later.
	 */
	if (!ch || !vdaq_sample_bytes(cfg.format)) {
		dev_warn(dev, "IIO: %u channels of format %u, no IIO device\n",
			 ch, cfg.format);
		return -ENODEV;
	}
	if (ch > VDAQ_IIO_MAX_CHANNELS) {
		dev_warn(dev, "IIO: %u channels, at most %u supported\n", ch,
			 VDAQ_IIO_MAX_CHANNELS);
		return -EOPNOTSUPP;
	}

	indio_dev = devm_iio_device_alloc(dev, sizeof(*iio));
	if (!indio_dev)
		return -ENOMEM;
	iio = iio_priv(indio_dev);
	iio->vd = vd;
	iio->indio_dev = indio_dev;
	iio->channels = ch;
	iio->format = cfg.format;
	iio->sample_bytes = vdaq_sample_bytes(cfg.format);
	iio->full_scale_uv = le32_to_cpu(cfg.full_scale_uv);
	/* all ones: a transport that does not serve the field */
	if (iio->full_scale_uv == U32_MAX)
		iio->full_scale_uv = 0;
	iio->rate_avail[0] = min_t(u32, le32_to_cpu(cfg.min_rate_hz), INT_MAX);
	iio->rate_avail[1] = 1;
	iio->rate_avail[2] = min_t(u32, le32_to_cpu(cfg.max_rate_hz), INT_MAX);
	iio->watermark = 1;
	iio->ev_chan = -1;

	for (i = 0; i < ch; i++) {
		struct iio_chan_spec *c = &iio->chans[i];

		c->type = IIO_VOLTAGE;
		c->indexed = 1;
		c->channel = i;
		c->scan_index = i;
		c->info_mask_shared_by_type = BIT(IIO_CHAN_INFO_SCALE) |
					      BIT(IIO_CHAN_INFO_OFFSET);
		c->info_mask_shared_by_all = BIT(IIO_CHAN_INFO_SAMP_FREQ);
		c->info_mask_shared_by_all_available =
			BIT(IIO_CHAN_INFO_SAMP_FREQ);
		/* F32 is described as 32 bits too; its buffer is refused */
		c->scan_type.sign = 's';
		c->scan_type.realbits = iio->sample_bytes * 8;
		c->scan_type.storagebits = iio->sample_bytes * 8;
		c->scan_type.endianness = IIO_LE;
		/* thresholds in counts: none for F32 */
		if (virtio_has_feature(vd->vdev, VDAQ_F_TRIGGER) &&
		    iio->format != VDAQ_FORMAT_F32) {
			c->event_spec = vdaq_iio_events;
			c->num_event_specs = ARRAY_SIZE(vdaq_iio_events);
		}
	}
	iio->chans[ch] = (struct iio_chan_spec)IIO_CHAN_SOFT_TIMESTAMP(ch);

	indio_dev->name = "vdaq";
	indio_dev->label = vd->name;
	indio_dev->info = &vdaq_iio_info;
	indio_dev->modes = INDIO_DIRECT_MODE;
	indio_dev->channels = iio->chans;
	indio_dev->num_channels = ch + 1;
	err = devm_iio_kfifo_buffer_setup(dev, indio_dev, &vdaq_iio_setup_ops);
	if (err)
		return err;

	spin_lock_irq(&vd->lock);
	vd->iio = iio;
	spin_unlock_irq(&vd->lock);
	err = iio_device_register(indio_dev);
	if (err) {
		/* ctrl_mutex too: reset_work reads vd->iio under it alone */
		mutex_lock(&vd->ctrl_mutex);
		spin_lock_irq(&vd->lock);
		vd->iio = NULL;
		spin_unlock_irq(&vd->lock);
		mutex_unlock(&vd->ctrl_mutex);
		return err;
	}
	if (!iio->full_scale_uv)
		dev_info(&indio_dev->dev,
			 "the card does not report its input range (full_scale_uv 0): in_voltage_scale is 1, raw counts\n");
	if (iio->format == VDAQ_FORMAT_F32)
		dev_info(&indio_dev->dev,
			 "the card samples F32: IIO has no floating-point scan type, buffers are refused\n");
	dev_info(&indio_dev->dev, "%s: IIO device, %u voltage channels\n",
		 vd->name, ch);
	return 0;
}

/* At probe, after /dev/vdaqN: the card works without its IIO device. */
void vdaq_iio_register(struct vdaq_dev *vd)
{
	struct device *dev = &vd->vdev->dev;
	void *group;
	int err;

	/* a failed registration gives back what it took, now */
	group = devres_open_group(dev, NULL, GFP_KERNEL);
	if (!group) {
		dev_warn(dev, "no IIO device: out of memory\n");
		return;
	}
	err = __vdaq_iio_register(vd);
	if (err) {
		devres_release_group(dev, group);
		dev_warn(dev, "no IIO device: %d\n", err);
		return;
	}
	devres_remove_group(dev, group);
}

/*
 * At removal, before anything else: disables the buffer (ending a capture,
 * vdaq_iio_stop()) and removes the sysfs files and /dev/iio:deviceN (open
 * files get -ENODEV from the IIO core). The iio_dev itself is freed by
 * devres after vdaq_remove(), when every capture buffer is back.
 */
void vdaq_iio_unregister(struct vdaq_dev *vd)
{
	struct vdaq_iio *iio;

	spin_lock_irq(&vd->lock);
	iio = vd->iio;
	spin_unlock_irq(&vd->lock);
	if (!iio)
		return;
	iio_device_unregister(iio->indio_dev);
	/* no event callbacks any more: disarm the card's trigger */
	mutex_lock(&vd->ctrl_mutex);
	if (iio->ev_chan >= 0)
		vdaq_iio_arm(iio, -1, IIO_EV_DIR_RISING);
	mutex_unlock(&vd->ctrl_mutex);
}
