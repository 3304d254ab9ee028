/* The C data-path engine: shared types of forwarder/_fastpath (see forwarder/DATAPATH.md).
 *
 * fp_engine.c holds the Python `Engine`, fp_ring.c the `PacketRing`; both drive the same
 * per-batch loop (`fp_engine_batch`) and differ only in the sink that receives the output.
 */
#ifndef FP_ENGINE_H
#define FP_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <assert.h>
#include <stddef.h>
#include <stdint.h>

/* ---- verdicts and events (DATAPATH.md tables) ---------------------------------------------- */
enum {
    V_FORWARD = 0,
    V_NEW = 1,
    V_MISS = 2,
    V_PASS_NOT_IP = 3,
    V_PASS_NOT_VIP = 4,
    V_PASS_NOT_SERVICE = 5,
    V_REPLY_TOO_BIG = 6,
    V_DROP_ETH_SHORT = 10,
    V_DROP_IP4_SHORT = 11,
    V_DROP_IP4_VERSION = 12,
    V_DROP_IP4_IHL = 13,
    V_DROP_IP4_LENGTH = 14,
    V_DROP_IP6_SHORT = 15,
    V_DROP_IP6_VERSION = 16,
    V_DROP_IP6_LENGTH = 17,
    V_DROP_IP6_EXT = 18,
    V_DROP_FRAGMENT = 19,
    V_DROP_L4_SHORT = 20,
    V_DROP_ICMP_SHORT = 21,
    V_DROP_ICMP_BAD_QUOTE = 22,
    V_DROP_NO_BACKEND = 23,
    V_DROP_NO_ROUTE = 24,
    V_DROP_TOO_BIG = 25,
    V_COUNT = 26,
    /* internal: parsed, a configured service; go on to the too-big check and the table */
    V_OURS = 255,
};

enum { EV_NEW = 1, EV_CLOSE = 2, EV_TOUCH = 3, EV_EVICTED = 4 };
enum { ST_ESTABLISHED = 1, ST_CLOSING = 2 };

#define FP_UNUSED __attribute__((unused))
#define FP_REPLY (-1)
#define FP_USE_TABLE (-2) /* batch mode: the flow table decides (forward_to() passes a backend) */
enum { FP_MISS_PACKET = 0, FP_MISS_ICMP = 1 }; /* last element of a `misses` item */
#define FP_HASH_SEED 0x666C6F77u
/* flowstate.flow.KEY_PREFIX: a flow's Redis key is this + its 16-byte digest (flow_keys). */
#define FP_KEY_PREFIX "fs1:"
#define FP_KEY_PREFIX_LEN 4
#define FP_BUCKET_SLOTS 8
#define FP_MAX_CAPACITY (1u << 24)
#define FP_MAX_VIPS 256
#define FP_MAX_BACKENDS 0xFFFF /* ids 0..65534; 0xFFFF is Maglev's "no backend" */
#define FP_NO_BACKEND 0xFFFF
#define FP_MAX_MAGLEV (1u << 24)
#define FP_MAX_TIMEOUT_MS 0x7FFFFFFFu /* keeps 32-bit last_seen ages exact (see fp_slot) */
#define FP_ICMP_BUDGET 100
#define FP_ENCAP_LEN 40
#define FP_ETH_LEN 14
#define FP_OUTER_LEN (FP_ETH_LEN + FP_ENCAP_LEN)
#define FP_IPV6_MIN_MTU 1280
#define FP_REPLY_MAX 1536 /* 22 (Ethernet + 2 tags) + 40 + 8 + 1232 quoted bytes fits */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define FP_STATUS_CSUMNOTREADY 0x8u

