/* Packet parsing of the fast path: Ethernet/VLAN -> IPv4/IPv6 (+ext headers) -> TCP/UDP/ICMP.
 *
 * `fp_classify` applies DATAPATH.md "Parsing" in order and returns the first failing check's
 * verdict, or V_OURS with `p` filled (flow key, hash, offsets) for a configured service.
 * It never reads outside [frame, frame + frame_len).
 */
#ifndef FP_PACKET_H
#define FP_PACKET_H

#include "fp_csum.h"
#include "fp_engine.h"
#include "fp_table.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define MAX_VLAN_TAGS 2
#define MAX_EXT_HEADERS 8

/* ---- VIP address and service lookup (open addressing, rebuilt on every config change) ---- */

static inline uint32_t fp_addr_hash(uint8_t family, const uint8_t *ip) {
    uint32_t w[4] = {0, 0, 0, 0};
    memcpy(w, ip, family == 4 ? 4 : 16);
    uint32_t h = (w[0] * 0x9E3779B1u) ^ (w[1] * 0x85EBCA77u) ^ (w[2] * 0xC2B2AE3Du) ^
                 (w[3] * 0x27D4EB2Fu) ^ family;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 13;
    return h;
}

static inline int fp_is_vip_addr(const fp_engine *E, uint8_t family, const uint8_t *ip) {
    size_t alen = family == 4 ? 4 : 16;
    uint32_t i = fp_addr_hash(family, ip) & (FP_ADDR_SLOTS - 1);
    while (E->addrs[i].used) {
        if (E->addrs[i].family == family && memcmp(E->addrs[i].ip, ip, alen) == 0)
            return 1;
        i = (i + 1) & (FP_ADDR_SLOTS - 1);
    }
    return 0;
}

static inline uint32_t fp_svc_hash(uint8_t family, const uint8_t *ip, uint16_t port,
                                   uint8_t proto) {
    uint32_t h = fp_addr_hash(family, ip) ^ ((uint32_t)port * 0x9E3779B1u) ^ proto;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    return h;
}

/* vip_id of (address, port, proto), or -1. */
static inline int fp_find_service(const fp_engine *E, uint8_t family, const uint8_t *ip,
                                  uint16_t port, uint8_t proto) {
    size_t alen = family == 4 ? 4 : 16;
    uint32_t i = fp_svc_hash(family, ip, port, proto) & (FP_SVC_SLOTS - 1);
    while (E->svcs[i].used) {
        const fp_svc_slot *s = &E->svcs[i];
        if (s->family == family && s->port == port && s->proto == proto &&
            memcmp(s->ip, ip, alen) == 0)
            return s->vip_id;
        i = (i + 1) & (FP_SVC_SLOTS - 1);
    }
    return -1;
}

/* ---- IPv6 extension header chain ---------------------------------------------------------- */
enum { EXT_OK = 0, EXT_TRUNCATED = 1, EXT_TOO_MANY = 2, EXT_FRAGMENT = 3 };

/* Walks hop-by-hop/routing/fragment/destination options headers of the IPv6 packet at `ip`
 * whose bytes end at `end`. On EXT_OK, *nh is the upper-layer protocol and *off its offset. */
static inline int fp_ip6_walk(const uint8_t *ip, uint32_t end, int check_fragment, uint8_t *nh,
                              uint32_t *off) {
    uint8_t next = ip[6];
    uint32_t pos = 40;
    int count = 0;
    while (next == 0 || next == 43 || next == 44 || next == 60) {
        if (count == MAX_EXT_HEADERS)
            return EXT_TOO_MANY;
        if (next == 44) {
            if (pos + 8 > end)
                return EXT_TRUNCATED;
            if (check_fragment && (fp_be16(ip + pos + 2) & 0xFFF8))
                return EXT_FRAGMENT;
            next = ip[pos];
            pos += 8;
        } else {
            if (pos + 2 > end)
                return EXT_TRUNCATED;
            uint32_t hl = 8u * ((uint32_t)ip[pos + 1] + 1);
            if (pos + hl > end)
                return EXT_TRUNCATED;
            next = ip[pos];
            pos += hl;
        }
        count++;
    }
    *nh = next;
    *off = pos;
    return EXT_OK;
}

