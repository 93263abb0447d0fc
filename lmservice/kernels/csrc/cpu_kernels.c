/* Native CPU kernels (lmservice/kernels/native_build.py builds them, lmservice/kernels/cpu_native.py loads them):
 * the paged decode attention and the KV-cache write, linears for a few rows, and a whole GPT-2 decode step made
 * of them, further down. Their interface (signatures, structs, the ABI version) is cpu_kernels.h.
 *
 * Decode attention over the paged KV cache, for CPUs: each sequence's one query token against its
 * context, read in place through its block table (no gathered copy of K or V).
 *
 * Layouts (row-major):
 *   q        (num_seqs, num_heads, head_dim) fp32, seq stride `q_seq_stride` elements, heads packed
 *   k_cache  (num_blocks, block_size, num_heads, head_dim), contiguous, in kv_dtype (KV_F32, KV_F16, KV_BF16 or
 *            KV_I8, cpu_kernels.h); v_cache the same
 *   k_scales (num_blocks, block_size, num_heads) fp32, KV_I8 only (NULL otherwise): row (token, head) stands for
 *            its int8 values times its scale; v_scales the same
 *   tables   (num_seqs, table_stride) int32 block ids; only the first ceil(seq_len / block_size) are read
 *   seq_lens (num_seqs,) int32, >= 1, context length including the query token
 *   out      (num_seqs, num_heads, head_dim) fp32, contiguous
 *
 * One work item is a sequence and a group of `heads_per_item` consecutive heads, spread over `num_threads`
 * OpenMP threads (the runtime torch itself uses, so the two never run a team each on the same cores). The
 * caller makes groups small only when there are few sequences: a whole token row (all heads) is one
 * contiguous run of memory, read in order. For an item: scores = q . k * scale for every context row and
 * head, softmax with the max subtracted, then the weighted sum of the V rows. Rows at or past seq_len are
 * never read, so whatever stale blocks hold (NaN after a failed request) cannot leak in.
 * Narrow caches are widened to fp32 in registers as they are read: fp16 by F16C (vcvtph2ps), bf16 by a shift into
 * the high half of a float, int8 by sign extension; an int8 row's scale multiplies its whole dot product (K) or its
 * softmax weight (V), not each element.
 * `scratch` holds heads_per_item * max_seq_len floats per thread.
 */
#include <float.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

int64_t native_abi_version(void) { return LMSERVICE_KERNELS_ABI_VERSION; }

/* sizeof(native_linear), then each of its fields' offsets in declaration order; then the same for native_layer */
int64_t native_abi_layout(int64_t *out, int64_t capacity) {
    const int64_t layout[] = {
        sizeof(native_linear), offsetof(native_linear, w), offsetof(native_linear, wq),
        offsetof(native_linear, wsum), offsetof(native_linear, scale), offsetof(native_linear, bscale),
        offsetof(native_linear, bias), offsetof(native_linear, in), offsetof(native_linear, out),
        offsetof(native_linear, bits), offsetof(native_linear, wb),
        sizeof(native_layer), offsetof(native_layer, ln1_w), offsetof(native_layer, ln1_b),
        offsetof(native_layer, ln2_w), offsetof(native_layer, ln2_b), offsetof(native_layer, c_attn),
        offsetof(native_layer, attn_proj), offsetof(native_layer, c_fc), offsetof(native_layer, mlp_proj),
        offsetof(native_layer, k_cache), offsetof(native_layer, v_cache), offsetof(native_layer, k_scales),
        offsetof(native_layer, v_scales), offsetof(native_layer, kv_dtype), offsetof(native_layer, attn_scale),
    };
    const int64_t n = (int64_t)(sizeof layout / sizeof layout[0]);
    for (int64_t i = 0; i < n && i < capacity; i++) out[i] = layout[i];
    return n;
}

/* The vector width of this build's fp32 arithmetic (the linears below use it too). */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(a) _mm512_reduce_add_ps(a)
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define VSUM(a) vsum256(a)
#else /* portable C; the compiler vectorizes what it can */
#define VW 1
typedef float vf;
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VSTORE(p, a) (*(p) = (a))
#define VSET1(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(a) (a)
#endif

/* ---- KV-cache formats (lmservice/kernels/kv_cache.py is the reference). The bit tests stand in for isnan and
 * isinf, which -ffast-math lets the compiler assume false. */

static inline size_t kv_elem_bytes(int kv) { return kv == KV_F32 ? 4 : kv == KV_I8 ? 1 : 2; }

static inline uint32_t float_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static inline float bits_float(uint32_t x) {
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* IEEE half -> float, exact (subnormals, infinities and NaN included); for builds without F16C and for tails */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
    if (e) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
    return bits_float(sign | float_bits((float)m * 0x1p-24f)); /* zero or subnormal: m units of 2^-24 */
}

/* float -> IEEE half, round to nearest even; past the largest half (65504) infinity; NaN a quiet NaN */
static inline uint16_t half_from_float(float f) {
    const uint32_t x = float_bits(f), a = x & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* at least 65520: rounds to infinity */
    if (a >= 0x38800000u) {                      /* at least 2^-14: a normal half; 13 mantissa bits dropped */
        const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
        return sign | (uint16_t)((r - 0x38000000u) >> 13); /* exponent rebiased from 127 to 15 */
    }
    if (a <= 0x33000000u) return sign; /* at most 2^-25, half the smallest subnormal: zero (a tie goes to even) */
    const uint32_t shift = 126u - (a >> 23), m = (a & 0x7fffffu) | 0x800000u; /* m >> shift units of 2^-24 */
    const uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return sign | (uint16_t)(q + (rest > half || (rest == half && (q & 1u))));
}

