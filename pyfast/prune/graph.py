"""Which output channels can be removed: a small dependency analysis on the torch.fx graph.

For each nn.Conv2d / nn.Linear call (a producer) we follow its output through the
ops that keep channels apart (BatchNorm, element-wise activations, dropout,
spatial pooling, flatten) to the layers that consume it (the next Conv2d's input
channels, or a Linear's input features). Removing output channel c of the
producer then means: drop row c of its weight and bias, entry c of each BatchNorm
on the way, and the matching inputs of each consumer. Anything else on the way
(an add, a concat, a reshape/view, the model output, an unknown op) would see a
different number of channels, so that producer is not pruned, and the reason
names the node.

Channel bookkeeping along a path: (dim, group) = the tensor dimension holding the
channels and how many consecutive entries of that dimension belong to one
channel. A producer's output has group 1 (dim 1 for Conv2d [B, C, H, W], the last
dim for Linear); flatten(1) of [B, C, H, W] gives dim 1 with group H*W, so channel
c owns the Linear input columns c*H*W ... (c+1)*H*W - 1. Shapes come from one
ShapeProp pass (torch.fx.passes.shape_prop) on the example input.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

Node = fx.Node

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU,
                       nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish,
                       nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                       nn.AlphaDropout)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
                         F.selu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus,
                         torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d,
                         F.dropout2d, torch.dropout}
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
# the 1-d pools; the other pools are 2-d. A pool takes [B, C, L] (1-d) / [B, C, H, W] (2-d);
# given one dim less, PyTorch reads the input as unbatched and pools over the channels
POOLS_1D = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
            F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach"}
REDUCTIONS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}   # over given dims
MERGES = {operator.add: "an add", operator.iadd: "an add", torch.add: "an add",
          operator.mul: "a multiply", torch.mul: "a multiply", operator.sub: "a subtract",
          torch.cat: "a concat", torch.concat: "a concat", torch.stack: "a stack"}


class TraceError(ValueError):
    """The model could not be traced by torch.fx (or shape-propagated) for structured pruning."""


@dataclass
class Plan:
    """What removing output channels of one producer touches."""
    name: str                                   # the Conv2d / Linear module
    channels: int                               # its output channels / features
    norms: List[str] = field(default_factory=list)            # BatchNorms sliced the same way
    consumers: List[Tuple[str, int]] = field(default_factory=list)  # (module, group) inputs


def plain_type(mod: nn.Module) -> type:
    """The module's class, looking through torch.nn.utils.parametrize's generated subclass."""
    cls = type(mod)
    return cls.__bases__[0] if parametrize.is_parametrized(mod) else cls


def trace(model: nn.Module, example_input) -> fx.GraphModule:
    """symbolic_trace + ShapeProp in eval mode (BatchNorm stats untouched), no grad."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:   # fx raises many types (TraceError, TypeError, ...): re-raise one
        raise TraceError(
            f"structured pruning needs torch.fx.symbolic_trace(model), which failed with "
            f"{type(exc).__name__}: {exc}. Data-dependent Python control flow (if/for on tensor "
            "values) cannot be traced; prune with masks (prune.magnitude / prune.n_m) instead, "
            "or move the untraceable part into a submodule fx can treat as a leaf") from exc
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_input must be a torch.Tensor or a tuple of them, got "
                        f"{type(example_input).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:  # the model's own error on this input: say where it came from
        raise TraceError(f"running the traced model on example_input (shapes "
                         f"{[tuple(a.shape) for a in args]}) failed with {type(exc).__name__}: "
                         f"{exc}") from exc
    finally:
        model.train(was_training)
    return gm


