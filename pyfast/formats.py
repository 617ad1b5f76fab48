"""The bit layouts of every packed format in pyfast, written down once.

Every backend (reference, C++ CPU, Triton, CUDA C++) reads and writes exactly
these layouts; a kernel that wants another layout (tensor-core fragment order,
sparse-tensor-core metadata) gets it from a repack op with its own reference,
run once at layer creation: repack_int4_tc (pyfast/layouts/int4_tc.py) for
int4_mm_tc, repack_sparse24_tc (pyfast/layouts/sparse24_tc.py) for sparse24_mm_tc,
repack_sparse24_int4_tc (pyfast/layouts/sparse24_int4_tc.py) for sparse24_int4_mm_tc.
Shapes use M = rows of activations, K = reduction (in_features), N = out_features. All
tensors are row-major (contiguous).

int8 per-token activations  (quantize_per_token)
    x_int8 : int8    [M, K]   round-half-to-even(x / scale) clamped to [-127, 127]
    scale  : float32 [M]      amax(|x[m, :]|) / 127; 1.0 where that is 0 (a row of zeros,
                              or a subnormal amax that underflows); NaN for a row holding
                              a NaN (its q are 0), so the NaN reaches the matmul output
    The range is symmetric: -128 is never produced (so -x quantizes to -q).

int8 static activations  (quantize_static)
    scale  : float32 [1]      calibrated once (pyfast.quant observers), positive and finite
    x_int8 : int8    [M, K]   round-half-to-even(x / scale) clamped to [-127, 127]
                              (values beyond 127 * scale clip: that is the calibrated range)
    scales : float32 [M]      scale repeated per row, NaN for a row holding a NaN (q = 0)

int8 weights  (int8_mm, int8_weight_mm)
    w_int8 : int8    [N, K]   same rule as above, per output channel
    w_scale: float32 [N]
    int8_mm:        out[m, n] = (sum_k int32(a[m,k]) * int32(b[n,k])) * a_scale[m] * b_scale[n] + bias[n]
                    int32 accumulation (exact); the epilogue in float32, then cast to out_dtype.
    int8_weight_mm: out = (x @ w_int8.T) * w_scale + bias, in float32, cast to x.dtype.
    Any int8 value, -128 included, is a valid weight (PyTorch's quantize_dynamic emits -128).

int4 weights, group-wise  (pack_int4, int4_mm)
    packed : uint8   [N, K/2] packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4)
                              (low nibble holds the even k, high nibble the odd k)
    scales : float32 [N, G]   G = K / group_size (G = 1 when group_size == -1, per channel)
    zeros  : uint8   [N, G]   zero point in the integer domain, 0..15
    q is unsigned, 0..15.  w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k // group_size
    Scales follow the int8 rule: 1.0 where the division gives 0, NaN for a NaN group.
    symmetric:  scale = amax(|w_group|) / 7, zero = 8,
                q = clamp(round(w / scale) + 8, 0, 15)   (so the signed value is in [-8, 7])
    asymmetric: scale = (max - min) / 15 over the group with min <= 0 <= max forced
                (max / 15 - min / 15 where max - min passes float32's maximum),
                zero = clamp(round(-min / scale), 0, 15),
                q = clamp(round(w / scale) + zero, 0, 15)
    group_size is one of 32, 64, 128 or -1; K must be even and a multiple of group_size.

int2 and binary weights, group-wise  (pack_lowbit, lowbit_mm; bits = 2 or 1)
    packed : uint8   [N, K*bits/8] element k sits in byte k // (8/bits), at bit offset
                              (k % (8/bits)) * bits, low bits first (as int4: low nibble = even k):
                              2-bit: packed[n, j] = q[4j] | q[4j+1] << 2 | q[4j+2] << 4 | q[4j+3] << 6
                              1-bit: packed[n, j] = sum_i q[8j+i] << i
    scales : float32 [N, G]   G = K / group_size (G = 1 when group_size == -1, per channel)
    group_size is one of 32, 64, 128 or -1; K must be a multiple of 8/bits (4 for int2,
    8 for binary) and of group_size.
    bits = 2 (int2), asymmetric, the int4 asymmetric rule with 3 in place of 15:
        zeros : uint8 [N, G]  zero point 0..3
        scale = (max - min) / 3 over the group with min <= 0 <= max forced (1.0 where that
        is 0, NaN for a NaN group), zero = clamp(round(-min / scale), 0, 3),
        q = clamp(round(w / scale) + zero, 0, 3),   w[n, k] = (q - zeros[n, g]) * scales[n, g]
    bits = 1 (binary, XNOR-Net: Rastegari et al. 2016, "XNOR-Net: ImageNet Classification
        Using Binary Convolutional Neural Networks"):
        zeros : uint8 [N, 0]  empty: a binary weight has no zero point, so no byte is spent
                              on one (lowbit_mm requires exactly this shape)
        q = (w >= 0) (so -0.0 and +0.0 give 1, NaN gives 0),  w[n, k] = (2 q - 1) * scales[n, g]
        scale = mean(|w_group|), the L2-optimal scale for sign(w) (XNOR-Net eq. 4),
        summed in float64 and rounded once to float32 (so it does not depend on the order),
        NOT clamped like the other scales: an all-zero group keeps scale 0 and dequantizes
        to exactly 0 (1.0 would turn zeros into +-1); NaN for a group holding a NaN.
    lowbit_mm: out = x @ W.T + bias, computed in float32, cast to x.dtype.

2:4 semi-structured sparsity along K  (sparse24_compress, sparse24_mm)
    Each row of w [N, K] is cut into K/4 groups of 4 consecutive k; a group may hold
    at most 2 nonzeros (NaN counts as nonzero).
    values : w.dtype [N, K/2] the 2 kept elements of each group, in increasing k order
    meta   : uint8   [N, K/4] bits 0-1: index (0..3) in the group of the first kept
                              element, bits 2-3: index of the second; idx0 < idx1;
                              bits 4-7 are zero
    The kept positions are the nonzero ones; a group with fewer than 2 nonzeros is
    filled with its lowest-index zero positions, so the layout is deterministic.
    K must be a multiple of 4. sparse24_mm: out = x @ W.T + bias in x.dtype, W the
    dense matrix rebuilt from (values, meta); x.dtype must equal values.dtype.

2:4 sparsity + int4 values  (pack_sparse24_int4, sparse24_int4_mm)
    The kept values of the 2:4 layout above, stored as group-wise int4 codes; about
    3 bits per dense weight (2 for the codes, 1 for the indices) plus the group scales.
    packed : uint8   [N, K/4] the K/2 kept values' codes q, two per byte as int4's
                              packed: packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4)
    meta   : uint8   [N, K/8] the 2:4 meta above, two groups of 4 per byte:
                              meta[n, j] = meta24[n, 2j] | (meta24[n, 2j+1] << 4), so
                              the 2-bit index of kept value i of a row is bits 2i, 2i+1
                              of the row's meta read as one little-endian integer
    scales : float32 [N, G]   G = K / group_size, groups counted over the DENSE k (a
    zeros  : uint8   [N, G]   group of group_size columns keeps group_size / 2 values)
    Kept value i of row n sits at k = 4 * (i // 2) + index_i in group g = k // group_size,
    w[n, k] = (q[n, i] - zeros[n, g]) * scales[n, g]; the other k are exactly 0.
    The scales and zeros are int4's (symmetric or asymmetric) of the dense 2:4 group:
    the pruned zeros do not change them (min <= 0 <= max is forced anyway).
    group_size is one of 32, 64, 128 or -1; K must be a multiple of 8 and of group_size.
    sparse24_int4_mm: out = x @ W.T + bias, computed in float32, cast to x.dtype (any
    float x dtype).
"""

INT4_GROUP_SIZES = (32, 64, 128, -1)
LOWBIT_BITS = (1, 2)          # pack_lowbit / lowbit_mm: binary, int2
FLOAT_DTYPES_NAMES = ("float32", "float16", "bfloat16")
