// SPDX-License-Identifier: GPL-2.0
/*
 * vdaqtest: exercises /dev/vdaq0 from the Linux guest's initramfs (static).
 *
 *   vdaqtest stream MS READS BYTES   stream MS ms with READS Linux AIO reads
 *                                    in flight, verify every buffer (header
 *                                    continuity, counter pattern), then
 *                                    STOP + FLUSH, check the device holds 0
 *   vdaqtest cancel MS READS BYTES   stopped device: io_cancel() READS AIO
 *                                    reads; a signal interrupts a blocking
 *                                    read; O_NONBLOCK gives EAGAIN
 *   vdaqtest close-pending MS READS BYTES
 *                                    stopped device: close() with READS AIO
 *                                    reads pending; all must complete
 *   vdaqtest iio-raw MS READS BYTES  the driver's IIO device through sysfs
 *                                    and /dev/iio:deviceN (no libiio): two
 *                                    captures of MS ms (the second at another
 *                                    sampling_frequency), every sample and
 *                                    timestamp checked; exclusivity with
 *                                    /dev/vdaq0; unbind with the buffer on
 *
 * Prints "result key=value ..." (fields of the VDAQ-REPORT) and exits 0 on
 * success. The real application is linux-app/ (Rust, io_uring).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/aio_abi.h>
#include <linux/iio/events.h>
#include <linux/iio/types.h>

#include "uapi/vdaq.h"

#define MAX_READS 256

static int fd = -1;
static aio_context_t ctx;
static int failures;

#define CHECK(cond, ...)						\
	do {								\
		if (!(cond)) {						\
			fprintf(stderr, "vdaqtest: FAIL: " __VA_ARGS__); \
			fputc('\n', stderr);				\
			failures++;					\
		}							\
	} while (0)

static long io_setup(unsigned int n, aio_context_t *c)
{
	return syscall(SYS_io_setup, n, c);
}

static long io_submit(aio_context_t c, long n, struct iocb **iocbs)
{
	return syscall(SYS_io_submit, c, n, iocbs);
}

static long io_getevents(aio_context_t c, long min, long max,
			 struct io_event *ev, struct timespec *ts)
{
	return syscall(SYS_io_getevents, c, min, max, ev, ts);
}

static long io_cancel(aio_context_t c, struct iocb *iocb, struct io_event *ev)
{
	return syscall(SYS_io_cancel, c, iocb, ev);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmd(unsigned long req, void *arg, const char *name)
{
	if (ioctl(fd, req, arg) < 0) {
		fprintf(stderr, "vdaqtest: ioctl %s: %s\n", name, strerror(errno));
		return -errno;
	}
	return 0;
}

struct stream {
	struct vdaq_info info;
	int have_seq;
	uint64_t next_seq, next_frame;
	uint64_t frames, samples, bytes, completions, empty, dropped, overruns;
	uint64_t verify_errors, errors;
};

static unsigned int sample_bytes(unsigned int format)
{
	return format == VDAQ_FORMAT_S16 ? 2 : format ? 4 : 0;
}

static void verify(struct stream *s, const uint8_t *buf, long res)
{
	const struct vdaq_buffer_header *h = (const void *)buf;
	unsigned int ch = h->channels, ss = sample_bytes(h->format);
	uint64_t n, i, count;

	s->completions++;
	if (res < 0) {
		s->errors++;
		return;
	}
	if (res < VDAQ_HEADER_SIZE || h->status != VDAQ_BUF_STATUS_OK ||
	    res != VDAQ_HEADER_SIZE + (long)h->frame_count * ch * ss) {
		s->verify_errors++;
		return;
	}
	if (s->have_seq && (h->sequence != s->next_seq ||
			    h->first_frame != s->next_frame + h->dropped_frames)) {
		fprintf(stderr, "vdaqtest: gap: seq %llu (want %llu) frame %llu (want %llu + %llu)\n",
			(unsigned long long)h->sequence,
			(unsigned long long)s->next_seq,
			(unsigned long long)h->first_frame,
			(unsigned long long)s->next_frame,
			(unsigned long long)h->dropped_frames);
		s->verify_errors++;
	}
	if (!!h->dropped_frames != !!(h->flags & VDAQ_BUF_OVERRUN))
		s->verify_errors++;
	s->have_seq = 1;
	s->next_seq = h->sequence + 1;
	s->next_frame = h->first_frame + h->frame_count;
	s->dropped += h->dropped_frames;
	s->overruns += !!(h->flags & VDAQ_BUF_OVERRUN);
	if (!h->frame_count)
		s->empty++;
	count = (uint64_t)h->frame_count * ch;
	if (h->signal == VDAQ_SIGNAL_COUNTER) {
		const uint8_t *p = buf + VDAQ_HEADER_SIZE;

		for (i = 0; i < count; i++) {
			n = h->first_frame * ch + i;
			int ok;

			if (h->format == VDAQ_FORMAT_S16) {
				uint16_t v;

				memcpy(&v, p + 2 * i, 2);
				ok = v == (uint16_t)n;
			} else if (h->format == VDAQ_FORMAT_S32) {
				uint32_t v;

				memcpy(&v, p + 4 * i, 4);
				ok = v == (uint32_t)n;
			} else {
				float v;

				memcpy(&v, p + 4 * i, 4);
				ok = v == (float)(n & 0xffffff);
			}
			if (!ok) {
				fprintf(stderr, "vdaqtest: sample %llu of seq %llu wrong\n",
					(unsigned long long)i,
					(unsigned long long)h->sequence);
				s->verify_errors++;
				break;
			}
		}
	}
	s->frames += h->frame_count;
	s->samples += count;
	s->bytes += res - VDAQ_HEADER_SIZE;
}

static uint8_t *bufs[MAX_READS];
static struct iocb iocbs[MAX_READS];

static int submit(int i, size_t len)
{
	struct iocb *p = &iocbs[i];

	memset(p, 0, sizeof(*p));
	p->aio_fildes = fd;
	p->aio_lio_opcode = IOCB_CMD_PREAD;
	p->aio_buf = (uintptr_t)bufs[i];
	p->aio_nbytes = len;
	p->aio_data = i;
	if (io_submit(ctx, 1, &p) != 1) {
		fprintf(stderr, "vdaqtest: io_submit: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

/* Waits for @n completions within @ms; returns how many arrived. */
static int reap(int n, int ms, struct stream *s, long *results)
{
	struct io_event ev[MAX_READS];
	uint64_t deadline = now_ns() + (uint64_t)ms * 1000000;
	int got = 0, i;
	long r;

	while (got < n && now_ns() < deadline) {
		struct timespec ts = { 0, 50000000 };

		r = io_getevents(ctx, 1, n - got, ev, &ts);
		if (r < 0 && errno != EINTR)
			break;
		for (i = 0; i < r; i++) {
			if (s)
				verify(s, bufs[ev[i].data], ev[i].res);
			if (results)
				results[ev[i].data] = ev[i].res;
		}
		got += r > 0 ? r : 0;
	}
	return got;
}

