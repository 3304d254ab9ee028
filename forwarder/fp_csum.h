/* Byte-order loads/stores and the Internet checksum (RFC 1071) for the fast path.
 *
 * Sums are kept in native word order (RFC 1071 section 2(B)): a checksum computed over memory
 * words in host order and stored back with memcpy is byte-for-byte the big-endian checksum.
 */
#ifndef FP_CSUM_H
#define FP_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t fp_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t fp_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void fp_put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void fp_put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Unfolded one's complement sum of `len` bytes starting at an even offset of the checksummed
 * region, added to `sum`. An odd last byte counts as the high byte of a zero-padded word. */
static inline uint64_t fp_csum_add(uint64_t sum, const uint8_t *p, size_t len) {
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        sum += (w & 0xffffffffu) + (w >> 32);
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        sum += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        sum += w;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint8_t last[2] = {p[0], 0};
        uint16_t w;
        memcpy(&w, last, 2);
        sum += w;
    }
    return sum;
}

/* Fold to 16 bits (native order). */
static inline uint16_t fp_csum_fold(uint64_t sum) {
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)sum;
}

/* Complemented checksum of a region, ready to memcpy into the packet. */
static inline uint16_t fp_csum(const uint8_t *p, size_t len, uint64_t initial) {
    return (uint16_t)~fp_csum_fold(fp_csum_add(initial, p, len));
}

#endif /* FP_CSUM_H */