/* ---- ICMP errors about a VIP's flow ------------------------------------------------------ */

/* `ip` is the outer IP header, `h` the ICMP header with `l4len` bytes. */
static inline int fp_classify_icmp(const fp_engine *E, fp_pkt *p, const uint8_t *ip,
                                   const uint8_t *h, uint32_t l4len) {
    if (l4len < 8)
        return V_DROP_ICMP_SHORT;
    int is_error = p->family == 4 ? h[0] == 3 : (h[0] == 1 || h[0] == 2);
    if (!is_error)
        return V_PASS_NOT_SERVICE;
    /* The quote ends where the outer packet ends; its own length fields are ignored. */
    const uint8_t *q = h + 8;
    uint32_t qlen = l4len - 8;
    const uint8_t *qsrc, *qdst, *ql4;
    uint8_t qproto;
    if (p->family == 4) {
        if (qlen < 20)
            return V_DROP_ICMP_SHORT;
        if ((q[0] >> 4) != 4)
            return V_DROP_ICMP_BAD_QUOTE;
        uint32_t qihl = (q[0] & 15u) * 4;
        if (qihl < 20)
            return V_DROP_ICMP_BAD_QUOTE;
        if (qihl + 8 > qlen)
            return V_DROP_ICMP_SHORT;
        if (memcmp(q + 12, ip + 16, 4) != 0)
            return V_DROP_ICMP_BAD_QUOTE;
        qproto = q[9];
        qsrc = q + 12;
        qdst = q + 16;
        ql4 = q + qihl;
    } else {
        if (qlen < 40)
            return V_DROP_ICMP_SHORT;
        if ((q[0] >> 4) != 6)
            return V_DROP_ICMP_BAD_QUOTE;
        uint32_t qoff;
        int r = fp_ip6_walk(q, qlen, 0, &qproto, &qoff);
        if (r == EXT_TOO_MANY)
            return V_DROP_ICMP_BAD_QUOTE;
        if (r != EXT_OK || qoff + 8 > qlen)
            return V_DROP_ICMP_SHORT;
        if (memcmp(q + 8, ip + 24, 16) != 0)
            return V_DROP_ICMP_BAD_QUOTE;
        qsrc = q + 8;
        qdst = q + 24;
        ql4 = q + qoff;
    }
    if (qproto != 6 && qproto != 17)
        return V_DROP_ICMP_BAD_QUOTE;
    uint16_t vip_port = fp_be16(ql4), client_port = fp_be16(ql4 + 2);
    int vip_id = fp_find_service(E, p->family, qsrc, vip_port, qproto);
    if (vip_id < 0)
        return V_PASS_NOT_SERVICE;
    p->vip_id = (uint8_t)vip_id;
    p->is_icmp = 1;
    fp_key_set(&p->key, p->family, qproto, qdst, client_port, qsrc, vip_port);
    p->hash64 = fp_key_hash(&p->key);
    return V_OURS;
}

/* ---- the whole frame ------------------------------------------------------------------------ */

