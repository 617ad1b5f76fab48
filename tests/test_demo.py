"""The two demos run end to end (with few epochs) and say what they promise."""
import importlib
import os
import sys

import pytest

from pyfast import demo, demo_mlp, demo_recipes


def test_digits_demo_runs_every_recipe(tmp_path, capsys):
    rc = demo.main(["--epochs", "3", "--finetune-epochs", "1", "--student-epochs", "1",
                    "--rounds", "2", "--batch", "100000", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # the test set holds fewer images than --batch: the batch timed is the whole test set
    n_test = int(out.split(" train / ")[1].split()[0])
    assert f"--batch 100000: the test set has {n_test} images" in out
    assert f"batch of {n_test} images for latency" in out
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


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--rounds", "-1"], ["--blocks", "0"],
                                  ["--tokens", "0"], ["--dim", "0"], ["--dim", "x"]])
def test_mlp_demo_refuses_counts_below_one(capsys, argv):
    """A count below 1 is an argparse error naming it, not a traceback or NaN output."""
    with pytest.raises(SystemExit) as exc:
        demo_mlp.main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[0]}: {argv[0]} {argv[1]!r}: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--batch", "0"], ["--batch", "-5"]])
def test_digits_demo_refuses_counts_below_one_before_training(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_median_ms_needs_a_round():
    with pytest.raises(ValueError, match="rounds=0"):
        demo_mlp.median_ms({}, None, 0)


def test_help_lists_the_subcommands_and_the_recipes(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "python -m pyfast mlp" in out and "python -m pyfast backends" in out
    for name in demo_recipes.RECIPES:
        assert f"  {name}\n" in out, name


def test_backends_refuses_extra_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m pyfast", "backends", "--bogus"])
    cli = importlib.import_module("pyfast.__main__")     # runs nothing on import
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exc:
        cli.main(["backends", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli.main(["backends"]) == 0 and "backends" in capsys.readouterr().out
