/* splitnode's CPU kernels: the decoder layer's attention and elementwise work, each one pass over
 * its data with the threads of torch's own OpenMP runtime (the .so links libgomp.so.1, which torch
 * has already loaded: one thread pool, not two).
 *
 * Built by kernels/cpu.py with the system's C compiler on first use (-O3 -march=native -fopenmp)
 * and cached; called through ctypes with tensors' data pointers and strides. Every function has a
 * float32 and a bfloat16 form from one macro body; bfloat16 values are loaded to float32, computed
 * there, and rounded where the torch reference (kernels/fused.py, kernels/paged_attention.py)
 * rounds, so the results match it to the rounding of the dtype.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float ld_f32(const float *p, int64_t i) { return p[i]; }
static inline float ld_bf16(const bf16 *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float rnd_f32(float x) { return x; }
static inline bf16 to_bf16(float x) { /* round to nearest even, as torch rounds; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (bf16)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
}
static inline float rnd_bf16(float x) { /* x rounded to bfloat16, as a float */
    bf16 b = to_bf16(x);
    return ld_bf16(&b, 0);
}
static inline void st_f32(float *p, int64_t i, float x) { p[i] = x; }
static inline void st_bf16(bf16 *p, int64_t i, float x) { p[i] = to_bf16(x); }

/* exp in float32, vectorizable (glibc's expf is not, without -ffast-math): Cephes' polynomial on
 * x - n ln2, scaled by 2^n; within 2 ulp of expf over the float range, 0 below -87.3. */
static inline float exp_f(float x) {
    float c = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round to nearest: 1.5 * 2^23 */
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float sc;
    memcpy(&sc, &bits, 4);
    return x < -87.3f ? 0.f : p * sc;
}

/* Work below this many elements runs on the calling thread: a fork/join costs more than it saves. */
#define PAR_MIN 32768

/* ---- RMSNorm, with the residual add before it ------------------------------------------------
 * x, res, y, s: [T, N] rows at the given strides; w: [N]. s = x + res (rounded to the dtype);
 * y = w * (s * rsqrt(mean(s^2) + eps)), normalised in float32 and rounded before the weight (as
 * transformers). res NULL: no add, s unused. */
#define DEFINE_RMS_NORM(SFX, T)                                                                     \
    void rms_norm_##SFX(const T *x, int64_t sx, const T *res, int64_t sr, const T *w, T *y,        \
                        int64_t sy, T *s, int64_t ss, int64_t rows, int64_t n, float eps) {        \
        _Pragma("omp parallel for schedule(static) if (rows * n >= PAR_MIN)")                      \
        for (int64_t t = 0; t < rows; t++) {                                                       \
            float buf[n];                                                                           \
            float sq = 0.f;                                                                         \
            if (res) {                                                                              \
                _Pragma("omp simd reduction(+ : sq)")                                              \
                for (int64_t i = 0; i < n; i++) {                                                   \
                    float v = rnd_##SFX(ld_##SFX(x, t * sx + i) + ld_##SFX(res, t * sr + i));       \
                    st_##SFX(s, t * ss + i, v);                                                     \
                    buf[i] = v;                                                                     \
                    sq += v * v;                                                                    \
                }                                                                                   \
            } else {                                                                                \
                _Pragma("omp simd reduction(+ : sq)")                                              \
                for (int64_t i = 0; i < n; i++) {                                                   \
                    float v = ld_##SFX(x, t * sx + i);                                              \
                    buf[i] = v;                                                                     \
                    sq += v * v;                                                                    \
                }                                                                                   \
            }                                                                                       \
            float inv = 1.f / sqrtf(sq / (float)n + eps);                                           \
            _Pragma("omp simd")                                                                     \
            for (int64_t i = 0; i < n; i++)                                                         \
                st_##SFX(y, t * sy + i, ld_##SFX(w, i) * rnd_##SFX(buf[i] * inv));                  \
        }                                                                                           \
    }
DEFINE_RMS_NORM(f32, float)
DEFINE_RMS_NORM(bf16, bf16)

/* ---- Rotary embedding of q and k, in place (rotate-half), optional per-head RMSNorm first -----
 * x: [T, heads, D] with token stride sx and head stride D... given as hs; cos/sin: [T, D]
 * contiguous. As the reference: x * cos + cat(-x2, x1) * sin, each product rounded to the dtype,
 * then the sum. */
#define DEFINE_ROTARY(SFX, T)                                                                       \
    static void rotary_one_##SFX(T *x, const T *c, const T *sn, const T *w, int64_t d, float eps) { \
        float v[d];                                                                                 \
        for (int64_t i = 0; i < d; i++) v[i] = ld_##SFX(x, i);                                      \
        if (w) {                                                                                    \
            float sq = 0.f;                                                                         \
            for (int64_t i = 0; i < d; i++) sq += v[i] * v[i];                                      \
            float inv = 1.f / sqrtf(sq / (float)d + eps);                                           \
            for (int64_t i = 0; i < d; i++) v[i] = rnd_##SFX(ld_##SFX(w, i) * rnd_##SFX(v[i] * inv)); \
        }                                                                                           \
        int64_t h = d / 2;                                                                          \
        _Pragma("omp simd")                                                                         \
        for (int64_t i = 0; i < h; i++) {                                                           \
            float a = v[i], b = v[i + h];                                                           \
            st_##SFX(x, i, rnd_##SFX(a * ld_##SFX(c, i)) + rnd_##SFX(-b * ld_##SFX(sn, i)));        \
            st_##SFX(x, i + h, rnd_##SFX(b * ld_##SFX(c, i + h)) + rnd_##SFX(a * ld_##SFX(sn, i + h))); \
        }                                                                                           \
    }                                                                                               \
    void rotary_qk_##SFX(T *q, int64_t sq, int64_t hq, T *k, int64_t sk, int64_t hk, const T *c,   \
                         const T *sn, const T *qw, const T *kw, int64_t rows, int64_t nq,          \
                         int64_t nk, int64_t d, float eps) {                                        \
        _Pragma("omp parallel for schedule(static) if (rows * (nq + nk) * d >= PAR_MIN)")          \
        for (int64_t t = 0; t < rows; t++) {                                                        \
            for (int64_t j = 0; j < nq; j++) rotary_one_##SFX(q + t * sq + j * hq, c + t * d, sn + t * d, qw, d, eps); \
            for (int64_t j = 0; j < nk; j++) rotary_one_##SFX(k + t * sk + j * hk, c + t * d, sn + t * d, kw, d, eps); \
        }                                                                                           \
    }
DEFINE_ROTARY(f32, float)
DEFINE_ROTARY(bf16, bf16)

/* ---- SiLU-and-mul ------------------------------------------------------------------------------
 * gu: [T, 2I] (gate first), row stride sg; y: [T, I] contiguous. silu(gate) rounded, times up. */
#define DEFINE_SILU_MUL(SFX, T)                                                                     \
    void silu_and_mul_##SFX(const T *gu, int64_t sg, T *y, int64_t rows, int64_t inter) {           \
        _Pragma("omp parallel for schedule(static) if (rows * inter >= PAR_MIN)")                  \
        for (int64_t t = 0; t < rows; t++) {                                                        \
            const T *g = gu + t * sg, *u = g + inter;                                               \
            _Pragma("omp simd")                                                                     \
            for (int64_t i = 0; i < inter; i++) {                                                   \
                float a = ld_##SFX(g, i);                                                           \
                st_##SFX(y, t * inter + i, rnd_##SFX(a / (1.f + exp_f(-a))) * ld_##SFX(u, i));       \
            }                                                                                       \
        }                                                                                           \
    }
DEFINE_SILU_MUL(f32, float)
DEFINE_SILU_MUL(bf16, bf16)

/* ---- Decode attention over the paged cache -----------------------------------------------------
 * q: [B, H, D] (token stride sq, head stride D); caches [num_blocks, bs, Hkv, D] contiguous;
 * tables: [B, table_stride] int32; lens: [B] int32 (tokens in the cache, the new one included);
 * out: [B, H, D] contiguous. One work item per (sequence, KV head): the group's G query heads
 * read each K row and each V row once (two passes: scores, then the weighted sum of V), in float32. */
