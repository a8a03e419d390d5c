/* USDT probes with semaphores, for profiler/tests/usdt.rs: the ground
 * truth of hvprof's USDT argument reader and of its semaphore handling.
 *
 * sys/sdt.h is not needed: HV_PROBE emits what its STAP_PROBEn macros emit
 * (a nop, an NT_STAPSDT note in .note.stapsdt naming the nop, the
 * .stapsdt.base marker and the semaphore, and the arguments as GNU as
 * prints the operands), with each operand's register chosen by its
 * constraint so that the argument string is known exactly.
 *
 * Protocol, one line each way: it prints "PID RX_SEMAPHORE TX_SEMAPHORE"
 * (the semaphores' addresses), then for each line "go" on stdin fires
 * hvprof_test:rx 3 times and hvprof_test:tx 5 times -- each only while its
 * semaphore is non-zero, as libvirt's probes do -- and hvprof_test:nosem
 * (no semaphore; its second argument is at address 8) twice, and prints "done"; "bench N" calls rx N times and
 * prints the nanoseconds a call took on average; "exit" ends it.
 *
 * gcc -O2 -o probes probes.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((section(".probes"), used)) volatile unsigned short hvprof_test_rx_semaphore;
__attribute__((section(".probes"), used)) volatile unsigned short hvprof_test_tx_semaphore;

#define HV_STR(x) #x

/* The note of one probe site; SEM is the semaphore's symbol, or 0. */
#define HV_PROBE(provider, name, sem, args)                                    \
	"990:	nop\n"                                                         \
	".ifndef _.stapsdt.base\n"                                             \
	".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n" \
	".weak _.stapsdt.base\n"                                               \
	".hidden _.stapsdt.base\n"                                             \
	"_.stapsdt.base: .space 1\n"                                           \
	".size _.stapsdt.base, 1\n"                                            \
	".popsection\n"                                                        \
	".endif\n"                                                             \
	".pushsection .note.stapsdt,\"\",\"note\"\n"                           \
	".balign 4\n"                                                          \
	".4byte 992f-991f, 994f-993f, 3\n"                                     \
	"991:	.asciz \"stapsdt\"\n"                                          \
	"992:	.balign 4\n"                                                   \
	"993:	.8byte 990b\n"                                                 \
	".8byte _.stapsdt.base\n"                                              \
	".8byte " HV_STR(sem) "\n"                                             \
	".asciz \"" provider "\"\n"                                            \
	".asciz \"" name "\"\n"                                                \
	".asciz \"" args "\"\n"                                                \
	"994:	.balign 4\n"                                                   \
	".popsection\n"

/* Eleven arguments: registers of each width, memory below and above a
 * register, constants. */
__attribute__((noinline)) static void rx(uint64_t i)
{
	uint64_t words[4] = {0, 0, 0xdeadbeef00ULL + i, 0};
	int32_t ints[4] = {0, -123456 - (int32_t)i, 0, 0};
	int16_t half = -300 - (int16_t)i;
	register uint64_t a asm("rax") = 0x1122334455667788ULL + i;
	register int32_t b asm("rbx") = -1000 - (int32_t)i;
	register int16_t c asm("rcx") = -2 - (int16_t)i;
	register uint8_t d asm("rdx") = 200 + (uint8_t)i;
	register uint64_t *p asm("rsi") = words;
	register int32_t *q asm("rdi") = ints + 3;
	register int64_t r asm("r12") = -5 - (int64_t)i;
	register uint8_t s asm("r13") = 7 + (uint8_t)i;
	register int16_t *m asm("r14") = &half;
	if (hvprof_test_rx_semaphore)
		__asm__ __volatile__(
			HV_PROBE("hvprof_test", "rx", hvprof_test_rx_semaphore,
				 "8@%[a] -4@%k[b] -2@%w[c] 1@%b[d] 8@16(%[p]) -4@-8(%[q]) "
				 "-4@$-7 4@$42 -8@%[r] 1@%b[s] -2@(%[m])")
			:
			: [a] "r"(a), [b] "r"(b), [c] "r"(c), [d] "r"(d), [p] "r"(p), [q] "r"(q),
			  [r] "r"(r), [s] "r"(s), [m] "r"(m)
			: "memory");
}

__attribute__((noinline)) static void tx(int32_t n)
{
	register int32_t v asm("r8") = n;
	if (hvprof_test_tx_semaphore)
		__asm__ __volatile__(HV_PROBE("hvprof_test", "tx", hvprof_test_tx_semaphore, "-4@%k[v]")
				     :
				     : [v] "r"(v));
}

/* No semaphore; its second argument is memory that cannot be read. */
__attribute__((noinline)) static void nosem(void)
{
	register uint64_t *z asm("r9") = NULL;
	__asm__ __volatile__(HV_PROBE("hvprof_test", "nosem", 0, "8@$7 -8@8(%[z])") : : [z] "r"(z));
}

int main(void)
{
	char line[64];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("%d %p %p\n", (int)getpid(), (void *)&hvprof_test_rx_semaphore,
	       (void *)&hvprof_test_tx_semaphore);
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "bench ", 6) == 0) {
			uint64_t n = strtoull(line + 6, NULL, 10);
			struct timespec a, b;
			clock_gettime(CLOCK_MONOTONIC, &a);
			for (uint64_t i = 0; i < n; i++)
				rx(i);
			clock_gettime(CLOCK_MONOTONIC, &b);
			double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
			printf("%.1f\n", n ? ns / n : 0.0);
			continue;
		}
		if (strcmp(line, "go\n") != 0)
			break;
		for (uint64_t i = 0; i < 3; i++)
			rx(i);
		for (int32_t n = 0; n < 5; n++)
			tx(-n - 1);
		nosem();
		nosem();
		printf("done\n");
	}
	return 0;
}