static int setup(int reads, size_t len)
{
	int i;

	fd = open("/dev/vdaq0", O_RDWR);
	if (fd < 0) {
		perror("vdaqtest: open /dev/vdaq0");
		return -1;
	}
	if (reads > MAX_READS)
		reads = MAX_READS;
	ctx = 0;
	if (io_setup(MAX_READS, &ctx) < 0) {
		perror("vdaqtest: io_setup");
		return -1;
	}
	for (i = 0; i < reads; i++) {
		bufs[i] = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (bufs[i] == MAP_FAILED)
			return -1;
	}
	return 0;
}

static void print_info(struct vdaq_info *info)
{
	struct vdaq_config *c = &info->config;

	printf("vdaqtest: %.24s fw %#x, features %#llx, %s, dataq %u, %u ch %u Hz format %u signal %u, frame %u bytes, state %u\n",
	       (char *)c->model, c->firmware_version,
	       (unsigned long long)info->features,
	       info->transport == VDAQ_TRANSPORT_PCI ? "pci" : "mmio",
	       info->data_queue_size, c->channels, c->rate_hz, c->format,
	       c->signal, info->frame_bytes, c->state);
}

static int do_stream(int ms, int reads, size_t len)
{
	struct stream s = { 0 };
	struct vdaq_flush_reply fr;
	struct vdaq_status st;
	struct vdaq_stats stats;
	struct io_event ev[MAX_READS];
	uint64_t t0, end, resets, recoveries = 0, failed_reads = 0, reset_seen = 0;
	int i, r, inflight, returned, nidle = 0;
	int idle[MAX_READS];
	char probe[VDAQ_HEADER_SIZE + 512];

	if (cmd(VDAQ_IOC_GET_CONFIG, &s.info, "GET_CONFIG"))
		return 1;
	print_info(&s.info);
	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	cmd(VDAQ_IOC_FLUSH, &fr, "FLUSH");
	/* sizes the driver must refuse before queueing anything */
	CHECK(read(fd, probe, VDAQ_HEADER_SIZE) < 0 && errno == EINVAL,
	      "a header-only read was not refused with EINVAL");
	if (cmd(VDAQ_IOC_START, NULL, "START"))
		return 1;
	/* one blocking read() */
	r = read(fd, bufs[0], len);
	CHECK(r >= VDAQ_HEADER_SIZE, "blocking read returned %d (%s)", r,
	      strerror(errno));
	verify(&s, bufs[0], r < 0 ? -errno : r);

	for (i = 0; i < reads; i++)
		if (submit(i, len))
			return 1;
	inflight = reads;
	t0 = now_ns();
	end = t0 + (uint64_t)ms * 1000000;
	cmd(VDAQ_IOC_GET_STATS, &stats, "GET_STATS");
	resets = stats.resets;
	while (now_ns() < end) {
		struct timespec ts = { 0, 100000000 };

		r = io_getevents(ctx, 1, reads, ev, &ts);
		for (i = 0; i < r; i++) {
			if (ev[i].res < 0) {
				/* taken back by a reset? resubmit after START */
				idle[nidle++] = ev[i].data;
				s.completions++;
				failed_reads++;
				continue;
			}
			verify(&s, bufs[ev[i].data], ev[i].res);
			if (submit(ev[i].data, len))
				return 1;
		}
		/*
		 * A recovery need not fail any read (all held ones may come
		 * back with data): the resets counter is the sign.
		 */
		cmd(VDAQ_IOC_GET_STATS, &stats, "GET_STATS");
		if (stats.resets == resets && nidle && reset_seen &&
		    now_ns() - reset_seen < 2000000000ull) {
			/* -EIO from the window before the reset was seen */
			failed_reads = 0;
			for (i = 0; i < nidle; i++)
				if (submit(idle[i], len))
					return 1;
			nidle = 0;
			continue;
		}
		if (stats.resets == resets) {
			if (nidle)
				usleep(10000);
			continue;
		}
		reset_seen = now_ns();
		/* NEEDS_RESET recovered by the driver: a new stream from 0 */
		printf("vdaqtest: device reset (%llu), %d reads came back with errors\n",
		       (unsigned long long)stats.resets, nidle);
		recoveries += stats.resets - resets;
		resets = stats.resets;
		failed_reads = 0;
		for (i = 0; i < 300 && ioctl(fd, VDAQ_IOC_START) < 0; i++)
			usleep(10000);
		s.have_seq = 0;
		for (i = 0; i < nidle; i++)
			if (submit(idle[i], len))
				return 1;
		nidle = 0;
	}

	/* shutdown: STOP, FLUSH, every read back, device holds none */
	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	cmd(VDAQ_IOC_FLUSH, &fr, "FLUSH");
	inflight -= nidle;
	returned = reap(inflight, 5000, &s, NULL);
	CHECK(returned == inflight, "shutdown: %d of %d reads returned",
	      returned, inflight);
	cmd(VDAQ_IOC_STATUS, &st, "STATUS");
	CHECK(st.buffers_held == 0, "device holds %llu buffers",
	      (unsigned long long)st.buffers_held);
	CHECK(failed_reads == 0 && s.errors == 0 && s.verify_errors == 0,
	      "%llu errors, %llu verify errors",
	      (unsigned long long)(failed_reads + s.errors),
	      (unsigned long long)s.verify_errors);
	CHECK(s.frames > 0, "no frames");
	cmd(VDAQ_IOC_GET_STATS, &stats, "GET_STATS");
	printf("result frames=%llu samples=%llu bytes=%llu completions=%llu empty_completions=%llu dropped_frames=%llu overrun_buffers=%llu verify_errors=%llu rejected=%llu invalid=%llu reads_in_flight=%d buffer_bytes=%zu guest_time_ns=%llu device_produced=%llu device_delivered=%llu device_dropped=%llu device_pending=%llu shutdown_in_flight=%d shutdown_returned=%d device_held_after=%llu reset_recoveries=%llu watchdog_recoveries=%llu\n",
	       (unsigned long long)s.frames, (unsigned long long)s.samples,
	       (unsigned long long)s.bytes, (unsigned long long)s.completions,
	       (unsigned long long)s.empty, (unsigned long long)s.dropped,
	       (unsigned long long)s.overruns,
	       (unsigned long long)(s.verify_errors + failed_reads),
	       (unsigned long long)stats.rejected,
	       (unsigned long long)stats.invalid, reads, len,
	       (unsigned long long)(now_ns() - t0),
	       (unsigned long long)st.frames_produced,
	       (unsigned long long)st.frames_delivered,
	       (unsigned long long)st.frames_dropped,
	       (unsigned long long)st.frames_pending, inflight, returned,
	       (unsigned long long)st.buffers_held,
	       (unsigned long long)recoveries,
	       (unsigned long long)stats.watchdog_recoveries);
	return failures ? 1 : 0;
}

