/* The C `Engine`: configuration, the per-batch loop, the flow table API (DATAPATH.md).
 *
 * One `process()` call runs a whole batch; only misses, events and (for `process`) the output
 * bytes create Python objects. PacketRing.run drives the same loop with a sink that transmits.
 */
#include "fp_engine.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fp_csum.h"
#include "fp_packet.h"
#include "fp_table.h"

/* ---- small argument helpers ------------------------------------------------------------------ */

static int int_arg(PyObject *o, const char *name, long long lo, long long hi, long long *out) {
    if (o == NULL) {
        PyErr_Format(PyExc_TypeError, "missing required argument '%s'", name);
        return -1;
    }
    /* ValueError (not TypeError) for a wrong type too: the Python reference raises UsageError,
     * a ValueError, for every bad configuration argument. */
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_ValueError, "%s must be an int, not %.100s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be in %lld..%lld", name, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

/* Copy a bytes-like argument whose length must be one of len_a/len_b (len_b < 0: only len_a).
 * Returns the length copied, or -1. */
static Py_ssize_t bytes_arg(PyObject *o, const char *name, Py_ssize_t len_a, Py_ssize_t len_b,
                            uint8_t *out) {
    if (o == NULL) {
        PyErr_Format(PyExc_TypeError, "missing required argument '%s'", name);
        return -1;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be bytes, not %.100s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    Py_ssize_t n = view.len;
    if (n != len_a && n != len_b) {
        PyBuffer_Release(&view);
        if (len_b < 0)
            PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", name, len_a, n);
        else
            PyErr_Format(PyExc_ValueError, "%s must be %zd or %zd bytes, got %zd", name, len_a,
                         len_b, n);
        return -1;
    }
    memcpy(out, view.buf, (size_t)n);
    PyBuffer_Release(&view);
    return n;
}

/* A FlowT (proto, client_ip, client_port, vip_ip, vip_port) into a key. */
static int flow_arg(PyObject *o, fp_key *k) {
    PyObject *seq = PySequence_Check(o) && !PyBytes_Check(o) && !PyUnicode_Check(o)
                        ? PySequence_Tuple(o)
                        : NULL;
    if (seq == NULL || PyTuple_GET_SIZE(seq) != 5) {
        Py_XDECREF(seq);
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError,
                        "flow must be a 5-tuple (proto, client_ip, client_port, vip_ip, vip_port)");
        return -1;
    }
    long long proto, cport, vport;
    uint8_t cip[16], vip[16];
    Py_ssize_t clen = -1, vlen = -1;
    int rc = -1;
    if (int_arg(PyTuple_GET_ITEM(seq, 0), "proto", 0, 255, &proto) < 0)
        goto done;
    if (proto != 6 && proto != 17) {
        PyErr_Format(PyExc_ValueError, "proto must be 6 (tcp) or 17 (udp), got %lld", proto);
        goto done;
    }
    if ((clen = bytes_arg(PyTuple_GET_ITEM(seq, 1), "client_ip", 4, 16, cip)) < 0 ||
        int_arg(PyTuple_GET_ITEM(seq, 2), "client_port", 0, 0xFFFF, &cport) < 0 ||
        (vlen = bytes_arg(PyTuple_GET_ITEM(seq, 3), "vip_ip", 4, 16, vip)) < 0 ||
        int_arg(PyTuple_GET_ITEM(seq, 4), "vip_port", 0, 0xFFFF, &vport) < 0)
        goto done;
    if (clen != vlen) {
        PyErr_SetString(PyExc_ValueError, "client_ip and vip_ip must both be IPv4 or IPv6");
        goto done;
    }
    fp_key_set(k, clen == 4 ? 4 : 6, (uint8_t)proto, cip, (uint16_t)cport, vip, (uint16_t)vport);
    rc = 0;
done:
    Py_DECREF(seq);
    return rc;
}

/* A tuple of `n` new references, or NULL (and every item released) if one is NULL or the tuple
 * cannot be allocated. Direct PyTuple_New: Py_BuildValue parses its format for every event
 * (one NEW event per new flow; measured ~2x the cost of building the objects themselves). */
static PyObject *tuple_of(Py_ssize_t n, PyObject **items) {
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    t = PyTuple_New(n);
    if (t == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]); /* steals */
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *flow_tuple(const void *key_bytes) {
    fp_key k;
    memcpy(&k, key_bytes, sizeof(k));
    Py_ssize_t alen = (k.family & 0x0F) == 4 ? 4 : 16; /* a slot's high nibble: state */
    PyObject *items[5] = {
        PyLong_FromLong((long)k.proto),
        PyBytes_FromStringAndSize((const char *)k.client_ip, alen),
        PyLong_FromLong((long)k.client_port),
        PyBytes_FromStringAndSize((const char *)k.vip_ip, alen),
        PyLong_FromLong((long)k.vip_port),
    };
    return tuple_of(5, items);
}

static int append_event(PyObject *events, int code, const void *key_bytes, int backend_id) {
    PyObject *items[3] = {PyLong_FromLong(code), flow_tuple(key_bytes),
                          PyLong_FromLong(backend_id)};
    PyObject *ev = tuple_of(3, items);
    if (ev == NULL)
        return -1;
    int rc = PyList_Append(events, ev);
    Py_DECREF(ev);
    return rc;
}

/* ---- output builders ------------------------------------------------------------------------- */

void fp_write_outer(uint8_t *out, const fp_backend *b, const fp_pkt *p) {
    memcpy(out, b->outer, FP_OUTER_LEN);
    uint8_t *ip6 = out + FP_ETH_LEN;
    uint32_t label = (uint32_t)(p->hash64 >> 32) & 0xFFFFFu;
    fp_put32(ip6, (6u << 28) | ((uint32_t)p->tc << 20) | label);
    fp_put16(ip6 + 4, (uint16_t)p->l3_len);
    ip6[6] = p->family == 4 ? 4 : 41;
}

uint32_t fp_build_too_big(const fp_pkt *p, uint32_t mtu, uint8_t *out) {
    const uint8_t *f = p->frame;
    const uint8_t *in = f + p->l3_off;
    uint32_t l2 = p->l3_off;
    memcpy(out, f + 6, 6);                 /* dst = input src */
    memcpy(out + 6, f, 6);                 /* src = input dst */
    memcpy(out + 12, f + 12, l2 - 12);     /* VLAN tags and ethertype as they came */
    uint8_t *ip = out + l2;
    if (p->family == 4) {
        uint32_t ihl = (in[0] & 15u) * 4;
        uint32_t after = p->l3_len - ihl;
        uint32_t qlen = ihl + (after < 8 ? after : 8);
        uint8_t *icmp = ip + 20;
        uint32_t total = 20 + 8 + qlen;
        memset(ip, 0, 20);
        ip[0] = 0x45;
        fp_put16(ip + 2, (uint16_t)total);
        fp_put16(ip + 6, 0x4000);
        ip[8] = 64;
        ip[9] = 1;
        memcpy(ip + 12, in + 16, 4); /* VIP */
        memcpy(ip + 16, in + 12, 4); /* client */
        icmp[0] = 3;
        icmp[1] = 4;
        memset(icmp + 2, 0, 4);
        fp_put16(icmp + 6, (uint16_t)mtu);
        memcpy(icmp + 8, in, qlen);
        uint16_t c = fp_csum(icmp, 8 + qlen, 0);
        memcpy(icmp + 2, &c, 2);
        c = fp_csum(ip, 20, 0);
        memcpy(ip + 10, &c, 2);
        return l2 + total;
    }
    uint32_t max_quote = FP_IPV6_MIN_MTU - 40 - 8;
    uint32_t qlen = p->l3_len < max_quote ? p->l3_len : max_quote;
    uint32_t plen = 8 + qlen;
    uint8_t *icmp = ip + 40;
    fp_put32(ip, 6u << 28);
    fp_put16(ip + 4, (uint16_t)plen);
    ip[6] = 58;
    ip[7] = 64;
    memcpy(ip + 8, in + 24, 16); /* VIP */
    memcpy(ip + 24, in + 8, 16); /* client */
    icmp[0] = 2;
    icmp[1] = 0;
    icmp[2] = icmp[3] = 0;
    fp_put32(icmp + 4, mtu);
    memcpy(icmp + 8, in, qlen);
    uint8_t pseudo[8] = {0, 0, 0, 0, 0, 0, 0, 58};
    fp_put32(pseudo, plen);
    uint64_t sum = fp_csum_add(0, ip + 8, 32);
    sum = fp_csum_add(sum, pseudo, 8);
    uint16_t c = fp_csum(icmp, plen, sum);
    memcpy(icmp + 2, &c, 2);
    return l2 + 40 + plen;
}

/* ---- the batch loop ------------------------------------------------------------------------- */

static int miss_frame(PyObject *misses, const fp_frame *fr, const fp_pkt *p) {
    PyObject *frame;
    if (p->csum_off < 0 && fr->obj != NULL && PyBytes_CheckExact(fr->obj)) {
        frame = Py_NewRef(fr->obj);
    } else {
        frame = PyBytes_FromStringAndSize((const char *)fr->data, fr->len);
        if (frame == NULL)
            return -1;
        if (p->csum_off >= 0)
            memcpy(PyBytes_AS_STRING(frame) + p->csum_off, &p->csum_val, 2);
    }
    PyObject *flow = flow_tuple(&p->key);
    if (flow == NULL) {
        Py_DECREF(frame);
        return -1;
    }
    int kind = p->is_icmp ? FP_MISS_ICMP : FP_MISS_PACKET;
    PyObject *item = Py_BuildValue("(iNNi)", (int)p->vip_id, flow, frame, kind);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(misses, item);
    Py_DECREF(item);
    return rc;
}

/* backend_id picked by Maglev for a flow start, or -1 (empty table / unknown backend). */
static int maglev_backend(const fp_engine *E, uint8_t vip_id, uint64_t hash) {
    const fp_maglev *m = &E->maglev[vip_id];
    if (m->size == 0)
        return -1;
    uint16_t bid = m->table[hash % m->size];
    if (bid == FP_NO_BACKEND || E->backends[bid] == NULL)
        return -1;
    return bid;
}

/* Whether backend `bid` is in VIP `vip_id`'s Maglev table (gets new flows). */
static int maglev_member(const fp_engine *E, uint8_t vip_id, uint16_t bid) {
    const uint64_t *m = E->maglev[vip_id].members;
    return m != NULL && (m[bid >> 6] >> (bid & 63)) & 1;
}

/* Table stage for a parsed packet of a configured service. Returns the verdict; FORWARD/NEW
 * also set *backend. */
static int table_stage(fp_engine *E, fp_pkt *p, uint64_t now, PyObject *events, int *backend) {
    fp_table_clock(E, now);
    fp_slot *s = fp_table_lookup(E, &p->key, p->hash64, now);
    if (p->is_icmp) {
        /* ICMP errors never create, refresh or close a flow. */
        if (s == NULL)
            return V_MISS;
        *backend = s->backend_id;
        return V_FORWARD;
    }
    int is_tcp = p->key.proto == 6;
    int flow_start = is_tcp ? (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN
                            : !E->vips[p->vip_id].udp_lookup_first;
    uint32_t idle = is_tcp ? E->tcp_idle_ms : E->udp_idle_ms;
    /* Port reuse: a TCP SYN on a closing flow, or on one whose backend no longer takes new
     * flows of the VIP (down, drained, removed), re-creates the flow as a flow start. */
    if (s != NULL && !(flow_start && is_tcp &&
                       (s->state == ST_CLOSING || !maglev_member(E, p->vip_id, s->backend_id)))) {
        fp_slot_seen(s, now);
        if (s->state == ST_ESTABLISHED) {
            if (is_tcp && (p->tcp_flags & (TCP_FIN | TCP_RST))) {
                fp_slot_close(E, s, now, E->fin_linger_ms);
                if (append_event(events, EV_CLOSE, s, s->backend_id) < 0)
                    return -1;
            } else {
                fp_slot_set_expires(E, s, now + idle);
                if (fp_slot_touch(s, now, E->touch_interval_ms)) {
                    if (append_event(events, EV_TOUCH, s, s->backend_id) < 0)
                        return -1;
                }
            }
        }
        *backend = s->backend_id;
        return V_FORWARD;
    }
    if (!flow_start)
        return V_MISS;
    int bid = maglev_backend(E, p->vip_id, p->hash64);
    if (bid < 0)
        return V_DROP_NO_BACKEND;
    if (s == NULL) { /* a CLOSING entry re-created by a new SYN keeps its slot */
        fp_slot old;
        int evicted;
        s = fp_table_claim(E, &p->key, p->hash64, now, &old, &evicted);
        if (evicted && append_event(events, EV_EVICTED, &old, old.backend_id) < 0) {
            memset(s, 0, sizeof(*s)); /* keep the table consistent: the slot is now empty */
            E->n_flows--;
            return -1;
        }
    }
    fp_slot_fill(E, s, &p->key, (uint16_t)bid, now, idle, E->touch_interval_ms);
    if (append_event(events, EV_NEW, s, bid) < 0)
        return -1;
    *backend = bid;
    return V_NEW;
}

/* Frames are parsed FP_LOOKAHEAD ahead of the table stage, and their bucket's first cache lines
 * prefetched: with many flows the bucket read is a cache miss, and this hides it behind the
 * parsing of the following frames. Parsing reads only the configuration, never the table, so
 * doing it early changes nothing else. */
#define FP_LOOKAHEAD 16

/* `forced` = FP_USE_TABLE: the table stage decides (process, ring); else forward_to(): every
 * frame of a configured service goes to backend `forced` (-1 or unset: DROP_NO_BACKEND) and the
 * table is not read or written. */
static int engine_batch(FpEngineObject *self, const fp_frame *frames, size_t n, uint64_t now,
                        fp_sink *sink, uint8_t *verdicts, PyObject *misses, PyObject *events,
                        int forced) {
    fp_engine *E = &self->e;
    uint8_t reply[FP_REPLY_MAX];
    fp_pkt window[FP_LOOKAHEAD];
    int parsed[FP_LOOKAHEAD];
    size_t ahead = 0;
    E->icmp_budget = FP_ICMP_BUDGET;
    for (size_t i = 0; i < n; i++) {
        for (; ahead < n && ahead < i + FP_LOOKAHEAD; ahead++) {
            fp_pkt *q = &window[ahead % FP_LOOKAHEAD];
            q->frame = frames[ahead].data;
            q->frame_len = frames[ahead].len;
            q->status = frames[ahead].status;
            int pv = fp_classify(E, q);
            parsed[ahead % FP_LOOKAHEAD] = pv;
            if (pv == V_OURS)
                fp_table_prefetch(E, q->hash64);
        }
        fp_pkt *p = &window[i % FP_LOOKAHEAD];
        int v = parsed[i % FP_LOOKAHEAD];
        if (v == V_OURS) {
            if (FP_ENCAP_LEN + p->l3_len > E->tunnel_mtu) {
                if (p->is_icmp || E->icmp_budget == 0) {
                    v = V_DROP_TOO_BIG;
                } else {
                    E->icmp_budget--;
                    uint32_t rlen = fp_build_too_big(p, E->tunnel_mtu - FP_ENCAP_LEN, reply);
                    v = sink->reply(sink, E, reply, rlen, (uint32_t)i);
                }
            } else {
                int bid = -1;
                if (forced == FP_USE_TABLE) {
                    v = table_stage(E, p, now, events, &bid);
                } else if (forced >= 0 && E->backends[forced] != NULL) {
                    bid = forced;
                    v = V_FORWARD;
                    E->forward_to++;
                } else {
                    v = V_DROP_NO_BACKEND;
                }
                if (v == V_FORWARD || v == V_NEW) {
                    fp_prepare_csum(p);
                    v = sink->tx(sink, E, p, E->backends[bid], v, (uint32_t)i);
                } else if (v == V_MISS) {
                    fp_prepare_csum(p);
                    if (miss_frame(misses, &frames[i], p) < 0)
                        v = -1;
                }
            }
            if (v < 0)
                return -1;
        }
        verdicts[i] = (uint8_t)v;
        E->verdicts[v]++;
    }
    return 0;
}

int fp_engine_batch(FpEngineObject *self, const fp_frame *frames, size_t n, uint64_t now,
                    fp_sink *sink, uint8_t *verdicts, PyObject *misses, PyObject *events) {
    return engine_batch(self, frames, n, now, sink, verdicts, misses, events, FP_USE_TABLE);
}

/* ---- Result ---------------------------------------------------------------------------------- */

PyTypeObject FpResult_Type;

static PyStructSequence_Field result_fields[] = {
    {"verdicts", "bytes: one Verdict code per input frame"},
    {"tx", "list of (backend_id, packet) or (REPLY, frame)"},
    {"misses", "list of (vip_id, flow, frame, kind): kind 1 = ICMP error quoting the flow"},
    {"events", "list of (Event, flow, backend_id)"},
    {NULL, NULL},
};

static PyStructSequence_Desc result_desc = {
    "forwarder._fastpath.Result",
    "What one batch produced (forwarder/DATAPATH.md).",
    result_fields,
    4,
};

PyObject *fp_result_new(PyObject *verdicts, PyObject *tx, PyObject *misses, PyObject *events) {
    PyObject *r = PyStructSequence_New(&FpResult_Type);
    if (r == NULL) {
        Py_DECREF(verdicts);
        Py_DECREF(tx);
        Py_DECREF(misses);
        Py_DECREF(events);
        return NULL;
    }
    PyStructSequence_SET_ITEM(r, 0, verdicts);
    PyStructSequence_SET_ITEM(r, 1, tx);
    PyStructSequence_SET_ITEM(r, 2, misses);
    PyStructSequence_SET_ITEM(r, 3, events);
    return r;
}

/* ---- process(): the sink that returns bytes ------------------------------------------------ */

typedef struct {
    fp_sink base;
    PyObject *tx;
} list_sink;

static int list_sink_append(list_sink *s, int backend_id, PyObject *packet) {
    PyObject *item = Py_BuildValue("(iN)", backend_id, packet);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(s->tx, item);
    Py_DECREF(item);
    return rc;
}

static int list_sink_tx(fp_sink *sink, fp_engine *E FP_UNUSED, const fp_pkt *p,
                        const fp_backend *b, int verdict, uint32_t index FP_UNUSED) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(FP_ENCAP_LEN + p->l3_len));
    if (out == NULL)
        return -1;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    uint8_t hdr[FP_OUTER_LEN];
    fp_write_outer(hdr, b, p);
    memcpy(o, hdr + FP_ETH_LEN, FP_ENCAP_LEN);
    memcpy(o + FP_ENCAP_LEN, p->frame + p->l3_off, p->l3_len);
    if (p->csum_off >= 0)
        memcpy(o + FP_ENCAP_LEN + (p->csum_off - (int32_t)p->l3_off), &p->csum_val, 2);
    if (list_sink_append((list_sink *)sink, b->id, out) < 0)
        return -1;
    return verdict;
}

