/* pktgen: the fastpath benchmark's traffic generator and counting sink (Linux, AF_PACKET).
 *
 * Built by benchmarks/pktgen.py with gcc at run time (never committed as a binary).
 *
 *   pktgen tx --dev IF --src-mac MAC --dst-mac MAC --client-net A.B.C.D --vip A.B.C.D
 *             --port P --flows N --size BYTES --flags syn|ack
 *             [--count N] [--seconds S] [--pps R] [--mode ring|mmsg] [--batch B]
 *
 *     Sends TCP/IPv4 frames of N distinct flows (client address client-net + i, port
 *     10000 + i % 50000) to VIP:P, round robin, each frame a complete Ethernet frame with
 *     valid IPv4 and TCP checksums whose IP packet is BYTES long (>= 40). The frames are built
 *     once; `ring` (default) puts them in a PACKET_TX_RING and only flips slot status words,
 *     `mmsg` sends them with sendmmsg. Both use PACKET_QDISC_BYPASS. Stops after --count
 *     frames, --seconds, or SIGTERM/SIGINT, then prints one JSON line:
 *     {"sent": N, "errors": E, "seconds": T, "pps": R}
 *
 *   pktgen sink --dev IF --match encap|routed --vip A.B.C.D [--size BYTES]
 *               [--source IP6 --backend-prefix IP6] [--ttl T]
 *
 *     Counts, in the kernel, the frames of IF that match: `encap` = IPv6, next header 4, from
 *     SOURCE, to an address in BACKEND-PREFIX/64, carrying an IPv4 TCP packet to VIP whose
 *     length equals the IPv6 payload length (what the forwarder emits); `routed` = IPv4 TCP
 *     to VIP with TTL T (default 63: routed once). A classic BPF filter classifies; matching
 *     frames are "accepted" onto a socket whose receive buffer is the minimum and is never
 *     read, so after the first few they are dropped before any copy and only counted
 *     (PACKET_STATISTICS: queued + dropped). No process wakes per frame. For every line read
 *     on stdin it prints "<matched> <CLOCK_MONOTONIC ns>"; it exits at EOF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PKT_PROG "pktgen"
#include "pkt_common.h"

#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif

#define FRAME_SLOT 2048
#define RING_BLOCK (1 << 16)
#define RING_BLOCKS 128
#define MAX_FLOWS (1 << 20)
#define MAX_BATCH 1024

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void parse_mac(const char *s, uint8_t out[6]) {
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
        usage("bad MAC address");
    for (int i = 0; i < 6; i++)
        out[i] = (uint8_t)v[i];
}

static uint32_t parse_ip4(const char *s) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1)
        usage("bad IPv4 address");
    return ntohl(a.s_addr);
}

static void parse_ip6(const char *s, uint8_t out[16]) {
    if (inet_pton(AF_INET6, s, out) != 1)
        usage("bad IPv6 address");
}

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t sum16(const uint8_t *p, size_t len, uint32_t acc) {
    for (size_t i = 0; i + 1 < len; i += 2)
        acc += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        acc += (uint32_t)(p[len - 1] << 8);
    return acc;
}

static uint16_t fold(uint32_t acc) {
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)~acc;
}

/* ---- tx ---------------------------------------------------------------------------------- */

typedef struct {
    uint8_t src_mac[6], dst_mac[6];
    uint32_t client_net, vip;
    uint16_t port;
    long flows, size, count, pps, batch;
    double seconds;
    int syn, ring;
    const char *dev;
} tx_opts;