static void on_alarm(int sig)
{
	(void)sig;
}

static int do_cancel(int reads, size_t len)
{
	long results[MAX_READS];
	struct io_event ev;
	struct sigaction sa;
	uint64_t t0;
	int i, got, r, fl, inprogress;

	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	/* O_NONBLOCK with nothing to deliver: EAGAIN, nothing queued */
	fl = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	r = read(fd, bufs[0], len);
	CHECK(r < 0 && errno == EAGAIN, "O_NONBLOCK read gave %d (%s)", r,
	      strerror(errno));
	fcntl(fd, F_SETFL, fl);

	/* a signal takes a blocking read back (FLUSHED, 0 frames: 64 bytes) */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	alarm(1);
	t0 = now_ns();
	r = read(fd, bufs[0], len);
	printf("vdaqtest: blocking read interrupted after %llu ms: %d %s\n",
	       (unsigned long long)((now_ns() - t0) / 1000000), r,
	       r < 0 ? strerror(errno) : "");
	CHECK(r == VDAQ_HEADER_SIZE || (r < 0 && errno == EINTR),
	      "interrupted read gave %d", r);

	for (i = 0; i < reads; i++)
		if (submit(i, len))
			return 1;
	usleep(100000);
	t0 = now_ns();
	/*
	 * FLUSH is device-wide: the first cancel brings every posted read
	 * back, so later io_cancel calls may find theirs completed (EINVAL).
	 */
	for (i = 0, inprogress = 0; i < reads; i++) {
		r = io_cancel(ctx, &iocbs[i], &ev);
		CHECK(r < 0 && (errno == EINPROGRESS || errno == EINVAL),
		      "io_cancel %d: %d %s (want EINPROGRESS)", i, r,
		      strerror(errno));
		inprogress += r < 0 && errno == EINPROGRESS;
	}
	CHECK(inprogress >= 1, "no io_cancel in progress");
	printf("vdaqtest: io_cancel: %d of %d in progress (the rest done already)\n",
	       inprogress, reads);
	for (i = 0; i < reads; i++)
		results[i] = -9999;
	got = reap(reads, 5000, NULL, results);
	printf("vdaqtest: io_cancel: %d of %d reads completed in %llu ms\n",
	       got, reads, (unsigned long long)((now_ns() - t0) / 1000000));
	CHECK(got == reads, "cancelled reads not all completed");
	for (i = 0; i < reads; i++)
		CHECK(results[i] == VDAQ_HEADER_SIZE,
		      "cancelled read %d: %ld (want 64, empty FLUSHED)", i,
		      results[i]);
	printf("result completions=%d empty_completions=%d shutdown_in_flight=%d shutdown_returned=%d\n",
	       got + 1, got + 1, reads, got);
	return failures ? 1 : 0;
}

static int do_close_pending(int reads, size_t len)
{
	uint64_t t0;
	int i, got;

	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	for (i = 0; i < reads; i++)
		if (submit(i, len))
			return 1;
	usleep(100000);
	t0 = now_ns();
	close(fd);
	got = reap(reads, 5000, NULL, NULL);
	printf("vdaqtest: close with %d reads pending: %d completed in %llu ms\n",
	       reads, got, (unsigned long long)((now_ns() - t0) / 1000000));
	CHECK(got == reads, "reads pending at close did not all complete");
	printf("result completions=%d shutdown_in_flight=%d shutdown_returned=%d\n",
	       got, reads, got);
	return failures ? 1 : 0;
}

static int write_file(const char *path, const char *text)
{
	int f = open(path, O_WRONLY), r;

	if (f < 0)
		return -errno;
	r = write(f, text, strlen(text));
	r = r < 0 ? -errno : 0;
	close(f);
	return r;
}

/*
 * After a removal: waits up to @tries * 100 ms for /dev/vdaq0 to come back,
 * opens it and reads one buffer from the new device.
 */