/* float -> bfloat16, round to nearest even (torch's conversion); NaN stays a NaN */
static inline uint16_t bf16_from_float(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* element i of a cache row in format KV, as fp32 (an int8 element without its scale) */
static inline __attribute__((always_inline)) float kv_at(const void *p, int64_t i, const int KV) {
    if (KV == KV_F16) return half_to_float(((const uint16_t *)p)[i]);
    if (KV == KV_BF16) return bits_float((uint32_t)((const uint16_t *)p)[i] << 16);
    if (KV == KV_I8) return (float)((const int8_t *)p)[i];
    return ((const float *)p)[i];
}

/* elements i .. i + VW of a cache row, widened to a vector of fp32 */
static inline __attribute__((always_inline)) vf kv_load(const void *p, int64_t i, const int KV) {
#if VW == 16
    const uint16_t *h = (const uint16_t *)p + i;
    if (KV == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    if (KV == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
    if (KV == KV_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)p + i))));
    return _mm512_loadu_ps((const float *)p + i);
#elif VW == 8
    const uint16_t *h = (const uint16_t *)p + i;
#ifdef __F16C__
    if (KV == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    if (KV == KV_F16)
        return _mm256_setr_ps(half_to_float(h[0]), half_to_float(h[1]), half_to_float(h[2]), half_to_float(h[3]),
                              half_to_float(h[4]), half_to_float(h[5]), half_to_float(h[6]), half_to_float(h[7]));
#endif
    if (KV == KV_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h)), 16));
    if (KV == KV_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    return _mm256_loadu_ps((const float *)p + i);
#else
    return kv_at(p, i, KV);
#endif
}

/* q . row for a cache row of n elements in format KV (int8: without its scale) */
static inline __attribute__((always_inline)) float kv_dot(const float *q, const void *k, int64_t n, const int KV) {
    vf acc = VZERO();
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc = VFMA(VLOAD(q + i), kv_load(k, i, KV), acc);
    float dot = VSUM(acc);
    for (; i < n; i++) dot += q[i] * kv_at(k, i, KV);
    return dot;
}

/* o += w * row for a cache row of n elements in format KV */
static inline __attribute__((always_inline)) void kv_axpy(float *o, float w, const void *v, int64_t n, const int KV) {
    const vf wv = VSET1(w);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) VSTORE(o + i, VFMA(wv, kv_load(v, i, KV), VLOAD(o + i)));
    for (; i < n; i++) o[i] += w * kv_at(v, i, KV);
}

/* One head's n values into int8 with their scale (kv_cache.py quantize_kv_int8): max |x| / 127, round half to
 * even; a head with NaN or infinity gets a NaN scale and zeros. The max is taken on the bits (finite
 * non-negative floats order as their bit patterns). */
static void quantize_head_int8(const float *x, int64_t n, int8_t *q, float *scale) {
    uint32_t top = 0;
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < n; i++) {
        const uint32_t magnitude = float_bits(x[i]) & 0x7fffffffu;
        top = magnitude > top ? magnitude : top;
    }
    if (top >= 0x7f800000u) {
        *scale = bits_float(0x7fc00000u);
        memset(q, 0, (size_t)n);
        return;
    }
    const float s = bits_float(top) * (1.0f / 127.0f), inv = s > 0.0f ? 1.0f / s : 0.0f;
    *scale = s;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(x[i] * inv);
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        q[i] = (int8_t)r;
    }
}

/* n values (one token's heads, n_head * head_dim) into a cache row in format KV; int8 scales per head */
static void store_kv_row(const float *x, void *row, float *scales, int64_t n_head, int64_t head_dim, int kv) {
    const int64_t n = n_head * head_dim;
    if (kv == KV_F32) {
        memcpy(row, x, (size_t)n * sizeof(float));
    } else if (kv == KV_BF16) {
        uint16_t *h = (uint16_t *)row;
        for (int64_t i = 0; i < n; i++) h[i] = bf16_from_float(x[i]);
    } else if (kv == KV_F16) {
        uint16_t *h = (uint16_t *)row;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
        for (; i < n; i++) h[i] = half_from_float(x[i]);
    } else {
        for (int64_t h = 0; h < n_head; h++)
            quantize_head_int8(x + h * head_dim, head_dim, (int8_t *)row + h * head_dim, scales + h);
    }
}

void write_kv_cache(const float *k, const float *v, int64_t row_stride, int64_t rows, const int64_t *slots,
                    void *k_cache, void *v_cache, float *k_scales, float *v_scales, int64_t kv_dtype, int64_t n_head,
                    int64_t head_dim) {
    const int64_t n = n_head * head_dim;
    const size_t row_bytes = (size_t)n * kv_elem_bytes((int)kv_dtype);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t slot = slots[r];
        if (slot < 0) continue;
        store_kv_row(k + r * row_stride, (char *)k_cache + slot * row_bytes, k_scales ? k_scales + slot * n_head : NULL,
                     n_head, head_dim, (int)kv_dtype);
        store_kv_row(v + r * row_stride, (char *)v_cache + slot * row_bytes, v_scales ? v_scales + slot * n_head : NULL,
                     n_head, head_dim, (int)kv_dtype);
    }
}

/* The attention for one cache format KV (a constant at each call, so each format compiles to its own loops). fp32
 * keeps its plain loops (the arithmetic the parity tests with transformers were written against). */
