/* CPU kernel of metaformer_zoo.kernels.selective_scan2d: the selective scan (mamba-ssm selective_scan_ref
 * semantics, real A) as a register recurrence, forward and backward, for the 1D op and the fused 4-route 2D op.
 *
 * Built and loaded by cpu.py (gcc/cc, ctypes, cached per machine); no Python or torch headers are needed. Tensors are
 * in the accumulation dtype (float32 or float64) and CHANNELS-LAST: the lanes of the vector loops are BLK
 * consecutive channels, so a state update of one step is BLK independent lanes (no horizontal sums in the forward)
 * and one step reads each input row once. Element strides are passed in; the innermost index has stride 1:
 *
 *   u, gy  (Bsz, L, Ch)         (b, p, c) at b*s0 + p*s1 + c: the map flattened row-major (2D) or the sequence (1D)
 *   delta  (Bsz, R, L, Ch)      MAP order (step t of route r reads position p = route r's t-th position), raw:
 *                               bias and softplus are applied here. With dtw (not NULL) it is the LOW-RANK input
 *                               instead, (Bsz, R, L, Rdt), and the raw delta of channel c is
 *                               sum_j dtw[r][j][c] delta[b][r][p][j] (a per-route dt projection, computed per step
 *                               and never stored; the backward still returns the gradient of the raw delta)
 *   dtw    (R, Rdt, Ch)         contiguous, or NULL
 *   A      (R, N, Ch)           contiguous; D, bias (R, Ch) contiguous or NULL
 *   Bm, Cm (Bsz, R*G, L, N)     map order; group r*G + c / (Ch/G) serves channel c on route r
 *   y      (Bsz, L, Ch)         out, contiguous: sum over the routes of <C_t, h_t> + D u at each step's position
 *   hlast  (Bsz, R, N, Ch)      out (or NULL): the last state of each route
 *
 * Routes (R = 4, VMamba CrossScan scans=0): 0 row-major, 1 column-major, 2 / 3 their reverses; R = 1: identity.
 * Work units: forward one (batch, channel block) with all its routes (y rows of a block belong to one unit);
 * backward one (batch, run of channel blocks): du / ddelta / dA / dD / dbias of a block belong to its unit, dB / dC
 * are per (unit's run, batch) partials, zero-filled here and summed by the caller. So results do not depend on the
 * thread count or schedule. The backward recomputes the states in chunks of TCH steps from checkpoints taken every
 * TCH steps (taken by the forward when asked, else by the backward itself), storing the chunk's states and decays,
 * so a backward step costs no exp of the decay (memory O(TCH * N * BLK) per thread, no (L, N) state tensor).
 *
 * exp: the state decays exp(delta A) are 2^(delta A log2 e) in float32 (mfz_decay_f: AVX-512 intrinsics where the
 * compiler targets it, else a loop that vectorizes; ~1.6 ulp), libm's exp in float64. softplus and its derivative use
 * mfz_expf (Cody-Waite + the Cephes polynomial).
 */
#include <math.h>
#include <pthread.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define MFZ_ABI 3
#define BLK 16 /* channels per block = lanes of the vector loops */
#define PF 4   /* steps the forward prefetches ahead */
#define TCH 64 /* backward recompute chunk (steps) = checkpoint interval */

typedef struct {
    int64_t Bsz, R, Ch, G, L, N, H, W;
    int64_t nblk;     /* backward: runs of channel blocks per batch row (dB / dC partials) */
    int64_t softplus; /* delta = softplus(delta + bias) when nonzero (threshold 20, as torch) */
    int64_t nthreads;
    int64_t su0, su1, sd0, sd1, sd2, sb0, sb1, sb2, sc0, sc1, sc2, sg0, sg1; /* element strides, see above */
    int64_t Rdt; /* rank of the low-rank delta (dtw not NULL) */
    const void *u, *delta, *A, *Bm, *Cm, *D, *bias, *dtw;
    void *y;     /* forward out (Bsz, L, Ch) */
    void *hlast; /* forward out (Bsz, R, N, Ch) or NULL */
    const void *gy, *gh; /* backward in: (Bsz, L, Ch) strided like u, (Bsz, R, N, Ch) contiguous or NULL */
    void *du;            /* (Bsz, L, Ch) */
    void *ddelta;        /* (Bsz, R, L, Ch): gradient of the raw delta */
    void *dA;            /* (Bsz, R, N, Ch) */
    void *dD, *dbias;    /* (Bsz, R, Ch) or NULL */
    void *dB, *dC;       /* (nblk, Bsz, R*G, L, N) */
    void *ck; /* (Bsz, R, ceil(L / TCH), N, Ch) or NULL: the state before every TCH-th step; forward out (when not
               * NULL), backward in (when NULL the backward takes its own checkpoints first) */
} mfz_scan_args;

int mfz_abi(void) { return MFZ_ABI; }
int mfz_blk(void) { return BLK; }
int mfz_tch(void) { return TCH; }

static inline float mfz_expf(float x) {
    const float lo = -87.3365447505531f, hi = 88.0f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f; /* ln 2 = 0.693359375 - 2.12194440e-4 (Cephes split) */
    /* exp(r) on |r| <= ln2 / 2: the Cephes expf polynomial (~1 ulp) */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    float v = p * s.f;
    return x < lo ? 0.0f : v;
}

static inline double mfz_exp(double x) { return exp(x); }

/* 2^x for the state decays exp(delta A) = 2^(delta * A log2 e) (log2 e folded into A once per block): range
 * reduction x = n + f, |f| <= 1/2, a degree-6 near-minimax polynomial for 2^f (~1.6 ulp), exactly 0 below 2^-126 (no
 * denormals), inf above 2^128. */
#define MFZ_E2(f) (1.0f + (f) * (6.9314718246e-01f + (f) * (2.4022647738e-01f + (f) * (5.5503323674e-02f + (f) *      \
                  (9.6184378490e-03f + (f) * (1.3398875017e-03f + (f) * 1.5353356139e-04f))))))
static inline float mfz_exp2f(float x) {
    const float xc = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
    const float n = (xc + 12582912.0f) - 12582912.0f; /* round to nearest */
    const float f = xc - n;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    const float v = MFZ_E2(f) * s.f;
    return x < -126.0f ? 0.0f : (x > 128.0f ? INFINITY : v);
}

