/* CPU kernel of metaformer_zoo.kernels.selective_scan2d: the selective scan (mamba-ssm selective_scan_ref
 * semantics, real A) as a register recurrence, forward and backward, for the 1D op and the fused 4-route 2D op.
 *
 * Built and loaded by cpu.py (gcc/cc, ctypes, cached per machine); no Python or torch headers are needed. Every
 * tensor is contiguous and in the accumulation dtype (float32 or float64), laid out by cpu.py:
 *
 *   u      (Bsz, Ch, L)        the map (2D: x flattened row-major) or the sequence (1D)
 *   delta  (Bsz, R*Ch, L)      route order (slot k = r*Ch + c), raw: bias and softplus are applied here
 *   A      (R*Ch, N); D, bias (R*Ch) or NULL
 *   Bm, Cm (Bsz, R*G, L, N)    step-major: group r*G + c / (Ch/G) serves channel c on route r
 *   y      (Bsz, Ch, L)        out: sum over the routes of <C_t, h_t> + D u, at each step's map position
 *
 * Routes (R = 4, VMamba CrossScan scans=0): 0 row-major, 1 column-major, 2 / 3 their reverses; R = 1: identity.
 * One work unit is one (batch, channel) pair (forward) or one (batch, channel block) (backward); units never write
 * the same memory: y / du rows belong to one channel (all its routes run in the same unit), dA / dD / dbias are per
 * (batch, slot) partials and dB / dC are per (channel block, batch) partials, summed by the caller. So the results
 * do not depend on the thread count or schedule.
 *
 * exp: float32 uses mfz_expf below (Cody-Waite reduction + the Cephes polynomial, ~1-2 ulp, saturates at e^88,
 * exactly 0 below e^-87.3) so that the state loops vectorize; float64 uses libm's exp.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MFZ_ABI 1

typedef struct {
    int64_t Bsz, R, Ch, G, L, N, H, W;
    int64_t nblk;     /* backward: channel blocks per batch row (dB / dC partials) */
    int64_t softplus; /* delta = softplus(delta + bias) when nonzero (threshold 20, as torch) */
    int64_t nthreads;
    const void *u, *delta, *A, *Bm, *Cm, *D, *bias;
    void *y;     /* forward out (Bsz, Ch, L) */
    void *hlast; /* forward out (Bsz, R*Ch, N) or NULL */
    const void *gy, *gh; /* backward in: (Bsz, Ch, L), (Bsz, R*Ch, N) or NULL */
    void *du;            /* (Bsz, Ch, L), zero-filled by the caller */
    void *ddelta;        /* (Bsz, R*Ch, L): gradient of the raw delta */
    void *dA;            /* (Bsz, R*Ch, N) */
    void *dD, *dbias;    /* (Bsz, R*Ch) or NULL */
    void *dB, *dC;       /* (nblk, Bsz, R*G, L, N), zero-filled by the caller */
} mfz_scan_args;

int mfz_abi(void) { return MFZ_ABI; }

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
    pthread_t th[256];
    if (T > 256) T = 256;
    for (int64_t i = 0; i < T; i++) {
        jobs[i].a = a; jobs[i].idx = idx; jobs[i].tid = i; jobs[i].err = 0;
    }
    int64_t started = 0;
    for (int64_t i = 1; i < T; i++) {
        if (pthread_create(&th[i], NULL, fn, &jobs[i]) != 0) break;
        started = i;
    }
    /* threads that could not start: their units run here */
    for (int64_t i = started + 1; i < T; i++) fn(&jobs[i]);
    fn(&jobs[0]);
    for (int64_t i = 1; i <= started; i++) pthread_join(th[i], NULL);
    int err = 0;
    for (int64_t i = 0; i < T; i++) err |= jobs[i].err;
    return err ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * forward / backward, written once for float (suffix f) and double (suffix d)
 * ------------------------------------------------------------------------------------------------------------- */
/* this thread's share [u0, u1) of the work units */
static void unit_range(const mfz_job *j, int64_t units, int64_t *u0, int64_t *u1) {
    const int64_t T = j->a->nthreads < 1 ? 1 : (j->a->nthreads > 256 ? 256 : j->a->nthreads);
    *u0 = units * j->tid / T;
    *u1 = units * (j->tid + 1) / T;
}