static inline __attribute__((always_inline)) void decode_attention_kv(
    const float *q, int64_t q_seq_stride, const void *k_cache, const void *v_cache, const float *k_scales,
    const float *v_scales, const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, float *out,
    int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t heads_per_item, float scale,
    float *scratch, int64_t max_seq_len, int num_threads, const int KV) {
    const size_t eb = kv_elem_bytes(KV);
    const int64_t token_stride = num_heads * head_dim; /* elements per cached token */
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
                    const int64_t block = table[start / block_size];
                    const char *k = (const char *)k_cache + (block * block_stride + h0 * head_dim) * eb;
                    const float *ks = KV == KV_I8 ? k_scales + block * block_size * num_heads + h0 : NULL;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, k += token_stride * eb) {
                        for (int64_t h = 0; h < nh; h++) {
                            const float *qh = qs + h * head_dim;
                            float dot = 0.0f;
                            if (KV == KV_F32) {
                                const float *kh = (const float *)k + h * head_dim;
#pragma omp simd reduction(+ : dot)
                                for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                            } else {
                                dot = kv_dot(qh, k + h * head_dim * eb, head_dim, KV);
                                if (KV == KV_I8) dot *= ks[r * num_heads + h];
                            }
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
                    const int64_t block = table[start / block_size];
                    const char *v = (const char *)v_cache + (block * block_stride + h0 * head_dim) * eb;
                    const float *vs = KV == KV_I8 ? v_scales + block * block_size * num_heads + h0 : NULL;
                    const int64_t rows = len - start < block_size ? len - start : block_size;
                    for (int64_t r = 0; r < rows; r++, v += token_stride * eb) {
                        for (int64_t h = 0; h < nh; h++) {
                            const float w = own[h * max_seq_len + start + r];
                            float *oh = o + h * head_dim;
                            if (KV == KV_F32) {
                                const float *vh = (const float *)v + h * head_dim;
#pragma omp simd
                                for (int64_t d = 0; d < head_dim; d++) oh[d] += w * vh[d];
                            } else {
                                kv_axpy(oh, KV == KV_I8 ? w * vs[r * num_heads + h] : w, v + h * head_dim * eb,
                                        head_dim, KV);
                            }
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

static void decode_attention(const float *q, int64_t q_seq_stride, const void *k_cache, const void *v_cache,
                             const float *k_scales, const float *v_scales, int kv_dtype, const int32_t *tables,
                             int64_t table_stride, const int32_t *seq_lens, float *out, int64_t num_seqs,
                             int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t heads_per_item,
                             float scale, float *scratch, int64_t max_seq_len, int num_threads) {
#define ATTEND(KV)                                                                                                 \
    decode_attention_kv(q, q_seq_stride, k_cache, v_cache, k_scales, v_scales, tables, table_stride, seq_lens, out, \
                        num_seqs, num_heads, head_dim, block_size, heads_per_item, scale, scratch, max_seq_len,   \
                        num_threads, KV)
    switch (kv_dtype) {
        case KV_F16: ATTEND(KV_F16); break;
        case KV_BF16: ATTEND(KV_BF16); break;
        case KV_I8: ATTEND(KV_I8); break;
        default: ATTEND(KV_F32); break;
    }
#undef ATTEND
}

void paged_decode_attention(const float *q, int64_t q_seq_stride, const void *k_cache, const void *v_cache,
                            const float *k_scales, const float *v_scales, int64_t kv_dtype, const int32_t *tables,
                            int64_t table_stride, const int32_t *seq_lens, float *out, int64_t num_seqs,
                            int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t heads_per_item,
                            float scale, float *scratch, int64_t max_seq_len, int num_threads) {
    decode_attention(q, q_seq_stride, k_cache, v_cache, k_scales, v_scales, (int)kv_dtype, tables, table_stride,
                     seq_lens, out, num_seqs, num_heads, head_dim, block_size, heads_per_item, scale, scratch,
                     max_seq_len, num_threads);
}

/* Linears for a few rows (decode batches): y (rows, out) = x (rows, in) @ W.T + bias, W (out, in) row-major, fp32
 * or bfloat16 (a bf16 model's decode step and LM head: x and y stay fp32).
 * Each thread walks its share of the output channels in order, and each weight row is read from memory
 * once, for all rows of x (up to 4 dot products accumulating in registers): the call streams the weights
 * at memory speed, one sequential stream per thread. (Tiles of several weight rows at once, as a GEMM
 * micro-kernel would take, read slower at these row counts: docs/kernels.md.) `accumulate`: y += the
 * result instead of y = (the residual adds of the decode step). */
#define ROWS_PER_PASS 4
/* for each pass over (up to) ROWS_PER_PASS rows from r0: CALL(r0, R) with R a literal, so that the always
 * inlined dot_rows_* unroll for it */
#define FOR_ROW_PASSES(rows, CALL)                                                        \
    for (int64_t r0 = 0; r0 < (rows); r0 += ROWS_PER_PASS) {                              \
        switch ((rows) - r0 < ROWS_PER_PASS ? (rows) - r0 : ROWS_PER_PASS) {              \
            case 1: CALL(r0, 1); break;                                                   \
            case 2: CALL(r0, 2); break;                                                   \
            case 3: CALL(r0, 3); break;                                                   \
            default: CALL(r0, 4); break;                                                  \
        }                                                                                 \
    }

static inline void store(float *y, float v, int accumulate) {
    if (accumulate) *y += v; else *y = v;
}

/* rows r0 .. r0+R of x against weight row o; R is a constant at every call (always inlined), so the loop over
 * it unrolls and the accumulators live in registers. The weights are fp32 or bfloat16 (WT: KV_F32 or KV_BF16,
 * the cache formats' codes: a bf16 weight is widened to fp32 in registers as a bf16 cache row is, so the
 * products and sums are fp32 and the call reads half the bytes) */
#define PREFETCH_AHEAD 512 /* weights ahead of the one being read */
static inline __attribute__((always_inline)) void dot_rows_w(const float *x, int64_t in, const void *wo, float b,
                                                             float *y, int64_t out, const int R, int accumulate,
                                                             const int WT) {
    /* two accumulators per row, so that a one-row call is not a single chain of dependent FMAs; the prefetch
     * keeps the weight stream ahead of them (without it a bf16 stream ran at ~16 GB/s, fp32's at 21-27) */
    vf acc[ROWS_PER_PASS], acc2[ROWS_PER_PASS];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = VZERO();
    int64_t i = 0;
    for (; i + 2 * VW <= in; i += 2 * VW) {
        __builtin_prefetch((const char *)wo + (i + PREFETCH_AHEAD) * (WT == KV_BF16 ? 2 : 4));
        const vf wv = kv_load(wo, i, WT), wv2 = kv_load(wo, i + VW, WT);
        for (int r = 0; r < R; r++) {
            acc[r] = VFMA(VLOAD(x + r * in + i), wv, acc[r]);
            acc2[r] = VFMA(VLOAD(x + r * in + i + VW), wv2, acc2[r]);
        }
    }
    for (; i + VW <= in; i += VW) {
        const vf wv = kv_load(wo, i, WT);
        for (int r = 0; r < R; r++) acc[r] = VFMA(VLOAD(x + r * in + i), wv, acc[r]);
    }
    for (int r = 0; r < R; r++) {
        float dot = VSUM(acc[r] + acc2[r]);
        for (int64_t j = i; j < in; j++) dot += x[r * in + j] * kv_at(wo, j, WT);
        store(y + r * out, dot + b, accumulate);
    }
}

/* From TILE_MIN_ROWS rows on, OUT_TILE weight rows at a time: with one weight row per pass every row of x
 * is re-read (from L2 once x outgrows L1: 4 rows of 3072) for each output channel, and those reads, not the
 * weights, bound the call; a tile shares each load of x among OUT_TILE channels. Below it one sequential
 * weight stream per thread reads faster (docs/kernels.md). */
#if VW == 16
#define OUT_TILE 4
#elif VW == 8
#define OUT_TILE 2 /* 16 ymm registers: 4 x 2 accumulators, 2 weights, 1 input */
#else
#define OUT_TILE 1
#endif
#define TILE_MIN_ROWS 5

static inline __attribute__((always_inline)) void dot_tile_w(const float *x, int64_t in, const void *w,
                                                             const float *bias, float *y, int64_t out, const int R,
                                                             int accumulate, const int WT) {
    vf acc[ROWS_PER_PASS][OUT_TILE];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < OUT_TILE; t++) acc[r][t] = VZERO();
    int64_t i = 0;
    for (; i + VW <= in; i += VW) {
        vf wv[OUT_TILE];
        for (int t = 0; t < OUT_TILE; t++) wv[t] = kv_load(w, t * in + i, WT);
        for (int r = 0; r < R; r++) {
            const vf xv = VLOAD(x + r * in + i);
            for (int t = 0; t < OUT_TILE; t++) acc[r][t] = VFMA(xv, wv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < OUT_TILE; t++) {
            float dot = VSUM(acc[r][t]);
            for (int64_t j = i; j < in; j++) dot += x[r * in + j] * kv_at(w, t * in + j, WT);
            store(y + r * out + t, bias ? dot + bias[t] : dot, accumulate);
        }
}

/* y (+)= x @ W.T + bias, W (out, in) in format WT (KV_F32 or KV_BF16) */
static inline __attribute__((always_inline)) void linear_w(const float *x, int64_t rows, int64_t in, const void *w,
                                                           const float *bias, float *y, int64_t out, int accumulate,
                                                           int num_threads, const int WT) {
    const char *wbytes = (const char *)w;
    const int64_t row_bytes = in * (WT == KV_BF16 ? 2 : 4);
    if (OUT_TILE > 1 && rows >= TILE_MIN_ROWS) {
        const int64_t tiles = out / OUT_TILE;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t t = 0; t <= tiles; t++) {
            const int64_t o = t * OUT_TILE;
            if (t < tiles) {
#define TILE_PASS(r0, R) \
    dot_tile_w(x + (r0) * in, in, wbytes + o * row_bytes, bias ? bias + o : NULL, y + (r0) * out + o, out, R, \
               accumulate, WT)
                FOR_ROW_PASSES(rows, TILE_PASS)
            } else { /* the channels past the last whole tile (a vocabulary of 50257) */
                for (int64_t oo = o; oo < out; oo++) {
                    const void *wo = wbytes + oo * row_bytes;
                    const float b = bias ? bias[oo] : 0.0f;
#define TAIL_PASS(r0, R) dot_rows_w(x + (r0) * in, in, wo, b, y + (r0) * out + oo, out, R, accumulate, WT)
                    FOR_ROW_PASSES(rows, TAIL_PASS)
                }
            }
        }
        return;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const void *wo = wbytes + o * row_bytes;
        const float b = bias ? bias[o] : 0.0f;
#define ROW_PASS(r0, R) dot_rows_w(x + (r0) * in, in, wo, b, y + (r0) * out + o, out, R, accumulate, WT)
        FOR_ROW_PASSES(rows, ROW_PASS)
    }
}

static void linear_f32(const float *x, int64_t rows, int64_t in, const float *w, const float *bias, float *y,
                       int64_t out, int accumulate, int num_threads) {
    linear_w(x, rows, in, w, bias, y, out, accumulate, num_threads, KV_F32);
}

static void linear_bf16(const float *x, int64_t rows, int64_t in, const uint16_t *w, const float *bias, float *y,
                        int64_t out, int accumulate, int num_threads) {
    linear_w(x, rows, in, w, bias, y, out, accumulate, num_threads, KV_BF16);
}

void linear_few_rows_f32(const float *x, int64_t rows, int64_t in, const float *w, const float *bias, float *y,
                         int64_t out, int num_threads) {
    linear_f32(x, rows, in, w, bias, y, out, 0, num_threads);
}

void linear_few_rows_bf16(const float *x, int64_t rows, int64_t in, const uint16_t *w, const float *bias, float *y,
                          int64_t out, int num_threads) {
    linear_bf16(x, rows, in, w, bias, y, out, 0, num_threads);
}

/* int8 weights (one fp32 scale per output channel) against int8 activations: each row of x is quantized once
 * per call (symmetric, one scale per row, max |x| / 127, so every value is in [-127, 127]). The weights are
 * packed (lmservice/kernels/cpu_native.py pack_int8_weight): (ceil(out / 16), in4 = ceil(in / 4), 16, 4), so a
 * 64-byte vector holds 4 consecutive inputs of 16 channels, and a broadcast group of 4 bytes of x multiplies
 * all 16 channels' lanes at once: no horizontal sums at the end (they made a row-major version slower than
 * FBGEMM from 16 rows on), and each 16-channel tile is one contiguous stream. Two instruction sets:
 * - AVX-512 VNNI: x shifted to u8 by +128 for vpdpbusd's u8 x s8 products, which adds 4 of them into each
 *   int32 lane; `wsum` (per channel, the sum of its int8 weights) takes the shift back out:
 *   y = x_scale * w_scale * (sum (xq + 128) w - 128 wsum) + bias.
 * - AVX2 (no VNNI; the x86-64-v4 build without it too): vpmaddubsw multiplies u8 by s8 and adds pairs into
 *   int16 lanes, with saturation, and vpmaddwd by ones adds those pairs into int32. The +128 shift would
 *   saturate (255 * 127 * 2 > 32767), so the sign moves instead: |xq| (u8, at most 127) times w carrying
 *   xq's sign (vpsignb), at most 2 * 127 * 127 = 32258 per pair, exact. No shift, so no wsum.
 * Both give the same int32 sums, so the same results. Elsewhere the library has no int8 kernel (native_q8()
 * says so). */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define Q8_VNNI 1
#define PACKED_ROWS 8 /* rows per pass over a tile: 8 zmm accumulators */
#elif defined(__AVX2__)
#define Q8_AVX2 1
#define PACKED_ROWS 4 /* 4 rows x 2 ymm accumulators, 2 weights, ones and 3 temporaries: 14 of 16 registers */
#endif
#if defined(Q8_VNNI) || defined(Q8_AVX2)
#ifdef Q8_VNNI
int native_q8(void) { return 2; }
#else
int native_q8(void) { return 1; }
#endif

/* A row holding NaN or infinity gets a NaN scale (and zeros), so that its outputs are NaN, as fp32's would be,
 * and the runner fails that request alone. The test is on the bits: -ffast-math lets the compiler assume
 * every float is finite, and the abs-max of the bit patterns orders finite values below inf and NaN.
 * xq holds xq + 128 as u8 (128 pads each row to in4 * 4 bytes: zero once shifted back). */
static void quantize_rows(const float *x, int64_t rows, int64_t in, int64_t in4, uint8_t *xq, float *xs) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * in;
        uint8_t *q = xq + r * in4 * 4;
        memset(q + in, 128, (size_t)(in4 * 4 - in));
        const uint32_t *bits = (const uint32_t *)xr;
        uint32_t top = 0;
#pragma omp simd reduction(max : top)
        for (int64_t i = 0; i < in; i++) {
            const uint32_t magnitude = bits[i] & 0x7fffffffu;
            top = magnitude > top ? magnitude : top;
        }
        if (top >= 0x7f800000u) {
            const uint32_t nan_bits = 0x7fc00000u;
            memcpy(&xs[r], &nan_bits, sizeof nan_bits);
            memset(q, 128, (size_t)in);
            continue;
        }
        float largest;
        memcpy(&largest, &top, sizeof largest);
        const float s = largest > 0.0f ? largest / 127.0f : 1.0f, inv = 1.0f / s;
        xs[r] = s;
#pragma omp simd
        for (int64_t i = 0; i < in; i++) q[i] = (uint8_t)((int32_t)nearbyintf(xr[i] * inv) + 128);
    }
}

#ifdef Q8_VNNI
/* One 16-channel tile (wt: in4 * 64 bytes) against rows r0 .. r0+R of xq (rows of in4 * 4 bytes); R is a
 * constant at every call, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile_q8(const uint8_t *xq, int64_t in4, const float *xs,
                                                          const int8_t *wt, const int32_t *wsum,
                                                          const float *scale, const float *bias, float *y,
                                                          int64_t out, int64_t o0, const int R, int accumulate) {
    __m512i acc[PACKED_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < in4; k++) {
        const __m512i wv = _mm512_loadu_si512(wt + k * 64);
        for (int r = 0; r < R; r++) {
            int32_t group;
            memcpy(&group, xq + r * in4 * 4 + k * 4, sizeof group);
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(group), wv);
        }
    }
    const int64_t n = out - o0 < 16 ? out - o0 : 16;
    const __mmask16 m = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
    const __m512 sc = _mm512_maskz_loadu_ps(m, scale + o0);
    const __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, wsum + o0), 7); /* 128 * wsum */
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + o0) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        float *yr = y + r * out + o0;
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], shift)),
                                   _mm512_mul_ps(sc, _mm512_set1_ps(xs[r])), b);
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, yr));
        _mm512_mask_storeu_ps(yr, m, v);
    }
}
#else
/* 16 floats from p as two halves, of which the first n are read (zeros after) */
static inline void load16(const float *p, int64_t n, __m256 *lo, __m256 *hi) {
    float t[16] = {0};
    if (n < 16) p = memcpy(t, p, (size_t)n * sizeof(float));
    *lo = _mm256_loadu_ps(p);
    *hi = _mm256_loadu_ps(p + 8);
}

