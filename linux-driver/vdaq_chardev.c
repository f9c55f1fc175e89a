// SPDX-License-Identifier: GPL-2.0
/*
 * vdaq: the character device /dev/vdaqN: reads, cancellation, poll, ioctls.
 *
 * One read = one request = one descriptor chain over the caller's own pages
 * (pinned with FOLL_LONGTERM: a read may stay posted for as long as the
 * device is stopped). The device writes header and frames straight into
 * them; the read returns the used length after validating it. A read into
 * an io_uring registered buffer (IORING_OP_READ_FIXED) comes as a bio_vec
 * iterator over pages io_uring pinned at registration and keeps pinned until
 * the read completes: the driver pins nothing for it.
 *
 * Synchronous read(): posts its request and sleeps until it completes.
 * Asynchronous reads (io_uring, Linux AIO): posted from .read_iter, which
 * returns -EIOCBQUEUED; the bottom half completes them with ki_complete().
 *
 * Cancellation never discards data: a cancelled read is taken back from the
 * device with FLUSH and completes with what the device returned (a header
 * and 0 or more frames: the stream's sequence numbers stay gapless). Only a
 * read the device never returned completes with an error: -EIO after a
 * NEEDS_RESET or dead-device reset, -ECANCELED at removal.
 */

#include <linux/aio.h>
#include <linux/bvec.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/kallsyms.h>
#include <linux/mm.h>
#include <linux/pci.h>
#include <linux/platform_device.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/uio.h>
#include <linux/virtio_config.h>

#include "vdaq.h"

/* Pages one read may span before merging: 4 MiB. */
#define VDAQ_MAX_PAGES		1024
/* A read of this size from a page-aligned buffer always fits one chain. */
#define VDAQ_MAX_READ_BYTES	(VDAQ_MAX_CHAIN_DESCRIPTORS * PAGE_SIZE)

/*
 * Copies the header the device wrote at the start of @req's buffer into @h;
 * false if it cannot be read. Straight from the first page where the header
 * lies in it (the usual case: one 64-byte copy, no scatterlist walk).
 */
bool vdaq_read_header(struct vdaq_req *req, struct vdaq_buffer_header *h)
{
	struct scatterlist *sg = req->sgt.sgl;
	unsigned int offset = offset_in_page(sg->offset);
	struct page *page = sg_page(sg) + (sg->offset >> PAGE_SHIFT);
	void *kaddr;

	if (sg->length < sizeof(*h) || offset + sizeof(*h) > PAGE_SIZE)
		return sg_pcopy_to_buffer(sg, req->sgt.orig_nents, h,
					  sizeof(*h), 0) == sizeof(*h);
	kaddr = kmap_local_page(page);
	memcpy(h, kaddr + offset, sizeof(*h));
	kunmap_local(kaddr);
	return true;
}

/*
 * Checks a returned buffer (vd->lock held): used length, then @h, the copy
 * of the header the device wrote into the caller's pages (NULL: it could
 * not be read). Sets req->result.
 */
void vdaq_validate_used(struct vdaq_dev *vd, struct vdaq_req *req,
			unsigned int used, const struct vdaq_buffer_header *h)
{
	unsigned int code = VDAQ_VIOLATION_HEADER_MALFORMED;
	const char *what = "malformed buffer header";
	u64 payload, dropped;
	unsigned int ss;

	if (used == 0) {
		/* the device could not write it: nothing in it is valid */
		vd->cnt.rejected++;
		goto fail;
	}
	if (used > req->len) {
		code = VDAQ_VIOLATION_USED_LEN_OVER;
		what = "used length beyond the buffer";
		goto invalid;
	}
	if (used < VDAQ_HEADER_SIZE) {
		code = VDAQ_VIOLATION_USED_LEN_UNDER_HEADER;
		what = "used length under the header";
		goto invalid;
	}
	if (!h)
		goto fail;	/* our own copy failed: not the device's doing */
	if (h->status == VDAQ_BUF_STATUS_BAD_BUFFER) {
		vd->cnt.rejected++;
		goto fail;
	}
	if (h->status != VDAQ_BUF_STATUS_OK)
		goto invalid;
	/* whole frames of the configured frame (spec 5.x.6.2) */
	if (h->frame_count && (h->format != vd->format ||
			       le16_to_cpu(h->channels) != vd->channels)) {
		code = VDAQ_VIOLATION_HEADER_CONFIGURATION;
		what = "header format or channels contradict the configuration";
		goto invalid;
	}
	ss = vdaq_sample_bytes(h->format);
	if (!ss || !h->channels)
		goto invalid;
	payload = (u64)le32_to_cpu(h->frame_count) *
		  le16_to_cpu(h->channels) * ss;
	if (payload != used - VDAQ_HEADER_SIZE) {
		code = VDAQ_VIOLATION_HEADER_LENGTH;
		what = "header frame count disagrees with the used length";
		goto invalid;
	}
	dropped = le64_to_cpu(h->dropped_frames);
	vd->cnt.dropped_frames += dropped;
	if (le16_to_cpu(h->flags) & VDAQ_BUF_OVERRUN)
		vd->cnt.overrun_buffers++;
	vd->cnt.completed++;
	vd->cnt.bytes += used;
	req->result = used;
	return;

invalid:
	vd->cnt.invalid++;
	dev_warn_ratelimited(vd->misc.this_device,
			     "invalid completion: used %u of %zu bytes\n",
			     used, req->len);
	vdaq_note_violation(vd, code, what);
	vd->cnt.errors++;
	req->result = -EPROTO;
	return;
fail:
	vd->cnt.errors++;
	req->result = -EIO;
}

