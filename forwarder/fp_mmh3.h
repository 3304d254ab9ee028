/* MurmurHash3_x64_128 (Austin Appleby, public domain), inlined for the per-packet flow hash.
 *
 * Bit-exact with `mmh3.hash_bytes(data, seed, x64arch=True)`: out[0] is h1 (the first 8 bytes,
 * little endian), out[1] is h2. tests/unit/test_fastpath_c.py checks it on random inputs.
 */
#ifndef FP_MMH3_H
#define FP_MMH3_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && __GNUC__ >= 7
#define FP_FALLTHROUGH __attribute__((fallthrough))
#else
#define FP_FALLTHROUGH ((void)0)
#endif

static inline uint64_t fp_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fp_fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t fp_load64le(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void fp_mmh3_x64_128(const void *key, size_t len, uint32_t seed, uint64_t out[2]) {
    const uint8_t *data = (const uint8_t *)key;
    const size_t nblocks = len / 16;
    const uint64_t c1 = 0x87c37b91114253d5ULL;
    const uint64_t c2 = 0x4cf5ad432745937fULL;
    uint64_t h1 = seed, h2 = seed;

    for (size_t i = 0; i < nblocks; i++) {
        uint64_t k1 = fp_load64le(data + i * 16);
        uint64_t k2 = fp_load64le(data + i * 16 + 8);
        k1 *= c1;
        k1 = fp_rotl64(k1, 31);
        k1 *= c2;
        h1 ^= k1;
        h1 = fp_rotl64(h1, 27);
        h1 += h2;
        h1 = h1 * 5 + 0x52dce729;
        k2 *= c2;
        k2 = fp_rotl64(k2, 33);
        k2 *= c1;
        h2 ^= k2;
        h2 = fp_rotl64(h2, 31);
        h2 += h1;
        h2 = h2 * 5 + 0x38495ab5;
    }

    const uint8_t *tail = data + nblocks * 16;
    uint64_t k1 = 0, k2 = 0;
    switch (len & 15) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; FP_FALLTHROUGH;
    case 14: k2 ^= (uint64_t)tail[13] << 40; FP_FALLTHROUGH;
    case 13: k2 ^= (uint64_t)tail[12] << 32; FP_FALLTHROUGH;
    case 12: k2 ^= (uint64_t)tail[11] << 24; FP_FALLTHROUGH;
    case 11: k2 ^= (uint64_t)tail[10] << 16; FP_FALLTHROUGH;
    case 10: k2 ^= (uint64_t)tail[9] << 8; FP_FALLTHROUGH;
    case 9:
        k2 ^= (uint64_t)tail[8];
        k2 *= c2;
        k2 = fp_rotl64(k2, 33);
        k2 *= c1;
        h2 ^= k2;
        FP_FALLTHROUGH;
    case 8: k1 ^= (uint64_t)tail[7] << 56; FP_FALLTHROUGH;
    case 7: k1 ^= (uint64_t)tail[6] << 48; FP_FALLTHROUGH;
    case 6: k1 ^= (uint64_t)tail[5] << 40; FP_FALLTHROUGH;
    case 5: k1 ^= (uint64_t)tail[4] << 32; FP_FALLTHROUGH;
    case 4: k1 ^= (uint64_t)tail[3] << 24; FP_FALLTHROUGH;
    case 3: k1 ^= (uint64_t)tail[2] << 16; FP_FALLTHROUGH;
    case 2: k1 ^= (uint64_t)tail[1] << 8; FP_FALLTHROUGH;
    case 1:
        k1 ^= (uint64_t)tail[0];
        k1 *= c1;
        k1 = fp_rotl64(k1, 31);
        k1 *= c2;
        h1 ^= k1;
        break;
    default: break;
    }

    h1 ^= (uint64_t)len;
    h2 ^= (uint64_t)len;
    h1 += h2;
    h2 += h1;
    h1 = fp_fmix64(h1);
    h2 = fp_fmix64(h2);
    h1 += h2;
    h2 += h1;
    out[0] = h1;
    out[1] = h2;
}

#endif /* FP_MMH3_H */