static int list_sink_reply(fp_sink *sink, fp_engine *E FP_UNUSED, const uint8_t *frame,
                           uint32_t len, uint32_t index FP_UNUSED) {
    PyObject *out = PyBytes_FromStringAndSize((const char *)frame, (Py_ssize_t)len);
    if (out == NULL)
        return -1;
    if (list_sink_append((list_sink *)sink, FP_REPLY, out) < 0)
        return -1;
    return V_REPLY_TOO_BIG;
}

/* ---- Engine: construction and configuration ----------------------------------------------- */

static const char *const verdict_names[V_COUNT] = {
    [V_FORWARD] = "forward",
    [V_NEW] = "new",
    [V_MISS] = "miss",
    [V_PASS_NOT_IP] = "pass_not_ip",
    [V_PASS_NOT_VIP] = "pass_not_vip",
    [V_PASS_NOT_SERVICE] = "pass_not_service",
    [V_REPLY_TOO_BIG] = "reply_too_big",
    [V_DROP_ETH_SHORT] = "drop_eth_short",
    [V_DROP_IP4_SHORT] = "drop_ip4_short",
    [V_DROP_IP4_VERSION] = "drop_ip4_version",
    [V_DROP_IP4_IHL] = "drop_ip4_ihl",
    [V_DROP_IP4_LENGTH] = "drop_ip4_length",
    [V_DROP_IP6_SHORT] = "drop_ip6_short",
    [V_DROP_IP6_VERSION] = "drop_ip6_version",
    [V_DROP_IP6_LENGTH] = "drop_ip6_length",
    [V_DROP_IP6_EXT] = "drop_ip6_ext",
    [V_DROP_FRAGMENT] = "drop_fragment",
    [V_DROP_L4_SHORT] = "drop_l4_short",
    [V_DROP_ICMP_SHORT] = "drop_icmp_short",
    [V_DROP_ICMP_BAD_QUOTE] = "drop_icmp_bad_quote",
    [V_DROP_NO_BACKEND] = "drop_no_backend",
    [V_DROP_NO_ROUTE] = "drop_no_route",
    [V_DROP_TOO_BIG] = "drop_too_big",
};