static void vdaq_free_req(struct vdaq_req *req)
{
	if (req->pages != req->inline_pages)
		kvfree(req->pages);
	kmem_cache_free(vdaq_req_cache, req);
}

/* Lets go of the buffer: the scatterlist, and the pins this driver took. */
static void vdaq_release_buffer(struct vdaq_req *req, bool written)
{
	if (!req->sg_inline)
		sg_free_table(&req->sgt);
	if (req->pinned) {
		if (written)
			unpin_user_pages_dirty_lock(req->pages, req->nr_pages,
						    true);
		else
			unpin_user_pages(req->pages, req->nr_pages);
	}
	req->pinned = false;
	req->nr_pages = 0;
}

/* Unpins and hands the result over; no locks held. */
void vdaq_complete_req(struct vdaq_req *req)
{
	struct kiocb *iocb = req->iocb;

	vdaq_release_buffer(req, true);
	if (iocb) {
		/*
		 * Free after ki_complete(): until AIO has taken the kiocb off
		 * its active list (under ctx_lock, inside ki_complete), its
		 * cancel fn may still run and look at @req.
		 */
		iocb->ki_complete(iocb, req->result);
		vdaq_free_req(req);
	} else {
		/* the sleeping reader frees it */
		complete(&req->done);
	}
}

/*
 * A request for @len bytes. Nothing is zeroed in bulk: under TCG a memset is
 * a `rep stosb` emulated byte by byte, and the inline arrays (1.2 KiB) are
 * written before use anyway; each field a read uses is set here (the IIO
 * fields stay unused).
 */
static struct vdaq_req *vdaq_alloc_req(struct vdaq_dev *vd, size_t len,
				       gfp_t gfp)
{
	struct vdaq_req *req = kmem_cache_alloc(vdaq_req_cache, gfp);

	if (!req)
		return NULL;
	INIT_LIST_HEAD(&req->node);
	req->vd = vd;
	req->iocb = NULL;
	req->iio = false;
	req->in_flight = false;
	req->kbuf = NULL;
	req->owner = current->files;
	init_completion(&req->done);
	req->state = VDAQ_REQ_NEW;
	req->cancel = false;
	req->result = 0;
	req->len = len;
	req->nr_pages = 0;
	req->pages = req->inline_pages;
	req->pinned = false;
	req->sg_inline = false;
	req->sgt.sgl = NULL;
	req->sgt.nents = 0;
	req->sgt.orig_nents = 0;
	return req;
}

/*
 * Builds a scatterlist of physically contiguous runs, piece by piece, into
 * @sgl (@max entries, written from scratch: no sg_init_table() memset, which
 * TCG emulates byte by byte); runs past @max are only counted.
 */
struct vdaq_runs {
	struct scatterlist *sgl;
	unsigned int max;
	unsigned int count;
	phys_addr_t end;
};

static void vdaq_runs_add(struct vdaq_runs *runs, struct page *page,
			  unsigned int offset, unsigned int len)
{
	phys_addr_t start = page_to_phys(page) + offset;
	struct scatterlist *sg;

	if (runs->count && start == runs->end) {
		if (runs->count <= runs->max)
			runs->sgl[runs->count - 1].length += len;
	} else if (++runs->count <= runs->max) {
		sg = &runs->sgl[runs->count - 1];
		*sg = (struct scatterlist){};
		sg_set_page(sg, page, len, offset);
	}
	runs->end = start + len;
}

/*
 * Ends @runs as @req's scatterlist when it fit: true if it did (and it
 * then lives in @req->sgt).
 */
static bool vdaq_runs_fit(struct vdaq_req *req, struct vdaq_runs *runs)
{
	if (!runs->count || runs->count > runs->max)
		return false;
	sg_mark_end(&runs->sgl[runs->count - 1]);
	req->sgt.sgl = runs->sgl;
	req->sgt.nents = runs->count;
	req->sgt.orig_nents = runs->count;
	return true;
}

/*
 * Adds the bio_vec pieces of @to's first @len bytes to @runs (a piece may
 * itself span contiguous pages: a huge page). False: @to is shorter.
 */
static bool vdaq_bvec_runs(const struct iov_iter *to, size_t len,
			   struct vdaq_runs *runs)
{
	const struct bio_vec *bv = to->bvec;
	size_t skip = to->iov_offset, piece;
	unsigned int i, offset;

	for (i = 0; i < to->nr_segs && len; i++, skip = 0) {
		if (skip >= bv[i].bv_len)
			continue;
		piece = min(len, bv[i].bv_len - skip);
		offset = bv[i].bv_offset + skip;
		vdaq_runs_add(runs, bv[i].bv_page + (offset >> PAGE_SHIFT),
			      offset_in_page(offset), piece);
		len -= piece;
	}
	return !len;
}

