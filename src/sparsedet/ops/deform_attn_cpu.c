/* Multi-scale deformable attention on the CPU: fused bilinear gather, forward and backward.

   Built at first use by deform_attn_kernel.py with the system C compiler and called through ctypes
   (no PyTorch headers, so it builds in about a second). All tensors are contiguous fp32:
     value     [B, S, M, D]        levels flattened fine to coarse, S = sum(H_l * W_l)
     shapes    [L, 2]  (H_l, W_l)  level_start [L]
     locations [B, Q, M, L, P, 2]  (x, y) in [0, 1], align_corners=False, zeros outside
     weights   [B, Q, M, L, P]
     out       [B, Q, M, D]
   Work is split over units u = b * M + m with OpenMP (the runtime PyTorch already loaded, so the
   two share one thread pool): one (image, head) pair writes only its own rows of every output,
   so threads never race and the sums do not depend on the thread count. The caller passes the
   thread count: OpenMP's own setting is per calling thread, so a call from a new Python thread
   would not see torch.set_num_threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#define BUILT_WITH_OPENMP 1
#else
#define BUILT_WITH_OPENMP 0 /* the pragmas below are ignored: one thread */
#endif
#ifndef DEFORM_ATTN_NATIVE
#define DEFORM_ATTN_NATIVE 0 /* set to 1 by the build when tuned for this CPU */
#endif

/* What the build ended up with (a cached library is loaded without rebuilding): bit 0 OpenMP,
   bit 1 tuned for this CPU (-march=native or -mcpu=native). */
int ms_deform_attn_build_info(void) { return BUILT_WITH_OPENMP | (DEFORM_ATTN_NATIVE << 1); }

typedef struct {
    int64_t x, y;    /* top-left neighbour */
    float fx, fy;    /* fractional offsets */
} Corner;

/* Pixel coordinates of a sampling location; 0 when no neighbour lies inside the map. The
   arithmetic is grid_sample's on the CPU, operation for operation, so that a location on a pixel
   line (every location at initialisation) falls in the same cell and gets the same one-sided
   gradient: grid = 2 * loc - 1, then (grid + 1) * (size / 2) - 0.5, the last two steps rounded once
   (ATen's vectorised kernel is compiled to a fused multiply-add; fmaf rounds once on every CPU). */
static int locate(float lx, float ly, int64_t h, int64_t w, Corner *c) {
    float gx = 2.0f * lx - 1.0f, gy = 2.0f * ly - 1.0f;
    float x = fmaf(gx + 1.0f, (float)w * 0.5f, -0.5f), y = fmaf(gy + 1.0f, (float)h * 0.5f, -0.5f);
    /* At exactly -1 only the far neighbour is inside, with bilinear weight 0 but a gradient. */
    if (!(x >= -1.0f && x < (float)w && y >= -1.0f && y < (float)h)) return 0; /* also NaN */
    float x0 = floorf(x), y0 = floorf(y);
    c->x = (int64_t)x0; c->y = (int64_t)y0;
    c->fx = x - x0; c->fy = y - y0;
    return 1;
}

static inline void forward_impl(const float *value, const int64_t *shapes, const int64_t *level_start,
                            const float *locations, const float *weights, float *out,
                            int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P,
                            int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t u = 0; u < B * M; ++u) {
        int64_t b = u / M, m = u % M;
        const float *vb = value + (b * S * M + m) * D;  /* row s of this head: vb + s * M * D */
        for (int64_t q = 0; q < Q; ++q) {
            int64_t row = (b * Q + q) * M + m;
            float *o = out + row * D;
            memset(o, 0, sizeof(float) * D);
            const float *loc = locations + row * L * P * 2;
            const float *wt = weights + row * L * P;
            for (int64_t l = 0; l < L; ++l) {
                int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
                const float *vl = vb + level_start[l] * M * D;
                for (int64_t p = 0; p < P; ++p) {
                    int64_t k = l * P + p;
                    Corner c;
                    if (!locate(loc[2 * k], loc[2 * k + 1], h, w, &c)) continue;
                    float a = wt[k];
                    float bil[4] = {(1 - c.fx) * (1 - c.fy), c.fx * (1 - c.fy), (1 - c.fx) * c.fy, c.fx * c.fy};
                    for (int n = 0; n < 4; ++n) {
                        int64_t xi = c.x + (n & 1), yi = c.y + (n >> 1);
                        if (xi < 0 || xi >= w || yi < 0 || yi >= h) continue;
                        const float *v = vl + (yi * w + xi) * M * D;
                        float s = a * bil[n];
                        for (int64_t d = 0; d < D; ++d) o[d] += s * v[d];
                    }
                }
            }
        }
    }
}