static inline int fp_classify(const fp_engine *E, fp_pkt *p) {
    const uint8_t *f = p->frame;
    uint32_t len = p->frame_len;
    p->is_icmp = 0;
    p->tcp_flags = 0;
    p->csum_off = -1;
    if (len < 14)
        return V_DROP_ETH_SHORT;
    uint32_t off = 12;
    uint16_t type = fp_be16(f + 12);
    for (int tags = 0; (type == ETH_P_8021Q || type == ETH_P_8021AD) && tags < MAX_VLAN_TAGS;
         tags++) {
        if (len < off + 6)
            return V_DROP_ETH_SHORT;
        type = fp_be16(f + off + 4);
        off += 4;
    }
    off += 2;
    if (type != ETH_P_IP && type != ETH_P_IPV6)
        return V_PASS_NOT_IP;
    p->l3_off = off;
    const uint8_t *ip = f + off;
    uint32_t avail = len - off;
    uint32_t l4;
    uint8_t proto;
    const uint8_t *src, *dst;
    if (type == ETH_P_IP) {
        if (avail < 20)
            return V_DROP_IP4_SHORT;
        if ((ip[0] >> 4) != 4)
            return V_DROP_IP4_VERSION;
        uint32_t ihl = (ip[0] & 15u) * 4;
        if (ihl < 20 || ihl > avail)
            return V_DROP_IP4_IHL;
        uint32_t total = fp_be16(ip + 2);
        if (total < ihl || total > avail)
            return V_DROP_IP4_LENGTH;
        if (!fp_is_vip_addr(E, 4, ip + 16))
            return V_PASS_NOT_VIP;
        if (fp_be16(ip + 6) & 0x1FFF)
            return V_DROP_FRAGMENT;
        p->family = 4;
        p->l3_len = total;
        p->tc = ip[1];
        proto = ip[9];
        l4 = ihl;
        src = ip + 12;
        dst = ip + 16;
    } else {
        if (avail < 40)
            return V_DROP_IP6_SHORT;
        if ((ip[0] >> 4) != 6)
            return V_DROP_IP6_VERSION;
        uint32_t plen = fp_be16(ip + 4);
        if (plen == 0 || 40 + plen > avail)
            return V_DROP_IP6_LENGTH;
        if (!fp_is_vip_addr(E, 6, ip + 24))
            return V_PASS_NOT_VIP;
        int r = fp_ip6_walk(ip, 40 + plen, 1, &proto, &l4);
        if (r == EXT_FRAGMENT)
            return V_DROP_FRAGMENT;
        if (r != EXT_OK)
            return V_DROP_IP6_EXT;
        p->family = 6;
        p->l3_len = 40 + plen;
        p->tc = (uint8_t)(fp_be32(ip) >> 20);
        src = ip + 8;
        dst = ip + 24;
    }
    uint32_t l4len = p->l3_len - l4;
    const uint8_t *h = ip + l4;
    p->l4_off = off + l4;
    if (proto == 6) {
        if (l4len < 20)
            return V_DROP_L4_SHORT;
        uint32_t doff = (uint32_t)(h[12] >> 4) * 4;
        if (doff < 20 || doff > l4len)
            return V_DROP_L4_SHORT;
        p->tcp_flags = h[13];
    } else if (proto == 17) {
        if (l4len < 8)
            return V_DROP_L4_SHORT;
    } else if ((p->family == 4 && proto == 1) || (p->family == 6 && proto == 58)) {
        return fp_classify_icmp(E, p, ip, h, l4len);
    } else {
        return V_PASS_NOT_SERVICE;
    }
    uint16_t sport = fp_be16(h), dport = fp_be16(h + 2);
    int vip_id = fp_find_service(E, p->family, dst, dport, proto);
    if (vip_id < 0)
        return V_PASS_NOT_SERVICE;
    p->vip_id = (uint8_t)vip_id;
    fp_key_set(&p->key, p->family, proto, src, sport, dst, dport);
    p->hash64 = fp_key_hash(&p->key);
    return V_OURS;
}

/* Checksum completion for a TCP/UDP packet marked CSUMNOTREADY: the field holds the
 * pseudo-header sum, so the checksum is the complemented sum of the segment as it is. */
static inline void fp_prepare_csum(fp_pkt *p) {
    if (p->is_icmp || !(p->status & FP_STATUS_CSUMNOTREADY))
        return;
    uint32_t end = p->l3_off + p->l3_len;
    uint16_t c = fp_csum(p->frame + p->l4_off, end - p->l4_off, 0);
    if (p->key.proto == 17) {
        if (c == 0)
            c = 0xFFFF;
        p->csum_off = (int32_t)(p->l4_off + 6);
    } else {
        p->csum_off = (int32_t)(p->l4_off + 16);
    }
    p->csum_val = c;
}

#endif /* FP_PACKET_H */