/*
 * The scatterlist of a read into an io_uring registered buffer, over pages
 * io_uring holds pinned until the read completes: one pass into the inline
 * scatterlist, a second into an allocated one if the runs do not fit it.
 */
static int vdaq_map_bvec(struct vdaq_req *req, const struct iov_iter *to,
			 gfp_t gfp)
{
	struct vdaq_runs runs = {
		.sgl = req->inline_sg, .max = VDAQ_INLINE_PAGES
	};
	int err;

	if (!vdaq_bvec_runs(to, req->len, &runs))
		return -EFAULT;
	if (vdaq_runs_fit(req, &runs)) {
		req->sg_inline = true;
		return 0;
	}
	if (runs.count > VDAQ_MAX_CHAIN_DESCRIPTORS)
		return -EINVAL;	/* the device takes at most 64 per chain */
	/* at most 64 entries: one chunk, no chaining */
	err = sg_alloc_table(&req->sgt, runs.count, gfp);
	if (err)
		return err == -ENOMEM ? -EAGAIN : err;
	runs = (struct vdaq_runs){ .sgl = req->sgt.sgl, .max = req->sgt.nents };
	vdaq_bvec_runs(to, req->len, &runs);
	vdaq_runs_fit(req, &runs);
	return 0;
}

/*
 * Pins the caller's pages at @addr and builds their scatterlist, one entry
 * per physically contiguous run (a transparent huge page makes a whole read
 * one descriptor): by hand, into the inline arrays, for a read that fits
 * them (as sg_alloc_table_from_pages_segment() would, without allocating),
 * else with that helper.
 */
static int vdaq_pin_user(struct vdaq_req *req, unsigned long addr, gfp_t gfp)
{
	unsigned long first = addr >> PAGE_SHIFT;
	unsigned long last = (addr + req->len - 1) >> PAGE_SHIFT;
	struct vdaq_runs runs = {
		.sgl = req->inline_sg, .max = VDAQ_INLINE_PAGES
	};
	unsigned int offset = offset_in_page(addr), i;
	size_t left = req->len, len;
	int pinned, err;

	if (last - first + 1 > VDAQ_MAX_PAGES)
		return -EINVAL;
	req->nr_pages = last - first + 1;
	if (req->nr_pages > VDAQ_INLINE_PAGES) {
		req->pages = kvmalloc_array(req->nr_pages, sizeof(*req->pages),
					    gfp);
		if (!req->pages) {
			req->pages = req->inline_pages;
			return -EAGAIN;
		}
	}
	/*
	 * Pinning may fault the pages in, also under IOCB_NOWAIT, as block
	 * devices' O_DIRECT does: -EAGAIN from a pollable file makes io_uring
	 * wait for EPOLLIN, which says frames are ready, not that the pages
	 * are, so a fast-only pin of pages not yet faulted in kept a read
	 * bouncing between poll and retry.
	 */
	pinned = pin_user_pages_fast(addr & PAGE_MASK, req->nr_pages,
				     FOLL_WRITE | FOLL_LONGTERM, req->pages);
	if (pinned != req->nr_pages) {
		if (pinned > 0)
			unpin_user_pages(req->pages, pinned);
		return pinned < 0 ? pinned : -EFAULT;
	}
	req->pinned = true;
	if (req->nr_pages > VDAQ_INLINE_PAGES) {
		err = sg_alloc_table_from_pages_segment(&req->sgt, req->pages,
							req->nr_pages, offset,
							req->len, SZ_1G, gfp);
		if (!err && req->sgt.orig_nents > VDAQ_MAX_CHAIN_DESCRIPTORS) {
			sg_free_table(&req->sgt);
			err = -EINVAL;
		}
		if (err)
			goto err_unpin;
		return 0;
	}
	for (i = 0; i < req->nr_pages; i++) {
		len = min_t(size_t, left, PAGE_SIZE - offset);
		vdaq_runs_add(&runs, req->pages[i], offset, len);
		left -= len;
		offset = 0;
	}
	/* at most 17 pages, so at most 17 runs: they fit */
	req->sg_inline = vdaq_runs_fit(req, &runs);
	return 0;

err_unpin:
	unpin_user_pages(req->pages, req->nr_pages);
	req->pinned = false;
	return err == -ENOMEM ? -EAGAIN : err;
}

/*
 * Takes hold of the caller's buffer and builds its scatterlist. With
 * @nowait (IOCB_NOWAIT: io_uring's inline issue, RWF_NOWAIT) allocations are
 * GFP_NOWAIT (failing with -EAGAIN, and io_uring retries from a worker).
 */