/* vpmaddubsw + vpmaddwd: acc += for each of 8 channels the sum of 4 products |x| * (w with x's sign) */
static inline __m256i dot4_avx2(__m256i acc, __m256i ax, __m256i sx, __m256i w, __m256i ones) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, sx)), ones));
}

/* tile_q8 of the VNNI build, with each 64-byte vector as two halves of 8 channels */
static inline __attribute__((always_inline)) void tile_q8(const uint8_t *xq, int64_t in4, const float *xs,
                                                          const int8_t *wt, const int32_t *wsum,
                                                          const float *scale, const float *bias, float *y,
                                                          int64_t out, int64_t o0, const int R, int accumulate) {
    (void)wsum;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[PACKED_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < in4; k++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wt + k * 64));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wt + k * 64 + 32));
        for (int r = 0; r < R; r++) {
            uint32_t group;
            memcpy(&group, xq + r * in4 * 4 + k * 4, sizeof group);
            const __m256i sx = _mm256_set1_epi32((int32_t)(group ^ 0x80808080u)); /* xq, signed again */
            const __m256i ax = _mm256_abs_epi8(sx);
            acc[r][0] = dot4_avx2(acc[r][0], ax, sx, w0, ones);
            acc[r][1] = dot4_avx2(acc[r][1], ax, sx, w1, ones);
        }
    }
    const int64_t n = out - o0 < 16 ? out - o0 : 16;
    __m256 sc[2], b[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    load16(scale + o0, n, &sc[0], &sc[1]);
    if (bias) load16(bias + o0, n, &b[0], &b[1]);
    for (int r = 0; r < R; r++) {
        float *yr = y + r * out + o0, v[16];
        const __m256 xr = _mm256_set1_ps(xs[r]);
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(v + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), _mm256_mul_ps(sc[h], xr), b[h]));
        for (int64_t c = 0; c < n; c++) store(yr + c, v[c], accumulate);
    }
}
#endif

