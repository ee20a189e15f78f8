"""What a memorybank holds: the per-row field shapes (`StoreSchema`) and how it was made (`Provenance`).

Per row (one sample key) the store holds, with T = seq_len:

- ``actions  (T, A)``  teacher actions in physical units ``[wheel_angle deg, velocity m/s]``
- ``bev_vec  (T, D)``  teacher BEV embedding
- ``gru_out  (T, H)``  teacher GRU output
- ``bev_feat (T, C, Hb, Wb)`` teacher BEV feature map, only when ``store_bev_feat`` (possibly pooled).
- ``depth    (T, Ncam, h, w)`` uint8 LiDAR depth-bin target per camera feature pixel, only when ``store_depth``
  (``DEPTH_NONE`` = no point lands there; ``depth_grid`` says which feature map and bins; docs/STORE.md).

Both dataclasses round-trip through JSON-able dicts kept in the store's group attributes.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from stores.errors import StoreMismatchError

try:
    CODE_VERSION = importlib.metadata.version("e2r-kd")     # recorded as Provenance.code_version
except importlib.metadata.PackageNotFoundError:
    CODE_VERSION = "unknown"

#: on-disk format version. 2: light fields packed in one array `light` (Zarr back end). 3: a crc32c checksum on
#: every chunk of every array (Zarr: inner chunks, shard indexes, keys, complete; HDF5: fletcher32), light /
#: bev_feat fill value NaN, ``complete`` fill 255 (= no chunk) so a lost chunk is told from "not written".
#: 4: an on-disk key index per split (Zarr: ``keys/index/<split>.idx``, `stores.index_file`). 5: the keys in a Zarr
#: v3 core data type, uint8 (N, W) ASCII NUL padded (Zarr: `stores.zarr_v3.key_array`; before: zarr-python's
#: variable-length ``string`` extension type, which other Zarr implementations cannot open).
SCHEMA_VERSION = 5
INDEXLESS_SCHEMA_VERSIONS = (3,)  # read and written as before, key index built in memory (`stores reindex` upgrades)
INDEXED_SCHEMA_VERSIONS = (4, 5)  # an on-disk key index per split
VLEN_KEY_SCHEMA_VERSIONS = (2, 3, 4)  # Zarr keys in zarr-python's vlen-utf8 strings: read and written as before
#: (`python -m stores convert OLD NEW` rewrites them portable)
LEGACY_SCHEMA_VERSIONS = (2,)   # readable only by `python -m stores convert` (to rewrite them in the current version)
IDENTITY_SCHEMA_VERSION = 5   # every store of this schema_version or later is written with identity tags
LIGHT_FIELDS: tuple[str, ...] = ("actions", "bev_vec", "gru_out")
BEV_FEAT = "bev_feat"
DEPTH = "depth"
ALL_FIELDS: tuple[str, ...] = LIGHT_FIELDS + (BEV_FEAT, DEPTH)
GROUP_FIELDS: tuple[str, ...] = (BEV_FEAT, DEPTH)   # each in its own group, array ``<name>/<name>`` (Zarr, HDF5)
DEPTH_DTYPE = "uint8"                 # the depth field's dtype, whatever the store's ``dtype``
DEPTH_NONE = 255                      # a depth pixel no LiDAR point lands on (e2r.depth.NO_DEPTH)
DEPTH_FILL = 254                      # fill value of ``depth``: never a stored value (bins are < MAX_DEPTH_BINS)
MAX_DEPTH_BINS = 254                  # bins 0 .. 253: one byte beside DEPTH_FILL and DEPTH_NONE
DIM_NAMES: dict[str, tuple[str, ...]] = {
    "actions": ("row", "t", "a"),
    "bev_vec": ("row", "t", "d"),
    "gru_out": ("row", "t", "h"),
    BEV_FEAT: ("row", "t", "c", "y", "x"),
    DEPTH: ("row", "t", "cam", "v", "u"),
}
LIGHT_ARRAY = "light"                  # Zarr: actions|bev_vec|gru_out packed along the last axis
LIGHT_DIM_NAMES: tuple[str, ...] = ("row", "t", "channel")
_DTYPES = ("float32", "float16")


#: the actions of stores written before ``action_semantics`` was recorded
LEGACY_ACTION_SEMANTICS = "steer=wheel_angle[t] deg; speed=velocity[t] m/s (measured)"


@dataclass
class StoreSchema:
    """Shapes and dtype of one memorybank. ``bev_feat_shape`` is (C, H, W) of one frame as stored;
    ``depth_shape`` (Ncam, h, w) the depth targets of one frame, ``depth_grid`` what they are for: ``{"image_size":
    [W, H] of the network input, "depth_bins": [d_min, d_max, step], "n_bins": D}`` (``e2r.depth``)."""

    seq_len: int
    action_dim: int
    bev_dim: int
    gru_hidden: int
    bev_feat_shape: tuple[int, int, int] | None = None
    store_bev_feat: bool = False
    dtype: str = "float32"
    bev_feat_pool: dict[str, Any] | None = None   # e.g. {"kind": "avg", "factor": 4, "source_shape": [C, H, W]}
    action_semantics: str = ""     # what the actions mean (the writer's words); "" = not recorded
    store_depth: bool = False
    depth_shape: tuple[int, int, int] | None = None     # (Ncam, h, w) of one frame's depth targets
    depth_grid: dict[str, Any] | None = None            # {"image_size": [W, H], "depth_bins": [a, b, s], "n_bins": D}

    def __post_init__(self) -> None:
        for name in ("seq_len", "action_dim", "bev_dim", "gru_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"StoreSchema.{name} must be a positive integer, got {v!r}")
            setattr(self, name, int(v))
        if self.dtype not in _DTYPES:
            raise ValueError(f"StoreSchema.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.bev_feat_shape is not None:
            shp = tuple(int(x) for x in self.bev_feat_shape)
            if len(shp) != 3 or min(shp) <= 0:
                raise ValueError(f"StoreSchema.bev_feat_shape must be (C, H, W) of positive ints, got {self.bev_feat_shape!r}")
            self.bev_feat_shape = shp  # type: ignore[assignment]
        if self.store_bev_feat and self.bev_feat_shape is None:
            raise ValueError("StoreSchema.store_bev_feat=True needs bev_feat_shape=(C, H, W)")
        self._check_depth()

    def _check_depth(self) -> None:
        if self.depth_shape is not None:
            shp = tuple(int(x) for x in self.depth_shape)
            if len(shp) != 3 or min(shp) <= 0:
                raise ValueError(f"StoreSchema.depth_shape must be (Ncam, h, w) of positive ints, got {self.depth_shape!r}")
            self.depth_shape = shp  # type: ignore[assignment]
        if not self.store_depth:
            return
        g = self.depth_grid
        if self.depth_shape is None or not isinstance(g, dict):
            raise ValueError("StoreSchema.store_depth=True needs depth_shape=(Ncam, h, w) and depth_grid")
        n = g.get("n_bins")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= MAX_DEPTH_BINS:
            raise ValueError(f"StoreSchema.depth_grid n_bins must be an integer in 1..{MAX_DEPTH_BINS}, got {n!r}")
        if len(g.get("depth_bins") or ()) != 3 or len(g.get("image_size") or ()) != 2:
            raise ValueError(f"StoreSchema.depth_grid needs depth_bins [d_min, d_max, step] and image_size [W, H], "
                             f"got {g!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        """Fields every row of this store carries."""
        return LIGHT_FIELDS + ((BEV_FEAT,) if self.store_bev_feat else ()) + ((DEPTH,) if self.store_depth else ())

    def field_dtype(self, name: str) -> str:
        """The stored dtype of field (or array) ``name``: ``uint8`` for depth, the store's ``dtype`` otherwise."""
        return DEPTH_DTYPE if name == DEPTH else self.dtype

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one row of field ``name`` (without the leading row axis)."""
        T = self.seq_len
        if name == "actions":
            return (T, self.action_dim)
        if name == "bev_vec":
            return (T, self.bev_dim)
        if name == "gru_out":
            return (T, self.gru_hidden)
        if name == LIGHT_ARRAY:
            return (T, self.action_dim + self.bev_dim + self.gru_hidden)
        if name == BEV_FEAT:
            if self.bev_feat_shape is None:
                raise KeyError("this schema has no bev_feat_shape")
            return (T, *self.bev_feat_shape)
        if name == DEPTH:
            if self.depth_shape is None:
                raise KeyError("this schema has no depth_shape")
            return (T, *self.depth_shape)
        raise KeyError(f"unknown field {name!r}; known: {ALL_FIELDS}")

    def light_channels(self) -> dict[str, tuple[int, int]]:
        """``{field: (first, end)}`` channel slice of each light field in the packed ``light`` array
        (N, T, A + D + H): actions ``[0, A)``, bev_vec ``[A, A + D)``, gru_out ``[A + D, A + D + H)``."""
        out, c = {}, 0
        for f in LIGHT_FIELDS:
            w = self.row_shape(f)[-1]
            out[f] = (c, c + w)
            c += w
        return out

    def row_nbytes(self, name: str) -> int:
        return int(np.prod(self.row_shape(name))) * np.dtype(self.field_dtype(name)).itemsize

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bev_feat_shape"] = list(self.bev_feat_shape) if self.bev_feat_shape else None
        d["depth_shape"] = list(self.depth_shape) if self.depth_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSchema":
        """From group attributes; a store written before actions were described has
        :data:`LEGACY_ACTION_SEMANTICS` (its speed action is the measured speed)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("action_semantics", LEGACY_ACTION_SEMANTICS)
        return cls(**values)

    def differences(self, other: "StoreSchema") -> list[str]:
        """Human-readable list of fields that differ, ``"name: store=X, given=Y"``; empty when equal."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: store={a[k]!r}, given={b[k]!r}" for k in a if a[k] != b[k]]


@dataclass
class Provenance:
    """How the store was made. ``teacher_sha256`` is the hex digest of the teacher checkpoint file."""

    teacher_sha256: str
    model_config: dict[str, Any] = field(default_factory=dict)
    dataset_root: str = ""
    code_version: str = ""          # default: the installed e2r-kd version
    lidar2ego: dict[str, Any] = field(default_factory=dict)    # "<split>/<segment>" -> 4x4 extrinsic applied on read

    def __post_init__(self) -> None:
        if not self.code_version:
            self.code_version = CODE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Provenance":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def teacher_differences(self, other: "Provenance") -> list[str]:
        """What makes ``other`` a different teacher: checkpoint hash or model config."""
        out = []
        if self.teacher_sha256 != other.teacher_sha256:
            out.append(f"teacher_sha256: store={self.teacher_sha256!r}, given={other.teacher_sha256!r}")
        if _jsonable(self.model_config) != _jsonable(other.model_config):
            a, b = _jsonable(self.model_config), _jsonable(other.model_config)
            keys = sorted(set(a) | set(b))
            diff = [f"{k}: store={a.get(k)!r}, given={b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
            out.append("model_config differs (" + "; ".join(diff) + ")")
        return out


def _jsonable(x: Any) -> Any:
    """Tuples -> lists recursively, so configs compare equal after a JSON round trip."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_compatible(store_schema: StoreSchema, store_prov: Provenance,
                     schema: StoreSchema, prov: Provenance, path: str) -> None:
    """Raise StoreMismatchError naming every difference between the store's schema/teacher and the given ones."""
    diffs = store_schema.differences(schema) + store_prov.teacher_differences(prov)
    if diffs:
        raise StoreMismatchError(f"memorybank {path} was made with a different schema or teacher: "
                                 + "; ".join(diffs))


def json_attrs(x: Any) -> Any:
    """Make a value JSON-serialisable for group attributes."""
    return _jsonable(x)