static struct vdaq_req *vdaq_prepare(struct vdaq_dev *vd, struct iov_iter *to,
				     bool nowait)
{
	gfp_t gfp = nowait ? GFP_NOWAIT | __GFP_NOWARN : GFP_KERNEL;
	unsigned long addr = 0;
	struct vdaq_req *req;
	unsigned int frame;
	size_t len = iov_iter_count(to);
	int err;

	if (iter_is_ubuf(to))
		addr = (unsigned long)to->ubuf + to->iov_offset;
	else if (iter_is_iovec(to) && to->nr_segs == 1)
		addr = (unsigned long)to->iov->iov_base + to->iov_offset;
	else if (!iov_iter_is_bvec(to))
		return ERR_PTR(-EINVAL);	/* one buffer per read */

	spin_lock_irq(&vd->lock);
	frame = vd->frame_bytes;
	spin_unlock_irq(&vd->lock);
	if (!frame)
		return ERR_PTR(-EIO);
	if (len < VDAQ_HEADER_SIZE + frame || len > U32_MAX)
		return ERR_PTR(-EINVAL);

	req = vdaq_alloc_req(vd, len, gfp);
	if (!req)
		return ERR_PTR(nowait ? -EAGAIN : -ENOMEM);
	if (iov_iter_is_bvec(to))
		err = vdaq_map_bvec(req, to, gfp);
	else
		err = vdaq_pin_user(req, addr, gfp);
	if (err) {
		vdaq_free_req(req);
		return ERR_PTR(err == -EAGAIN && !nowait ? -ENOMEM : err);
	}
	return req;
}

/* Releases a request that was never posted. */
static void vdaq_discard_req(struct vdaq_req *req)
{
	vdaq_release_buffer(req, false);
	vdaq_free_req(req);
}

/*
 * Puts @req (its sgt) on the data queue and on vd->posted; vd->lock held.
 * Sets *notify when the device must be notified (after unlocking).
 */
int vdaq_add_req_locked(struct vdaq_dev *vd, struct vdaq_req *req,
			bool *notify)
{
	struct virtqueue *vq = vd->vqs[VDAQ_QUEUE_DATA];
	struct scatterlist *sgs[1] = { req->sgt.sgl };
	int err;

	lockdep_assert_held(&vd->lock);
	if (vd->removing)
		return -ENODEV;
	if (!vd->ready || vd->needs_reset)
		return -EIO;
	/*
	 * A CONFIGURE since the read was prepared may have grown the frame:
	 * the device would refuse the buffer at once, out of order.
	 */
	if (req->len < VDAQ_HEADER_SIZE + vd->frame_bytes)
		return -EINVAL;
	err = virtqueue_add_sgs(vq, sgs, 0, 1, req, GFP_ATOMIC);
	if (err == -ENOSPC)
		return -EAGAIN;	/* data queue full */
	if (err)
		return -EIO;
	req->state = VDAQ_REQ_POSTED;
	list_add_tail(&req->node, &vd->posted);
	vd->nr_posted++;
	if (req->iio)
		vd->nr_iio_posted++;
	if (virtqueue_kick_prepare(vq)) {
		*notify = true;
		vd->cnt.data_notifications++;
	}
	if (vd->nr_posted == 1 && vdaq_watchdog_ms)
		queue_delayed_work(vdaq_wq, &vd->watchdog,
				   msecs_to_jiffies(vdaq_watchdog_ms));
	return 0;
}

/*
 * Whether /dev/vdaqN holds the stream (vd->lock held): a read of it is
 * posted, or it STARTed the card and did not STOP it since. The IIO buffer
 * cannot be enabled then, nor the rate be changed through IIO.
 */
bool vdaq_chardev_streaming(struct vdaq_dev *vd)
{
	lockdep_assert_held(&vd->lock);
	return vd->chardev_started || vd->nr_posted != vd->nr_iio_posted;
}

/* Makes the request available on the data queue. */
static int vdaq_post(struct vdaq_dev *vd, struct vdaq_req *req)
{
	bool notify = false, cancel;
	int err;

	spin_lock_irq(&vd->lock);
	/* one user of the stream at a time: the IIO buffer has it */
	if (vd->iio_claimed && !vd->removing)
		err = -EBUSY;
	else
		err = vdaq_add_req_locked(vd, req, &notify);
	cancel = !err && req->cancel;
	spin_unlock_irq(&vd->lock);
	if (notify)
		virtqueue_notify(vd->vqs[VDAQ_QUEUE_DATA]);
	if (cancel)
		queue_work(vdaq_wq, &vd->cancel_work);
	return err;
}

static bool vdaq_cancelled_posted(struct vdaq_dev *vd)
{
	struct vdaq_req *req;
	bool found = false;

	spin_lock_irq(&vd->lock);
	list_for_each_entry(req, &vd->posted, node) {
		if (req->cancel) {
			found = true;
			break;
		}
	}
	spin_unlock_irq(&vd->lock);
	return found;
}

/*
 * Takes cancelled reads back: FLUSH until none of them is posted. If the
 * device does not return them (FLUSH fails, or they stay posted), the device
 * is reset, which completes them.
 */
static void vdaq_cancel_posted(struct vdaq_dev *vd)
{
	unsigned long wait = msecs_to_jiffies(100);
	int tries, err = 0;
	bool left;

	mutex_lock(&vd->ctrl_mutex);
	for (tries = 0; tries < 5 && vdaq_cancelled_posted(vd); tries++) {
		err = vdaq_flush_locked(vd, NULL);
		if (err)
			break;
		/* the device put the buffers on the used ring before the reply */
		wait_event_timeout(vd->wq, !vdaq_cancelled_posted(vd), wait);
	}
	left = vdaq_cancelled_posted(vd);
	mutex_unlock(&vd->ctrl_mutex);
	if (left && vdaq_alive(vd))
		vdaq_schedule_reset(vd, err ? "FLUSH failed" :
				    "FLUSH did not return cancelled reads");
}

