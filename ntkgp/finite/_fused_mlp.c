/* Full-batch gradient descent for ensembles of plain multilayer perceptrons, one member at a time.
 *
 * The CPU engine of ntkgp.finite.train_ensemble for networks Dense -> activation -> ... -> Dense
 * (ntkgp/finite/fused.py compiles and calls it). torch's stacked step runs all members at once and
 * streams the whole ensemble's weights from memory in four passes per step (forward product,
 * backward product, and the update, which reads and writes them), in matrix products with
 * as few rows as there are training points, which use a fraction of the CPU's arithmetic. Here each
 * member runs all the steps it is given while its weights stay in cache, and each step passes over
 * a weight matrix twice: the forward product, then the backward product fused with the update.
 *
 * Per member and step, layer l (0-based, L layers), m training points, M target entries:
 *   forward:  u_l = h_l * s_l (input scale, per input row), z_l = u_l W_l + c_l b_l,
 *             h_{l+1} = phi_l(z_l); f = z_{L-1}
 *   loss:     (1/2M) sum (f - y)^2, checked for divergence before the update
 *   backward: d_{L-1} = (f - y)/M,  d_{l-1} = (d_l W_l^T) * s_l * phi_{l-1}'(z_{l-1})
 *   update:   W_l[k, :] -= rate_l[k] sum_i u_l[i, k] d_l[i, :],  b_l -= rb_l c_l sum_i d_l[i, :]
 * every d computed from the weights before the step, as autograd does. Weights are (members, in,
 * out) row-major, biases (members, out), as torch stacks them.
 *
 * Compiled once per precision: -DNTKGP_DOUBLE gives the float64 kernel.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef NTKGP_DOUBLE
typedef double real;
#pragma omp declare simd notinbranch
double erf(double);
#pragma omp declare simd notinbranch
double exp(double);
#define ERF erf
#define EXP exp
#else
typedef float real;
#pragma omp declare simd notinbranch
float erff(float);
#pragma omp declare simd notinbranch
float expf(float);
#define ERF erff
#define EXP expf
#endif

#define VL ((int64_t)(32 / sizeof(real)))
/* 32-byte vectors that may sit at any element boundary */
typedef real vec __attribute__((vector_size(32), aligned(sizeof(real)), may_alias));
#define AT(p) (*(vec *)(p))
#define MAXB 6 /* rows of the training batch per register block */
#define ROW_BLOCK_BYTES 131072 /* rows of W multiplied together: well inside L2 */

enum { ACT_IDENTITY = 0, ACT_ERF = 1, ACT_ABRELU = 2 };

static inline real hsum(vec v) {
    real s = 0;
    for (int64_t l = 0; l < VL; l++) s += v[l];
    return s;
}

/* z[i0:i0+B, j0:j0+2VL] += u[i0:i0+B, k0:k1] W[k0:k1, j0:j0+2VL]; B constant after inlining. While it
 * works, it prefetches one cache line of the next block of rows (`next`, `lines` of them) per row. */
static inline __attribute__((always_inline)) void fwd_block(const real *u, int64_t in, const real *W, int64_t out,
                                                             real *z, int64_t i0, int64_t j0, int64_t k0, int64_t k1,
                                                             const char *next, int64_t lines, const int B) {
    vec a0[MAXB], a1[MAXB];
    for (int b = 0; b < B; b++) {
        a0[b] = AT(z + (i0 + b) * out + j0);
        a1[b] = AT(z + (i0 + b) * out + j0 + VL);
    }
    for (int64_t k = k0; k < k1; k++) {
        const real *w = W + k * out + j0;
        if (k - k0 < lines) __builtin_prefetch(next + 64 * (k - k0), 0, 3);
        vec w0 = AT(w), w1 = AT(w + VL);
        for (int b = 0; b < B; b++) {
            real c = u[(i0 + b) * in + k];
            a0[b] += c * w0;
            a1[b] += c * w1;
        }
    }
    for (int b = 0; b < B; b++) {
        AT(z + (i0 + b) * out + j0) = a0[b];
        AT(z + (i0 + b) * out + j0 + VL) = a1[b];
    }
}

/* z (m x out) += u (m x in) W (in x out), in blocks of rows of W that fit in L2; the next block is
 * prefetched line by line, in order, while the current one is multiplied: W is larger than L2 at
 * the widths that matter, and the column blocks' stride through it would otherwise wait on L3. Not
 * inlined (nor the row pass): inlined into the training loop, the compiler spilled registers in the
 * hot loops (1.4x slower). */
