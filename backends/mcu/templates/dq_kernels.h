/* dyadiq integer kernels for microcontrollers: portable C99, no malloc, no float.
 *
 * Every activation is one byte per code. Signed codes are stored as their two's complement
 * byte; a kernel reads a byte b as (b ^ flip) - zero, with flip = 0x80 and zero = z + 128 for
 * signed tensors (b ^ 0x80 = s + 128), flip = 0 and zero = z for unsigned ones, so one kernel
 * serves both. Every rescale is the reference's dyadic requantization
 * (acc * m + 2^(k-1)) >> k in int64 with an arithmetic (floor) shift.
 * Layout is NCHW; weights are int8, or 4-bit codes packed two per byte (low nibble first).
 * On cores with the DSP extension (__ARM_FEATURE_DSP) the im2col convolution uses SMLAD. */
#ifndef DQ_KERNELS_H
#define DQ_KERNELS_H

#include <stdint.h>

typedef struct {
    const int32_t *mult;   /* per channel, or one value when per_channel == 0 */
    const int8_t *shift;
    int32_t per_channel;
    int32_t zero_point, lo, hi;
} dq_requant;

typedef struct {
    const void *data;      /* one row per output channel: int8_t[rows][len], or, when bits ==
                            * 4, uint8_t[rows][(len + 1) / 2] (rows start on a byte) */
    int32_t bits;          /* 8 or 4 */
} dq_weights;

typedef struct {
    int32_t n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, dh, dw, pad_top, pad_left, group;
    int32_t flip, zero;    /* input decoding (see above) */
    dq_weights weights;    /* [cout][cin / group][kh][kw] */
    const int32_t *bias;   /* generic conv: bias; 1x1 conv: bias - zero * sum(w) (folded) */
    dq_requant rq;         /* per output channel */
} dq_conv;

typedef struct {
    int32_t rows, k, cols;
    int32_t flip;          /* input decoding; the zero point is folded into the bias */
    dq_weights weights;    /* transposed: [cols][k] */
    const int32_t *bias;   /* bias - zero * sum(w), per column */
    dq_requant rq;         /* per column */
} dq_matmul;

typedef struct {
    int32_t batch, m, k, n;
    int32_t a_flip, a_zero, b_flip, b_zero;
    int32_t a_batch_stride, b_batch_stride;  /* 0 broadcasts */
    dq_requant rq;         /* per column */
} dq_matmul_act;

typedef struct {
    int32_t shape[4];      /* output, rank padded to 4 */
    int32_t a_stride[4], b_stride[4];  /* element strides, 0 along broadcast dims */
    int32_t a_flip, a_zero, b_flip, b_zero;
    int32_t channel_dim;   /* which of the 4 dims indexes per-channel requant values */
    int32_t a_mult, a_shift, b_mult, b_shift;  /* Add only (Max / Min compare codes: none) */
    int32_t single_rounding;  /* Add: (va*a_mult + vb*b_mult) rounded once (a_shift == b_shift) */
    dq_requant rq;         /* Mul: requant of the product; Add: zero_point, lo, hi */
} dq_binary;

typedef struct {
    int32_t outer, channels, inner;  /* the tensor as [outer][channels][inner] */
    int32_t flip, zero;
    dq_requant rq;
    int32_t offset;        /* HardSigmoid */
    int32_t gate_mult, gate_shift, frac_bits;  /* HardSwish */
    const int32_t *neg_mult;  /* LeakyRelu: per channel when neg_per_channel */
    const int8_t *neg_shift;
    int32_t neg_per_channel;
} dq_unary;

typedef struct {
    int32_t n, c, h, w, oh, ow, kh, kw, sh, sw, pad_top, pad_left;
    int32_t flip, fill;    /* fill: the lowest code, in the flipped domain */
} dq_maxpool_params;

typedef struct {
    int32_t rows, len, flip;
    int32_t upscale_bits, ln2_codes, b_codes, c_codes, frac_bits;
    dq_requant rq;
} dq_softmax_params;

/* scratch (4-byte aligned): an unpacked 4-bit weight row, int8[len]; dq_conv2d needs an int16
 * im2col column (2 * taps bytes) when cout / group >= 4, and int32[ow] accumulators followed
 * by the unpacked row when depthwise (group == cin == cout) */
void dq_conv2d(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch);
void dq_conv1x1(const dq_conv *p, const uint8_t *x, uint8_t *y, int8_t *scratch);
void dq_matmul_const(const dq_matmul *p, const uint8_t *x, uint8_t *y, int8_t *scratch);
void dq_matmul_activations(const dq_matmul_act *p, const uint8_t *a, const uint8_t *b, uint8_t *y);
void dq_add(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y);
void dq_mul(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y);
/* inputs and output in one quantizer; zero 128 for signed tensors makes va, vb the codes */
void dq_max(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y);
void dq_min(const dq_binary *p, const uint8_t *a, const uint8_t *b, uint8_t *y);
void dq_global_avg_pool(const dq_unary *p, const uint8_t *x, uint8_t *y);
void dq_hard_sigmoid(const dq_unary *p, const uint8_t *x, uint8_t *y);
void dq_hard_swish(const dq_unary *p, const uint8_t *x, uint8_t *y);
void dq_leaky_relu(const dq_unary *p, const uint8_t *x, uint8_t *y);
void dq_clip(const dq_unary *p, const uint8_t *x, uint8_t *y);
/* an elementwise op of one byte, tabulated (the table is the reference's output per byte) */
void dq_lookup(const uint8_t table[256], int32_t count, const uint8_t *x, uint8_t *y);
void dq_softmax(const dq_softmax_params *p, const uint8_t *x, uint8_t *y);
void dq_maxpool(const dq_maxpool_params *p, const uint8_t *x, uint8_t *y);
void dq_transpose4(const int32_t shape[4], const int32_t perm[4], const uint8_t *x, uint8_t *y);
void dq_copy_blocks(uint8_t *dst, int32_t dst_stride, const uint8_t *src, int32_t src_stride,
                    int32_t count, int32_t block);
void dq_quantize_input(const float *x, uint8_t *y, int32_t count, float scale, int32_t zero_point,
                       int32_t qmin, int32_t qmax);

#endif
