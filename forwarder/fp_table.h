/* The flow table: fixed memory, buckets of 8 one-cache-line slots, TTL + LRU-in-bucket eviction.
 *
 * DATAPATH.md "Flow table": bucket = hash64 % n_buckets; a slot whose expires_ms <= now is
 * absent; insert takes the first free (empty or expired) slot of the bucket, else evicts the
 * slot seen least recently (ties: lowest index). Lookups compare the whole key.
 */
#ifndef FP_TABLE_H
#define FP_TABLE_H

#include "fp_engine.h"
#include "fp_mmh3.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FP_KEY_W0_MASK 0x0000FFFFFFFFFFFFull /* ports, proto, family; not state/reserved */
#else
#define FP_KEY_W0_MASK 0xFFFFFFFFFFFF0000ull
#endif

static inline void fp_key_set(fp_key *k, uint8_t family, uint8_t proto, const uint8_t *client_ip,
                              uint16_t client_port, const uint8_t *vip_ip, uint16_t vip_port) {
    size_t alen = family == 4 ? 4 : 16;
    memset(k, 0, sizeof(*k));
    k->client_port = client_port;
    k->vip_port = vip_port;
    k->proto = proto;
    k->family = family;
    memcpy(k->client_ip, client_ip, alen);
    memcpy(k->vip_ip, vip_ip, alen);
}

/* hash64 of a flow: h1 of mmh3 x64_128 over the canonical encoding (flowstate.flow.encode). */
static inline uint64_t fp_key_hash(const fp_key *k) {
    uint8_t buf[38];
    size_t alen = k->family == 4 ? 4 : 16;
    uint64_t out[2];
    buf[0] = k->family;
    buf[1] = k->proto;
    buf[2] = (uint8_t)(k->client_port >> 8);
    buf[3] = (uint8_t)k->client_port;
    buf[4] = (uint8_t)(k->vip_port >> 8);
    buf[5] = (uint8_t)k->vip_port;
    memcpy(buf + 6, k->client_ip, alen);
    memcpy(buf + 6 + alen, k->vip_ip, alen);
    fp_mmh3_x64_128(buf, 6 + 2 * alen, FP_HASH_SEED, out);
    return out[0];
}

static inline int fp_key_eq(const fp_slot *s, const fp_key *k) {
    uint64_t a, b;
    memcpy(&a, s, 8);
    memcpy(&b, k, 8);
    if ((a ^ b) & FP_KEY_W0_MASK)
        return 0;
    return memcmp((const uint8_t *)s + 8, (const uint8_t *)k + 8, 32) == 0;
}

static inline fp_slot *fp_bucket(const fp_engine *E, uint64_t hash) {
    return E->slots + (size_t)(hash % E->n_buckets) * FP_BUCKET_SLOTS;
}

/* The live slot holding `k`, or NULL. */
static inline fp_slot *fp_table_lookup(const fp_engine *E, const fp_key *k, uint64_t hash,
                                       uint64_t now) {
    fp_slot *b = fp_bucket(E, hash);
    for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
        if (fp_key_eq(&b[i], k) && b[i].expires_ms > now)
            return &b[i];
    }
    return NULL;
}

/* A slot to write `k` into (DATAPATH.md clarification 5): the slot already holding `k`
 * (expired or not), else the first empty or expired slot, else the least recently seen one,
 * whose old contents are copied to *evicted with *did_evict = 1. The caller fills the slot. */
static inline fp_slot *fp_table_claim(fp_engine *E, const fp_key *k, uint64_t hash, uint64_t now,
                                      fp_slot *evicted, int *did_evict) {
    fp_slot *b = fp_bucket(E, hash);
    *did_evict = 0;
    for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
        if (fp_key_eq(&b[i], k))
            return &b[i];
    }
    for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
        if (b[i].family == 0) {
            E->n_flows++;
            return &b[i];
        }
        if (b[i].expires_ms <= now)
            return &b[i];
    }
    /* Signed 32-bit ages: exact for every live slot (see fp_slot), and a slot stamped "after"
     * now (a caller whose clock went back) counts as the most recent, as 64-bit values would. */
    uint32_t now32 = (uint32_t)now;
    int oldest = 0;
    int32_t oldest_age = (int32_t)(now32 - b[0].last_seen32);
    for (int i = 1; i < FP_BUCKET_SLOTS; i++) {
        int32_t age = (int32_t)(now32 - b[i].last_seen32);
        if (age > oldest_age) {
            oldest = i;
            oldest_age = age;
        }
    }
    *evicted = b[oldest];
    *did_evict = 1;
    E->evictions++;
    return &b[oldest];
}

static inline void fp_slot_fill(fp_slot *s, const fp_key *k, uint16_t backend_id, uint64_t now,
                                uint32_t idle_ms, uint32_t touch_interval_ms) {
    memcpy(s, k, sizeof(*k));
    s->state = ST_ESTABLISHED;
    s->backend_id = backend_id;
    s->reserved1 = 0;
    s->last_seen32 = (uint32_t)now;
    s->expires_ms = now + idle_ms;
    s->touch_due_ms = now + touch_interval_ms;
}

static inline void fp_slot_clear(fp_engine *E, fp_slot *s) {
    memset(s, 0, sizeof(*s));
    E->n_flows--;
}

#endif /* FP_TABLE_H */
