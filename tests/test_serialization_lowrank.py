"""pyfast.load of a low-rank conv pair into a skeleton whose Conv2d has another padding
or padding_mode: the pair computes another output size (or border), so the file does
not fit that model. It used to load without a word; a plain Conv2d was refused."""
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast.lowrank import factorize


def _saved(tmp_path, conv):
    torch.manual_seed(0)
    m = nn.Sequential(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factorize(m, rank=8)
    path = tmp_path / "m.safetensors"
    pyfast.save(m, path)
    return m, path


@pytest.mark.parametrize("skeleton_kw, match", [
    ({}, r"padding \[0, 0\] vs \[1, 1\], padding_mode zeros vs reflect"),
    ({"padding": 1}, r"padding_mode zeros vs reflect"),
    ({"padding": "same", "padding_mode": "reflect"}, r"padding same vs \[1, 1\]"),
])
def test_lowrank_conv_with_other_padding_is_refused(tmp_path, skeleton_kw, match):
    _, path = _saved(tmp_path, nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect"))
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Conv2d(16, 32, 3, **skeleton_kw))
    with pytest.raises(ValueError, match="does not fit this model at module '0'.*" + match):
        pyfast.load(skeleton, path)
    assert isinstance(skeleton[0], nn.Conv2d)          # all or nothing: left as it was


@pytest.mark.parametrize("padding", [1, "same", (2, 0)])
def test_lowrank_conv_with_the_same_padding_loads(tmp_path, padding):
    m, path = _saved(tmp_path, nn.Conv2d(16, 32, 3, padding=padding, padding_mode="reflect"))
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Conv2d(16, 32, 3, padding=padding, padding_mode="reflect"))
    pyfast.load(skeleton, path)
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(skeleton(x), m(x))