#define DEFINE_DECODE(SFX, T)                                                                       \
    GENERIC_LINKAGE void paged_decode_##SFX(const T *q, int64_t sq, const T *kc, const T *vc, const int32_t *tables, \
                            int64_t table_stride, const int32_t *lens, int64_t batch, int64_t heads, \
                            int64_t kv_heads, int64_t d, int64_t bs, float scale, T *out) {        \
        int64_t g = heads / kv_heads, tok = kv_heads * d;                                           \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) if (batch * kv_heads > 1)")     \
        for (int64_t b = 0; b < batch; b++) {                                                       \
            for (int64_t h = 0; h < kv_heads; h++) {                                                \
                int64_t len = lens[b];                                                              \
                const int32_t *tab = tables + b * table_stride;                                     \
                float *sc = malloc(sizeof(float) * (size_t)(g * len + g * d + g * d));              \
                float *qf = sc + g * len, *acc = qf + g * d;                                        \
                for (int64_t j = 0; j < g; j++)                                                     \
                    for (int64_t i = 0; i < d; i++) {                                               \
                        qf[j * d + i] = ld_##SFX(q, b * sq + (h * g + j) * d + i) * scale;          \
                        acc[j * d + i] = 0.f;                                                       \
                    }                                                                               \
                for (int64_t p0 = 0; p0 < len; p0 += bs) {                                          \
                    const T *kb = kc + (int64_t)tab[p0 / bs] * bs * tok + h * d;                    \
                    int64_t n = len - p0 < bs ? len - p0 : bs;                                      \
                    for (int64_t t = 0; t < n; t++)                                                 \
                        for (int64_t j = 0; j < g; j++) {                                           \
                            float s = 0.f;                                                          \
                            _Pragma("omp simd reduction(+ : s)")                                   \
                            for (int64_t i = 0; i < d; i++) s += qf[j * d + i] * ld_##SFX(kb + t * tok, i); \
                            sc[j * len + p0 + t] = s;                                               \
                        }                                                                           \
                }                                                                                   \
                for (int64_t j = 0; j < g; j++) {                                                   \
                    float m = -INFINITY, sum = 0.f, *r = sc + j * len;                              \
                    _Pragma("omp simd reduction(max : m)") for (int64_t p = 0; p < len; p++) m = r[p] > m ? r[p] : m;                      \
                    _Pragma("omp simd reduction(+ : sum)")                                         \
                    for (int64_t p = 0; p < len; p++) {                                             \
                        r[p] = exp_f(r[p] - m);                                                     \
                        sum += r[p];                                                                \
                    }                                                                               \
                    float inv = 1.f / sum;                                                          \
                    for (int64_t p = 0; p < len; p++) r[p] *= inv;                                  \
                }                                                                                   \
                for (int64_t p0 = 0; p0 < len; p0 += bs) {                                          \
                    const T *vb = vc + (int64_t)tab[p0 / bs] * bs * tok + h * d;                    \
                    int64_t n = len - p0 < bs ? len - p0 : bs;                                      \
                    for (int64_t t = 0; t < n; t++)                                                 \
                        for (int64_t j = 0; j < g; j++) {                                           \
                            float pj = sc[j * len + p0 + t], *a = acc + j * d;                      \
                            _Pragma("omp simd")                                                     \
                            for (int64_t i = 0; i < d; i++) a[i] += pj * ld_##SFX(vb + t * tok, i); \
                        }                                                                           \
                }                                                                                   \
                for (int64_t j = 0; j < g; j++)                                                     \
                    for (int64_t i = 0; i < d; i++)                                                 \
                        st_##SFX(out, (b * heads + h * g + j) * d + i, acc[j * d + i]);             \
                free(sc);                                                                           \
            }                                                                                       \
        }                                                                                           \
    }
#ifdef __AVX512F__ /* the generic loop is the AVX-512 path's fallback for other shapes */
#define GENERIC_LINKAGE static
#define paged_decode_f32 paged_decode_generic_f32
#define paged_decode_bf16 paged_decode_generic_bf16
#else /* it is the kernel */
#define GENERIC_LINKAGE
#endif
DEFINE_DECODE(f32, float)
DEFINE_DECODE(bf16, bf16)
#undef paged_decode_f32
#undef paged_decode_bf16

#ifdef __AVX512F__
/* The same with AVX-512 for the usual shapes (head_dim 64 or 128; a GQA group of 1, 2, 4 or 8):
 * the group's queries and the running output stay in registers, each K and V row is loaded once
 * per group. */
