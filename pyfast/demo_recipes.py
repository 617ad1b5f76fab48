"""The compression recipes of the main demo, one short function each.

Each takes the trained teacher (never modified: every recipe works on a copy),
the digits data and the demo's settings, and returns the compressed model. They
are written the way a user would write them, so they double as examples of the
workflow APIs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import nn

import pyfast
from pyfast import distill, lowrank, prune, quant
from pyfast.digits import Digits, DigitsCNN, train


@dataclass(frozen=True)
class Settings:
    finetune_epochs: int = 3     # fine-tuning after pruning / low-rank / QAT
    student_epochs: int = 12     # distillation into the half-width student
    calib_batches: int = 8       # batches of 64 training images for calibration and GPTQ
    group_size: int = 32         # int4/int2 groups (conv2's 288 inputs fit 32, not 128)
    progress: bool = True
    seed: int = 0


def _calibration(data: Digits, s: Settings) -> List[torch.Tensor]:
    batches = data.batches(64, seed=s.seed + 100)
    return [x for _, (x, _y) in zip(range(s.calib_batches), batches)]


def _finetune(model: nn.Module, data: Digits, s: Settings, desc: str, **kw) -> nn.Module:
    return train(model, data, epochs=s.finetune_epochs, lr=1e-3, seed=s.seed, progress=s.progress,
                 desc=f"  fine-tune {desc}", **kw)


def dynamic_int8(t, data, s):
    return pyfast.quantize(t, "int8")


def static_int8(t, data, s):
    return quant.quantize_static(t, _calibration(data, s), observer="mse", progress=s.progress)


def qat_int8(t, data, s):
    model = quant.prepare_qat(t, "int8")
    _finetune(model, data, s, "QAT int8")
    return quant.convert_qat(model)


def int4_rtn(t, data, s):
    return pyfast.quantize(t, "int4", group_size=s.group_size, symmetric=False)


def int4_gptq(t, data, s):
    # GPTQ quantizes the Linear layers; the convs then get round-to-nearest int4
    quant.gptq_quantize(t, _calibration(data, s), bits=4, group_size=s.group_size,
                        progress=s.progress)
    return pyfast.quantize(t, "int4", group_size=s.group_size, symmetric=False)


def int2_gptq(t, data, s):
    quant.gptq_quantize(t, _calibration(data, s), bits=2, group_size=s.group_size,
                        progress=s.progress)
    return pyfast.quantize(t, "int2", group_size=s.group_size)


def binary(t, data, s):
    return pyfast.quantize(t, "binary")


def sparse24_finetuned(t, data, s):
    prune.n_m(t, 2, 4)
    _finetune(t, data, s, "2:4")
    return prune.finish(t, to_sparse24=True)


def global_magnitude_50(t, data, s):
    prune.magnitude(t, 0.5, scope="global")
    _finetune(t, data, s, "50% global")
    return prune.finish(t)


def structured_50(t, data, s):
    model = prune.structured(t, 0.5, example_input=data.x_train[:2])
    return _finetune(model, data, s, "50% structured")


def low_rank(t, data, s):
    lowrank.factorize(t, energy=0.8)
    return _finetune(t, data, s, "low-rank")


def distilled_student(t, data, s):
    torch.manual_seed(s.seed)
    student = DigitsCNN(width=16)
    student, _history = distill.distill(student, t, data, epochs=s.student_epochs, lr=3e-3,
                                        temperature=4.0, alpha=0.7, progress=s.progress,
                                        seed=s.seed)
    return student


def half_width_no_distillation(t, data, s):
    """The same student trained on the labels alone: what distillation adds."""
    torch.manual_seed(s.seed)
    return train(DigitsCNN(width=16), data, epochs=s.student_epochs, lr=3e-3, seed=s.seed,
                 progress=s.progress, desc="  student, labels only")


def structured_50_int8(t, data, s):
    return pyfast.quantize(structured_50(t, data, s), "int8")


RECIPES: Dict[str, Callable[[nn.Module, Digits, Settings], nn.Module]] = {
    "dynamic int8 (W8A8)": dynamic_int8,
    "static int8 (MSE calib.)": static_int8,
    "QAT int8": qat_int8,
    "int4 RTN g32": int4_rtn,
    "int4 GPTQ g32 (+RTN convs)": int4_gptq,
    "int2 GPTQ g32 (+RTN convs)": int2_gptq,
    "binary (1-bit)": binary,
    "2:4 + fine-tune": sparse24_finetuned,
    "50% global magnitude": global_magnitude_50,
    "50% structured": structured_50,
    "low-rank (80% energy)": low_rank,
    "half-width, labels only": half_width_no_distillation,
    "distilled half-width": distilled_student,
    "50% structured + int8": structured_50_int8,
}


def run(name: str, teacher: nn.Module, data: Digits, s: Settings) -> nn.Module:
    torch.manual_seed(s.seed)
    return RECIPES[name](copy.deepcopy(teacher), data, s).eval()
