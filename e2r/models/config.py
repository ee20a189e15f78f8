"""Model presets as plain dataclasses: ``tiny`` (seconds on a CPU; tests, demo) and ``full`` (SPEC.md).

The teacher's BEV grid is the reference frame for everything BEV: the student's view transform splats onto
the same cells (``TeacherConfig.bev_grid``), and the memorybank's ``bev_feat`` has the teacher's shape.
Ego frame: x forward, y left, z up (metres).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

#: the largest BEV grid a model config may declare: 2^24 cells (4096 x 4096), 78x the full preset's 432 x 496
#: pillars; at the full preset's 64 pillar channels its pseudo-image alone is 4 GiB per frame. A config beyond
#: it (e.g. a checkpoint whose voxel_size was edited to 1e-4 m) is refused before anything is allocated.
MAX_BEV_CELLS = 1 << 24


def check_bev_grid(what: str, width: int, height: int, channels: int) -> None:
    """ValueError naming ``what`` (the fields at fault) and the memory it would need, when a ``width x height``
    BEV grid of ``channels`` float32 channels has more than :data:`MAX_BEV_CELLS` cells."""
    if width < 1 or height < 1 or width * height > MAX_BEV_CELLS:
        need = 4.0 * channels * max(width, 0) * max(height, 0)
        raise ValueError(f"{what} give a {width} x {height} BEV grid, which would need {need / 2 ** 30:.4g} GiB per "
                         f"frame ({channels} float32 channels); a grid must have 1..{MAX_BEV_CELLS} cells "
                         f"(4096 x 4096)")


class PlainConfig:
    """Round trip of a config dataclass through plain JSON-able dicts (what checkpoints and stores keep)."""

    def validate(self) -> None:
        """Subclasses raise ValueError on inconsistent fields."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        cfg = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
        cfg.validate()
        return cfg


@dataclass
class TeacherConfig(PlainConfig):
    """The LiDAR teacher's sizes; :meth:`validate` (run by ``from_dict``, i.e. on every checkpoint's config)
    refuses a pillar grid that is not finite and positive or larger than :data:`MAX_BEV_CELLS`."""
    preset: str = "full"
    # pillar grid
    point_cloud_range: tuple[float, ...] = (0.0, -39.68, -3.0, 69.12, 39.68, 1.0)  # xmin ymin zmin xmax ymax zmax
    voxel_size: tuple[float, ...] = (0.16, 0.16, 4.0)
    max_points_per_pillar: int = 32
    max_pillars_train: int = 16000
    max_pillars_eval: int = 40000
    num_point_features: int = 4  # x, y, z, intensity (readers always hand the model 4 columns)
    # pillar feature net + 2-D backbone + FPN neck
    pfn_channels: int = 64
    backbone_channels: tuple[int, ...] = (64, 128, 256)
    backbone_layers: tuple[int, ...] = (3, 5, 5)
    backbone_strides: tuple[int, ...] = (2, 2, 2)
    upsample_strides: tuple[int, ...] = (1, 2, 4)
    upsample_channels: tuple[int, ...] = (128, 128, 128)
    # temporal policy
    bev_dim: int = 256          # D
    speed_emb: int = 32
    steer_emb: int = 32
    gru_hidden: int = 640       # H
    head_hidden: int = 320
    action_dim: int = 2         # A: [wheel_angle deg, velocity m/s]
    residual_actions: bool | str = True  # head predicts the change w.r.t. the (steering, speed) inputs (models/policy.py)
    bev_pool_grid: int = 1      # bev_vec reads a k x k average pool of bev_feat (1: the global mean, no layout)

    def validate(self) -> None:
        r, v = self.point_cloud_range, self.voxel_size
        if len(r) != 6 or len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (*r, *v)):
            raise ValueError(f"point_cloud_range needs 6 finite numbers and voxel_size 3, got {r}, {v}")
        if not all(x > 0 for x in v) or not all(r[i + 3] > r[i] for i in range(3)):
            raise ValueError(f"voxel_size must be > 0 and point_cloud_range max > min, got {v}, {r}")
        nx, ny = self.grid_size
        if not isinstance(self.bev_pool_grid, int) or not 1 <= self.bev_pool_grid <= min(nx, ny) // self.bev_stride:
            raise ValueError(f"bev_pool_grid must be an integer 1..{min(nx, ny) // self.bev_stride} (the BEV grid), "
                             f"got {self.bev_pool_grid!r}")
        check_bev_grid(f"point_cloud_range {list(r)} and voxel_size {list(v)}", nx, ny,
                       self.pfn_channels + self.bev_channels)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(nx, ny) pillars along x and y: (432, 496) for the full preset."""
        r, v = self.point_cloud_range, self.voxel_size
        return round((r[3] - r[0]) / v[0]), round((r[4] - r[1]) / v[1])

    @property
    def bev_stride(self) -> int:
        """Stride of bev_feat w.r.t. the pillar grid (2 for the SPEC's backbone/neck)."""
        return self.backbone_strides[0] * self.upsample_strides[0]

    @property
    def bev_channels(self) -> int:
        """C of bev_feat: 384 for the full preset."""
        return sum(self.upsample_channels)

    @property
    def bev_feat_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one frame's bev_feat; H indexes y, W indexes x: (384, 248, 216) at full size."""
        nx, ny = self.grid_size
        s = self.bev_stride
        return self.bev_channels, ny // s, nx // s

    @property
    def bev_grid(self) -> dict[str, Any]:
        """The BEV cells of bev_feat in metres: x_min, y_min, cell sizes, and (H, W)."""
        _, H, W = self.bev_feat_shape
        r, v = self.point_cloud_range, self.voxel_size
        return {"x_min": r[0], "y_min": r[1], "z_min": r[2], "z_max": r[5],
                "dx": v[0] * self.bev_stride, "dy": v[1] * self.bev_stride, "H": H, "W": W}


    @classmethod
    def preset_named(cls, name: str) -> "TeacherConfig":
        if name == "full":
            return cls()
        if name == "tiny":
            return cls(
                preset="tiny",
                point_cloud_range=(0.0, -25.6, -3.0, 51.2, 25.6, 1.0),
                voxel_size=(0.8, 0.8, 4.0),           # 64 x 64 pillars -> bev_feat 32 x 32
                max_points_per_pillar=16, max_pillars_train=4096, max_pillars_eval=4096,
                pfn_channels=16, backbone_channels=(16, 32, 64), backbone_layers=(1, 1, 1),
                upsample_channels=(16, 16, 16), bev_dim=64, speed_emb=16, steer_emb=16,
                gru_hidden=128, head_hidden=64)
        raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'full'")
