"""pyfast.distill: knowledge distillation from a teacher into a smaller student.

    student, history = pyfast.distill.distill(student, teacher, data, epochs=10, lr=3e-3,
                                              temperature=4.0, alpha=0.7,
                                              features={"5": "5"}, relation="distance")

Losses (each usable alone in any training loop):
  response_loss / kd_loss            Hinton et al. 2015, softened logits
  FeatureDistiller                   FitNets (Romero et al. 2015), hints with adapters
  rkd_distance_loss / rkd_angle_loss RKD (Park et al. 2019), relations between samples
"""
from .features import FeatureDistiller
from .loop import distill
from .losses import kd_loss, response_loss, rkd_angle_loss, rkd_distance_loss

__all__ = ["distill", "FeatureDistiller", "response_loss", "kd_loss", "rkd_distance_loss",
           "rkd_angle_loss"]