/* The flow table: one anonymous mapping (zero pages = empty slots), faulted in as flows land.
 * Lookups hit random buckets all over it, so with 4 KiB pages nearly every hit is a TLB miss
 * too: a table of at least a huge page is 2 MiB aligned (only whole aligned 2 MiB ranges can be
 * transparent huge pages) and madvise(MADV_HUGEPAGE)d (hits 20-40 % faster). The length is not
 * rounded up: a tail under 2 MiB stays in 4 KiB pages, and a full table's RSS is its bytes.
 * madvise failing (a kernel without THP) is not fatal: counters() table_hugepages = 0. */
#define FP_HUGE_PAGE ((size_t)2 << 20)

static int table_map(fp_engine *E, size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = (bytes + page - 1) & ~(page - 1);
    size_t span = len < FP_HUGE_PAGE ? len : len + FP_HUGE_PAGE;
    uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        if (errno == ENOMEM)
            PyErr_NoMemory();
        else
            PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    E->slots = (fp_slot *)raw;
    E->slots_bytes = span;
    E->table_hugepages = 0;
    E->table_madvise_errno = 0;
    if (span == len)
        return 0;
    /* Keep the aligned `len` bytes of the over-sized mapping, unmap the rest. */
    uint8_t *mem =
        (uint8_t *)(((uintptr_t)raw + FP_HUGE_PAGE - 1) & ~(uintptr_t)(FP_HUGE_PAGE - 1));
    size_t head = (size_t)(mem - raw), tail = span - head - len;
    if ((head != 0 && munmap(raw, head) != 0) || (tail != 0 && munmap(mem + len, tail) != 0)) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(raw, span);
        E->slots = NULL;
        return -1;
    }
    E->slots = (fp_slot *)mem;
    E->slots_bytes = len;
