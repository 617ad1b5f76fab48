"""Keep torch's fused Transformer fast path off where pyfast replaced a layer it reads.

In eval mode (no grad, batched input, ...), nn.TransformerEncoderLayer.forward hands
its weights straight to one fused kernel (torch._transformer_encoder_layer_fwd) and
reads `linear1.weight` / `linear2.weight` to do so: with a pyfast layer there (no
`.weight`), every eval forward raised AttributeError, and a QATLinear there (which has
a float `.weight`) would have skipped its fake quantization. nn.TransformerEncoder
does the same for its first layer when given a src_key_padding_mask. Both fall back to
their plain forward, which calls the modules, when a documented condition fails:
  - nn.TransformerEncoderLayer: `activation_relu_or_gelu` false ("activation_relu_or_gelu
    was not True"; the attribute only selects the fused kernel's activation);
  - nn.TransformerEncoder: `use_nested_tensor` false (its enable_nested_tensor=False).
"""
from __future__ import annotations

from torch import nn

# (module type, the attribute keep_off sets, the value that turns the fast path off)
FLAGS = ((nn.TransformerEncoderLayer, "activation_relu_or_gelu", 0),
         (nn.TransformerEncoder, "use_nested_tensor", False))


def keep_off(model: nn.Module, name: str, new: nn.Module) -> None:
    """After `new` was put at `name` in model: turn the fast path off in every
    Transformer layer / encoder above it, unless `new` is a plain nn.Linear."""
    if isinstance(new, nn.Linear) and type(new).forward is nn.Linear.forward:
        return
    parts = name.split(".")[:-1]
    for i in range(len(parts) + 1):
        mod = model.get_submodule(".".join(parts[:i]))
        for cls, attr, off in FLAGS:
            if isinstance(mod, cls):
                setattr(mod, attr, off)