#define MFZ_DEFINE(S, SUF, EXPF, SOFTPLUS)                                                                                    \
static inline __attribute__((always_inline)) void fwd_route_##SUF(                                                   \
        const mfz_scan_args *a, const int64_t *ix, const S *u, S *y, int64_t b, int64_t c, int64_t r, int64_t N,    \
        S *restrict h, S *restrict dts) {                                                                          \
    const int64_t R = a->R, Ch = a->Ch, G = a->G, L = a->L, cg = Ch / G;                                           \
    const int64_t k = r * Ch + c, grp = r * G + c / cg;                                                            \
    const S *dl = (const S *)a->delta + (b * R * Ch + k) * L;                                                      \
    const S *Bg = (const S *)a->Bm + (b * R * G + grp) * L * N;                                                    \
    const S *Cg = (const S *)a->Cm + (b * R * G + grp) * L * N;                                                    \
    const S *Ak = (const S *)a->A + k * N;                                                                         \
    const S Dk = a->D ? ((const S *)a->D)[k] : (S)0;                                                               \
    const S bk = a->bias ? ((const S *)a->bias)[k] : (S)0;                                                         \
    if (a->softplus) {                                                                                             \
        _Pragma("omp simd")                                                                                        \
        for (int64_t t = 0; t < L; t++) dts[t] = SOFTPLUS(dl[t] + bk);                                             \
    } else {                                                                                                       \
        for (int64_t t = 0; t < L; t++) dts[t] = dl[t] + bk;                                                       \
    }                                                                                                              \
    for (int64_t n = 0; n < N; n++) h[n] = 0;                                                                      \
    for (int64_t t = 0; t < L; t++) {                                                                              \
        const int64_t p = ix[t];                                                                                   \
        const S x = u[p];                                                                                          \
        const S d = dts[t];                                                                                        \
        const S dx = d * x;                                                                                        \
        const S *restrict Bt = Bg + t * N;                                                                         \
        const S *restrict Ct = Cg + t * N;                                                                         \
        S acc = 0;                                                                                                 \
        _Pragma("omp simd reduction(+:acc)")                                                                       \
        for (int64_t n = 0; n < N; n++) {                                                                          \
            const S hn = EXPF(d * Ak[n]) * h[n] + dx * Bt[n];                                                      \
            h[n] = hn;                                                                                             \
            acc += Ct[n] * hn;                                                                                     \
        }                                                                                                          \
        acc += Dk * x;                                                                                             \
        if (r == 0) y[p] = acc; else y[p] += acc;                                                                  \
    }                                                                                                              \
    if (a->hlast) memcpy((S *)a->hlast + (b * R * Ch + k) * N, h, (size_t)N * sizeof(S));                         \
}                                                                                                                  \
                                                                                                                   \