static void read_again(size_t len, int tries, const char *what)
{
	int i, r;

	for (i = 0; i < tries && access("/dev/vdaq0", F_OK); i++)
		usleep(100000);
	fd = open("/dev/vdaq0", O_RDWR);
	CHECK(fd >= 0, "open when %s: %s", what, strerror(errno));
	if (fd < 0)
		return;
	cmd(VDAQ_IOC_START, NULL, "START");
	r = read(fd, bufs[0], len);
	CHECK(r > VDAQ_HEADER_SIZE, "read when %s: %d", what, r);
	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	printf("vdaqtest: %s, read %d bytes\n", what, r);
}

/*
 * Device removal with reads in flight (sysfs unbind = what module unload
 * and hot-unplug run): every read must come back, the open file must get
 * ENODEV/POLLHUP; then bind again and read once more.
 */
static int do_unbind(int reads, size_t len)
{
	long results[MAX_READS];
	struct vdaq_status st;
	struct pollfd pfd;
	char link[256], *name;
	ssize_t n;
	uint64_t t0;
	int i, got, r, data = 0, cancelled = 0;

	n = readlink("/sys/class/misc/vdaq0/device", link, sizeof(link) - 1);
	if (n < 0) {
		perror("vdaqtest: readlink /sys/class/misc/vdaq0/device");
		return 1;
	}
	link[n] = 0;
	name = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
	/* stopped: the reads stay posted until the removal takes them back */
	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	for (i = 0; i < reads; i++) {
		results[i] = -9999;
		if (submit(i, len))
			return 1;
	}
	usleep(200000);
	t0 = now_ns();
	r = write_file("/sys/bus/virtio/drivers/vdaq/unbind", name);
	printf("vdaqtest: unbind %s with %d reads in flight: %d, %llu ms\n", name,
	       reads, r, (unsigned long long)((now_ns() - t0) / 1000000));
	got = reap(reads, 5000, NULL, results);
	for (i = 0; i < reads; i++) {
		if (results[i] >= VDAQ_HEADER_SIZE)
			data++;
		else if (results[i] == -ECANCELED)
			cancelled++;
		else
			CHECK(0, "read %d after unbind: %ld", i, results[i]);
	}
	printf("vdaqtest: %d of %d reads back: %d with data/header, %d ECANCELED\n",
	       got, reads, data, cancelled);
	CHECK(got == reads, "reads lost at removal");
	r = read(fd, bufs[0], len);
	CHECK(r < 0 && errno == ENODEV, "read after removal: %d %s", r,
	      strerror(errno));
	r = ioctl(fd, VDAQ_IOC_STATUS, &st);
	CHECK(r < 0 && errno == ENODEV, "ioctl after removal: %d %s", r,
	      strerror(errno));
	pfd.fd = fd;
	pfd.events = POLLIN | POLLPRI;
	r = poll(&pfd, 1, 0);
	CHECK(r == 1 && (pfd.revents & POLLHUP), "poll after removal: %d %#x",
	      r, pfd.revents);
	close(fd);

	r = write_file("/sys/bus/virtio/drivers/vdaq/bind", name);
	CHECK(!r, "bind %s: %d", name, r);
	read_again(len, 50, "re-bound");
	printf("result completions=%d shutdown_in_flight=%d shutdown_returned=%d\n",
	       got, reads, got);
	return failures ? 1 : 0;
}

/* Hot-unplug (QMP device_del from the host) with reads in flight. */
static int do_unplug(int reads, size_t len)
{
	long results[MAX_READS];
	struct pollfd pfd;
	int i, got, r, data = 0, cancelled = 0;

	/* stopped: the reads stay posted until removal takes them back */
	cmd(VDAQ_IOC_STOP, NULL, "STOP");
	for (i = 0; i < reads; i++) {
		results[i] = -9999;
		if (submit(i, len))
			return 1;
	}
	printf("vdaqtest: waiting for unplug with %d reads in flight\n", reads);
	fflush(stdout);
	pfd.fd = fd;
	pfd.events = POLLPRI;
	for (i = 0; i < 600; i++) {
		pfd.revents = 0;
		if (poll(&pfd, 1, 100) == 1 && (pfd.revents & POLLHUP))
			break;
		/* keep the reads coming back and going again meanwhile */
		got = reap(reads, 1, NULL, results);
		(void)got;
	}
	CHECK(pfd.revents & POLLHUP, "no POLLHUP within 60 s");
	got = reap(reads, 5000, NULL, results);
	for (i = 0; i < reads; i++) {
		if (results[i] >= VDAQ_HEADER_SIZE)
			data++;
		else if (results[i] == -ECANCELED)
			cancelled++;
	}
	printf("vdaqtest: unplugged: reads back: %d with data/header, %d ECANCELED, of %d\n",
	       data, cancelled, reads);
	CHECK(data + cancelled == reads, "reads lost at unplug");
	r = read(fd, bufs[0], len);
	CHECK(r < 0 && errno == ENODEV, "read after unplug: %d %s", r,
	      strerror(errno));
	close(fd);

	/* the host plugs a card in again (a restarted backend): it binds and streams */
	printf("vdaqtest: waiting for the card to come back\n");
	fflush(stdout);
	read_again(len, 600, "re-plugged");
	printf("result completions=%d shutdown_in_flight=%d shutdown_returned=%d\n",
	       data + cancelled, reads, data + cancelled);
	return failures ? 1 : 0;
}

/* ---- iio-raw: the IIO device, without libiio ---- */

static char iio_dir[300];
static int iio_index = -1;

static int read_text(const char *path, char *buf, size_t n)
{
	int f = open(path, O_RDONLY);
	ssize_t r;

	if (f < 0)
		return -errno;
	r = read(f, buf, n - 1);
	if (r < 0)
		r = -errno;
	close(f);
	if (r < 0)
		return r;
	buf[r] = 0;
	while (r > 0 && buf[r - 1] == '\n')
		buf[--r] = 0;
	return 0;
}

static int iio_read(const char *rel, char *buf, size_t n)
{
	char path[400];

	snprintf(path, sizeof(path), "%s/%s", iio_dir, rel);
	return read_text(path, buf, n);
}

