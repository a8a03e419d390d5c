/* A shared library that the unwind workload (workload.c, step plugin:PATH)
 * dlopens after the recording has started, so that its unwind tables are
 * loaded while the process runs. Built with
 *   gcc -shared -fPIC -O2 -fomit-frame-pointer -fno-optimize-sibling-calls -g
 *       -o plugin.so plugin.c */
#include <time.h>

static volatile unsigned long sink;

static unsigned long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long)ts.tv_sec * 1000000000UL + (unsigned long)ts.tv_nsec;
}

/* Burns `ms` ms of CPU, looking at the clock only every few microseconds. */
__attribute__((noinline)) unsigned long plugin_work(unsigned long ms)
{
	unsigned long deadline = now_ns() + ms * 1000000UL;
	unsigned long x = sink;
	do {
		for (int i = 0; i < 20000; i++)
			x = x * 6364136223846793005UL + 1;
		sink = x;
	} while (now_ns() < deadline);
	return x;
}

/* `n` sleeps of `ms` ms. */
__attribute__((noinline)) int plugin_sleep(unsigned n, unsigned long ms)
{
	int r = 0;
	for (unsigned i = 0; i < n; i++) {
		struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
		r += nanosleep(&ts, 0);
		sink += (unsigned long)r;
	}
	return r;
}
