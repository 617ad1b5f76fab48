"""scripts/triton_sass.py: the loop finder on a made-up disassembly, and, compiled for
sm_90 without a GPU, the split-K int4_mm loop's size as a regression bound (Triton is
pinned, pyproject.toml), and the split-K sparse24_mm loop's likewise (README,
"Performance"): 363 -> 247 and 986 -> 592 SASS instructions per K block; the split-K
float16 int8_weight_mm loop's, 338 -> 239; and the split-K bfloat16 sparse24_int4_mm
loop's, 1031 -> 660."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_sass.py"
sys.path.insert(0, str(SCRIPT.parent))

import pytest  # noqa: E402
import triton_sass  # noqa: E402

FAKE = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/                   PRMT R3, R2, 0x4140, RZ ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0070*/                   EXIT ;
"""


def test_longest_loop_takes_backward_branches_only():
    instrs, loop = triton_sass.longest_loop(FAKE)
    assert len(instrs) == 8
    assert [triton_sass.opcode(i) for i in loop] == ["IADD3", "PRMT", "BRA"]


@pytest.mark.parametrize("module,spec,hmma,most,bounds", [
    # 16 x 128 x 64 tile, 4 warps: 16 HMMA per K block; was 363 instructions, 118 PRMT
    ("weight_only", "int4_mm_fp16_grouped_splitk", 16, 280, {"PRMT": 48}),
    # 16 x 64 x 128 tile: 4 dots of K 32 per warp; was 986 instructions, 64 STS.U16, then
    # 592 with 146 SEL (both kept slots tested at every position); now 496 with 122
    ("sparse24", "sparse24_mm_fp16_splitk", 16, 540, {"STS.U16": 0, "SEL": 130}),
    # 16 x 64 x 128 tile: was 338 instructions, 64 I2F.F16.S16 and 112 PRMT
    ("weight_only", "int8_weight_mm_fp16_splitk", 16, 260, {"I2F.F16.S16": 0, "PRMT": 32}),
    # 16 x 64 x 128 tile, bfloat16: was 1031 instructions with 64 STS.U16 (the dense tile
    # built through shared memory); now four dots of K 32 (_common.sparse24_dots), 660
    ("sparse24_int4", "sparse24_int4_mm_bf16_grouped_splitk", 16, 700, {"STS.U16": 0, "SEL": 130}),
], ids=["int4_mm", "sparse24_mm", "int8_weight_mm", "sparse24_int4_mm"])
def test_split_k_loops_stay_small(module, spec, hmma, most, bounds):
    # In a fresh interpreter without TRITON_INTERPRET (set for this test session when
    # there is no GPU; interpreted kernels cannot be compiled), as test_triton_ptx does.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), module, "--arch", "90", "--only", spec,
                           "--dump"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loop = [line.strip() for line in proc.stdout.splitlines() if line.startswith("      ")]
    ops = [triton_sass.opcode(i) for i in loop]
    assert sum(op.startswith("HMMA.16816.F32") for op in ops) == hmma   # .BF16 for bfloat16
    assert len(ops) <= most, len(ops)
    for op, limit in bounds.items():
        assert ops.count(op) <= limit, (op, ops.count(op))
