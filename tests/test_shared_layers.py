"""A layer used at several places of a model (weight sharing: ALBERT's shared blocks,
Sequential(lin, act, lin)) is converted once and the result put at every place, so it
stays shared; before, only its first name (named_modules() lists a module once) was
replaced and the other places silently stayed float nn.Linear. A filter that selects
only some of its names leaves it as it is, with the reason."""
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast import lowrank, prune, quant


class Shared(nn.Module):
    """One nn.Linear at three places, and a plain one after them."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([shared] * 3)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _gptq(m):
    return quant.gptq_quantize(m, [torch.randn(64, 64)], group_size=32, block_size=32,
                               progress=False)


def _qat(m):
    quant.prepare_qat(m, "int8")
    kinds = {type(b).__name__ for b in m.blocks}
    assert kinds == {"QATLinear"}, kinds
    return quant.convert_qat(m)


def _finish(m):
    prune.n_m(m, 2, 4)
    return prune.finish(m, to_sparse24=True)


CONVERT = {
    "quantize-int8": (lambda m: pyfast.quantize(m, "int8"), "Int8Linear"),
    "quantize-int4": (lambda m: pyfast.quantize(m, "int4", group_size=32), "Int4Linear"),
    "sparsify": (lambda m: pyfast.sparsify(m, "2:4"), "Sparse24Linear"),
    "qat": (_qat, "Int8Linear"),
    "static": (lambda m: quant.quantize_static(m, [torch.randn(4, 64)], progress=False),
               "StaticInt8Linear"),
    "gptq": (_gptq, "Int4Linear"),
    # the 64 -> 8 head saves nothing at rank 8, so lowrank skips it (not the shared layer)
    "lowrank": (lambda m: lowrank.factorize(m, rank=8, include="blocks.*"), "LowRankLinear"),
    "finish-2:4": (_finish, "Sparse24Linear"),
}


@pytest.mark.parametrize("how", list(CONVERT))
def test_every_place_of_a_shared_layer_is_converted(how):
    torch.manual_seed(0)
    model = Shared()
    convert, kind = CONVERT[how]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing skipped
        convert(model)
    first = model.blocks[0]
    assert type(first).__name__ == kind
    assert all(block is first for block in model.blocks)     # still one shared layer
    assert type(model.head).__name__ == ("Linear" if how == "lowrank" else kind)
    assert model(torch.randn(2, 64)).shape == (2, 8)


def test_filters_that_split_a_shared_layer_leave_it_with_the_reason():
    model = Shared()
    with pytest.warns(UserWarning, match="shared by blocks.0, blocks.1, blocks.2"):
        pyfast.quantize(model, "int8", exclude="blocks.1")
    assert all(type(b) is nn.Linear for b in model.blocks)
    assert "include/exclude select only blocks.0, blocks.2" in model.pyfast_skipped["blocks.0"]
    assert isinstance(model.head, pyfast.nn.Int8Linear)


def test_filters_that_select_every_name_convert_it():
    model = Shared()
    pyfast.quantize(model, "int8", include="blocks.*")
    assert all(isinstance(b, pyfast.nn.Int8Linear) and b is model.blocks[0] for b in model.blocks)
    assert type(model.head) is nn.Linear


# --- pruning masks follow the same rule ----------------------------------------------------

PRUNE = {
    "magnitude": lambda m, **f: prune.magnitude(m, 0.5, **f),
    "magnitude-global": lambda m, **f: prune.magnitude(m, 0.5, scope="global", **f),
    "random": lambda m, **f: prune.random(m, 0.5, **f),
    "n_m": lambda m, **f: prune.n_m(m, 2, 4, **f),
    "custom": lambda m, **f: prune.custom(m, lambda name, mod, w: w > 0, **f),
}


@pytest.mark.parametrize("filters", [{"exclude": "blocks.1"}, {"include": "blocks.2"}],
                         ids=["exclude-one-name", "include-a-later-name"])
@pytest.mark.parametrize("how", list(PRUNE))
def test_pruning_filters_that_split_a_shared_layer_leave_it_with_the_reason(how, filters):
    """A mask on a shared layer changes every place, so a filter that selects only some
    of its names leaves it unmasked, with the reason, as quantize does. Before, the
    first name decided alone: exclude="blocks.1" pruned all three places and
    include="blocks.2" silently pruned nothing."""
    model = Shared()
    with pytest.warns(UserWarning, match="shared by blocks.0, blocks.1, blocks.2"):
        PRUNE[how](model, **filters)
    assert not prune.is_masked(model.blocks[0])
    assert all(block is model.blocks[0] for block in model.blocks)
    assert set(model.pyfast_skipped) == {"blocks.0"}
    assert "pruning it would change the others too" in model.pyfast_skipped["blocks.0"]
    assert prune.is_masked(model.head) == ("exclude" in filters)


@pytest.mark.parametrize("how", list(PRUNE))
def test_pruning_a_shared_layer_masks_it_once_for_every_place(how):
    model = Shared()
    with pytest.warns(UserWarning, match="shared by"):
        PRUNE[how](model, include="blocks.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # every name selected: nothing skipped
        PRUNE[how](model, include="blocks.*")
    shared = model.blocks[0]
    assert prune.is_masked(shared) and all(block is shared for block in model.blocks)
    assert not prune.is_masked(model.head)
    assert model.pyfast_skipped == {}           # the earlier reason is gone
    assert model(torch.randn(2, 64)).shape == (2, 8)


def test_global_pruning_counts_a_shared_layer_once():
    model = Shared()
    prune.magnitude(model, 0.5, scope="global")
    s = prune.sparsity(model)
    assert s.weights == 64 * 64 + 8 * 64 and s.zeros == s.weights // 2
