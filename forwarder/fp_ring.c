/* PacketRing: TPACKET_V2 receive ring + batched sendmmsg transmit around the C Engine.
 *
 * run() reads up to max_frames frames straight out of the mmap'ed ring (no copy, no Python
 * object per frame), runs them through the engine in one batch and transmits the output with one
 * sendmmsg. The 54-byte Ethernet + outer IPv6 header is written in place in front of the inner
 * packet (PACKET_RESERVE keeps room for it in every slot), so a tunnelled packet is one iovec
 * into the ring. Frame slots go back to the kernel after the send.
 *
 * Why V2 and not V3: a V3 block reaches user space only when it fills or its retire timer
 * fires, and that timer has a 1 ms floor (tp_retire_blk_tov is in ms): at low rates every
 * packet waited ~1 ms in the ring. A V2 slot is handed over (and the socket woken) as soon as
 * the kernel has copied the frame into it.
 */
#include "fp_engine.h" /* Python.h first: it sets _GNU_SOURCE (sendmmsg) */

#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_csum.h"

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif
#ifndef SO_SNDBUFFORCE
#define SO_SNDBUFFORCE 32
#endif
#define FP_SNDBUF (8 << 20)
#define FP_MAX_RUN (1 << 16)  /* most frames per run()/send() call */
#define FP_MMSG_CHUNK 1024    /* UIO_MAXIOV: most messages per sendmmsg */
#define FP_MAX_TX_SOCKS 32    /* egress interfaces one ring transmits on */
/* PACKET_RESERVE: the kernel puts a frame's MAC header at least TPACKET2_HDRLEN + this many
 * bytes into its slot, so the outer header (FP_OUTER_LEN in front of the inner L3 header, of
 * which the inner Ethernet header covers 14) fits before it without touching the slot header. */
#define FP_RX_HEADROOM FP_ENCAP_LEN

typedef struct {
    uint64_t rx_frames, rx_reads, rx_truncated, rx_outgoing, rx_csum_not_ready,
        rx_vlan_restored, rx_kernel_drops, rx_kernel_packets;
    uint64_t tx_frames, tx_bytes, tx_errors, tx_no_route, tx_too_big;
} ring_stats;

typedef struct {
    PyObject_HEAD
    int fd;   /* receive: AF_PACKET, TPACKET_V2 ring */
    /* transmit: one AF_PACKET socket per egress interface, bound with protocol 0 (it never
     * receives), so messages carry no address for the kernel to copy and check */
    struct {
        int ifindex;
        int fd;
    } tx[FP_MAX_TX_SOCKS];
    int n_tx;
    int netns; /* the namespace the ring was opened in: TX sockets are made there */
    int ifindex;
    int ignores_outgoing;
    int busy;
    PyObject *ifname;
    uint8_t *map;
    size_t map_len;
    uint32_t frame_size, frame_count;
    uint32_t cur; /* reading position: the next frame slot */
    /* per-batch buffers, grown to the largest batch asked for */
    size_t cap;
    fp_frame *frames;
    struct tpacket2_hdr **tp;
    struct mmsghdr *msgs;
    struct iovec *iovs;
    int *msg_fd;
    uint8_t *hdrs;
    uint8_t *vlan_buf;
    size_t vlan_cap;
    uint8_t *replies; /* FP_ICMP_BUDGET answers */
    PyObject *engine; /* the engine of the last run(): link info for send() */
    ring_stats c;
} FpRingObject;

static int ring_check(FpRingObject *r) {
    if (r->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed PacketRing");
        return -1;
    }
    if (r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "PacketRing is in use by another call");
        return -1;
    }
    return 0;
}

static int ring_grow(FpRingObject *r, size_t n) {
    if (n <= r->cap)
        return 0;
    size_t cap = n < 256 ? 256 : n;
#define GROW(field, count)                                                                     \
    do {                                                                                       \
        void *p_ = PyMem_RawRealloc(r->field, (count) * sizeof(*r->field));                   \
        if (p_ == NULL) {                                                                      \
            PyErr_NoMemory();                                                                  \
            return -1;                                                                         \
        }                                                                                      \
        r->field = p_;                                                                         \
    } while (0)
    GROW(frames, cap);
    GROW(tp, cap);
    GROW(msgs, cap);
    GROW(iovs, 2 * cap);
    GROW(msg_fd, cap);
    GROW(hdrs, cap * FP_OUTER_LEN);
#undef GROW
    r->cap = cap;
    return 0;
}

