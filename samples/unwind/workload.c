/* A workload with known stacks for the in-kernel unwinder's tests
 * (profiler/tests/unwind.rs). It runs a plan of steps, e.g.
 *   workload settle:200,sleeps:200
 *
 *   settle:MS    block MS ms in poll() in settle(). hvprof learns of the
 *                libraries mapped after the exec (libc) when a stack first
 *                goes through them, and loads their tables then: the tests
 *                start with this step so that their stacks are walked with
 *                the tables. Its stacks have no nanosleep in them;
 *   sleeps:N     N sleeps of 2 ms in sleeper(), alternately called from
 *                sleep_caller_a() and sleep_caller_b();
 *   split:MS     busy_leaf() burns MS ms of CPU, a quarter of it called from
 *                caller_a() and three quarters from caller_b(), in rounds of
 *                10 + 30 ms;
 *   thread:MS    a thread whose thread_fn() sleeps MS ms (10 ms at a time)
 *                and burns MS ms in thread_burn(), while the main thread
 *                burns 2·MS ms in main_burn() and then joins it;
 *   signals:N    a SIGALRM handler (SA_RESTART) burns 5 ms in handler_work()
 *                on each of N signals of a 10 ms interval timer, which
 *                interrupt interrupted(), a busy loop that makes no calls;
 *   lazy:MS      the program's first call of nanosleep, through its lazily
 *                bound PLT (link with -Wl,-z,lazy), is one MS ms sleep in
 *                first_sleep(): run it before any step that sleeps;
 *   vm:N         create N VMs (KVM_CREATE_VM on /dev/kvm, then closed):
 *                each moves hvprof's window on;
 *   plugin:PATH  dlopen PATH (samples/unwind/plugin.c), sleep 200 ms, and,
 *                from call_plugin(), call plugin_work() (burns 500 ms)
 *                and plugin_sleep() (20 sleeps of 10 ms) through dlsym'd
 *                pointers.
 *
 * Built with
 *   gcc -O2 -fomit-frame-pointer -fno-optimize-sibling-calls -g -Wl,-z,lazy
 *       -o workload workload.c -ldl -lpthread
 * so that no function of it keeps a frame pointer. Every named function is
 * noinline and uses what it calls, so that each has its own frame. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static unsigned long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long)ts.tv_sec * 1000000000UL + (unsigned long)ts.tv_nsec;
}

/* Arithmetic until `deadline`, looking at the clock (the vDSO) only every few
 * microseconds so that the burning function itself is the leaf of nearly
 * every sample. A macro, not a function, for the same reason. */
#define BURN_UNTIL(deadline)                                        \
	do {                                                        \
		unsigned long x_ = sink;                            \
		do {                                                \
			for (int i_ = 0; i_ < 20000; i_++)          \
				x_ = x_ * 6364136223846793005UL + 1; \
			sink = x_;                                  \
		} while (now_ns() < (deadline));                    \
	} while (0)

/* settle:MS */

__attribute__((noinline)) int settle(unsigned long ms)
{
	int r = poll(NULL, 0, (int)ms);
	sink += (unsigned long)r;
	return r;
}

/* sleeps:N */

__attribute__((noinline)) int sleeper(void)
{
	struct timespec ts = { 0, 2000000L };
	int r = nanosleep(&ts, NULL);
	sink += (unsigned long)r;
	return r;
}

__attribute__((noinline)) int sleep_caller_a(void)
{
	int r = sleeper();
	sink += 1;
	return r + 1;
}

__attribute__((noinline)) int sleep_caller_b(void)
{
	int r = sleeper();
	sink += 2;
	return r + 2;
}

__attribute__((noinline)) void sleeps(unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		sink += (unsigned long)(i % 2 ? sleep_caller_b() : sleep_caller_a());
}

/* split:MS */

__attribute__((noinline)) unsigned long busy_leaf(unsigned long ms)
{
	unsigned long deadline = now_ns() + ms * 1000000UL;
	BURN_UNTIL(deadline);
	return sink;
}

__attribute__((noinline)) unsigned long caller_a(unsigned long ms)
{
	unsigned long r = busy_leaf(ms);
	sink += 1;
	return r + 1;
}

__attribute__((noinline)) unsigned long caller_b(unsigned long ms)
{
	unsigned long r = busy_leaf(ms);
	sink += 2;
	return r + 2;
}

__attribute__((noinline)) void split(unsigned long ms)
{
	for (unsigned long done = 0; done < ms; done += 40) {
		sink += caller_a(10);
		sink += caller_b(30);
	}
}

/* thread:MS */

__attribute__((noinline)) unsigned long thread_burn(unsigned long ms)
{
	unsigned long deadline = now_ns() + ms * 1000000UL;
	BURN_UNTIL(deadline);
	return sink;
}