/* xq: scratch of rows * in4 * 4 bytes, xs: of rows floats */
static void linear_q8(const float *x, int64_t rows, int64_t in, const int8_t *wp, const int32_t *wsum,
                      const float *scale, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                      int accumulate, int num_threads) {
    const int64_t in4 = (in + 3) / 4, tiles = (out + 15) / 16;
    quantize_rows(x, rows, in, in4, xq, xs);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int8_t *wt = wp + t * in4 * 64;
        for (int64_t r0 = 0; r0 < rows; r0 += PACKED_ROWS) {
            const uint8_t *xr = xq + r0 * in4 * 4;
            float *yr = y + r0 * out;
            switch (rows - r0 < PACKED_ROWS ? rows - r0 : PACKED_ROWS) {
#define PACKED_CASE(R) \
    case R: tile_q8(xr, in4, xs + r0, wt, wsum, scale, bias, yr, out, t * 16, R, accumulate); break;
                PACKED_CASE(1) PACKED_CASE(2) PACKED_CASE(3) PACKED_CASE(4)
#if PACKED_ROWS > 4
                PACKED_CASE(5) PACKED_CASE(6) PACKED_CASE(7) PACKED_CASE(8)
#endif
            }
        }
    }
}

void linear_few_rows_q8(const float *x, int64_t rows, int64_t in, const int8_t *wp, const int32_t *wsum,
                        const float *scale, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                        int num_threads) {
    linear_q8(x, rows, in, wp, wsum, scale, bias, y, out, xq, xs, 0, num_threads);
}
#else
int native_q8(void) { return 0; }
#endif