static __attribute__((noinline)) void forward_product(const real *u, int64_t m, int64_t in, const real *W, int64_t out,
                                                      real *z) {
    const int64_t fit = ROW_BLOCK_BYTES / (out * (int64_t)sizeof(real)), rows = fit > 8 ? fit : 8;
    const int64_t width = out - out % (2 * VL);
    for (int64_t k0 = 0; k0 < in; k0 += rows) {
        const int64_t k1 = k0 + rows < in ? k0 + rows : in;
        const char *next = (const char *)(W + k1 * out);
        int64_t remaining = k1 < in ? ((in - k1 < rows ? in - k1 : rows) * out * (int64_t)sizeof(real) + 63) / 64 : 0;
        for (int64_t j0 = 0; j0 < width; j0 += 2 * VL) {
            for (int64_t i0 = 0; i0 < m; i0 += MAXB) {
                int64_t lines = i0 == 0 ? (remaining < k1 - k0 ? remaining : k1 - k0) : 0;
                switch (m - i0 < MAXB ? m - i0 : MAXB) {
                case 1: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 1); break;
                case 2: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 2); break;
                case 3: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 3); break;
                case 4: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 4); break;
                case 5: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 5); break;
                default: fwd_block(u, in, W, out, z, i0, j0, k0, k1, next, lines, 6); break;
                }
                next += 64 * lines;
                remaining -= lines;
            }
        }
    }
    if (width == out) return;
    for (int64_t k = 0; k < in; k++)       /* columns left over (all of a narrow readout's) */
        for (int64_t i = 0; i < m; i++) {
            const real c = u[i * in + k];
            for (int64_t j = width; j < out; j++) z[i * out + j] += c * W[k * out + j];
        }
}

/* For rows i0..i0+B of the batch and one weight row w (length out):
 * g[i] = d[i, :] . w (before the update), then w -= sum_i c[i] d[i, :] */
static inline __attribute__((always_inline)) void row_block(const real *d, int64_t out, real *w, const real *c,
                                                             real *g, int64_t i0, const int B, int update) {
    vec acc[MAXB];
    real cb[MAXB];   /* local: the stores to w could alias c, and would force a reload per use */
    for (int b = 0; b < B; b++) {
        acc[b] = (vec){0};
        cb[b] = c[i0 + b];
    }
    int64_t j = 0;
    for (; j + VL <= out; j += VL) {
        vec wj = AT(w + j), step = (vec){0};
        for (int b = 0; b < B; b++) {
            vec dj = AT(d + (i0 + b) * out + j);
            acc[b] += dj * wj;
            step += cb[b] * dj;
        }
        if (update) AT(w + j) = wj - step;
    }
    real rest[MAXB] = {0};
    for (; j < out; j++) {
        real step = 0;
        for (int b = 0; b < B; b++) {
            rest[b] += d[(i0 + b) * out + j] * w[j];
            step += c[i0 + b] * d[(i0 + b) * out + j];
        }
        if (update) w[j] -= step;
    }
    for (int b = 0; b < B; b++) g[i0 + b] = hsum(acc[b]) + rest[b];
}

static __attribute__((noinline)) void row_pass(const real *d, int64_t m, int64_t out, real *w, const real *c, real *g,
                                               real *scratch) {
    /* every dot product must see the row before its update: with one block of the batch both happen
     * in one sweep; with more, all dot products first, then each block's share of the update */
    int single = m <= MAXB;
    for (int pass = 0; pass < (single ? 1 : 2); pass++) {
        int update = single || pass == 1;
        real *out_g = pass == 1 ? scratch : g;
        for (int64_t i0 = 0; i0 < m; i0 += MAXB) {
            switch (m - i0 < MAXB ? m - i0 : MAXB) {
            case 1: row_block(d, out, w, c, out_g, i0, 1, update); break;
            case 2: row_block(d, out, w, c, out_g, i0, 2, update); break;
            case 3: row_block(d, out, w, c, out_g, i0, 3, update); break;
            case 4: row_block(d, out, w, c, out_g, i0, 4, update); break;
            case 5: row_block(d, out, w, c, out_g, i0, 5, update); break;
            default: row_block(d, out, w, c, out_g, i0, 6, update); break;
            }
        }
    }
}

/* the row pass of a narrow layer (a readout): plain loops, none of the vector set-up per row */
static void narrow_row_pass(const real *d, int64_t m, int64_t out, real *w, const real *c, real *g) {
    for (int64_t i = 0; i < m; i++) {
        real dot = 0;
        for (int64_t j = 0; j < out; j++) dot += d[i * out + j] * w[j];
        g[i] = dot;
    }
    for (int64_t j = 0; j < out; j++) {
        real step = 0;
        for (int64_t i = 0; i < m; i++) step += c[i] * d[i * out + j];
        w[j] -= step;
    }
}

/* h = phi(z) * s (s: the next layer's input scale, one per column, or NULL) */
static void activate(int64_t act, const double *p, const real *z, real *h, const real *s, int64_t m, int64_t width) {
    const int64_t n = m * width;
    const real a = (real)p[0], b = (real)p[1], c = (real)p[2];
    if (act == ACT_ERF) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) h[i] = a * ERF(b * z[i]) + c;
    } else if (act == ACT_ABRELU) { /* a min(z, 0) + b max(z, 0), NaN kept as NaN */
#pragma omp simd
        for (int64_t i = 0; i < n; i++) h[i] = z[i] > 0 ? b * z[i] : a * z[i];
    } else {
        memcpy(h, z, (size_t)n * sizeof(real));
    }
    if (s)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < width; j++) h[i * width + j] *= s[j];
}