__attribute__((noinline)) void *thread_fn(void *arg)
{
	unsigned long ms = (unsigned long)arg;
	for (unsigned long done = 0; done < ms; done += 10) {
		struct timespec ts = { 0, 10000000L };
		sink += (unsigned long)nanosleep(&ts, NULL);
		sink += thread_burn(10);
	}
	return (void *)sink;
}

__attribute__((noinline)) unsigned long main_burn(unsigned long ms)
{
	unsigned long deadline = now_ns() + ms * 1000000UL;
	BURN_UNTIL(deadline);
	return sink;
}

__attribute__((noinline)) void thread_step(unsigned long ms)
{
	pthread_t t;
	void *ret;
	if (pthread_create(&t, NULL, thread_fn, (void *)ms) != 0) {
		fprintf(stderr, "workload: pthread_create failed\n");
		exit(1);
	}
	sink += main_burn(2 * ms);
	pthread_join(t, &ret);
	sink += (unsigned long)ret;
}

/* signals:N */

static volatile sig_atomic_t signals_seen;

__attribute__((noinline)) unsigned long handler_work(unsigned long ms)
{
	unsigned long deadline = now_ns() + ms * 1000000UL;
	BURN_UNTIL(deadline);
	return sink;
}

__attribute__((noinline)) void on_alarm(int sig)
{
	sink += handler_work(5) + (unsigned long)sig;
	signals_seen = signals_seen + 1;
}

/* Busy until `n` signals were handled; no calls, so that a signal lands in
 * this function itself. */
__attribute__((noinline)) unsigned long interrupted(long n)
{
	unsigned long x = sink;
	while (signals_seen < n)
		x = x * 6364136223846793005UL + 1;
	sink = x;
	return x;
}

__attribute__((noinline)) void signals(long n)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { { 0, 10000 }, { 0, 10000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	sink += interrupted(n);
	struct itimerval off = { { 0, 0 }, { 0, 0 } };
	setitimer(ITIMER_REAL, &off, NULL);
}

/* lazy:MS */

__attribute__((noinline)) int first_sleep(unsigned long ms)
{
	struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
	int r = nanosleep(&ts, NULL);
	sink += (unsigned long)r;
	return r;
}

/* plugin:PATH */

__attribute__((noinline)) unsigned long call_plugin(const char *path)
{
	void *h = dlopen(path, RTLD_NOW);
	if (!h) {
		fprintf(stderr, "workload: %s\n", dlerror());
		exit(1);
	}
	unsigned long (*work)(unsigned long) = (unsigned long (*)(unsigned long))dlsym(h, "plugin_work");
	int (*sleep)(unsigned, unsigned long) = (int (*)(unsigned, unsigned long))dlsym(h, "plugin_sleep");
	if (!work || !sleep) {
		fprintf(stderr, "workload: %s: plugin_work or plugin_sleep missing\n", path);
		exit(1);
	}
	/* Long enough for a profiler that learns of the library at its mmap
	 * to have its tables when it runs; one that learns of it at the first
	 * stack in it cuts that stack. */
	struct timespec settle = { 0, 200 * 1000000L };
	nanosleep(&settle, 0);
	unsigned long r = work(500);
	r += (unsigned long)sleep(20, 10);
	sink += r;
	return r + 1;
}

/* vm:N */

__attribute__((noinline)) void create_vms(unsigned long n)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("workload: /dev/kvm");
		exit(1);
	}
	for (unsigned long i = 0; i < n; i++) {
		int vm = ioctl(kvm, KVM_CREATE_VM, 0);
		if (vm < 0) {
			perror("workload: KVM_CREATE_VM");
			exit(1);
		}
		close(vm);
	}
	close(kvm);
}

__attribute__((noinline)) void run(char *step)
{
	char *arg = strchr(step, ':');
	if (!arg) {
		fprintf(stderr, "workload: step %s needs an argument\n", step);
		exit(2);
	}
	*arg++ = '\0';
	unsigned long n = strtoul(arg, NULL, 10);
	if (strcmp(step, "settle") == 0)
		sink += (unsigned long)settle(n);
	else if (strcmp(step, "sleeps") == 0)
		sleeps(n);
	else if (strcmp(step, "split") == 0)
		split(n);
	else if (strcmp(step, "thread") == 0)
		thread_step(n);
	else if (strcmp(step, "signals") == 0)
		signals((long)n);
	else if (strcmp(step, "lazy") == 0)
		sink += (unsigned long)first_sleep(n);
	else if (strcmp(step, "vm") == 0)
		create_vms(n);
	else if (strcmp(step, "plugin") == 0)
		sink += call_plugin(arg);
	else {
		fprintf(stderr, "workload: unknown step %s\n", step);
		exit(2);
	}
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: workload STEP[,STEP...]\n");
		return 2;
	}
	char *save = NULL;
	for (char *step = strtok_r(argv[1], ",", &save); step; step = strtok_r(NULL, ",", &save))
		run(step);
	printf("%lu\n", sink & 1);
	return 0;
}