/* Ethernet + IPv4 + TCP frame of flow i, `size` bytes from the IP header on. */
static size_t build_frame(const tx_opts *o, long i, uint8_t *f) {
    size_t len = 14 + (size_t)o->size;
    memset(f, 0, len);
    memcpy(f, o->dst_mac, 6);
    memcpy(f + 6, o->src_mac, 6);
    put16(f + 12, ETH_P_IP);
    uint8_t *ip = f + 14, *tcp = ip + 20;
    uint32_t client = o->client_net + 1 + (uint32_t)i;
    uint16_t sport = (uint16_t)(10000 + i % 50000);
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)o->size);
    put16(ip + 4, (uint16_t)i);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    put32(ip + 12, client);
    put32(ip + 16, o->vip);
    put16(ip + 10, fold(sum16(ip, 20, 0)));
    put16(tcp, sport);
    put16(tcp + 2, o->port);
    put32(tcp + 4, (uint32_t)i * 7919u + 1u);
    put32(tcp + 8, o->syn ? 0 : 1);
    tcp[12] = 5 << 4;
    tcp[13] = o->syn ? 0x02 : 0x10;
    put16(tcp + 14, 65535);
    for (long k = 40; k < o->size; k++)
        ip[k] = (uint8_t)(0xA0 + k);
    uint8_t pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = IPPROTO_TCP;
    put16(pseudo + 10, (uint16_t)(o->size - 20));
    put16(tcp + 16, fold(sum16(tcp, (size_t)o->size - 20, sum16(pseudo, 12, 0))));
    return len;
}

static int tx_socket(const tx_opts *o) {
    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: never receives */
    if (fd < 0)
        die("socket(AF_PACKET)");
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
        die("PACKET_QDISC_BYPASS");
    int sndbuf = 64 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    unsigned ifindex = if_nametoindex(o->dev);
    if (ifindex == 0)
        die("if_nametoindex");
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        die("bind");
    return fd;
}

/* Sleep until `sent` frames are due at `pps` (no-op when pps == 0). `*base` is the
 * schedule's start; when the sender fell behind by more than MAX_LAG_NS (it was not
 * scheduled), the schedule slides instead of catching up with a burst at full speed, which
 * would be an overload the paced rate does not ask for. */
#define MAX_LAG_NS 1000000ull
static void pace(const tx_opts *o, uint64_t *base, uint64_t sent) {
    if (o->pps <= 0)
        return;
    uint64_t due = *base + sent * 1000000000ull / (uint64_t)o->pps;
    uint64_t now = now_ns();
    if (now > due + MAX_LAG_NS)
        *base += now - due - MAX_LAG_NS;
    else if (due > now) {
        struct timespec ts = {(time_t)((due - now) / 1000000000ull),
                              (long)((due - now) % 1000000000ull)};
        nanosleep(&ts, NULL);
    }
}

static int done(const tx_opts *o, uint64_t sent, uint64_t t0) {
    if (stop_flag)
        return 1;
    if (o->count > 0 && sent >= (uint64_t)o->count)
        return 1;
    return o->seconds > 0 && (double)(now_ns() - t0) / 1e9 >= o->seconds;
}

