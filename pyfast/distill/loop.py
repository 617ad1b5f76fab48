"""distill(student, teacher, data, ...): train a student on a teacher's outputs, features
and relations together with the hard labels.

Per batch (teacher in eval mode under torch.no_grad, student in train mode; a module
the two share, such as a frozen backbone, stays in eval mode, the teacher's):

    loss = alpha * response_loss(s, t, T) + (1 - alpha) * cross_entropy(s, y)   Hinton 2015
         + feature_weight * FeatureDistiller.loss()                              FitNets 2015
         + relation_weight * (rkd_distance_loss and/or rkd_angle_loss)           RKD 2019

optimized with Adam and a cosine learning-rate schedule over the epochs, the recipe of
pyfast.digits.train: with alpha=0 and no other term, distill trains exactly as
digits.train does (same batches, same updates), so the two compare fairly.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _progress
from ..digits import Digits
from .features import Capture, FeatureDistiller, _check_models
from .losses import _check_temperature, check_alpha, response_loss, rkd_angle_loss, \
    rkd_distance_loss

Tensor = torch.Tensor
RELATIONS = {"distance": rkd_distance_loss, "angle": rkd_angle_loss}
# RKD compares pairs and triplets of samples: a batch of fewer has no relation to distill
MIN_RELATION_BATCH = 3


def _number(name: str, v, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0):
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _relations(relation) -> List[str]:
    kinds = [] if relation is None else [relation] if isinstance(relation, str) else relation
    if not isinstance(kinds, (list, tuple)) or not all(k in RELATIONS for k in kinds) or (
            relation is not None and not kinds):
        raise ValueError(f"relation must be None, 'distance', 'angle' or a tuple of them, "
                         f"got {relation!r}")
    return list(dict.fromkeys(kinds))


def _check_data(data) -> None:
    if isinstance(data, Digits):
        return
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"data must be a pyfast.digits.Digits or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}") from None
    if it is data:
        raise TypeError(f"data is a one-shot iterator ({type(data).__name__}): each epoch "
                        "iterates it again, so pass a re-iterable (a list of batches, a "
                        "DataLoader) or a Digits")


def _known_batch_sizes(data, batch_size: int) -> Optional[Tuple[str, List[int]]]:
    """(what was read, the batch sizes) where they are known without running the data:
    a Digits (batch_size), a DataLoader (its batch_size; the last batch may be smaller)
    or a list/tuple of (x, y) batches; None for any other iterable."""
    if isinstance(data, Digits):
        return "batch_size", [batch_size]
    if isinstance(data, torch.utils.data.DataLoader):
        return ("data.batch_size", [data.batch_size]) if data.batch_size is not None else None
    if isinstance(data, (list, tuple)) and all(
            isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], Tensor)
            and b[0].dim() > 0 for b in data):
        return "the batches of data", [len(b[0]) for b in data]
    return None


def _check_relation_batches(data, batch_size: int) -> None:
    """ValueError before any update when no batch can hold a relation term. When only
    some batches are too small (a DataLoader's last one), the loop skips the term there."""
    known = _known_batch_sizes(data, batch_size)
    if known is None:
        return
    what, sizes = known
    if sizes and all(isinstance(n, int) and not isinstance(n, bool) and n < MIN_RELATION_BATCH
                     for n in sizes):
        raise ValueError(f"relation needs batches of at least {MIN_RELATION_BATCH} samples "
                         f"(RKD compares pairs and triplets), but {what} gives at most "
                         f"{max(sizes)}; use larger batches or relation=None")


def _sequence_first(mod: nn.Module) -> bool:
    """Whether mod is a torch transformer built with batch_first=False, whose output
    is [T, B, ...]: a batch of T == B samples would pass the shape check unnoticed."""
    if isinstance(mod, nn.Transformer):
        return not mod.batch_first
    if isinstance(mod, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(mod.layers) > 0 and _sequence_first(mod.layers[0])
    if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not mod.self_attn.batch_first
    return False


def _check_batch_first(relation_layer, which: str, name: str, emb: Tensor,
                       batch: int) -> None:
    """RKD relates the samples of a batch: the captured output must be [B, ...]."""
    if emb.dim() == 0 or emb.shape[0] != batch:
        raise ValueError(f"relation_layer {tuple(relation_layer)!r}: the {which} layer "
                         f"{name!r} gives an output of shape {tuple(emb.shape)}, whose dim 0 "
                         f"is not the batch of {batch} samples; RKD relates the samples of a "
                         "batch and needs a batch-first [B, ...] output (a batch_first=False "
                         "TransformerEncoder / LSTM gives [T, B, ...]): name a batch-first "
                         "layer")


def _epoch(data, batch_size: int, seed: int):
    batches = data.batches(batch_size, seed=seed) if isinstance(data, Digits) else data
    for item in batches:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(v, Tensor) for v in item)):
            raise TypeError(f"each batch of data must be a pair (x, y) of tensors, got "
                            f"{type(item).__name__}")
        yield item