#include <immintrin.h>
#include <omp.h>
static inline __m512 v_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 v_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define DEFINE_DECODE_ITEM(SFX, T, D, G)                                                            \
    static void decode_item_##SFX##_##D##_##G(const T *q, const T *kc, const T *vc, const int32_t *tab, \
                                               int64_t len, int64_t tok, int64_t bs, float scale,   \
                                               float *sc, T *out) {                                 \
        enum { C = D / 16 };                                                                        \
        __m512 qv[G][C], acc[G][C];                                                                 \
        for (int j = 0; j < G; j++)                                                                 \
            for (int c = 0; c < C; c++) {                                                           \
                float tmp[16];                                                                      \
                for (int i = 0; i < 16; i++) tmp[i] = ld_##SFX(q, j * D + c * 16 + i) * scale;      \
                qv[j][c] = _mm512_loadu_ps(tmp);                                                    \
                acc[j][c] = _mm512_setzero_ps();                                                    \
            }                                                                                       \
        for (int64_t p0 = 0; p0 < len; p0 += bs) {                                                  \
            const T *kb = kc + (int64_t)tab[p0 / bs] * bs * tok;                                    \
            const T *kb_next = p0 + bs < len ? kc + (int64_t)tab[p0 / bs + 1] * bs * tok : kb;      \
            int64_t n = len - p0 < bs ? len - p0 : bs;                                              \
            for (int64_t t = 0; t < n; t++) {                                                       \
                __m512 kv[C];                                                                       \
                for (int c = 0; c < C; c++) kv[c] = v_##SFX(kb + t * tok + c * 16);                 \
                for (int c = 0; c < (int)(C * sizeof(T) * 16); c += 64) /* the next block's row, ahead */ \
                    _mm_prefetch((const char *)(kb_next + t * tok) + c, _MM_HINT_T0);                   \
                for (int j = 0; j < G; j++) {                                                       \
                    __m512 s = _mm512_mul_ps(qv[j][0], kv[0]);                                      \
                    for (int c = 1; c < C; c++) s = _mm512_fmadd_ps(qv[j][c], kv[c], s);            \
                    sc[j * len + p0 + t] = _mm512_reduce_add_ps(s);                                 \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int j = 0; j < G; j++) {                                                               \
            float m = -INFINITY, sum = 0.f, *r = sc + j * len;                                      \
            for (int64_t p = 0; p < len; p++) m = r[p] > m ? r[p] : m;                              \
            _Pragma("omp simd reduction(+ : sum)")                                                 \
            for (int64_t p = 0; p < len; p++) {                                                     \
                r[p] = exp_f(r[p] - m);                                                             \
                sum += r[p];                                                                        \
            }                                                                                       \
            float inv = 1.f / sum;                                                                  \
            _Pragma("omp simd")                                                                     \
            for (int64_t p = 0; p < len; p++) r[p] *= inv;                                          \
        }                                                                                           \
        for (int64_t p0 = 0; p0 < len; p0 += bs) {                                                  \
            const T *vb = vc + (int64_t)tab[p0 / bs] * bs * tok;                                    \
            const T *vb_next = p0 + bs < len ? vc + (int64_t)tab[p0 / bs + 1] * bs * tok : vb;      \
            int64_t n = len - p0 < bs ? len - p0 : bs;                                              \
            for (int64_t t = 0; t < n; t++) {                                                       \
                __m512 vv[C];                                                                       \
                for (int c = 0; c < C; c++) vv[c] = v_##SFX(vb + t * tok + c * 16);                 \
                for (int c = 0; c < (int)(C * sizeof(T) * 16); c += 64) /* the next block's row, ahead */ \
                    _mm_prefetch((const char *)(vb_next + t * tok) + c, _MM_HINT_T0);                   \
                for (int j = 0; j < G; j++) {                                                       \
                    __m512 pj = _mm512_set1_ps(sc[j * len + p0 + t]);                               \
                    for (int c = 0; c < C; c++) acc[j][c] = _mm512_fmadd_ps(pj, vv[c], acc[j][c]);  \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int j = 0; j < G; j++)                                                                 \
            for (int c = 0; c < C; c++) {                                                           \
                float tmp[16];                                                                      \
                _mm512_storeu_ps(tmp, acc[j][c]);                                                   \
                for (int i = 0; i < 16; i++) st_##SFX(out, j * D + c * 16 + i, tmp[i]);             \
            }                                                                                       \
    }
#define DEFINE_DECODE_ITEMS(SFX, T, D)                                                              \
    DEFINE_DECODE_ITEM(SFX, T, D, 1) DEFINE_DECODE_ITEM(SFX, T, D, 2) DEFINE_DECODE_ITEM(SFX, T, D, 4) \
    DEFINE_DECODE_ITEM(SFX, T, D, 8)
DEFINE_DECODE_ITEMS(f32, float, 64)
DEFINE_DECODE_ITEMS(f32, float, 128)
DEFINE_DECODE_ITEMS(bf16, bf16, 64)
DEFINE_DECODE_ITEMS(bf16, bf16, 128)
#define ITEM_CASE(SFX, D, G) if (d == D && g == G) fn = decode_item_##SFX##_##D##_##G;
#define DEFINE_DECODE_FAST(SFX, T)                                                                  \
    void paged_decode_##SFX(const T *q, int64_t sq, const T *kc, const T *vc, const int32_t *tables, \
                            int64_t table_stride, const int32_t *lens, int64_t batch, int64_t heads, \
                            int64_t kv_heads, int64_t d, int64_t bs, float scale, T *out) {        \
        int64_t g = heads / kv_heads, tok = kv_heads * d;                                           \
        void (*fn)(const T *, const T *, const T *, const int32_t *, int64_t, int64_t, int64_t, float, float *, T *) = 0; \
        ITEM_CASE(SFX, 64, 1) ITEM_CASE(SFX, 64, 2) ITEM_CASE(SFX, 64, 4) ITEM_CASE(SFX, 64, 8)     \
        ITEM_CASE(SFX, 128, 1) ITEM_CASE(SFX, 128, 2) ITEM_CASE(SFX, 128, 4) ITEM_CASE(SFX, 128, 8) \
        if (!fn) {                                                                                  \
            paged_decode_generic_##SFX(q, sq, kc, vc, tables, table_stride, lens, batch, heads, kv_heads, d, bs, scale, out); \
            return;                                                                                 \
        }                                                                                           \
        /* a work item per sequence, its KV heads one after another (a head's rows are interleaved   \
         * with the others' in each cache block: the later heads find them in the cache); per       \
         * (sequence, head) when there are fewer sequences than threads. */                         \
        int64_t split = batch < 2 * omp_get_max_threads() ? kv_heads : 1, hn = kv_heads / split;     \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) if (batch * split > 1)")        \
        for (int64_t b = 0; b < batch; b++)                                                         \
            for (int64_t s = 0; s < split; s++) {                                                   \
                float *sc = malloc(sizeof(float) * (size_t)(g * lens[b]));                          \
                for (int64_t h = s * hn; h < (s + 1) * hn; h++)                                     \
                    fn(q + b * sq + h * g * d, kc + h * d, vc + h * d, tables + b * table_stride, lens[b], tok, bs, \
                       scale, sc, out + (b * heads + h * g) * d);                                   \
                free(sc);                                                                           \
            }                                                                                       \
    }
DEFINE_DECODE_FAST(f32, float)
DEFINE_DECODE_FAST(bf16, bf16)
/* ---- Prefill attention (causal), AVX-512 ------------------------------------------------------
 * One prompt chunk: q [Lq, H, D] at the last Lq positions of k/v [Lk, Hkv, D] (token strides
 * sq/sk/sv, heads contiguous), out [Lq, H, D] at token stride so. Flash attention in float32: K is
 * transposed (and V converted) once per KV head; a work item is a KV head's tile of 128 query rows
 * (the GQA group's rows share its K/V); within it, blocks of 8 rows take 32 keys at a time: scores
 * as outer products in 16 registers, an online softmax, then the weighted V rows into the block's
 * output. Returns 0 for a head_dim it has no form for (the caller takes torch's path). */
static inline __m512 exp512(__m512 x) { /* exp_f's polynomial with FMAs, scaled by 2^n in one vscalefps */
    __m512 c = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ); /* NaN: not kept, 0 */
    return _mm512_maskz_scalef_ps(keep, p, n);
}

/* One row's step of 32 scores s[2] in the online softmax: the keys past the row's `see` masked,
 * the running maximum m and sum l updated, the step's weights p0/p1 (relative to the new
 * maximum); returns the factor the row's output so far is rescaled by. */
/* exp(d * inv_t) (c = inv_t * log2(e); d * inv_t up to ~80) through 2^y: y = d * c, 2^frac(y) by a
 * degree-5 near-minimax polynomial (relative error 2.4e-7 in float, to 4e-6 at -83 through y's
 * rounding), scaled by 2^round(y) in one vscalefps: 10 operations where exp512 takes 16. NaN and
 * +inf in d give NaN (the clamp keeps its second operand's NaN). For sums (the block masses of
 * sample_plain and top_p_row), not for the values a draw compares. */
static inline __m512 exp2_fast512(__m512 d, __m512 c) {
    __m512 y = _mm512_max_ps(_mm512_set1_ps(-150.f), _mm512_mul_ps(d, c));
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(1.3276471291e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6755418926e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5507130921e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022120237e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314694405e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192f));
    return _mm512_scalef_ps(p, n);
}

static inline float online_softmax(__m512 s[2], int64_t see, float *m, float *l, __m512 *p0, __m512 *p1) {
    if (see < 32) {
        __mmask16 m0 = see >= 16 ? 0xffff : see <= 0 ? 0 : (__mmask16)((1u << see) - 1);
        __mmask16 m1 = see <= 16 ? 0 : (__mmask16)((1u << (see - 16)) - 1);
        s[0] = _mm512_mask_blend_ps(m0, _mm512_set1_ps(-INFINITY), s[0]);
        s[1] = _mm512_mask_blend_ps(m1, _mm512_set1_ps(-INFINITY), s[1]);
    }
    float mx = _mm512_reduce_max_ps(_mm512_max_ps(s[0], s[1]));
    float mn = mx > *m ? mx : *m;
    float corr = exp_f(*m - mn);
    __m512 mv = _mm512_set1_ps(mn);
    *p0 = exp512(_mm512_sub_ps(s[0], mv));
    *p1 = exp512(_mm512_sub_ps(s[1], mv));
    *l = *l * corr + _mm512_reduce_add_ps(_mm512_add_ps(*p0, *p1));
    *m = mn;
    return corr;
}

#define PF_RB 8    /* query rows per block (32 keys a step: two registers of scores) */
#define PF_KC 32   /* keys per step */
#define PF_TILE 128 /* query rows per work item */
#define DEFINE_PREFILL(SFX, T, D)                                                                   \
    static void prefill_##SFX##_##D(const T *q, int64_t sq, const T *k, int64_t sk, const T *v,      \
                                    int64_t sv, int64_t lq, int64_t lk, int64_t heads, int64_t kv_heads, \
                                    float scale, T *out, int64_t so) {                              \
        enum { C = D / 16 };                                                                        \
        int64_t g = heads / kv_heads, offset = lk - lq, lkp = (lk + PF_KC - 1) / PF_KC * PF_KC;     \
        float *kt = aligned_alloc(64, sizeof(float) * (size_t)(kv_heads * D * lkp + 16));           \
        float *vf = aligned_alloc(64, sizeof(float) * (size_t)(kv_heads * lkp * D + 16));           \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                   \
        for (int64_t h = 0; h < kv_heads; h++)                                                      \
            for (int64_t j0 = 0; j0 < lkp; j0 += PF_KC)                                             \
                for (int64_t j = j0; j < j0 + PF_KC; j++)                                           \
                    for (int64_t i = 0; i < D; i++) {                                               \
                        kt[(h * D + i) * lkp + j] = j < lk ? ld_##SFX(k, j * sk + h * D + i) : 0.f;  \
                        vf[(h * lkp + j) * D + i] = j < lk ? ld_##SFX(v, j * sv + h * D + i) : 0.f;  \
                    }                                                                               \
        int64_t rows = lq * g, tiles = (rows + PF_TILE - 1) / PF_TILE;                              \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
        for (int64_t h = 0; h < kv_heads; h++)                                                      \
            for (int64_t tile = 0; tile < tiles; tile++) {                                          \
                int64_t tile_end = (tile + 1) * PF_TILE < rows ? (tile + 1) * PF_TILE : rows;       \
                for (int64_t r0 = tile * PF_TILE; r0 < tile_end; r0 += PF_RB) {                     \
                    float qp[PF_RB][D] __attribute__((aligned(64)));                                \
                    float o[PF_RB][D] __attribute__((aligned(64)));                                 \
                    float pr[PF_RB][PF_KC] __attribute__((aligned(64)));                            \
                    float m[PF_RB], l[PF_RB], corr[PF_RB];                                          \
                    int64_t lim[PF_RB], kend = 0;                                                   \
                    for (int rr = 0; rr < PF_RB; rr++) {                                            \
                        int64_t r = r0 + rr, t = r / g, jj = r % g;                                 \
                        lim[rr] = r < tile_end ? offset + t : 0;                                    \
                        kend = lim[rr] + 1 > kend ? lim[rr] + 1 : kend;                             \
                        for (int i = 0; i < D; i++) {                                               \
                            qp[rr][i] = r < tile_end ? ld_##SFX(q, t * sq + (h * g + jj) * D + i) * scale : 0.f; \
                            o[rr][i] = 0.f;                                                         \
                        }                                                                           \
                        m[rr] = -INFINITY;                                                          \
                        l[rr] = 0.f;                                                                \
                    }                                                                               \
                    const float *ktr = kt + h * D * lkp, *vfr = vf + h * lkp * D;                   \
                    for (int64_t j0 = 0; j0 < kend; j0 += PF_KC) {                                  \
                        __m512 s[PF_RB][2];                                                         \
                        for (int rr = 0; rr < PF_RB; rr++) s[rr][0] = s[rr][1] = _mm512_setzero_ps(); \
                        for (int i = 0; i < D; i++) {                                               \
                            __m512 k0 = _mm512_load_ps(ktr + i * lkp + j0);                         \
                            __m512 k1 = _mm512_load_ps(ktr + i * lkp + j0 + 16);                    \
                            for (int rr = 0; rr < PF_RB; rr++) {                                    \
                                __m512 qb = _mm512_set1_ps(qp[rr][i]);                              \
                                s[rr][0] = _mm512_fmadd_ps(qb, k0, s[rr][0]);                       \
                                s[rr][1] = _mm512_fmadd_ps(qb, k1, s[rr][1]);                       \
                            }                                                                       \
                        }                                                                           \
                        for (int rr = 0; rr < PF_RB; rr++) {                                        \
                            __m512 p0, p1;                                                          \
                            corr[rr] = online_softmax(s[rr], lim[rr] - j0 + 1, &m[rr], &l[rr], &p0, &p1); \
                            _mm512_store_ps(pr[rr], p0);                                            \
                            _mm512_store_ps(pr[rr] + 16, p1);                                       \
                        }                                                                           \
                        for (int rq = 0; rq < PF_RB; rq += 4) {                                     \
                            __m512 acc[4][C];                                                       \
                            for (int a = 0; a < 4; a++) {                                           \
                                __m512 cv = _mm512_set1_ps(corr[rq + a]);                           \
                                for (int c = 0; c < C; c++) acc[a][c] = _mm512_mul_ps(_mm512_load_ps(o[rq + a] + c * 16), cv); \
                            }                                                                       \
                            for (int jj = 0; jj < PF_KC; jj++) {                                    \
                                const float *vr = vfr + (j0 + jj) * D;                              \
                                __m512 vv[C];                                                       \
                                for (int c = 0; c < C; c++) vv[c] = _mm512_load_ps(vr + c * 16);    \
                                for (int a = 0; a < 4; a++) {                                       \
                                    __m512 pb = _mm512_set1_ps(pr[rq + a][jj]);                     \
                                    for (int c = 0; c < C; c++) acc[a][c] = _mm512_fmadd_ps(pb, vv[c], acc[a][c]); \
                                }                                                                   \
                            }                                                                       \
                            for (int a = 0; a < 4; a++)                                             \
                                for (int c = 0; c < C; c++) _mm512_store_ps(o[rq + a] + c * 16, acc[a][c]); \
                        }                                                                           \
                    }                                                                               \
                    for (int rr = 0; rr < PF_RB && r0 + rr < tile_end; rr++) {                      \
                        int64_t r = r0 + rr, t = r / g, jj = r % g;                                 \
                        float inv = 1.f / l[rr];                                                    \
                        for (int i = 0; i < D; i++) st_##SFX(out, t * so + (h * g + jj) * D + i, o[rr][i] * inv); \
                    }                                                                               \
                }                                                                               \
            }                                                                                       \
        free(kt);                                                                                   \
        free(vf);                                                                                   \
    }