/* Hand-vectorized float32 steps (AVX-512: one 16-lane register per block row; AVX2 + FMA: two 8-lane ones): the
 * arithmetic of the generic loops of MFZ_DEFINE with the per-step accumulators (y, lamB, dsum) in registers (the
 * generic loops keep them in memory, which chains every state update through a store and a load). Where neither
 * instruction set is targeted they report 0 and the generic loops run. */
/* the polynomial of MFZ_E2 on a vector (VFMA / VSET1 are the instruction set's, defined below) */
#define MFZ_E2V(f) VFMA(VFMA(VFMA(VFMA(VFMA(VFMA(VSET1(1.5353356139e-04f), f, VSET1(1.3398875017e-03f)), f,           \
                   VSET1(9.6184378490e-03f)), f, VSET1(5.5503323674e-02f)), f, VSET1(2.4022647738e-01f)), f,       \
                   VSET1(6.9314718246e-01f)), f, VSET1(1.0f))
#if defined(__AVX512F__)
#define MFZ_VW 16
typedef __m512 mfz_v;
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps
/* 2^x: roundscale / scalef, 11 instructions; exactly 0 below 2^-126, NaN propagates */
static inline mfz_v mfz_exp2v(mfz_v x) {
    const mfz_v n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const mfz_v f = _mm512_sub_ps(x, n);
    const mfz_v p = MFZ_E2V(f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, VSET1(-126.0f), _CMP_NLT_UQ); /* x >= -126, or NaN */
    return _mm512_maskz_scalef_ps(keep, p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define MFZ_VW 8
typedef __m256 mfz_v;
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VFMA _mm256_fmadd_ps
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* 2^x as mfz_exp2f: clamp, round, polynomial, exponent bits; 0 below 2^-126, inf above 2^128, NaN propagates */
static inline mfz_v mfz_exp2v(mfz_v x) {
    const mfz_v xc = _mm256_min_ps(_mm256_max_ps(x, VSET1(-126.0f)), VSET1(127.0f));
    const mfz_v n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const mfz_v f = _mm256_sub_ps(xc, n);
    const mfz_v p = MFZ_E2V(f);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    mfz_v v = VMUL(p, _mm256_castsi256_ps(e));
    v = _mm256_blendv_ps(v, VZERO(), _mm256_cmp_ps(x, VSET1(-126.0f), _CMP_LT_OQ));
    v = _mm256_blendv_ps(v, VSET1(INFINITY), _mm256_cmp_ps(x, VSET1(128.0f), _CMP_GT_OQ));
    return _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

/* out[v] = 2^(d[v] a2[v]) over the BLK lanes */
static inline void mfz_decay_f(float *restrict out, const float *restrict d, const float *restrict a2) {
#if defined(MFZ_VW)
    for (int v = 0; v < BLK; v += MFZ_VW) VSTORE(out + v, mfz_exp2v(VMUL(VLOAD(d + v), VLOAD(a2 + v))));
#else
    _Pragma("omp simd")
    for (int v = 0; v < BLK; v++) out[v] = mfz_exp2f(d[v] * a2[v]);
#endif
}

#if defined(MFZ_VW) && BLK % MFZ_VW == 0
#define MFZ_NV (BLK / MFZ_VW) /* vectors per block row */
static inline int mfz_step_fast_f(int64_t N, const float *restrict A2, const float *restrict d,
                                  const float *restrict x, const float *restrict Bt, const float *restrict Ct,
                                  float *restrict h, float *restrict acc, float *restrict ea_out) {
    mfz_v dv[MFZ_NV], dx[MFZ_NV], a0[MFZ_NV], a1[MFZ_NV];
    for (int j = 0; j < MFZ_NV; j++) {
        dv[j] = VLOAD(d + j * MFZ_VW);
        dx[j] = VMUL(dv[j], VLOAD(x + j * MFZ_VW));
        a0[j] = acc ? VLOAD(acc + j * MFZ_VW) : VZERO();
        a1[j] = VZERO();
    }
    for (int64_t n = 0; n < N; n++) {
        const mfz_v bn = VSET1(Bt[n]), cn = VSET1(acc ? Ct[n] : 0.0f);
        for (int j = 0; j < MFZ_NV; j++) {
            const int64_t o = n * BLK + j * MFZ_VW;
            const mfz_v ea = mfz_exp2v(VMUL(dv[j], VLOAD(A2 + o)));
            if (ea_out) VSTORE(ea_out + o, ea);
            const mfz_v hv = VFMA(ea, VLOAD(h + o), VMUL(dx[j], bn));
            VSTORE(h + o, hv);
            if (acc) {
                if (n & 1) a1[j] = VFMA(cn, hv, a1[j]);
                else a0[j] = VFMA(cn, hv, a0[j]);
            }
        }
    }
    if (acc)
        for (int j = 0; j < MFZ_NV; j++) VSTORE(acc + j * MFZ_VW, VADD(a0[j], a1[j]));
    return 1;
}

#if MFZ_VW == 16
/* the 16 horizontal sums of v[0..15] as one vector (lane n = sum of v[n]'s lanes): a shuffle tree of 45
 * instructions instead of 16 reductions of ~8 each */
static inline mfz_v mfz_sum16(const mfz_v *v) {
    mfz_v t[4], u[2];
    for (int q = 0; q < 4; q++) { /* per 128-bit segment: the 4 partial sums of v[4q .. 4q + 3] */
        const mfz_v a = VADD(_mm512_unpacklo_ps(v[4 * q], v[4 * q + 1]), _mm512_unpackhi_ps(v[4 * q], v[4 * q + 1]));
        const mfz_v b = VADD(_mm512_unpacklo_ps(v[4 * q + 2], v[4 * q + 3]),
                             _mm512_unpackhi_ps(v[4 * q + 2], v[4 * q + 3]));
        t[q] = VADD(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int q = 0; q < 2; q++) /* segments pairwise: v[8q .. 8q + 7] over halves */
        u[q] = VADD(_mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                    _mm512_shuffle_f32x4(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return VADD(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

static inline int mfz_bwd_step_fast_f(int64_t N, const float *restrict Ab, const float *restrict ea,
                                      const float *restrict d, const float *restrict x, const float *restrict g,
                                      const float *restrict ht, const float *restrict hp, const float *restrict Bt,
                                      const float *restrict Ct, float *restrict mu, float *restrict dAa,
                                      float *restrict lamB, float *restrict dsum, float *restrict dBt,
                                      float *restrict dCt) {
    mfz_v gv[MFZ_NV], dv[MFZ_NV], dx[MFZ_NV], lb[MFZ_NV], ds[MFZ_NV];
#if MFZ_VW == 16
    mfz_v sCa[16], sBa[16]; /* N == 16: the per-state sums, reduced together */
#endif
    for (int j = 0; j < MFZ_NV; j++) {
        gv[j] = VLOAD(g + j * MFZ_VW);
        dv[j] = VLOAD(d + j * MFZ_VW);
        dx[j] = VMUL(dv[j], VLOAD(x + j * MFZ_VW));
        lb[j] = VZERO();
        ds[j] = VZERO();
    }
    for (int64_t n = 0; n < N; n++) {
        const mfz_v cn = VSET1(Ct[n]), bn = VSET1(Bt[n]);
        mfz_v sC = VZERO(), sB = VZERO();
        for (int j = 0; j < MFZ_NV; j++) {
            const int64_t o = n * BLK + j * MFZ_VW;
            const mfz_v lam = VFMA(cn, gv[j], VLOAD(mu + o));
            sC = VFMA(gv[j], VLOAD(ht + o), sC);
            sB = VFMA(lam, dx[j], sB);
            lb[j] = VFMA(lam, bn, lb[j]);
            const mfz_v m = VMUL(VLOAD(ea + o), lam);
            const mfz_v ah = VMUL(m, VLOAD(hp + o));
            ds[j] = VFMA(ah, VLOAD(Ab + o), ds[j]);
            VSTORE(dAa + o, VFMA(ah, dv[j], VLOAD(dAa + o)));
            VSTORE(mu + o, m);
        }
#if MFZ_VW == 16
        if (N == 16) { /* the sums of all 16 states at once, after the loop */
            sCa[n] = sC;
            sBa[n] = sB;
            continue;
        }
#endif
        dCt[n] += VSUM(sC);
        dBt[n] += VSUM(sB);
    }
#if MFZ_VW == 16
    if (N == 16) {
        VSTORE(dCt, VADD(VLOAD(dCt), mfz_sum16(sCa)));
        VSTORE(dBt, VADD(VLOAD(dBt), mfz_sum16(sBa)));
    }
#endif
    for (int j = 0; j < MFZ_NV; j++) {
        VSTORE(lamB + j * MFZ_VW, lb[j]);
        VSTORE(dsum + j * MFZ_VW, ds[j]);
    }
    return 1;
}
#else
#define mfz_step_fast_f(...) 0
#define mfz_bwd_step_fast_f(...) 0
#endif
#define mfz_step_fast_d(...) 0
#define mfz_bwd_step_fast_d(...) 0

static inline void mfz_decay_d(double *restrict out, const double *restrict d, const double *restrict a) {
    for (int v = 0; v < BLK; v++) out[v] = exp(d[v] * a[v]);
}

/* softplus (threshold 20, as torch): max(x, 0) + log1p(exp(-|x|)), log1p(e) = 2 atanh(e / (2 + e)) as a series in
 * s = e / (2 + e) <= 1/3 (relative error ~1e-8; no 1 + e rounding, so tiny values stay accurate). Vectorizes. */
static inline float mfz_softplusf(float x) {
    const float e = mfz_expf(-fabsf(x)), s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    const float v = (x > 0.0f ? x : 0.0f) + 2.0f * s * p; /* not fmaxf: it does not vectorize */
    return x > 20.0f ? x : v;
}

static inline double mfz_softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

#if defined(__AVX512F__)
/* One forward route of a block with N = 16 states held in 16 zmm registers for the whole sequence (the generic step
 * keeps them in memory: a load and a store per state update). Each chunk of TCH steps first gathers its x and
 * delta (bias, softplus) into a buffer, so the recurrence's steps never wait on a softplus (the out-of-order window
 * holds about one step; computing it inline left the vector ports half idle). Same arithmetic and summation order as
 * mfz_step_fast_f: results are bit-identical to the generic path. Returns 0 (the caller runs the generic loop)
 * unless N == 16. Measured, one thread, (1, 4 routes, 192 ch, 56 x 56, N 16): 0.59 -> 0.28 ns per state update. */
static int mfz_fwd_route16_f(const mfz_scan_args *a, const int64_t *ix, int64_t b, int64_t r, int64_t c0, int64_t w,
                             const float *restrict A2, const float *restrict Dv, const float *restrict bv,
                             const float *restrict Bg, const float *restrict Cg, float *restrict y,
                             float *restrict ck, float *restrict hl) {
    if (a->N != 16) return 0;
    const int64_t L = a->L, Ch = a->Ch;
    const __mmask16 m = (__mmask16)((1u << w) - 1u);
    const float *u = (const float *)a->u + b * a->su0 + c0;
    const float *dl = (const float *)a->delta + b * a->sd0 + r * a->sd1 + (a->dtw ? 0 : c0);
    const float *restrict Wb = A2 + 16 * BLK; /* the dt projection block (route_consts), when dtw */
    const mfz_v Dr = VLOAD(Dv), br = VLOAD(bv);
    float xs[TCH * BLK] __attribute__((aligned(64))), ds[TCH * BLK] __attribute__((aligned(64)));
    mfz_v h[16];
#pragma GCC unroll 16
    for (int n = 0; n < 16; n++) h[n] = VZERO();
    for (int64_t t0 = 0; t0 < L; t0 += TCH) {
        const int64_t t1 = t0 + TCH < L ? t0 + TCH : L;
        /* this chunk's inputs first: x and delta (bias, softplus) of every step, off the recurrence's critical path */
        /* (its own vector form of chunk_in: calling the generic one, which runs the softplus per step, measured 0.30 ->
         * 0.42 ns per update) */
        for (int64_t t = t0; t < t1; t++) {
            const int64_t p = ix[t], i = t - t0;
            VSTORE(xs + i * BLK, _mm512_maskz_loadu_ps(m, u + p * a->su1));
            mfz_v dr;
            if (a->dtw) { /* the low-rank delta, in the generic step_in's order */
                const float *restrict di = dl + p * a->sd2;
                dr = VZERO();
                for (int64_t j = 0; j < a->Rdt; j++) dr = VFMA(VLOAD(Wb + j * BLK), VSET1(di[j]), dr);
            } else {
                dr = _mm512_maskz_loadu_ps(m, dl + p * a->sd2);
            }
            VSTORE(ds + i * BLK, VADD(dr, br));
        }
        if (a->softplus) {
            _Pragma("omp simd")
            for (int64_t v = 0; v < (t1 - t0) * BLK; v++) ds[v] = mfz_softplusf(ds[v]);
        }
        if (ck) {
            float *cj = ck + (t0 / TCH) * 16 * Ch;
#pragma GCC unroll 16
            for (int n = 0; n < 16; n++) _mm512_mask_storeu_ps(cj + n * Ch, m, h[n]);
        }
        for (int64_t t = t0; t < t1; t++) {
            const int64_t p = ix[t], i = t - t0;
            if (t + PF < L) {
                const int64_t q = ix[t + PF];
                __builtin_prefetch(Bg + q * a->sb2);
                __builtin_prefetch(Cg + q * a->sc2);
                __builtin_prefetch(y + q * Ch, 1);
            }
            const float *restrict Bt = Bg + p * a->sb2, *restrict Ct = Cg + p * a->sc2;
            const mfz_v d = VLOAD(ds + i * BLK), x = VLOAD(xs + i * BLK);
            const mfz_v dx = VMUL(d, x);
            mfz_v a0 = VMUL(Dr, x), a1 = VZERO();
#pragma GCC unroll 16
            for (int n = 0; n < 16; n++) {
                const mfz_v ea = mfz_exp2v(VMUL(d, VLOAD(A2 + n * BLK)));
                h[n] = VFMA(ea, h[n], VMUL(dx, VSET1(Bt[n])));
                if (n & 1) a1 = VFMA(VSET1(Ct[n]), h[n], a1);
                else a0 = VFMA(VSET1(Ct[n]), h[n], a0);
            }
            const mfz_v acc = VADD(a0, a1);
            float *yp = y + p * Ch;
            _mm512_mask_storeu_ps(yp, m, r == 0 ? acc : VADD(_mm512_maskz_loadu_ps(m, yp), acc));
        }
    }
    if (hl)
#pragma GCC unroll 16
        for (int n = 0; n < 16; n++) _mm512_mask_storeu_ps(hl + n * Ch, m, h[n]);
    return 1;
}
#define mfz_fwd_route16_d(...) 0
#else
#define mfz_fwd_route16_f(...) 0
#define mfz_fwd_route16_d(...) 0
#endif

/* step -> map position of route r */
static void route_index(int64_t *idx, int64_t R, int64_t H, int64_t W) {
    int64_t L = H * W;
    for (int64_t r = 0; r < R; r++) {
        for (int64_t t = 0; t < L; t++) {
            int64_t q = (r >= 2) ? L - 1 - t : t;
            idx[r * L + t] = (r % 2 == 1) ? (q % H) * W + q / H : q;
        }
    }
}

typedef struct {
    const mfz_scan_args *a;
    const int64_t *idx;
    int64_t tid;
    int err; /* set by a worker that could not allocate its buffers */
} mfz_job;

static int run_threads(const mfz_scan_args *a, const int64_t *idx, void *(*fn)(void *)) {
    int64_t T = a->nthreads < 1 ? 1 : a->nthreads;
    mfz_job jobs[256];
    if (T > 256) T = 256;
    for (int64_t i = 0; i < T; i++) {
        jobs[i].a = a; jobs[i].idx = idx; jobs[i].tid = i; jobs[i].err = 0;
    }
#if defined(_OPENMP)
    /* built against the OpenMP runtime torch already loaded (cpu.py): torch's own worker threads run the jobs, so
     * none of them spins beside ours; a smaller team runs several jobs per thread */
#pragma omp parallel num_threads(T)
    {
        for (int64_t i = omp_get_thread_num(); i < T; i += omp_get_num_threads()) fn(&jobs[i]);
    }
#else
    pthread_t th[256];
    int64_t started = 0;
    for (int64_t i = 1; i < T; i++) {
        if (pthread_create(&th[i], NULL, fn, &jobs[i]) != 0) break;
        started = i;
    }
    /* threads that could not start: their units run here */
    for (int64_t i = started + 1; i < T; i++) fn(&jobs[i]);
    fn(&jobs[0]);
    for (int64_t i = 1; i <= started; i++) pthread_join(th[i], NULL);
#endif
    int err = 0;
    for (int64_t i = 0; i < T; i++) err |= jobs[i].err;
    return err ? -1 : 0;
}

/* this thread's share [u0, u1) of the work units */
static void unit_range(const mfz_job *j, int64_t units, int64_t *u0, int64_t *u1) {
    const int64_t T = j->a->nthreads < 1 ? 1 : (j->a->nthreads > 256 ? 256 : j->a->nthreads);
    *u0 = units * j->tid / T;
    *u1 = units * (j->tid + 1) / T;
}

/* channel blocks: each group's Ch / G channels split into runs of BLK (the last one may be narrower) */
static int64_t blocks_per_group(const mfz_scan_args *a) { return (a->Ch / a->G + BLK - 1) / BLK; }

static void block_of(const mfz_scan_args *a, int64_t q, int64_t *g, int64_t *c0, int64_t *w) {
    const int64_t nbg = blocks_per_group(a), cg = a->Ch / a->G, j = q % nbg;
    *g = q / nbg;
    *c0 = *g * cg + j * BLK;
    *w = cg - j * BLK < BLK ? cg - j * BLK : BLK;
}

static void *aligned_buf(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

/* ---------------------------------------------------------------------------------------------------------------
 * forward / backward, written once for float (suffix f) and double (suffix d)
 * ------------------------------------------------------------------------------------------------------------- */
#define MFZ_DEFINE(S, SUF, EXPF, SOFTPLUS, DECAY, ASCALE)                                                                            \
/* BLK lanes from src (w valid, the rest 0) */                                                                     \
static inline void load_##SUF(S *restrict dst, const S *restrict src, int64_t w) {                                 \
    if (w == BLK) {                                                                                                \
        _Pragma("omp simd")                                                                                        \
        for (int64_t v = 0; v < BLK; v++) dst[v] = src[v];                                                         \
    } else {                                                                                                       \
        for (int64_t v = 0; v < BLK; v++) dst[v] = v < w ? src[v] : (S)0;                                          \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
/* per-route constants of a block: A (N x BLK lanes), A * ASCALE (N x BLK, the decay's), the dt projection block   \
 * (Rdt x BLK, when dtw), then D, bias */                                                                          \
static void route_consts_##SUF(const mfz_scan_args *a, int64_t r, int64_t c0, int64_t w, S *Ab, S *Dv, S *bv) {    \
    const int64_t N = a->N, Ch = a->Ch;                                                                            \
    for (int64_t n = 0; n < N; n++) load_##SUF(Ab + n * BLK, (const S *)a->A + (r * N + n) * Ch + c0, w);          \
    _Pragma("omp simd")                                                                                            \
    for (int64_t i = 0; i < N * BLK; i++) Ab[N * BLK + i] = Ab[i] * ASCALE;                                        \
    if (a->dtw)                                                                                                    \
        for (int64_t j = 0; j < a->Rdt; j++)                                                                       \
            load_##SUF(Ab + (2 * N + j) * BLK, (const S *)a->dtw + (r * a->Rdt + j) * Ch + c0, w);                 \
    if (a->D) load_##SUF(Dv, (const S *)a->D + r * Ch + c0, w); else memset(Dv, 0, BLK * sizeof(S));               \
    if (a->bias) load_##SUF(bv, (const S *)a->bias + r * Ch + c0, w); else memset(bv, 0, BLK * sizeof(S));         \
}                                                                                                                  \
                                                                                                                   \
/* x, delta (after bias / softplus), pre-activation delta + bias of step position p */                             \
static inline void step_in_##SUF(const mfz_scan_args *a, int64_t b, int64_t r, int64_t p, int64_t c0, int64_t w,   \
                                 const S *restrict Wb, const S *restrict bv, S *restrict x, S *restrict d,         \
                                 S *restrict pre) {                                                                \
    load_##SUF(x, (const S *)a->u + b * a->su0 + p * a->su1 + c0, w);                                              \
    if (a->dtw) { /* the raw delta from the low-rank input (Wb: the block's dt projection, route_consts) */        \
        const S *restrict di = (const S *)a->delta + b * a->sd0 + r * a->sd1 + p * a->sd2;                         \
        memset(pre, 0, BLK * sizeof(S));                                                                           \
        for (int64_t j = 0; j < a->Rdt; j++) {                                                                     \
            const S dj = di[j];                                                                                    \
            _Pragma("omp simd")                                                                                    \
            for (int64_t v = 0; v < BLK; v++) pre[v] += Wb[j * BLK + v] * dj;                                      \
        }                                                                                                          \
    } else {                                                                                                       \
        load_##SUF(pre, (const S *)a->delta + b * a->sd0 + r * a->sd1 + p * a->sd2 + c0, w);                       \
    }                                                                                                              \
    if (a->softplus) {                                                                                             \
        _Pragma("omp simd")                                                                                        \
        for (int64_t v = 0; v < BLK; v++) { pre[v] += bv[v]; d[v] = SOFTPLUS(pre[v]); }                            \
    } else {                                                                                                       \
        _Pragma("omp simd")                                                                                        \
        for (int64_t v = 0; v < BLK; v++) { pre[v] += bv[v]; d[v] = pre[v]; }                                      \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
/* step_in for the steps [t0, t1) of route r: x and d into consecutive BLK-lane rows, the pre-activations every    \
 * pre_step lanes (0: one row, overwritten); the inputs of step t + PF are prefetched (column routes jump a map    \
 * row per step) */                                                                                                \
static void chunk_in_##SUF(const mfz_scan_args *a, const int64_t *ix, int64_t b, int64_t r, int64_t c0, int64_t w, \
                           int64_t t0, int64_t t1, const S *Wb, const S *bv, S *x, S *d, S *pre,                   \
                           int64_t pre_step) {                                                                     \
    const int64_t dc = a->dtw ? 0 : c0; /* the low-rank row has no channel offset */                               \
    for (int64_t t = t0; t < t1; t++) {                                                                            \
        const int64_t i = t - t0;                                                                                  \
        if (t + PF < t1) {                                                                                         \
            const int64_t q = ix[t + PF];                                                                          \
            __builtin_prefetch((const S *)a->u + b * a->su0 + q * a->su1 + c0);                                    \
            __builtin_prefetch((const S *)a->delta + b * a->sd0 + r * a->sd1 + q * a->sd2 + dc);                   \
        }                                                                                                          \
        step_in_##SUF(a, b, r, ix[t], c0, w, Wb, bv, x + i * BLK, d + i * BLK, pre + i * pre_step);                \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
/* h <- exp(d A) h + d x B_t, for every state n (A2 = A * ASCALE); acc (if not NULL) += <C_t, h> */                \
static inline void step_state_##SUF(int64_t N, const S *restrict A2, const S *restrict d, const S *restrict x,     \
                                    const S *restrict Bt, const S *restrict Ct, S *restrict h, S *restrict acc,    \
                                    S *restrict ea_out) {                                                          \
    if (mfz_step_fast_##SUF(N, A2, d, x, Bt, Ct, h, acc, ea_out)) return;                                          \
    S dx[BLK];                                                                                                     \
    _Pragma("omp simd")                                                                                            \
    for (int64_t v = 0; v < BLK; v++) dx[v] = d[v] * x[v];                                                         \
    for (int64_t n = 0; n < N; n++) {                                                                              \
        const S bn = Bt[n];                                                                                        \
        S eal[BLK];                                                                                                \
        S *restrict ea = ea_out ? ea_out + n * BLK : eal; /* the decays, kept when ea_out is given */              \
        DECAY(ea, d, A2 + n * BLK);                                                                                \
        S *restrict hn = h + n * BLK;                                                                              \
        if (acc) {                                                                                                 \
            const S cn = Ct[n];                                                                                    \
            _Pragma("omp simd")                                                                                    \
            for (int64_t v = 0; v < BLK; v++) {                                                                    \
                const S hv = ea[v] * hn[v] + dx[v] * bn;                                                           \
                hn[v] = hv;                                                                                        \
                acc[v] += cn * hv;                                                                                 \
            }                                                                                                      \
        } else {                                                                                                   \
            _Pragma("omp simd")                                                                                    \
            for (int64_t v = 0; v < BLK; v++) hn[v] = ea[v] * hn[v] + dx[v] * bn;                                  \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
typedef struct { S *Ab, *h, *x, *d, *pre, *acc, *Dv, *bv; } fwd_buf_##SUF; /* x, d: TCH rows */                    \
                                                                                                                   \
static void fwd_block_##SUF(const mfz_scan_args *a, const int64_t *idx, int64_t b, int64_t q, fwd_buf_##SUF *k) {  \
    const int64_t R = a->R, Ch = a->Ch, G = a->G, L = a->L, N = a->N;                                              \
    int64_t g, c0, w;                                                                                              \
    block_of(a, q, &g, &c0, &w);                                                                                   \
    S *y = (S *)a->y + b * L * Ch + c0;                                                                            \
    for (int64_t r = 0; r < R; r++) {                                                                              \
        const int64_t *ix = idx + (R == 1 ? 0 : r * L);                                                            \
        const S *Bg = (const S *)a->Bm + b * a->sb0 + (r * G + g) * a->sb1;                                        \
        const S *Cg = (const S *)a->Cm + b * a->sc0 + (r * G + g) * a->sc1;                                        \
        route_consts_##SUF(a, r, c0, w, k->Ab, k->Dv, k->bv);                                                      \
        memset(k->h, 0, (size_t)(N * BLK) * sizeof(S));                                                            \
        S *ck = a->ck ? (S *)a->ck + (b * R + r) * ((L + TCH - 1) / TCH) * N * Ch + c0 : NULL;                     \
        if (mfz_fwd_route16_##SUF(a, ix, b, r, c0, w, k->Ab + N * BLK, k->Dv, k->bv, Bg, Cg, y, ck,                \
                                  a->hlast ? (S *)a->hlast + (b * R + r) * N * Ch + c0 : NULL))                    \
            continue; /* the whole route ran in registers */                                                       \
        for (int64_t t0 = 0; t0 < L; t0 += TCH) {                                                                  \
            const int64_t t1 = t0 + TCH < L ? t0 + TCH : L;                                                        \
            /* the chunk's inputs first (x, delta after bias / softplus): the state steps never wait on them */    \
            chunk_in_##SUF(a, ix, b, r, c0, w, t0, t1, k->Ab + 2 * N * BLK, k->bv, k->x, k->d, k->pre, 0);         \
            if (ck) {                                                                                              \
                S *cj = ck + (t0 / TCH) * N * Ch;                                                                  \
                for (int64_t n = 0; n < N; n++) memcpy(cj + n * Ch, k->h + n * BLK, (size_t)w * sizeof(S));        \
            }                                                                                                      \
            for (int64_t t = t0; t < t1; t++) {                                                                    \
                const int64_t i = t - t0, p = ix[t];                                                               \
                if (t + PF < L) {                                                                                  \
                    const int64_t q = ix[t + PF];                                                                  \
                    __builtin_prefetch(Bg + q * a->sb2);                                                           \
                    __builtin_prefetch(Cg + q * a->sc2);                                                           \
                    __builtin_prefetch(y + q * Ch, 1);                                                             \
                }                                                                                                  \
                const S *restrict xv = k->x + i * BLK;                                                             \
                _Pragma("omp simd")                                                                                \
                for (int64_t v = 0; v < BLK; v++) k->acc[v] = k->Dv[v] * xv[v];                                    \
                step_state_##SUF(N, k->Ab + N * BLK, k->d + i * BLK, xv, Bg + p * a->sb2, Cg + p * a->sc2, k->h,   \
                                 k->acc, NULL);                                                                    \
                S *yp = y + p * Ch;                                                                                \
                if (r == 0) { for (int64_t v = 0; v < w; v++) yp[v] = k->acc[v]; }                                 \
                else { for (int64_t v = 0; v < w; v++) yp[v] += k->acc[v]; }                                       \
            }                                                                                                      \
        }                                                                                                          \
        if (a->hlast) {                                                                                            \
            S *hl = (S *)a->hlast + (b * R + r) * N * Ch + c0;                                                     \
            for (int64_t n = 0; n < N; n++) memcpy(hl + n * Ch, k->h + n * BLK, (size_t)w * sizeof(S));            \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
static void *fwd_worker_##SUF(void *arg) {                                                                         \
    mfz_job *j = (mfz_job *)arg;                                                                                   \
    const mfz_scan_args *a = j->a;                                                                                 \
    const int64_t nbt = a->G * blocks_per_group(a);                                                                \
    int64_t u0, u1;                                                                                                \
    unit_range(j, a->Bsz * nbt, &u0, &u1);                                                                         \
    if (u0 >= u1) return NULL;                                                                                     \
    const int64_t NB = a->N * BLK;                                                                                 \
    const int64_t AB = 2 * NB + (a->dtw ? a->Rdt : 0) * BLK; /* Ab: A, A * ASCALE, dt projection block */          \
    S *buf = (S *)aligned_buf((size_t)(AB + NB + (2 * TCH + 4) * BLK) * sizeof(S));                                \
    if (!buf) { j->err = 1; return NULL; }                                                                         \
    S *o = buf + AB + NB; /* Ab (AB), h (NB), x and d of a chunk (TCH rows each), BLK-lane rows */                 \
    S *e = o + 2 * TCH * BLK;                                                                                      \
    fwd_buf_##SUF k = {buf, buf + AB, o, o + TCH * BLK, e, e + BLK, e + 2 * BLK, e + 3 * BLK};                     \
    for (int64_t w = u0; w < u1; w++) fwd_block_##SUF(a, j->idx, w / nbt, w % nbt, &k);                            \
    free(buf);                                                                                                     \
    return NULL;                                                                                                   \
}                                                                                                                  \
                                                                                                                   \
typedef struct {                                                                                                   \
    S *Ab, *Dv, *bv, *h, *ck, *Hc, *xs, *ds, *pre, *mu, *dAa, *g, *lamB, *dsum, *dDa, *dba, *EAc;                  \
} bwd_buf_##SUF;                                                                                                   \
                                                                                                                   \
static void bwd_block_##SUF(const mfz_scan_args *a, const int64_t *idx, int64_t b, int64_t q, S *dBp, S *dCp,      \
                            bwd_buf_##SUF *k) {                                                                    \
    const int64_t R = a->R, Ch = a->Ch, G = a->G, L = a->L, N = a->N, NB = N * BLK;                                \
    int64_t g, c0, w;                                                                                              \
    block_of(a, q, &g, &c0, &w);                                                                                   \
    S *du = (S *)a->du + b * L * Ch + c0;                                                                          \
    for (int64_t p = 0; p < L; p++) memset(du + p * Ch, 0, (size_t)w * sizeof(S));                                 \
    for (int64_t r = 0; r < R; r++) {                                                                              \
        const int64_t *ix = idx + (R == 1 ? 0 : r * L);                                                            \
        const S *Bg = (const S *)a->Bm + b * a->sb0 + (r * G + g) * a->sb1;                                        \
        const S *Cg = (const S *)a->Cm + b * a->sc0 + (r * G + g) * a->sc1;                                        \
        S *dBg = dBp + (r * G + g) * L * N;                                                                        \
        S *dCg = dCp + (r * G + g) * L * N;                                                                        \
        S *ddl = (S *)a->ddelta + (b * R + r) * L * Ch + c0;                                                       \
        route_consts_##SUF(a, r, c0, w, k->Ab, k->Dv, k->bv);                                                      \
        /* checkpoints ck[j] = the state before step j * TCH: the forward's, else taken here */                    \
        const S *cks = a->ck ? (const S *)a->ck + (b * R + r) * ((L + TCH - 1) / TCH) * N * Ch + c0 : NULL;        \
        if (!cks) {                                                                                                \
            memset(k->h, 0, (size_t)NB * sizeof(S));                                                               \
            memset(k->ck, 0, (size_t)NB * sizeof(S));                                                              \
            const int64_t tck = ((L - 1) / TCH) * TCH; /* steps before the last checkpoint */                      \
            for (int64_t t = 0; t < tck; t++) {                                                                    \
                step_in_##SUF(a, b, r, ix[t], c0, w, k->Ab + 2 * N * BLK, k->bv, k->xs, k->ds, k->pre);            \
                step_state_##SUF(N, k->Ab + N * BLK, k->ds, k->xs, Bg + ix[t] * a->sb2, NULL, k->h, NULL, NULL);   \
                if ((t + 1) % TCH == 0) memcpy(k->ck + ((t + 1) / TCH) * NB, k->h, (size_t)NB * sizeof(S));        \
            }                                                                                                      \
        }                                                                                                          \
        if (a->gh) {                                                                                               \
            const S *ghr = (const S *)a->gh + (b * R + r) * N * Ch + c0;                                           \
            for (int64_t n = 0; n < N; n++) load_##SUF(k->mu + n * BLK, ghr + n * Ch, w);                          \
        } else {                                                                                                   \
            memset(k->mu, 0, (size_t)NB * sizeof(S));                                                              \
        }                                                                                                          \
        memset(k->dAa, 0, (size_t)NB * sizeof(S));                                                                 \
        memset(k->dDa, 0, BLK * sizeof(S));                                                                        \
        memset(k->dba, 0, BLK * sizeof(S));                                                                        \
        for (int64_t jc = (L - 1) / TCH; jc >= 0; jc--) {                                                          \
            const int64_t t0 = jc * TCH, t1 = t0 + TCH < L ? t0 + TCH : L;                                         \
            /* recompute this chunk's states into Hc (its inputs into xs / ds / pre) */                            \
            S *ckj = cks ? k->ck : k->ck + jc * NB;                                                                \
            if (cks) for (int64_t n = 0; n < N; n++) load_##SUF(ckj + n * BLK, cks + (jc * N + n) * Ch, w);        \
            memcpy(k->h, ckj, (size_t)NB * sizeof(S));                                                             \
            /* the chunk's inputs first, then its states (as the forward) */                                       \
            chunk_in_##SUF(a, ix, b, r, c0, w, t0, t1, k->Ab + 2 * N * BLK, k->bv, k->xs, k->ds, k->pre, BLK);     \
            for (int64_t t = t0; t < t1; t++) {                                                                    \
                const int64_t i = t - t0, p = ix[t];                                                               \
                if (t + PF < L) __builtin_prefetch(Bg + ix[t + PF] * a->sb2);                                      \
                step_state_##SUF(N, k->Ab + N * BLK, k->ds + i * BLK, k->xs + i * BLK, Bg + p * a->sb2, NULL, k->h, \
                                 NULL, k->EAc + i * NB);                                                           \
                memcpy(k->Hc + i * NB, k->h, (size_t)NB * sizeof(S));                                              \
            }                                                                                                      \
            for (int64_t t = t1 - 1; t >= t0; t--) {                                                               \
                const int64_t i = t - t0, p = ix[t];                                                               \
                if (t >= PF) {                                                                                     \
                    const int64_t q = ix[t - PF];                                                                  \
                    __builtin_prefetch((const S *)a->gy + b * a->sg0 + q * a->sg1 + c0);                           \
                    __builtin_prefetch(Cg + q * a->sc2);                                                           \
                    __builtin_prefetch(dBg + q * N, 1);                                                            \
                    __builtin_prefetch(dCg + q * N, 1);                                                            \
                    __builtin_prefetch(du + q * Ch, 1);                                                            \
                    __builtin_prefetch(ddl + q * Ch, 1);                                                           \
                }                                                                                                  \
                const S *restrict xv = k->xs + i * BLK, *restrict dv = k->ds + i * BLK;                            \
                const S *restrict ht = k->Hc + i * NB;                                                             \
                const S *restrict hp = i ? k->Hc + (i - 1) * NB : ckj;                                             \
                const S *restrict Bt = Bg + p * a->sb2, *restrict Ct = Cg + p * a->sc2;                            \
                S *restrict dBt = dBg + p * N, *restrict dCt = dCg + p * N;                                        \
                S *restrict gv = k->g, *restrict lamB = k->lamB, *restrict dsum = k->dsum;                         \
                load_##SUF(gv, (const S *)a->gy + b * a->sg0 + p * a->sg1 + c0, w);                                \
                if (!mfz_bwd_step_fast_##SUF(N, k->Ab, k->EAc + i * NB, dv, xv, gv, ht, hp, Bt, Ct, k->mu, k->dAa, \
                                             lamB, dsum, dBt, dCt)) {                                              \
                S dx[BLK];                                                                                         \
                _Pragma("omp simd")                                                                                \
                for (int64_t v = 0; v < BLK; v++) { lamB[v] = 0; dsum[v] = 0; dx[v] = dv[v] * xv[v]; }             \
                for (int64_t n = 0; n < N; n++) {                                                                  \
                    const S cn = Ct[n], bn = Bt[n];                                                                \
                    const S *restrict An = k->Ab + n * BLK, *restrict hn = ht + n * BLK;                           \
                    const S *restrict hpn = hp + n * BLK;                                                          \
                    S *restrict mun = k->mu + n * BLK, *restrict dAn = k->dAa + n * BLK;                           \
                    const S *restrict ea = k->EAc + i * NB + n * BLK;                                              \
                    S sB = 0, sC = 0;                                                                              \
                    _Pragma("omp simd reduction(+:sB, sC)")                                                        \
                    for (int64_t v = 0; v < BLK; v++) {                                                            \
                        const S lam = cn * gv[v] + mun[v];                                                         \
                        sC += gv[v] * hn[v];                                                                       \
                        sB += lam * dx[v];                                                                         \
                        lamB[v] += lam * bn;                                                                       \
                        const S m = ea[v] * lam;                                                                   \
                        const S ah = m * hpn[v];                                                                   \
                        dsum[v] += ah * An[v];                                                                     \
                        dAn[v] += ah * dv[v];                                                                      \
                        mun[v] = m;                                                                                \
                    }                                                                                              \
                    dBt[n] += sB;                                                                                  \
                    dCt[n] += sC;                                                                                  \
                }                                                                                                  \
                }                                                                                                  \
                S *dup = du + p * Ch, *ddp = ddl + p * Ch;                                                         \
                const S *prev = k->pre + i * BLK;                                                                  \
                S dd[BLK];                                                                                         \
                _Pragma("omp simd")                                                                                \
                for (int64_t v = 0; v < BLK; v++) {                                                                \
                    S e = xv[v] * lamB[v] + dsum[v];                                                               \
                    if (a->softplus) e = prev[v] <= (S)20 ? e / ((S)1 + EXPF(-prev[v])) : e;                       \
                    dd[v] = e;                                                                                     \
                    k->dba[v] += e;                                                                                \
                    k->dDa[v] += gv[v] * xv[v];                                                                    \
                }                                                                                                  \
                for (int64_t v = 0; v < w; v++) {                                                                  \
                    dup[v] += dv[v] * lamB[v] + k->Dv[v] * gv[v];                                                  \
                    ddp[v] = dd[v];                                                                                \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        S *dAr = (S *)a->dA + (b * R + r) * N * Ch + c0;                                                           \
        for (int64_t n = 0; n < N; n++) memcpy(dAr + n * Ch, k->dAa + n * BLK, (size_t)w * sizeof(S));             \
        if (a->dD) memcpy((S *)a->dD + (b * R + r) * Ch + c0, k->dDa, (size_t)w * sizeof(S));                      \
        if (a->dbias) memcpy((S *)a->dbias + (b * R + r) * Ch + c0, k->dba, (size_t)w * sizeof(S));                \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
static void *bwd_worker_##SUF(void *arg) {                                                                         \
    mfz_job *j = (mfz_job *)arg;                                                                                   \
    const mfz_scan_args *a = j->a;                                                                                 \
    const int64_t nbt = a->G * blocks_per_group(a), N = a->N, NB = a->N * BLK;                                     \
    int64_t u0, u1;                                                                                                \
    unit_range(j, a->Bsz * a->nblk, &u0, &u1);                                                                     \
    if (u0 >= u1) return NULL;                                                                                     \
    const int64_t nck = (a->L + TCH - 1) / TCH;                                                                    \
    const size_t sizes[17] = {2 * NB + (a->dtw ? a->Rdt : 0) * BLK, BLK, BLK, NB, (a->ck ? 1 : nck) * NB, TCH * NB, \
                              TCH * BLK, TCH * BLK, TCH * BLK, NB, NB, BLK, BLK, BLK, BLK, BLK, TCH * NB};         \
    size_t total = 0;                                                                                              \
    for (int i = 0; i < 17; i++) total += sizes[i];                                                                \
    S *buf = (S *)aligned_buf(total * sizeof(S));                                                                  \
    if (!buf) { j->err = 1; return NULL; }                                                                         \
    S *ptrs[17];                                                                                                   \
    size_t off = 0;                                                                                                \
    for (int i = 0; i < 17; i++) { ptrs[i] = buf + off; off += sizes[i]; }                                         \
    bwd_buf_##SUF k = {ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], ptrs[6], ptrs[7], ptrs[8], ptrs[9],   \
                       ptrs[10], ptrs[11], ptrs[12], ptrs[13], ptrs[14], ptrs[15], ptrs[16]};                      \
    (void)N;                                                                                                       \
    const size_t slab = (size_t)(a->R * a->G * a->L * a->N);                                                       \
    for (int64_t w = u0; w < u1; w++) {                                                                            \
        const int64_t b = w / a->nblk, run = w % a->nblk;                                                          \
        S *dBp = (S *)a->dB + (run * a->Bsz + b) * slab;                                                           \
        S *dCp = (S *)a->dC + (run * a->Bsz + b) * slab;                                                           \
        memset(dBp, 0, slab * sizeof(S));                                                                          \
        memset(dCp, 0, slab * sizeof(S));                                                                          \
        for (int64_t q = nbt * run / a->nblk; q < nbt * (run + 1) / a->nblk; q++)                                  \
            bwd_block_##SUF(a, j->idx, b, q, dBp, dCp, &k);                                                        \
    }                                                                                                              \
    free(buf);                                                                                                     \
    return NULL;                                                                                                   \
}

MFZ_DEFINE(float, f, mfz_expf, mfz_softplusf, mfz_decay_f, 1.44269504088896341f)
MFZ_DEFINE(double, d, mfz_exp, mfz_softplus, mfz_decay_d, 1.0)

/* the route index, then the workers; 0 on success, -1 if a buffer could not be allocated (cpu.py raises
 * MemoryError) */
static int run(const mfz_scan_args *a, void *(*worker)(void *)) {
    int64_t *idx = (int64_t *)malloc((size_t)(a->R * a->L) * sizeof(int64_t));
    if (!idx) return -1;
    route_index(idx, a->R, a->R == 1 ? 1 : a->H, a->R == 1 ? a->L : a->W);
    int rc = run_threads(a, idx, worker);
    free(idx);
    return rc;
}

int mfz_scan_fwd(const mfz_scan_args *a, int dbl) { return run(a, dbl ? fwd_worker_d : fwd_worker_f); }

int mfz_scan_bwd(const mfz_scan_args *a, int dbl) { return run(a, dbl ? bwd_worker_d : bwd_worker_f); }
