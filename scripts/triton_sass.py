"""SASS of the Triton kernels' PTX specs, compiled here without a GPU, and the size of
each kernel's main loop: a proxy for issue pressure that needs no GPU.

    python scripts/triton_sass.py weight_only [--arch 90] [--only splitk] [--dump]

For every spec in pyfast.kernels.<module>.PTX_SPECS (those tests/test_triton_ptx.py
compiles), it compiles the kernel for sm_<arch> with triton.compile and a GPUTarget,
disassembles the cubin with the nvdisasm that Triton ships, finds the loops (a branch
back to an earlier label) and prints the longest one's instruction count and opcode
histogram; --dump prints that loop. At M <= 16 these kernels are meant to be bound by
reading the weight, so instructions per loop iteration (one K block) per weight byte is
what to keep small. It is only a proxy: it says nothing of latency or bandwidth.
"""
import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\(\.(L_x_\d+)\)")


def disassemble(cubin: bytes) -> str:
    import triton
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def longest_loop(sass: str):
    """(all instructions, the body of the longest loop) of a disassembly."""
    instrs, labels, loops = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if m:
            instrs.append(m.group(1).strip())
    for i, ins in enumerate(instrs):
        m = _BRANCH.search(ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append(instrs[labels[m.group(1)]:i + 1])
    return instrs, max(loops, key=len, default=[])


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def compile_spec(spec: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    src = triton.compiler.ASTSource(fn=spec["kernel"], signature=spec["signature"],
                                    constexprs=spec.get("constexprs", {}), attrs=spec.get("attrs"))
    options = {k: v for k, v in spec.items() if k in ("num_warps", "num_stages")}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="a module of pyfast.kernels with PTX_SPECS, e.g. weight_only")
    ap.add_argument("--arch", type=int, default=90, help="80 or 90 (default 90)")
    ap.add_argument("--only", default="", help="specs whose name contains this")
    ap.add_argument("--dump", action="store_true", help="print the longest loop's SASS")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)   # interpreted kernels cannot be compiled
    mod = importlib.import_module("pyfast.kernels." + args.module)
    for spec in mod.PTX_SPECS:
        if args.only not in spec["name"]:
            continue
        instrs, loop = longest_loop(disassemble(compile_spec(spec, args.arch).asm["cubin"]))
        tiles = {k: v for k, v in spec.get("constexprs", {}).items() if k.startswith(("BLOCK", "SPLIT"))}
        hist = collections.Counter(opcode(i) for i in loop)
        print(f"{spec['name']} sm_{args.arch} {tiles}: {len(instrs)} instructions, "
              f"main loop {len(loop)}")
        print("   " + ", ".join(f"{k} {v}" for k, v in hist.most_common(12)))
        if args.dump:
            print("\n".join("      " + i for i in loop))


if __name__ == "__main__":
    main()