static long long iio_num(const char *rel)
{
	char buf[64];

	if (iio_read(rel, buf, sizeof(buf)))
		return -1;
	return strtoll(buf, NULL, 0);
}

static int iio_write(const char *rel, const char *text)
{
	char path[400];

	snprintf(path, sizeof(path), "%s/%s", iio_dir, rel);
	return write_file(path, text);
}

static int iio_write_num(const char *rel, long long v)
{
	char text[32];

	snprintf(text, sizeof(text), "%lld", v);
	return iio_write(rel, text);
}

/* The IIO device named "vdaq" labelled "vdaq0" (waits up to 5 s). */
static int find_iio(void)
{
	char path[400], buf[64];
	struct dirent *e;
	DIR *d;
	int tries;

	for (tries = 0; tries < 50; tries++) {
		d = opendir("/sys/bus/iio/devices");
		while (d && (e = readdir(d))) {
			if (strncmp(e->d_name, "iio:device", 10))
				continue;
			snprintf(path, sizeof(path), "/sys/bus/iio/devices/%s/name",
				 e->d_name);
			if (read_text(path, buf, sizeof(buf)) || strcmp(buf, "vdaq"))
				continue;
			snprintf(path, sizeof(path), "/sys/bus/iio/devices/%s/label",
				 e->d_name);
			if (!read_text(path, buf, sizeof(buf)) && strcmp(buf, "vdaq0"))
				continue;
			snprintf(iio_dir, sizeof(iio_dir), "/sys/bus/iio/devices/%s",
				 e->d_name);
			iio_index = atoi(e->d_name + 10);
			closedir(d);
			return 0;
		}
		if (d)
			closedir(d);
		usleep(100000);
	}
	return -1;
}

struct iio_cap {
	unsigned int ch, ss, scan_bytes, ts_off;
	double rate;
	int have;
	uint32_t prev_v;
	int64_t prev_ts, first_ts, last_ts;
	uint64_t scans, bytes, gaps, verify_errors, ts_errors;
	uint64_t ns;	/* from enabling the buffer to the last scan read */
};

static uint32_t load_sample(const struct iio_cap *c, const uint8_t *p,
			    unsigned int k)
{
	uint16_t v16;
	uint32_t v32;

	if (c->ss == 2) {
		memcpy(&v16, p + 2 * k, 2);
		return v16;
	}
	memcpy(&v32, p + 4 * k, 4);
	return v32;
}

/*
 * One scan: channel k carries n + k (n = frame * channels, modulo the sample
 * width); the next scan continues at n + channels, or after a gap of g
 * frames. The samples give g modulo the pattern's period (2^16 / channels
 * frames for S16); the timestamps (the card's clock, one sample period a
 * frame) pick the largest such g that fits the time that passed.
 */
static void iio_check_scan(struct iio_cap *c, const uint8_t *p)
{
	uint32_t mask = c->ss == 2 ? 0xffff : 0xffffffff, v0, v;
	unsigned int k;
	int64_t ts, dt, g;

	memcpy(&ts, p + c->ts_off, 8);
	v0 = load_sample(c, p, 0);
	for (k = 1; k < c->ch; k++) {
		v = load_sample(c, p, k);
		if (v != ((v0 + k) & mask)) {
			if (c->verify_errors++ < 5)
				fprintf(stderr, "vdaqtest: scan %llu channel %u: %u, want %u\n",
					(unsigned long long)c->scans, k, v,
					(v0 + k) & mask);
		}
	}
	if (c->have) {
		dt = ts - c->prev_ts;
		if (dt <= 0 && c->ts_errors++ < 5)
			fprintf(stderr, "vdaqtest: scan %llu: timestamp %lld after %lld\n",
				(unsigned long long)c->scans, (long long)ts,
				(long long)c->prev_ts);
		/* rounded (no libm: the tool links without -lm) */
		int64_t g_ts = dt > 0 ? (int64_t)((double)dt * c->rate / 1e9 + 0.5) - 1 : 0;
		uint64_t step = (v0 - c->prev_v) & mask;
		uint64_t period = ((uint64_t)mask + 1) / c->ch;

		g = step / c->ch ? (int64_t)(step / c->ch) - 1 : (int64_t)period - 1;
		if (step % c->ch || g > g_ts + 1) {
			if (c->verify_errors++ < 5)
				fprintf(stderr, "vdaqtest: scan %llu: sample %u after %u, %lld ns later\n",
					(unsigned long long)c->scans, v0,
					c->prev_v, (long long)dt);
		} else {
			while (g + (int64_t)period <= g_ts + 1)
				g += period;
			c->gaps += g;
		}
	} else {
		c->first_ts = ts;
	}
	c->have = 1;
	c->prev_v = v0;
	c->prev_ts = ts;
	c->last_ts = ts;
	c->scans++;
}

static void iio_parse(struct iio_cap *c, const uint8_t *buf, ssize_t n)
{
	ssize_t off;

	if (n % c->scan_bytes) {
		fprintf(stderr, "vdaqtest: read %zd bytes, not whole scans of %u\n",
			n, c->scan_bytes);
		c->verify_errors++;
	}
	for (off = 0; off + c->scan_bytes <= n; off += c->scan_bytes)
		iio_check_scan(c, buf + off);
	c->bytes += n;
}

/*
 * One capture: enable, read MS ms, disable, read what is left; every
 * scan checked, all pushed scans read, gaps accounted by dropped_frames.
 */
