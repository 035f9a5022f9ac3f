/* deltahub's fused sparse sum: merge k sorted position lists, sum their weighted values in float32 in list
 * order, and add the sums to a tensor in place, rounding once. One pass, no union array, no sort.
 *
 * It computes exactly what deltahub/sparse_ops.py's weighted_sum followed by apply.add_in_place computes with
 * torch (the reference, and the fallback where this library cannot be built):
 *   S[p] = (((0 + v_a * w_a) + v_b * w_b) + ...)   over the lists a < b < ... that hold p, in float32
 *          (S[p] = v_a when zero_start is 0: combine()'s shortcut for one delta of weight 1 skips the 0 +)
 *   t[p] = round(float(t[p]) + S[p])               (double for a float64 tensor)
 * Products and sums are single float32 operations: build with -ffp-contract=off (no fused multiply-add),
 * as torch's own kernels are. Rounding is round-to-nearest-even; NaN becomes what torch's vectorised
 * conversions give (bfloat16 0xFFFF; float16 the quieted, truncated payload, as F16C's vcvtps2ph).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };

static inline float from_bits32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return from_bits32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = to_bits32(f);
    if (isnan(f)) return 0xFFFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0x1F) return from_bits32(sign | 0x7F800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return from_bits32(sign);
        float f = (float)mant * 0x1p-24f; /* exact: a subnormal half is mant * 2^-24 */
        return sign ? -f : f;
    }
    return from_bits32(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = to_bits32(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((abs >> 13) & 0x3FFu)); /* NaN */
    if (abs >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: infinity */
    if (abs < 0x38800000u) { /* below 2^-14: a half subnormal (or zero), rounded to nearest even */
        if (abs < 0x33000000u) return sign; /* below 2^-25: rounds to zero */
        uint32_t exp = abs >> 23, mant = (abs & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126u - exp; /* 14..24: the value is mant * 2^(exp - 150), the half step 2^-24 */
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = abs - 0x38000000u; /* rebias the exponent from 127 to 15 */
    r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
    return (uint16_t)(sign | r);
}

static inline float value_at(const void *values, int32_t vdtype, int64_t j) {
    switch (vdtype) {
        case DT_BF16: return bf16_to_f32(((const uint16_t *)values)[j]);
        case DT_F16: return f16_to_f32(((const uint16_t *)values)[j]);
        default: return ((const float *)values)[j];
    }
}

static inline int64_t position_at(const void *positions, int32_t wide, int64_t j) {
    return wide ? ((const int64_t *)positions)[j] : (int64_t)((const int32_t *)positions)[j];
}

/* One tensor dtype per instantiation (the dtype switch stays outside the loops): LOAD reads element p as a
 * float/double, STORE rounds back, BITS gives the stored element's bits sign-extended to 64 (the revert checksum
 * multiplies them by p + 1). */
#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
#define BITS_F32(x) ((int64_t)(int32_t)to_bits32(x))
#define LOAD_BF16(x) bf16_to_f32(x)
#define STORE_BF16(x) f32_to_bf16(x)
#define BITS_BF16(x) ((int64_t)(int16_t)(x))
#define LOAD_F16(x) f16_to_f32(x)
#define STORE_F16(x) f32_to_f16(x)
#define BITS_F16(x) ((int64_t)(int16_t)(x))
static inline int64_t bits_f64(double x) { int64_t b; memcpy(&b, &x, 8); return b; }
#define LOAD_F64(x) (x)
#define STORE_F64(x) (x)
#define BITS_F64(x) bits_f64(x)
#define ACC_F32 float
#define ACC_BF16 float
#define ACC_F16 float
#define ACC_F64 double

/* The merge for k lists. owner[] collects the lists holding the current position, in list order. */
#define DEFINE_SUM(NAME, ELEM, TAG)                                                                              \
    static int64_t NAME(int32_t k, const void *const *positions, int32_t wide, const void *const *values,       \
                        const int32_t *vdtypes, const int64_t *counts, const float *weights, int32_t zero_start, \
                        ELEM *t, ELEM *const *orig, uint64_t *checksum, int64_t *bad) {                         \
        int64_t cursor[64], head[64];                                                                           \
        int32_t owner[64];                                                                                      \
        uint64_t sum = 0;                                                                                       \
        int64_t unions = 0;                                                                                     \
        for (int32_t i = 0; i < k; i++) {                                                                       \
            cursor[i] = 0;                                                                                      \
            head[i] = counts[i] ? position_at(positions[i], wide, 0) : INT64_MAX;                               \
        }                                                                                                       \
        for (;;) {                                                                                              \
            int64_t p = head[0];                                                                                \
            for (int32_t i = 1; i < k; i++)                                                                     \
                if (head[i] < p) p = head[i];                                                                   \
            if (p == INT64_MAX) break;                                                                          \
            float s = 0.0f;                                                                                     \
            int32_t holders = 0;                                                                                \
            for (int32_t i = 0; i < k; i++)                                                                     \
                if (head[i] == p) {                                                                             \
                    float term = value_at(values[i], vdtypes[i], cursor[i]) * weights[i];                       \
                    s = (holders == 0 && !zero_start) ? term : s + term;                                        \
                    owner[holders++] = i;                                                                       \
                }                                                                                               \
            if (!isfinite(s)) (*bad)++;                                                                         \
            ELEM before = t[p];                                                                                 \
            ELEM after = STORE_##TAG((ACC_##TAG)LOAD_##TAG(before) + (ACC_##TAG)s);                             \
            t[p] = after;                                                                                       \
            uint64_t term = (uint64_t)BITS_##TAG(after) * (uint64_t)(p + 1);                                    \
            for (int32_t h = 0; h < holders; h++) {                                                             \
                int32_t i = owner[h];                                                                           \
                if (orig) orig[i][cursor[i]] = before;                                                          \
                sum += term;                                                                                    \
                cursor[i]++;                                                                                    \
                head[i] = cursor[i] < counts[i] ? position_at(positions[i], wide, cursor[i]) : INT64_MAX;       \
            }                                                                                                   \
            unions++;                                                                                           \
        }                                                                                                       \
        *checksum = sum;                                                                                        \
        return unions;                                                                                          \
    }

/* One list: no merge, a straight loop. */
#define DEFINE_ONE(NAME, ELEM, TAG)                                                                              \
    static int64_t NAME(const void *positions, int32_t wide, const void *values, int32_t vdtype, int64_t count, \
                        float weight, int32_t zero_start, ELEM *t, ELEM *orig, uint64_t *checksum,              \
                        int64_t *bad) {                                                                         \
        uint64_t sum = 0;                                                                                       \
        for (int64_t j = 0; j < count; j++) {                                                                   \
            int64_t p = position_at(positions, wide, j);                                                        \
            float term = value_at(values, vdtype, j) * weight;                                                  \
            float s = zero_start ? 0.0f + term : term;                                                          \
            if (!isfinite(s)) (*bad)++;                                                                         \
            ELEM before = t[p];                                                                                 \
            ELEM after = STORE_##TAG((ACC_##TAG)LOAD_##TAG(before) + (ACC_##TAG)s);                             \
            t[p] = after;                                                                                       \
            if (orig) orig[j] = before;                                                                         \
            sum += (uint64_t)BITS_##TAG(after) * (uint64_t)(p + 1);                                             \
        }                                                                                                       \
        *checksum = sum;                                                                                        \
        return count;                                                                                           \
    }

DEFINE_SUM(sum_f32, float, F32)
DEFINE_SUM(sum_bf16, uint16_t, BF16)
DEFINE_SUM(sum_f16, uint16_t, F16)
DEFINE_SUM(sum_f64, double, F64)
DEFINE_ONE(one_f32, float, F32)
DEFINE_ONE(one_bf16, uint16_t, BF16)
DEFINE_ONE(one_f16, uint16_t, F16)
DEFINE_ONE(one_f64, double, F64)

/* k lists: positions[i] (int32, or int64 when wide) strictly increasing, values[i] of dtype vdtypes[i], counts[i]
 * entries, weights[i] (already float32). originals[i], when not NULL, receives the tensor's elements at
 * positions[i] before the change. *checksum gets sum_i sum_j bits(new t[positions[i][j]]) * (positions[i][j] + 1)
 * with 64-bit wrap-around, as apply.py's _checksum computes it; *nonfinite the number of sums that overflowed
 * float32 (the caller then restores the originals and refuses, as torch's combine does). Returns the number of
 * union positions, or -1 for arguments it refuses. */
int64_t deltahub_sum_apply(int32_t k, const void *const *positions, int32_t wide, const void *const *values,
                           const int32_t *vdtypes, const int64_t *counts, const float *weights, int32_t zero_start,
                           void *tensor, int32_t dtype, void *const *originals, int64_t *checksum,
                           int64_t *nonfinite) {
    int64_t bad = 0;
    uint64_t sum = 0;
    int64_t unions = -1;
    if (k < 1 || k > 64) return -1;
    if (k == 1) {
        void *o = originals ? originals[0] : NULL;
        switch (dtype) {
            case DT_F32: unions = one_f32(positions[0], wide, values[0], vdtypes[0], counts[0], weights[0], zero_start, tensor, o, &sum, &bad); break;
            case DT_BF16: unions = one_bf16(positions[0], wide, values[0], vdtypes[0], counts[0], weights[0], zero_start, tensor, o, &sum, &bad); break;
            case DT_F16: unions = one_f16(positions[0], wide, values[0], vdtypes[0], counts[0], weights[0], zero_start, tensor, o, &sum, &bad); break;
            case DT_F64: unions = one_f64(positions[0], wide, values[0], vdtypes[0], counts[0], weights[0], zero_start, tensor, o, &sum, &bad); break;
        }
    } else {
        switch (dtype) {
            case DT_F32: unions = sum_f32(k, positions, wide, values, vdtypes, counts, weights, zero_start, tensor, (float *const *)originals, &sum, &bad); break;
            case DT_BF16: unions = sum_bf16(k, positions, wide, values, vdtypes, counts, weights, zero_start, tensor, (uint16_t *const *)originals, &sum, &bad); break;
            case DT_F16: unions = sum_f16(k, positions, wide, values, vdtypes, counts, weights, zero_start, tensor, (uint16_t *const *)originals, &sum, &bad); break;
            case DT_F64: unions = sum_f64(k, positions, wide, values, vdtypes, counts, weights, zero_start, tensor, (double *const *)originals, &sum, &bad); break;
        }
    }
    if (checksum) *checksum = (int64_t)sum;
    if (nonfinite) *nonfinite = bad;
    return unions;
}

/* The revert's two halves: the checksum of the tensor's elements at one list of positions (as above), and
 * writing saved elements back there. itemsize is 2, 4 or 8. */
int64_t deltahub_checksum(const void *tensor, int32_t itemsize, const void *positions, int32_t wide, int64_t count) {
    uint64_t sum = 0;
    for (int64_t j = 0; j < count; j++) {
        int64_t p = position_at(positions, wide, j);
        int64_t bits;
        if (itemsize == 2) bits = ((const int16_t *)tensor)[p];
        else if (itemsize == 4) bits = ((const int32_t *)tensor)[p];
        else bits = ((const int64_t *)tensor)[p];
        sum += (uint64_t)bits * (uint64_t)(p + 1);
    }
    return (int64_t)sum;
}

void deltahub_scatter(void *tensor, int32_t itemsize, const void *positions, int32_t wide, int64_t count,
                      const void *values) {
    for (int64_t j = 0; j < count; j++) {
        int64_t p = position_at(positions, wide, j);
        memcpy((char *)tensor + p * itemsize, (const char *)values + j * itemsize, (size_t)itemsize);
    }
}

/* The merge's streaming patch: the tensor of `numel` elements at byte `src_off` of file `src` is written to byte
 * `dst_off` of file `dst` with the same sum added (same arithmetic as deltahub_sum_apply), through `buf` of
 * `chunk` bytes: read a chunk, add the entries that fall in it, write it. The deltas' positions are merged
 * once across all chunks. Returns 0, or -errno of a failed read or write (-1 for a short read: the source
 * ended early), or -2 for arguments it refuses. *nonfinite as above. */
#include <errno.h>
#include <unistd.h>

#define DEFINE_STREAM(NAME, ELEM, TAG)                                                                           \
    static int64_t NAME(int32_t k, const void *const *positions, int32_t wide, const void *const *values,       \
                        const int32_t *vdtypes, const int64_t *counts, const float *weights, int32_t zero_start, \
                        int src, int64_t src_off, int dst, int64_t dst_off, int64_t numel, ELEM *buf,           \
                        int64_t per_chunk, int64_t *bad) {                                                      \
        int64_t cursor[64], head[64];                                                                           \
        for (int32_t i = 0; i < k; i++) {                                                                       \
            cursor[i] = 0;                                                                                      \
            head[i] = counts[i] ? position_at(positions[i], wide, 0) : INT64_MAX;                               \
        }                                                                                                       \
        for (int64_t lo = 0; lo < numel; lo += per_chunk) {                                                     \
            int64_t hi = lo + per_chunk < numel ? lo + per_chunk : numel;                                       \
            size_t nbytes = (size_t)(hi - lo) * sizeof(ELEM), done = 0;                                         \
            while (done < nbytes) {                                                                             \
                ssize_t got = pread(src, (char *)buf + done, nbytes - done, src_off + lo * (int64_t)sizeof(ELEM) + (int64_t)done); \
                if (got < 0 && errno == EINTR) continue;                                                        \
                if (got < 0) return -errno;                                                                     \
                if (got == 0) return -1;                                                                        \
                done += (size_t)got;                                                                            \
            }                                                                                                   \
            for (;;) {                                                                                          \
                int64_t p = head[0];                                                                            \
                for (int32_t i = 1; i < k; i++)                                                                 \
                    if (head[i] < p) p = head[i];                                                               \
                if (p >= hi) break;                                                                             \
                float s = 0.0f;                                                                                 \
                int32_t holders = 0;                                                                            \
                for (int32_t i = 0; i < k; i++)                                                                 \
                    if (head[i] == p) {                                                                         \
                        float term = value_at(values[i], vdtypes[i], cursor[i]) * weights[i];                   \
                        s = (holders == 0 && !zero_start) ? term : s + term;                                    \
                        holders++;                                                                              \
                        cursor[i]++;                                                                            \
                        head[i] = cursor[i] < counts[i] ? position_at(positions[i], wide, cursor[i]) : INT64_MAX; \
                    }                                                                                           \
                if (!isfinite(s)) (*bad)++;                                                                     \
                ELEM *t = buf + (p - lo);                                                                       \
                *t = STORE_##TAG((ACC_##TAG)LOAD_##TAG(*t) + (ACC_##TAG)s);                                     \
            }                                                                                                   \
            done = 0;                                                                                           \
            while (done < nbytes) {                                                                             \
                ssize_t put = pwrite(dst, (char *)buf + done, nbytes - done, dst_off + lo * (int64_t)sizeof(ELEM) + (int64_t)done); \
                if (put < 0 && errno == EINTR) continue;                                                        \
                if (put < 0) return -errno;                                                                     \
                done += (size_t)put;                                                                            \
            }                                                                                                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }

DEFINE_STREAM(stream_f32, float, F32)
DEFINE_STREAM(stream_bf16, uint16_t, BF16)
DEFINE_STREAM(stream_f16, uint16_t, F16)
DEFINE_STREAM(stream_f64, double, F64)

int64_t deltahub_sum_stream(int32_t k, const void *const *positions, int32_t wide, const void *const *values,
                            const int32_t *vdtypes, const int64_t *counts, const float *weights, int32_t zero_start,
                            int32_t dtype, int32_t src, int64_t src_off, int32_t dst, int64_t dst_off, int64_t numel,
                            void *buf, int64_t chunk_bytes, int64_t *nonfinite) {
    int64_t bad = 0, rc = -2;
    if (k < 1 || k > 64) return -2;
    int64_t size = dtype == DT_F64 ? 8 : dtype == DT_F32 ? 4 : 2;
    int64_t per_chunk = chunk_bytes / size;
    if (per_chunk < 1) return -2;
    switch (dtype) {
        case DT_F32: rc = stream_f32(k, positions, wide, values, vdtypes, counts, weights, zero_start, src, src_off, dst, dst_off, numel, buf, per_chunk, &bad); break;
        case DT_BF16: rc = stream_bf16(k, positions, wide, values, vdtypes, counts, weights, zero_start, src, src_off, dst, dst_off, numel, buf, per_chunk, &bad); break;
        case DT_F16: rc = stream_f16(k, positions, wide, values, vdtypes, counts, weights, zero_start, src, src_off, dst, dst_off, numel, buf, per_chunk, &bad); break;
        case DT_F64: rc = stream_f64(k, positions, wide, values, vdtypes, counts, weights, zero_start, src, src_off, dst, dst_off, numel, buf, per_chunk, &bad); break;
    }
    if (nonfinite) *nonfinite = bad;
    return rc;
}
