"""Checkpoint files: weights-only save/load, file hashes, resume and weights-only init, released models.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (loadable with
``torch.load(path, weights_only=True)``; nothing is ever unpickled). Keys written by :func:`save_checkpoint`:

``format`` ("e2r-checkpoint"), ``format_version`` (1), ``kind`` ("teacher" | "student" ...), ``config``
(the model config's ``to_dict()``), ``model`` (state dict), and for resumable training ``optimizer``,
``scheduler``, ``epoch`` (last finished epoch, 0-based), ``best_metric``, ``rng_state``, ``history``,
``train_args``. A compact checkpoint (:func:`compact_checkpoint`: the released models, ``e2r/released/``) keeps
only what drives and describes the model, its large weight tensors as float16 (``weights_dtype``
"float16"); :func:`load_checkpoint` gives them back as float32.

Every function taking a checkpoint path also takes ``released:NAME`` (:func:`checkpoint_path`, through
``e2r.released.resolve``: name checked, regular file, sha256 verified against the manifest).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from e2r.atomic import file_sha256, replacing
from e2r.errors import CheckpointError
from e2r.released import is_released, resolve

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "file_sha256",
           "load_init_weights", "load_model", "check_fits", "checkpoint_path", "compact_checkpoint",
           "COMPACT_MIN_NUMEL", "COMPACT_KEEP"]

M = TypeVar("M", bound=nn.Module)

FORMAT = "e2r-checkpoint"
FORMAT_VERSION = 1
#: compact checkpoints store floating tensors of at least this many values as float16 (the conv and linear
#: weights); smaller ones (biases, BatchNorm statistics, action normalisation) stay float32
COMPACT_MIN_NUMEL = 1024
#: what a compact checkpoint keeps besides format, kind, config and model: small facts about its training
COMPACT_KEEP = ("epoch", "best_metric", "history", "valid_losses", "train_args")


def checkpoint_path(spec: str | os.PathLike) -> Path:
    """The file a checkpoint argument names: ``released:NAME`` -> the released model's checked file
    (``e2r.released.resolve``: CheckpointError for an unknown name or a changed file), anything else as a path."""
    return resolve(spec) if is_released(spec) else Path(spec)


def save_checkpoint(path: str | Path, state: dict[str, Any], kind: str) -> Path:
    """Write ``state`` (must contain ``model`` and ``config``) atomically to ``path``; returns the path."""
    for required in ("model", "config"):
        if required not in state:
            raise CheckpointError(f"{path}: refusing to save a checkpoint without {required!r}")
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as f:   # a file object: the archive's inner folder is named
        # "archive", not after the temporary file, so the same state always gives the same bytes
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **state}, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its layout.

    ``path`` may be ``released:NAME`` (:func:`checkpoint_path`). A compact checkpoint's float16 weights come
    back as float32. Raises CheckpointError for a missing file, a file torch cannot read, one that holds pickled
    Python objects (refused, never unpickled), or a dict without ``model``/``config`` (or of another ``kind``).
    """
    path = checkpoint_path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, expected a checkpoint file (e.g. "
                              f"{path / 'teacher_best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is not a regular file (a FIFO, device or socket), expected "
                                                      "a checkpoint file" if path.exists() else "does not exist"))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} contains pickled Python objects that a weights-only load refuses "
            f"(only tensors, numbers, strings, lists and dicts are allowed); it was not written by "
            f"e2r.checkpoints.save_checkpoint. Detail: {str(e).splitlines()[0]}") from None
    except Exception as e:  # zip/format errors come as RuntimeError, EOFError, ...
        raise CheckpointError(f"checkpoint {path} is malformed or truncated and cannot be read by torch.load: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict written by "
                              f"e2r.checkpoints.save_checkpoint")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} lacks a 'model' state dict or a 'config' dict")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: model entries {bad[:5]} are not tensors")
    stored = ckpt.get("weights_dtype", "float32")
    if stored not in ("float32", "float16"):
        raise CheckpointError(f"checkpoint {path}: weights_dtype {stored!r}; expected float32 or float16")
    if stored == "float16":
        ckpt["model"] = {k: v.float() if v.dtype == torch.float16 else v for k, v in ckpt["model"].items()}
    for name, value in ckpt["model"].items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} holds {count} non-finite value(s) (NaN/inf) "
                                  f"of {value.numel()}; the run that wrote it diverged or the file is damaged")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


MIN_SIZE_BOUND = 1 << 16   # a config integer may always be this large (pillar counts, ...), weights or not


def _config_ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _config_ints(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _config_ints(v)]
    return []