DEFINE_PREFILL(f32, float, 64)
DEFINE_PREFILL(f32, float, 128)
DEFINE_PREFILL(bf16, bf16, 64)
DEFINE_PREFILL(bf16, bf16, 128)
#ifdef __AVX512BF16__
/* bfloat16 on a CPU that multiplies it (AVX512-BF16): the same loop with both products as
 * vdpbf16ps, two bf16 products summed into each float32 lane per instruction. K is laid out in
 * pairs along D and V in pairs of keys; the scores stay float32 and are scaled after; the softmax
 * weights are rounded to bfloat16 for the second product, as torch's bfloat16 path rounds them. */
#define DEFINE_PREFILL_DP(D)                                                                        \
    static void prefill_dp_##D(const bf16 *q, int64_t sq, const bf16 *k, int64_t sk, const bf16 *v,  \
                               int64_t sv, int64_t lq, int64_t lk, int64_t heads, int64_t kv_heads,  \
                               float scale, bf16 *out, int64_t so) {                                \
        enum { C = D / 16, D2 = D / 2 };                                                            \
        int64_t g = heads / kv_heads, offset = lk - lq, lkp = (lk + PF_KC - 1) / PF_KC * PF_KC;     \
        uint32_t *kt = aligned_alloc(64, 4 * (size_t)(kv_heads * D2 * lkp + 16));  /* [Hkv][D/2][lkp] */ \
        uint32_t *vp = aligned_alloc(64, 4 * (size_t)(kv_heads * (lkp / 2) * D + 16)); /* [Hkv][lkp/2][D] */ \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                   \
        for (int64_t h = 0; h < kv_heads; h++)                                                      \
            for (int64_t j0 = 0; j0 < lkp; j0 += PF_KC) {                                           \
                for (int64_t j = j0; j < j0 + PF_KC; j++)                                           \
                    for (int64_t i = 0; i < D2; i++) {                                              \
                        const bf16 *kr = k + j * sk + h * D + 2 * i;                                \
                        kt[(h * D2 + i) * lkp + j] = j < lk ? (uint32_t)kr[0] | (uint32_t)kr[1] << 16 : 0u; \
                    }                                                                               \
                for (int64_t j = j0; j < j0 + PF_KC; j += 2)                                        \
                    for (int64_t i = 0; i < D; i++) {                                               \
                        uint32_t a = j < lk ? v[j * sv + h * D + i] : 0, b = j + 1 < lk ? v[(j + 1) * sv + h * D + i] : 0; \
                        vp[(h * (lkp / 2) + j / 2) * D + i] = a | b << 16;                          \
                    }                                                                               \
            }                                                                                       \
        int64_t rows = lq * g, tiles = (rows + PF_TILE - 1) / PF_TILE;                              \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
        for (int64_t h = 0; h < kv_heads; h++)                                                      \
            for (int64_t tile = 0; tile < tiles; tile++) {                                          \
                int64_t tile_end = (tile + 1) * PF_TILE < rows ? (tile + 1) * PF_TILE : rows;       \
                for (int64_t r0 = tile * PF_TILE; r0 < tile_end; r0 += PF_RB) {                     \
                    uint32_t qp[PF_RB][D2];                                                         \
                    float o[PF_RB][D] __attribute__((aligned(64)));                                 \
                    bf16 pr[PF_RB][PF_KC] __attribute__((aligned(64)));                             \
                    float m[PF_RB], l[PF_RB], corr[PF_RB];                                          \
                    int64_t lim[PF_RB], kend = 0;                                                   \
                    for (int rr = 0; rr < PF_RB; rr++) {                                            \
                        int64_t r = r0 + rr, t = r / g, jj = r % g;                                 \
                        lim[rr] = r < tile_end ? offset + t : 0;                                    \
                        kend = lim[rr] + 1 > kend ? lim[rr] + 1 : kend;                             \
                        const bf16 *qr = q + t * sq + (h * g + jj) * D;                             \
                        for (int i = 0; i < D2; i++)                                                \
                            qp[rr][i] = r < tile_end ? (uint32_t)qr[2 * i] | (uint32_t)qr[2 * i + 1] << 16 : 0u; \
                        for (int i = 0; i < D; i++) o[rr][i] = 0.f;                                 \
                        m[rr] = -INFINITY;                                                          \
                        l[rr] = 0.f;                                                                \
                    }                                                                               \
                    const uint32_t *ktr = kt + h * D2 * lkp, *vpr = vp + h * (lkp / 2) * D;         \
                    __m512 sc = _mm512_set1_ps(scale);                                              \
                    for (int64_t j0 = 0; j0 < kend; j0 += PF_KC) {                                  \
                        __m512 s[PF_RB][2];                                                         \
                        for (int rr = 0; rr < PF_RB; rr++) s[rr][0] = s[rr][1] = _mm512_setzero_ps(); \
                        for (int i = 0; i < D2; i++) {                                              \
                            __m512bh k0 = (__m512bh)_mm512_load_si512(ktr + i * lkp + j0);          \
                            __m512bh k1 = (__m512bh)_mm512_load_si512(ktr + i * lkp + j0 + 16);     \
                            for (int rr = 0; rr < PF_RB; rr++) {                                    \
                                __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qp[rr][i]);          \
                                s[rr][0] = _mm512_dpbf16_ps(s[rr][0], qb, k0);                      \
                                s[rr][1] = _mm512_dpbf16_ps(s[rr][1], qb, k1);                      \
                            }                                                                       \
                        }                                                                           \
                        for (int rr = 0; rr < PF_RB; rr++) {                                        \
                            s[rr][0] = _mm512_mul_ps(s[rr][0], sc);                                 \
                            s[rr][1] = _mm512_mul_ps(s[rr][1], sc);                                 \
                            __m512 p0, p1;                                                          \
                            corr[rr] = online_softmax(s[rr], lim[rr] - j0 + 1, &m[rr], &l[rr], &p0, &p1); \
                            _mm512_store_si512(pr[rr], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));       \
                        }                                                                           \
                        for (int rq = 0; rq < PF_RB; rq += 4) {                                     \
                            __m512 acc[4][C];                                                       \
                            for (int a = 0; a < 4; a++) {                                           \
                                __m512 cv = _mm512_set1_ps(corr[rq + a]);                           \
                                for (int c = 0; c < C; c++) acc[a][c] = _mm512_mul_ps(_mm512_load_ps(o[rq + a] + c * 16), cv); \
                            }                                                                       \
                            for (int j2 = 0; j2 < PF_KC / 2; j2++) {                                \
                                const uint32_t *vr = vpr + (j0 / 2 + j2) * D;                       \
                                __m512bh vv[C];                                                     \
                                for (int c = 0; c < C; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vr + c * 16); \
                                for (int a = 0; a < 4; a++) {                                       \
                                    uint32_t pp;                                                    \
                                    memcpy(&pp, &pr[rq + a][2 * j2], 4);                            \
                                    __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pp);             \
                                    for (int c = 0; c < C; c++) acc[a][c] = _mm512_dpbf16_ps(acc[a][c], pb, vv[c]); \
                                }                                                                   \
                            }                                                                       \
                            for (int a = 0; a < 4; a++)                                             \
                                for (int c = 0; c < C; c++) _mm512_store_ps(o[rq + a] + c * 16, acc[a][c]); \
                        }                                                                           \
                    }                                                                               \
                    for (int rr = 0; rr < PF_RB && r0 + rr < tile_end; rr++) {                      \
                        int64_t r = r0 + rr, t = r / g, jj = r % g;                                 \
                        float inv = 1.f / l[rr];                                                    \
                        for (int i = 0; i < D; i++) st_bf16(out, t * so + (h * g + jj) * D + i, o[rr][i] * inv); \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        free(kt);                                                                                   \
        free(vp);                                                                                   \
    }