static void ring_release_resources(FpRingObject *r) {
    if (r->map != NULL) {
        munmap(r->map, r->map_len);
        r->map = NULL;
    }
    if (r->fd >= 0) {
        close(r->fd);
        r->fd = -1;
    }
    for (int i = 0; i < r->n_tx; i++)
        close(r->tx[i].fd);
    r->n_tx = 0;
    if (r->netns >= 0) {
        close(r->netns);
        r->netns = -1;
    }
    PyMem_RawFree(r->frames);
    PyMem_RawFree(r->tp);
    PyMem_RawFree(r->msgs);
    PyMem_RawFree(r->iovs);
    PyMem_RawFree(r->msg_fd);
    PyMem_RawFree(r->hdrs);
    PyMem_RawFree(r->vlan_buf);
    PyMem_RawFree(r->replies);
    r->frames = NULL;
    r->tp = NULL;
    r->msgs = NULL;
    r->iovs = NULL;
    r->msg_fd = NULL;
    r->hdrs = NULL;
    r->vlan_buf = NULL;
    r->replies = NULL;
    r->cap = 0;
    r->vlan_cap = 0;
    Py_CLEAR(r->engine);
}

static PyObject *ring_new(PyTypeObject *type, PyObject *args FP_UNUSED, PyObject *kwds FP_UNUSED) {
    FpRingObject *r = (FpRingObject *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->fd = -1;
        r->n_tx = 0;
        r->netns = -1;
    }
    return (PyObject *)r;
}

static void ring_dealloc(FpRingObject *r) {
    ring_release_resources(r);
    Py_XDECREF(r->ifname);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int long_arg(PyObject *o, const char *name, long lo, long hi, long *out) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_ValueError, "%s must be an int, not %.100s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in %ld..%ld", name, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int ring_fail(FpRingObject *r, const char *what) {
    int err = errno;
    ring_release_resources(r);
    errno = err;
    PyObject *msg = PyUnicode_FromFormat("%s on %U", what, r->ifname);
    if (msg != NULL) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, msg);
        Py_DECREF(msg);
    }
    return -1;
}

/* A new AF_PACKET socket (protocol 0) in the ring's namespace. The calling thread may have
 * moved to another namespace since the ring was opened (tests do): then it visits the ring's
 * namespace for the socket() call only, since an ifindex means nothing elsewhere. */
static int ring_socket_in_netns(FpRingObject *r) {
    int here = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (here < 0)
        return -1;
    struct stat a, b;
    int moved = fstat(here, &a) == 0 && fstat(r->netns, &b) == 0 &&
                (a.st_dev != b.st_dev || a.st_ino != b.st_ino);
    if (moved && setns(r->netns, CLONE_NEWNET) < 0) {
        int err = errno;
        close(here);
        errno = err;
        return -1;
    }
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    int err = errno;
    if (moved && setns(here, CLONE_NEWNET) < 0) {
        /* Cannot happen short of a kernel bug; never leave the thread elsewhere silently. */
        Py_FatalError("forwarder._fastpath: cannot return to the thread's network namespace");
    }
    close(here);
    errno = err;
    return fd;
}

/* The TX socket bound to `ifindex`, made on first use; -1 with errno on failure. */
static int ring_tx_fd(FpRingObject *r, int ifindex) {
    for (int i = 0; i < r->n_tx; i++) {
        if (r->tx[i].ifindex == ifindex)
            return r->tx[i].fd;
    }
    if (r->n_tx == FP_MAX_TX_SOCKS) {
        errno = EMFILE;
        return -1;
    }
    int fd = ring_socket_in_netns(r);
    if (fd < 0)
        return -1;
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = 0, .sll_ifindex = ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    /* Best effort: skip the qdisc (we batch ourselves) and make room for whole batches. */
    int one = 1, sndbuf = FP_SNDBUF;
    (void)setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    r->tx[r->n_tx].ifindex = ifindex;
    r->tx[r->n_tx].fd = fd;
    r->n_tx++;
    return fd;
}

