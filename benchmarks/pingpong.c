/* pingpong: the latency benchmark's TCP request/response client and echo server (Linux).
 *
 * Built by benchmarks/latency.py with gcc at run time (never committed as a binary).
 *
 *   pingpong serve --port P [--size BYTES]
 *
 *     Listens on 0.0.0.0:P (so on every local address: the VIPs on lo, the unicast ones);
 *     one child process per connection reads BYTES-byte requests and writes each back.
 *     Prints "ready" once listening.
 *
 *   pingpong client --host A.B.C.D --port P --count N [--warmup W] [--size BYTES]
 *                   [--timeout-ms T]
 *
 *     One TCP connection (TCP_NODELAY), then W + N requests one after the other, each
 *     BYTES bytes written and the same number read back. Prints the N round trips after the
 *     warm-up (CLOCK_MONOTONIC, ns), one per line, after a line "ok N". Exits 1 on a
 *     connect or I/O error or a reply later than T ms (default 2000).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PKT_PROG "pingpong"
#include "pkt_common.h"

#define MAX_SIZE 65536

/* 0 on success, -1 on error or EOF. */
static int io_all(int fd, char *buf, size_t len, int writing) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = writing ? write(fd, buf + done, len - done) : read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

static void nodelay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        die("TCP_NODELAY");
}

static int cmd_serve(int argc, char **argv) {
    long port = 0, size = 64;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port"))
            port = parse_long(argv[i + 1], 1, 65535);
        else if (!strcmp(argv[i], "--size"))
            size = parse_long(argv[i + 1], 1, MAX_SIZE);
        else
            usage("unknown option");
    }
    if (!port)
        usage("serve needs --port");
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die("bind");
    if (listen(fd, 64) < 0)
        die("listen");
    printf("ready\n");
    fflush(stdout);
    static char buf[MAX_SIZE];
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            nodelay(c);
            while (io_all(c, buf, (size_t)size, 0) == 0 && io_all(c, buf, (size_t)size, 1) == 0)
                ;
            _exit(0);
        }
        close(c);
    }
}

static int cmd_client(int argc, char **argv) {
    const char *host = NULL;
    long port = 0, count = 0, warmup = 50, size = 64, timeout_ms = 2000;
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--host"))
            host = v;
        else if (!strcmp(a, "--port"))
            port = parse_long(v, 1, 65535);
        else if (!strcmp(a, "--count"))
            count = parse_long(v, 1, 10000000);
        else if (!strcmp(a, "--warmup"))
            warmup = parse_long(v, 0, 10000000);
        else if (!strcmp(a, "--size"))
            size = parse_long(v, 1, MAX_SIZE);
        else if (!strcmp(a, "--timeout-ms"))
            timeout_ms = parse_long(v, 1, 600000);
        else
            usage("unknown option");
    }
    if (!host || !port || !count)
        usage("client needs --host --port --count");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        usage("bad IPv4 address");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die("connect");
    nodelay(fd);
    uint64_t *rtt = calloc((size_t)count, sizeof(*rtt));
    static char buf[MAX_SIZE];
    if (rtt == NULL)
        die("calloc");
    memset(buf, 'x', (size_t)size);
    for (long i = 0; i < warmup + count; i++) {
        uint64_t t0 = now_ns();
        if (io_all(fd, buf, (size_t)size, 1) < 0)
            die("write");
        if (io_all(fd, buf, (size_t)size, 0) < 0)
            die("read");
        if (i >= warmup)
            rtt[i - warmup] = now_ns() - t0;
    }
    close(fd);
    printf("ok %ld\n", count);
    for (long i = 0; i < count; i++)
        printf("%llu\n", (unsigned long long)rtt[i]);
    free(rtt);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        usage("command: serve or client");
    if (!strcmp(argv[1], "serve"))
        return cmd_serve(argc, argv);
    if (!strcmp(argv[1], "client"))
        return cmd_client(argc, argv);
    usage("command: serve or client");
    return 2;
}
