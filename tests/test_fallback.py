"""Without the compiled extension pyfast still imports, runs every op on the
reference, says why in pyfast.backends(), and refuses a forced compiled backend
with that reason. Each case runs in a fresh interpreter, since the extension
is loaded once per process."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BODY = """
import torch, pyfast
report = pyfast.backends()
text = str(report)
assert REASON in text, text
assert all(r.family == "reference" for r in report if r.default), text
x = torch.randn(5, 64)
w = torch.randn(16, 64)
layer = pyfast.nn.Int8Linear.from_linear(torch.nn.Linear(64, 16))
with pyfast.use_backend("reference"):
    expected = layer(x)
assert torch.equal(layer(x), expected)          # the plain call ran the reference
try:
    with pyfast.use_backend(w8a8_mm="cpp"):     # the op Int8Linear calls
        forced = str(pyfast.backends())         # the table marks it: forced, cannot run
        row = next(line for line in forced.splitlines() if line.startswith("w8a8_mm "))
        assert "cpp*!" in row.split(), forced
        notes = forced.split("*! = forced but cannot run here")[1].splitlines()
        assert any(n.startswith("  cpp on cpu (w8a8_mm): ") and REASON in n for n in notes), forced
        layer(x)
except pyfast.BackendUnavailableError as exc:
    assert "backend 'cpp' was forced" in str(exc) and REASON in str(exc), exc
else:
    raise AssertionError("forcing cpp without the extension did not raise")
print("OK")
"""

BLOCK_IMPORT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pyfast._C":
            raise ImportError("simulated: no pyfast._C in this install")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize("how,prelude,env,reason", [
    ("disabled", "", {"PYFAST_DISABLE_EXTENSION": "1"}, "disabled by PYFAST_DISABLE_EXTENSION=1"),
    ("missing", BLOCK_IMPORT, {}, "not built or not loadable (simulated: no pyfast._C"),
], ids=["disabled", "missing"])
def test_reference_fallback_without_extension(how, prelude, env, reason):
    code = textwrap.dedent(prelude) + f"REASON = {reason!r}\n" + BODY
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr


def test_report_columns_fit_the_longest_op_name():
    """Every op row of the table has its name, then at least one space (the 20-column
    name field ran repack_sparse24_int4_tc into its first cell)."""
    import pyfast

    report = pyfast.backends()
    rows = [line for line in str(report).splitlines()
            if line.split(" ", 1)[0] in {r.op for r in report}]
    assert rows and all(len(line.split(" ", 1)) == 2 for line in rows)
    assert any(line.startswith("repack_sparse24_int4_tc ") for line in rows)
