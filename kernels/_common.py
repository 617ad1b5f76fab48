"""Small @triton.jit helpers shared by the kernels of pyfast.kernels."""
import triton
import triton.language as tl


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