#ifdef MADV_HUGEPAGE
    if (madvise(mem, len, MADV_HUGEPAGE) == 0)
        E->table_hugepages = 1;
    else
        E->table_madvise_errno = errno;
#else
    E->table_madvise_errno = EINVAL;
#endif
    return 0;
}

static void engine_free_state(fp_engine *E) {
    if (E->slots != NULL) {
        munmap(E->slots, E->slots_bytes);
        E->slots = NULL;
    }
    for (int i = 0; i < FP_MAX_VIPS; i++) {
        PyMem_RawFree(E->maglev[i].table);
        PyMem_RawFree(E->maglev[i].members);
        E->maglev[i].table = NULL;
        E->maglev[i].members = NULL;
        E->maglev[i].size = 0;
    }
    if (E->backends != NULL) {
        for (int i = 0; i < FP_MAX_BACKENDS; i++)
            PyMem_RawFree(E->backends[i]);
        PyMem_RawFree(E->backends);
        E->backends = NULL;
    }
}

static void engine_dealloc(FpEngineObject *self) {
    engine_free_state(&self->e);
    PyMem_RawFree(self->frames);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int engine_init(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"source_ipv6",   "capacity",         "tcp_idle_ms", "udp_idle_ms",
                             "fin_linger_ms", "touch_interval_ms", "tunnel_mtu",  NULL};
    PyObject *src = NULL, *cap = NULL, *tcp = NULL, *udp = NULL, *fin = NULL, *touch = NULL,
             *mtu = NULL;
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "Engine() takes keyword arguments only");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOOOOO:Engine", kwlist, &src, &cap, &tcp,
                                     &udp, &fin, &touch, &mtu))
        return -1;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is processing a batch");
        return -1;
    }
    fp_engine *E = &self->e;
    uint8_t source[16];
    long long capacity, tcp_idle, udp_idle, linger, interval, tunnel_mtu = 1500;
    if (bytes_arg(src, "source_ipv6", 16, -1, source) < 0 ||
        int_arg(cap, "capacity", 1, FP_MAX_CAPACITY, &capacity) < 0 ||
        int_arg(tcp, "tcp_idle_ms", 0, FP_MAX_TIMEOUT_MS, &tcp_idle) < 0 ||
        int_arg(udp, "udp_idle_ms", 0, FP_MAX_TIMEOUT_MS, &udp_idle) < 0 ||
        int_arg(fin, "fin_linger_ms", 0, FP_MAX_TIMEOUT_MS, &linger) < 0 ||
        int_arg(touch, "touch_interval_ms", 0, FP_MAX_TIMEOUT_MS, &interval) < 0)
        return -1;
    if (mtu != NULL && int_arg(mtu, "tunnel_mtu", FP_IPV6_MIN_MTU, 0xFFFF,
                               &tunnel_mtu) < 0)
        return -1;

    engine_free_state(E);
    memset(E, 0, sizeof(*E));
    uint32_t slots = ((uint32_t)capacity + FP_BUCKET_SLOTS - 1) & ~(uint32_t)(FP_BUCKET_SLOTS - 1);
    /* Fixed memory, once (table_map). */
    if (table_map(E, (size_t)slots * sizeof(fp_slot)) < 0)
        return -1;
    E->backends = PyMem_RawCalloc(FP_MAX_BACKENDS, sizeof(fp_backend *));
    if (E->backends == NULL) {
        engine_free_state(E);
        PyErr_NoMemory();
        return -1;
    }
    E->capacity = slots;
    E->n_buckets = slots / FP_BUCKET_SLOTS;
    memcpy(E->source_ipv6, source, 16);
    E->tcp_idle_ms = (uint32_t)tcp_idle;
    E->udp_idle_ms = (uint32_t)udp_idle;
    E->fin_linger_ms = (uint32_t)linger;
    E->touch_interval_ms = (uint32_t)interval;
    E->tunnel_mtu = (uint32_t)tunnel_mtu;
    return 0;
}

static int check_ready(FpEngineObject *self) {
    if (self->e.slots == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ was not called");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is processing a batch");
        return -1;
    }
    return 0;
}