static int ring_init(FpRingObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ifname",   "fanout_group", "block_size",       "block_count",
                             "frame_size", "bpf",        "block_timeout_ms", NULL};
    PyObject *ifname, *fanout_o = NULL, *bsize_o = NULL, *bcount_o = NULL, *fsize_o = NULL,
                      *tov_o = NULL;
    Py_buffer bpf = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|$OOOOy*O:PacketRing", kwlist, &ifname,
                                     &fanout_o, &bsize_o, &bcount_o, &fsize_o, &bpf, &tov_o))
        return -1;
    long fanout = 0, block_size = 1 << 20, block_count = 64, frame_size = 2048, tov = 1;
    long page = sysconf(_SC_PAGESIZE);
    int rc = -1;
    if ((fanout_o && long_arg(fanout_o, "fanout_group", 0, 0xFFFF, &fanout) < 0) ||
        (bsize_o && long_arg(bsize_o, "block_size", page, 1L << 30, &block_size) < 0) ||
        (bcount_o && long_arg(bcount_o, "block_count", 1, 1 << 16, &block_count) < 0) ||
        (fsize_o && long_arg(fsize_o, "frame_size", TPACKET_ALIGNMENT, 1L << 30, &frame_size) < 0) ||
        (tov_o && long_arg(tov_o, "block_timeout_ms", 0, 60000, &tov) < 0))
        goto out;
    /* block_timeout_ms was TPACKET_V3's block retire timeout: checked, no longer used. */
    if (block_size % page != 0 || frame_size % TPACKET_ALIGNMENT != 0 ||
        frame_size < (long)(TPACKET2_HDRLEN + FP_RX_HEADROOM) || block_size % frame_size != 0 ||
        (unsigned long)block_size * (unsigned long)block_count > (1UL << 34)) {
        PyErr_Format(PyExc_ValueError,
                     "block_size must be a multiple of the page size (%ld) and of frame_size, "
                     "frame_size a multiple of %d and at least %d, the ring at most 16 GiB",
                     page, TPACKET_ALIGNMENT, (int)(TPACKET2_HDRLEN + FP_RX_HEADROOM));
        goto out;
    }
    if (bpf.len % (Py_ssize_t)sizeof(struct sock_filter) != 0 ||
        bpf.len / (Py_ssize_t)sizeof(struct sock_filter) > BPF_MAXINSNS) {
        PyErr_Format(PyExc_ValueError, "bpf must be struct sock_filter[] bytes (8 per insn, at "
                                       "most %d insns)",
                     BPF_MAXINSNS);
        goto out;
    }
    if (r->fd >= 0 || r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "PacketRing is already open");
        goto out;
    }
    Py_XSETREF(r->ifname, Py_NewRef(ifname));
    const char *name = PyUnicode_AsUTF8(ifname);
    if (name == NULL)
        goto out;
    memset(&r->c, 0, sizeof(r->c));
    r->ifindex = (int)if_nametoindex(name);
    if (r->ifindex == 0) {
        rc = ring_fail(r, "if_nametoindex");
        goto out;
    }
    r->netns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (r->netns < 0) {
        rc = ring_fail(r, "open(/proc/thread-self/ns/net)");
        goto out;
    }
    /* Protocol 0: nothing is queued before the filter and the ring are in place and bound. */
    r->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (r->fd < 0) {
        rc = ring_fail(r, "socket(AF_PACKET)");
        goto out;
    }
    int one = 1, version = TPACKET_V2, reserve = FP_RX_HEADROOM;
    if (setsockopt(r->fd, SOL_PACKET, PACKET_VERSION, &version, sizeof(version)) < 0) {
        rc = ring_fail(r, "PACKET_VERSION");
        goto out;
    }
    r->ignores_outgoing = 1;
    if (setsockopt(r->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one)) < 0) {
        if (errno != ENOPROTOOPT) {
            rc = ring_fail(r, "PACKET_IGNORE_OUTGOING");
            goto out;
        }
        r->ignores_outgoing = 0; /* Linux < 4.20: skipped by sll_pkttype instead */
    }
    if (bpf.len > 0) {
        struct sock_fprog prog = {
            .len = (unsigned short)(bpf.len / (Py_ssize_t)sizeof(struct sock_filter)),
            .filter = (struct sock_filter *)bpf.buf,
        };
        if (setsockopt(r->fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)) < 0) {
            rc = ring_fail(r, "SO_ATTACH_FILTER");
            goto out;
        }
    }
    /* Room in front of every frame for the outer IPv6 header (written in place on TX). */
    if (setsockopt(r->fd, SOL_PACKET, PACKET_RESERVE, &reserve, sizeof(reserve)) < 0) {
        rc = ring_fail(r, "PACKET_RESERVE");
        goto out;
    }
    /* Blocks only group slots for the kernel's allocation (a slot never straddles one);
     * block_size being a multiple of frame_size, slot i is at i * frame_size. */
    struct tpacket_req req = {
        .tp_block_size = (unsigned)block_size,
        .tp_block_nr = (unsigned)block_count,
        .tp_frame_size = (unsigned)frame_size,
        .tp_frame_nr = (unsigned)(block_size / frame_size * block_count),
    };
    if (setsockopt(r->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) < 0) {
        rc = ring_fail(r, "PACKET_RX_RING");
        goto out;
    }
    r->map_len = (size_t)block_size * (size_t)block_count;
    r->frame_size = (uint32_t)frame_size;
    r->frame_count = req.tp_frame_nr;
    void *map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, 0);
    if (map == MAP_FAILED) {
        r->map = NULL;
        rc = ring_fail(r, "mmap(PACKET_RX_RING)");
        goto out;
    }
    r->map = map;
    r->cur = 0;
    r->replies = PyMem_RawMalloc((size_t)FP_ICMP_BUDGET * FP_REPLY_MAX);
    if (r->replies == NULL) {
        ring_release_resources(r);
        PyErr_NoMemory();
        goto out;
    }
    struct sockaddr_ll sll = {
        .sll_family = AF_PACKET,
        .sll_protocol = htons(ETH_P_ALL),
        .sll_ifindex = r->ifindex,
    };
    if (bind(r->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        rc = ring_fail(r, "bind(AF_PACKET)");
        goto out;
    }
    if (fanout > 0) {
        /* The kernel only lets a bound socket join a group. */
        int arg = (int)fanout | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16);
        if (setsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg)) < 0) {
            rc = ring_fail(r, "PACKET_FANOUT");
            goto out;
        }
    }
    /* The receive interface's TX socket (REPLY frames) now, so that errors show here. */
    if (ring_tx_fd(r, r->ifindex) < 0) {
        rc = ring_fail(r, "TX socket");
        goto out;
    }
    rc = 0;
