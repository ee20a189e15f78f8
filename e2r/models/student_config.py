"""``StudentConfig``: the camera student's presets (tiny/full), derived from a ``TeacherConfig`` so that the
BEV grid, bev_feat channels, bev_dim D, GRU hidden H and action_dim match the teacher (direct KD)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from e2r.models.config import PlainConfig, TeacherConfig, check_bev_grid

__all__ = ["StudentConfig", "PRESET_BEV_POOL_GRID", "NORMS", "INPUT_NORMS"]

#: the presets' bev_vec readout (docs/STUDENT.md); the field's own default 1 keeps older checkpoints' global mean
PRESET_BEV_POOL_GRID = 4

#: ``norm``: the image and BEV CNNs' normalisation; ``input_norm``: the image input's (e2r/models/student.py)
NORMS = ("batch", "group")
INPUT_NORMS = ("fixed", "per_image")

#: fields copied from the teacher; KD needs them equal
TEACHER_FIELDS = ("bev_x_min", "bev_y_min", "bev_z_min", "bev_z_max", "bev_dx", "bev_dy", "bev_H", "bev_W",
                  "teacher_bev_channels", "bev_dim", "gru_hidden", "action_dim")


@dataclass
class StudentConfig(PlainConfig):
    """Defaults are the ``full`` preset against the full teacher; build with :meth:`preset_named` or
    :meth:`from_teacher`. ``image_size`` is (W, H) of the network input (what the dataset resizes to)."""
    preset: str = "full"
    # --- from the teacher (BEV grid of bev_feat: H indexes y from y_min, W indexes x from x_min) ---
    bev_x_min: float = 0.0
    bev_y_min: float = -39.68
    bev_z_min: float = -3.0
    bev_z_max: float = 1.0
    bev_dx: float = 0.32
    bev_dy: float = 0.32
    bev_H: int = 248
    bev_W: int = 216
    teacher_bev_channels: int = 384
    bev_dim: int = 256        # D
    gru_hidden: int = 640     # H
    action_dim: int = 2       # A
    speed_emb: int = 32
    steer_emb: int = 32
    head_hidden: int = 320
    residual_actions: bool | str = True
    # --- student's own ---
    image_size: tuple[int, ...] = (256, 128)
    image_channels: tuple[int, ...] = (32, 64, 128, 256)   # stem + stages (each stage /2) -> stride 2^(n-1)
    image_blocks: tuple[int, ...] = (1, 2, 2, 2)
    image_feat_channels: int = 128                         # input of the view transform
    view_transform: str = "lss"                            # "lss" | "identity"
    splat_pool: str = "sum"                                # LiftSplat: "sum" | "mean" over a cell's frustum points
    depth_bins: tuple[float, ...] = (2.0, 50.0, 1.0)       # d_min, d_max, step (m)
    lift_channels: int = 64                                # C of the splatted BEV map
    bev_channels: tuple[int, ...] = (64, 128, 256)         # BEV CNN stages (first at stride 1, then /2 each)
    bev_blocks: tuple[int, ...] = (1, 2, 2)
    bev_out_channels: int = 128                            # before the adapter to teacher_bev_channels
    bev_pool_grid: int = 1        # bev_vec reads a k x k average pool of bev_feat (1: the global mean)
    norm: str = "batch"           # image and BEV CNNs: "batch" (BatchNorm over B x T x Ncam frames) | "group"
    input_norm: str = "fixed"     # image input: "fixed" ((x - 0.45) / 0.225) | "per_image" (own mean and std)

    @property
    def bev_grid(self) -> dict[str, Any]:
        """Same dict as ``TeacherConfig.bev_grid``."""
        return {"x_min": self.bev_x_min, "y_min": self.bev_y_min, "z_min": self.bev_z_min,
                "z_max": self.bev_z_max, "dx": self.bev_dx, "dy": self.bev_dy, "H": self.bev_H, "W": self.bev_W}

    @property
    def bev_feat_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the student's teacher-aligned bev_feat (= the teacher's)."""
        return self.teacher_bev_channels, self.bev_H, self.bev_W

    @property
    def feat_hw(self) -> tuple[int, int]:
        """(h, w) of the image feature map that the view transform lifts (and LiDAR depth supervises): the
        network input (W, H) halved, rounding up (3x3 stride-2 convolutions), once per stride-2 layer before
        the last stage (``ImageEncoder``: stride ``2^(len(image_channels) - 1)``)."""
        w, h = (int(v) for v in self.image_size)
        for _ in range(len(self.image_channels) - 1):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    @classmethod
    def from_teacher(cls, teacher: TeacherConfig, preset: str = "full", **overrides: Any) -> "StudentConfig":
        """The student preset ``preset`` ("tiny" | "full") on ``teacher``'s grid and sizes; ``overrides``
        change student-own fields (teacher-derived ones cannot be overridden)."""
        bad = set(overrides) & set(TEACHER_FIELDS)
        if bad:
            raise ValueError(f"{sorted(bad)} come from the teacher config and cannot be overridden")
        g = teacher.bev_grid
        derived = dict(bev_x_min=g["x_min"], bev_y_min=g["y_min"], bev_z_min=g["z_min"], bev_z_max=g["z_max"],
                       bev_dx=g["dx"], bev_dy=g["dy"], bev_H=g["H"], bev_W=g["W"],
                       teacher_bev_channels=teacher.bev_channels, bev_dim=teacher.bev_dim,
                       gru_hidden=teacher.gru_hidden, action_dim=teacher.action_dim, speed_emb=teacher.speed_emb,
                       steer_emb=teacher.steer_emb, head_hidden=teacher.head_hidden,
                       residual_actions=teacher.residual_actions)
        if preset == "full":
            own: dict[str, Any] = dict(bev_pool_grid=PRESET_BEV_POOL_GRID)
        elif preset == "tiny":
            own = dict(image_size=(128, 64), image_channels=(16, 32, 64), image_blocks=(1, 1, 1),
                       image_feat_channels=32, depth_bins=(2.0, 50.0, 2.0), lift_channels=16,
                       bev_channels=(16, 32), bev_blocks=(1, 1), bev_out_channels=teacher.bev_channels,
                       bev_pool_grid=PRESET_BEV_POOL_GRID)
        else:
            raise ValueError(f"unknown student preset {preset!r}; choose 'tiny' or 'full'")
        cfg = cls(preset=preset, **derived, **{**own, **overrides})
        cfg.validate()
        return cfg

    @classmethod
    def preset_named(cls, name: str, teacher: TeacherConfig | None = None) -> "StudentConfig":
        """Preset ``name`` against ``teacher`` (default: the teacher preset of the same name)."""
        return cls.from_teacher(teacher if teacher is not None else TeacherConfig.preset_named(name), name)

    def check_matches_teacher(self, teacher: TeacherConfig) -> None:
        """Raise ValueError naming every field where this student's grid/sizes differ from ``teacher``'s."""
        ref = StudentConfig.from_teacher(teacher, self.preset if self.preset in ("tiny", "full") else "full")
        diffs = [f"{k}: student {getattr(self, k)!r} vs teacher {getattr(ref, k)!r}" for k in TEACHER_FIELDS
                 if getattr(self, k) != getattr(ref, k)]
        if diffs:
            raise ValueError("student config does not match the teacher's BEV grid/sizes: " + "; ".join(diffs))

    def validate(self) -> None:
        check_bev_grid(f"bev_W {self.bev_W} and bev_H {self.bev_H}", self.bev_W, self.bev_H,
                       self.lift_channels + self.teacher_bev_channels)
        if self.view_transform not in ("lss", "identity"):
            raise ValueError(f"view_transform must be 'lss' or 'identity', got {self.view_transform!r}")
        if self.splat_pool not in ("sum", "mean"):
            raise ValueError(f"splat_pool must be 'sum' or 'mean', got {self.splat_pool!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if len(self.image_channels) < 2 or len(self.image_channels) != len(self.image_blocks):
            raise ValueError(f"image_channels {self.image_channels} and image_blocks {self.image_blocks} need "
                             f"equal lengths >= 2")
        if len(self.bev_channels) < 1 or len(self.bev_channels) != len(self.bev_blocks):
            raise ValueError(f"bev_channels {self.bev_channels} and bev_blocks {self.bev_blocks} need equal lengths")
        if not 1 <= self.bev_pool_grid <= min(self.bev_H, self.bev_W):
            raise ValueError(f"bev_pool_grid must be 1..{min(self.bev_H, self.bev_W)} (the BEV grid), "
                             f"got {self.bev_pool_grid}")
        if len(self.depth_bins) != 3 or len(self.image_size) != 2:
            raise ValueError(f"depth_bins needs (d_min, d_max, step) and image_size (W, H); got "
                             f"{self.depth_bins}, {self.image_size}")