DEFINE_PREFILL_DP(64)
DEFINE_PREFILL_DP(128)
#endif
/* Which bf16 form: vdpbf16ps (1, where built) or bf16 converted for float32 FMAs (0). The dot
 * product runs at twice the FMA rate on an AMD Zen 4 and at the same rate on an Intel Xeon, where
 * the conversion's form is 1.3-1.6x faster: kernels/cpu.py measures which, once per process. */
#ifdef __AVX512BF16__
static int bf16_dot = 1;
#endif
int set_bf16_dot(int on) {
#ifdef __AVX512BF16__
    bf16_dot = on != 0;
    return bf16_dot;
#else
    (void)on;
    return 0;
#endif
}
#ifdef __AVX512BF16__
#define DEFINE_PREFILL_PICK(D)                                                                      \
    static void prefill_pick_##D(const bf16 *q, int64_t sq, const bf16 *k, int64_t sk, const bf16 *v, \
                                 int64_t sv, int64_t lq, int64_t lk, int64_t heads, int64_t kv_heads, \
                                 float scale, bf16 *out, int64_t so) {                              \
        (bf16_dot ? prefill_dp_##D : prefill_bf16_##D)(q, sq, k, sk, v, sv, lq, lk, heads, kv_heads, scale, out, so); \
    }
#else
#define DEFINE_PREFILL_PICK(D)                                                                      \
    static void prefill_pick_##D(const bf16 *q, int64_t sq, const bf16 *k, int64_t sk, const bf16 *v, \
                                 int64_t sv, int64_t lq, int64_t lk, int64_t heads, int64_t kv_heads, \
                                 float scale, bf16 *out, int64_t so) {                              \
        prefill_bf16_##D(q, sq, k, sk, v, sv, lq, lk, heads, kv_heads, scale, out, so);             \
    }
#endif
DEFINE_PREFILL_PICK(64)
DEFINE_PREFILL_PICK(128)
#define DEFINE_PREFILL_ENTRY(SFX, IMPL, T)                                                          \
    int prefill_attention_##SFX(const T *q, int64_t sq, const T *k, int64_t sk, const T *v, int64_t sv, \
                                int64_t lq, int64_t lk, int64_t heads, int64_t kv_heads, int64_t d, \
                                float scale, T *out, int64_t so) {                                  \
        if (d == 64) IMPL##_64(q, sq, k, sk, v, sv, lq, lk, heads, kv_heads, scale, out, so);      \
        else if (d == 128) IMPL##_128(q, sq, k, sk, v, sv, lq, lk, heads, kv_heads, scale, out, so); \
        else return 0;                                                                              \
        return 1;                                                                                   \
    }
DEFINE_PREFILL_ENTRY(f32, prefill_f32, float)
DEFINE_PREFILL_ENTRY(bf16, prefill_pick, bf16)
#else
int prefill_attention_f32(void) { return 0; } /* no AVX-512: torch's path */
int prefill_attention_bf16(void) { return 0; }
int set_bf16_dot(int on) { (void)on; return 0; }
#endif

/* ---- Greedy: the argmax of each row ---------------------------------------------------------
 * x: float32 logits [m, V] at row stride sx. As torch.argmax: the first largest id, or the first
 * NaN's where the row has one. A row per thread once the batch is large enough to pay a fork. */
static int64_t argmax_row(const float *row, int64_t vocab) {
    int64_t i = 0, best_i = 0;
    float best = row[0];
#ifdef __AVX512F__
    if (vocab >= 16) {
        __m512 bv = _mm512_loadu_ps(row);
        __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), idx = bi;
        __m512i step = _mm512_set1_epi32(16);
        __mmask16 nan = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
        for (i = 16; i + 16 <= vocab; i += 16) { /* per lane its first largest (strictly greater) */
            __m512 v = _mm512_loadu_ps(row + i);
            idx = _mm512_add_epi32(idx, step);
            __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            bv = _mm512_mask_mov_ps(bv, gt, v);
            bi = _mm512_mask_mov_epi32(bi, gt, idx);
        }
        if (nan) { /* the first NaN */
            for (int64_t j = 0; j < vocab; j++)
                if (row[j] != row[j]) return j;
        }
        best = _mm512_reduce_max_ps(bv);
        __mmask16 at = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(best), _CMP_EQ_OQ);
        best_i = _mm512_mask_reduce_min_epi32(at, bi);
    }
#endif
    for (; i < vocab; i++) {
        float v = row[i];
        if (v != v) return i;
        if (v > best) best = v, best_i = i;
    }
    return best_i;
}

void argmax_rows(const float *x, int64_t sx, int64_t m, int64_t vocab, int64_t *out) {
    _Pragma("omp parallel for schedule(static) if (m > 1 && m * vocab >= (1 << 18))")
    for (int64_t r = 0; r < m; r++) out[r] = argmax_row(x + r * sx, vocab);
}

/* ---- Sampling: rows without top-k or top-p -----------------------------------------------------
 * x: float32 logits [m, V] at row stride sx; per row its temperature, min_p and target u in [0, 1).
 * The draw is the inverse CDF in vocabulary order, as sampling._draw_plain: the first id whose
 * cumulative probability passes u. One read of the row: per block of 256 ids its maximum and its sum
 * of exp((x - block max) / t), the block read again from L1; the row's total from the blocks; the
 * block the target falls in, then the id inside it. min_p (the ids below min_p times the most
 * likely one's probability dropped) needs the row's maximum first: a second read. out: the id, or
 * -1 for a row without finite positive mass (NaN or inf in it). */
