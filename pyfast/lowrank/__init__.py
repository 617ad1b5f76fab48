"""pyfast.lowrank: low-rank factorization of Linear and Conv2d layers by truncated SVD.

    report = pyfast.lowrank.factorize(model, energy=0.9)   # or rank=16; in place
    print(report)                                          # ranks, params and MACs saved
    pyfast.digits.train(model, data, epochs=2)             # optional short fine-tune

The factor pairs (LowRankLinear, LowRankConv2d) are plain trainable modules; they
save and load with pyfast.save / pyfast.load.
"""
from .factorize import LowRankReport, LowRankRow, factorize, rank_for_energy
from .layers import LowRankConv2d, LowRankLinear, svd_factors

__all__ = ["factorize", "LowRankReport", "LowRankRow", "LowRankLinear", "LowRankConv2d",
           "rank_for_energy", "svd_factors"]
