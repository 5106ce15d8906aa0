/* dyadiq integer kernels; semantics are those of dyadiq/reference_interpreter.py, bit for bit. */
#include "dq_kernels.h"

#include <math.h>
#include <string.h>

/* specialised copies (constant flip, window size) need inlining, which -O2 may decline */
#if defined(__GNUC__)
#define DQ_SPECIALISE static inline __attribute__((always_inline))
#else
#define DQ_SPECIALISE static inline
#endif

/* from this many output channels per group on, gathering each receptive field once pays */
#define DQ_IM2COL_MIN_CHANNELS 4

/* shift is in [0, 31] (the emitter checks it), so the rounding term is a 32-bit shift */
static inline int64_t dq_rescale(int64_t acc, int32_t mult, int32_t shift)
{
    int64_t rounding = shift > 0 ? (int64_t)(1u << (shift - 1)) : 0;
    return (acc * (int64_t)mult + rounding) >> shift; /* arithmetic shift: a floor */
}

static inline int64_t dq_clamp(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline uint8_t dq_requantize(const dq_requant *rq, int64_t acc, int32_t channel)
{
    int32_t c = rq->per_channel ? channel : 0;
    int64_t v = dq_rescale(acc, rq->mult[c], rq->shift[c]) + rq->zero_point;
    return (uint8_t)dq_clamp(v, rq->lo, rq->hi); /* a signed code's byte is its two's complement */
}

/* One channel's requantization constants, loaded once into locals: a kernel that writes many
 * outputs of one channel then needs no reloads after its uint8_t stores (which may alias). */
typedef struct {
    int64_t rounding;
    int32_t mult, shift, zero_point, lo, hi;
} dq_channel_requant;

static inline dq_channel_requant dq_channel(const dq_requant *rq, int32_t channel)
{
    const int32_t c = rq->per_channel ? channel : 0;
    const int32_t k = rq->shift[c];
    const dq_channel_requant r = {k > 0 ? (int64_t)(1u << (k - 1)) : 0, rq->mult[c], k,
                                  rq->zero_point, rq->lo, rq->hi};
    return r;
}

static inline uint8_t dq_apply(const dq_channel_requant *r, int32_t acc)
{
    int64_t v = (((int64_t)acc * r->mult + r->rounding) >> r->shift) + r->zero_point;
    return (uint8_t)dq_clamp(v, r->lo, r->hi);
}

/* The weights of output channel ``row`` (``len`` of them) as int8 (unpacked when 4-bit). */
static const int8_t *dq_weight_row(const dq_weights *w, int32_t row, int32_t len,
                                   int8_t *scratch)
{
    if (w->bits == 8) {
        return (const int8_t *)w->data + row * len;
    }
    const uint8_t *packed = (const uint8_t *)w->data + row * ((len + 1) >> 1);
    for (int32_t i = 0; i < len; ++i) {
        int32_t byte = packed[i >> 1];
        int32_t nibble = (i & 1) ? (byte >> 4) : (byte & 15);
        scratch[i] = (int8_t)((nibble ^ 8) - 8); /* sign-extend 4 bits */
    }
    return scratch;
}

/* Position of tap j in the im2col column. With SMLAD, each group of four taps is stored as
 * (0, 2, 1, 3): SXTB16 of four int8 weights yields the lanes (w0, w2) and, rotated, (w1, w3). */
static inline int32_t dq_column_slot(int32_t j, int32_t taps)
{
#if defined(__ARM_FEATURE_DSP)
    if (j < (taps & ~3)) {
        static const int8_t order[4] = {0, 2, 1, 3};
        return (j & ~3) | order[j & 3];
    }
#else
    (void)taps;
#endif
    return j;
}

static inline int32_t dq_dot_int8(const int16_t *col, const int8_t *w, int32_t taps)
{
    int32_t acc = 0, j = 0;
#if defined(__ARM_FEATURE_DSP)
    for (; j + 4 <= taps; j += 4) {
        uint32_t packed, c02, c13;
        memcpy(&packed, w + j, 4); /* an unaligned word load */
        memcpy(&c02, col + j, 4);
        memcpy(&c13, col + j + 2, 4);
        uint32_t w02, w13;
        __asm("sxtb16 %0, %1" : "=r"(w02) : "r"(packed));
        __asm("sxtb16 %0, %1, ror #8" : "=r"(w13) : "r"(packed));
        __asm("smlad %0, %1, %2, %0" : "+r"(acc) : "r"(c02), "r"(w02));
        __asm("smlad %0, %1, %2, %0" : "+r"(acc) : "r"(c13), "r"(w13));
    }
#endif
    for (; j < taps; ++j) {
        acc += col[j] * w[j];
    }
    return acc;
}

static inline int32_t dq_dot_int4(const int16_t *col, const uint8_t *packed, int32_t taps)
{
    int32_t acc = 0, j = 0;
#if defined(__ARM_FEATURE_DSP)
    /* Four nibbles w0..w3 (two bytes) moved to the top of bytes 0 and 2 of two words, so that
     * SXTB16 yields the lanes (16 w0, 16 w2) and (16 w1, 16 w3); the sum of products is then
     * 16 times the true one, divided exactly at the end (|16 acc| < 2^31: see mcu_c.py). */
    int32_t acc16 = 0;
    for (; j + 4 <= taps; j += 4) {
        uint16_t h;
        uint32_t c02, c13, w02, w13;
        memcpy(&h, packed + (j >> 1), 2);
        const uint32_t even = ((uint32_t)(h << 4) & 0xF0u) | (((uint32_t)h << 12) & 0xF00000u);
        const uint32_t odd = ((uint32_t)h & 0xF0u) | (((uint32_t)h << 8) & 0xF00000u);
        memcpy(&c02, col + j, 4);
        memcpy(&c13, col + j + 2, 4);
        __asm("sxtb16 %0, %1" : "=r"(w02) : "r"(even));
        __asm("sxtb16 %0, %1" : "=r"(w13) : "r"(odd));
        __asm("smlad %0, %1, %2, %0" : "+r"(acc16) : "r"(c02), "r"(w02));
        __asm("smlad %0, %1, %2, %0" : "+r"(acc16) : "r"(c13), "r"(w13));
    }
    acc = acc16 >> 4; /* a multiple of 16: the shift is an exact division */
#endif
    /* the rest in natural order (dq_column_slot leaves taps past the last group of 4 alone) */
    for (; j + 2 <= taps; j += 2) {
        const int32_t byte = packed[j >> 1];
        acc += col[j] * (((byte & 15) ^ 8) - 8) + col[j + 1] * (((byte >> 4) ^ 8) - 8);
    }
    if (j < taps) {
        acc += col[j] * (((packed[j >> 1] & 15) ^ 8) - 8);
    }
    return acc;
}

/* Convolution with many output channels per group: each output pixel's receptive field is
 * gathered once (centred codes, zeros for padding) and reused by all of them. */
static void dq_conv2d_im2col(const dq_conv *p, const uint8_t *x, uint8_t *y, int16_t *col)
{
    const int32_t cg = p->cin / p->group, og = p->cout / p->group;
    const int32_t taps = cg * p->kh * p->kw, plane = p->h * p->w, out_plane = p->oh * p->ow;
    const int32_t row_bytes = p->weights.bits == 8 ? taps : (taps + 1) >> 1;
    for (int32_t n = 0; n < p->n; ++n) {
        for (int32_t g = 0; g < p->group; ++g) {
            const uint8_t *xg = x + (n * p->cin + g * cg) * plane;
            for (int32_t oy = 0; oy < p->oh; ++oy) {
                for (int32_t ox = 0; ox < p->ow; ++ox) {
                    const int32_t iy0 = oy * p->sh - p->pad_top, ix0 = ox * p->sw - p->pad_left;
                    int32_t j = 0;
                    for (int32_t ic = 0; ic < cg; ++ic) {
                        for (int32_t ky = 0; ky < p->kh; ++ky) {
                            const int32_t iy = iy0 + ky * p->dh;
                            for (int32_t kx = 0; kx < p->kw; ++kx, ++j) {
                                const int32_t ix = ix0 + kx * p->dw;
                                int32_t v = 0; /* padding: a centred zero */
                                if (iy >= 0 && iy < p->h && ix >= 0 && ix < p->w) {
                                    v = (int32_t)(xg[ic * plane + iy * p->w + ix] ^ p->flip) -
                                        p->zero;
                                }
                                col[dq_column_slot(j, taps)] = (int16_t)v;
                            }
                        }
                    }
                    const int32_t pix = oy * p->ow + ox;
                    for (int32_t k = 0; k < og; ++k) {
                        const int32_t oc = g * og + k;
                        const uint8_t *row = (const uint8_t *)p->weights.data + oc * row_bytes;
                        int32_t acc = p->bias[oc];
                        acc += p->weights.bits == 8 ? dq_dot_int8(col, (const int8_t *)row, taps)
                                                    : dq_dot_int4(col, row, taps);
                        y[(n * p->cout + oc) * out_plane + pix] = dq_requantize(&p->rq, acc, oc);
                    }
                }
            }
        }
    }
}

/* One output pixel whose window lies wholly inside the input: no bounds checks, and the zero
 * point's contribution is the constant zero * sum(w), applied by the caller. Called with
 * constant kh, kw, dh, dw for the common windows so that the compiler unrolls them. */
DQ_SPECIALISE int32_t dq_conv_interior(const uint8_t *xs, const int8_t *wr, int32_t cg,
                                       int32_t plane, int32_t width, const uint8_t flip,
                                       const int32_t kh, const int32_t kw, const int32_t dh,
                                       const int32_t dw)
{
    int32_t acc = 0;
    for (int32_t ic = 0; ic < cg; ++ic, xs += plane) {
        const uint8_t *row = xs;
        for (int32_t ky = 0; ky < kh; ++ky, row += dh * width) {
            for (int32_t kx = 0; kx < kw; ++kx) {
                acc += (int32_t)(uint8_t)(row[kx * dw] ^ flip) * *wr++;
            }
        }
    }
    return acc;
}

static int32_t dq_conv_interior_any(const dq_conv *p, const uint8_t *xs, const int8_t *wr,
                                    int32_t cg, int32_t plane)
{
    const int32_t w = p->w;
    if (p->dh == 1 && p->dw == 1 && p->kh == 3 && p->kw == 3) {
        return p->flip ? dq_conv_interior(xs, wr, cg, plane, w, 0x80, 3, 3, 1, 1)
                       : dq_conv_interior(xs, wr, cg, plane, w, 0, 3, 3, 1, 1);
    }
    if (p->dh == 1 && p->dw == 1 && p->kh == 5 && p->kw == 5) {
        return p->flip ? dq_conv_interior(xs, wr, cg, plane, w, 0x80, 5, 5, 1, 1)
                       : dq_conv_interior(xs, wr, cg, plane, w, 0, 5, 5, 1, 1);
    }
    return dq_conv_interior(xs, wr, cg, plane, w, (uint8_t)p->flip, p->kh, p->kw, p->dh, p->dw);
}

/* The taps k of a window starting at i0 (step d) that fall inside [0, size): [*lo, *hi). */
static inline void dq_valid_taps(int32_t i0, int32_t d, int32_t k, int32_t size, int32_t *lo,
                                 int32_t *hi)
{
    int32_t a = 0, b = k;
    while (a < b && i0 + a * d < 0) {
        ++a;
    }
    while (b > a && i0 + (b - 1) * d >= size) {
        --b;
    }
    *lo = a;
    *hi = b;
}

/* One output pixel at the border: taps outside the input read zero-point-free zeros, that is,
 * they are skipped. */
static int32_t dq_conv_border(const dq_conv *p, const uint8_t *xg, const int8_t *wr, int32_t cg,
                              int32_t plane, int32_t iy0, int32_t ix0)
{
    int32_t ky0, ky1, kx0, kx1;
    dq_valid_taps(iy0, p->dh, p->kh, p->h, &ky0, &ky1);
    dq_valid_taps(ix0, p->dw, p->kw, p->w, &kx0, &kx1);
    int32_t acc = 0;
    for (int32_t ic = 0; ic < cg; ++ic) {
        const uint8_t *xc = xg + ic * plane + ix0;
        const int8_t *wc = wr + ic * p->kh * p->kw;
        for (int32_t ky = ky0; ky < ky1; ++ky) {
            const uint8_t *row = xc + (iy0 + ky * p->dh) * p->w;
            const int8_t *wk = wc + ky * p->kw;
            for (int32_t kx = kx0; kx < kx1; ++kx) {
                acc += ((int32_t)(row[kx * p->dw] ^ p->flip) - p->zero) * wk[kx];
            }
        }
    }
    return acc;
}

/* Depthwise: one channel at a time, a row of int32 accumulators (in scratch) updated tap by tap
 * along contiguous input rows; the valid output range of each tap is computed once, so the
 * inner loop has no bounds checks even when every window touches the padding (short maps). */
static void dq_conv_depthwise(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    int32_t *acc = (int32_t *)(void *)scratch;
    int8_t *unpacked = scratch + 4 * p->ow;
    const int32_t plane = p->h * p->w, taps = p->kh * p->kw, sw = p->sw;
    const int32_t zero = p->zero;
    const uint8_t flip = (uint8_t)p->flip;
    for (int32_t n = 0; n < p->n; ++n) {
        for (int32_t c = 0; c < p->cout; ++c) {
            const int8_t *wr = dq_weight_row(&p->weights, c, taps, unpacked);
            const uint8_t *xc = x + (n * p->cin + c) * plane;
            uint8_t *yc = y + (n * p->cout + c) * p->oh * p->ow;
            for (int32_t oy = 0; oy < p->oh; ++oy) {
                for (int32_t ox = 0; ox < p->ow; ++ox) {
                    acc[ox] = p->bias[c];
                }
                const int32_t iy0 = oy * p->sh - p->pad_top;
                int32_t ky0, ky1;
                dq_valid_taps(iy0, p->dh, p->kh, p->h, &ky0, &ky1);
                for (int32_t ky = ky0; ky < ky1; ++ky) {
                    const uint8_t *row = xc + (iy0 + ky * p->dh) * p->w;
                    for (int32_t kx = 0; kx < p->kw; ++kx) {
                        const int32_t wv = wr[ky * p->kw + kx];
                        const int32_t off = kx * p->dw - p->pad_left; /* ix = ox * sw + off */
                        const int32_t ox0 = off < 0 ? (-off + sw - 1) / sw : 0;
                        const int32_t end = p->w - off; /* ox * sw < end */
                        int32_t ox1 = end <= 0 ? 0 : (end + sw - 1) / sw;
                        ox1 = ox1 < p->ow ? ox1 : p->ow;
                        const uint8_t *xp = row + ox0 * sw + off;
                        for (int32_t ox = ox0; ox < ox1; ++ox, xp += sw) {
                            acc[ox] += ((int32_t)(uint8_t)(*xp ^ flip) - zero) * wv;
                        }
                    }
                }
                const dq_channel_requant r = dq_channel(&p->rq, c);
                for (int32_t ox = 0; ox < p->ow; ++ox) {
                    yc[oy * p->ow + ox] = dq_apply(&r, acc[ox]);
                }
            }
        }
    }
}

void dq_conv2d(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    if (p->group == p->cin && p->group == p->cout) {
        dq_conv_depthwise(p, x, y, scratch);
        return;
    }
    const int32_t cg = p->cin / p->group, og = p->cout / p->group;
    const int32_t taps = cg * p->kh * p->kw, plane = p->h * p->w;
    if (og >= DQ_IM2COL_MIN_CHANNELS) {
        dq_conv2d_im2col(p, x, y, (int16_t *)(void *)scratch);
        return;
    }
    const int32_t span_h = (p->kh - 1) * p->dh, span_w = (p->kw - 1) * p->dw;
    for (int32_t n = 0; n < p->n; ++n) {
        for (int32_t oc = 0; oc < p->cout; ++oc) {
            const int8_t *wr = dq_weight_row(&p->weights, oc, taps, scratch);
            int32_t wsum = 0;
            for (int32_t t = 0; t < taps; ++t) {
                wsum += wr[t];
            }
            const uint8_t *xg = x + ((int32_t)n * p->cin + (oc / og) * cg) * plane;
            const int32_t bias = p->bias[oc];
            const int32_t interior_bias = bias - p->zero * wsum;
            uint8_t *yo = y + (n * p->cout + oc) * p->oh * p->ow;
            for (int32_t oy = 0; oy < p->oh; ++oy) {
                const int32_t iy0 = oy * p->sh - p->pad_top;
                const int rows_inside = iy0 >= 0 && iy0 + span_h < p->h;
                for (int32_t ox = 0; ox < p->ow; ++ox) {
                    const int32_t ix0 = ox * p->sw - p->pad_left;
                    int32_t acc;
                    if (rows_inside && ix0 >= 0 && ix0 + span_w < p->w) {
                        const uint8_t *xs = xg + iy0 * p->w + ix0;
                        acc = interior_bias + dq_conv_interior_any(p, xs, wr, cg, plane);
                    } else {
                        acc = bias + dq_conv_border(p, xg, wr, cg, plane, iy0, ix0);
                    }
                    yo[oy * p->ow + ox] = dq_requantize(&p->rq, acc, oc);
                }
            }
        }
    }
}

/* 1x1, stride 1, no padding, one group: a matrix product over channels, four pixels at a time
 * so that each weight load serves four multiply-accumulates. */
DQ_SPECIALISE void dq_conv1x1_row(const dq_conv *p, const uint8_t *xn, const int8_t *wr,
                                  int32_t oc, uint8_t *yo, const uint8_t flip)
{
    const int32_t plane = p->h * p->w;
    const int32_t bias = p->bias[oc];
    const dq_channel_requant r = dq_channel(&p->rq, oc);
    const int32_t cin = p->cin;
    int32_t pix = 0;
    for (; pix + 4 <= plane; pix += 4) {
        int32_t a0 = bias, a1 = bias, a2 = bias, a3 = bias;
        const uint8_t *xp = xn + pix;
        for (int32_t ic = 0; ic < cin; ++ic, xp += plane) {
            const int32_t wv = wr[ic];
            a0 += (int32_t)(uint8_t)(xp[0] ^ flip) * wv;
            a1 += (int32_t)(uint8_t)(xp[1] ^ flip) * wv;
            a2 += (int32_t)(uint8_t)(xp[2] ^ flip) * wv;
            a3 += (int32_t)(uint8_t)(xp[3] ^ flip) * wv;
        }
        yo[pix] = dq_apply(&r, a0);
        yo[pix + 1] = dq_apply(&r, a1);
        yo[pix + 2] = dq_apply(&r, a2);
        yo[pix + 3] = dq_apply(&r, a3);
    }
    for (; pix < plane; ++pix) {
        int32_t acc = bias;
        const uint8_t *xp = xn + pix;
        for (int32_t ic = 0; ic < cin; ++ic, xp += plane) {
            acc += (int32_t)(uint8_t)(xp[0] ^ flip) * wr[ic];
        }
        yo[pix] = dq_apply(&r, acc);
    }
}

void dq_conv1x1(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    const int32_t plane = p->h * p->w;
    for (int32_t n = 0; n < p->n; ++n) {
        const uint8_t *xn = x + n * p->cin * plane;
        for (int32_t oc = 0; oc < p->cout; ++oc) {
            const int8_t *wr = dq_weight_row(&p->weights, oc, p->cin, scratch);
            uint8_t *yo = y + (n * p->cout + oc) * plane;
            /* the flip as a constant: unsigned activations (the common case) need no XOR */
            if (p->flip) {
                dq_conv1x1_row(p, xn, wr, oc, yo, 0x80);
            } else {
                dq_conv1x1_row(p, xn, wr, oc, yo, 0);
            }
        }
    }
}

void dq_matmul_const(const dq_matmul *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    const uint8_t flip = (uint8_t)p->flip;
    for (int32_t j = 0; j < p->cols; ++j) {
        const int8_t *wr = dq_weight_row(&p->weights, j, p->k, scratch);
        for (int32_t r = 0; r < p->rows; ++r) {
            const uint8_t *xr = x + r * p->k;
            int32_t acc = p->bias[j];
            for (int32_t i = 0; i < p->k; ++i) {
                acc += (int32_t)(uint8_t)(xr[i] ^ flip) * wr[i];
            }
            y[r * p->cols + j] = dq_requantize(&p->rq, acc, j);
        }
    }
}

void dq_matmul_activations(const dq_matmul_act *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    for (int32_t t = 0; t < p->batch; ++t) {
        const uint8_t *at = a + t * p->a_batch_stride;
        const uint8_t *bt = b + t * p->b_batch_stride;
        uint8_t *yt = y + t * p->m * p->n;
        for (int32_t r = 0; r < p->m; ++r) {
            for (int32_t j = 0; j < p->n; ++j) {
                int64_t acc = 0;
                for (int32_t i = 0; i < p->k; ++i) {
                    int32_t av = (int32_t)(at[r * p->k + i] ^ p->a_flip) - p->a_zero;
                    int32_t bv = (int32_t)(bt[i * p->n + j] ^ p->b_flip) - p->b_zero;
                    acc += av * bv;
                }
                yt[r * p->n + j] = dq_requantize(&p->rq, acc, j);
            }
        }
    }
}

/* Visit a 4-d output with broadcast input strides; f combines the two centred values. */
#define DQ_BINARY_LOOP(p, a, b, y, body)                                                      \
    do {                                                                                      \
        int32_t idx = 0, i[4];                                                                \
        for (i[0] = 0; i[0] < (p)->shape[0]; ++i[0])                                          \
            for (i[1] = 0; i[1] < (p)->shape[1]; ++i[1])                                      \
                for (i[2] = 0; i[2] < (p)->shape[2]; ++i[2]) {                                \
                    int32_t ia = i[0] * (p)->a_stride[0] + i[1] * (p)->a_stride[1] +          \
                                 i[2] * (p)->a_stride[2];                                     \
                    int32_t ib = i[0] * (p)->b_stride[0] + i[1] * (p)->b_stride[1] +          \
                                 i[2] * (p)->b_stride[2];                                     \
                    for (i[3] = 0; i[3] < (p)->shape[3]; ++i[3], ++idx) {                     \
                        int32_t va = (int32_t)((a)[ia] ^ (p)->a_flip) - (p)->a_zero;          \
                        int32_t vb = (int32_t)((b)[ib] ^ (p)->b_flip) - (p)->b_zero;          \
                        int32_t channel = i[(p)->channel_dim];                                \
                        (y)[idx] = (body);                                                    \
                        ia += (p)->a_stride[3];                                               \
                        ib += (p)->b_stride[3];                                               \
                    }                                                                         \
                }                                                                             \
    } while (0)

static inline uint8_t dq_add_one(const dq_binary *p, int32_t va, int32_t vb)
{
    int64_t v = p->single_rounding
        ? dq_rescale((int64_t)va * p->a_mult + (int64_t)vb * p->b_mult, 1, p->a_shift)
        : dq_rescale(va, p->a_mult, p->a_shift) + dq_rescale(vb, p->b_mult, p->b_shift);
    return (uint8_t)dq_clamp(v + p->rq.zero_point, p->rq.lo, p->rq.hi);
}

/* Kernels copy their parameters to a local first: a store through uint8_t * may alias
 * anything reachable through p, which would force the compiler to reload every field after
 * every output byte. */
void dq_add(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    const dq_binary q = *p;
    DQ_BINARY_LOOP(&q, a, b, y, ((void)channel, dq_add_one(&q, va, vb)));
}

/* The larger (smaller) code, stored back as a byte: a signed code as two's complement. */
void dq_max(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    const dq_binary q = *p;
    DQ_BINARY_LOOP(&q, a, b, y, ((void)channel, (uint8_t)(va > vb ? va : vb)));
}

void dq_min(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    const dq_binary q = *p;
    DQ_BINARY_LOOP(&q, a, b, y, ((void)channel, (uint8_t)(va < vb ? va : vb)));
}

void dq_mul(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    const dq_binary q = *p;
    int32_t idx = 0, i[4];
    for (i[0] = 0; i[0] < q.shape[0]; ++i[0]) {
        for (i[1] = 0; i[1] < q.shape[1]; ++i[1]) {
            for (i[2] = 0; i[2] < q.shape[2]; ++i[2]) {
                int32_t ia = i[0] * q.a_stride[0] + i[1] * q.a_stride[1] + i[2] * q.a_stride[2];
                int32_t ib = i[0] * q.b_stride[0] + i[1] * q.b_stride[1] + i[2] * q.b_stride[2];
                /* per-channel constants change along the last dim only if it is the channel */
                dq_channel_requant r = dq_channel(&q.rq, q.channel_dim < 3 ? i[q.channel_dim] : 0);
                for (i[3] = 0; i[3] < q.shape[3]; ++i[3], ++idx) {
                    if (q.channel_dim == 3) {
                        r = dq_channel(&q.rq, i[3]);
                    }
                    const int32_t va = (int32_t)(a[ia] ^ q.a_flip) - q.a_zero;
                    const int32_t vb = (int32_t)(b[ib] ^ q.b_flip) - q.b_zero;
                    y[idx] = dq_apply(&r, va * vb); /* |va|, |vb| <= 255: fits int32 */
                    ia += q.a_stride[3];
                    ib += q.b_stride[3];
                }
            }
        }
    }
}

void dq_global_avg_pool(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    for (int32_t o = 0; o < p->outer; ++o) {
        for (int32_t c = 0; c < p->channels; ++c) {
            const uint8_t *xc = x + (o * p->channels + c) * p->inner;
            int32_t sum = 0;
            for (int32_t i = 0; i < p->inner; ++i) {
                sum += (int32_t)(xc[i] ^ p->flip);
            }
            sum -= p->zero * p->inner;
            y[o * p->channels + c] = dq_requantize(&p->rq, sum, c);
        }
    }
}

/* Visit [outer][channels][inner] elementwise with the centred input value v. */
#define DQ_UNARY_LOOP(p, x, y, body)                                                          \
    do {                                                                                      \
        int32_t idx = 0;                                                                      \
        for (int32_t o = 0; o < (p)->outer; ++o)                                              \
            for (int32_t c = 0; c < (p)->channels; ++c)                                       \
                for (int32_t i = 0; i < (p)->inner; ++i, ++idx) {                             \
                    int64_t v = (int32_t)((x)[idx] ^ (p)->flip) - (p)->zero;                  \
                    (y)[idx] = (body);                                                        \
                }                                                                             \
    } while (0)

static inline uint8_t dq_hard_sigmoid_one(const dq_unary *p, int64_t v, int32_t c)
{
    const dq_requant *rq = &p->rq;
    int32_t k = rq->per_channel ? c : 0;
    int64_t out = dq_rescale(v, rq->mult[k], rq->shift[k]) + p->offset + rq->zero_point;
    return (uint8_t)dq_clamp(out, rq->lo, rq->hi);
}

void dq_hard_sigmoid(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    const dq_unary q = *p;
    DQ_UNARY_LOOP(&q, x, y, dq_hard_sigmoid_one(&q, v, c));
}

static inline uint8_t dq_hard_swish_one(const dq_unary *p, int64_t v, int32_t c)
{
    const int64_t one = (int64_t)1 << p->frac_bits;
    int64_t gate = dq_rescale(v, p->gate_mult, p->gate_shift) + (one >> 1);
    gate = dq_clamp(gate, 0, one);
    return dq_requantize(&p->rq, v * gate, c);
}

void dq_hard_swish(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    const dq_unary q = *p;
    DQ_UNARY_LOOP(&q, x, y, dq_hard_swish_one(&q, v, c));
}

static inline uint8_t dq_leaky_relu_one(const dq_unary *p, int64_t v, int32_t c)
{
    const dq_requant *rq = &p->rq;
    int32_t k = rq->per_channel ? c : 0, kn = p->neg_per_channel ? c : 0;
    int64_t positive = dq_rescale(v > 0 ? v : 0, rq->mult[k], rq->shift[k]);
    int64_t negative = dq_rescale(v < 0 ? v : 0, p->neg_mult[kn], p->neg_shift[kn]);
    return (uint8_t)dq_clamp(positive + negative + rq->zero_point, rq->lo, rq->hi);
}

void dq_leaky_relu(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    const dq_unary q = *p;
    DQ_UNARY_LOOP(&q, x, y, dq_leaky_relu_one(&q, v, c));
}

void dq_lookup(const uint8_t table[256], int32_t count, const uint8_t *x, uint8_t *y)
{
    for (int32_t i = 0; i < count; ++i) {
        y[i] = table[x[i]];
    }
}

void dq_clip(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    /* zero here is 128 for signed tensors: v is then the raw code, clipped in code units */
    const dq_unary q = *p;
    DQ_UNARY_LOOP(&q, x, y, ((void)c, (uint8_t)dq_clamp(v, q.rq.lo, q.rq.hi)));
}

static inline int64_t dq_floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* The I-BERT exponential of one element, relative to the row maximum ``top``. */
static int64_t dq_softmax_exp(const dq_softmax_params *p, int32_t code, int32_t top)
{
    enum { MAX_SHIFT = 30 }; /* SOFTMAX_MAX_SHIFT of the reference */
    int64_t d = (int64_t)(code - top) * ((int64_t)1 << p->upscale_bits);
    int64_t z = dq_floor_div(-d, p->ln2_codes);
    int64_t t = d + z * p->ln2_codes + p->b_codes;
    return (t * t + p->c_codes) >> (z < MAX_SHIFT ? z : MAX_SHIFT);
}

void dq_softmax(const dq_softmax_params *p, const uint8_t *x, uint8_t *y)
{
    for (int32_t r = 0; r < p->rows; ++r) {
        const uint8_t *xr = x + r * p->len;
        int32_t top = 0;
        for (int32_t i = 0; i < p->len; ++i) {
            int32_t q = xr[i] ^ p->flip; /* code + 128 for signed: differences are unchanged */
            top = (i == 0 || q > top) ? q : top;
        }
        int64_t sum = 0;
        for (int32_t i = 0; i < p->len; ++i) {
            sum += dq_softmax_exp(p, xr[i] ^ p->flip, top);
        }
        /* the exponentials are recomputed rather than stored: no row buffer on the stack */
        for (int32_t i = 0; i < p->len; ++i) {
            int64_t e = dq_softmax_exp(p, xr[i] ^ p->flip, top);
            int64_t prob = sum == 0 ? 0 : dq_floor_div(e * ((int64_t)1 << p->frac_bits), sum);
            y[r * p->len + i] = dq_requantize(&p->rq, prob, i);
        }
    }
}

void dq_maxpool(const dq_maxpool_params *p, const uint8_t *x, uint8_t *y)
{
    for (int32_t plane = 0; plane < p->n * p->c; ++plane) {
        const uint8_t *xp = x + plane * p->h * p->w;
        uint8_t *yp = y + plane * p->oh * p->ow;
        for (int32_t oy = 0; oy < p->oh; ++oy) {
            for (int32_t ox = 0; ox < p->ow; ++ox) {
                int32_t best = -1;
                for (int32_t ky = 0; ky < p->kh; ++ky) {
                    for (int32_t kx = 0; kx < p->kw; ++kx) {
                        int32_t iy = oy * p->sh - p->pad_top + ky;
                        int32_t ix = ox * p->sw - p->pad_left + kx;
                        int32_t v = (iy >= 0 && iy < p->h && ix >= 0 && ix < p->w)
                                        ? (int32_t)(xp[iy * p->w + ix] ^ p->flip)
                                        : p->fill;
                        best = v > best ? v : best;
                    }
                }
                yp[oy * p->ow + ox] = (uint8_t)(best ^ p->flip);
            }
        }
    }
}

void dq_transpose4(const int32_t shape[4], const int32_t perm[4], const uint8_t *x, uint8_t *y)
{
    int32_t stride[4];
    stride[3] = 1;
    for (int32_t d = 2; d >= 0; --d) {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    int32_t out_shape[4], out_stride[4];
    for (int32_t d = 0; d < 4; ++d) {
        out_shape[d] = shape[perm[d]];
        out_stride[d] = stride[perm[d]]; /* input stride of the output's dim d */
    }
    int32_t idx = 0;
    for (int32_t a = 0; a < out_shape[0]; ++a)
        for (int32_t b = 0; b < out_shape[1]; ++b)
            for (int32_t c = 0; c < out_shape[2]; ++c)
                for (int32_t d = 0; d < out_shape[3]; ++d)
                    y[idx++] = x[a * out_stride[0] + b * out_stride[1] + c * out_stride[2] +
                                 d * out_stride[3]];
}

void dq_copy_blocks(uint8_t *dst, int32_t dst_stride, const uint8_t *src, int32_t src_stride,
                    int32_t count, int32_t block)
{
    for (int32_t i = 0; i < count; ++i) {
        memcpy(dst + i * dst_stride, src + i * src_stride, (size_t)block);
    }
}

void dq_quantize_input(const float *x, uint8_t *y, int32_t count, float scale, int32_t zero_point,
                       int32_t qmin, int32_t qmax)
{
    for (int32_t i = 0; i < count; ++i) {
        /* float32 division and round-half-to-even, as numpy's np.round(x / np.float32(s)) */
        float r = rintf(x[i] / scale);
        int64_t v;
        if (r != r) {
            v = qmin; /* NaN: numpy's cast gives INT64_MIN, clipped to qmin */
        } else if (r < -1e9f) {
            v = qmin;
        } else if (r > 1e9f) {
            v = qmax;
        } else {
            v = dq_clamp((int64_t)r + zero_point, qmin, qmax);
        }
        y[i] = (uint8_t)v;
    }
}