out:
    if (bpf.obj != NULL)
        PyBuffer_Release(&bpf);
    return rc;
}

/* ---- receive --------------------------------------------------------------------------------- */

static inline struct tpacket2_hdr *ring_slot(FpRingObject *r, uint32_t i) {
    return (struct tpacket2_hdr *)(r->map + (size_t)i * r->frame_size);
}

/* Take up to `max` frames from the slots the kernel has handed over, in ring order. Every slot
 * taken (processed or skipped) is added to *taken; they go back to the kernel together once
 * the batch's output is sent. At most one lap: a slot taken in this batch is still ours and
 * would otherwise be read again. Returns the number of frames to process. */
static size_t ring_collect(FpRingObject *r, size_t max, uint32_t *taken) {
    size_t n = 0;
    while (n < max && *taken < r->frame_count) {
        struct tpacket2_hdr *h = ring_slot(r, r->cur);
        if (!(__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            break;
        (*taken)++;
        r->cur = r->cur + 1 == r->frame_count ? 0 : r->cur + 1;
        if (!r->ignores_outgoing) {
            const struct sockaddr_ll *sll =
                (const struct sockaddr_ll *)((uint8_t *)h + TPACKET_ALIGN(sizeof(*h)));
            if (sll->sll_pkttype == PACKET_OUTGOING) {
                r->c.rx_outgoing++;
                continue;
            }
        }
        if (h->tp_snaplen < h->tp_len) {
            r->c.rx_truncated++;
            continue;
        }
        r->tp[n++] = h;
    }
    return n;
}

/* Hand `count` slots from `first` on back to the kernel, in ring order. */
static void ring_release_slots(FpRingObject *r, uint32_t first, uint32_t count) {
    for (uint32_t i = 0, slot = first; i < count; i++) {
        __atomic_store_n(&ring_slot(r, slot)->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        slot = slot + 1 == r->frame_count ? 0 : slot + 1;
    }
}

/* Fill r->frames from r->tp; frames whose VLAN tag the kernel stripped get it back (in
 * r->vlan_buf) so the engine sees them as they were on the wire. */
static int ring_frames(FpRingObject *r, size_t n) {
    size_t vlan_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (r->tp[i]->tp_status & TP_STATUS_VLAN_VALID)
            vlan_bytes += r->tp[i]->tp_snaplen + 4;
    }
    if (vlan_bytes > r->vlan_cap) {
        uint8_t *buf = PyMem_RawRealloc(r->vlan_buf, vlan_bytes);
        if (buf == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->vlan_buf = buf;
        r->vlan_cap = vlan_bytes;
    }
    uint8_t *vlan = r->vlan_buf;
    for (size_t i = 0; i < n; i++) {
        struct tpacket2_hdr *h = r->tp[i];
        fp_frame *f = &r->frames[i];
        uint8_t *data = (uint8_t *)h + h->tp_mac;
        f->status = h->tp_status;
        f->obj = NULL;
        if (h->tp_status & FP_STATUS_CSUMNOTREADY)
            r->c.rx_csum_not_ready++;
        if ((h->tp_status & TP_STATUS_VLAN_VALID) && h->tp_snaplen >= 12) {
            uint16_t tpid = (h->tp_status & TP_STATUS_VLAN_TPID_VALID) ? h->tp_vlan_tpid
                                                                       : ETH_P_8021Q;
            memcpy(vlan, data, 12);
            fp_put16(vlan + 12, tpid);
            fp_put16(vlan + 14, h->tp_vlan_tci);
            memcpy(vlan + 16, data + 12, h->tp_snaplen - 12);
            f->data = vlan;
            f->len = h->tp_snaplen + 4;
            vlan += f->len;
            r->c.rx_vlan_restored++;
        } else {
            f->data = data;
            f->len = h->tp_snaplen;
        }
    }
    r->c.rx_frames += n;
    return 0;
}

/* ---- transmit -------------------------------------------------------------------------------- */

typedef struct {
    fp_sink base;
    FpRingObject *ring;
    uint32_t n_msgs;
    uint32_t n_replies;
} ring_sink;

/* Message k goes out of `ifindex` with `n_iov` iovecs (already filled in r->iovs). */
static void ring_msg(FpRingObject *r, uint32_t k, int ifindex, int n_iov) {
    struct msghdr *m = &r->msgs[k].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = &r->iovs[2 * k];
    m->msg_iovlen = (size_t)n_iov;
    r->msg_fd[k] = ring_tx_fd(r, ifindex); /* -1: counted as a TX error at the flush */
}

static int ring_sink_reply(fp_sink *sink, fp_engine *E FP_UNUSED, const uint8_t *frame,
                           uint32_t len, uint32_t index FP_UNUSED) {
    ring_sink *s = (ring_sink *)sink;
    FpRingObject *r = s->ring;
    if (s->n_replies >= FP_ICMP_BUDGET) /* cannot happen: the engine's budget is the same */
        return V_DROP_TOO_BIG;
    uint8_t *copy = r->replies + (size_t)s->n_replies++ * FP_REPLY_MAX;
    memcpy(copy, frame, len);
    uint32_t k = s->n_msgs++;
    r->iovs[2 * k].iov_base = copy;
    r->iovs[2 * k].iov_len = len;
    ring_msg(r, k, r->ifindex, 1);
    return V_REPLY_TOO_BIG;
}

static int ring_sink_tx(fp_sink *sink, fp_engine *E, const fp_pkt *p, const fp_backend *b,
                        int verdict, uint32_t index) {
    ring_sink *s = (ring_sink *)sink;
    FpRingObject *r = s->ring;
    if (!b->has_link) {
        r->c.tx_no_route++;
        return V_DROP_NO_ROUTE;
    }
    if (b->mtu != 0 && FP_ENCAP_LEN + p->l3_len > b->mtu) {
        /* The backend's link is narrower than the tunnel MTU: same rule, its MTU. */
        r->c.tx_too_big++;
        if (p->is_icmp || E->icmp_budget == 0)
            return V_DROP_TOO_BIG;
        E->icmp_budget--;
        uint8_t reply[FP_REPLY_MAX];
        uint32_t mtu = b->mtu > FP_ENCAP_LEN ? b->mtu - FP_ENCAP_LEN : 0;
        uint32_t len = fp_build_too_big(p, mtu, reply);
        return ring_sink_reply(sink, E, reply, len, index);
    }
    uint32_t k = s->n_msgs++;
    /* Ring memory (and the VLAN copy) is ours until the slot is released: complete the
     * checksum in place. */
    uint8_t *frame = (uint8_t *)p->frame;
    if (p->csum_off >= 0)
        memcpy(frame + p->csum_off, &p->csum_val, 2);
    const struct tpacket2_hdr *h = r->tp[index];
    if (frame == (const uint8_t *)h + h->tp_mac &&
        h->tp_mac + p->l3_off >= TPACKET2_HDRLEN + FP_OUTER_LEN) {
        /* The frame is in its slot with the PACKET_RESERVE headroom in front: the outer
         * header replaces the inner Ethernet header (the frame is not read again) and the
         * packet leaves as one iovec. */
        uint8_t *outer = frame + p->l3_off - FP_OUTER_LEN;
        fp_write_outer(outer, b, p);
        r->iovs[2 * k].iov_base = outer;
        r->iovs[2 * k].iov_len = FP_OUTER_LEN + p->l3_len;
        ring_msg(r, k, b->ifindex, 1);
        return verdict;
    }
    uint8_t *hdr = r->hdrs + (size_t)k * FP_OUTER_LEN;
    fp_write_outer(hdr, b, p);
    r->iovs[2 * k].iov_base = hdr;
    r->iovs[2 * k].iov_len = FP_OUTER_LEN;
    r->iovs[2 * k + 1].iov_base = frame + p->l3_off;
    r->iovs[2 * k + 1].iov_len = p->l3_len;
    ring_msg(r, k, b->ifindex, 2);
    return verdict;
}

/* sendmmsg every queued message, one call per run of messages to the same interface (one
 * per batch in the common case); failures are counted per message, never raised. Called
 * without the GIL. */
static void ring_flush_nogil(FpRingObject *r, uint32_t n, uint64_t *sent_out, uint64_t *bytes_out,
                             uint64_t *errors_out) {
    uint32_t off = 0;
    int waited = 0;
    uint64_t sent = 0, bytes = 0, errors = 0;
    while (off < n) {
        int fd = r->msg_fd[off];
        if (fd < 0) {
            errors++;
            off++;
            continue;
        }
        unsigned chunk = 1;
        while (off + chunk < n && chunk < FP_MMSG_CHUNK && r->msg_fd[off + chunk] == fd)
            chunk++;
        int rc = sendmmsg(fd, r->msgs + off, chunk, MSG_DONTWAIT);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            if ((errno == EAGAIN || errno == ENOBUFS) && !waited) {
                /* Socket buffer full: give the device one short chance per batch. */
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                (void)poll(&pfd, 1, 1);
                waited = 1;
                continue;
            }
            errors++; /* this message is lost; go on with the next */
            off++;
            continue;
        }
        for (int i = 0; i < rc; i++)
            bytes += r->msgs[off + (uint32_t)i].msg_len;
        sent += (uint64_t)rc;
        off += (uint32_t)rc;
    }
    *sent_out = sent;
    *bytes_out = bytes;
    *errors_out = errors;
}

static void ring_flush(FpRingObject *r, fp_engine *E, uint32_t n) {
    uint64_t sent = 0, bytes = 0, errors = 0;
    if (n == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    ring_flush_nogil(r, n, &sent, &bytes, &errors);
    Py_END_ALLOW_THREADS
    r->c.tx_frames += sent;
    r->c.tx_bytes += bytes;
    r->c.tx_errors += errors;
    if (E != NULL) {
        E->tx_packets += sent;
        E->tx_bytes += bytes;
        E->tx_errors += errors;
    }
}

/* ---- run / send ------------------------------------------------------------------------------ */

static PyObject *ring_run(FpRingObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"engine", "now_ms", "max_frames", "timeout_ms", NULL};
    PyObject *engine_o, *now_o, *max_o, *timeout_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O:run", kwlist, &engine_o, &now_o, &max_o,
                                     &timeout_o))
        return NULL;
    if (!PyObject_TypeCheck(engine_o, &FpEngine_Type)) {
        PyErr_Format(PyExc_TypeError, "engine must be a forwarder._fastpath.Engine, not %.100s",
                     Py_TYPE(engine_o)->tp_name);
        return NULL;
    }
    FpEngineObject *eng = (FpEngineObject *)engine_o;
    long now, max_frames, timeout = 0;
    if (ring_check(r) < 0 || long_arg(now_o, "now_ms", 0, LONG_MAX, &now) < 0 ||
        long_arg(max_o, "max_frames", 1, FP_MAX_RUN, &max_frames) < 0 ||
        (timeout_o && long_arg(timeout_o, "timeout_ms", -1, INT32_MAX, &timeout) < 0))
        return NULL;
    if (eng->e.slots == NULL || eng->busy) {
        PyErr_SetString(PyExc_RuntimeError, "engine is not initialised or is busy");
        return NULL;
    }
    if (ring_grow(r, (size_t)max_frames) < 0)
        return NULL;
    Py_XSETREF(r->engine, Py_NewRef(engine_o));

    r->busy = 1;
    uint32_t first = r->cur, taken = 0;
    size_t n = ring_collect(r, (size_t)max_frames, &taken);
    if (n == 0 && taken == 0 && timeout != 0) {
        struct pollfd pfd = {.fd = r->fd, .events = POLLIN | POLLERR};
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = poll(&pfd, 1, (int)timeout);
        Py_END_ALLOW_THREADS
        if (rc < 0 && errno != EINTR) {
            r->busy = 0;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        n = ring_collect(r, (size_t)max_frames, &taken);
    }
    PyObject *verdicts = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    PyObject *tx = PyList_New(0), *misses = PyList_New(0), *events = PyList_New(0);
    ring_sink sink = {{ring_sink_tx, ring_sink_reply}, r, 0, 0};
    int rc = -1;
    if (verdicts != NULL && tx != NULL && misses != NULL && events != NULL &&
        ring_frames(r, n) == 0) {
        eng->busy = 1;
        rc = fp_engine_batch(eng, r->frames, n, (uint64_t)now, &sink.base,
                             (uint8_t *)PyBytes_AS_STRING(verdicts), misses, events);
        eng->busy = 0;
    }
    if (rc == 0)
        ring_flush(r, &eng->e, sink.n_msgs);
    ring_release_slots(r, first, taken);
    if (taken > 0)
        r->c.rx_reads++;
    r->busy = 0;
    if (rc < 0) {
        Py_XDECREF(verdicts);
        Py_XDECREF(tx);
        Py_XDECREF(misses);
        Py_XDECREF(events);
        return NULL;
    }
    return fp_result_new(verdicts, tx, misses, events);
}

static PyObject *ring_send(FpRingObject *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tx", "engine", NULL};
    PyObject *tx_o, *engine_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:send", kwlist, &tx_o, &engine_o))
        return NULL;
    if (ring_check(r) < 0)
        return NULL;
    if (engine_o == Py_None)
        engine_o = r->engine;
    if (engine_o != NULL && !PyObject_TypeCheck(engine_o, &FpEngine_Type)) {
        PyErr_Format(PyExc_TypeError, "engine must be a forwarder._fastpath.Engine, not %.100s",
                     Py_TYPE(engine_o)->tp_name);
        return NULL;
    }
    FpEngineObject *eng = (FpEngineObject *)engine_o;
    /* A tuple of the (immutable) item tuples keeps every packet alive while the GIL is out. */
    PyObject *items = PySequence_Tuple(tx_o);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    if (n > FP_MAX_RUN * 16 || ring_grow(r, (size_t)n) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "tx list too long");
        Py_DECREF(items);
        return NULL;
    }
    uint32_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        long bid;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_ValueError, "tx items must be (backend_id, bytes) tuples");
            goto error;
        }
        if (long_arg(PyTuple_GET_ITEM(item, 0), "backend_id", FP_REPLY, FP_MAX_BACKENDS - 1,
                     &bid) < 0)
            goto error;
        PyObject *packet = PyTuple_GET_ITEM(item, 1);
        uint8_t *data = (uint8_t *)PyBytes_AS_STRING(packet);
        size_t len = (size_t)PyBytes_GET_SIZE(packet);
        if (bid == FP_REPLY) {
            if (len < FP_ETH_LEN) {
                PyErr_SetString(PyExc_ValueError, "a REPLY frame needs an Ethernet header");
                goto error;
            }
            r->iovs[2 * k].iov_base = data;
            r->iovs[2 * k].iov_len = len;
            ring_msg(r, k, r->ifindex, 1);
            k++;
            continue;
        }
        /* No engine (none given, no run() yet): no link info, like an unresolved neighbour. */
        const fp_backend *b =
            eng == NULL || eng->e.backends == NULL ? NULL : eng->e.backends[bid];
        if (b == NULL || !b->has_link) {
            r->c.tx_no_route++;
            continue;
        }
        if (b->mtu != 0 && len > b->mtu) {
            r->c.tx_too_big++;
            continue;
        }
        /* Only the Ethernet part of the template: the packet carries its outer IPv6 header. */
        memcpy(r->hdrs + (size_t)k * FP_OUTER_LEN, b->outer, FP_ETH_LEN);
        r->iovs[2 * k].iov_base = r->hdrs + (size_t)k * FP_OUTER_LEN;
        r->iovs[2 * k].iov_len = FP_ETH_LEN;
        r->iovs[2 * k + 1].iov_base = data;
        r->iovs[2 * k + 1].iov_len = len;
        ring_msg(r, k, b->ifindex, 2);
        k++;
    }
    r->busy = 1;
    uint64_t before = r->c.tx_frames;
    ring_flush(r, eng == NULL ? NULL : &eng->e, k);
    r->busy = 0;
    Py_DECREF(items);
    return PyLong_FromUnsignedLongLong(r->c.tx_frames - before);