static int iio_capture(struct iio_cap *c, int ms, const char *what,
		       uint64_t *dropped)
{
	static uint8_t buf[1 << 16];
	char dev[64];
	struct vdaq_configure cfg;
	struct pollfd pfd;
	long long scans0, drop0, scans1, drop1;
	uint64_t end;
	ssize_t n;
	int iiofd, r;

	scans0 = iio_num("scans");
	drop0 = iio_num("dropped_frames");
	snprintf(dev, sizeof(dev), "/dev/iio:device%d", iio_index);
	iiofd = open(dev, O_RDONLY | O_NONBLOCK);
	if (iiofd < 0) {
		fprintf(stderr, "vdaqtest: open %s: %s\n", dev, strerror(errno));
		return -1;
	}
	r = iio_write("buffer/enable", "1");
	CHECK(!r, "%s: enable the buffer: %s", what, strerror(-r));
	if (r) {
		close(iiofd);
		return -1;
	}
	/* one card, two interfaces, one user of the stream at a time */
	r = read(fd, bufs[0], 4096);
	CHECK(r < 0 && errno == EBUSY, "%s: /dev/vdaq0 read with the IIO buffer on: %d %s",
	      what, r, strerror(errno));
	r = ioctl(fd, VDAQ_IOC_START);
	CHECK(r < 0 && errno == EBUSY, "%s: START with the IIO buffer on: %d %s",
	      what, r, strerror(errno));
	memset(&cfg, 0, sizeof(cfg));
	r = ioctl(fd, VDAQ_IOC_CONFIGURE, &cfg);
	CHECK(r < 0 && errno == EBUSY, "%s: CONFIGURE with the IIO buffer on: %d %s",
	      what, r, strerror(errno));
	r = iio_write_num("sampling_frequency", (long long)c->rate);
	CHECK(r == -EBUSY, "%s: sampling_frequency with the buffer on: %d", what, r);

	c->ns = now_ns();
	end = c->ns + (uint64_t)ms * 1000000;
	while (now_ns() < end) {
		pfd.fd = iiofd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, 100) <= 0)
			continue;
		n = read(iiofd, buf, sizeof(buf) - sizeof(buf) % c->scan_bytes);
		if (n > 0)
			iio_parse(c, buf, n);
		else if (n < 0 && errno != EAGAIN)
			CHECK(0, "%s: read %s: %s", what, dev, strerror(errno));
	}
	r = iio_write("buffer/enable", "0");
	CHECK(!r, "%s: disable the buffer: %s", what, strerror(-r));
	/* a disabled buffer still hands out what it holds */
	while ((n = read(iiofd, buf, sizeof(buf) - sizeof(buf) % c->scan_bytes)) > 0)
		iio_parse(c, buf, n);
	c->ns = now_ns() - c->ns;
	close(iiofd);
	scans1 = iio_num("scans");
	drop1 = iio_num("dropped_frames");
	*dropped = drop1 - drop0;
	printf("vdaqtest: iio %s: %llu scans (%llu pushed), %llu frames in gaps, dropped_frames +%llu, %.1f Hz\n",
	       what, (unsigned long long)c->scans, scans1 - scans0,
	       (unsigned long long)c->gaps, drop1 - drop0, c->rate);
	CHECK(c->scans > 0, "%s: no scans", what);
	CHECK((long long)c->scans == scans1 - scans0,
	      "%s: %llu scans read, %lld pushed", what,
	      (unsigned long long)c->scans, scans1 - scans0);
	CHECK(c->gaps <= (uint64_t)(drop1 - drop0),
	      "%s: %llu frames missing, dropped_frames says %lld", what,
	      (unsigned long long)c->gaps, drop1 - drop0);
	CHECK(c->verify_errors == 0 && c->ts_errors == 0,
	      "%s: %llu sample errors, %llu timestamp errors", what,
	      (unsigned long long)c->verify_errors,
	      (unsigned long long)c->ts_errors);
	if (c->scans > 1) {
		double period = (double)(c->last_ts - c->first_ts) /
				(double)(c->scans - 1 + c->gaps);
		double want = 1e9 / c->rate;

		printf("vdaqtest: iio %s: timestamps %.1f ns apart, %.1f ns at %.0f Hz\n",
		       what, period, want, c->rate);
		CHECK(period - want <= want / 10 && want - period <= want / 10,
		      "%s: timestamps %.1f ns apart, want %.1f", what, period, want);
	}
	return 0;
}

/*
 * The card's trigger as an IIO threshold event: in_voltage0 rising through
 * 1000 counts (the S16 counter pattern crosses it once a period); while armed,
 * /dev/vdaq0's SET_TRIGGER gets EBUSY.
 */
static void iio_events_check(int ms)
{
	char path[400], dev[64];
	struct iio_event_data ev;
	struct vdaq_trigger trig;
	struct pollfd pfd;
	int iiofd, evfd = -1, r, got = 0, good = 0;
	uint64_t end;

	snprintf(path, sizeof(path), "%s/events/in_voltage0_thresh_rising_en",
		 iio_dir);
	if (access(path, F_OK)) {
		printf("vdaqtest: iio events: none (trigger feature not negotiated)\n");
		return;
	}
	CHECK(!iio_write("events/in_voltage0_thresh_rising_value", "1000"),
	      "set the rising threshold");
	CHECK(iio_num("events/in_voltage0_thresh_rising_value") == 1000,
	      "rising threshold reads %lld",
	      iio_num("events/in_voltage0_thresh_rising_value"));
	CHECK(!iio_write("events/in_voltage0_thresh_rising_en", "1"),
	      "enable the rising threshold event");
	memset(&trig, 0, sizeof(trig));
	trig.post_frames = 1;
	r = ioctl(fd, VDAQ_IOC_SET_TRIGGER, &trig);
	CHECK(r < 0 && errno == EBUSY, "SET_TRIGGER with an IIO event armed: %d %s",
	      r, strerror(errno));
	snprintf(dev, sizeof(dev), "/dev/iio:device%d", iio_index);
	iiofd = open(dev, O_RDONLY | O_NONBLOCK);
	r = iiofd < 0 ? -1 : ioctl(iiofd, IIO_GET_EVENT_FD_IOCTL, &evfd);
	CHECK(r == 0 && evfd >= 0, "IIO_GET_EVENT_FD_IOCTL: %s", strerror(errno));
	/* the event fd is blocking: drain it without waiting */
	if (evfd >= 0)
		fcntl(evfd, F_SETFL, fcntl(evfd, F_GETFL) | O_NONBLOCK);
	CHECK(!iio_write("buffer/enable", "1"), "enable the buffer for events");
	end = now_ns() + (uint64_t)ms * 1000000;
	while (evfd >= 0 && now_ns() < end) {
		pfd.fd = evfd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, 50) <= 0)
			continue;
		while (read(evfd, &ev, sizeof(ev)) == sizeof(ev)) {
			got++;
			good += IIO_EVENT_CODE_EXTRACT_TYPE(ev.id) == IIO_EV_TYPE_THRESH &&
				IIO_EVENT_CODE_EXTRACT_DIR(ev.id) == IIO_EV_DIR_RISING &&
				IIO_EVENT_CODE_EXTRACT_CHAN(ev.id) == 0;
		}
	}
	iio_write("buffer/enable", "0");
	CHECK(!iio_write("events/in_voltage0_thresh_rising_en", "0"),
	      "disable the rising threshold event");
	r = ioctl(fd, VDAQ_IOC_SET_TRIGGER, &trig);
	CHECK(r == 0, "SET_TRIGGER OFF after the IIO event: %d %s", r,
	      strerror(errno));
	printf("vdaqtest: iio events: %d in %d ms, %d rising on in_voltage0\n",
	       got, ms, good);
	CHECK(good > 0 && good == got, "%d events, %d as expected", got, good);
	if (evfd >= 0)
		close(evfd);
	if (iiofd >= 0)
		close(iiofd);
}

