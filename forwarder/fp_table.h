/* The flow table: fixed memory, 48-byte slots in buckets of 8, two candidate buckets per flow,
 * TTL + LRU eviction.
 *
 * DATAPATH.md "Flow table": a flow lives in bucket b1 = hash64 % n_buckets or b2 =
 * (fp_mix64(hash64) * n_buckets) >> 64; a slot whose expires_ms <= now is absent; insert reuses the
 * slot holding the key, else takes the first free (empty or expired) slot of the candidate
 * bucket with more free slots (ties: b1), else evicts the slot of both buckets seen least
 * recently (ties: b1 first, lowest index). Lookups compare the whole key.
 */
#ifndef FP_TABLE_H
#define FP_TABLE_H

#include "fp_engine.h"
#include "fp_mmh3.h"

/* Key word 0: ports, proto and the family nibble; not the state nibble nor backend_id. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FP_KEY_W0_MASK 0x00000FFFFFFFFFFFull
#else
#define FP_KEY_W0_MASK 0xFFFFFFFFFF0F0000ull
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

/* mmh3 x64_128 (h1, h2) of a flow's canonical encoding (flowstate.flow.FiveTuple.digest()). */
static inline void fp_key_digest(const fp_key *k, uint64_t out[2]) {
    uint8_t buf[38];
    size_t alen = k->family == 4 ? 4 : 16;
    buf[0] = k->family;
    buf[1] = k->proto;
    buf[2] = (uint8_t)(k->client_port >> 8);
    buf[3] = (uint8_t)k->client_port;
    buf[4] = (uint8_t)(k->vip_port >> 8);
    buf[5] = (uint8_t)k->vip_port;
    memcpy(buf + 6, k->client_ip, alen);
    memcpy(buf + 6 + alen, k->vip_ip, alen);
    fp_mmh3_x64_128(buf, 6 + 2 * alen, FP_HASH_SEED, out);
}

/* hash64 of a flow: h1 of mmh3 x64_128 over the canonical encoding (flowstate.flow.encode). */
static inline uint64_t fp_key_hash(const fp_key *k) {
    uint64_t out[2];
    fp_key_digest(k, out);
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

/* MurmurHash3's 64-bit finalizer: the second bucket's index comes from it. */
static inline uint64_t fp_mix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDull;
    k ^= k >> 33;
    k *= 0xC4CEB9FE1A85EC53ull;
    k ^= k >> 33;
    return k;
}

/* The candidate buckets of a flow: b[0] = b1; b[1] = b2, or NULL when b2 == b1. b2 is
 * (mix64(hash64) * n_buckets) >> 64: a multiplication, where a second 64-bit division would
 * cost tens of cycles per packet. */
static inline void fp_buckets(const fp_engine *E, uint64_t hash, fp_slot *b[2]) {
    uint32_t i1 = (uint32_t)(hash % E->n_buckets);
    uint32_t i2 = (uint32_t)(((unsigned __int128)fp_mix64(hash) * E->n_buckets) >> 64);
    b[0] = E->slots + (size_t)i1 * FP_BUCKET_SLOTS;
    b[1] = i2 == i1 ? NULL : E->slots + (size_t)i2 * FP_BUCKET_SLOTS;
}

/* Prefetch the first two cache lines (slots 0..2) of both candidate buckets: inserts take the
 * lowest free slots, so that is where most hits are (fp_table_find reads both in step).
 * always_inline: as a separate function GCC finds it has no side effects (prefetches do not
 * count) and deletes the call. */
__attribute__((always_inline)) static inline void fp_table_prefetch(const fp_engine *E,
                                                                    uint64_t hash) {
    fp_slot *b[2];
    fp_buckets(E, hash, b);
    for (int j = 0; j < 2 && b[j] != NULL; j++) {
        __builtin_prefetch(b[j], 1, 3);
        __builtin_prefetch((const uint8_t *)b[j] + 64, 1, 3);
    }
}

/* The slot holding `k`, expired or not, or NULL (a key is never in the table twice). Both
 * buckets are read in step (slot i of b1, then slot i of b2), so a hit in a lightly loaded b2
 * does not first read all six cache lines of b1. */
static inline fp_slot *fp_table_find(const fp_engine *E, const fp_key *k, uint64_t hash) {
    fp_slot *b[2];
    fp_buckets(E, hash, b);
    if (b[1] == NULL) {
        for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
            if (fp_key_eq(&b[0][i], k))
                return &b[0][i];
        }
        return NULL;
    }
    for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
        if (fp_key_eq(&b[0][i], k))
            return &b[0][i];
        if (fp_key_eq(&b[1][i], k))
            return &b[1][i];
    }
    return NULL;
}

static inline uint64_t fp_slot_expires(const fp_engine *E, const fp_slot *s) {
    return E->epoch + s->exp32;
}

/* `t` within [epoch, epoch + 2**32): any now + timeout after fp_table_clock(E, now). */
static inline void fp_slot_set_expires(const fp_engine *E, fp_slot *s, uint64_t t) {
    s->exp32 = (uint32_t)(t - E->epoch);
}

#define FP_EPOCH_SPAN (1ull << 31) /* now stays within [epoch, epoch + FP_EPOCH_SPAN) */
#define FP_EPOCH_LEAD (1ull << 30) /* a new epoch is now - FP_EPOCH_LEAD (or 0) */