def check_fits(path: str | Path, ckpt: dict[str, Any], build: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Refuse, before anything is allocated, a checkpoint whose config declares sizes its weights do not have
    (a 2 KB file saying ``gru_hidden: 12000`` would otherwise allocate gigabytes while building the model).

    Every integer of the config is bounded by the number of weight values the checkpoint holds (at least
    :data:`MIN_SIZE_BOUND`); then the model is built on the ``meta`` device (shapes only, no memory) and its
    state's names and shapes must equal the checkpoint's, and its other buffers stay within the same bound."""
    state: dict[str, torch.Tensor] = ckpt["model"]
    held = sum(int(t.numel()) for t in state.values())
    bound = max(held, MIN_SIZE_BOUND)
    for key, value in ckpt["config"].items():
        if any(i > bound for i in _config_ints(value)):
            raise CheckpointError(f"checkpoint {path}: config {key}={value!r} declares a size larger than the "
                                  f"{held} weight values the checkpoint holds could fit")
    try:
        with torch.device("meta"):
            skeleton = build(dict(ckpt["config"]))
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: its config does not build a model: {type(e).__name__}: {e}") from e
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {path}: its weights do not match the model its config describes: "
                              f"shape mismatch {wrong[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}")
    other = sum(int(b.numel()) for name, b in skeleton.named_buffers() if name not in expected)
    if other > bound:
        raise CheckpointError(f"checkpoint {path}: its config implies {other} buffer values beyond its weights "
                              f"(more than {bound}); refusing to allocate them")


def load_init_weights(model: nn.Module, path: str | Path, skip_output_layer: bool, output_layer_prefix: str,
                      keep_prefixes: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint's weights only (no optimizer/epoch), for transfer learning.

    Entries under ``output_layer_prefix`` are skipped when ``skip_output_layer`` is set (e.g. a head with
    another shape); otherwise every entry must match in name and shape. Entries starting with one of
    ``keep_prefixes`` keep the model's current values (e.g. this run's normalisation statistics).
    Returns ``{"loaded": [...], "skipped": [...]}``.
    """
    ckpt = load_checkpoint(path)
    source: dict[str, torch.Tensor] = ckpt["model"]
    target = model.state_dict()
    loaded, skipped = [], []
    mismatched, missing = [], []
    for name, value in target.items():
        if name.startswith(keep_prefixes):
            skipped.append(name)
            continue
        if skip_output_layer and name.startswith(output_layer_prefix):
            skipped.append(name)
            continue
        if name not in source:
            missing.append(name)
        elif source[name].shape != value.shape:
            mismatched.append(f"{name}: checkpoint {tuple(source[name].shape)} vs model {tuple(value.shape)}")
        else:
            loaded.append(name)
    if missing or mismatched:
        head_only = all(m.startswith(output_layer_prefix) for m in missing) and \
            all(m.startswith(output_layer_prefix) for m in mismatched)
        hint = " (only the output layer differs: pass --init_skip_output_layer)" if head_only else ""
        raise CheckpointError(f"init checkpoint {path} does not fit the model{hint}: "
                              f"missing {missing[:5]}, shape mismatch {mismatched[:5]}")
    with torch.no_grad():
        for name in loaded:
            target[name].copy_(source[name])
    return {"loaded": loaded, "skipped": skipped}


def load_model(path: str | Path, build: Callable[[dict[str, Any]], M], kind: str,
               device: str | torch.device = "cpu") -> tuple[M, dict[str, Any]]:
    """Build a model from a checkpoint: ``build(config dict)`` makes the architecture, the checkpoint's
    ``model`` state is loaded into it. Returns ``(model in eval mode on device, checkpoint dict)``; raises
    CheckpointError naming the file (and ``kind``, e.g. "teacher") when the weights do not fit the config,
    checked on the ``meta`` device before the model is built (:func:`check_fits`)."""
    ckpt = load_checkpoint(path)
    check_fits(path, ckpt, build)
    try:
        model = build(dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a {kind} checkpoint matching its config: {e}") from e
    return model.to(device).eval(), ckpt


def compact_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the checkpoint ``src`` as a compact one at ``dst``: format, kind, config, the model with its
    floating tensors of at least :data:`COMPACT_MIN_NUMEL` values as float16, and :data:`COMPACT_KEEP`; no
    optimizer, scheduler or RNG state. A float32 value beyond float16's range is refused (CheckpointError)."""
    ckpt = load_checkpoint(src)
    model = {}
    for name, value in ckpt["model"].items():
        if value.dtype == torch.float32 and value.numel() >= COMPACT_MIN_NUMEL:
            if float(value.abs().max()) > float(torch.finfo(torch.float16).max):
                raise CheckpointError(f"checkpoint {src}: tensor {name!r} exceeds float16's range; not compacted")
            value = value.half()
        model[name] = value.contiguous().clone()
    state = {"config": ckpt["config"], "model": model, "weights_dtype": "float16",
             **{k: ckpt[k] for k in COMPACT_KEEP if k in ckpt}}
    return save_checkpoint(dst, state, kind=str(ckpt["kind"]))