static int iio_setup_scan(struct iio_cap *c, unsigned int ch, unsigned int format)
{
	char rel[64], buf[64], want[32];
	unsigned int k;

	memset(c, 0, sizeof(*c));
	c->ch = ch;
	c->ss = format == VDAQ_FORMAT_S16 ? 2 : 4;
	snprintf(want, sizeof(want), "le:s%u/%u>>0", c->ss * 8, c->ss * 8);
	for (k = 0; k < ch; k++) {
		snprintf(rel, sizeof(rel), "scan_elements/in_voltage%u_en", k);
		CHECK(!iio_write(rel, "1"), "enable %s", rel);
		snprintf(rel, sizeof(rel), "scan_elements/in_voltage%u_type", k);
		CHECK(!iio_read(rel, buf, sizeof(buf)) && !strcmp(buf, want),
		      "%s: %s, want %s", rel, buf, want);
		snprintf(rel, sizeof(rel), "scan_elements/in_voltage%u_index", k);
		CHECK(iio_num(rel) == k, "%s: %lld", rel, iio_num(rel));
	}
	CHECK(!iio_write("scan_elements/in_timestamp_en", "1"), "enable the timestamp");
	c->ts_off = (ch * c->ss + 7) / 8 * 8;
	c->scan_bytes = c->ts_off + 8;
	return failures;
}

