/* pkt_common.h: the helpers benchmarks/pktgen.c and benchmarks/pingpong.c share (errors,
 * argument parsing, the clock). Define PKT_PROG (the program's name, "pktgen") before including:
 * messages start with it and point at the comment at the top of benchmarks/PKT_PROG.c.
 * Compiled in by benchmarks/pktgen.py's compile_cached, which hashes this file with the source.
 */
#ifndef PKT_COMMON_H
#define PKT_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef PKT_PROG
#error "define PKT_PROG before including pkt_common.h"
#endif

__attribute__((noreturn)) static inline void die(const char *what) {
    fprintf(stderr, PKT_PROG ": %s: %s\n", what, strerror(errno));
    exit(1);
}

__attribute__((noreturn)) static inline void usage(const char *msg) {
    fprintf(stderr, PKT_PROG ": %s (see the comment at the top of benchmarks/" PKT_PROG ".c)\n",
            msg);
    exit(2);
}

/* A decimal in lo..hi, or usage(). */
static inline long parse_long(const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        usage("bad number");
    return v;
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