void vdaq_cancel_work(struct work_struct *work)
{
	vdaq_cancel_posted(container_of(work, struct vdaq_dev, cancel_work));
}

/* Marks @req cancelled (if still posted) and schedules the FLUSH. */
static void vdaq_request_cancel(struct vdaq_dev *vd, struct vdaq_req *req)
{
	unsigned long flags;

	spin_lock_irqsave(&vd->lock, flags);
	if (!req->cancel) {
		req->cancel = true;
		vd->cnt.cancellations++;
	}
	if (req->state == VDAQ_REQ_POSTED && !vd->removing)
		queue_work(vdaq_wq, &vd->cancel_work);
	spin_unlock_irqrestore(&vd->lock, flags);
}

/* Linux AIO io_cancel(2), io_destroy(2) and exit: runs under ctx_lock. */
static int vdaq_aio_cancel(struct kiocb *iocb)
{
	struct vdaq_req *req = iocb->private;

	vdaq_request_cancel(req->vd, req);
	return 0;	/* completion follows through ki_complete() */
}

/*
 * kiocb_set_cancel_fn() is only valid for Linux AIO kiocbs (6.1 does not
 * check; 6.8 added IOCB_AIO_RW). AIO's completion function is the only
 * thing that tells them apart from io_uring's here: learn its address, and
 * that of the last other one seen, so that the symbol lookup (a kallsyms
 * search, a few percent of a TCG guest's time when done per read) runs once
 * per kind of caller, not once per read.
 */
static void *vdaq_aio_complete, *vdaq_other_complete;

/*
 * The lookup, out of line: its 0x2a0-byte name buffer is zeroed on every
 * call (Debian builds with CONFIG_INIT_STACK_ALL_ZERO), a `rep stos` per
 * read under TCG had it been in vdaq_is_aio().
 */
static noinline bool vdaq_learn_complete_fn(void *fn)
{
	char name[KSYM_SYMBOL_LEN];

	sprint_symbol_no_offset(name, (unsigned long)fn);
	if (strcmp(name, "aio_complete_rw")) {
		WRITE_ONCE(vdaq_other_complete, fn);
		return false;
	}
	WRITE_ONCE(vdaq_aio_complete, fn);
	return true;
}

static bool vdaq_is_aio(struct kiocb *iocb)
{
	void *fn = (void *)iocb->ki_complete;

	if (fn == READ_ONCE(vdaq_aio_complete))
		return true;
	if (fn == READ_ONCE(vdaq_other_complete))
		return false;
	return vdaq_learn_complete_fn(fn);
}

/*
 * Whether the device has frames a FLUSH would deliver now (config counters:
 * produced - delivered - dropped). Never blocks behind a running command.
 */
static bool vdaq_frames_available(struct vdaq_dev *vd)
{
	struct virtio_device *vdev = vd->vdev;
	u64 produced, delivered, dropped;
	bool avail = false;

	if (!mutex_trylock(&vd->ctrl_mutex))
		return false;
	if (vdaq_alive(vd)) {
		produced = virtio_cread64(vdev, offsetof(struct vdaq_config,
							 frames_produced));
		delivered = virtio_cread64(vdev, offsetof(struct vdaq_config,
							  frames_delivered));
		dropped = virtio_cread64(vdev, offsetof(struct vdaq_config,
							frames_dropped));
		avail = produced > delivered + dropped;
	}
	mutex_unlock(&vd->ctrl_mutex);
	return avail;
}

static ssize_t vdaq_read_sync(struct vdaq_dev *vd, struct vdaq_req *req,
			      bool nonblock)
{
	unsigned long grace = msecs_to_jiffies(2 * vdaq_cmd_timeout_ms + 1000);
	bool interrupted = false;
	long ret;
	int err;

	if (nonblock && !vdaq_frames_available(vd)) {
		vdaq_discard_req(req);
		return -EAGAIN;
	}
	err = vdaq_post(vd, req);
	if (err) {
		vdaq_discard_req(req);
		return err;
	}
	/* O_NONBLOCK: take whatever the device has now. */
	if (nonblock)
		vdaq_request_cancel(vd, req);
	if (wait_for_completion_interruptible(&req->done)) {
		interrupted = true;
		vdaq_request_cancel(vd, req);
		if (!wait_for_completion_timeout(&req->done, grace)) {
			vdaq_schedule_reset(vd, "read not returned after a signal");
			/* the reset (or removal) completes every read */
			wait_for_completion(&req->done);
		}
	}
	ret = req->result;
	vdaq_free_req(req);
	if (interrupted && ret < 0)
		return -EINTR;
	return ret;
}