/* ---- flow table ----------------------------------------------------------------------------
 * A slot is 48 bytes (DATAPATH.md "Flow table", slot layout): the key (first 6 bytes + both
 * addresses, compared as five 64-bit words with the state bits masked out), backend_id and two
 * 32-bit times.
 * - exp32 = expires_ms - E->epoch: the engine keeps every stored expiry within [epoch, epoch +
 *   2**32) and now within [epoch, epoch + 2**31) (fp_table_clock), so expiry stays exact.
 * - last_seen is not stored for an ESTABLISHED slot: every write of one sets expires = last_seen
 *   + idle(proto), so last_seen = expires - idle. aux32 holds the low 32 bits of touch_due_ms
 *   (ESTABLISHED; CLOSING never touches) or of last_seen (CLOSING; its expires is fixed at
 *   close + linger). Both are compared as signed 32-bit differences to now: a live slot's
 *   touch_due/last_seen is within max(idle, linger, touch_interval) <= FP_MAX_TIMEOUT_MS of now.
 */
typedef struct fp_slot {
    uint16_t client_port; /* host order */
    uint16_t vip_port;
    uint8_t proto; /* 6 or 17 */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint8_t family : 4; /* 0 = empty slot, 4 or 6 (low nibble either way) */
    uint8_t state : 4;  /* ST_ESTABLISHED or ST_CLOSING */
#else
    uint8_t state : 4;
    uint8_t family : 4;
#endif
    uint16_t backend_id;
    uint8_t client_ip[16]; /* IPv4: 4 bytes then zeros */
    uint8_t vip_ip[16];
    uint32_t aux32; /* touch_due (ESTABLISHED) or last_seen (CLOSING), low 32 bits */
    uint32_t exp32; /* expires_ms - epoch */
} fp_slot;

_Static_assert(sizeof(fp_slot) == 48, "a flow table slot is 48 bytes (DATAPATH.md)");
_Static_assert(offsetof(fp_slot, client_ip) == 8, "key word 0 is the first 8 bytes");
_Static_assert(offsetof(fp_slot, aux32) == 40, "key and backend_id are the first 40 bytes");

/* A lookup key laid out like the first 40 bytes of a slot (state bits and backend_id zero). */
typedef struct fp_key {
    uint16_t client_port;
    uint16_t vip_port;
    uint8_t proto;
    uint8_t family;
    uint8_t zero[2];
    uint8_t client_ip[16];
    uint8_t vip_ip[16];
} fp_key;
_Static_assert(sizeof(fp_key) == 40, "fp_key mirrors the slot's key bytes");

/* ---- configuration ------------------------------------------------------------------------- */
typedef struct fp_vip {
    uint8_t in_use;
    uint8_t family;
    uint8_t proto;
    uint8_t udp_lookup_first; /* a UDP datagram of an unknown flow is a MISS, not a flow start */
    uint16_t port;
    uint8_t ip[16];
} fp_vip;

#define FP_MEMBER_WORDS (65536 / 64)

typedef struct fp_maglev {
    uint16_t *table;   /* backend ids */
    uint64_t *members; /* FP_MEMBER_WORDS: bit b set iff backend b is in `table` (not 0xFFFF) */
    uint32_t size;
} fp_maglev;

#define FP_ADDR_SLOTS 1024 /* power of two, >= 4 x FP_MAX_VIPS */
#define FP_SVC_SLOTS 1024

typedef struct fp_addr_slot {
    uint8_t used;
    uint8_t family;
    uint8_t ip[16];
} fp_addr_slot;

typedef struct fp_svc_slot {
    uint8_t used;
    uint8_t family;
    uint8_t proto;
    uint8_t vip_id;
    uint16_t port;
    uint8_t ip[16];
} fp_svc_slot;

typedef struct fp_backend {
    uint16_t id;
    uint8_t ip[16];
    uint8_t has_link;
    uint8_t dst_mac[6];
    uint8_t src_mac[6];
    int ifindex;
    uint32_t mtu; /* 0 = not set */
    /* Ethernet (dst, src, 0x86DD) + IPv6 (version, hop limit, source, destination): the
     * constant part of every frame sent to this backend. */
    uint8_t outer[FP_OUTER_LEN];
} fp_backend;