static void run_ring(const tx_opts *o, uint64_t *sent_out, uint64_t *errors_out, uint64_t t0) {
    int fd = tx_socket(o);
    int version = TPACKET_V2;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &version, sizeof(version)) < 0)
        die("PACKET_VERSION");
    struct tpacket_req req = {
        .tp_block_size = RING_BLOCK,
        .tp_block_nr = RING_BLOCKS,
        .tp_frame_size = FRAME_SLOT,
        .tp_frame_nr = RING_BLOCK / FRAME_SLOT * RING_BLOCKS,
    };
    if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof(req)) < 0)
        die("PACKET_TX_RING");
    size_t map_len = (size_t)RING_BLOCK * RING_BLOCKS;
    uint8_t *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        die("mmap");
    unsigned nr = req.tp_frame_nr;
    size_t data_off = TPACKET2_HDRLEN - sizeof(struct sockaddr_ll);
    size_t flen = 0;
    for (unsigned s = 0; s < nr; s++) {
        struct tpacket2_hdr *h = (struct tpacket2_hdr *)(map + (size_t)s * FRAME_SLOT);
        flen = build_frame(o, (long)(s % (unsigned)o->flows), (uint8_t *)h + data_off);
        h->tp_len = (uint32_t)flen;
        h->tp_status = TP_STATUS_AVAILABLE;
    }
    uint64_t sent = 0, errors = 0, queued = 0, base = t0;
    unsigned cur = 0;
    while (!done(o, sent, t0)) {
        long want = o->batch;
        if (o->count > 0 && (uint64_t)o->count - sent < (uint64_t)want)
            want = (long)((uint64_t)o->count - sent);
        pace(o, &base, sent + (uint64_t)want);
        long n = 0;
        while (n < want) {
            struct tpacket2_hdr *h = (struct tpacket2_hdr *)(map + (size_t)cur * FRAME_SLOT);
            uint32_t st = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
            if (st & TP_STATUS_WRONG_FORMAT) {
                errors++;
                st = TP_STATUS_AVAILABLE;
            }
            if (st != TP_STATUS_AVAILABLE)
                break;
            h->tp_len = (uint32_t)flen;
            __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
            cur = cur + 1 == nr ? 0 : cur + 1;
            n++;
        }
        queued += (uint64_t)n;
        /* Blocking send: returns once every requested slot has been handed to the device. */
        ssize_t r = send(fd, NULL, 0, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != ENOBUFS && errno != EAGAIN)
                die("send(TX ring)");
            errors++;
            continue;
        }
        sent += (uint64_t)r / flen;
    }
    (void)queued;
    *sent_out = sent;
    *errors_out = errors;
    munmap(map, map_len);
    close(fd);
}

static void run_mmsg(const tx_opts *o, uint64_t *sent_out, uint64_t *errors_out, uint64_t t0) {
    int fd = tx_socket(o);
    long nframes = o->flows;
    uint8_t *frames = malloc((size_t)nframes * FRAME_SLOT);
    struct mmsghdr *msgs = calloc(MAX_BATCH, sizeof(*msgs));
    struct iovec *iovs = calloc(MAX_BATCH, sizeof(*iovs));
    if (frames == NULL || msgs == NULL || iovs == NULL)
        die("malloc");
    size_t flen = 0;
    for (long i = 0; i < nframes; i++)
        flen = build_frame(o, i, frames + (size_t)i * FRAME_SLOT);
    uint64_t sent = 0, errors = 0, base = t0;
    long next = 0;
    while (!done(o, sent, t0)) {
        long want = o->batch;
        if (o->count > 0 && (uint64_t)o->count - sent < (uint64_t)want)
            want = (long)((uint64_t)o->count - sent);
        pace(o, &base, sent + (uint64_t)want);
        for (long k = 0; k < want; k++) {
            iovs[k].iov_base = frames + (size_t)next * FRAME_SLOT;
            iovs[k].iov_len = flen;
            memset(&msgs[k].msg_hdr, 0, sizeof(msgs[k].msg_hdr));
            msgs[k].msg_hdr.msg_iov = &iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
            next = next + 1 == nframes ? 0 : next + 1;
        }
        int r = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != ENOBUFS && errno != EAGAIN)
                die("sendmmsg");
            errors++;
            continue;
        }
        sent += (uint64_t)r;
    }
    *sent_out = sent;
    *errors_out = errors;
    free(frames);
    free(msgs);
    free(iovs);
    close(fd);
}