static ssize_t vdaq_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	struct vdaq_dev *vd = iocb->ki_filp->private_data;
	struct vdaq_req *req;
	bool nonblock;
	int err;

	if (!iov_iter_count(to))
		return 0;
	/* the caller's memory, or pages a registered buffer holds pinned */
	if (!user_backed_iter(to) && !iov_iter_is_bvec(to))
		return -EINVAL;
	if (READ_ONCE(vd->iio_claimed))
		return -EBUSY;	/* checked again, under the lock, when posting */
	nonblock = (iocb->ki_flags & IOCB_NOWAIT) ||
		   (iocb->ki_filp->f_flags & O_NONBLOCK);
	if (is_sync_kiocb(iocb)) {
		req = vdaq_prepare(vd, to, false);
		if (IS_ERR(req))
			return PTR_ERR(req);
		return vdaq_read_sync(vd, req, nonblock);
	}

	/* asynchronous: never waits for data, only IOCB_NOWAIT limits setup */
	req = vdaq_prepare(vd, to, iocb->ki_flags & IOCB_NOWAIT);
	if (IS_ERR(req))
		return PTR_ERR(req);

	req->iocb = iocb;
	iocb->private = req;
	/* before posting: the cancel fn must be set while the kiocb is ours */
	if (vdaq_is_aio(iocb))
		kiocb_set_cancel_fn(iocb, vdaq_aio_cancel);
	err = vdaq_post(vd, req);
	if (err) {
		vdaq_discard_req(req);
		return err;
	}
	return -EIOCBQUEUED;
}

void vdaq_poll_work(struct work_struct *work)
{
	struct vdaq_dev *vd = container_of(to_delayed_work(work),
					   struct vdaq_dev, poll_work);

	wake_up_all(&vd->wq);
}

static __poll_t vdaq_poll(struct file *file, poll_table *wait)
{
	struct vdaq_dev *vd = file->private_data;
	__poll_t mask = 0;
	bool gone;

	poll_wait(file, &vd->wq, wait);
	spin_lock_irq(&vd->lock);
	gone = vd->removing;
	if (gone)
		mask |= EPOLLHUP | EPOLLERR;
	if (vd->ring_len)
		mask |= EPOLLPRI;
	spin_unlock_irq(&vd->lock);
	if (gone)
		return mask;
	if (vdaq_frames_available(vd))
		mask |= EPOLLIN | EPOLLRDNORM;
	else
		/* frames entering the FIFO raise no interrupt: look again */
		queue_delayed_work(vdaq_wq, &vd->poll_work, msecs_to_jiffies(2));
	return mask;
}

static int vdaq_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct vdaq_dev *vd = container_of(misc, struct vdaq_dev, misc);

	spin_lock_irq(&vd->lock);
	if (vd->removing) {
		spin_unlock_irq(&vd->lock);
		return -ENODEV;
	}
	vdaq_get(vd);
	spin_unlock_irq(&vd->lock);
	atomic_inc(&vd->open_count);
	file->private_data = vd;
	/*
	 * FMODE_NOWAIT: io_uring may issue reads inline with IOCB_NOWAIT
	 * (no io-wq worker hop); setting up a read then never sleeps, or
	 * fails with -EAGAIN and io_uring retries it from a worker.
	 */
	stream_open(inode, file);
	file->f_mode |= FMODE_NOWAIT;
	return 0;
}

/*
 * close(): cancel the reads this process (files table) still has posted, so
 * asynchronous reads in a stopped device come back and the process can exit.
 */
static int vdaq_flush(struct file *file, fl_owner_t id)
{
	struct vdaq_dev *vd = file->private_data;
	struct vdaq_req *req;
	bool any = false;

	spin_lock_irq(&vd->lock);
	list_for_each_entry(req, &vd->posted, node) {
		/* the IIO capture buffers (no owner) are not this file's */
		if (!req->iio && req->owner == id && !req->cancel) {
			req->cancel = true;
			vd->cnt.cancellations++;
			any = true;
		}
	}
	spin_unlock_irq(&vd->lock);
	if (any)
		vdaq_cancel_posted(vd);
	return 0;
}

/*
 * START, STOP, FLUSH from /dev/vdaqN: -EBUSY while the IIO buffer is enabled
 * (one card, two interfaces, one user of the stream at a time); else the
 * command, and vd->chardev_started follows START and STOP. @quiet: the STOP
 * of the last close, skipped (0) while IIO has the stream.
 */