def _shape(node: Node) -> Optional[Tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_dims(node: Node, mod: Optional[nn.Module]) -> Tuple[int, int]:
    if mod is not None:
        return mod.start_dim, mod.end_dim
    args = list(node.args[1:]) + [None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else
                            (1 if node.op == "call_module" else 0))
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    return start, end


class _Walker:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.modules = dict(model.named_modules())
        self.calls: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def shared(self, target: str) -> Optional[str]:
        if self.calls.get(target, 0) > 1:
            return (f"module {target!r} is called at {self.calls[target]} places (shared "
                    "weights); slicing it would change every call")
        return None

    def follow(self, plan: Plan, node: Node, dim: int, group: int, seen: Set[Node]) -> Optional[str]:
        """Walk node's users; fill plan; return why the producer cannot be pruned, or None."""
        shape = _shape(node)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            why = self._step(plan, node, user, shape, dim, group, seen)
            if why is not None:
                return why
        return None

    def _step(self, plan, src, user, shape, dim, group, seen) -> Optional[str]:
        where = f"at node {user.name}"
        if user.op == "output":
            return "its output is (part of) the model output; the last layer keeps its size"
        if shape is None:
            return f"no tensor shape for node {src.name} (ShapeProp)"
        if user.args[:1] != (src,) or any(a is src for a in list(user.args[1:]) + list(user.kwargs.values())):
            what = MERGES.get(user.target, f"{user.op} {getattr(user.target, '__name__', user.target)}")
            return f"output feeds {what} {where}; removing channels would break it"
        ndim = len(shape)
        channel_dim, last = dim == 1, dim == ndim - 1
        if user.op == "call_module":
            mod = self.modules[user.target]
            cls = plain_type(mod)
            if cls in (nn.Linear, nn.Conv2d):
                if self.shared(user.target):
                    return self.shared(user.target)
                if cls is nn.Linear and not last:
                    return f"Linear {user.target!r} {where} mixes a dim other than the channel dim"
                if cls is nn.Conv2d and not (channel_dim and group == 1 and ndim == 4):
                    return f"Conv2d {user.target!r} {where} does not take the channels as dim 1"
                if cls is nn.Conv2d and mod.groups != 1:
                    return (f"it feeds grouped Conv2d {user.target!r} (groups={mod.groups}) "
                            f"{where}; its input channels cannot be sliced independently")
                plan.consumers.append((user.target, group))
                return None
            if cls in (nn.BatchNorm1d, nn.BatchNorm2d):
                if not (channel_dim and group == 1):
                    return f"BatchNorm {user.target!r} {where} normalizes another dim"
                if self.shared(user.target):
                    return self.shared(user.target)
                plan.norms.append(user.target)
                return self.follow(plan, user, dim, group, seen)
            if isinstance(mod, ELEMENTWISE_MODULES):
                return self.follow(plan, user, dim, group, seen)
            if isinstance(mod, POOL_MODULES):
                return self._pool(plan, user, mod, ndim, dim, group, seen)
            if isinstance(mod, nn.Flatten):
                return self._flatten(plan, user, shape, dim, group, seen, mod)
            return (f"output reaches {type(mod).__name__} {user.target!r} {where}, which "
                    "structured pruning cannot see through")
        if user.op == "call_function":
            if user.target in ELEMENTWISE_FUNCTIONS:
                return self.follow(plan, user, dim, group, seen)
            if user.target in POOL_FUNCTIONS:
                return self._pool(plan, user, user.target, ndim, dim, group, seen)
            if user.target is torch.flatten:
                return self._flatten(plan, user, shape, dim, group, seen, None)
            if user.target in REDUCTIONS:
                return self._reduce(plan, user, ndim, dim, group, seen)
            what = MERGES.get(user.target, f"function {getattr(user.target, '__name__', user.target)}")
            return f"output feeds {what} {where}; removing channels would break it"
        if user.op == "call_method":
            if user.target in ELEMENTWISE_METHODS:
                return self.follow(plan, user, dim, group, seen)
            if user.target == "flatten":
                return self._flatten(plan, user, shape, dim, group, seen, None)
            if user.target in REDUCTIONS:
                return self._reduce(plan, user, ndim, dim, group, seen)
            return (f"output feeds tensor.{user.target}() {where} (e.g. a view/reshape with a "
                    "possibly fixed shape); removing channels would break it")
        return f"output reaches {user.op} {user.name}; removing channels would break it"

    def _pool(self, plan, user, kind, ndim, dim, group, seen) -> Optional[str]:
        """A pooling module / function: seen through if it pools the spatial dims only."""
        is_1d = isinstance(kind, POOLS_1D[:4]) or any(kind is f for f in POOLS_1D[4:])
        want = 3 if is_1d else 4       # [B, C, L] / [B, C, H, W]
        if dim == 1 and group == 1 and ndim == want:
            return self.follow(plan, user, dim, group, seen)
        shape = f" (a {want - 2}-d pool of a {ndim}-d tensor)" if ndim != want else ""
        return f"pooling at node {user.name} would pool over the channels{shape}"

    def _reduce(self, plan, user, ndim, dim, group, seen) -> Optional[str]:
        """mean/sum/amax over dims that are not the channel dim (global average pooling)."""
        dims = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        keepdim = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims) \
                or dim in {d % ndim for d in dims} or not isinstance(keepdim, bool):
            return f"a reduction at node {user.name} runs over the channel dim (or all dims)"
        shift = 0 if keepdim else sum(1 for d in dims if d % ndim < dim)
        return self.follow(plan, user, dim - shift, group, seen)

    def _flatten(self, plan, user, shape, dim, group, seen, mod) -> Optional[str]:
        ndim = len(shape)
        start, end = (d % ndim for d in _flatten_dims(user, mod))
        if dim < start:
            return self.follow(plan, user, dim, group, seen)
        if dim > end:
            return self.follow(plan, user, dim - (end - start), group, seen)
        if dim != start:
            return f"flatten at node {user.name} merges the channel dim with the dims before it"
        return self.follow(plan, user, dim, group * math.prod(shape[start + 1:end + 1]), seen)


def analyze(model: nn.Module, example_input) -> Tuple[Dict[str, Plan], Dict[str, str]]:
    """(plans by producer name, reasons by name of each Conv2d/Linear that cannot be pruned)."""
    gm = trace(model, example_input)
    walker = _Walker(model, gm)
    plans: Dict[str, Plan] = {}
    blocked: Dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = walker.modules[node.target]
        cls = plain_type(mod)
        if isinstance(mod, _ConvNd) and not isinstance(mod, nn.Conv2d):
            blocked[node.target] = (f"{type(mod).__name__}: structured pruning rebuilds "
                                    "nn.Linear / nn.Conv2d layers only")
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or node.target in blocked:
            continue
        if cls not in (nn.Linear, nn.Conv2d) or type(mod).forward is not cls.forward:
            blocked[node.target] = (f"{type(mod).__name__} is not a plain nn.Linear/nn.Conv2d; "
                                    "structured pruning rebuilds only those")
            continue
        why = walker.shared(node.target)
        if why is None and cls is nn.Conv2d and mod.groups != 1:
            why = f"grouped Conv2d (groups={mod.groups}): its output channels come in groups"
        shape = _shape(node)
        plan = Plan(node.target, mod.out_features if cls is nn.Linear else mod.out_channels)
        if why is None and shape is not None:
            dim = 1 if cls is nn.Conv2d else len(shape) - 1
            why = walker.follow(plan, node, dim, 1, set())
        if why is None and not plan.consumers:
            why = "its output reaches no Conv2d/Linear to slice"
        if why is None:
            plans[node.target] = plan
        else:
            blocked[node.target] = why
    return plans, blocked
