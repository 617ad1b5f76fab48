"""Small @triton.jit helpers shared by the kernels of pyfast.kernels."""
import os

import triton
import triton.language as tl

# Inline PTX where the kernels run on a GPU; Triton's interpreter (TRITON_INTERPRET=1,
# the CPU tests) cannot run inline assembly, so there the same values come from plain
# Triton arithmetic (int4_minus_zero below).
ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") != "1")


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped ordering: consecutive programs walk
    GROUP_M row tiles of one column tile, so the weight tile they share stays in L2
    (the Triton matmul tutorial's "L2 cache optimizations")."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def to_f32(x):
    """Widen to float32, exactly. bfloat16 goes through its bits (bf16 is the top half
    of a float32): Triton's interpreter converts subnormal bf16 wrongly."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def nibbles_minus_zero(p, shift, zero, dtype: tl.constexpr):
    """q - zero in `dtype`, exactly, for the int4 values q = (p >> shift) & 0xF.

    p: uint16 tensor, bytes of packed int4 weights widened (shift 0: low nibbles,
    4: high nibbles); zero: int32 zero points 0..15, broadcastable to p's shape.
    float16 / bfloat16 avoid the int -> float conversion, which runs at a quarter
    of the integer rate on sm_80 / sm_90 (CUDA C++ Programming Guide, "Arithmetic
    Instructions" throughput table) and at M = 1 would cap the kernel below the
    DRAM rate: OR-ing q into the low mantissa bits of 1024.0 (float16 0x6400) or
    128.0 (bfloat16 0x4300) gives the float 1024 + q (128 + q) exactly, and
    subtracting 1024 + zero (128 + zero) is exact as well, since every value
    involved is an integer the format represents. This is Marlin's dequantization
    (Frantar et al. 2024; Kim et al. 2022, "Who Says Elephants Can't Run?").
    float32 (CUDA-core dot) converts directly."""
    q = (p >> shift) & 0xF
    if dtype == tl.float16:
        bits = (q | 0x6400).to(tl.uint16)
        return bits.to(tl.float16, bitcast=True) - (zero + 1024).to(tl.float16)
    elif dtype == tl.bfloat16:
        bits = (q | 0x4300).to(tl.uint16)
        return bits.to(tl.bfloat16, bitcast=True) - (zero + 128).to(tl.bfloat16)
    else:
        return (q.to(tl.int32) - zero).to(dtype)


# One instance of the PTX below dequantizes 4 packed bytes (8 int4 values). Triton packs
# the 4 uint8 elements into one 32-bit register, element i in byte i ($4), and each
# 16-bit output's 4 elements into two registers, element 2r in the low half of register r
# (tl.inline_asm_elementwise, "pack"). $5, $6 hold -(magic + zero) of the 4 elements.
#   prmt.b32 t, $4, 0, 0x4140   t = [byte 0, 0, byte 1, 0]: bytes 0, 1 in 16-bit lanes
#                               (PTX ISA, "prmt": selector nibble i picks result byte
#                               i from the 8 bytes {b, a}; 4 is byte 0 of the zero)
#   lop3.b32 u, t, 0x000F000F, MAGIC, 0xEA   u = (t & 0x000F000F) | MAGIC: the low nibble
#                               of each lane in the mantissa of 1024.0 / 128.0, i.e. the
#                               16-bit floats magic + q (0xEA: the truth table of (a & b) | c)
#   fma.rn.{f16x2,bf16x2} d, u, ONE, nz      d = (magic + q) - (magic + zero) = q - zero,
#                               exact (integers the format holds), so the rounding is moot;
#                               fma, not sub: sub.bf16x2 needs sm_90, fma.rn.bf16x2 sm_80
#   shr.b32 t, t, 4             the high nibbles, then the same lop3 and fma.
# 4 prmt + 4 shr + 8 lop3 + 8 fma per 16 values. Plain Triton arithmetic on uint8 tensors
# instead unpacks every byte into a register of its own and packs the 16-bit results
# back into pairs for the tensor cores: one prmt per value each way (118 PRMT against 38
# in the split-K int4_mm loop on sm_90, 363 SASS instructions per iteration against 255).
_INT4_PTX = """
{
.reg .b32 t0, t1, u0, u1, one;
mov.b32 one, ONE;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 u0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 u1, t1, 0x000F000F, MAGIC, 0xEA;
fma.rn.TYPE $0, u0, one, $5;
fma.rn.TYPE $1, u1, one, $6;
shr.b32 t0, t0, 4;
shr.b32 t1, t1, 4;
lop3.b32 u0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 u1, t1, 0x000F000F, MAGIC, 0xEA;
fma.rn.TYPE $2, u0, one, $5;
fma.rn.TYPE $3, u1, one, $6;
}
"""
INT4_PTX_F16 = tl.constexpr(_INT4_PTX.replace("TYPE", "f16x2").replace("MAGIC", "0x64006400")
                            .replace("ONE", "0x3C003C00"))
INT4_PTX_BF16 = tl.constexpr(_INT4_PTX.replace("TYPE", "bf16x2").replace("MAGIC", "0x43004300")
                             .replace("ONE", "0x3F803F80"))


@triton.jit
def int4_minus_zero(p, zero, dtype: tl.constexpr):
    """(low, high): q - zero in `dtype`, exactly, for the low nibbles (q = p & 0xF) and the
    high nibbles (q = p >> 4) of the uint8 tensor p; zero: int32 zero points 0..15,
    broadcastable to p. float16 / bfloat16 on a GPU: the inline PTX above, 4 bytes per
    instance; otherwise (float32, the interpreter) nibbles_minus_zero on each nibble."""
    if ASM and dtype == tl.float16:
        nz = tl.broadcast_to((-1024 - zero).to(tl.float16), p.shape)
        low, high = tl.inline_asm_elementwise(
            INT4_PTX_F16, "=r,=r,=r,=r,r,r,r", [p, nz], dtype=(tl.float16, tl.float16),
            is_pure=True, pack=4)
    elif ASM and dtype == tl.bfloat16:
        nz = tl.broadcast_to((-128 - zero).to(tl.bfloat16), p.shape)
        low, high = tl.inline_asm_elementwise(
            INT4_PTX_BF16, "=r,=r,=r,=r,r,r,r", [p, nz], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4)
    else:
        pw = p.to(tl.uint16)
        low = nibbles_minus_zero(pw, 0, zero, dtype)
        high = nibbles_minus_zero(pw, 4, zero, dtype)
    return low, high


# int8 -> float16 for 4 packed bytes ($2, element i in byte i) into two registers of two
# halves ($0: elements 0, 1; $1: elements 2, 3), the same magic-number trick as above:
#   xor.b32 t, $2, 0x80808080         each byte w becomes u = w + 128, 0..255 (two's complement)
#   prmt.b32 u0, t, 0x64646464, 0x4140  [u_0, 0x64, u_1, 0x64]: the float16 1024 + u in each half
#                                     (1024 = 0x6400; its ulp is 1 up to 2048, so exact)
#   fma.rn.f16x2 $0, u0, one, -1152   (1024 + u) - 1152 = w, exact
# 1 xor + 2 prmt + 2 fma per 4 values. Triton's own int8 -> float16 conversion is one
# I2F.F16.S16 per value (a conversion, at a quarter of the integer rate on sm_80 / sm_90:
# CUDA C++ Programming Guide, "Arithmetic Instructions") plus about 2 PRMT per value to
# unpack the bytes and pack the halves (sm_90 SASS of the int8_weight_mm fp16 loop,
# scripts/triton_sass.py). bfloat16 has no such trick in 16 bits (128 + u needs 9
# significant bits, bfloat16 has 8), and Triton's conversion there is already bit logic.
INT8_PTX_F16 = tl.constexpr("""
{
.reg .b32 t, u0, u1, one, bias;
mov.b32 one, 0x3C003C00;
mov.b32 bias, 0xE480E480;
xor.b32 t, $2, 0x80808080;
prmt.b32 u0, t, 0x64646464, 0x4140;
prmt.b32 u1, t, 0x64646464, 0x4342;
fma.rn.f16x2 $0, u0, one, bias;
fma.rn.f16x2 $1, u1, one, bias;
}
""")


@triton.jit
def int8_to_float(w, dtype: tl.constexpr):
    """The int8 tensor w in `dtype`, exactly (every int8 is a float16 / bfloat16 / float32
    value). float16 on a GPU: the inline PTX above, 4 values per instance; otherwise
    Triton's conversion."""
    if ASM and dtype == tl.float16:
        return tl.inline_asm_elementwise(INT8_PTX_F16, "=r,=r,r", [w], dtype=tl.float16,
                                         is_pure=True, pack=4)
    else:
        return w.to(dtype)



@triton.jit
def sparse24_dots(acc, x, v0, v1, meta, BLOCK_M: tl.constexpr, QK: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """acc + x @ W for one K tile of a 2:4 sparse weight W [4 QK, BLOCK_N] (k-major),
    given compressed: four dots of depth QK, one per position p in the groups of 4.

    x    [BLOCK_M, 4 QK]  the tile's dense columns, k = 4j + p
    v0   [QK, BLOCK_N]    the first kept value of group j, in x's dtype
    v1   [QK, BLOCK_N]    the second
    meta [QK, BLOCK_N]    group j's 2:4 nibble: bits 0-1 idx0, bits 2-3 idx1, bits 4-7
                          ZERO (any integer dtype)
    Position p of group j holds v0 if idx0 == p, v1 if idx1 == p, else 0. The format's
    idx0 < idx1 (formats.py; a nibble is one of 6) means position 0 can only hold v0 and
    position 3 only v1, and the tests are on the nibble itself (p = 1 takes v1 only for
    0b0100, p = 2 takes v0 only for 0b1110): 6 selects instead of 8 and no shifts. A
    nibble outside the format gives an unspecified sum, as on the other backends.
    Four dots of a quarter depth instead of one dense [4 QK, BLOCK_N] tile: building the
    dense tile takes a broadcast over p and a reshape, which Triton lowers to one 16-bit
    shared-memory store per dense value and a reload (kernels/sparse24.py). On a GPU
    tl.dot needs QK >= 16."""
    # x's columns by position in the group: k = 4j + 2a + b -> [BLOCK_M, QK, a, b]
    xb0, xb1 = tl.split(tl.reshape(x, (BLOCK_M, QK, 2, 2)))
    x0, x2 = tl.split(xb0)
    x1, x3 = tl.split(xb1)
    # the nested selects are in the order that spilled least on sm_80 / sm_90
    zero = tl.zeros_like(v0)
    lo = meta & 3
    acc = tl.dot(x0, tl.where(lo == 0, v0, zero), acc, input_precision=INPUT_PRECISION)
    acc = tl.dot(x1, tl.where(meta == 4, v1, tl.where(lo == 1, v0, zero)), acc,
                 input_precision=INPUT_PRECISION)
    acc = tl.dot(x2, tl.where((meta & 12) == 8, v1, tl.where(meta == 14, v0, zero)), acc,
                 input_precision=INPUT_PRECISION)
    acc = tl.dot(x3, tl.where(meta >= 12, v1, zero), acc, input_precision=INPUT_PRECISION)
    return acc

CONFIGS_ENV = "PYFAST_TRITON_CONFIGS"


def config_subset(configs):
    """The autotuner's configs: all of them, or with PYFAST_TRITON_CONFIGS=few the first
    config of each BLOCK_K (in list order).

    `few` is for GPU test runs: on a cold Triton cache every new shape key compiles and
    times each config, and the first H100 run spent 20-70 s per Triton test that way.
    One config per BLOCK_K keeps every K tiling and every int4 group-size pruning rule
    (weight_only._fits_groups keeps only configs whose BLOCK_K lies in one group)
    satisfiable. Read once, when a kernel module is imported."""
    import os

    mode = os.environ.get(CONFIGS_ENV, "all").strip().lower() or "all"
    if mode == "all":
        return list(configs)
    if mode != "few":
        raise ValueError(f"{CONFIGS_ENV}={mode!r}; accepted: all (default), few")
    seen, kept = set(), []
    for c in configs:
        if c.kwargs["BLOCK_K"] not in seen:
            seen.add(c.kwargs["BLOCK_K"])
            kept.append(c)
    return kept