static int do_iio_raw(int ms, int reads, size_t len)
{
	struct vdaq_info info;
	struct vdaq_config *cf = &info.config;
	struct iio_cap c1, c2, c3;
	char buf[128], want[64], link[256], *name;
	uint64_t drop1 = 0, drop2 = 0, drop3 = 0;
	long long rate, rate2, length;
	double scale, want_scale;
	ssize_t n;
	int r;

	if (cmd(VDAQ_IOC_GET_CONFIG, &info, "GET_CONFIG"))
		return 1;
	print_info(&info);
	if (find_iio()) {
		fprintf(stderr, "vdaqtest: no IIO device named vdaq\n");
		return 1;
	}
	printf("vdaqtest: %s: %u channels, format %u, full scale %u uV\n",
	       iio_dir, cf->channels, cf->format, cf->full_scale_uv);
	if (cf->format == VDAQ_FORMAT_F32) {
		/* IIO has no float scan type: the driver refuses the buffer */
		iio_setup_scan(&c1, cf->channels, VDAQ_FORMAT_S32);
		failures = 0;
		r = iio_write("buffer/enable", "1");
		CHECK(r == -EINVAL, "F32: buffer enable gave %d, want EINVAL", r);
		printf("result frames=0 samples=0 bytes=0 verify_errors=%d dropped_frames=0\n",
		       failures);
		return failures ? 1 : 0;
	}

	/* attributes: scale (mV per count), offset, sampling_frequency */
	CHECK(!iio_read("in_voltage_scale", buf, sizeof(buf)), "no in_voltage_scale");
	scale = atof(buf);
	want_scale = cf->full_scale_uv && cf->full_scale_uv != 0xffffffff ?
		     cf->full_scale_uv / 1000.0 /
		     (cf->format == VDAQ_FORMAT_S16 ? 32768.0 : 2147483648.0) : 1;
	printf("vdaqtest: in_voltage_scale %s (want %.9f)\n", buf, want_scale);
	CHECK(scale - want_scale <= 1e-9 + want_scale * 1e-6 &&
	      want_scale - scale <= 1e-9 + want_scale * 1e-6,
	      "in_voltage_scale %s, want %.9f", buf, want_scale);
	CHECK(iio_num("in_voltage_offset") == 0, "in_voltage_offset not 0");
	rate = iio_num("sampling_frequency");
	CHECK(rate == cf->rate_hz, "sampling_frequency %lld, want %u", rate, cf->rate_hz);
	snprintf(want, sizeof(want), "[%u 1 %u]", cf->min_rate_hz, cf->max_rate_hz);
	CHECK(!iio_read("sampling_frequency_available", buf, sizeof(buf)) &&
	      !strcmp(buf, want), "sampling_frequency_available %s, want %s",
	      buf, want);
	CHECK(iio_write_num("sampling_frequency", (long long)cf->max_rate_hz + 1) == -EINVAL,
	      "sampling_frequency above the maximum accepted");
	CHECK(iio_write_num("sampling_frequency", 0) == -EINVAL,
	      "sampling_frequency 0 accepted");

	iio_write("buffer/enable", "0");
	if (iio_setup_scan(&c1, cf->channels, cf->format))
		return 1;
	/* room for a quarter second of scans: the reader polls every 100 ms */
	length = (long long)rate / 4;
	if (length < 4096)
		length = 4096;
	if (length * c1.scan_bytes > (long long)(reads * len))
		length = (long long)(reads * len / c1.scan_bytes);
	/*
	 * The kfifo rounds its length up to a power of two and is one
	 * kmalloc: at most 2 MiB.
	 */
	while (length * c1.scan_bytes > 2 << 20)
		length /= 2;
	CHECK(!iio_write_num("buffer/length", length), "buffer/length %lld", length);

	c1.rate = rate;
	iio_capture(&c1, ms, "capture 1", &drop1);

	/* another rate, through sysfs; the timestamps must follow it */
	rate2 = rate / 2 >= cf->min_rate_hz ? rate / 2 : rate * 2;
	r = iio_write_num("sampling_frequency", rate2);
	CHECK(!r, "sampling_frequency %lld: %d", rate2, r);
	CHECK(iio_num("sampling_frequency") == rate2, "sampling_frequency reads %lld, want %lld",
	      iio_num("sampling_frequency"), rate2);
	iio_setup_scan(&c2, cf->channels, cf->format);
	c2.rate = rate2;
	iio_capture(&c2, ms / 2 > 0 ? ms / 2 : 1, "capture 2", &drop2);
	CHECK(!iio_write_num("sampling_frequency", rate), "sampling_frequency back to %lld", rate);
	/* S16's counter crosses 1000 every 2^16 samples; S32's hardly ever */
	if (cf->format == VDAQ_FORMAT_S16)
		iio_events_check(ms / 4 > 0 ? ms / 4 : 1);

	/*
	 * The reverse: /dev/vdaq0 has the stream, the IIO buffer is refused.
	 * Last before the unbind, whose reset empties the FIFO: the frames
	 * this START samples would begin the next capture, a pause before them.
	 */
	if (!cmd(VDAQ_IOC_START, NULL, "START")) {
		r = iio_write("buffer/enable", "1");
		CHECK(r == -EBUSY, "IIO buffer enable with /dev/vdaq0 started: %d", r);
		if (!r)
			iio_write("buffer/enable", "0");
		cmd(VDAQ_IOC_STOP, NULL, "STOP");
	}

	/* teardown with the buffer on: unbind, then bind again */
	n = readlink("/sys/class/misc/vdaq0/device", link, sizeof(link) - 1);
	if (n > 0) {
		char dev[64];
		int iiofd;

		link[n] = 0;
		name = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
		snprintf(dev, sizeof(dev), "/dev/iio:device%d", iio_index);
		iiofd = open(dev, O_RDONLY | O_NONBLOCK);
		CHECK(!iio_write("buffer/enable", "1"), "enable before unbind");
		usleep(200000);
		r = write_file("/sys/bus/virtio/drivers/vdaq/unbind", name);
		CHECK(!r, "unbind %s with the IIO buffer on: %d", name, r);
		r = read(iiofd, bufs[0], 4096);
		printf("vdaqtest: unbound with the IIO buffer on; read of the open %s: %d %s\n",
		       dev, r, r < 0 ? strerror(errno) : "");
		CHECK(r >= 0 || errno == ENODEV, "read after unbind: %s", strerror(errno));
		close(iiofd);
		close(fd);
		r = write_file("/sys/bus/virtio/drivers/vdaq/bind", name);
		CHECK(!r, "bind %s: %d", name, r);
		CHECK(!find_iio(), "no IIO device after bind");
		for (r = 0; r < 50 && access("/dev/vdaq0", F_OK); r++)
			usleep(100000);
		fd = open("/dev/vdaq0", O_RDWR);
		CHECK(fd >= 0, "open /dev/vdaq0 after bind: %s", strerror(errno));
		/* and it captures again */
		iio_setup_scan(&c3, cf->channels, cf->format);
		c3.rate = iio_num("sampling_frequency");
		iio_write_num("buffer/length", length);
		iio_capture(&c3, ms / 4 > 0 ? ms / 4 : 1, "after bind", &drop3);
	}

	printf("result frames=%llu samples=%llu bytes=%llu verify_errors=%llu dropped_frames=%llu guest_time_ns=%llu\n",
	       (unsigned long long)(c1.scans + c2.scans),
	       (unsigned long long)(c1.scans + c2.scans) * cf->channels,
	       /* sample bytes, as the other modes count (scans also hold the timestamp) */
	       (unsigned long long)(c1.scans + c2.scans) * cf->channels * c1.ss,
	       (unsigned long long)(c1.verify_errors + c2.verify_errors +
				    c1.ts_errors + c2.ts_errors + failures),
	       (unsigned long long)(drop1 + drop2),
	       (unsigned long long)(c1.ns + c2.ns));
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int ms = argc > 2 ? atoi(argv[2]) : 2000;
	int reads = argc > 3 ? atoi(argv[3]) : 16;
	size_t len = argc > 4 ? strtoul(argv[4], NULL, 0) : 65536;

	if (argc < 2) {
		fprintf(stderr, "usage: vdaqtest stream|cancel|close-pending|unbind|unplug|iio-raw [ms reads bytes]\n");
		return 2;
	}
	if (reads < 1 || reads > MAX_READS)
		reads = 16;
	if (setup(reads, len))
		return 1;
	if (!strcmp(argv[1], "stream"))
		return do_stream(ms, reads, len);
	if (!strcmp(argv[1], "cancel"))
		return do_cancel(reads, len);
	if (!strcmp(argv[1], "unplug"))
		return do_unplug(reads, len);
	if (!strcmp(argv[1], "unbind"))
		return do_unbind(reads, len);
	if (!strcmp(argv[1], "close-pending"))
		return do_close_pending(reads, len);
	if (!strcmp(argv[1], "iio-raw"))
		return do_iio_raw(ms, reads, len);
	fprintf(stderr, "vdaqtest: unknown mode %s\n", argv[1]);
	return 2;
}
