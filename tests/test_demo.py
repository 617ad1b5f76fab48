"""The two demos run end to end (with few epochs) and say what they promise."""
import os

import pytest

from pyfast import demo, demo_mlp, demo_recipes


def test_digits_demo_runs_every_recipe(tmp_path, capsys):
    rc = demo.main(["--epochs", "3", "--finetune-epochs", "1", "--student-epochs", "1",
                    "--rounds", "2", "--batch", "8", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ["fp32 teacher", *demo_recipes.RECIPES]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert line.rstrip().endswith("ok"), line          # reloaded bit-exactly
        assert os.path.exists(tmp_path / f"{demo._slug(name)}.safetensors")
    assert (tmp_path / "accuracy_vs_size.png").stat().st_size > 10_000


def test_digits_demo_rejects_unknown_recipe(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--only", "int3 magic"])
    assert "unknown recipe(s) ['int3 magic']" in capsys.readouterr().err


def test_mlp_demo_runs(capsys):
    assert demo_mlp.main(["--dim", "64", "--blocks", "1", "--tokens", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for name in demo_mlp.VARIANTS:
        assert any(l.startswith(name) for l in out.splitlines())