static int cmd_tx(int argc, char **argv) {
    tx_opts o = {.flows = 1000, .size = 64, .batch = 256, .syn = -1, .ring = 1, .port = 80};
    int have_src = 0, have_dst = 0, have_net = 0, have_vip = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage("option without a value");
        const char *v = argv[++i];
        if (!strcmp(a, "--dev"))
            o.dev = v;
        else if (!strcmp(a, "--src-mac"))
            parse_mac(v, o.src_mac), have_src = 1;
        else if (!strcmp(a, "--dst-mac"))
            parse_mac(v, o.dst_mac), have_dst = 1;
        else if (!strcmp(a, "--client-net"))
            o.client_net = parse_ip4(v), have_net = 1;
        else if (!strcmp(a, "--vip"))
            o.vip = parse_ip4(v), have_vip = 1;
        else if (!strcmp(a, "--port"))
            o.port = (uint16_t)parse_long(v, 1, 65535);
        else if (!strcmp(a, "--flows"))
            o.flows = parse_long(v, 1, MAX_FLOWS);
        else if (!strcmp(a, "--size"))
            o.size = parse_long(v, 40, FRAME_SLOT - 64);
        else if (!strcmp(a, "--count"))
            o.count = parse_long(v, 0, 1L << 40);
        else if (!strcmp(a, "--pps"))
            o.pps = parse_long(v, 0, 1L << 32);
        else if (!strcmp(a, "--batch"))
            o.batch = parse_long(v, 1, MAX_BATCH);
        else if (!strcmp(a, "--seconds"))
            o.seconds = strtod(v, NULL);
        else if (!strcmp(a, "--flags"))
            o.syn = !strcmp(v, "syn") ? 1 : !strcmp(v, "ack") ? 0 : -1;
        else if (!strcmp(a, "--mode"))
            o.ring = !strcmp(v, "ring") ? 1 : !strcmp(v, "mmsg") ? 0 : -1;
        else
            usage("unknown option");
    }
    if (!o.dev || !have_src || !have_dst || !have_net || !have_vip || o.syn < 0 || o.ring < 0)
        usage("tx needs --dev --src-mac --dst-mac --client-net --vip --flags syn|ack");
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    uint64_t sent = 0, errors = 0, t0 = now_ns();
    if (o.ring)
        run_ring(&o, &sent, &errors, t0);
    else
        run_mmsg(&o, &sent, &errors, t0);
    double secs = (double)(now_ns() - t0) / 1e9;
    printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": %.6f, \"pps\": %.1f}\n",
           (unsigned long long)sent, (unsigned long long)errors, secs,
           secs > 0 ? (double)sent / secs : 0.0);
    fflush(stdout);
    return 0;
}

/* ---- sink -------------------------------------------------------------------------------- */

#define MAX_INSNS 64

typedef struct {
    struct sock_filter insn[MAX_INSNS];
    int n;
    int fail_at[MAX_INSNS]; /* instructions whose false branch goes to "reject" */
    int n_fail;
} prog;

static void emit(prog *p, uint16_t code, uint32_t k) {
    p->insn[p->n++] = (struct sock_filter){code, 0, 0, k};
}

/* A == k, else reject (the jump is patched once the program's length is known). */
static void require(prog *p, uint32_t k) {
    p->fail_at[p->n_fail++] = p->n;
    p->insn[p->n++] = (struct sock_filter){BPF_JMP | BPF_JEQ | BPF_K, 0, 0, k};
}

static void require_at(prog *p, uint16_t size, uint32_t off, uint32_t k) {
    emit(p, BPF_LD | size | BPF_ABS, off);
    require(p, k);
}

static void finish(prog *p) {
    emit(p, BPF_RET | BPF_K, 0xFFFF); /* match: "accept" (never read: counted as a drop) */
    int reject = p->n;
    emit(p, BPF_RET | BPF_K, 0);
    for (int i = 0; i < p->n_fail; i++)
        p->insn[p->fail_at[i]].jf = (uint8_t)(reject - p->fail_at[i] - 1);
}

