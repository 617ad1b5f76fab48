"""Distillation losses: response (Hinton et al. 2015) and relation (RKD, Park et al. 2019).

The teacher's tensors are always targets: they are detached here, so a caller that
forgets torch.no_grad() on the teacher still trains only the student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_pair(s: Tensor, t: Tensor, s_name: str, t_name: str) -> None:
    for name, v in ((s_name, s), (t_name, t)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} has dtype {v.dtype}; accepted: a floating-point dtype")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def response_loss(student_logits: Tensor, teacher_logits: Tensor,
                  temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

        T^2 * KL( softmax(t / T) || softmax(s / T) ),  averaged over the batch (batchmean)

    logits [B, C] (or [B, C, ...], classes on dim 1 as in F.cross_entropy: every
    position is then a sample of the batch mean). The gradient of the KL with respect to
    s is (softmax(s/T) - softmax(t/T)) / T, which shrinks like 1/T^2 at high T for
    centred logits; the T^2 factor keeps the gradient scale independent of T, so the
    same alpha works at any temperature. Masked classes (-inf logits) count 0 where the
    teacher's probability is 0. Returns a 0-D tensor (>= 0, 0 iff the softened
    distributions are equal).
    """
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [B, C, ...]")
    t = _check_temperature(temperature)
    s_log = F.log_softmax(student_logits / t, dim=1)
    t_log = F.log_softmax(teacher_logits.detach() / t, dim=1)
    p_t = t_log.exp()
    # 0 log 0 = 0 (as F.kl_div): a masked class (-inf logit) would give 0 * inf = NaN
    kl = torch.where(p_t > 0, p_t * (t_log - s_log), 0.0).sum(dim=1)   # [B, ...]
    return kl.mean() * (t * t)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
            alpha: float = 0.7, temperature: float = 4.0) -> Tensor:
    """alpha * response_loss + (1 - alpha) * cross_entropy(student_logits, labels).

    alpha in [0, 1] weighs the teacher's softened outputs against the hard labels
    (alpha=0: plain supervised training; alpha=1: teacher only). Hinton et al. use a
    large weight on the soft term, hence the default 0.7.
    """
    check_alpha(alpha)
    kd = response_loss(student_logits, teacher_logits, temperature)
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    return float(alpha)


# --- relational KD ------------------------------------------------------------------------------

def _embeddings(s_emb: Tensor, t_emb: Tensor):
    """Both as [B, D] (any feature shape flattened), teacher detached, in a common dtype
    of at least float32 (float16 / bfloat16 embeddings are upcast); widths may differ."""
    _check_pair(s_emb, t_emb, "s_emb", "t_emb")
    if s_emb.dim() == 0 or t_emb.dim() == 0 or s_emb.shape[0] != t_emb.shape[0]:
        raise ValueError(f"s_emb {tuple(s_emb.shape)} and t_emb {tuple(t_emb.shape)} must be "
                         "batches [B, ...] of the same B")
    if s_emb.shape[0] < 3:
        raise ValueError(f"relational losses compare pairs and triplets of samples: the batch "
                         f"must hold at least 3, got {s_emb.shape[0]}")
    # at least float32: the distances' 1e-12 floor rounds to 0 in float16 (sqrt'(0) of two
    # equal samples: a NaN gradient), and float16 squares of distances over- / underflow
    dtype = torch.promote_types(torch.promote_types(s_emb.dtype, t_emb.dtype), torch.float32)
    return (s_emb.reshape(s_emb.shape[0], -1).to(dtype),
            t_emb.detach().reshape(t_emb.shape[0], -1).to(dtype))


def _pair_distances(e: Tensor) -> Tensor:
    """[B, D] -> the B(B-1)/2 distances ||e_i - e_j|| (i < j) divided by their mean."""
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    d = ((e[i] - e[j]) ** 2).sum(dim=1).clamp_min(1e-12).sqrt()   # clamp: finite gradient at 0
    return d / d.mean().clamp_min(1e-12)


def rkd_distance_loss(s_emb: Tensor, t_emb: Tensor) -> Tensor:
    """RKD-D (Park et al. 2019, "Relational Knowledge Distillation", eq. 4-5): smooth L1
    (Huber, beta 1) between the student's and the teacher's pairwise distances, each
    normalized by its mean over the pairs, averaged over the pairs i < j.

    s_emb [B, ...], t_emb [B, ...] (flattened to [B, D_s], [B, D_t]; D_s != D_t is fine).
    Invariant to scaling, rotating and translating either embedding.
    """
    s, t = _embeddings(s_emb, t_emb)
    return F.smooth_l1_loss(_pair_distances(s), _pair_distances(t))


def _triplet_cosines(e: Tensor) -> Tensor:
    """[B, D] -> cos of the angle at e_j of (e_i, e_j, e_k): <n_ji, n_jk>, n_ji the unit
    vector from e_j to e_i (0 if they coincide); [B, B, B] indexed [j, i, k]."""
    diff = e[None, :, :] - e[:, None, :]                           # [j, i] = e_i - e_j
    norm = diff.norm(dim=2, keepdim=True)
    # a coincident pair (i == j, or two equal samples) has no direction: unit 0 with a zero
    # gradient, where F.normalize's 1/eps gradient (1e12) would blow up the student's update
    unit = torch.where(norm > 0, diff / torch.where(norm > 0, norm, 1.0), 0.0)
    return unit @ unit.transpose(1, 2)


def rkd_angle_loss(s_emb: Tensor, t_emb: Tensor) -> Tensor:
    """RKD-A (Park et al. 2019, eq. 6-7): smooth L1 (beta 1) between the cosines of the
    angles that each triplet of samples forms in the student's and the teacher's
    embedding, averaged over the ordered triplets (i, j, k) of distinct samples
    (the angle at e_j). B^3 values: keep B moderate (a training batch of 64 is fine).
    Invariant to scaling, rotating and translating either embedding.
    """
    s, t = _embeddings(s_emb, t_emb)
    b = len(s)
    idx = torch.arange(b, device=s.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & \
        (idx[:, None, None] != idx[None, None, :]) & (idx[None, :, None] != idx[None, None, :])
    return F.smooth_l1_loss(_triplet_cosines(s)[distinct], _triplet_cosines(t)[distinct])
