/* The interface of the native CPU kernels (cpu_kernels.c), shared by the build and the Python side.
 *
 * lmservice/kernels/cpu_native.py declares the same functions and structs with ctypes. At load it asks the
 * library for native_abi_version() and native_abi_layout() and refuses a library whose version, struct sizes
 * or field offsets differ from its declarations (tests/kernels/test_native_abi.py builds one that differs).
 * NOTE: bump LMSERVICE_KERNELS_ABI_VERSION (and cpu_native.ABI_VERSION) on any change to a signature or
 * struct below: a changed argument list cannot be seen from outside the library, a changed struct can.
 */
#ifndef LMSERVICE_CPU_KERNELS_H
#define LMSERVICE_CPU_KERNELS_H

#include <stdint.h>

#define LMSERVICE_KERNELS_ABI_VERSION 4

/* KV-cache storage formats (native_layer.kv_dtype, the kv_dtype arguments; lmservice/kernels/kv_cache.py): fp32,
 * IEEE half, bfloat16, or int8 with one fp32 scale per token and head in a scales array beside the cache. */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_I8 = 3 };

/* One projection of the decode step: fp32 or bfloat16 weight (out, in) row-major, int8 packed with per-channel
 * scales (see linear_few_rows_q8), or 8- or 4-bit blocks with per-block scales (bscale set; see
 * linear_few_rows_qblock). Activations and biases are fp32 whatever the weights. */
typedef struct {
    const float *w;         /* fp32 weight (out, in), or NULL for int8 */
    const int8_t *wq;       /* int8 weight packed (ceil(out / 16), ceil(in / 4), 16, 4), or blocks packed, or NULL */
    const int32_t *wsum;    /* per-channel int8: per channel, the sum of its weights */
    const float *scale;     /* per-channel int8: per channel scale */
    const uint16_t *bscale; /* blocks: fp16 scales (ceil(out / 16), ceil(in / 32), 16), else NULL */
    const float *bias;      /* or NULL */
    int64_t in, out;
    int64_t bits;           /* blocks: 8 or 4 */
    const uint16_t *wb;     /* bfloat16 weight (out, in), or NULL */
} native_linear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    native_linear c_attn, attn_proj, c_fc, mlp_proj;
    void *k_cache, *v_cache;    /* (num_blocks, block_size, n_head, head_dim) in kv_dtype */
    float *k_scales, *v_scales; /* KV_I8: (num_blocks, block_size, n_head), else NULL */
    int64_t kv_dtype;           /* KV_F32, KV_F16, KV_BF16 or KV_I8 */
    float attn_scale;
} native_layer;

/* The ABI check: the version above, and the layout (sizes and offsets, in bytes) of the structs in the order
 * native_abi_layout documents; writes at most `capacity` values and returns how many there are. */
int64_t native_abi_version(void);
int64_t native_abi_layout(int64_t *out, int64_t capacity);

/* Which int8 kernel the library was built with: 2 AVX-512 VNNI, 1 AVX2 (vpmaddubsw), 0 none (linear_few_rows_q8
 * absent). */
int native_q8(void);

/* k_cache, v_cache in kv_dtype; k_scales, v_scales: KV_I8's, else NULL */
void paged_decode_attention(const float *q, int64_t q_seq_stride, const void *k_cache, const void *v_cache,
                            const float *k_scales, const float *v_scales, int64_t kv_dtype, const int32_t *tables,
                            int64_t table_stride, const int32_t *seq_lens, float *out, int64_t num_seqs,
                            int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t heads_per_item,
                            float scale, float *scratch, int64_t max_seq_len, int num_threads);

/* K and V of `rows` tokens (fp32 rows of n_head * head_dim values, `row_stride` floats apart) into their cache slots
 * (slot -1: skipped), converted to kv_dtype: round to nearest even, int8 with a scale per head (NaN for a head
 * holding NaN or infinity). */
void write_kv_cache(const float *k, const float *v, int64_t row_stride, int64_t rows, const int64_t *slots,
                    void *k_cache, void *v_cache, float *k_scales, float *v_scales, int64_t kv_dtype, int64_t n_head,
                    int64_t head_dim);

void linear_few_rows_f32(const float *x, int64_t rows, int64_t in, const float *w, const float *bias, float *y,
                         int64_t out, int num_threads);

/* linear_few_rows_f32 with a bfloat16 weight, widened to fp32 as it is read (fp32 products and sums) */
void linear_few_rows_bf16(const float *x, int64_t rows, int64_t in, const uint16_t *w, const float *bias, float *y,
                          int64_t out, int num_threads);

void linear_few_rows_q8(const float *x, int64_t rows, int64_t in, const int8_t *wp, const int32_t *wsum,
                        const float *scale, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                        int num_threads);

/* y = quant(x) @ W.T + bias, W in blocks of 32 inputs with fp16 scales, `bits` 8 or 4 (packed: cpu_native.py
 * pack_block_weight), x quantized per block of 32 too; xq: rows * ceil(in / 32) * 32 bytes, xs and xsum:
 * rows * ceil(in / 32) floats and int32.
 * Where native_q8() is 0 it is absent. */
void linear_few_rows_qblock(const float *x, int64_t rows, int64_t in, const uint8_t *wp, const uint16_t *scales,
                            int64_t bits, const float *bias, float *y, int64_t out, uint8_t *xq, float *xs,
                            int32_t *xsum, int num_threads);

void gpt2_decode_step(const native_layer *layers, int64_t n_layers, const float *lnf_w, const float *lnf_b,
                      float eps, float *h, float *out, int64_t rows, int64_t n_embd, int64_t n_head,
                      int64_t n_inner, const int64_t *slots, const int32_t *tables, int64_t table_stride,
                      const int32_t *seq_lens, int64_t block_size, int64_t heads_per_item, int64_t max_seq_len,
                      float *work, uint8_t *qwork, float *attn_scratch, int num_threads);

#endif
