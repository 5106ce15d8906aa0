/* dyadiq integer kernels; semantics are those of dyadiq/reference_interpreter.py, bit for bit. */
#include "dq_kernels.h"

#include <math.h>
#include <string.h>

static inline int64_t dq_rescale(int64_t acc, int32_t mult, int32_t shift)
{
    int64_t rounding = shift > 0 ? ((int64_t)1 << (shift - 1)) : 0;
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

/* The weights of one output channel as int8 values (unpacked into scratch when 4-bit). */
static const int8_t *dq_weight_row(const dq_weights *w, int32_t start, int32_t count,
                                   int8_t *scratch)
{
    if (w->bits == 8) {
        return (const int8_t *)w->data + start;
    }
    const uint8_t *packed = (const uint8_t *)w->data;
    for (int32_t i = 0; i < count; ++i) {
        int32_t e = start + i;
        int32_t byte = packed[e >> 1];
        int32_t nibble = (e & 1) ? (byte >> 4) : (byte & 15);
        scratch[i] = (int8_t)((nibble ^ 8) - 8); /* sign-extend 4 bits */
    }
    return scratch;
}

void dq_conv2d(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    const int32_t cg = p->cin / p->group, og = p->cout / p->group;
    const int32_t taps = cg * p->kh * p->kw, plane = p->h * p->w;
    for (int32_t n = 0; n < p->n; ++n) {
        for (int32_t oc = 0; oc < p->cout; ++oc) {
            const int8_t *wr = dq_weight_row(&p->weights, oc * taps, taps, scratch);
            const uint8_t *xg = x + ((int32_t)n * p->cin + (oc / og) * cg) * plane;
            const int32_t bias = p->bias ? p->bias[oc] : 0;
            uint8_t *yo = y + (n * p->cout + oc) * p->oh * p->ow;
            for (int32_t oy = 0; oy < p->oh; ++oy) {
                const int32_t iy0 = oy * p->sh - p->pad_top;
                for (int32_t ox = 0; ox < p->ow; ++ox) {
                    const int32_t ix0 = ox * p->sw - p->pad_left;
                    int32_t acc = bias;
                    for (int32_t ic = 0; ic < cg; ++ic) {
                        const uint8_t *xc = xg + ic * plane;
                        const int8_t *wc = wr + ic * p->kh * p->kw;
                        for (int32_t ky = 0; ky < p->kh; ++ky) {
                            const int32_t iy = iy0 + ky * p->dh;
                            if (iy < 0 || iy >= p->h) {
                                continue; /* zero padding of centred codes adds nothing */
                            }
                            const uint8_t *row = xc + iy * p->w;
                            const int8_t *wk = wc + ky * p->kw;
                            for (int32_t kx = 0; kx < p->kw; ++kx) {
                                const int32_t ix = ix0 + kx * p->dw;
                                if (ix >= 0 && ix < p->w) {
                                    acc += ((int32_t)(row[ix] ^ p->flip) - p->zero) * wk[kx];
                                }
                            }
                        }
                    }
                    yo[oy * p->ow + ox] = dq_requantize(&p->rq, acc, oc);
                }
            }
        }
    }
}

/* 1x1, stride 1, no padding, one group: a matrix product over channels, four pixels at a time
 * so that each weight load serves four multiply-accumulates. */
void dq_conv1x1(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    const int32_t plane = p->h * p->w;
    const uint8_t flip = (uint8_t)p->flip;
    for (int32_t n = 0; n < p->n; ++n) {
        const uint8_t *xn = x + n * p->cin * plane;
        for (int32_t oc = 0; oc < p->cout; ++oc) {
            const int8_t *wr = dq_weight_row(&p->weights, oc * p->cin, p->cin, scratch);
            const int32_t bias = p->bias[oc];
            uint8_t *yo = y + (n * p->cout + oc) * plane;
            int32_t pix = 0;
            for (; pix + 4 <= plane; pix += 4) {
                int32_t a0 = bias, a1 = bias, a2 = bias, a3 = bias;
                const uint8_t *xp = xn + pix;
                for (int32_t ic = 0; ic < p->cin; ++ic, xp += plane) {
                    const int32_t wv = wr[ic];
                    a0 += (int32_t)(uint8_t)(xp[0] ^ flip) * wv;
                    a1 += (int32_t)(uint8_t)(xp[1] ^ flip) * wv;
                    a2 += (int32_t)(uint8_t)(xp[2] ^ flip) * wv;
                    a3 += (int32_t)(uint8_t)(xp[3] ^ flip) * wv;
                }
                yo[pix] = dq_requantize(&p->rq, a0, oc);
                yo[pix + 1] = dq_requantize(&p->rq, a1, oc);
                yo[pix + 2] = dq_requantize(&p->rq, a2, oc);
                yo[pix + 3] = dq_requantize(&p->rq, a3, oc);
            }
            for (; pix < plane; ++pix) {
                int32_t acc = bias;
                const uint8_t *xp = xn + pix;
                for (int32_t ic = 0; ic < p->cin; ++ic, xp += plane) {
                    acc += (int32_t)(uint8_t)(xp[0] ^ flip) * wr[ic];
                }
                yo[pix] = dq_requantize(&p->rq, acc, oc);
            }
        }
    }
}

void dq_matmul_const(const dq_matmul *p, const uint8_t *x, uint8_t *y, int8_t *scratch)
{
    const uint8_t flip = (uint8_t)p->flip;
    for (int32_t j = 0; j < p->cols; ++j) {
        const int8_t *wr = dq_weight_row(&p->weights, j * p->k, p->k, scratch);
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
                        int64_t va = (int32_t)((a)[ia] ^ (p)->a_flip) - (p)->a_zero;          \
                        int64_t vb = (int32_t)((b)[ib] ^ (p)->b_flip) - (p)->b_zero;          \
                        int32_t channel = i[(p)->channel_dim];                                \
                        (y)[idx] = (body);                                                    \
                        ia += (p)->a_stride[3];                                               \
                        ib += (p)->b_stride[3];                                               \
                    }                                                                         \
                }                                                                             \
    } while (0)

static inline uint8_t dq_add_one(const dq_binary *p, int64_t va, int64_t vb)
{
    int64_t v = dq_rescale(va, p->a_mult, p->a_shift) + dq_rescale(vb, p->b_mult, p->b_shift);
    return (uint8_t)dq_clamp(v + p->rq.zero_point, p->rq.lo, p->rq.hi);
}

void dq_add(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    DQ_BINARY_LOOP(p, a, b, y, ((void)channel, dq_add_one(p, va, vb)));
}

void dq_mul(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y)
{
    DQ_BINARY_LOOP(p, a, b, y, dq_requantize(&p->rq, va * vb, channel));
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
    DQ_UNARY_LOOP(p, x, y, dq_hard_sigmoid_one(p, v, c));
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
    DQ_UNARY_LOOP(p, x, y, dq_hard_swish_one(p, v, c));
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
    DQ_UNARY_LOOP(p, x, y, dq_leaky_relu_one(p, v, c));
}

void dq_clip(const dq_unary *p, const uint8_t *x, uint8_t *y)
{
    /* zero here is 128 for signed tensors: v is then the raw code, clipped in code units */
    DQ_UNARY_LOOP(p, x, y, ((void)c, (uint8_t)dq_clamp(v, p->rq.lo, p->rq.hi)));
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