error:
    Py_DECREF(items);
    return NULL;
}

/* ---- the rest of the API --------------------------------------------------------------------- */

static PyObject *ring_fileno(FpRingObject *r, PyObject *unused FP_UNUSED) {
    if (r->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on closed PacketRing");
        return NULL;
    }
    return PyLong_FromLong(r->fd);
}

static PyObject *ring_close(FpRingObject *r, PyObject *unused FP_UNUSED) {
    if (r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "PacketRing is in use by another call");
        return NULL;
    }
    ring_release_resources(r);
    Py_RETURN_NONE;
}

static PyObject *ring_enter(FpRingObject *r, PyObject *unused FP_UNUSED) {
    if (ring_check(r) < 0)
        return NULL;
    return Py_NewRef(r);
}

static PyObject *ring_exit(FpRingObject *r, PyObject *args FP_UNUSED) {
    return ring_close(r, NULL);
}

static int put(PyObject *d, const char *name, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, name, o);
    Py_DECREF(o);
    return rc;
}

static PyObject *ring_counters(FpRingObject *r, PyObject *unused FP_UNUSED) {
    if (r->fd >= 0) {
        /* PACKET_STATISTICS resets on read: accumulate. */
        struct tpacket_stats st;
        socklen_t len = sizeof(st);
        if (getsockopt(r->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        r->c.rx_kernel_packets += st.tp_packets;
        r->c.rx_kernel_drops += st.tp_drops;
    }
    const ring_stats *c = &r->c;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    if (put(d, "rx_frames", c->rx_frames) < 0 || put(d, "rx_reads", c->rx_reads) < 0 ||
        put(d, "rx_truncated", c->rx_truncated) < 0 ||
        put(d, "rx_outgoing", c->rx_outgoing) < 0 ||
        put(d, "rx_csum_not_ready", c->rx_csum_not_ready) < 0 ||
        put(d, "rx_vlan_restored", c->rx_vlan_restored) < 0 ||
        put(d, "rx_kernel_packets", c->rx_kernel_packets) < 0 ||
        put(d, "rx_kernel_drops", c->rx_kernel_drops) < 0 ||
        put(d, "tx_frames", c->tx_frames) < 0 || put(d, "tx_bytes", c->tx_bytes) < 0 ||
        put(d, "tx_errors", c->tx_errors) < 0 || put(d, "tx_no_route", c->tx_no_route) < 0 ||
        put(d, "tx_too_big", c->tx_too_big) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *ring_repr(FpRingObject *r) {
    return PyUnicode_FromFormat("PacketRing(%R, ifindex=%d%s)", r->ifname ? r->ifname : Py_None,
                                r->ifindex, r->fd < 0 ? ", closed" : "");
}

static PyObject *ring_get_ifindex(FpRingObject *r, void *closure FP_UNUSED) {
    return PyLong_FromLong(r->ifindex);
}

static PyObject *ring_get_ifname(FpRingObject *r, void *closure FP_UNUSED) {
    return Py_NewRef(r->ifname ? r->ifname : Py_None);
}

static PyObject *ring_get_closed(FpRingObject *r, void *closure FP_UNUSED) {
    return PyBool_FromLong(r->fd < 0);
}

static PyMethodDef ring_methods[] = {
    {"run", (PyCFunction)(void (*)(void))ring_run, METH_VARARGS | METH_KEYWORDS,
     "run(engine, now_ms, max_frames, timeout_ms=0) -> Result: receive up to max_frames "
     "frames, process them in one batch, transmit the output (Result.tx is empty). "
     "timeout_ms > 0 (or -1) waits that long for a first frame when none is ready."},
    {"send", (PyCFunction)(void (*)(void))ring_send, METH_VARARGS | METH_KEYWORDS,
     "send(tx, engine=None) -> int: transmit Engine.process tx items in one sendmmsg; link "
     "info from `engine`, by default the engine of the last run(). Returns frames sent."},
    {"fileno", (PyCFunction)ring_fileno, METH_NOARGS, "The receive socket, for the event loop."},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "Unmap the ring, close both sockets."},
    {"counters", (PyCFunction)ring_counters, METH_NOARGS, "rx_*/tx_* counters of this ring."},
    {"__enter__", (PyCFunction)ring_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)ring_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"ifindex", (getter)ring_get_ifindex, NULL, "receive interface index", NULL},
    {"ifname", (getter)ring_get_ifname, NULL, "receive interface name", NULL},
    {"closed", (getter)ring_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject FpRing_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forwarder._fastpath.PacketRing",
    .tp_basicsize = sizeof(FpRingObject),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_repr = (reprfunc)ring_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PacketRing(ifname, *, fanout_group=0, block_size=1<<20, block_count=64, "
              "frame_size=2048, bpf=b'', block_timeout_ms=1): TPACKET_V2 receive ring and "
              "batched AF_PACKET transmit (forwarder/DATAPATH.md, I/O).",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
    .tp_init = (initproc)ring_init,
    .tp_new = ring_new,
};

int fp_ring_module_init(PyObject *module) {
    if (PyType_Ready(&FpRing_Type) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "PacketRing", (PyObject *)&FpRing_Type);
}
