"""Knowledge-distillation loss terms between the camera student and the LiDAR teacher's stored outputs.

Terms (each separately weighted, all computed per sample and averaged over the samples that have teacher
targets, ``has_kd``; samples without targets contribute 0 and are not counted):

* ``kd_action``: weighted MSE between student and teacher actions, both normalised with the student's
  training-split statistics (``normalize_actions``), steering/speed weights as the BC loss
  (``e2r.losses.action_weights``). Averaged over KD samples it equals ``e2r.losses.weighted_action_mse``.
* ``kd_bev_vec``: ``1 - cosine similarity`` of bev_vec, averaged over T. Chosen over MSE because the
  teacher's bev_vec scale is arbitrary (a Linear of pooled ReLU features, differing between presets and
  checkpoints): the cosine term is scale-free and bounded in [0, 2], so ``--kd_bevvec_w`` means the same for
  every teacher, and it is what the evaluation reports (bev_vec cosine similarity). The student has its own
  GRU, so matching the direction of the embedding is what carries the teacher's scene summary.
* ``kd_temporal``: MSE of ``gru_out`` (tanh-bounded, already well scaled), averaged over T and H.
* ``kd_bev_feat``: dense feature KD on the teacher's BEV grid: both maps scaled to unit weighted RMS per
  frame, then ``sum(w * mean_c (s' - t')^2) / sum(w)`` (scale-free on both sides, in [0, 4]; 1 for an
  all-zero student).
  Weights ``w = fov * (background + (1 - background) * occupied)``: ``fov`` is the camera field-of-view mask
  (``e2r.models.view_transform.camera_fov_mask``) so the student is never asked for what it cannot see;
  ``occupied`` marks cells whose teacher feature channel-L2 norm is an outlier among the norms inside the
  FOV of that frame: ``norm > median + occupancy_k * MAD`` (no box labels on a racetrack: the teacher's own
  activation says where the structure is; empty cells share a near-constant feature). A robust threshold
  rather than a fixed quantile, which would always flag the top fraction of cells, noise included, and
  none of a constant map. Background cells get ``background`` (0.05). Teacher maps stored average-pooled by K
  (h = H // K) are matched by average-pooling the student's (and the FOV mask) by K; float16 is cast.
* ``kd_depth``: LiDAR depth supervision of the Lift-Splat depth distribution (BEVDepth): the cross-entropy
  against the stored depth-bin target of every feature pixel a LiDAR point lands on (``e2r.depth``; a
  sample's mean over its labelled pixels).

The loss of a whole student batch, BC plus these terms: :func:`student_losses` (FOV masks per rig:
:class:`FovMasks`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from e2r.depth import depth_cross_entropy
from e2r.losses import action_loss, action_weights
from e2r.models.student_config import StudentConfig
from e2r.models.view_transform import camera_fov_mask

__all__ = ["TERMS", "KDWeights", "pool_bev_feat", "hflip_sample", "hflip_lidar", "kd_action_per_sample", "kd_bev_vec_per_sample", "kd_temporal_per_sample",
           "occupancy_weights", "pool_to_grid", "kd_bev_feat_per_sample", "kd_losses", "FovMasks", "student_losses"]


#: the KD terms: the KDWeights field of each, its loss part ``kd_<term>``
TERMS = ("action", "bev_vec", "temporal", "bev_feat", "depth")


@dataclass
class KDWeights:
    """Weights of the KD terms (``--kd_action_w --kd_bevvec_w --kd_temporal_w --kd_bevfeat_w --kd_depth_w``)
    and the action / dense-map settings. A term with weight 0 is not computed (reported as 0)."""
    action: float = 1.0
    bev_vec: float = 1.0
    temporal: float = 1.0
    bev_feat: float = 0.0
    depth: float = 0.0
    steer_weight: float = 1.0
    speed_weight: float = 0.05
    bev_feat_background: float = 0.05
    occupancy_k: float = 3.0

    def __post_init__(self) -> None:
        for name in TERMS:
            if not 0 <= getattr(self, name) < math.inf:      # NaN too: it would turn the term off silently
                raise ValueError(f"KD weight {name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.bev_feat_background <= 1 or not 0 <= self.occupancy_k < math.inf:
            raise ValueError(f"bev_feat_background must be in [0, 1] and occupancy_k >= 0, got "
                             f"{self.bev_feat_background}, {self.occupancy_k}")


def kd_action_per_sample(student_norm: Tensor, teacher_norm: Tensor, weights: Tensor) -> Tensor:
    """(B,T,A) normalised actions, weights (A,) -> (B,) ``sum_a w_a mean_t (s - t)^2``."""
    return (((student_norm - teacher_norm) ** 2).mean(1) * weights.to(student_norm)).sum(-1)


def kd_bev_vec_per_sample(student: Tensor, teacher: Tensor) -> Tensor:
    """(B,T,D) -> (B,) mean over T of ``1 - cos(student, teacher)``."""
    return (1.0 - F.cosine_similarity(student, teacher.to(student), dim=-1, eps=1e-8)).mean(1)


def kd_temporal_per_sample(student: Tensor, teacher: Tensor) -> Tensor:
    """gru_out (B,T,H) -> (B,) mean squared error."""
    return ((student - teacher.to(student)) ** 2).flatten(1).mean(1)


def pool_bev_feat(x: Tensor, factor: int) -> Tensor:
    """The one BEV pooling of the project (memorybank ``bev_feat_pool`` kind "avg"): (..., C, H, W) ->
    (..., C, H // factor, W // factor), average over factor x factor cells (floor at the edges)."""
    if factor == 1:
        return x
    lead = x.shape[:-3]
    y = F.avg_pool2d(x.reshape(-1, *x.shape[-3:]).float(), factor).to(x.dtype)
    return y.reshape(*lead, *y.shape[-3:])


def pool_to_grid(x: Tensor, size: tuple[int, int], what: str = "student bev_feat") -> Tensor:
    """Average-pool (N, C, H, W) by the integer K with ``(H // K, W // K) == size`` (the memorybank's pooling:
    kernel = stride = K, floor) -> (N, C, *size); returns x unchanged when sizes are equal."""
    H, W = x.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return x
    k = H // h if h else 0
    if k < 1 or H // k != h or W // k != w:
        raise ValueError(f"{what} grid {(H, W)} cannot be average-pooled by an integer factor to the teacher "
                         f"bev_feat grid {(h, w)}")
    return pool_bev_feat(x, k)


def occupancy_weights(teacher_feat: Tensor, fov: Tensor, background: float = 0.05, k: float = 3.0) -> Tensor:
    """teacher_feat (N, C, h, w), fov (N, h, w) in [0, 1] -> weights (N, h, w):
    ``fov * (background + (1 - background) * occupied)``, occupied = ``norm > median + k * MAD`` of the
    channel-L2 norms inside the FOV of each frame."""
    norm = teacher_feat.float().norm(dim=1)                                   # (N, h, w)
    inside = torch.where(fov > 0, norm, torch.full_like(norm, float("nan"))).flatten(1)
    med = torch.nanmedian(inside, dim=1).values
    mad = torch.nanmedian((inside - med[:, None]).abs(), dim=1).values
    thr = (med + k * mad).nan_to_num(float("inf"))                            # no FOV cell -> none occupied
    occupied = (norm > thr[:, None, None]).float()
    return fov * (background + (1.0 - background) * occupied)


def kd_bev_feat_per_sample(student: Tensor, teacher: Tensor, fov_mask: Tensor | None, background: float = 0.05,
                           occupancy_k: float = 3.0) -> Tensor:
    """student (B,T,C,H,W), teacher (B,T,C,h,w) (any float dtype; h = H // K if stored pooled), fov_mask
    (H,W) or (B,H,W) bool/float or None (all visible) -> (B,) weighted relative squared error, mean over T."""
    B, T, C, H, W = student.shape
    if teacher.shape[:3] != (B, T, C):
        raise ValueError(f"teacher bev_feat {tuple(teacher.shape)} does not match the student's "
                         f"{tuple(student.shape)} in (B, T, C)")
    h, w = teacher.shape[-2:]
    s = pool_to_grid(student.flatten(0, 1), (h, w))                            # (BT, C, h, w)
    t = teacher.flatten(0, 1).to(s.dtype)
    if fov_mask is None:
        fov = s.new_ones(B, H, W)
    else:
        if fov_mask.shape[-2:] != (H, W):
            raise ValueError(f"fov_mask {tuple(fov_mask.shape)} is not on the student grid {(H, W)}")
        fov = fov_mask.to(s.device, s.dtype).expand(B, H, W)
    fov = pool_to_grid(fov[:, None], (h, w), "fov_mask")[:, 0]                 # fraction visible per cell
    fov = fov.repeat_interleave(T, 0)                                          # (BT, h, w)
    wts = occupancy_weights(t, fov, background, occupancy_k)
    den = wts.sum((1, 2))                                                      # (BT,)

    def rms(x: Tensor) -> Tensor:  # weighted RMS over the cells of each frame -> (BT, 1, 1, 1)
        ms = (wts * (x ** 2).mean(1)).sum((1, 2)) / (den + 1e-12)
        return ms.clamp_min(1e-12).sqrt().view(-1, 1, 1, 1)

    # both maps scaled to unit weighted RMS: the teacher's activations and the student's BN/ReLU features
    # live on unrelated scales (measured: a relative error of ~2600 at initialisation without this)
    err = ((s / (rms(s) + 1e-6) - t / rms(t)) ** 2).mean(1)
    rel = (wts * err).sum((1, 2)) / (den + 1e-12)
    return torch.where(den > 0, rel, torch.zeros_like(rel)).view(B, T).mean(1)


def _masked_mean(per_sample: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    return (per_sample * mask).sum() / n.clamp(min=1)


def kd_losses(student_actions: Tensor, student_aux: dict[str, Tensor], teacher: dict[str, Tensor],
              has_kd: Tensor, normalize_actions: Callable[[Tensor], Tensor], weights: KDWeights,
              fov_mask: Tensor | None = None, sample_weight: Tensor | None = None) -> dict[str, Tensor]:
    """All KD terms for a batch.

    student_actions (B,T,A) physical units; student_aux: the student's ``return_aux`` dict
    (``bev_vec_seq`` (B,T,D), ``gru_out`` (B,T,H), ``bev_feat_seq`` (B,T,C,H,W)); teacher: memorybank
    targets ``actions`` (B,T,A) physical, ``bev_vec`` (B,T,D), ``gru_out`` (B,T,H), optional ``bev_feat``
    (B,T,C,h,w), optional ``depth`` (B,T,Ncam,h,w) uint8 bins (student: ``depth_seq``) — rows of samples without targets may hold anything (zeros, NaN), they are ignored;
    has_kd (B,) bool; normalize_actions: the student's ``normalize_actions`` (same stats for both sides);
    fov_mask (H,W) or (B,H,W) for the dense term; sample_weight (B,) or None: each KD sample's terms are
    multiplied by its weight (e.g. the confidence of a camera/LiDAR pair by timestamp,
    ``e2r.workflow.pairing``) and still divided by the count of KD samples, so a batch of weak pairs pulls
    less than one of exact pairs (None: weight 1, the same numbers bit for bit).

    Returns ``{"kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat", "kd_depth"`` (unweighted, each
    averaged over the KD samples), ``"kd_total"`` (weighted sum), ``"kd_samples"`` (count, float tensor)``}``; all terms are 0
    when no sample has targets.
    """
    B = student_actions.shape[0]
    mask = has_kd.to(student_actions.device, torch.bool).reshape(-1)
    if mask.numel() != B:
        raise ValueError(f"has_kd has {mask.numel()} entries for a batch of {B}")
    n = mask.sum().to(student_actions.dtype)
    m = mask.to(student_actions.dtype)
    if sample_weight is not None:
        w = sample_weight.to(student_actions.device, student_actions.dtype).reshape(-1)
        if w.numel() != B:
            raise ValueError(f"sample_weight has {w.numel()} entries for a batch of {B}")
        m = m * w

    def target(name: str, like: Tensor) -> Tensor:
        if name not in teacher:
            raise ValueError(f"KD needs teacher target {name!r} (memorybank array); got {sorted(teacher)}")
        t = teacher[name].to(like.device, like.dtype)
        if t.shape[:2] != like.shape[:2] or (name != "bev_feat" and t.shape != like.shape):
            raise ValueError(f"teacher {name} {tuple(t.shape)} does not match the student's {tuple(like.shape)}")
        keep = mask.view(-1, *([1] * (t.dim() - 1)))
        return torch.where(keep, torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(t))

    zero = student_actions.new_zeros(())
    out: dict[str, Tensor] = {}
    if weights.action > 0:
        w = action_weights(weights.steer_weight, weights.speed_weight, like=student_actions)
        t_norm = normalize_actions(target("actions", student_actions))
        out["kd_action"] = _masked_mean(kd_action_per_sample(normalize_actions(student_actions), t_norm, w), m, n)
    if weights.bev_vec > 0:
        s = student_aux["bev_vec_seq"]
        out["kd_bev_vec"] = _masked_mean(kd_bev_vec_per_sample(s, target("bev_vec", s)), m, n)
    if weights.temporal > 0:
        s = student_aux["gru_out"]
        out["kd_temporal"] = _masked_mean(kd_temporal_per_sample(s, target("gru_out", s)), m, n)
    if weights.bev_feat > 0:
        s = student_aux["bev_feat_seq"]
        per = kd_bev_feat_per_sample(s, target("bev_feat", s), fov_mask, weights.bev_feat_background,
                                     weights.occupancy_k)
        out["kd_bev_feat"] = _masked_mean(per, m, n)
    if weights.depth > 0:
        s = student_aux.get("depth_seq")
        if s is None:
            raise ValueError("KD of depth needs a Lift-Splat student (its depth distribution, aux depth_seq)")
        if "depth" not in teacher:
            raise ValueError(f"KD of depth needs the stored depth targets (memorybank array 'depth'); got "
                             f"{sorted(teacher)}")
        t = teacher["depth"].to(s.device)
        if t.shape != (*s.shape[:3], *s.shape[4:]):
            raise ValueError(f"depth targets {tuple(t.shape)} do not match the student's depth {tuple(s.shape)}")
        per = depth_cross_entropy(s.flatten(1, 2), t.flatten(1, 2))
        out["kd_depth"] = _masked_mean(torch.where(mask, per, torch.zeros_like(per)), m, n)
    for k in TERMS:
        out.setdefault(f"kd_{k}", zero)
    out["kd_total"] = sum((getattr(weights, k) * out[f"kd_{k}"] for k in TERMS), zero)
    out["kd_samples"] = n.detach()
    return out


class FovMasks:
    """Per-sample camera FOV masks on the student's (= teacher's) BEV grid, cached per calibration.

    ``masks(intrinsics (B,Ncam,3,3), cam2ego (B,Ncam,4,4))`` -> float (B, H_bev, W_bev) in {0, 1}; a cell is
    visible when it projects into an image of the rig at a depth up to ``cfg.depth_bins[1]`` (the lift's
    farthest depth)."""

    def __init__(self, cfg: StudentConfig, cache_size: int = 64) -> None:
        self.cfg, self.cache_size = cfg, cache_size
        self._cache: dict[bytes, Tensor] = {}

    def __call__(self, intrinsics: Tensor, cam2ego: Tensor) -> Tensor:
        out = []
        for K, T in zip(intrinsics, cam2ego):
            key = K.detach().cpu().numpy().tobytes() + T.detach().cpu().numpy().tobytes()
            mask = self._cache.get(key)
            if mask is None:
                mask = camera_fov_mask(K, T, tuple(self.cfg.image_size), self.cfg.bev_grid,
                                       max_depth=float(self.cfg.depth_bins[1])).float()
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = mask
            out.append(mask.to(intrinsics.device))
        return torch.stack(out)


def _bc_loss(pred: Tensor, batch: dict[str, Any], normalize_actions: Any, action_w: Tensor,
             smooth_weight: float) -> Tensor:
    """The BC term of :func:`student_losses`: expert labels where the window has them, the teacher's actions
    for the windows of recorded drives (``expert_label`` False), nothing where neither exists."""
    labelled = batch.get("expert_label")
    if labelled is None or bool(labelled.all()):
        return action_loss(normalize_actions(pred), normalize_actions(batch["actions"]), action_w, smooth_weight)
    labelled = labelled.to(pred.device, torch.bool)
    teacher = batch["teacher"].get("actions")
    if teacher is None:
        use, target = labelled, batch["actions"]
    else:
        use = labelled | batch["has_kd"].to(torch.bool)
        target = torch.where(labelled[:, None, None], batch["actions"], teacher.to(batch["actions"].dtype))
    if not bool(use.any()):
        return pred.sum() * 0.0
    return action_loss(normalize_actions(pred[use]), normalize_actions(target[use]), action_w, smooth_weight)


def student_losses(net: torch.nn.Module, normalize_actions: Any, batch: dict[str, Any], action_w: Tensor,
                   kd: KDWeights, fov_masks: FovMasks | None = None, flipped: Tensor | None = None,
                   smooth_weight: float = 0.0,
                   after_forward: Callable[[dict[str, Any], dict[str, Tensor]], None] | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """BC + KD loss of one batch (already on the model's device, already flipped where ``flipped``).
    ``after_forward(batch, aux)``: called with the student's forward outputs before the KD terms are taken,
    e.g. to fill targets retrieved by the student's own bev_vec (``retrieval_kd.retrieve_for_student``).

    BC: ``e2r.losses.action_loss`` on normalised actions (weights ``action_w`` (A,)) over every sample whose
    actions are expert labels; a window of a recorded drive (``batch["expert_label"]`` False) takes the
    teacher's actions as its targets instead, and is left out of BC when it has no teacher row. KD:
    ``e2r.kd.kd_losses`` over the samples with ``has_kd`` (action and dense bev_feat terms; bev_vec and
    temporal terms only for samples that were not flipped), each sample's terms weighted by
    ``batch["kd_weight"]`` (B,) when the batch has it (the timestamp pair's confidence). Returns ``(loss, parts)`` with parts ``bc``,
    ``kd_action``, ``kd_bev_vec``, ``kd_temporal``, ``kd_bev_feat``, ``kd_depth``, ``kd_total``, ``kd_samples``,
    ``bc_only_samples`` (detached scalars)."""
    pred, aux = net(batch["images"], batch["intrinsics"], batch["cam2ego"], batch["speed"], batch["steering"],
                    return_aux=True)
    if after_forward is not None:
        after_forward(batch, aux)
    has_kd = batch["has_kd"]
    bc = _bc_loss(pred, batch, normalize_actions, action_w, smooth_weight)
    flipped = torch.zeros_like(has_kd) if flipped is None else flipped.to(has_kd.device)
    parts = {"bc": bc.detach()}
    total = bc
    any_kd = bool(has_kd.any()) and sum(getattr(kd, k) for k in TERMS) > 0
    fov = fov_masks(batch["intrinsics"], batch["cam2ego"]) if (any_kd and kd.bev_feat > 0 and fov_masks) else None
    names = tuple(f"kd_{k}" for k in TERMS)
    if any_kd:
        weight = batch.get("kd_weight")       # (B,) pair confidence (1 without timestamp pairing)
        mirror_safe = kd_losses(pred, aux, batch["teacher"], has_kd, normalize_actions,
                                replace(kd, bev_vec=0.0, temporal=0.0), fov, weight)
        embed = kd_losses(pred, aux, batch["teacher"], has_kd & ~flipped, normalize_actions,
                          replace(kd, action=0.0, bev_feat=0.0, depth=0.0), fov, weight)
        total = total + mirror_safe["kd_total"] + embed["kd_total"]
        for n in names:
            parts[n] = (mirror_safe[n] + embed[n]).detach()
        parts["kd_total"] = (mirror_safe["kd_total"] + embed["kd_total"]).detach()
    else:
        for n in names + ("kd_total",):
            parts[n] = bc.new_zeros(())
    n_kd = has_kd.sum()
    parts["kd_samples"] = n_kd.detach().float()
    parts["bc_only_samples"] = (has_kd.numel() - n_kd).detach().float()
    return total, parts


def hflip_sample(images: Tensor, intrinsics: Tensor, cam2ego: Tensor, steering: Tensor, actions: Tensor,
                 bev_grid: dict, teacher_bev_feat: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Mirror one sample left-right (ego y -> -y) so that its targets stay valid.

    images (..., 3, H, W) flipped along W; intrinsics (..., 3, 3): ``cx -> W - 1 - cx``; cam2ego (..., 4, 4):
    ``S_y @ cam2ego @ S_x`` (the mirrored rig sees the mirrored world); steering (...,) and actions'
    wheel_angle column negated (speed kept); teacher_bev_feat (..., C, h, w) flipped along h (rows index y),
    which needs a grid symmetric about y = 0. Returns the same tuple, flipped.

    The teacher's ``bev_vec`` and ``gru_out`` are NOT mirror-equivariant (no known map from a stored
    embedding to the mirrored scene's): drop the bev_vec/temporal KD terms for flipped samples (or do not
    flip KD samples); action and dense bev_feat KD stay valid.
    """
    y_max = bev_grid["y_min"] + bev_grid["H"] * bev_grid["dy"]
    if abs(y_max + bev_grid["y_min"]) > 1e-6 * max(1.0, abs(y_max)):
        raise ValueError(f"horizontal flip needs a BEV grid symmetric about y = 0, got y in "
                         f"[{bev_grid['y_min']}, {y_max})")
    W = images.shape[-1]
    K = intrinsics.clone()
    K[..., 0, 2] = (W - 1) - intrinsics[..., 0, 2]
    K[..., 0, 1] = -intrinsics[..., 0, 1]
    s_y = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=cam2ego.dtype, device=cam2ego.device))
    s_x = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=cam2ego.dtype, device=cam2ego.device))
    flip_a = torch.tensor([-1.0, 1.0], dtype=actions.dtype, device=actions.device)
    feat = None if teacher_bev_feat is None else teacher_bev_feat.flip(-2)
    return images.flip(-1), K, s_y @ cam2ego @ s_x, -steering, actions * flip_a, feat


def hflip_lidar(points: list[Tensor], steering: Tensor, actions: Tensor, flip: Tensor, seq_len: int
                ) -> tuple[list[Tensor], Tensor, Tensor]:
    """Mirror the chosen windows of a LiDAR batch left-right (ego y -> -y), as :func:`hflip_sample` does for
    camera windows: points B*T tensors (N, >=2) b-major (frame ``b * seq_len + t``) with column 1 (y) negated
    for flipped windows; steering (B, T) and actions' wheel_angle column (B, T, 2) negated; flip (B,) bool.
    Returns new tensors (the inputs are not modified)."""
    if len(points) != flip.shape[0] * seq_len:
        raise ValueError(f"{len(points)} point clouds for {flip.shape[0]} windows of {seq_len} frames")
    out = []
    for i, p in enumerate(points):
        if bool(flip[i // seq_len]):
            p = p.clone()
            p[:, 1] = -p[:, 1]
        out.append(p)
    sign = 1.0 - 2.0 * flip.to(steering.dtype)                     # (B,) -1 where flipped
    flip_a = torch.stack([sign, torch.ones_like(sign)], dim=-1)     # (B, 2)
    return out, steering * sign[:, None], actions * flip_a[:, None, :].to(actions.dtype)