/* Weights in blocks of QBLOCK inputs, each block of each channel with its own fp16 scale (llama.cpp's q8_0 and
 * q4_0 formats in spirit): `bits` 8 (values -127..127) or 4 (values -8..7), stored unsigned with an offset
 * (128, or 8) so that they are the u8 operand of the u8 x s8 multiply-adds, and x (quantized per block of
 * QBLOCK too: quantize_x_blocks) the s8 one. The offset comes back out per block: sum (q + off) x = sum q x +
 * off * xsum, with xsum the block's sum of x. Packed (lmservice/kernels/cpu_native.py pack_block_weight) in 16-channel
 * tiles like the int8 kernel's: per block, 8 groups of 4 inputs, each 64 bytes (4 inputs x 16 channels);
 * 4-bit blocks hold two groups per 64 bytes, the even one in the low nibbles. Scales: (tiles, blocks, 16).
 * Per block: int32 sums, the offset out, then converted and multiplied by the block's scales into fp32
 * accumulators. On AVX2 4-bit blocks multiply nibbles (u8, at most 15) by x: pairs of at most 2 * 15 * 127,
 * so a block's 8 pairs per int16 lane (at most 30480) add up in int16 without saturating, one vpmaddwd per
 * block; 8-bit ones take the int8 kernel's sign trick (the offset removed first). */
#define QBLOCK 32
#if defined(Q8_VNNI) || defined(Q8_AVX2)
#define QB_BYTES(bits) (16 * QBLOCK * (bits) / 8) /* one block of one tile */

/* x quantized as the weights are, per block of QBLOCK inputs (symmetric, scale max |x| / 127 of the block, like
 * llama.cpp's q8_0 activations): an outlier costs only its own block precision. xq as quantize_rows writes it
 * (+128, zero padding), xs (rows, nblocks) the scales, xsum (rows, nblocks) each block's sum of xq. A block
 * holding NaN or infinity gets a NaN scale (tested on the bits, as in quantize_rows), and with it every output
 * of its row. */
static void quantize_x_blocks(const float *x, int64_t rows, int64_t in, int64_t nblocks, uint8_t *xq, float *xs,
                              int32_t *xsum) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t i0 = b * QBLOCK, n = in - i0 < QBLOCK ? in - i0 : QBLOCK;
            const float *xb = x + r * in + i0;
            uint8_t *q = xq + (r * nblocks + b) * QBLOCK;
            const uint32_t *bits = (const uint32_t *)xb;
            uint32_t top = 0;
            for (int64_t i = 0; i < n; i++) {
                const uint32_t magnitude = bits[i] & 0x7fffffffu;
                top = magnitude > top ? magnitude : top;
            }
            memset(q, 128, QBLOCK);
            xsum[r * nblocks + b] = 0;
            if (top >= 0x7f800000u) {
                const uint32_t nan_bits = 0x7fc00000u;
                memcpy(&xs[r * nblocks + b], &nan_bits, sizeof nan_bits);
                continue;
            }
            float largest;
            memcpy(&largest, &top, sizeof largest);
            const float scale = largest > 0.0f ? largest / 127.0f : 1.0f, inv = 1.0f / scale;
            xs[r * nblocks + b] = scale;
            int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < n; i++) {
                const int32_t v = (int32_t)nearbyintf(xb[i] * inv);
                q[i] = (uint8_t)(v + 128);
                sum += v;
            }
            xsum[r * nblocks + b] = sum;
        }
}

static inline int32_t x_group(const uint8_t *p) { /* 4 bytes of xq as s8 (the +128 taken off) */
    uint32_t group;
    memcpy(&group, p, sizeof group);
    return (int32_t)(group ^ 0x80808080u);
}
#define bcast_x(p) _mm256_set1_epi32(x_group(p))

/* One 16-channel tile (wt, its scales st) against rows r0 .. r0+R (xq, their block scales xs and sums xsum);
 * R and bits are constants at every call, so the accumulators live in registers. One version per ISA: */
#define TILE_QB                                                                                                \
    static inline __attribute__((always_inline)) void tile_qb(                                                 \
        const uint8_t *xq, int64_t nblocks, const float *xs, const int32_t *xsum, const uint8_t *wt,           \
        const uint16_t *st, const int bits, const float *bias, float *y, int64_t out, int64_t o0, const int R, \
        int accumulate)

