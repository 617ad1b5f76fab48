"""The inline PTX of kernels/_common.py (int4_minus_zero, int8_to_float), run here
instruction by instruction on CPU (the Triton interpreter cannot run inline assembly,
and CI has no GPU; on a GPU tests/test_triton_weight_only.py test_int4_minus_zero_is_exact
and test_int8_to_float_is_exact run it).

A small interpreter executes the PTX text itself, as the kernels embed it, for the
instructions it uses (PTX ISA 8.x: mov.b32, prmt.b32 in its default mode, lop3.b32,
xor.b32, shr.b32, fma.rn.f16x2 / fma.rn.bf16x2), with Triton's operand convention for
tl.inline_asm_elementwise(pack=4): a 32-bit input holds 4 8-bit elements, element i in
byte i, and a 16-bit input or output holds element 2r in the low half of its r-th
register. int4: $4 holds the 4 uint8 elements; $5, $6 the 4 16-bit -(magic + zero);
the outputs $0, $1 (low nibbles) and $2, $3 (high nibbles). int8: $2 holds the 4 int8
elements, $0, $1 the float16 outputs. Every byte value in every element position (for
int4 against a different zero point per element).
"""
import re

import numpy as np
import pytest
import torch

from pyfast.kernels._common import INT4_PTX_BF16, INT4_PTX_F16, INT8_PTX_F16

MASK = 0xFFFFFFFF


def _halves_to_float(word, fmt):
    lanes = [word & 0xFFFF, word >> 16]
    if fmt == "f16x2":
        return [float(np.array([h], dtype=np.uint16).view(np.float16)[0]) for h in lanes]
    return [float(np.array([h << 16], dtype=np.uint32).view(np.float32)[0]) for h in lanes]


def _float_to_half(value, fmt):
    if fmt == "f16x2":
        return int(np.array([value], dtype=np.float16).view(np.uint16)[0])
    bits = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    return int(bits) & 0xFFFF


def _prmt(a, b, selector):
    source = (b << 32) | a                         # bytes 0-3 of a, 4-7 of b
    out = 0
    for i in range(4):
        sel = (selector >> (4 * i)) & 0xF
        assert sel < 8, "sign-replicating selectors are not used"
        out |= ((source >> (8 * sel)) & 0xFF) << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        # immLut bit index: a contributes 0xF0, b 0xCC, c 0xAA
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(text, regs):
    """Executes `text` on the register file `regs` ({"$0": int, ...}); returns it."""
    body = text.strip().strip("{}")
    for line in body.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        args = [a.strip() for a in args.split(",")]
        val = lambda s: int(s, 16) if s.startswith("0x") else (int(s) if s.isdigit() else regs[s])  # noqa: E731
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif op == "xor.b32":
            regs[args[0]] = val(args[1]) ^ val(args[2])
        elif op == "shr.b32":
            regs[args[0]] = (val(args[1]) & MASK) >> val(args[2])
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            fmt = op.split(".")[-1]
            a, b, c = (_halves_to_float(val(x), fmt) for x in args[1:])
            lanes = [_float_to_half(a[i] * b[i] + c[i], fmt) for i in range(2)]  # exact here
            regs[args[0]] = lanes[0] | (lanes[1] << 16)
        else:
            raise AssertionError(f"instruction {op!r} is not emulated: extend run_ptx")
        regs[args[0]] &= MASK
    return regs


@pytest.mark.parametrize("text,fmt,magic", [(INT4_PTX_F16, "f16x2", 1024), (INT4_PTX_BF16, "bf16x2", 128)],
                         ids=["float16", "bfloat16"])
def test_int4_ptx_gives_q_minus_zero(text, fmt, magic):
    text = text.value
    assert set(re.findall(r"\$\d+", text)) == {f"${i}" for i in range(7)}
    checked = 0
    for start in range(0, 256, 4):
        for shift in range(4):                     # each byte value in each element slot
            elems = [(start + ((i + shift) % 4)) & 0xFF for i in range(4)]
            zeros = [(start // 4 + 5 * i) % 16 for i in range(4)]
            nz = [_float_to_half(-(magic + z), fmt) for z in zeros]
            regs = {"$4": elems[0] | elems[1] << 8 | elems[2] << 16 | elems[3] << 24,
                    "$5": nz[0] | nz[1] << 16, "$6": nz[2] | nz[3] << 16}
            run_ptx(text, regs)
            for out, nibble in (((regs["$0"], regs["$1"]), lambda e: e & 0xF),
                                ((regs["$2"], regs["$3"]), lambda e: e >> 4)):
                got = _halves_to_float(out[0], fmt) + _halves_to_float(out[1], fmt)
                assert got == [nibble(e) - z for e, z in zip(elems, zeros)], (elems, zeros)
                checked += 4
    assert checked == 256 * 4 * 2


def test_emulator_catches_a_wrong_selector():
    """The emulator is not vacuous: swapping the two bytes of the first prmt, or
    dropping the zero point, breaks the check above."""
    bad = INT4_PTX_F16.value.replace("0x4140", "0x4041", 1)
    regs = run_ptx(bad, {"$4": 0x00000201, "$5": _float_to_half(-1024.0, "f16x2") * 0x10001,
                         "$6": _float_to_half(-1024.0, "f16x2") * 0x10001})
    assert _halves_to_float(regs["$0"], "f16x2") == [2.0, 1.0]      # not [1.0, 2.0]
    regs = run_ptx(INT4_PTX_F16.value,
                   {"$4": 0x00000201, "$5": 0, "$6": 0})
    assert _halves_to_float(regs["$0"], "f16x2") == [1025.0, 1026.0]


def test_int8_ptx_gives_the_int8_values_in_float16():
    text = INT8_PTX_F16.value
    assert set(re.findall(r"\$\d+", text)) == {"$0", "$1", "$2"}
    checked = 0
    for start in range(0, 256, 4):
        for shift in range(4):                     # each byte value in each element slot
            elems = [(start + ((i + shift) % 4)) & 0xFF for i in range(4)]
            regs = run_ptx(text, {"$2": elems[0] | elems[1] << 8 | elems[2] << 16 | elems[3] << 24})
            got = _halves_to_float(regs["$0"], "f16x2") + _halves_to_float(regs["$1"], "f16x2")
            assert got == [e - 256 if e >= 128 else e for e in elems], elems   # two's complement
            checked += 4
    assert checked == 256 * 4


def test_int8_emulation_is_not_vacuous():
    """Bytes 0x80, 0xFF are -128, -1; without the xor (bytes taken as unsigned, offset by
    128) the emulator gives 0, 127, which the check above would catch."""
    regs = run_ptx(INT8_PTX_F16.value, {"$2": 0x0000FF80})
    assert _halves_to_float(regs["$0"], "f16x2") == [-128.0, -1.0]
    regs = run_ptx(INT8_PTX_F16.value.replace("0x80808080", "0x00000000"), {"$2": 0x0000FF80})
    assert _halves_to_float(regs["$0"], "f16x2") == [0.0, 127.0]