static int vdaq_stream_command(struct vdaq_dev *vd, u32 opcode,
			       const void *payload, size_t payload_len,
			       void *reply, size_t reply_len, bool quiet)
{
	bool claimed;
	int err;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	spin_lock_irq(&vd->lock);
	claimed = vd->iio_claimed;
	spin_unlock_irq(&vd->lock);
	if (claimed) {
		err = quiet ? 0 : -EBUSY;
		goto out;
	}
	err = __vdaq_command(vd, opcode, payload, payload_len, reply,
			     reply_len);
	if (!err && (opcode == VDAQ_CMD_START || opcode == VDAQ_CMD_STOP)) {
		spin_lock_irq(&vd->lock);
		vd->chardev_started = opcode == VDAQ_CMD_START;
		spin_unlock_irq(&vd->lock);
	}
out:
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

/*
 * TRIGGER, SET_TRIGGER: -EBUSY while an IIO threshold event has the card's
 * trigger (its TRIGGER event records would be taken for threshold events).
 */
static int vdaq_trigger_command(struct vdaq_dev *vd, u32 opcode,
				const void *payload, size_t payload_len)
{
	bool busy;
	int err;

	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	spin_lock_irq(&vd->lock);
	busy = vd->iio_events;
	spin_unlock_irq(&vd->lock);
	err = busy ? -EBUSY : __vdaq_command(vd, opcode, payload, payload_len,
					     NULL, 0);
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

/* Last close: no read of this file can be pending (each holds the file). */
static int vdaq_release(struct inode *inode, struct file *file)
{
	struct vdaq_dev *vd = file->private_data;

	/*
	 * The last opener gone: stop acquisition, so the FIFO does not
	 * overrun, unless the IIO buffer has the stream.
	 */
	if (atomic_dec_and_test(&vd->open_count) && vdaq_alive(vd))
		vdaq_stream_command(vd, VDAQ_CMD_STOP, NULL, 0, NULL, 0, true);
	vdaq_put(vd);
	return 0;
}

static int vdaq_check_configure(struct vdaq_dev *vd,
				const struct vdaq_configure *c)
{
	struct vdaq_config cfg;
	unsigned int i;
	u16 ch = le16_to_cpu(c->channels);
	u32 rate = le32_to_cpu(c->rate_hz);
	u32 wm = le32_to_cpu(c->watermark_frames);

	vdaq_read_config(vd, &cfg);
	for (i = 0; i < sizeof(c->reserved); i++)
		if (c->reserved[i])
			return -EINVAL;
	if (!ch || ch > le16_to_cpu(cfg.max_channels) ||
	    rate < le32_to_cpu(cfg.min_rate_hz) ||
	    rate > le32_to_cpu(cfg.max_rate_hz) ||
	    !vdaq_sample_bytes(c->format) ||
	    !(le32_to_cpu(cfg.supported_formats) & (1U << c->format)) ||
	    !le32_to_cpu(c->latency_us) ||
	    !wm || wm > le32_to_cpu(cfg.fifo_frames) ||
	    !le16_to_cpu(c->coalesce_buffers) ||
	    le16_to_cpu(c->amplitude_permille) > 1000 ||
	    c->signal > VDAQ_SIGNAL_FILE || c->clock > VDAQ_CLOCK_FREE_RUNNING)
		return -EINVAL;
	return 0;
}

static long vdaq_ioctl_configure(struct vdaq_dev *vd, void __user *argp)
{
	struct vdaq_configure c;
	int err;

	if (copy_from_user(&c, argp, sizeof(c)))
		return -EFAULT;
	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		err = -ENODEV;
		goto out;
	}
	if (READ_ONCE(vd->iio_claimed)) {
		err = -EBUSY;	/* the IIO buffer has the stream */
		goto out;
	}
	err = vdaq_check_configure(vd, &c);
	if (!err)
		err = __vdaq_command(vd, VDAQ_CMD_CONFIGURE, &c, sizeof(c),
				     NULL, 0);
	if (!err)
		vdaq_refresh_frame_bytes(vd);
out:
	mutex_unlock(&vd->ctrl_mutex);
	return err;
}

static long vdaq_ioctl_info(struct vdaq_dev *vd, void __user *argp)
{
	struct virtio_device *vdev = vd->vdev;
	struct device *parent;
	struct vdaq_info info;

	memset(&info, 0, sizeof(info));
	if (mutex_lock_killable(&vd->ctrl_mutex))
		return -EINTR;
	if (!vdaq_alive(vd)) {
		mutex_unlock(&vd->ctrl_mutex);
		return -ENODEV;
	}
	info.features = vdev->features;
	info.device_id = vdev->id.device;
	info.vendor_id = vdev->id.vendor;
	info.data_queue_size = vd->dataq_size;
	info.max_read_bytes = VDAQ_MAX_READ_BYTES;
	info.frame_bytes = vd->frame_bytes;
	parent = vdev->dev.parent;
	if (parent && dev_is_pci(parent))
		info.transport = VDAQ_TRANSPORT_PCI;
	else if (parent && dev_is_platform(parent))
		info.transport = VDAQ_TRANSPORT_MMIO;
	vdaq_read_config(vd, &info.config);
	mutex_unlock(&vd->ctrl_mutex);
	return copy_to_user(argp, &info, sizeof(info)) ? -EFAULT : 0;
}

static long vdaq_ioctl_events(struct vdaq_dev *vd, void __user *argp)
{
	struct vdaq_events *evs;
	long ret = 0;

	evs = kzalloc(sizeof(*evs), GFP_KERNEL);
	if (!evs)
		return -ENOMEM;
	spin_lock_irq(&vd->lock);
	while (vd->ring_len && evs->count < VDAQ_EVENTS_MAX) {
		evs->events[evs->count++] = vd->ring[vd->ring_head];
		vd->ring_head = (vd->ring_head + 1) % VDAQ_EVENT_RING;
		vd->ring_len--;
	}
	evs->dropped = vd->ring_dropped;
	vd->ring_dropped = 0;
	spin_unlock_irq(&vd->lock);
	if (copy_to_user(argp, evs, sizeof(*evs)))
		ret = -EFAULT;
	kfree(evs);
	return ret;
}

static long vdaq_ioctl_stats(struct vdaq_dev *vd, void __user *argp)
{
	struct vdaq_stats s;

	memset(&s, 0, sizeof(s));
	spin_lock_irq(&vd->lock);
	s.completed = vd->cnt.completed;
	s.errors = vd->cnt.errors;
	s.invalid = vd->cnt.invalid;
	s.rejected = vd->cnt.rejected;
	s.reclaimed = vd->cnt.reclaimed;
	s.cancellations = vd->cnt.cancellations;
	s.pending = vd->nr_posted;
	s.dropped_frames = vd->cnt.dropped_frames;
	s.overrun_buffers = vd->cnt.overrun_buffers;
	s.events = vd->cnt.events;
	s.events_dropped = vd->cnt.events_dropped;
	s.interrupts = vd->cnt.interrupts;
	s.bottom_halves = vd->cnt.bottom_halves;
	s.found_on_recheck = vd->cnt.found_on_recheck;
	s.resets = vd->cnt.resets;
	s.bytes = vd->cnt.bytes;
	s.watchdog_recoveries = vd->cnt.watchdog_recoveries;
	s.config_changes = vd->cnt.config_changes;
	s.violations = vd->cnt.violations;
	s.first_violation = vd->cnt.first_violation;
	s.unknown_events = vd->cnt.unknown_events;
	s.resets_with_status = vd->cnt.resets_with_status;
	s.before_reset_produced = vd->cnt.before_reset_produced;
	s.before_reset_delivered = vd->cnt.before_reset_delivered;
	s.before_reset_dropped = vd->cnt.before_reset_dropped;
	s.before_reset_pending = vd->cnt.before_reset_pending;
	s.data_notifications = vd->cnt.data_notifications;
	spin_unlock_irq(&vd->lock);
	return copy_to_user(argp, &s, sizeof(s)) ? -EFAULT : 0;
}

static long vdaq_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vdaq_dev *vd = file->private_data;
	void __user *argp = (void __user *)arg;
	struct vdaq_flush_reply fr;
	struct vdaq_trigger trig;
	struct vdaq_status st;
	bool has_trigger;
	long err;

	spin_lock_irq(&vd->lock);
	if (vd->removing) {
		spin_unlock_irq(&vd->lock);
		return -ENODEV;
	}
	has_trigger = virtio_has_feature(vd->vdev, VDAQ_F_TRIGGER);
	spin_unlock_irq(&vd->lock);

	switch (cmd) {
	case VDAQ_IOC_GET_CONFIG:
		return vdaq_ioctl_info(vd, argp);
	case VDAQ_IOC_CONFIGURE:
		return vdaq_ioctl_configure(vd, argp);
	case VDAQ_IOC_START:
		return vdaq_stream_command(vd, VDAQ_CMD_START, NULL, 0, NULL, 0,
					   false);
	case VDAQ_IOC_STOP:
		return vdaq_stream_command(vd, VDAQ_CMD_STOP, NULL, 0, NULL, 0,
					   false);
	case VDAQ_IOC_RESET_COUNTERS:
		return vdaq_command(vd, VDAQ_CMD_RESET_COUNTERS, NULL, 0,
				    NULL, 0);
	case VDAQ_IOC_TRIGGER:
		if (!has_trigger)
			return -EOPNOTSUPP;
		return vdaq_trigger_command(vd, VDAQ_CMD_TRIGGER, NULL, 0);
	case VDAQ_IOC_SET_TRIGGER:
		if (!has_trigger)
			return -EOPNOTSUPP;
		if (copy_from_user(&trig, argp, sizeof(trig)))
			return -EFAULT;
		if (trig.reserved)
			return -EINVAL;
		return vdaq_trigger_command(vd, VDAQ_CMD_SET_TRIGGER, &trig,
					    sizeof(trig));
	case VDAQ_IOC_STATUS:
		err = vdaq_command(vd, VDAQ_CMD_GET_STATUS, NULL, 0, &st,
				   sizeof(st));
		if (err)
			return err;
		return copy_to_user(argp, &st, sizeof(st)) ? -EFAULT : 0;
	case VDAQ_IOC_FLUSH:
		err = vdaq_stream_command(vd, VDAQ_CMD_FLUSH, NULL, 0, &fr,
					  sizeof(fr), false);
		if (err)
			return err;
		return copy_to_user(argp, &fr, sizeof(fr)) ? -EFAULT : 0;
	case VDAQ_IOC_READ_EVENTS:
		return vdaq_ioctl_events(vd, argp);
	case VDAQ_IOC_GET_STATS:
		return vdaq_ioctl_stats(vd, argp);
	default:
		return -ENOTTY;
	}
}

const struct file_operations vdaq_fops = {
	.owner = THIS_MODULE,
	.open = vdaq_open,
	.flush = vdaq_flush,
	.release = vdaq_release,
	.read_iter = vdaq_read_iter,
	.poll = vdaq_poll,
	.unlocked_ioctl = vdaq_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = no_llseek,
};
