"""kernels._common.config_subset: PYFAST_TRITON_CONFIGS=few (GPU test runs) keeps the first
autotuner config of each BLOCK_K, and every kernel's GPU config list keeps a config that
the int4 group-size pruning lets through. Also the per-test log of tests/conftest.py
(PYFAST_TEST_LOG), the other aid of scripts/gpu_check.sh's test runs."""
import pytest
import triton

from pyfast.kernels import _common, int8_mm, sparse24, weight_only


def _cfg(bk, bm=16):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": bk})


def test_all_is_the_default(monkeypatch):
    configs = [_cfg(128), _cfg(64), _cfg(128, bm=32)]
    monkeypatch.delenv(_common.CONFIGS_ENV, raising=False)
    assert _common.config_subset(configs) == configs
    monkeypatch.setenv(_common.CONFIGS_ENV, "all")
    assert _common.config_subset(configs) == configs


def test_few_keeps_the_first_of_each_block_k(monkeypatch):
    configs = [_cfg(128), _cfg(64), _cfg(128, bm=32), _cfg(32), _cfg(64, bm=64)]
    monkeypatch.setenv(_common.CONFIGS_ENV, " Few ")
    assert _common.config_subset(configs) == [configs[0], configs[1], configs[3]]


def test_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(_common.CONFIGS_ENV, "some")
    with pytest.raises(ValueError, match=r"PYFAST_TRITON_CONFIGS='some'; accepted: all \(default\), few"):
        _common.config_subset([_cfg(64)])


def _gpu_configs(monkeypatch):
    """Every autotuner's GPU config list (the interpreter gets one config of its own)."""
    monkeypatch.setattr(weight_only, "_INTERPRET", False)
    monkeypatch.setattr(int8_mm, "INTERPRET", False)
    monkeypatch.setattr(sparse24, "_INTERPRET", False)
    return {"int8_mm": int8_mm._configs(), "sparse24_mm_small": sparse24._configs(True),
            "sparse24_mm_large": sparse24._configs(False),
            **{f"{'int4' if int4 else 'int8'}_{'small' if small else 'large'}":
               weight_only._configs(small, int4) for small in (True, False) for int4 in (True, False)}}


@pytest.mark.parametrize("k", [16, 96, 4096, 11008])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_few_leaves_an_int4_config_for_every_group_size(monkeypatch, group_size, k):
    """int4_mm / sparse24_int4_mm prune configs whose BLOCK_K crosses a group; with `few`
    at least one must survive for every group size (-1: one group of K)."""
    lists = _gpu_configs(monkeypatch)
    monkeypatch.setenv(_common.CONFIGS_ENV, "few")
    gs = k if group_size == -1 else group_size
    for name in ("int4_small", "int4_large"):
        few = _common.config_subset(lists[name])
        assert 1 <= len(few) < len(lists[name]), name
        assert weight_only._fits_groups(few, {"K": k, "GROUP_SIZE": gs}), (name, group_size, k)


def test_few_shrinks_every_list(monkeypatch):
    lists = _gpu_configs(monkeypatch)
    monkeypatch.setenv(_common.CONFIGS_ENV, "few")
    for name, configs in lists.items():
        few = _common.config_subset(configs)
        assert {c.kwargs["BLOCK_K"] for c in few} == {c.kwargs["BLOCK_K"] for c in configs}, name
        assert len(few) < len(configs), name


def test_test_log_records_each_outcome(tmp_path):
    """tests/conftest.py's PYFAST_TEST_LOG (used by scripts/gpu_check.sh): one line per
    test as it ends, with the failure's last lines under a failed one."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_two.py").write_text(
        "def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 == 2, 'planted'\n")
    log = tmp_path / "log.tsv"
    env = {**os.environ, "PYFAST_TEST_LOG": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_two.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = log.read_text().splitlines()
    assert lines[0].split("\t")[0::3] == ["passed", "test_two.py::test_ok"]
    assert lines[1].split("\t")[0::3] == ["failed", "test_two.py::test_bad"]
    assert any("planted" in line for line in lines[2:]) and all(l.startswith("   | ") for l in lines[2:])