static void fwd_unit_##SUF(const mfz_scan_args *a, const int64_t *idx, int64_t b, int64_t c, S *hbuf,      \
                           S *dts) {             \
    const int64_t R = a->R, Ch = a->Ch, L = a->L, N = a->N;                                                        \
    const S *u = (const S *)a->u + (b * Ch + c) * L;                                                               \
    S *y = (S *)a->y + (b * Ch + c) * L;                                                                           \
    S h[16];                                                                                                       \
    for (int64_t r = 0; r < R; r++) {                                                                              \
        const int64_t *ix = idx + (R == 1 ? 0 : r * L);                                                           \
        /* the common state sizes get a compile-time N: the state then lives in registers */                       \
        switch (N) {                                                                                               \
            case 16: fwd_route_##SUF(a, ix, u, y, b, c, r, 16, h, dts); break;                                          \
            case 8: fwd_route_##SUF(a, ix, u, y, b, c, r, 8, h, dts); break;                                            \
            case 4: fwd_route_##SUF(a, ix, u, y, b, c, r, 4, h, dts); break;                                            \
            case 1: fwd_route_##SUF(a, ix, u, y, b, c, r, 1, h, dts); break;                                            \
            default: fwd_route_##SUF(a, ix, u, y, b, c, r, N, hbuf, dts); break;                                        \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
static void *fwd_worker_##SUF(void *arg) {                                                                          \
    mfz_job *j = (mfz_job *)arg;                                                                       \
    const mfz_scan_args *a = j->a;                                                                                 \
    int64_t u0, u1;                                                                                                \
    unit_range(j, a->Bsz * a->Ch, &u0, &u1);                                                                \
    S *h = (S *)malloc((size_t)(a->N + a->L) * sizeof(S));                                                         \
    if (!h) { j->err = 1; return NULL; }                                                                           \
    for (int64_t w = u0; w < u1; w++) fwd_unit_##SUF(a, j->idx, w / a->Ch, w % a->Ch, h, h + a->N);               \
    free(h);                                                                                                       \
    return NULL;                                                                                                   \
}                                                                                                                  \
                                                                                                                   \
static void bwd_unit_##SUF(const mfz_scan_args *a, const int64_t *idx, int64_t b, int64_t blk, S *H, S *dts,       \
                           S *xs, S *mu, S *dAk) {                                                                 \
    const int64_t R = a->R, Ch = a->Ch, G = a->G, L = a->L, N = a->N, cg = Ch / G;                                  \
    const int64_t c0 = Ch * blk / a->nblk, c1 = Ch * (blk + 1) / a->nblk;                                          \
    S *dBp = (S *)a->dB + (blk * a->Bsz + b) * R * G * L * N;                                                      \
    S *dCp = (S *)a->dC + (blk * a->Bsz + b) * R * G * L * N;                                                      \
    for (int64_t c = c0; c < c1; c++) {                                                                            \
        const S *u = (const S *)a->u + (b * Ch + c) * L;                                                           \
        const S *gy = (const S *)a->gy + (b * Ch + c) * L;                                                         \
        S *du = (S *)a->du + (b * Ch + c) * L;                                                                     \
        for (int64_t r = 0; r < R; r++) {                                                                          \
            const int64_t k = r * Ch + c, grp = r * G + c / cg;                                                    \
            const S *dl = (const S *)a->delta + (b * R * Ch + k) * L;                                              \
            const S *Bg = (const S *)a->Bm + (b * R * G + grp) * L * N;                                            \
            const S *Cg = (const S *)a->Cm + (b * R * G + grp) * L * N;                                            \
            S *dBg = dBp + grp * L * N;                                                                            \
            S *dCg = dCp + grp * L * N;                                                                            \
            const S *Ak = (const S *)a->A + k * N;                                                                 \
            const S Dk = a->D ? ((const S *)a->D)[k] : (S)0;                                                       \
            const S bk = a->bias ? ((const S *)a->bias)[k] : (S)0;                                                 \
            const int64_t *ix = idx + (R == 1 ? 0 : r * L);                                                       \
            S *ddl = (S *)a->ddelta + (b * R * Ch + k) * L;                                                        \
            if (a->softplus) {                                                                                     \
                _Pragma("omp simd")                                                                                \
                for (int64_t t = 0; t < L; t++) dts[t] = SOFTPLUS(dl[t] + bk);                                     \
            } else {                                                                                               \
                for (int64_t t = 0; t < L; t++) dts[t] = dl[t] + bk;                                               \
            }                                                                                                      \
            /* recompute the states h_t (t = 0..L-1) of this route */                                              \
            for (int64_t t = 0; t < L; t++) {                                                                      \
                const S x = u[ix[t]];                                                                              \
                const S d = dts[t];                                                                                \
                xs[t] = x;                                                                                         \
                const S dx = d * x;                                                                                \
                const S *restrict Bt = Bg + t * N;                                                                 \
                const S *restrict hp = t ? H + (t - 1) * N : NULL;                                                 \
                S *restrict ht = H + t * N;                                                                        \
                if (hp) {                                                                                          \
                    _Pragma("omp simd")                                                                            \
                    for (int64_t n = 0; n < N; n++) ht[n] = EXPF(d * Ak[n]) * hp[n] + dx * Bt[n];                  \
                } else {                                                                                           \
                    for (int64_t n = 0; n < N; n++) ht[n] = dx * Bt[n];                                            \
                }                                                                                                  \
            }                                                                                                      \
            if (a->gh) memcpy(mu, (const S *)a->gh + (b * R * Ch + k) * N, (size_t)N * sizeof(S));                \
            else for (int64_t n = 0; n < N; n++) mu[n] = 0;                                                        \
            for (int64_t n = 0; n < N; n++) dAk[n] = 0;                                                            \
            S dDk = 0, dbk = 0;                                                                                    \
            for (int64_t t = L - 1; t >= 0; t--) {                                                                 \
                const int64_t p = ix[t];                                                                           \
                const S g = gy[p], d = dts[t], x = xs[t], dx = d * x;                                              \
                const S *restrict Bt = Bg + t * N;                                                                 \
                const S *restrict Ct = Cg + t * N;                                                                 \
                const S *restrict ht = H + t * N;                                                                  \
                S *restrict dBt = dBg + t * N;                                                                     \
                S *restrict dCt = dCg + t * N;                                                                     \
                S lamB = 0, dsum = 0;                                                                              \
                if (t) {                                                                                           \
                    const S *restrict hp = H + (t - 1) * N;                                                        \
                    _Pragma("omp simd reduction(+:lamB, dsum)")                                                    \
                    for (int64_t n = 0; n < N; n++) {                                                              \
                        const S lam = Ct[n] * g + mu[n];                                                           \
                        const S m = EXPF(d * Ak[n]) * lam;                                                         \
                        const S ah = m * hp[n];                                                                    \
                        dCt[n] += g * ht[n];                                                                       \
                        dBt[n] += lam * dx;                                                                        \
                        lamB += lam * Bt[n];                                                                       \
                        dsum += ah * Ak[n];                                                                        \
                        dAk[n] += ah * d;                                                                          \
                        mu[n] = m;                                                                                 \
                    }                                                                                              \
                } else {                                                                                           \
                    _Pragma("omp simd reduction(+:lamB)")                                                          \
                    for (int64_t n = 0; n < N; n++) {                                                              \
                        const S lam = Ct[n] * g + mu[n];                                                           \
                        dCt[n] += g * ht[n];                                                                       \
                        dBt[n] += lam * dx;                                                                        \
                        lamB += lam * Bt[n];                                                                       \
                    }                                                                                              \
                }                                                                                                  \
                du[p] += d * lamB + Dk * g;                                                                        \
                S dd = x * lamB + dsum;                                                                            \
                if (a->softplus) {                                                                                 \
                    const S pre = dl[t] + bk;                                                                      \
                    if (pre <= (S)20) dd = dd / ((S)1 + EXPF(-pre));                                               \
                }                                                                                                  \
                ddl[t] = dd;                                                                                       \
                dbk += dd;                                                                                         \
                dDk += g * x;                                                                                      \
            }                                                                                                      \
            memcpy((S *)a->dA + (b * R * Ch + k) * N, dAk, (size_t)N * sizeof(S));                                \
            if (a->dD) ((S *)a->dD)[b * R * Ch + k] = dDk;                                                         \
            if (a->dbias) ((S *)a->dbias)[b * R * Ch + k] = dbk;                                                   \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
                                                                                                                   \
static void *bwd_worker_##SUF(void *arg) {                                                                          \
    mfz_job *j = (mfz_job *)arg;                                                                       \
    const mfz_scan_args *a = j->a;                                                                                 \
    int64_t u0, u1;                                                                                                \
    unit_range(j, a->Bsz * a->nblk, &u0, &u1);                                                              \
    if (u0 >= u1) return NULL;                                                                                     \
    const int64_t L = a->L, N = a->N;                                                                              \
    S *buf = (S *)malloc((size_t)(L * N + 2 * L + 2 * N) * sizeof(S));                                            \
    if (!buf) { j->err = 1; return NULL; }                                                                                         \
    for (int64_t w = u0; w < u1; w++)                                                                              \
        bwd_unit_##SUF(a, j->idx, w / a->nblk, w % a->nblk, buf, buf + L * N, buf + L * N + L,                     \
                       buf + L * N + 2 * L, buf + L * N + 2 * L + N);                                              \
    free(buf);                                                                                                     \
    return NULL;                                                                                                   \
}

MFZ_DEFINE(float, f, mfz_expf, mfz_softplusf)
MFZ_DEFINE(double, d, mfz_exp, mfz_softplus)

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
