"""pyfast.quant: quantization workflows that need data or training.

    quantize_static(model, batches, observer="mse")   # calibrated static int8 (W8A8)
    prepare_qat(model, "int4"); train; convert_qat(model)   # quantization-aware training
"""
from .observers import (MinMaxObserver, MovingAverageObserver, MSEObserver, Observer,
                        PercentileObserver, make_observer)
from .qat import QATConv2d, QATLinear, convert_qat, prepare_qat
from .static import calibrate, convert_static, prepare_static, quantize_static
from .gptq import gptq_quantize  # GPTQ int4 / int2 weights (Frantar et al. 2022)

__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver",
           "MSEObserver", "make_observer", "prepare_static", "calibrate", "convert_static",
           "quantize_static", "prepare_qat", "convert_qat", "QATLinear", "QATConv2d",
           "gptq_quantize"]