/* Rebuild the address and service hash tables from the VIP array. */
static void rebuild_lookup(fp_engine *E) {
    memset(E->addrs, 0, sizeof(E->addrs));
    memset(E->svcs, 0, sizeof(E->svcs));
    E->n_vips = 0;
    for (int id = 0; id < FP_MAX_VIPS; id++) {
        const fp_vip *v = &E->vips[id];
        if (!v->in_use)
            continue;
        E->n_vips++;
        if (!fp_is_vip_addr(E, v->family, v->ip)) {
            uint32_t i = fp_addr_hash(v->family, v->ip) & (FP_ADDR_SLOTS - 1);
            while (E->addrs[i].used)
                i = (i + 1) & (FP_ADDR_SLOTS - 1);
            E->addrs[i].used = 1;
            E->addrs[i].family = v->family;
            memcpy(E->addrs[i].ip, v->ip, 16);
        }
        uint32_t i = fp_svc_hash(v->family, v->ip, v->port, v->proto) & (FP_SVC_SLOTS - 1);
        while (E->svcs[i].used)
            i = (i + 1) & (FP_SVC_SLOTS - 1);
        fp_svc_slot *s = &E->svcs[i];
        s->used = 1;
        s->family = v->family;
        s->proto = v->proto;
        s->vip_id = (uint8_t)id;
        s->port = v->port;
        memcpy(s->ip, v->ip, 16);
    }
}

static int slot_is_vip(const fp_slot *s, const fp_vip *v) {
    return s->family == v->family && s->vip_port == v->port && s->proto == v->proto &&
           memcmp(s->vip_ip, v->ip, 16) == 0;
}

static long long drop_vip_flows(fp_engine *E, const fp_vip *v) {
    long long dropped = 0;
    for (uint32_t i = 0; i < E->capacity; i++) {
        fp_slot *s = &E->slots[i];
        if (s->family != 0 && slot_is_vip(s, v)) {
            fp_slot_clear(E, s);
            dropped++;
        }
    }
    return dropped;
}

static PyObject *engine_set_vip(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"vip_id", "ip", "port", "proto", "udp_lookup_first", NULL};
    PyObject *id_o, *ip_o, *port_o, *proto_o, *first_o = Py_False;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$O:set_vip", kwlist, &id_o, &ip_o,
                                     &port_o, &proto_o, &first_o))
        return NULL;
    int lookup_first = PyObject_IsTrue(first_o);
    if (lookup_first < 0)
        return NULL;
    if (check_ready(self) < 0)
        return NULL;
    long long id, port, proto;
    uint8_t ip[16] = {0};
    Py_ssize_t alen;
    if (int_arg(id_o, "vip_id", 0, FP_MAX_VIPS - 1, &id) < 0 ||
        (alen = bytes_arg(ip_o, "ip", 4, 16, ip)) < 0 ||
        int_arg(port_o, "port", 0, 0xFFFF, &port) < 0 ||
        int_arg(proto_o, "proto", 0, 255, &proto) < 0)
        return NULL;
    if (proto != 6 && proto != 17) {
        PyErr_Format(PyExc_ValueError, "proto must be 6 (tcp) or 17 (udp), got %lld", proto);
        return NULL;
    }
    fp_engine *E = &self->e;
    uint8_t family = alen == 4 ? 4 : 6;
    for (int other = 0; other < FP_MAX_VIPS; other++) {
        const fp_vip *v = &E->vips[other];
        if (other != id && v->in_use && v->family == family && v->port == port &&
            v->proto == proto && memcmp(v->ip, ip, 16) == 0) {
            PyErr_Format(PyExc_ValueError, "vip_id %d already serves this address/port/proto",
                         other);
            return NULL;
        }
    }
    fp_vip *v = &E->vips[id];
    if (v->in_use && !(v->family == family && v->port == port && v->proto == proto &&
                       memcmp(v->ip, ip, 16) == 0))
        drop_vip_flows(E, v);
    v->in_use = 1;
    v->family = family;
    v->port = (uint16_t)port;
    v->proto = (uint8_t)proto;
    v->udp_lookup_first = (uint8_t)lookup_first;
    memcpy(v->ip, ip, 16);
    rebuild_lookup(E);
    Py_RETURN_NONE;
}


static PyObject *engine_remove_vip(FpEngineObject *self, PyObject *arg) {
    long long id;
    if (check_ready(self) < 0 || int_arg(arg, "vip_id", 0, FP_MAX_VIPS - 1, &id) < 0)
        return NULL;
    fp_engine *E = &self->e;
    fp_vip *v = &E->vips[id];
    long long dropped = 0;
    if (v->in_use) {
        dropped = drop_vip_flows(E, v);
        memset(v, 0, sizeof(*v));
        rebuild_lookup(E);
    }
    PyMem_RawFree(E->maglev[id].table);
    PyMem_RawFree(E->maglev[id].members);
    E->maglev[id].table = NULL;
    E->maglev[id].members = NULL;
    E->maglev[id].size = 0;
    return PyLong_FromLongLong(dropped);
}

static PyObject *engine_set_backend(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"backend_id", "ip", "dst_mac", "src_mac", "ifindex", "mtu", NULL};
    PyObject *id_o, *ip_o, *dmac_o = NULL, *smac_o = NULL, *ifi_o = NULL, *mtu_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$OOOO:set_backend", kwlist, &id_o, &ip_o,
                                     &dmac_o, &smac_o, &ifi_o, &mtu_o))
        return NULL;
    if (check_ready(self) < 0)
        return NULL;
    long long id, ifindex = 0, mtu = 0;
    uint8_t ip[16], dmac[6] = {0}, smac[6] = {0};
    Py_ssize_t dlen = 0, slen = 0;
    if (int_arg(id_o, "backend_id", 0, FP_MAX_BACKENDS - 1, &id) < 0 ||
        bytes_arg(ip_o, "ip", 16, -1, ip) < 0)
        return NULL;
    if (dmac_o != NULL && (dlen = bytes_arg(dmac_o, "dst_mac", 0, 6, dmac)) < 0)
        return NULL;
    if (smac_o != NULL && (slen = bytes_arg(smac_o, "src_mac", 0, 6, smac)) < 0)
        return NULL;
    if (ifi_o != NULL && int_arg(ifi_o, "ifindex", 0, INT32_MAX, &ifindex) < 0)
        return NULL;
    if (mtu_o != NULL && int_arg(mtu_o, "mtu", 0, 0xFFFF, &mtu) < 0)
        return NULL;
    fp_engine *E = &self->e;
    fp_backend *b = E->backends[id];
    if (b == NULL) {
        b = PyMem_RawCalloc(1, sizeof(*b));
        if (b == NULL)
            return PyErr_NoMemory();
        E->backends[id] = b;
    }
    b->id = (uint16_t)id;
    memcpy(b->ip, ip, 16);
    memcpy(b->dst_mac, dmac, 6);
    memcpy(b->src_mac, smac, 6);
    b->ifindex = (int)ifindex;
    b->mtu = (uint32_t)mtu;
    b->has_link = dlen == 6 && slen == 6 && ifindex > 0;
    memcpy(b->outer, dmac, 6);
    memcpy(b->outer + 6, smac, 6);
    fp_put16(b->outer + 12, ETH_P_IPV6);
    uint8_t *ip6 = b->outer + FP_ETH_LEN;
    memset(ip6, 0, 8);
    ip6[0] = 0x60;
    ip6[7] = 64;
    memcpy(ip6 + 8, E->source_ipv6, 16);
    memcpy(ip6 + 24, ip, 16);
    Py_RETURN_NONE;
}