#define SAMPLE_BLOCK 256
void sample_plain(const float *x, int64_t sx, int64_t m, int64_t vocab, const float *temp, const float *min_p,
                  const double *u, int64_t *out) {
    _Pragma("omp parallel for schedule(dynamic, 1) if (m > 1)")
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * sx;
        float inv_t = 1.f / temp[r];
        int64_t nb = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
        float *bmax = malloc(sizeof(float) * 2 * (size_t)nb), *bsum = bmax + nb;
        float floor_logit = -INFINITY; /* x below it: under min_p */
        if (min_p[r] > 0.f) {
            float mx = -INFINITY;
            _Pragma("omp simd reduction(max : mx)")
            for (int64_t i = 0; i < vocab; i++) mx = row[i] > mx ? row[i] : mx;
            floor_logit = mx + logf(min_p[r]) * temp[r];
        }
        float top = -INFINITY;
        int bad = 0;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = row + b * SAMPLE_BLOCK;
            int64_t n = vocab - b * SAMPLE_BLOCK < SAMPLE_BLOCK ? vocab - b * SAMPLE_BLOCK : SAMPLE_BLOCK;
            float bm = -INFINITY, s = 0.f;
#ifdef __AVX512F__
            if (n == SAMPLE_BLOCK) {
                __m512 mv = _mm512_set1_ps(-INFINITY), sv = _mm512_setzero_ps();
                __mmask16 nan = 0;
                for (int64_t i = 0; i < n; i += 16) {
                    __m512 v = _mm512_loadu_ps(xb + i);
                    mv = _mm512_max_ps(mv, v);
                    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                }
                bm = _mm512_reduce_max_ps(mv);
                __m512 bmv = _mm512_set1_ps(bm), c = _mm512_set1_ps(inv_t * 1.44269504088896341f);
                __m512 fl = _mm512_set1_ps(floor_logit), sv2 = _mm512_setzero_ps();
                for (int64_t i = 0; i < n; i += 32) { /* two chains in flight */
                    __m512 v = _mm512_loadu_ps(xb + i), w = _mm512_loadu_ps(xb + i + 16);
                    __m512 e = exp2_fast512(_mm512_sub_ps(v, bmv), c), f = exp2_fast512(_mm512_sub_ps(w, bmv), c);
                    if (min_p[r] > 0.f) {
                        e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, fl, _CMP_GE_OQ), e);
                        f = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, fl, _CMP_GE_OQ), f);
                    }
                    sv = _mm512_add_ps(sv, e);
                    sv2 = _mm512_add_ps(sv2, f);
                }
                s = _mm512_reduce_add_ps(_mm512_add_ps(sv, sv2));
                bad |= nan != 0;
            } else
#endif
            {
                _Pragma("omp simd reduction(max : bm)")
                for (int64_t i = 0; i < n; i++) bm = xb[i] > bm ? xb[i] : bm;
                _Pragma("omp simd reduction(+ : s)")
                for (int64_t i = 0; i < n; i++) s += xb[i] >= floor_logit ? exp_f((xb[i] - bm) * inv_t) : 0.f;
                for (int64_t i = 0; i < n; i++) bad |= xb[i] != xb[i]; /* NaN: the vector max may skip it */
            }
            bmax[b] = bm;
            bsum[b] = s;
            top = bm > top ? bm : top;
        }
        double total = 0.0;
        for (int64_t b = 0; b < nb; b++)
            if (bsum[b] > 0.f) total += (double)bsum[b] * exp((double)(bmax[b] - top) * inv_t);
        int64_t pick = -1;
        if (!bad && isfinite(top) && isfinite(total) && total > 0.0) {
            double target = u[r] * total, cum = 0.0;
            int64_t b = 0, last = -1;
            for (; b < nb; b++) {
                if (bsum[b] <= 0.f) continue;
                double mass = (double)bsum[b] * exp((double)(bmax[b] - top) * inv_t);
                last = b;
                if (cum + mass > target) break;
                cum += mass;
            }
            if (b == nb) b = last; /* rounding put the target past the end: the last block with mass */
            const float *xb = row + b * SAMPLE_BLOCK;
            int64_t n = vocab - b * SAMPLE_BLOCK < SAMPLE_BLOCK ? vocab - b * SAMPLE_BLOCK : SAMPLE_BLOCK;
            double scale = exp((double)(bmax[b] - top) * inv_t);
            for (int64_t i = 0; i < n; i++) {
                float e = xb[i] >= floor_logit ? exp_f((xb[i] - bmax[b]) * inv_t) : 0.f;
                if (e <= 0.f) continue;
                pick = b * SAMPLE_BLOCK + i;
                cum += (double)e * scale;
                if (cum > target) break;
            }
        }
        out[r] = pick;
        free(bmax);
    }
}

/* ---- Sampling: rows with top-k, top-p or min_p -------------------------------------------------
 * The kept set is sampling._window's: the ids at or above a threshold theta on the probabilities
 * e = exp((x - max) / t) (the row's most likely id has e = 1), theta the largest of: the k-th
 * largest e (ties at it kept); min_p; and top-p's, the smallest e whose strictly larger ones hold
 * at most top_p of the top-k mass (so the smallest prefix, in descending order, that reaches it,
 * and every id tied with its last). No sort: only candidates are looked at, the ids that can be
 * kept, found by comparing logits (the ids under (1 - top_p) / V of the mass cannot be, nor those
 * under the k-th largest block maximum for top-k), and theta is a weighted quickselect over them.
 * The draw is the inverse CDF over the kept ids in vocabulary order. out: the id or -1. Rows with
 * top-p alone (the common request) read the row once (top_p_row); the others three times: the
 * maximum, the mass, the candidates. */

/* The smallest value v of a[0..n) with (sum of w(a_j) over a_j > v) <= limit, w = a (mass) or 1
 * (count); a is reordered. `above` is the weight of values above the range already set aside. */
static float select_threshold(float *a, int64_t n, double limit, int by_mass) {
    double above = 0.0;
    float best = a[0];
    int64_t lo = 0, hi = n;
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    while (lo < hi) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        float pivot = a[lo + (int64_t)(seed % (uint64_t)(hi - lo))];
        int64_t g = lo, e = lo, l = hi; /* [lo, g): > pivot; [g, e): == pivot; [l, hi): < pivot */
        double mg = 0.0, me = 0.0;
        while (e < l) {
            float v = a[e];
            if (v > pivot) {
                a[e] = a[g], a[g] = v, g++, e++;
                mg += by_mass ? v : 1.0;
            } else if (v < pivot) {
                l--, a[e] = a[l], a[l] = v;
            } else {
                e++;
                me += by_mass ? v : 1.0;
            }
        }
        if (above + mg > limit) { /* the answer is above the pivot */
            hi = g;
        } else { /* the pivot qualifies; a smaller value may too */
            best = pivot;
            if (above + mg + me > limit) break;
            above += mg + me;
            lo = l;
        }
    }
    return best;
}

/* select_threshold by mass for values in (0, 1], through a histogram on their float bits first:
 * the quickselect then runs on the one bucket the answer is in, not on every candidate. Four
 * histograms, a value's by its index: a run of values in one bucket would otherwise chain each add
 * on the store of the one before. */
#define HIST_SHIFT 20
#define HIST_BUCKETS ((0x3F800000u >> HIST_SHIFT) + 1)
static float select_by_mass(float *a, int64_t n, double limit) {
    if (n < 512) return select_threshold(a, n, limit, 1);
    double *mass = calloc(4 * HIST_BUCKETS, sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &a[i], 4);
        mass[(i & 3) * HIST_BUCKETS + (b >> HIST_SHIFT)] += a[i];
    }
    double above = 0.0;
    int64_t key = HIST_BUCKETS - 1;
    for (; key > 0; key--) {
        double here = mass[key] + mass[HIST_BUCKETS + key] + mass[2 * HIST_BUCKETS + key] + mass[3 * HIST_BUCKETS + key];
        if (above + here > limit) break;
        above += here;
    }
    free(mass);
    int64_t m = 0; /* the bucket's values to the front (the others are not needed after) */
    for (int64_t i = 0; i < n; i++) { /* branch-free: which bucket a value is in is a coin toss */
        float v = a[i];
        uint32_t b;
        memcpy(&b, &v, 4);
        a[m] = v;
        m += (int64_t)(b >> HIST_SHIFT) == key;
    }
    if (!m) { /* every value fits under the limit: the smallest is the answer */
        float smallest = a[0];
        _Pragma("omp simd reduction(min : smallest)")
        for (int64_t i = 0; i < n; i++) smallest = a[i] < smallest ? a[i] : smallest;
        return smallest;
    }
    return select_threshold(a, m, limit - above, 1);
}

/* The kept set's draw from its candidates ids[0..nc) (in vocabulary order, a superset of the kept
 * ids): theta from top-k, min_p and top-p as described above, then the inverse CDF at u over the
 * kept ids in vocabulary order. total: the row's mass relative to `top`. -1: no mass kept. */
