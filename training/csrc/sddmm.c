/* Sampled dense-dense product for the values' gradient on CPU (see training/kernels.py).
 *
 *   out[p] = sum_t P[t, r[p]] * Q[t, c[p]]      P: T x n1, Q: T x n2, row-major float32
 *
 * i.e. (P^T Q) sampled at k positions, which must be sorted by r. The tokens are walked in blocks of `tb`:
 * each block of P and Q is transposed into buffers so that every sampled entry is one contiguous dot product
 * of length tb. Positions are sorted by r, so a thread reuses the row of P^T from L1 while it streams rows of
 * Q^T, whose block (n2 x tb floats, chosen by the caller to fit in L2) stays cache resident.
 */
#include <stdint.h>
#include <stdlib.h>

int deltahub_sddmm_f32(const float *P, int64_t n1, const float *Q, int64_t n2, int64_t T, int64_t tb,
                       const int32_t *r, const int32_t *c, int64_t k, float *out, int nthreads)
{
    const int64_t ld = (tb + 15) / 16 * 16; /* row stride of the transposed blocks: whole cache lines */
    float *Pt = aligned_alloc(64, (size_t)n1 * ld * sizeof(float));
    float *Qt = aligned_alloc(64, (size_t)n2 * ld * sizeof(float));
    if (!Pt || !Qt) {
        free(Pt);
        free(Qt);
        return 1;
    }
    const int64_t nb1 = (n1 + 15) / 16, nb = nb1 + (n2 + 15) / 16;
#pragma omp parallel num_threads(nthreads)
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
        const int64_t len = T - t0 < tb ? T - t0 : tb;
        /* transpose this block of tokens, 16 columns of P or Q per work item */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const float *src = b < nb1 ? P : Q;
            float *dst = b < nb1 ? Pt : Qt;
            const int64_t n = b < nb1 ? n1 : n2, i0 = (b < nb1 ? b : b - nb1) * 16;
            const int64_t w = n - i0 < 16 ? n - i0 : 16;
            for (int64_t t = 0; t < len; ++t) {
                const float *row = src + (t0 + t) * n + i0;
                for (int64_t i = 0; i < w; ++i) dst[(i0 + i) * ld + t] = row[i];
            }
        }
        /* one dot product per sampled position (implicit barrier above and below) */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < k; ++p) {
            const float *a = Pt + (int64_t)r[p] * ld, *b = Qt + (int64_t)c[p] * ld;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < len; ++t) s += a[t] * b[t];
            out[p] = t0 ? out[p] + s : s;
        }
    }
    free(Pt);
    free(Qt);
    return 0;
}