static PyObject *engine_remove_backend(FpEngineObject *self, PyObject *arg) {
    long long id;
    if (check_ready(self) < 0 || int_arg(arg, "backend_id", 0, FP_MAX_BACKENDS - 1, &id) < 0)
        return NULL;
    fp_engine *E = &self->e;
    long long dropped = 0;
    if (E->backends[id] != NULL) {
        for (uint32_t i = 0; i < E->capacity; i++) {
            fp_slot *s = &E->slots[i];
            if (s->family != 0 && s->backend_id == id) {
                fp_slot_clear(E, s);
                dropped++;
            }
        }
        PyMem_RawFree(E->backends[id]);
        E->backends[id] = NULL;
    }
    return PyLong_FromLongLong(dropped);
}

static PyObject *engine_backend_link(FpEngineObject *self, PyObject *arg) {
    long long id;
    if (check_ready(self) < 0 || int_arg(arg, "backend_id", 0, FP_MAX_BACKENDS - 1, &id) < 0)
        return NULL;
    const fp_backend *b = self->e.backends[id];
    if (b == NULL || !b->has_link)
        Py_RETURN_NONE;
    return Py_BuildValue("(iy#y#I)", b->ifindex, (const char *)b->src_mac, (Py_ssize_t)6,
                         (const char *)b->dst_mac, (Py_ssize_t)6, b->mtu);
}

static PyObject *engine_set_maglev(FpEngineObject *self, PyObject *args) {
    PyObject *id_o, *table_o;
    if (!PyArg_ParseTuple(args, "OO:set_maglev", &id_o, &table_o))
        return NULL;
    long long id;
    if (check_ready(self) < 0 || int_arg(id_o, "vip_id", 0, FP_MAX_VIPS - 1, &id) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(table_o, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "table must be bytes, not %.100s",
                     Py_TYPE(table_o)->tp_name);
        return NULL;
    }
    if (view.len % 2 != 0 || (size_t)view.len / 2 > FP_MAX_MAGLEV) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "table must be array('H') bytes of at most %u entries",
                     FP_MAX_MAGLEV);
        return NULL;
    }
    uint16_t *table = NULL;
    uint64_t *members = NULL;
    if (view.len > 0) {
        table = PyMem_RawMalloc((size_t)view.len);
        members = PyMem_RawCalloc(FP_MEMBER_WORDS, sizeof(uint64_t));
        if (table == NULL || members == NULL) {
            PyMem_RawFree(table);
            PyMem_RawFree(members);
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        memcpy(table, view.buf, (size_t)view.len);
        for (size_t i = 0; i < (size_t)view.len / 2; i++) {
            uint16_t bid = table[i];
            if (bid != FP_NO_BACKEND)
                members[bid >> 6] |= (uint64_t)1 << (bid & 63);
        }
    }
    fp_maglev *m = &self->e.maglev[id];
    PyMem_RawFree(m->table);
    PyMem_RawFree(m->members);
    m->table = table;
    m->members = members;
    m->size = (uint32_t)(view.len / 2);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* flow_keys(flows): each flow's Redis key, KEY_PREFIX + its 16-byte mmh3 x64_128 digest over the
 * canonical encoding (flowstate.flow.FiveTuple.key()), so the store does not hash in Python. */
static PyObject *engine_flow_keys(FpEngineObject *self FP_UNUSED, PyObject *flows) {
    PyObject *seq = PySequence_Fast(flows, "flows must be a sequence of flows");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fp_key k;
        uint64_t h[2];
        if (flow_arg(items[i], &k) < 0)
            goto error;
        fp_key_digest(&k, h);
        PyObject *key = PyBytes_FromStringAndSize(NULL, FP_KEY_PREFIX_LEN + 16);
        if (key == NULL)
            goto error;
        uint8_t *b = (uint8_t *)PyBytes_AS_STRING(key);
        memcpy(b, FP_KEY_PREFIX, FP_KEY_PREFIX_LEN);
        for (int j = 0; j < 8; j++) {
            b[FP_KEY_PREFIX_LEN + j] = (uint8_t)(h[0] >> (8 * j));
            b[FP_KEY_PREFIX_LEN + 8 + j] = (uint8_t)(h[1] >> (8 * j));
        }
        PyList_SET_ITEM(out, i, key);
    }
    Py_DECREF(seq);
    return out;
error:
    Py_DECREF(seq);
    Py_DECREF(out); /* unset items are NULL: list dealloc skips them */
    return NULL;
}

static PyObject *engine_maglev_pick(FpEngineObject *self, PyObject *args) {
    PyObject *id_o, *hash_o;
    if (!PyArg_ParseTuple(args, "OO:maglev_pick", &id_o, &hash_o))
        return NULL;
    long long id;
    if (check_ready(self) < 0 || int_arg(id_o, "vip_id", 0, FP_MAX_VIPS - 1, &id) < 0)
        return NULL;
    if (!PyLong_Check(hash_o) || PyBool_Check(hash_o)) {
        PyErr_SetString(PyExc_ValueError, "hash64 must be an int");
        return NULL;
    }
    unsigned long long hash = PyLong_AsUnsignedLongLong(hash_o);
    if (hash == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "hash64 must be in 0..2**64-1");
        return NULL;
    }
    return PyLong_FromLong(maglev_backend(&self->e, (uint8_t)id, hash));
}

/* ---- Engine: packets ------------------------------------------------------------------------- */

static int ensure_frames(FpEngineObject *self, size_t n) {
    if (n <= self->frames_cap)
        return 0;
    size_t cap = n < 256 ? 256 : n;
    fp_frame *f = PyMem_RawRealloc(self->frames, cap * sizeof(fp_frame));
    if (f == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->frames = f;
    self->frames_cap = cap;
    return 0;
}

static PyObject *run_process(FpEngineObject *self, PyObject *frames_o, long long now,
                             PyObject *statuses_o, int forced);

static PyObject *engine_process(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"frames", "now_ms", "statuses", NULL};
    PyObject *frames_o, *now_o, *statuses_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:process", kwlist, &frames_o, &now_o,
                                     &statuses_o))
        return NULL;
    long long now;
    if (check_ready(self) < 0 || int_arg(now_o, "now_ms", 0, INT64_MAX, &now) < 0)
        return NULL;
    return run_process(self, frames_o, now, statuses_o, FP_USE_TABLE);
}