/* Keep `now` within [epoch, epoch + 2**31), so that now + any timeout (< 2**31) fits the 32-bit
 * exp32. Else move the epoch to max(0, now - 2**30) (DATAPATH.md clarification 7): slots whose
 * expiry then falls outside [epoch, epoch + 2**32) are cleared without being reported (they
 * expired at least 2**30 ms ago and were never swept, or lie 2**31 ms or more in the future of
 * a clock that went back). One pass over the table every 2**30 ms (12.4 days) of a running
 * clock. Called before the table is read with a new now: process (table stage), install and
 * expire. */
static inline void fp_table_clock(fp_engine *E, uint64_t now) {
    if (now >= E->epoch && now - E->epoch < FP_EPOCH_SPAN)
        return;
    uint64_t epoch = now >= FP_EPOCH_LEAD ? now - FP_EPOCH_LEAD : 0;
    for (uint32_t i = 0; i < E->capacity; i++) {
        fp_slot *s = &E->slots[i];
        if (s->family == 0)
            continue;
        uint64_t t = E->epoch + s->exp32;
        if (t < epoch || t - epoch > UINT32_MAX) {
            memset(s, 0, sizeof(*s));
            E->n_flows--;
        } else {
            s->exp32 = (uint32_t)(t - epoch);
        }
    }
    E->epoch = epoch;
}

/* The live slot holding `k`, or NULL. */
static inline fp_slot *fp_table_lookup(const fp_engine *E, const fp_key *k, uint64_t hash,
                                       uint64_t now) {
    fp_slot *s = fp_table_find(E, k, hash);
    return s != NULL && fp_slot_expires(E, s) > now ? s : NULL;
}

static inline uint32_t fp_idle_ms(const fp_engine *E, uint8_t proto) {
    return proto == 6 ? E->tcp_idle_ms : E->udp_idle_ms;
}

/* now - last_seen of a live slot (negative if the caller's clock went back): ESTABLISHED
 * slots were last seen at expires - idle, CLOSING ones keep it in aux32. */
static inline int64_t fp_slot_age(const fp_engine *E, const fp_slot *s, uint64_t now) {
    if (s->state == ST_CLOSING)
        return (int32_t)((uint32_t)now - s->aux32);
    return (int64_t)(now - (fp_slot_expires(E, s) - fp_idle_ms(E, s->proto)));
}

/* A slot to write `k` into (DATAPATH.md clarification 5): the slot already holding `k`
 * (expired or not), else the first free (empty or expired) slot of the candidate bucket with
 * more free slots (ties: b1), else the least recently seen slot of both buckets (ties: b1
 * first, then the lowest index), whose old contents are copied to *evicted with
 * *did_evict = 1. The caller fills the slot. */
static inline fp_slot *fp_table_claim(fp_engine *E, const fp_key *k, uint64_t hash, uint64_t now,
                                      fp_slot *evicted, int *did_evict) {
    fp_slot *b[2];
    fp_slot *first_free[2] = {NULL, NULL};
    int n_free[2] = {0, 0};
    *did_evict = 0;
    fp_buckets(E, hash, b);
    for (int j = 0; j < 2 && b[j] != NULL; j++) {
        for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
            fp_slot *s = &b[j][i];
            if (fp_key_eq(s, k))
                return s;
            if (s->family == 0 || fp_slot_expires(E, s) <= now) {
                if (first_free[j] == NULL)
                    first_free[j] = s;
                n_free[j]++;
            }
        }
    }
    fp_slot *s = n_free[1] > n_free[0] ? first_free[1] : first_free[0];
    if (s != NULL) {
        if (s->family == 0)
            E->n_flows++;
        return s;
    }
    fp_slot *oldest = b[0];
    int64_t oldest_age = fp_slot_age(E, oldest, now);
    for (int j = 0; j < 2 && b[j] != NULL; j++) {
        for (int i = 0; i < FP_BUCKET_SLOTS; i++) {
            int64_t age = fp_slot_age(E, &b[j][i], now);
            if (age > oldest_age) {
                oldest = &b[j][i];
                oldest_age = age;
            }
        }
    }
    *evicted = *oldest;
    *did_evict = 1;
    E->evictions++;
    return oldest;
}

static inline void fp_slot_fill(const fp_engine *E, fp_slot *s, const fp_key *k,
                                uint16_t backend_id, uint64_t now, uint32_t idle_ms,
                                uint32_t touch_interval_ms) {
    memcpy(s, k, sizeof(*k));
    s->state = ST_ESTABLISHED;
    s->backend_id = backend_id;
    s->aux32 = (uint32_t)(now + touch_interval_ms);
    fp_slot_set_expires(E, s, now + idle_ms);
}

/* A TCP/UDP hit: last_seen = now (stored only for CLOSING slots, see fp_slot). */
static inline void fp_slot_seen(fp_slot *s, uint64_t now) {
    if (s->state == ST_CLOSING)
        s->aux32 = (uint32_t)now;
}

/* FIN/RST on an ESTABLISHED slot seen now. */
static inline void fp_slot_close(const fp_engine *E, fp_slot *s, uint64_t now,
                                 uint32_t linger_ms) {
    s->state = ST_CLOSING;
    fp_slot_set_expires(E, s, now + linger_ms);
    s->aux32 = (uint32_t)now;
}

/* An ESTABLISHED slot's touch is due (now >= touch_due); if so, the next one is set. */
static inline int fp_slot_touch(fp_slot *s, uint64_t now, uint32_t touch_interval_ms) {
    if ((int32_t)((uint32_t)now - s->aux32) < 0)
        return 0;
    s->aux32 = (uint32_t)(now + touch_interval_ms);
    return 1;
}

static inline void fp_slot_clear(fp_engine *E, fp_slot *s) {
    memset(s, 0, sizeof(*s));
    E->n_flows--;
}

#endif /* FP_TABLE_H */
