"""The compiled extension pyfast._C as built on this machine: loaded, registered, exact.

The extension is loaded straight from its file (the package pyfast is not
imported, so these tests do not depend on the Python side). A missing build is
a failure, not a skip: CI builds it with `pip install --no-build-isolation -e .`.
Oracles are written here with plain torch: the int8 product in int64 (exact)
and the float32 epilogue in the order the schema specifies, so every output
dtype must match exactly.
"""
from __future__ import annotations

import math

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch

FLOAT_DTYPES = [pytest.param(d, id=str(d).replace("torch.", ""))
                for d in (torch.float32, torch.float16, torch.bfloat16)]
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"


def _find_extension() -> Path:
    spec = importlib.util.find_spec("pyfast")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package pyfast not found on sys.path; {BUILD_HINT}")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"_C{suffix}"
            if path.is_file():
                return path
    pytest.fail(f"pyfast._C is not built (no _C{importlib.machinery.EXTENSION_SUFFIXES[0]} in "
                f"{list(spec.submodule_search_locations)}); {BUILD_HINT}")


@pytest.fixture(scope="module")
def ops():
    """torch.ops.pyfast_C after loading the built pyfast._C (its static initializers
    register the kernels)."""
    path = _find_extension()
    try:
        spec = importlib.util.spec_from_file_location("pyfast._C", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as exc:
        pytest.fail(f"{path} does not load ({exc}); rebuild against this torch: {BUILD_HINT}")
    return torch.ops.pyfast_C


# --- registration --------------------------------------------------------------------

SCHEMAS = {
    "quantize_per_token": "pyfast_C::quantize_per_token(Tensor x) -> (Tensor, Tensor)",
    "int8_mm": ("pyfast_C::int8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, "
                "Tensor? bias, ScalarType out_dtype) -> Tensor"),
    "w8a8_mm": ("pyfast_C::w8a8_mm(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) "
                "-> Tensor"),
    "w8a8_mm_vnni": ("pyfast_C::w8a8_mm_vnni(Tensor x, Tensor w_vnni, Tensor w_scale, "
                     "Tensor? bias) -> Tensor"),
    "build_info": "pyfast_C::build_info() -> str",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema(ops, name):
    assert str(getattr(ops, name).default._schema) == SCHEMAS[name]


def test_build_info(ops):
    info = ops.build_info()
    assert isinstance(info, str) and "cpu" in info
    assert info == "cpu" or info.startswith("cpu+cuda (archs: "), info
    if torch.version.cuda is None:
        assert info == "cpu", "a CPU torch cannot have a CUDA-built extension"


# --- int8_mm ----------------------------------------------------------------------------

def int8_mm_oracle(a, b, a_scale, b_scale, bias, out_dtype):
    acc = (a.long() @ b.long().T).float()  # exact in int64; |acc| < 2**24 here, exact in float32
    out = acc * a_scale[:, None]
    out = out * b_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_inputs(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a_scale = torch.rand(m) * 0.1 + 1e-3
    b_scale = torch.rand(n) * 0.1 + 1e-3
    return a, b, a_scale, b_scale


BIAS = [pytest.param(None, id="nobias"), pytest.param(torch.float32, id="bias_float32"),
        pytest.param(torch.bfloat16, id="bias_bfloat16")]


@pytest.mark.parametrize("bias_dtype", BIAS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k,n", [(5, 33), (33, 100), (100, 5)], ids=lambda v: str(v))
@pytest.mark.parametrize("m", [0, 1, 3, 17, 257])
def test_int8_mm_exact(ops, m, k, n, out_dtype, bias_dtype):
    a, b, a_scale, b_scale = int8_inputs(m, k, n)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    out = ops.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype and out.is_contiguous()
    expected = int8_mm_oracle(a, b, a_scale, b_scale, bias, out_dtype)
    assert torch.equal(out, expected), f"max diff {(out.float() - expected.float()).abs().max()}"


def test_int8_mm_extremes_exact(ops):
    # -128 * -128 everywhere: the largest int32 sums, far beyond float32's 2**24
    k = 1000
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    a_scale, b_scale = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 3.0, 1e-3])
    out = ops.int8_mm(a, b, a_scale, b_scale, None, torch.float32)
    assert torch.equal(out, int8_mm_oracle(a, b, a_scale, b_scale, None, torch.float32))


def test_int8_mm_k_zero(ops):
    a, b, a_scale, b_scale = int8_inputs(3, 0, 4)
    bias = torch.randn(4)
    out = ops.int8_mm(a, b, a_scale, b_scale, bias, torch.float32)
    assert torch.equal(out, int8_mm_oracle(a, b, a_scale, b_scale, bias, torch.float32))


def test_int8_mm_non_contiguous(ops):
    a_big = torch.randint(-128, 128, (17, 66), dtype=torch.int8)
    a = a_big[:, ::2]                      # [17, 33], stride (66, 2)
    b = torch.randint(-128, 128, (33, 40), dtype=torch.int8).T  # [40, 33], transposed
    a_scale = (torch.rand(34) + 0.5)[::2]   # strided scales
    b_scale = torch.rand(40) + 0.5
    bias = torch.randn(80)[::2]
    assert not (a.is_contiguous() or b.is_contiguous() or a_scale.is_contiguous())
    for out_dtype in (torch.float32, torch.bfloat16):
        out = ops.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
        assert torch.equal(out, int8_mm_oracle(a, b, a_scale, b_scale, bias, out_dtype))


# --- quantize_per_token --------------------------------------------------------------

def quantize_oracle(x):
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    s = amax / 127
    s = torch.where(s > 0, s, torch.ones_like(s))           # zero row or underflow -> 1.0
    s = torch.where(torch.isnan(amax), amax, s)             # a NaN row keeps scale NaN
    q = torch.round(xf / s[:, None]).nan_to_num(0.0).clamp(-127, 127)
    return q.to(torch.int8), s


def assert_quantize_exact(ops, x):
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = quantize_oracle(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (x.shape[0],)
    assert torch.equal(s, s_ref), f"scale max diff {(s - s_ref).abs().max()}"
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum()} of {q.numel()} codes differ"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [1, 5, 33, 100, 4096])
@pytest.mark.parametrize("m", [0, 1, 3, 17, 257])
def test_quantize_exact(ops, m, k, dtype):
    # rows of very different magnitudes; row 1 is all zeros (scale 1.0)
    x = torch.randn(m, k) * torch.logspace(-4, 4, m)[:, None]
    if m >= 3:
        x[1] = 0
    assert_quantize_exact(ops, x.to(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_rounds_half_to_even(ops, dtype):
    # amax 127 -> scale exactly 1.0, so x / scale = x: the ties are exact
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], dtype=dtype)
    q, s = ops.quantize_per_token(x)
    assert s.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]
    assert_quantize_exact(ops, x)


def test_quantize_non_contiguous(ops):
    x = torch.randn(64, 40).T  # [40, 64], stride (1, 40)
    assert_quantize_exact(ops, x)
    assert_quantize_exact(ops, torch.randn(9, 80, dtype=torch.bfloat16)[:, 1::2])


def test_quantize_empty_rows(ops):
    q, s = ops.quantize_per_token(torch.empty(3, 0))
    assert q.shape == (3, 0) and s.tolist() == [1.0, 1.0, 1.0]


def test_quantize_nan_row(ops):
    # as the reference: a NaN row gets scale NaN (so int8_mm's output row is NaN), q 0
    x = torch.tensor([[float("nan"), 2.4, -300.0], [1.0, 2.0, 3.0]])
    q, s = ops.quantize_per_token(x)
    assert math.isnan(s[0].item()) and q[0].tolist() == [0, 0, 0]
    assert_quantize_exact(ops, x[1:])


# --- input checks -------------------------------------------------------------------

def _i8(*shape):
    return torch.zeros(*shape, dtype=torch.int8)


BAD_CALLS = {
    "quantize_int_x": (lambda o: o.quantize_per_token(torch.zeros(2, 3, dtype=torch.int32)),
                       r"x has dtype Int; accepted: Float, Half, BFloat16"),
    "quantize_3d_x": (lambda o: o.quantize_per_token(torch.zeros(2, 3, 4)), r"x must be 2-D"),
    "mm_float_a": (lambda o: o.int8_mm(torch.zeros(2, 3), _i8(4, 3), torch.ones(2), torch.ones(4),
                                       None, torch.float32), r"a has dtype Float"),
    "mm_1d_b": (lambda o: o.int8_mm(_i8(2, 3), _i8(3), torch.ones(2), torch.ones(4), None,
                                    torch.float32), r"b must be 2-D"),
    "mm_k_mismatch": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 5), torch.ones(2), torch.ones(4), None,
                                          torch.float32),
                      r"b.size\(1\) is 5 .* a.size\(1\) = K = 3"),
    "mm_a_scale_size": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 3), torch.ones(3), torch.ones(4),
                                            None, torch.float32), r"a_scale.size\(0\) is 3"),
    "mm_b_scale_dtype": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 3), torch.ones(2),
                                             torch.ones(4, dtype=torch.float16), None,
                                             torch.float32), r"b_scale has dtype Half"),
    "mm_bias_size": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 3), torch.ones(2), torch.ones(4),
                                         torch.ones(5), torch.float32), r"bias.size\(0\) is 5"),
    "mm_bias_int": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 3), torch.ones(2), torch.ones(4),
                                        torch.ones(4, dtype=torch.int32), torch.float32),
                    r"bias has dtype Int"),
    "mm_out_float64": (lambda o: o.int8_mm(_i8(2, 3), _i8(4, 3), torch.ones(2), torch.ones(4),
                                           None, torch.float64), r"out_dtype is Double"),
    "mm_k_too_large": (lambda o: o.int8_mm(_i8(1, 131072), _i8(1, 131072), torch.ones(1),
                                           torch.ones(1), None, torch.float32),
                       r"K is 131072; int8_mm accepts K <= 131071"),
    "w8a8_int_x": (lambda o: o.w8a8_mm(_i8(2, 3), _i8(4, 3), torch.ones(4), None),
                   r"x has dtype Char; accepted: Float, Half, BFloat16"),
    "w8a8_float_w": (lambda o: o.w8a8_mm(torch.zeros(2, 3), torch.zeros(4, 3), torch.ones(4), None),
                     r"w_int8 has dtype Float; accepted: Char"),
    "w8a8_k_mismatch": (lambda o: o.w8a8_mm(torch.zeros(2, 3), _i8(4, 5), torch.ones(4), None),
                        r"w_int8.size\(1\) is 5 .* x.size\(1\) = K = 3"),
    "w8a8_w_scale_size": (lambda o: o.w8a8_mm(torch.zeros(2, 3), _i8(4, 3), torch.ones(3), None),
                          r"w_scale.size\(0\) is 3 .* w_int8.size\(0\) = N = 4"),
    "w8a8_w_scale_dtype": (lambda o: o.w8a8_mm(torch.zeros(2, 3), _i8(4, 3),
                                               torch.ones(4, dtype=torch.float16), None),
                           r"w_scale has dtype Half"),
    "w8a8_bias_size": (lambda o: o.w8a8_mm(torch.zeros(2, 3), _i8(4, 3), torch.ones(4),
                                           torch.ones(5)), r"bias.size\(0\) is 5"),
    "w8a8_k_too_large": (lambda o: o.w8a8_mm(torch.zeros(1, 131072), _i8(1, 131072),
                                             torch.ones(1), None),
                         r"K is 131072; w8a8_mm accepts K <= 131071"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_names_the_argument(ops, name):
    call, message = BAD_CALLS[name]
    with pytest.raises(RuntimeError, match=message):
        call(ops)


def test_cpu_kernel_rejects_meta_tensors(ops):
    # no kernel is registered for other devices; the dispatcher says so
    with pytest.raises(NotImplementedError):
        ops.quantize_per_token(torch.zeros(2, 3, device="meta"))


def test_messages_keep_torch_formatting(ops):
    """csrc/message.h builds messages without iostreams; shapes, dtypes, devices and
    integers read as TORCH_CHECK's ostream would have written them."""
    with pytest.raises(RuntimeError) as info:
        ops.int8_mm(_i8(2, 3), _i8(4, 5), torch.ones(2), torch.ones(4), None, torch.float32)
    assert str(info.value).splitlines()[0] == (
        "b.size(1) is 5 (shape [4, 5]); it must equal a.size(1) = K = 3")
    with pytest.raises(RuntimeError) as info:
        ops.int8_mm(_i8(2, 3), _i8(3), torch.ones(2), torch.ones(4), None, torch.float32)
    assert str(info.value).splitlines()[0] == "b must be 2-D, got 1-D with shape [3]"


def _torch_check_calls(text):
    """The argument text of every TORCH_CHECK( ... ) call in C++ source `text`."""
    calls, start = [], text.find("TORCH_CHECK(")
    while start != -1:
        i, depth = start + len("TORCH_CHECK("), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[start + len("TORCH_CHECK("):i - 1])
        start = text.find("TORCH_CHECK(", i)
    return calls


def test_checks_with_values_use_pyfast_check():
    """TORCH_CHECK formats several message arguments with an ostringstream; a message
    with values goes through PYFAST_CHECK (csrc/message.h) instead. TORCH_CHECK stays
    only where its message is one string literal, which c10 passes through as is."""
    import re

    root = Path(__file__).resolve().parents[1] / "csrc"
    literal_only = re.compile(r'^[^,]+,\s*("[^"]*"\s*)+$', re.S)
    offenders = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu") or path.name == "message.h":
            continue
        for args in _torch_check_calls(path.read_text()):
            if not literal_only.match(args.strip()):
                offenders.append(f"{path.relative_to(root)}: TORCH_CHECK({args.strip()[:60]}...")
    assert not offenders, "\n".join(offenders)
    assert _torch_check_calls('TORCH_CHECK(n > 0, "n is ", n);') == ['n > 0, "n is ", n']
    assert not literal_only.match('n > 0, "n is ", n')