/* process() and forward_to(): one batch of Python frames through engine_batch. */
static PyObject *run_process(FpEngineObject *self, PyObject *frames_o, long long now,
                             PyObject *statuses_o, int forced) {
    /* A tuple keeps every frame alive for the whole batch, whatever the caller's list does. */
    PyObject *frames = PySequence_Tuple(frames_o);
    if (frames == NULL)
        return NULL;
    PyObject *statuses = NULL, *verdicts = NULL, *tx = NULL, *misses = NULL, *events = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(frames), n_views = 0;
    if (statuses_o != Py_None) {
        statuses = PySequence_Tuple(statuses_o);
        if (statuses == NULL)
            goto error;
        if (PyTuple_GET_SIZE(statuses) != n) {
            PyErr_SetString(PyExc_ValueError, "statuses must have one entry per frame");
            goto error;
        }
    }
    if (ensure_frames(self, (size_t)n) < 0)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(frames, i);
        fp_frame *f = &self->frames[i];
        long long status = 0;
        if (statuses != NULL &&
            int_arg(PyTuple_GET_ITEM(statuses, i), "status", 0, UINT32_MAX, &status) < 0)
            goto error;
        f->status = (uint32_t)status;
        f->obj = o;
        Py_ssize_t len;
        if (PyBytes_Check(o)) {
            f->data = (const uint8_t *)PyBytes_AS_STRING(o);
            len = PyBytes_GET_SIZE(o);
        } else {
            if (views == NULL) {
                views = PyMem_RawCalloc((size_t)n, sizeof(Py_buffer));
                if (views == NULL) {
                    PyErr_NoMemory();
                    goto error;
                }
            }
            if (PyObject_GetBuffer(o, &views[n_views], PyBUF_SIMPLE) < 0) {
                PyErr_Format(PyExc_TypeError, "frames[%zd] must be bytes, not %.100s", i,
                             Py_TYPE(o)->tp_name);
                goto error;
            }
            f->data = views[n_views].buf;
            len = views[n_views].len;
            n_views++;
        }
        if (len > (Py_ssize_t)(UINT32_MAX / 2)) {
            PyErr_Format(PyExc_ValueError, "frames[%zd] is too long", i);
            goto error;
        }
        f->len = (uint32_t)len;
    }
    verdicts = PyBytes_FromStringAndSize(NULL, n);
    tx = PyList_New(0);
    misses = PyList_New(0);
    events = PyList_New(0);
    if (verdicts == NULL || tx == NULL || misses == NULL || events == NULL)
        goto error;
    list_sink sink = {{list_sink_tx, list_sink_reply}, tx};
    self->busy = 1;
    int rc = engine_batch(self, self->frames, (size_t)n, (uint64_t)now, &sink.base,
                          (uint8_t *)PyBytes_AS_STRING(verdicts), misses, events, forced);
    self->busy = 0;
    if (rc < 0)
        goto error;
    for (Py_ssize_t i = 0; i < n_views; i++)
        PyBuffer_Release(&views[i]);
    PyMem_RawFree(views);
    Py_XDECREF(statuses);
    Py_DECREF(frames);
    return fp_result_new(verdicts, tx, misses, events);

error:
    for (Py_ssize_t i = 0; i < n_views; i++)
        PyBuffer_Release(&views[i]);
    PyMem_RawFree(views);
    Py_XDECREF(statuses);
    Py_DECREF(frames);
    Py_XDECREF(verdicts);
    Py_XDECREF(tx);
    Py_XDECREF(misses);
    Py_XDECREF(events);
    return NULL;
}

static PyObject *engine_forward_to(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"frames", "backend_id", NULL};
    PyObject *frames_o, *id_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:forward_to", kwlist, &frames_o, &id_o))
        return NULL;
    long long id;
    if (check_ready(self) < 0 || int_arg(id_o, "backend_id", -1, FP_MAX_BACKENDS - 1, &id) < 0)
        return NULL;
    return run_process(self, frames_o, 0, Py_None, (int)id);
}

/* ---- Engine: the table from the slow path ---------------------------------------------------- */

static PyObject *engine_install(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"flow", "backend_id", "now_ms", NULL};
    PyObject *flow_o, *id_o, *now_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:install", kwlist, &flow_o, &id_o, &now_o))
        return NULL;
    fp_key k;
    long long id, now;
    if (check_ready(self) < 0 || flow_arg(flow_o, &k) < 0 ||
        int_arg(id_o, "backend_id", 0, FP_MAX_BACKENDS - 1, &id) < 0 ||
        int_arg(now_o, "now_ms", 0, INT64_MAX, &now) < 0)
        return NULL;
    fp_engine *E = &self->e;
    if (fp_find_service(E, k.family, k.vip_ip, k.vip_port, k.proto) < 0) {
        PyErr_SetString(PyExc_ValueError, "install: the flow's (vip_ip, vip_port, proto) is no VIP");
        return NULL;
    }
    if (E->backends[id] == NULL) {
        PyErr_Format(PyExc_ValueError, "install: backend_id %lld is not configured", id);
        return NULL;
    }
    uint64_t hash = fp_key_hash(&k);
    fp_table_clock(E, (uint64_t)now);
    fp_slot *s = fp_table_lookup(E, &k, hash, (uint64_t)now);
    if (s == NULL) {
        fp_slot old;
        int evicted;
        /* An eviction here has no batch to report it in: it is only counted. */
        s = fp_table_claim(E, &k, hash, (uint64_t)now, &old, &evicted);
    }
    fp_slot_fill(E, s, &k, (uint16_t)id, (uint64_t)now,
                 k.proto == 6 ? E->tcp_idle_ms : E->udp_idle_ms, E->touch_interval_ms);
    E->installs++;
    Py_RETURN_NONE;
}

static PyObject *engine_lookup(FpEngineObject *self, PyObject *flow_o) {
    fp_key k;
    if (check_ready(self) < 0 || flow_arg(flow_o, &k) < 0)
        return NULL;
    const fp_engine *E = &self->e;
    /* No clock here: the entry is reported even if it has expired but was not swept yet. */
    const fp_slot *best = fp_table_find(E, &k, fp_key_hash(&k));
    if (best == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(iiK)", (int)best->backend_id, (int)best->state,
                         (unsigned long long)fp_slot_expires(E, best));
}

static PyObject *engine_expire(FpEngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"now_ms", "budget", NULL};
    PyObject *now_o, *budget_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:expire", kwlist, &now_o, &budget_o))
        return NULL;
    long long now, budget;
    if (check_ready(self) < 0 || int_arg(now_o, "now_ms", 0, INT64_MAX, &now) < 0 ||
        int_arg(budget_o, "budget", 0, INT64_MAX, &budget) < 0)
        return NULL;
    fp_engine *E = &self->e;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (budget > E->capacity)
        budget = E->capacity;
    fp_table_clock(E, (uint64_t)now);
    for (long long i = 0; i < budget; i++) {
        fp_slot *s = &E->slots[E->hand];
        E->hand = E->hand + 1 == E->capacity ? 0 : E->hand + 1;
        if (s->family == 0 || fp_slot_expires(E, s) > (uint64_t)now)
            continue;
        PyObject *flow = flow_tuple(s);
        if (flow == NULL || PyList_Append(out, flow) < 0) {
            Py_XDECREF(flow);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(flow);
        fp_slot_clear(E, s);
        E->expired++;
    }
    return out;
}

