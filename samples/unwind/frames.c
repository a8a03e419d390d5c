/* Functions of different frame shapes, for the unwind-table builder's tests
 * (profiler/src/unwind/table.rs). Built with
 *   gcc -O2 -fomit-frame-pointer -Wl,-z,lazy -o frames frames.c
 * so that most frames are rsp-based, the VLA one is rbp-based, the handler
 * is entered through glibc's signal trampoline, and calls to libc go through
 * a lazily bound .plt. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile unsigned long sink;

/* A leaf: no frame at all, CFA = rsp + 8 throughout. */
__attribute__((noinline)) unsigned long leaf(unsigned long x)
{
	return x * 2654435761UL + 1;
}

/* A variable-length array: gcc keeps rbp as the frame's base, CFA = rbp + 16. */
__attribute__((noinline)) unsigned long vla(unsigned n)
{
	volatile unsigned char buf[n];
	unsigned long sum = 0;
	memset((void *)buf, (int)n, n);
	for (unsigned i = 0; i < n; i++)
		sum += buf[i] + leaf(i);
	return sum;
}

/* Recursion that is not a tail call, with callee-saved registers pushed. */
__attribute__((noinline)) unsigned long recurse(unsigned depth, unsigned long acc)
{
	if (depth == 0)
		return vla(16 + (unsigned)(acc & 15));
	unsigned long r = recurse(depth - 1, leaf(acc));
	sink = r;
	return r + depth;
}

static volatile sig_atomic_t handled;

static void handler(int sig)
{
	sink += recurse(3, (unsigned long)sig);
	handled = 1;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sigaction(SIGUSR1, &sa, NULL);
	raise(SIGUSR1);
	unsigned depth = argc > 1 ? (unsigned)atoi(argv[1]) : 5;
	printf("%lu %d\n", recurse(depth, 1) + sink, (int)handled);
	return 0;
}
