/* Native CPU kernels (kernels/cpu_native.py builds and loads them): the paged decode attention, and a
 * linear for few rows further down.
 *
 * Decode attention over the paged KV cache, for CPUs: each sequence's one query token against its
 * context, read in place through its block table (no gathered copy of K or V).
 *
 * Layouts (fp32, row-major):
 *   q        (num_seqs, num_heads, head_dim), seq stride `q_seq_stride` elements, heads packed
 *   k_cache  (num_blocks, block_size, num_heads, head_dim), contiguous; v_cache the same
 *   tables   (num_seqs, table_stride) int32 block ids; only the first ceil(seq_len / block_size) are read
 *   seq_lens (num_seqs,) int32, >= 1, context length including the query token
 *   out      (num_seqs, num_heads, head_dim), contiguous
 *
 * One work item is a sequence and a group of `heads_per_item` consecutive heads, spread over `num_threads`
 * OpenMP threads (the runtime torch itself uses, so the two never run a team each on the same cores). The
 * caller makes groups small only when there are few sequences: a whole token row (all heads) is one
 * contiguous run of memory, read in order. For an item: scores = q . k * scale for every context row and
 * head, softmax with the max subtracted, then the weighted sum of the V rows. Rows at or past seq_len are
 * never read, so whatever stale blocks hold (NaN after a failed request) cannot leak in.
 * `scratch` holds heads_per_item * max_seq_len floats per thread.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

void paged_decode_attention_f32(const float *q, int64_t q_seq_stride, const float *k_cache, const float *v_cache,
                                const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, float *out,
                                int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t block_size,
                                int64_t heads_per_item, float scale, float *scratch, int64_t max_seq_len,
                                int num_threads) {
    const int64_t token_stride = num_heads * head_dim;  /* floats per cached token */
    const int64_t block_stride = block_size * token_stride;
    const int64_t groups = (num_heads + heads_per_item - 1) / heads_per_item;
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        float *const own = scratch + (int64_t)omp_get_thread_num() * heads_per_item * max_seq_len;
#else
        float *const own = scratch;
#endif
#pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < num_seqs; s++) {
            for (int64_t g = 0; g < groups; g++) {
                const int64_t h0 = g * heads_per_item;
                const int64_t nh = num_heads - h0 < heads_per_item ? num_heads - h0 : heads_per_item;
                const float *qs = q + s * q_seq_stride + h0 * head_dim;
                const int32_t *table = tables + s * table_stride;
                const int64_t len = seq_lens[s];
                float top[nh];
                for (int64_t h = 0; h < nh; h++) top[h] = -FLT_MAX;  /* not -INFINITY: built with -ffast-math */
                /* scores: the group's heads side by side in each token's row, read in order */
                for (int64_t start = 0; start < len; start += block_size) {
                    const float *k = k_cache + (int64_t)table[start / block_size] * block_stride + h0 * head_dim;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, k += token_stride) {
                        for (int64_t h = 0; h < nh; h++) {
                            const float *kh = k + h * head_dim, *qh = qs + h * head_dim;
                            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                            for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                            dot *= scale;
                            own[h * max_seq_len + start + r] = dot;
                            top[h] = dot > top[h] ? dot : top[h];
                        }
                    }
                }
                float inv[nh];
                for (int64_t h = 0; h < nh; h++) {
                    float *sc = own + h * max_seq_len, total = 0.0f;
                    const float m = top[h];
#pragma omp simd reduction(+ : total)
                    for (int64_t t = 0; t < len; t++) {
                        const float e = expf(sc[t] - m);
                        sc[t] = e;
                        total += e;
                    }
                    inv[h] = 1.0f / total;
                }
                float *o = out + (s * num_heads + h0) * head_dim;
                memset(o, 0, (size_t)(nh * head_dim) * sizeof(float));
                for (int64_t start = 0; start < len; start += block_size) {
                    const float *v = v_cache + (int64_t)table[start / block_size] * block_stride + h0 * head_dim;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, v += token_stride) {
                        for (int64_t h = 0; h < nh; h++) {
                            const float w = own[h * max_seq_len + start + r];
                            const float *vh = v + h * head_dim;
                            float *oh = o + h * head_dim;
#pragma omp simd
                            for (int64_t d = 0; d < head_dim; d++) oh[d] += w * vh[d];
                        }
                    }
                }
                for (int64_t h = 0; h < nh; h++) {
                    float *oh = o + h * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) oh[d] *= inv[h];
                }
            }
        }
    }
}

/* y (rows, out) = x (rows, in) @ w.T (+ bias), w (out, in) row-major, for a few rows (decode batches): each
 * weight row is read from memory once, for all rows of x, so the call streams the weights at memory speed
 * (a GEMM library's small-M path re-reads or repacks them). Output rows are split over the threads. */
void linear_few_rows_f32(const float *x, int64_t rows, int64_t in, const float *w, const float *bias, float *y,
                         int64_t out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const float *wo = w + o * in;
        const float b = bias ? bias[o] : 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * in;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < in; i++) dot += xr[i] * wo[i];
            y[r * out + o] = dot + b;
        }
    }
}