static int64_t draw_kept(const float *row, const int32_t *ids, int64_t nc, float top, float inv_t, int64_t k,
                         int64_t vocab, float top_p, float min_p, double total, double u) {
    int64_t pick = -1;
    float *e = malloc(sizeof(float) * (2 * (size_t)nc + 16)), *work = e + nc; /* work: 16 past, for whole stores */
    int64_t c0 = 0;
#ifdef __AVX512F__
    for (__m512 tv = _mm512_set1_ps(top), it = _mm512_set1_ps(inv_t); c0 + 16 <= nc; c0 += 16) {
        __m512 v = _mm512_i32gather_ps(_mm512_loadu_si512(ids + c0), row, 4);
        _mm512_storeu_ps(e + c0, exp512(_mm512_mul_ps(_mm512_sub_ps(v, tv), it)));
    }
#endif
    for (int64_t c = c0; c < nc; c++) e[c] = exp_f((row[ids[c]] - top) * inv_t);
    float theta = 0.f;
    double mass_k = total;
    if (k < vocab && nc) {
        memcpy(work, e, sizeof(float) * (size_t)nc);
        theta = select_threshold(work, nc, (double)(k - 1), 0);
        mass_k = 0.0;
        for (int64_t c = 0; c < nc; c++) mass_k += e[c] >= theta ? e[c] : 0.f;
    }
    if (min_p > theta) theta = min_p;
    if (top_p < 1.f && nc) {
        int64_t nk = 0;
        if (theta <= 0.f) /* every e (>= 0) is at or over it: top-p alone */
            memcpy(work, e, sizeof(float) * (size_t)(nk = nc));
        else
            for (int64_t c = 0; c < nc; c++) work[nk] = e[c], nk += e[c] >= theta;
        float tp = nk ? select_by_mass(work, nk, top_p * mass_k) : theta;
        theta = tp > theta ? tp : theta;
    }
    /* the kept ids and their e, in order, to the front of work and kid (no branch per candidate) */
    int32_t *kid = malloc(sizeof(int32_t) * (size_t)(nc + 16));
    int64_t nk = 0, c = 0;
#ifdef __AVX512F__
    for (__m512 th = _mm512_set1_ps(theta); c + 16 <= nc; c += 16) {
        __m512 ev = _mm512_loadu_ps(e + c);
        __mmask16 in = _mm512_cmp_ps_mask(ev, th, _CMP_GE_OQ);
        _mm512_storeu_ps(work + nk, _mm512_maskz_compress_ps(in, ev));
        _mm512_storeu_si512(kid + nk, _mm512_maskz_compress_epi32(in, _mm512_loadu_si512(ids + c)));
        nk += __builtin_popcount(in);
    }
#endif
    for (; c < nc; c++) {
        work[nk] = e[c], kid[nk] = ids[c];
        nk += e[c] >= theta;
    }
    double kept = 0.0;
    for (int64_t j = 0; j < nk; j++) kept += work[j];
    if (kept > 0.0 && isfinite(kept)) {
        double target = u * kept, cum = 0.0;
        for (int64_t j = 0; j < nk; j++) {
            pick = kid[j];
            cum += work[j];
            if (cum > target) break;
        }
    }
    free(kid);
    free(e);
    return pick;
}

#ifdef __AVX512F__
/* The ids idv of the 16 values v at or over fv, appended to ids[nc..] (room for 16); the new count.
 * No branch on a hit (a coin toss where a tenth of the ids are candidates). Compressed in a
 * register and stored whole: Zen 4 microcodes a compress to memory. */
static inline int64_t collect16(__m512 v, __m512 fv, __m512i idv, int32_t *ids, int64_t nc) {
    __mmask16 hit = _mm512_cmp_ps_mask(v, fv, _CMP_GE_OQ);
    _mm512_storeu_si512(ids + nc, _mm512_maskz_compress_epi32(hit, idv));
    return nc + __builtin_popcount(hit);
}
#endif

/* The ids of xb[0..n) (ids base..base+n) at or over fx, appended to ids[nc..]; the new count.
 * Room for n more is the caller's. */
static int64_t collect(const float *xb, int64_t n, int64_t base, float fx, int32_t *ids, int64_t nc) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 fv = _mm512_set1_ps(fx);
    __m512i idv = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                   _mm512_set1_epi32((int)base));
    for (; i + 16 <= n; i += 16, idv = _mm512_add_epi32(idv, _mm512_set1_epi32(16)))
        nc = collect16(_mm512_loadu_ps(xb + i), fv, idv, ids, nc);
#endif
    for (; i < n; i++)
        if (xb[i] >= fx) ids[nc++] = (int32_t)(base + i);
    return nc;
}


/* One block xb[0..n) (ids base..base+n) in one pass: its maximum (*bm), whether it holds a NaN or
 * +inf (*bad), its ids at or over fx appended to ids[*nc..] (room for n more), and its mass
 * relative to ref, returned: the sum of exp((x - ref) / t), ref at most ~80 t under the block's
 * maximum (over it, the sum is +inf). A NaN or +inf makes the vector sum NaN: no compare for it. */
static float block_mass(const float *xb, int64_t n, int64_t base, float ref, float inv_t, float fx, int32_t *ids,
                        int64_t *nc, float *bm, int *bad) {
    float m = -INFINITY, s = 0.f;
    int64_t i = 0, k = *nc;
    int nan = 0;
#ifdef __AVX512F__
    __m512 rv = _mm512_set1_ps(ref), c = _mm512_set1_ps(inv_t * 1.44269504088896341f), fv = _mm512_set1_ps(fx);
    __m512 mv = _mm512_set1_ps(-INFINITY), mv2 = mv, sv = _mm512_setzero_ps(), sv2 = sv;
    __m512i idv = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                   _mm512_set1_epi32((int)base)), step = _mm512_set1_epi32(16);
    for (; i + 32 <= n; i += 32) { /* two chains in flight */
        __m512 v = _mm512_loadu_ps(xb + i), w = _mm512_loadu_ps(xb + i + 16);
        mv = _mm512_max_ps(mv, v);
        mv2 = _mm512_max_ps(mv2, w);
        sv = _mm512_add_ps(sv, exp2_fast512(_mm512_sub_ps(v, rv), c));
        sv2 = _mm512_add_ps(sv2, exp2_fast512(_mm512_sub_ps(w, rv), c));
        k = collect16(v, fv, idv, ids, k);
        idv = _mm512_add_epi32(idv, step);
        k = collect16(w, fv, idv, ids, k);
        idv = _mm512_add_epi32(idv, step);
    }
    m = _mm512_reduce_max_ps(_mm512_max_ps(mv, mv2));
    s = _mm512_reduce_add_ps(_mm512_add_ps(sv, sv2));
    nan = s != s;
#endif
    for (; i < n; i++) {
        m = xb[i] > m ? xb[i] : m;
        nan |= xb[i] != xb[i] || xb[i] == INFINITY;
        s += exp_f((xb[i] - ref) * inv_t);
        ids[k] = (int32_t)(base + i);
        k += xb[i] >= fx;
    }
    *bm = m, *bad = nan, *nc = k;
    return s;
}

/* top-p alone (no top-k, no min_p), in one read of the row. A kept id's e is at least
 * tau = (1 - top_p) * total / V (the ids under it hold less than the mass past top-p), and in
 * logits that floor, t * log((1 - top_p) * Z / V) with Z the sum of exp(x / t), only rises as the
 * row is read: the ids over the floor of the mass read so far are a superset of the final
 * candidates. Per block of TOP_P_BLOCK ids, one pass from memory takes its maximum, its mass
 * relative to the maximum so far and its candidates over the floor before it (block_mass; the
 * first block takes its maximum first, and one that rises so far over the maximum so far that an
 * exp could overflow is read again from L1, relative to its own). The mass so far is rescaled
 * only when the maximum rises (a few times a row), the floor's log taken again only when the mass
 * has grown by 1%. After the row: the final floor, the candidates under it dropped (compacted in
 * place), then draw_kept, as the general path. */