#ifdef Q8_VNNI
#define QB_ROWS 8
TILE_QB {
    const int64_t row_bytes = nblocks * QBLOCK;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int32_t off = bits == 8 ? 128 : 8;
    __m512 facc[QB_ROWS];
    for (int r = 0; r < R; r++) facc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *wb = wt + b * QB_BYTES(bits);
        __m512i iacc[QB_ROWS];
        for (int r = 0; r < R; r++) iacc[r] = _mm512_set1_epi32(-off * xsum[r * nblocks + b]); /* the offset out */
        for (int j = 0; j < 8; j += (bits == 8 ? 1 : 2)) {
            __m512i w0, w1 = _mm512_setzero_si512();
            if (bits == 8) {
                w0 = _mm512_loadu_si512(wb + j * 64);
            } else {
                const __m512i v = _mm512_loadu_si512(wb + j * 32);
                w0 = _mm512_and_si512(v, low);
                w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int r = 0; r < R; r++) {
                const uint8_t *xr = xq + r * row_bytes + (b * 8 + j) * 4;
                iacc[r] = _mm512_dpbusd_epi32(iacc[r], w0, _mm512_set1_epi32(x_group(xr)));
                if (bits == 4) iacc[r] = _mm512_dpbusd_epi32(iacc[r], w1, _mm512_set1_epi32(x_group(xr + 4)));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + b * 16)));
        for (int r = 0; r < R; r++) {
            facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_mul_ps(d, _mm512_set1_ps(xs[r * nblocks + b])),
                                      facc[r]);
        }
    }
    const int64_t n = out - o0 < 16 ? out - o0 : 16;
    const __mmask16 m = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + o0) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        float *yr = y + r * out + o0;
        __m512 v = _mm512_add_ps(facc[r], bv);
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, yr));
        _mm512_mask_storeu_ps(yr, m, v);
    }
}
#else
#define QB_ROWS 4 /* 4 rows x (2 fp32 + 2 integer accumulators) spill some of 16 registers, yet beat 2 rows (which
                   * fit) by 10-20% from 4 rows on: each tile's weights are unpacked half as often */
TILE_QB {
    const int64_t row_bytes = nblocks * QBLOCK;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    __m256 facc[QB_ROWS][2];
    for (int r = 0; r < R; r++) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *wb = wt + b * QB_BYTES(bits);
        __m256i iacc[QB_ROWS][2];
        for (int r = 0; r < R; r++) iacc[r][0] = iacc[r][1] = _mm256_setzero_si256();
        if (bits == 8) {
            for (int j = 0; j < 8; j++) {
                const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64)), flip);
                const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + j * 64 + 32)), flip);
                for (int r = 0; r < R; r++) {
                    const __m256i sx = bcast_x(xq + r * row_bytes + (b * 8 + j) * 4), ax = _mm256_abs_epi8(sx);
                    iacc[r][0] = dot4_avx2(iacc[r][0], ax, sx, w0, ones);
                    iacc[r][1] = dot4_avx2(iacc[r][1], ax, sx, w1, ones);
                }
            }
        } else {
            for (int j = 0; j < 8; j += 2) { /* iacc holds int16 pair sums until the block's end */
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wb + j * 32));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wb + j * 32 + 32));
                const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
                const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
                for (int r = 0; r < R; r++) {
                    const uint8_t *xr = xq + r * row_bytes + (b * 8 + j) * 4;
                    const __m256i x0 = bcast_x(xr), x1 = bcast_x(xr + 4);
                    iacc[r][0] = _mm256_add_epi16(iacc[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, x0),
                                                                               _mm256_maddubs_epi16(hi0, x1)));
                    iacc[r][1] = _mm256_add_epi16(iacc[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, x0),
                                                                               _mm256_maddubs_epi16(hi1, x1)));
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256i shift = _mm256_set1_epi32(8 * xsum[r * nblocks + b]);
                for (int h = 0; h < 2; h++)
                    iacc[r][h] = _mm256_sub_epi32(_mm256_madd_epi16(iacc[r][h], ones), shift);
            }
        }
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(st + b * 16)));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(st + b * 16 + 8)));
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_set1_ps(xs[r * nblocks + b]);
            facc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][0]), _mm256_mul_ps(d0, xb), facc[r][0]);
            facc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][1]), _mm256_mul_ps(d1, xb), facc[r][1]);
        }
    }
    const int64_t n = out - o0 < 16 ? out - o0 : 16;
    __m256 bv[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    if (bias) load16(bias + o0, n, &bv[0], &bv[1]);
    for (int r = 0; r < R; r++) {
        float *yr = y + r * out + o0, v[16];
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(v + 8 * h, _mm256_add_ps(facc[r][h], bv[h]));
        for (int64_t c = 0; c < n; c++) store(yr + c, v[c], accumulate);
    }
}
#endif

/* xq: scratch of rows * nblocks * QBLOCK bytes, xs and xsum: rows * nblocks floats and int32 */
static void linear_qb(const float *x, int64_t rows, int64_t in, const uint8_t *wp, const uint16_t *scales,
                      int64_t bits, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                      int32_t *xsum, int accumulate, int num_threads) {
    const int64_t nblocks = (in + QBLOCK - 1) / QBLOCK, tiles = (out + 15) / 16;
    quantize_x_blocks(x, rows, in, nblocks, xq, xs, xsum);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = wp + t * nblocks * QB_BYTES(bits);
        const uint16_t *st = scales + t * nblocks * 16;
        for (int64_t r0 = 0; r0 < rows; r0 += QB_ROWS) {
            const uint8_t *xr = xq + r0 * nblocks * QBLOCK;
            const int32_t *sr = xsum + r0 * nblocks;
            float *yr = y + r0 * out;
            const int left = rows - r0 < QB_ROWS ? (int)(rows - r0) : QB_ROWS;
#define QB_CALL(BITS, R) tile_qb(xr, nblocks, xs + r0 * nblocks, sr, wt, st, BITS, bias, yr, out, t * 16, R, accumulate)
#define QB_CASES(BITS)                                                                      \
    switch (left) {                                                                         \
        case 1: QB_CALL(BITS, 1); break;                                                    \
        QB_MORE_CASES(BITS)                                                                 \
        default: QB_CALL(BITS, QB_ROWS); break;                                             \
    }
#if QB_ROWS == 8
#define QB_MORE_CASES(BITS)                                                                 \
    case 2: QB_CALL(BITS, 2); break; case 3: QB_CALL(BITS, 3); break;                       \
    case 4: QB_CALL(BITS, 4); break; case 5: QB_CALL(BITS, 5); break;                       \
    case 6: QB_CALL(BITS, 6); break; case 7: QB_CALL(BITS, 7); break;
#else /* 4 */
#define QB_MORE_CASES(BITS) case 2: QB_CALL(BITS, 2); break; case 3: QB_CALL(BITS, 3); break;
#endif
            if (bits == 8) {
                QB_CASES(8)
            } else {
                QB_CASES(4)
            }
        }
    }
}