/* d *= phi'(z); at ABReLU's kink (z exactly 0) the mean slope (a + b)/2, as the torch twin's */
static void derivative(int64_t act, const double *p, const real *z, real *d, int64_t n) {
    const real a = (real)p[0], b = (real)p[1];
    if (act == ACT_ERF) {
        const real scale = a * b * (real)1.1283791670955126; /* 2/sqrt(pi) */
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] *= scale * EXP(-(b * z[i]) * (b * z[i]));
    } else if (act == ACT_ABRELU) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] *= z[i] > 0 ? b : (z[i] < 0 ? a : (real)0.5 * (a + b));
    }
}

int64_t ntkgp_work_size(int64_t layers, const int64_t *dims, int64_t m) {
    int64_t size = 0, widest = 0;
    for (int64_t l = 0; l < layers; l++) {
        size += m * dims[l] + m * dims[l + 1];   /* u_l and z_l */
        if (dims[l] > widest) widest = dims[l];
        if (dims[l + 1] > widest) widest = dims[l + 1];
    }
    return size + 2 * m * widest + 3 * m;
}

int64_t ntkgp_train(int64_t members, int64_t layers, const int64_t *dims, real *const *weights, real *const *biases,
                    const real *const *in_scale, const real *bias_scale, const real *const *w_rate,
                    const real *b_rate, const int64_t *act, const double *act_params, const real *x,
                    const real *y, int64_t m, int64_t steps, const double *limit, int64_t check_first,
                    int64_t *diverged, real *work) {
    const int64_t k_out = dims[layers];
    real *u[64], *z[64];
    if (layers > 64) return -1;
    real *p = work;
    int64_t widest = 0;
    for (int64_t l = 0; l < layers; l++) {
        u[l] = p; p += m * dims[l];
        z[l] = p; p += m * dims[l + 1];
        if (dims[l] > widest) widest = dims[l];
        if (dims[l + 1] > widest) widest = dims[l + 1];
    }
    real *d = p, *d_prev = p + m * widest, *coef = p + 2 * m * widest, *g = coef + m, *scratch = g + m;

    for (int64_t e = 0; e < members; e++) {
        diverged[e] = -1;
        for (int64_t step = 0; step < steps; step++) {
            /* forward */
            for (int64_t i = 0; i < m; i++)
                for (int64_t k = 0; k < dims[0]; k++)
                    u[0][i * dims[0] + k] = x[i * dims[0] + k] * (in_scale[0] ? in_scale[0][k] : 1);
            for (int64_t l = 0; l < layers; l++) {
                const int64_t in = dims[l], out = dims[l + 1];
                const real *W = weights[l] + e * in * out;
                if (biases[l]) {
                    const real *bias = biases[l] + e * out;
                    for (int64_t i = 0; i < m; i++)
                        for (int64_t j = 0; j < out; j++) z[l][i * out + j] = bias_scale[l] * bias[j];
                } else {
                    memset(z[l], 0, (size_t)(m * out) * sizeof(real));
                }
                forward_product(u[l], m, in, W, out, z[l]);
                if (l + 1 < layers) activate(act[l], act_params + 3 * l, z[l], u[l + 1], in_scale[l + 1], m, out);
            }
            /* loss and divergence, before the update (as the stacked step checks it) */
            double loss = 0;
            const real *f = z[layers - 1];
            for (int64_t i = 0; i < m * k_out; i++) {
                real r = f[i] - y[i];
                loss += (double)r * r;
                d[i] = r / (real)(m * k_out);
            }
            real member_loss = (real)(0.5 * loss / (double)(m * k_out));
            if ((step > 0 || check_first) && (!isfinite(member_loss) || member_loss > (real)limit[e])) {
                diverged[e] = step;
                break;
            }
            /* backward and update, layer by layer from the readout */
            for (int64_t l = layers - 1; l >= 0; l--) {
                const int64_t in = dims[l], out = dims[l + 1];
                real *W = weights[l] + e * in * out;
                if (biases[l]) {
                    const real rate = b_rate[l] * bias_scale[l];
                    real *bias = biases[l] + e * out;
                    for (int64_t j = 0; j < out; j++) {
                        real sum = 0;
                        for (int64_t i = 0; i < m; i++) sum += d[i * out + j];
                        bias[j] -= rate * sum;
                    }
                }
                for (int64_t k = 0; k < in; k++) {
                    const real rate = w_rate[l][k];
                    for (int64_t i = 0; i < m; i++) coef[i] = rate * u[l][i * in + k];
                    if (out < VL)
                        narrow_row_pass(d, m, out, W + k * out, coef, g);
                    else
                        row_pass(d, m, out, W + k * out, coef, g, scratch);
                    if (l > 0) {
                        const real s = in_scale[l] ? in_scale[l][k] : 1;
                        for (int64_t i = 0; i < m; i++) d_prev[i * in + k] = g[i] * s;
                    }
                }
                if (l > 0) {
                    derivative(act[l - 1], act_params + 3 * (l - 1), z[l - 1], d_prev, m * in);
                    real *t = d; d = d_prev; d_prev = t;
                }
            }
        }
    }
    return 0;
}