#define TOP_P_BLOCK 1024 /* its reductions and floor update amortised over 4x SAMPLE_BLOCK's ids */
static int64_t top_p_row(const float *row, int64_t vocab, float t, float top_p, double u) {
    float inv_t = 1.f / t, log_share = logf((1.f - top_p) / (float)vocab);
    int64_t nb = (vocab + TOP_P_BLOCK - 1) / TOP_P_BLOCK, cap = 4 * TOP_P_BLOCK, nc = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    float run_max = -INFINITY;
    double total = 0.0; /* the mass read so far, relative to run_max: the floor's, and the draw's at the end */
    float log_at = 0.f, log_max = -INFINITY, fx = -INFINITY; /* the floor, and the sum and maximum it is for */
    int64_t pick = -1;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = row + b * TOP_P_BLOCK;
        int64_t n = vocab - b * TOP_P_BLOCK < TOP_P_BLOCK ? vocab - b * TOP_P_BLOCK : TOP_P_BLOCK;
        float ref = run_max, bm = -INFINITY, s = 0.f;
        int bad = 0;
        if (ref == -INFINITY) { /* nothing finite yet: the block's own maximum */
            _Pragma("omp simd reduction(max : ref) reduction(| : bad)")
            for (int64_t i = 0; i < n; i++) {
                ref = xb[i] > ref ? xb[i] : ref;
                bad |= xb[i] != xb[i];
            }
        }
        if (ref > -INFINITY && !bad) {
            if (nc + n > cap) ids = realloc(ids, sizeof(int32_t) * (size_t)(cap = 2 * (nc + n)));
            int64_t nc0 = nc;
            s = block_mass(xb, n, b * TOP_P_BLOCK, ref, inv_t, fx, ids, &nc, &bm, &bad);
            if ((bm - ref) * inv_t > 60.f) /* its exps could overflow: again, relative to its own maximum */
                nc = nc0, s = block_mass(xb, n, b * TOP_P_BLOCK, ref = bm, inv_t, fx, ids, &nc, &bm, &bad);
        }
        if (bad || bm == INFINITY || ref == INFINITY) goto done; /* no distribution: -1 */
        if (bm == -INFINITY) continue;
        if (ref == run_max && bm <= run_max) { /* most blocks: the maximum stands, no rescale */
            total += s;
        } else { /* a new maximum: the mass so far rescaled to it (ref is run_max or bm) */
            float hi = bm > run_max ? bm : run_max, down = run_max == -INFINITY ? 0.f : exp_f((run_max - hi) * inv_t);
            float up = exp_f((ref - hi) * inv_t);
            total = total * (double)down + (double)s * (double)up;
            run_max = hi;
        }
        /* 2e-3 under: the final floor (1e-3 under) must not pass it through the running sum's
         * rounding. The log again only when the sum has grown by 1% (an older, lower floor is as safe). */
        if ((float)total > log_at * 1.01f || run_max != log_max) {
            log_at = (float)total, log_max = run_max;
            fx = run_max + (logf(log_at) + log_share - 2e-3f) * t;
        }
    }
    if (run_max > -INFINITY) {
        float top = run_max;
        float tau = (float)((total - top_p * total) / (double)vocab);
        float floor_x = top + (logf(tau) - 1e-3f) * t;
        int64_t kept = 0, c = 0;
#ifdef __AVX512F__
        for (__m512 fv = _mm512_set1_ps(floor_x); c + 16 <= nc; c += 16) { /* compacted in place: kept <= c */
            __m512i iv = _mm512_loadu_si512(ids + c);
            __mmask16 in = _mm512_cmp_ps_mask(_mm512_i32gather_ps(iv, row, 4), fv, _CMP_GE_OQ);
            _mm512_storeu_si512(ids + kept, _mm512_maskz_compress_epi32(in, iv));
            kept += __builtin_popcount(in);
        }
#endif
        for (; c < nc; c++) { /* the final candidates, in order */
            int32_t id = ids[c];
            ids[kept] = id;
            kept += row[id] >= floor_x;
        }
        if (isfinite(total)) pick = draw_kept(row, ids, kept, top, inv_t, vocab, vocab, top_p, 0.f, total, u);
    }
done:
    free(ids);
    return pick;
}

void sample_filtered(const float *x, int64_t sx, int64_t m, int64_t vocab, const float *temp, const int64_t *top_k,
                     const float *top_p, const float *min_p, const double *u, int64_t *out) {
    _Pragma("omp parallel for schedule(dynamic, 1) if (m > 1)")
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * sx;
        float t = temp[r], inv_t = 1.f / t;
        int64_t nb = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK, k = top_k[r] > 0 && top_k[r] < vocab ? top_k[r] : vocab;
        if (k == vocab && min_p[r] <= 0.f && top_p[r] < 1.f) {
            out[r] = top_p_row(row, vocab, t, top_p[r], u[r]);
            continue;
        }
        float *bmax = malloc(sizeof(float) * (size_t)nb);
        float top = -INFINITY;
        int bad = 0;
        double total = 0.0, q_total = 0.0; /* the row's mass, and the part at or above min_p */
        for (int64_t b = 0; b < nb; b++) { /* the row's maximum and, for top-p, its mass */
            const float *xb = row + b * SAMPLE_BLOCK;
            int64_t n = vocab - b * SAMPLE_BLOCK < SAMPLE_BLOCK ? vocab - b * SAMPLE_BLOCK : SAMPLE_BLOCK;
            float bm = -INFINITY;
            _Pragma("omp simd reduction(max : bm)")
            for (int64_t i = 0; i < n; i++) bm = xb[i] > bm ? xb[i] : bm;
            for (int64_t i = 0; i < n; i++) bad |= xb[i] != xb[i];
            bmax[b] = bm;
            top = bm > top ? bm : top;
        }
        int64_t pick = -1;
        if (!bad && isfinite(top)) {
            for (int64_t b = 0; b < nb && top_p[r] < 1.f; b++) {
                const float *xb = row + b * SAMPLE_BLOCK;
                int64_t n = vocab - b * SAMPLE_BLOCK < SAMPLE_BLOCK ? vocab - b * SAMPLE_BLOCK : SAMPLE_BLOCK;
                float s = 0.f, sq = 0.f, mp = min_p[r];
                int64_t i = 0;
#ifdef __AVX512F__
                __m512 sv = _mm512_setzero_ps(), qv = _mm512_setzero_ps();
                __m512 tv = _mm512_set1_ps(top), it = _mm512_set1_ps(inv_t), mv = _mm512_set1_ps(mp);
                for (; i + 16 <= n; i += 16) {
                    __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xb + i), tv), it));
                    sv = _mm512_add_ps(sv, e);
                    qv = _mm512_add_ps(qv, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, mv, _CMP_GE_OQ), e));
                }
                s = _mm512_reduce_add_ps(sv);
                sq = _mm512_reduce_add_ps(qv);
#endif
                for (; i < n; i++) {
                    float e = exp_f((xb[i] - top) * inv_t);
                    s += e;
                    sq += e >= mp ? e : 0.f;
                }
                total += s;
                q_total += sq;
            }
            /* the smallest logit a kept id can have */
            /* (with top-k, every top-k id: top-p's share is of their mass before min_p) */
            float floor_e = min_p[r] > 0.f && k == vocab ? min_p[r] : 0.f;
            if (k == vocab && top_p[r] < 1.f && q_total > top_p[r] * total) {
                /* ids under this hold less than the mass past top-p together: none of them is kept */
                float tau = (float)((q_total - top_p[r] * total) / (double)vocab);
                floor_e = tau > floor_e ? tau : floor_e;
            }
            /* a little under: exp's rounding must not drop an id at the floor */
            float floor_x = floor_e > 0.f ? top + (logf(floor_e) - 1e-3f) * t : -INFINITY;
            if (k < vocab && k <= nb) { /* the k-th largest id is at least the k-th largest block maximum */
                float *bm2 = malloc(sizeof(float) * (size_t)nb);
                memcpy(bm2, bmax, sizeof(float) * (size_t)nb);
                float kth = select_threshold(bm2, nb, (double)(k - 1), 0);
                free(bm2);
                floor_x = kth > floor_x ? kth : floor_x;
            }
            /* candidates, in vocabulary order: (id, e) */
            int64_t cap = 1024, nc = 0;
            int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
            for (int64_t b = 0; b < nb; b++) {
                if (bmax[b] < floor_x) continue;
                int64_t n = vocab - b * SAMPLE_BLOCK < SAMPLE_BLOCK ? vocab - b * SAMPLE_BLOCK : SAMPLE_BLOCK;
                if (nc + n > cap) ids = realloc(ids, sizeof(int32_t) * (size_t)(cap = 2 * (nc + n)));
                nc = collect(row + b * SAMPLE_BLOCK, n, b * SAMPLE_BLOCK, floor_x, ids, nc);
            }
            pick = draw_kept(row, ids, nc, top, inv_t, k, vocab, top_p[r], min_p[r], total, u[r]);
            free(ids);
        }
        out[r] = pick;
        free(bmax);
    }
}

/* Whether this build has the AVX-512 forms (prefill attention has no other). */
int built_with_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