typedef struct fp_engine {
    fp_slot *slots;
    size_t slots_bytes; /* the mapping's length (munmap) */
    /* 1 if the table is madvise(MADV_HUGEPAGE)d, 0 if smaller than a huge page or madvise
     * failed (then table_madvise_errno is its errno): counters() table_hugepages. */
    int table_hugepages, table_madvise_errno;
    uint32_t capacity;
    uint32_t n_buckets;
    uint32_t hand; /* expire() clock hand */
    uint64_t n_flows;
    uint64_t epoch; /* slots store expires_ms - epoch (fp_table_clock) */

    uint8_t source_ipv6[16];
    uint32_t tcp_idle_ms, udp_idle_ms, fin_linger_ms, touch_interval_ms, tunnel_mtu;

    fp_vip vips[FP_MAX_VIPS];
    fp_maglev maglev[FP_MAX_VIPS];
    fp_addr_slot addrs[FP_ADDR_SLOTS];
    fp_svc_slot svcs[FP_SVC_SLOTS];
    uint32_t n_vips;
    fp_backend **backends; /* FP_MAX_BACKENDS pointers */

    uint64_t verdicts[V_COUNT];
    uint64_t evictions, expired, installs, tx_packets, tx_bytes, tx_errors;
    uint64_t forward_to; /* frames encapsulated by forward_to() */
    uint32_t icmp_budget; /* answers left in the current batch */
} fp_engine;

/* One parsed packet, as the table stage and the sinks see it. */
typedef struct fp_pkt {
    const uint8_t *frame;
    uint32_t frame_len;
    uint32_t status;
    uint32_t l3_off; /* offset of the IP header in the frame */
    uint32_t l3_len; /* IP total length (padding trimmed) */
    uint32_t l4_off; /* offset of the TCP/UDP/ICMP header in the frame */
    uint8_t family;  /* 4 or 6 */
    uint8_t tc;      /* IPv4 TOS / IPv6 traffic class */
    uint8_t is_icmp; /* an ICMP error about `key` */
    uint8_t tcp_flags;
    uint8_t vip_id;
    int32_t csum_off;  /* frame offset of the L4 checksum to complete, -1: none */
    uint16_t csum_val; /* the completed checksum, native order (memcpy into place) */
    uint64_t hash64;
    fp_key key;
} fp_pkt;

/* One input frame of a batch. `obj` is the Python bytes it came from, or NULL (ring). */
typedef struct fp_frame {
    const uint8_t *data;
    uint32_t len;
    uint32_t status;
    PyObject *obj;
} fp_frame;

/* Where a batch's output goes. Both callbacks return the frame's final verdict, or -1 with a
 * Python exception set. */
typedef struct fp_sink fp_sink;
struct fp_sink {
    int (*tx)(fp_sink *sink, fp_engine *E, const fp_pkt *p, const fp_backend *b, int verdict,
              uint32_t index);
    int (*reply)(fp_sink *sink, fp_engine *E, const uint8_t *frame, uint32_t len, uint32_t index);
};

typedef struct {
    PyObject_HEAD
    fp_engine e;
    int busy; /* re-entrancy guard: a batch is running */
    fp_frame *frames;
    size_t frames_cap;
} FpEngineObject;

extern PyTypeObject FpEngine_Type;
extern PyTypeObject FpResult_Type;
extern PyTypeObject FpRing_Type;

int fp_engine_module_init(PyObject *module);
int fp_ring_module_init(PyObject *module);

/* Run one batch: verdicts[i] for frames[i]; misses/events are appended to the lists. */
int fp_engine_batch(FpEngineObject *self, const fp_frame *frames, size_t n, uint64_t now,
                    fp_sink *sink, uint8_t *verdicts, PyObject *misses, PyObject *events);

/* ICMP too-big answer for `p` with the given next-hop MTU into `out` (FP_REPLY_MAX bytes).
 * Returns its length. */
uint32_t fp_build_too_big(const fp_pkt *p, uint32_t mtu, uint8_t *out);

/* Outer Ethernet + IPv6 header for `p` to backend `b` (FP_OUTER_LEN bytes). */
void fp_write_outer(uint8_t *out, const fp_backend *b, const fp_pkt *p);

PyObject *fp_result_new(PyObject *verdicts, PyObject *tx, PyObject *misses, PyObject *events);

#endif /* FP_ENGINE_H */