def distill(student: nn.Module, teacher: nn.Module, data, *, epochs: int, lr: float,
            temperature: float = 4.0, alpha: float = 0.7,
            features: Union[None, FeatureDistiller, Dict[str, str]] = None,
            feature_weight: float = 1.0,
            relation: Union[None, str, Sequence[str]] = None,
            relation_layer: Optional[Tuple[str, str]] = None, relation_weight: float = 1.0,
            batch_size: int = 64, weight_decay: float = 0.0, progress: Optional[bool] = None,
            seed: int = 0) -> Tuple[nn.Module, List[Dict[str, float]]]:
    """Distill teacher into student; returns (student in eval mode, history).

    data: a pyfast.digits.Digits (its training split, shuffled per epoch with seed + epoch,
    batch_size samples a batch) or any re-iterable of (x, y) batches (a list, a DataLoader).
    alpha: weight of the response term against the hard-label CE (see module docstring).
    features: a FeatureDistiller built on these two models (its adapters are trained
    too), or a pairs dict {student layer: teacher layer}, for which one is built (measuring
    the shapes on the first batch) and closed at the end.
    relation: RKD term(s) on the logits, or on the outputs of relation_layer =
    (student layer name, teacher layer name) if given (any batch-first shape [B, ...],
    flattened per sample; the widths may differ; an output whose dim 0 is not the batch,
    as a batch_first=False transformer's [T, B, ...], raises ValueError before the first
    update). RKD needs at least 3 samples a batch: a smaller batch (the
    last one of a DataLoader without drop_last, of a Digits epoch) is trained without
    the relation term, the other terms unchanged. When no batch can be that large (a
    Digits batch_size, a DataLoader's batch_size or every batch of a list below 3), the
    call raises ValueError before training; a batch iterable whose every batch of an
    epoch turns out smaller raises ValueError at the end of that epoch.
    history: one dict a epoch, sample-weighted means of "loss", "ce", "kd" and, when
    enabled, "feature" and "relation" (the sum of the RKD terms' raw values, before
    relation_weight; a batch trained without it counts 0, so "loss" stays the weighted
    sum of the other entries).
    """
    _check_models(student, teacher)
    _check_data(data)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    lr = _number("lr", lr, positive=True)
    temperature, alpha = _check_temperature(temperature), check_alpha(alpha)
    feature_weight = _number("feature_weight", feature_weight, positive=False)
    relation_weight = _number("relation_weight", relation_weight, positive=False)
    kinds = _relations(relation)
    if relation_layer is not None and not (
            isinstance(relation_layer, (tuple, list)) and len(relation_layer) == 2
            and all(isinstance(n, str) for n in relation_layer)):
        raise ValueError(f"relation_layer must be None (the logits) or a pair (student layer "
                         f"name, teacher layer name), got {relation_layer!r}")
    if relation_layer is not None and not kinds:
        raise ValueError(f"relation_layer={relation_layer!r} needs relation='distance', "
                         "'angle' or both")
    if kinds:
        _check_relation_batches(data, batch_size)
    if features is not None and not isinstance(features, (FeatureDistiller, dict)):
        raise TypeError(f"features must be None, a FeatureDistiller or a dict of layer pairs, "
                        f"got {type(features).__name__}")
    if isinstance(features, FeatureDistiller) and (features.student is not student
                                                   or features.teacher is not teacher):
        raise ValueError("features is a FeatureDistiller built on other models than this "
                         "student and teacher")

    torch.manual_seed(seed)
    owned: list = []
    teacher_was_training = teacher.training
    try:
        if isinstance(features, dict):
            first = next(iter(_epoch(data, batch_size, seed)), None)
            if first is None:
                raise ValueError("data gave no batches in epoch 0")
            features = FeatureDistiller(student, teacher, features, example_input=first[0])
            owned.append(features)
        caps = None
        if relation_layer is not None:
            caps = (Capture(student, [relation_layer[0]], "student"),)
            owned.append(caps[0])
            caps += (Capture(teacher, [relation_layer[1]], "teacher"),)
            owned.append(caps[1])
            for cap, name in zip(caps, relation_layer):
                mod = cap.modules[name]
                if _sequence_first(mod):
                    raise ValueError(
                        f"relation_layer {tuple(relation_layer)!r}: the {cap.which} layer "
                        f"{name!r} is an nn.{type(mod).__name__} with batch_first=False, whose "
                        "output is [T, B, ...]; RKD relates the samples of a batch, on dim 0: "
                        "build it with batch_first=True or name a batch-first layer")
        params = [p for p in student.parameters() if p.requires_grad]
        if features is not None:
            params += list(features.parameters())
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        student.train()
        teacher.eval()      # second: modules the teacher shares with the student stay in eval
        history: List[Dict[str, float]] = []
        bar = _progress.bar(range(epochs), desc="distill", progress=progress)
        for epoch in bar:
            sums: Dict[str, float] = {}
            seen = related = 0
            for xb, yb in _epoch(data, batch_size, seed + epoch):
                with torch.no_grad():
                    t_logits = teacher(xb)
                s_logits = student(xb)
                parts = {"ce": F.cross_entropy(s_logits, yb),
                         "kd": response_loss(s_logits, t_logits, temperature)}
                loss = alpha * parts["kd"] + (1.0 - alpha) * parts["ce"]
                if features is not None:
                    parts["feature"] = features.loss()
                    loss = loss + feature_weight * parts["feature"]
                if kinds and len(xb) >= MIN_RELATION_BATCH:
                    s_emb, t_emb = (s_logits, t_logits) if caps is None else (
                        caps[0].get(relation_layer[0]), caps[1].get(relation_layer[1]))
                    if caps is not None:
                        for cap, name, emb in zip(caps, relation_layer, (s_emb, t_emb)):
                            _check_batch_first(relation_layer, cap.which, name, emb, len(xb))
                    parts["relation"] = sum(RELATIONS[k](s_emb, t_emb) for k in kinds)
                    loss = loss + relation_weight * parts["relation"]
                    related += len(xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                parts["loss"] = loss
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(xb)
                seen += len(xb)
            if seen == 0:
                raise ValueError(f"data gave no batches in epoch {epoch}")
            if kinds and related == 0:
                raise ValueError(f"relation needs batches of at least {MIN_RELATION_BATCH} "
                                 f"samples (RKD compares pairs and triplets), but no batch "
                                 f"of epoch {epoch} had that many; use larger batches or "
                                 "relation=None")
            sched.step()
            history.append({k: v / seen for k, v in sums.items()})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    finally:
        teacher.train(teacher_was_training)
        for c in owned:
            c.close()
    return student.eval(), history