void linear_few_rows_qblock(const float *x, int64_t rows, int64_t in, const uint8_t *wp, const uint16_t *scales,
                            int64_t bits, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                            int32_t *xsum, int num_threads) {
    linear_qb(x, rows, in, wp, scales, bits, bias, y, out, xq, xs, xsum, 0, num_threads);
}
#endif

/* A whole GPT-2 decode step for a few sequences, one token each: every layer's LayerNorms, projections (fp32,
 * or int8 through linear_q8), KV-cache write (in the cache's format), attention and GELU in one call, so the step costs no Python
 * and no dispatch per op. The arithmetic is the op-by-op path's: the same kernels above, torch's LayerNorm
 * and tanh GELU formulas. The structs it reads (native_linear, native_layer) are in cpu_kernels.h. */
static void apply_linear(const native_linear *l, const float *x, int64_t rows, float *y, int accumulate,
                         uint8_t *xq, float *xs, int32_t *xsum, int num_threads) {
#if defined(Q8_VNNI) || defined(Q8_AVX2)
    if (l->bscale) {
        linear_qb(x, rows, l->in, (const uint8_t *)l->wq, l->bscale, l->bits, l->bias, y, l->out, xq, xs, xsum,
                  accumulate, num_threads);
        return;
    }
    if (l->wq) {
        linear_q8(x, rows, l->in, l->wq, l->wsum, l->scale, l->bias, y, l->out, xq, xs, accumulate, num_threads);
        return;
    }
#else
    (void)xq, (void)xs, (void)xsum;
#endif
    if (l->wb) {
        linear_bf16(x, rows, l->in, l->wb, l->bias, y, l->out, accumulate, num_threads);
        return;
    }
    linear_f32(x, rows, l->in, l->w, l->bias, y, l->out, accumulate, num_threads);
}

static void layer_norm(const float *x, int64_t rows, int64_t n, const float *w, const float *b, float eps,
                       float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) sum += xr[i];
        const float mean = sum / (float)n;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < n; i++) sq += (xr[i] - mean) * (xr[i] - mean);
        const float rstd = 1.0f / sqrtf(sq / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    }
}

static void gelu_tanh(float *x, int64_t n, int num_threads) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
#pragma omp parallel for simd num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

/* h (rows, n_embd): the token + position embeddings in, the residual stream after the last layer out;
 * out (rows, n_embd): ln_f(h). slots (rows,): each token's cache slot (block * block_size + offset).
 * work: rows * (5 * n_embd + n_inner) floats; qwork (quantized rows of x, their scales and block sums):
 * rows * (W + 32) bytes, then 64 + rows * (W / 32 + 1) floats and as many int32, W = max(n_embd, n_inner);
 * attn_scratch: num_threads * heads_per_item * max_seq_len floats. */
void gpt2_decode_step(const native_layer *layers, int64_t n_layers, const float *lnf_w, const float *lnf_b,
                      float eps, float *h, float *out, int64_t rows, int64_t n_embd, int64_t n_head,
                      int64_t n_inner, const int64_t *slots, const int32_t *tables, int64_t table_stride,
                      const int32_t *seq_lens, int64_t block_size, int64_t heads_per_item, int64_t max_seq_len,
                      float *work, uint8_t *qwork, float *attn_scratch, int num_threads) {
    const int64_t head_dim = n_embd / n_head;
    float *x = work, *qkv = x + rows * n_embd, *att = qkv + rows * 3 * n_embd, *f = att + rows * n_embd;
    const int64_t widest = n_inner > n_embd ? n_inner : n_embd;
    const int64_t xq_bytes = (rows * (widest + QBLOCK) + 63) & ~(int64_t)63;
    float *xs = (float *)(qwork + xq_bytes);
    const int64_t scales_bytes = (rows * (widest / QBLOCK + 1) * (int64_t)sizeof(float) + 63) & ~(int64_t)63;
    int32_t *xsum = (int32_t *)(qwork + xq_bytes + scales_bytes);
    for (int64_t l = 0; l < n_layers; l++) {
        const native_layer *L = layers + l;
        layer_norm(h, rows, n_embd, L->ln1_w, L->ln1_b, eps, x);
        apply_linear(&L->c_attn, x, rows, qkv, 0, qwork, xs, xsum, num_threads);
        write_kv_cache(qkv + n_embd, qkv + 2 * n_embd, 3 * n_embd, rows, slots, L->k_cache, L->v_cache, L->k_scales,
                       L->v_scales, L->kv_dtype, n_head, head_dim);
        decode_attention(qkv, 3 * n_embd, L->k_cache, L->v_cache, L->k_scales, L->v_scales, (int)L->kv_dtype, tables,
                         table_stride, seq_lens, att, rows, n_head, head_dim, block_size, heads_per_item, L->attn_scale,
                         attn_scratch, max_seq_len, num_threads);
        apply_linear(&L->attn_proj, att, rows, h, 1, qwork, xs, xsum, num_threads);
        layer_norm(h, rows, n_embd, L->ln2_w, L->ln2_b, eps, x);
        apply_linear(&L->c_fc, x, rows, f, 0, qwork, xs, xsum, num_threads);
        gelu_tanh(f, rows * n_inner, num_threads);
        apply_linear(&L->mlp_proj, f, rows, h, 1, qwork, xs, xsum, num_threads);
    }
    layer_norm(h, rows, n_embd, lnf_w, lnf_b, eps, out);
}