static uint32_t be32(const uint8_t *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static int cmd_sink(int argc, char **argv) {
    const char *dev = NULL, *match = NULL;
    uint8_t source[16] = {0}, prefix[16] = {0};
    uint32_t vip = 0;
    long size = 0, ttl = 63;
    int have_vip = 0, have_src = 0, have_pfx = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage("option without a value");
        const char *v = argv[++i];
        if (!strcmp(a, "--dev"))
            dev = v;
        else if (!strcmp(a, "--match"))
            match = v;
        else if (!strcmp(a, "--vip"))
            vip = parse_ip4(v), have_vip = 1;
        else if (!strcmp(a, "--source"))
            parse_ip6(v, source), have_src = 1;
        else if (!strcmp(a, "--backend-prefix"))
            parse_ip6(v, prefix), have_pfx = 1;
        else if (!strcmp(a, "--size"))
            size = parse_long(v, 0, 65535);
        else if (!strcmp(a, "--ttl"))
            ttl = parse_long(v, 0, 255);
        else
            usage("unknown option");
    }
    if (!dev || !match || !have_vip)
        usage("sink needs --dev --match --vip");
    prog p = {.n = 0};
    if (!strcmp(match, "encap")) {
        if (!have_src || !have_pfx)
            usage("--match encap needs --source and --backend-prefix");
        require_at(&p, BPF_H, 12, ETH_P_IPV6);
        require_at(&p, BPF_B, 20, 4); /* next header: IPv4 */
        for (int w = 0; w < 4; w++)
            require_at(&p, BPF_W, 22 + 4 * (uint32_t)w, be32(source + 4 * w));
        require_at(&p, BPF_W, 38, be32(prefix));
        require_at(&p, BPF_W, 42, be32(prefix + 4));
        require_at(&p, BPF_B, 54, 0x45);
        require_at(&p, BPF_B, 63, IPPROTO_TCP);
        require_at(&p, BPF_W, 70, vip);
        /* IPv6 payload length == inner IPv4 total length: the whole packet, unmodified. */
        emit(&p, BPF_LD | BPF_H | BPF_ABS, 18);
        emit(&p, BPF_ST, 0);
        emit(&p, BPF_LDX | BPF_W | BPF_MEM, 0);
        emit(&p, BPF_LD | BPF_H | BPF_ABS, 56);
        p.fail_at[p.n_fail++] = p.n;
        p.insn[p.n++] = (struct sock_filter){BPF_JMP | BPF_JEQ | BPF_X, 0, 0, 0};
        if (size)
            require(&p, (uint32_t)size);
    } else if (!strcmp(match, "routed")) {
        require_at(&p, BPF_H, 12, ETH_P_IP);
        require_at(&p, BPF_B, 14, 0x45);
        require_at(&p, BPF_B, 22, (uint32_t)ttl);
        require_at(&p, BPF_B, 23, IPPROTO_TCP);
        require_at(&p, BPF_W, 30, vip);
        if (size)
            require_at(&p, BPF_H, 16, (uint32_t)size);
    } else {
        usage("--match is encap or routed");
    }
    finish(&p);

    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0)
        die("socket(AF_PACKET)");
    struct sock_fprog fprog = {.len = (unsigned short)p.n, .filter = p.insn};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &fprog, sizeof(fprog)) < 0)
        die("SO_ATTACH_FILTER");
    int zero = 0; /* the kernel raises it to its minimum */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &zero, sizeof(zero)) < 0)
        die("SO_RCVBUF");
    unsigned ifindex = if_nametoindex(dev);
    if (ifindex == 0)
        die("if_nametoindex");
    struct sockaddr_ll sll = {
        .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = (int)ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        die("bind");
    uint64_t matched = 0;
    char line[256];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin) != NULL) {
        struct tpacket_stats st;
        socklen_t len = sizeof(st);
        /* Resets on read; tp_packets includes the drops. */
        if (getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
            die("PACKET_STATISTICS");
        matched += st.tp_packets;
        printf("%llu %llu\n", (unsigned long long)matched, (unsigned long long)now_ns());
        fflush(stdout);
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        usage("command: tx or sink");
    if (!strcmp(argv[1], "tx"))
        return cmd_tx(argc, argv);
    if (!strcmp(argv[1], "sink"))
        return cmd_sink(argc, argv);
    usage("command: tx or sink");
    return 2;
}