/* Gradients of the forward above. grad_value must be zeroed by the caller; grad_locations and
   grad_weights are written in full. */
static inline void backward_impl(const float *value, const int64_t *shapes, const int64_t *level_start,
                             const float *locations, const float *weights, const float *grad_out,
                             float *grad_value, float *grad_locations, float *grad_weights,
                             int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P,
                             int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t u = 0; u < B * M; ++u) {
        int64_t b = u / M, m = u % M;
        const float *vb = value + (b * S * M + m) * D;
        float *gvb = grad_value + (b * S * M + m) * D;
        for (int64_t q = 0; q < Q; ++q) {
            int64_t row = (b * Q + q) * M + m;
            const float *g = grad_out + row * D;
            const float *loc = locations + row * L * P * 2;
            const float *wt = weights + row * L * P;
            float *gloc = grad_locations + row * L * P * 2;
            float *gwt = grad_weights + row * L * P;
            for (int64_t l = 0; l < L; ++l) {
                int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
                int64_t off = level_start[l] * M * D;
                for (int64_t p = 0; p < P; ++p) {
                    int64_t k = l * P + p;
                    Corner c;
                    gloc[2 * k] = gloc[2 * k + 1] = gwt[k] = 0.0f;
                    if (!locate(loc[2 * k], loc[2 * k + 1], h, w, &c)) continue;
                    float a = wt[k];
                    float bil[4] = {(1 - c.fx) * (1 - c.fy), c.fx * (1 - c.fy), (1 - c.fx) * c.fy, c.fx * c.fy};
                    /* d bil / d fx and d bil / d fy for the four neighbours */
                    float dbx[4] = {-(1 - c.fy), 1 - c.fy, -c.fy, c.fy};
                    float dby[4] = {-(1 - c.fx), -c.fx, 1 - c.fx, c.fx};
                    float gw = 0.0f, gx = 0.0f, gy = 0.0f;
                    for (int n = 0; n < 4; ++n) {
                        int64_t xi = c.x + (n & 1), yi = c.y + (n >> 1);
                        if (xi < 0 || xi >= w || yi < 0 || yi >= h) continue;
                        int64_t at = off + (yi * w + xi) * M * D;
                        const float *v = vb + at;
                        float *gv = gvb + at;
                        float dot = 0.0f, s = a * bil[n];
                        for (int64_t d = 0; d < D; ++d) {
                            dot += g[d] * v[d];
                            gv[d] += s * g[d];
                        }
                        gw += bil[n] * dot;
                        gx += dbx[n] * dot;
                        gy += dby[n] * dot;
                    }
                    gwt[k] = gw;
                    gloc[2 * k] = a * gx * (float)w;
                    gloc[2 * k + 1] = a * gy * (float)h;
                }
            }
        }
    }
}

/* Entry points: the common head widths get their own copies, so the channel loops have a
   constant trip count the compiler can vectorise fully. */
#define DISPATCH(impl, ...) \
    switch (D) { \
        case 16: impl(__VA_ARGS__, 16, Q, L, P, num_threads); break; \
        case 32: impl(__VA_ARGS__, 32, Q, L, P, num_threads); break; \
        case 64: impl(__VA_ARGS__, 64, Q, L, P, num_threads); break; \
        default: impl(__VA_ARGS__, D, Q, L, P, num_threads); \
    }

void ms_deform_attn_forward(const float *value, const int64_t *shapes, const int64_t *level_start,
                            const float *locations, const float *weights, float *out,
                            int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P,
                            int num_threads) {
    DISPATCH(forward_impl, value, shapes, level_start, locations, weights, out, B, S, M)
}

void ms_deform_attn_backward(const float *value, const int64_t *shapes, const int64_t *level_start,
                             const float *locations, const float *weights, const float *grad_out,
                             float *grad_value, float *grad_locations, float *grad_weights,
                             int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P,
                             int num_threads) {
    DISPATCH(backward_impl, value, shapes, level_start, locations, weights, grad_out, grad_value,
             grad_locations, grad_weights, B, S, M)
}