static int put_counter(PyObject *d, const char *name, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, name, o);
    Py_DECREF(o);
    return rc;
}

static PyObject *engine_counters(FpEngineObject *self, PyObject *unused FP_UNUSED) {
    if (check_ready(self) < 0)
        return NULL;
    const fp_engine *E = &self->e;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int v = 0; v < V_COUNT; v++) {
        if (verdict_names[v] != NULL && put_counter(d, verdict_names[v], E->verdicts[v]) < 0)
            goto error;
    }
    if (put_counter(d, "flows", E->n_flows) < 0 || put_counter(d, "capacity", E->capacity) < 0 ||
        put_counter(d, "evicted", E->evictions) < 0 ||
        put_counter(d, "expired", E->expired) < 0 ||
        put_counter(d, "installs", E->installs) < 0 ||
        put_counter(d, "forward_to", E->forward_to) < 0 ||
        put_counter(d, "vips", E->n_vips) < 0 ||
        put_counter(d, "tx_packets", E->tx_packets) < 0 ||
        put_counter(d, "tx_bytes", E->tx_bytes) < 0 ||
        put_counter(d, "tx_errors", E->tx_errors) < 0 ||
        put_counter(d, "table_hugepages", (uint64_t)E->table_hugepages) < 0 ||
        put_counter(d, "table_madvise_errno", (uint64_t)E->table_madvise_errno) < 0)
        goto error;
    return d;
error:
    Py_DECREF(d);
    return NULL;
}

static Py_ssize_t engine_len(FpEngineObject *self) { return (Py_ssize_t)self->e.n_flows; }

static PyObject *engine_capacity(FpEngineObject *self, void *closure FP_UNUSED) {
    return PyLong_FromUnsignedLong(self->e.capacity);
}

static PyMethodDef engine_methods[] = {
    {"set_vip", (PyCFunction)(void (*)(void))engine_set_vip, METH_VARARGS | METH_KEYWORDS,
     "set_vip(vip_id, ip, port, proto, *, udp_lookup_first=False): serve (ip, port, proto) as "
     "VIP vip_id (0..255)."},
    {"remove_vip", (PyCFunction)engine_remove_vip, METH_O,
     "remove_vip(vip_id) -> int: forget the VIP and its Maglev table, drop its flows."},
    {"set_backend", (PyCFunction)(void (*)(void))engine_set_backend, METH_VARARGS | METH_KEYWORDS,
     "set_backend(backend_id, ip, *, dst_mac=b'', src_mac=b'', ifindex=0, mtu=0)."},
    {"remove_backend", (PyCFunction)engine_remove_backend, METH_O,
     "remove_backend(backend_id) -> int: forget the backend, drop the flows pinned to it."},
    {"backend_link", (PyCFunction)engine_backend_link, METH_O,
     "backend_link(backend_id) -> (ifindex, src_mac, dst_mac, mtu) or None (no link info)."},
    {"set_maglev", (PyCFunction)engine_set_maglev, METH_VARARGS,
     "set_maglev(vip_id, table): array('H') bytes of backend ids; b'' = no backend."},
    {"flow_keys", (PyCFunction)engine_flow_keys, METH_O,
     "flow_keys(flows) -> list of each flow's Redis key (FiveTuple.key())."},
    {"maglev_pick", (PyCFunction)engine_maglev_pick, METH_VARARGS,
     "maglev_pick(vip_id, hash64) -> backend_id or -1."},
    {"process", (PyCFunction)(void (*)(void))engine_process, METH_VARARGS | METH_KEYWORDS,
     "process(frames, now_ms, statuses=None) -> Result: run one batch of Ethernet frames."},
    {"forward_to", (PyCFunction)(void (*)(void))engine_forward_to, METH_VARARGS | METH_KEYWORDS,
     "forward_to(frames, backend_id) -> Result: tunnel the frames to a backend, table untouched."},
    {"install", (PyCFunction)(void (*)(void))engine_install, METH_VARARGS | METH_KEYWORDS,
     "install(flow, backend_id, now_ms): insert or overwrite the flow as ESTABLISHED."},
    {"lookup", (PyCFunction)engine_lookup, METH_O,
     "lookup(flow) -> (backend_id, state, expires_ms) or None."},
    {"expire", (PyCFunction)(void (*)(void))engine_expire, METH_VARARGS | METH_KEYWORDS,
     "expire(now_ms, budget) -> list of flows: advance the clock hand over `budget` slots."},
    {"counters", (PyCFunction)engine_counters, METH_NOARGS,
     "counters() -> dict: every verdict name and table/TX statistics."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"capacity", (getter)engine_capacity, NULL, "flow table slots (a multiple of 8)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods engine_as_sequence = {
    .sq_length = (lenfunc)engine_len,
};

PyTypeObject FpEngine_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forwarder._fastpath.Engine",
    .tp_basicsize = sizeof(FpEngineObject),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_as_sequence = &engine_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C data-path engine (forwarder/DATAPATH.md).",
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
    .tp_init = (initproc)engine_init,
    .tp_new = PyType_GenericNew,
};

int fp_engine_module_init(PyObject *module) {
    if (PyStructSequence_InitType2(&FpResult_Type, &result_desc) < 0)
        return -1;
    if (PyType_Ready(&FpEngine_Type) < 0)
        return -1;
    /* A class attribute, like the Python reference's: bytes per flow table slot. */
    PyObject *entry_size = PyLong_FromSize_t(sizeof(fp_slot));
    if (entry_size == NULL)
        return -1;
    int rc = PyDict_SetItemString(FpEngine_Type.tp_dict, "entry_size", entry_size);
    Py_DECREF(entry_size);
    if (rc < 0)
        return -1;
    PyType_Modified(&FpEngine_Type);
    if (PyModule_AddObjectRef(module, "Engine", (PyObject *)&FpEngine_Type) < 0 ||
        PyModule_AddObjectRef(module, "Result", (PyObject *)&FpResult_Type) < 0)
        return -1;
    PyObject *names = PyDict_New();
    if (names == NULL)
        return -1;
    for (int v = 0; v < V_COUNT; v++) {
        if (verdict_names[v] == NULL)
            continue;
        PyObject *code = PyLong_FromLong(v);
        if (code == NULL || PyDict_SetItemString(names, verdict_names[v], code) < 0) {
            Py_XDECREF(code);
            Py_DECREF(names);
            return -1;
        }
        Py_DECREF(code);
    }
    if (PyModule_AddObject(module, "VERDICTS", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "REPLY", FP_REPLY) < 0 ||
        PyModule_AddIntConstant(module, "ENTRY_SIZE", (long)sizeof(fp_slot)) < 0 ||
        PyModule_AddIntConstant(module, "MAX_CAPACITY", FP_MAX_CAPACITY) < 0 ||
        PyModule_AddIntConstant(module, "ICMP_BUDGET", FP_ICMP_BUDGET) < 0)
        return -1;
    return 0;
}
