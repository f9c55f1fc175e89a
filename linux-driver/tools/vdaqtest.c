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
 *
 * Prints "result key=value ..." (fields of the VDAQ-REPORT) and exits 0 on
 * success. The real application is linux-app/ (Rust, io_uring).
 */
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

int main(int argc, char **argv)
{
	int ms = argc > 2 ? atoi(argv[2]) : 2000;
	int reads = argc > 3 ? atoi(argv[3]) : 16;
	size_t len = argc > 4 ? strtoul(argv[4], NULL, 0) : 65536;

	if (argc < 2) {
		fprintf(stderr, "usage: vdaqtest stream|cancel|close-pending [ms reads bytes]\n");
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
	fprintf(stderr, "vdaqtest: unknown mode %s\n", argv[1]);
	return 2;
}
