/* Decode attention over the paged KV cache, for CPUs: each sequence's one query token against its
 * context, read in place through its block table (no gathered copy of K or V).
 *
 * Layouts (fp32, row-major):
 *   q        (num_seqs, num_heads, head_dim), seq stride `q_seq_stride` elements, heads packed
 *   k_cache  (num_blocks, block_size, num_heads, head_dim), contiguous; v_cache the same
 *   tables   (num_seqs, table_stride) int32 block ids; only the first ceil(seq_len / block_size) are read
 *   seq_lens (num_seqs,) int32, >= 1, context length including the query token
 *   out      (num_seqs, num_heads, head_dim), contiguous
 *
 * One work item is a (sequence, head) pair, spread over `num_threads` OpenMP threads (the runtime torch
 * itself uses, so the two never run a team each on the same cores). For an item: scores = q . k * scale
 * for every context row, softmax with the max subtracted, then the weighted sum of the V rows. Rows at or
 * past seq_len are never read, so whatever stale blocks hold (NaN after a failed request) cannot leak in.
 * `scratch` holds max_seq_len floats per thread.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

void paged_decode_attention_f32(const float *q, int64_t q_seq_stride, const float *k_cache, const float *v_cache,
                                const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, float *out,
                                int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t block_size,
                                float scale, float *scratch, int64_t max_seq_len, int num_threads) {
    const int64_t token_stride = num_heads * head_dim;  /* floats per cached token */
    const int64_t block_stride = block_size * token_stride;
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        float *scores = scratch + (int64_t)omp_get_thread_num() * max_seq_len;
#else
        float *scores = scratch;
#endif
#pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < num_seqs; s++) {
            for (int64_t h = 0; h < num_heads; h++) {
                const float *qh = q + s * q_seq_stride + h * head_dim;
                const int32_t *table = tables + s * table_stride;
                const int64_t len = seq_lens[s];
                float top = -FLT_MAX;  /* not -INFINITY: built with -ffast-math */
                for (int64_t start = 0; start < len; start += block_size) {
                    const float *k = k_cache + (int64_t)table[start / block_size] * block_stride + h * head_dim;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, k += token_stride) {
                        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * k[d];
                        dot *= scale;
                        scores[start + r] = dot;
                        top = dot > top ? dot : top;
                    }
                }
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t t = 0; t < len; t++) {
                    const float e = expf(scores[t] - top);
                    scores[t] = e;
                    total += e;
                }
                float *o = out + (s * num_heads + h) * head_dim;
                memset(o, 0, (size_t)head_dim * sizeof(float));
                for (int64_t start = 0; start < len; start += block_size) {
                    const float *v = v_cache + (int64_t)table[start / block_size] * block_stride + h * head_dim;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, v += token_stride) {
                        const float w = scores[start + r];
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; d++) o[d] += w * v[d];
                    }
                }
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) o[d] *= inv;
            }
        }
    }
}
