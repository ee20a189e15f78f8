"""Making the released models (``e2r/released/``): ``python -m pipelines.release add|measure`` (config
:class:`ReleaseConfig`, one field per flag, ``command`` the sub-command).

    add_release(ReleaseConfig(name="student_dagger", ckpt="runs/dagger/round_05/student.pt",
                              description="...", made_with="python -m pipelines.dagger ...", commit="45ae872"))
    measure_release(ReleaseConfig(command="measure", names=["teacher", "student_dagger"], data_root="runs/w1",
                                  label="fresh world seed 1"))

``add`` writes the checkpoint compactly (``e2r.checkpoints.compact_checkpoint``: float16 weights, no optimizer)
as ``<name>.pt`` and its manifest entry: sha256 and size, what it is, how it was made (the command that made
it, the commit, the equivalent ``train_teacher``/``train_student`` line from its ``train_args``, the world's
seed, the budget, the training seed, the source file's sha256 and what the source measured) and the
fingerprints of the tracks its training learned from (``trained_tracks``) and of the valid tracks that picked
its checkpoint (``valid_tracks``), so a drive can say whether a track is held out for it. ``measure`` drives the
released files themselves (verified by sha256) on a synthetic world's split and records the result under
``label`` in each entry (a result with the same label is replaced), with the command that measured it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from e2r.atomic import file_sha256, write_text_atomic
from e2r.checkpoints import compact_checkpoint, load_checkpoint
from e2r.cli_config import command_line, option
from e2r.errors import ConfigError, check_positive
from e2r.released import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, NAME_PATTERN, RELEASED_DIR, check_manifest,
                          released_name, resolve, track_status)
from e2r.sim.drive import DriveConfig, drive
from e2r.sim.world import MARKER
from e2r.workflow.configs import StudentTrainConfig, TeacherTrainConfig

__all__ = ["COMMANDS", "ReleaseConfig", "add_release", "measure_release", "training_tracks", "read_manifest"]

#: the sub-commands of ``python -m pipelines.release``
COMMANDS = ("add", "measure")
_ADD: dict = {"add": {}}
_MEASURE: dict = {"measure": {}}
#: what a result says about the world driven (its generation, from the world's marker)
_WORLD_KEYS = ("generator_version", "seed", "tracks", "valid_tracks", "test_tracks", "lidar_only_tracks", "frames",
               "appearance", "image_size")
_TRAIN = {"teacher": ("pipelines.train_teacher", TeacherTrainConfig),
          "student": ("pipelines.train_student", StudentTrainConfig)}


@dataclass(kw_only=True)
class ReleaseConfig:
    """``python -m pipelines.release add|measure`` (field names equal the flags)."""

    command: str = "add"            # the sub-command (COMMANDS)
    released_dir: Optional[str] = option(None, help="folder of the released models and manifest.json (default: the "
                                                    "package's e2r/released)")
    # ---- add
    name: Optional[str] = option(None, commands={"add": {"required": True}},
                                 help="the released model's name (lower-case letters, digits, '_')")
    ckpt: Optional[str] = option(None, commands={"add": {"required": True}},
                                 help="the teacher or student checkpoint to release")
    description: str = option("", commands=_ADD, help="what it is, in one line")
    made_with: str = option("", commands=_ADD, help="the command that made the checkpoint")
    commit: str = option("", commands=_ADD, help="the commit that command ran at")
    world: Optional[str] = option(None, commands=_ADD,
                                  help="the synthetic world it trained on (default: its train_args' data_root): its "
                                       "seed and the fingerprints of the tracks it saw")
    budget: Optional[str] = option(None, commands=_ADD, help="what it trained on, in words (default: N camera "
                                                             "tracks for a student, N LiDAR tracks for a teacher)")
    source_result: str = option("", commands=_ADD, help="what the source checkpoint measured, in words")
    replace: bool = option(False, commands=_ADD, help="replace an existing entry of this name (its results go)")
    # ---- measure
    names: list[str] = option(default_factory=list, commands=_MEASURE, help="released models to drive (default: all)")
    data_root: Optional[str] = option(None, commands={"measure": {"required": True}},
                                      help="synthetic world whose split is driven (python -m pipelines.make_dataset)")
    label: Optional[str] = option(None, commands={"measure": {"required": True}},
                                  help="the result's name in the manifest (e.g. 'fresh world seed 1, test')")
    split: str = option("test", commands=_MEASURE, help="split driven (default %(default)s)")
    starts: int = option(2, commands=_MEASURE, help="start points per track (default %(default)s)")
    time_limit: float = option(40.0, commands=_MEASURE, help="simulated seconds per run (default %(default)s)")
    seed: int = option(0, commands=_MEASURE, help="seed of the sensor noise (default %(default)s)")
    csv_path: Optional[str] = option(None, commands=_MEASURE, help="also write the drive's CSV (one row per run)")
    no_progress: bool = option(False, commands=_MEASURE, help="hide the progress bar")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work."""
        if self.command not in COMMANDS:
            raise ConfigError(f"release: unknown command {self.command!r}; expected one of {COMMANDS}")
        if self.command == "add":
            if not (self.name and NAME_PATTERN.fullmatch(self.name)):
                raise ConfigError(f"--name {self.name!r}: lower-case letters, digits and '_', starting with a letter")
            if not (self.made_with and self.description):
                raise ConfigError("--made_with and --description: say how the model was made and what it is")
        else:
            check_positive(self, ("starts",))
            if not self.time_limit > 0:
                raise ConfigError(f"--time_limit must be > 0, got {self.time_limit}")


def _dir(cfg: ReleaseConfig) -> Path:
    return Path(cfg.released_dir) if cfg.released_dir else RELEASED_DIR


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root`` (checked), or a new empty one when the folder has none yet."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "models": {}}
    return check_manifest(json.loads(path.read_text()), path)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    check_manifest(manifest, root / MANIFEST_NAME)
    write_text_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return root / MANIFEST_NAME


def _command(cfg: ReleaseConfig) -> str:
    """The ``python -m pipelines.release <command> ...`` line of ``cfg``."""
    line = command_line("pipelines.release", replace(cfg, command=ReleaseConfig.command))
    return line.replace("python -m pipelines.release", f"python -m pipelines.release {cfg.command}", 1)


def _marker(world: str | Path) -> dict[str, Any]:
    path = Path(world) / MARKER
    if not path.is_file():
        raise ConfigError(f"--world {world}: no {MARKER} (not a synthetic world; pass the world it trained on)")
    return json.loads(path.read_text())


def training_tracks(marker: dict[str, Any], train_args: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Fingerprints of the tracks a training run learned from (its ``train_segments``, or its whole train split;
    recorded on-policy splits are drives on those tracks) and of its valid split's tracks (which picked the kept
    checkpoint), as ``(trained, valid)``."""
    train_split, valid_split = train_args.get("train_split", "train"), train_args.get("valid_split", "valid")
    chosen = train_args.get("train_segments")
    trained = {g["track_fingerprint"] for g in marker["segments"]
               if g["split"] == train_split and (not chosen or g["segment"] in chosen)}
    valid = {g["track_fingerprint"] for g in marker["segments"] if g["split"] == valid_split}
    return sorted(trained), sorted(valid - trained)


def _budget(kind: str, marker: dict[str, Any], train_args: dict[str, Any]) -> str:
    chosen = train_args.get("train_segments")
    train = [g for g in marker["segments"] if g["split"] == train_args.get("train_split", "train")
             and (not chosen or g["segment"] in chosen)]
    text = (f"{sum(1 for g in train if g.get('camera', True))} camera tracks" if kind == "student"
            else f"{len(train)} LiDAR tracks")
    extra = train_args.get("extra_train_splits") or []
    return text + (f" + {len(extra)} recorded on-policy splits ({', '.join(extra)})" if extra else "")


def _train_command(kind: str, train_args: dict[str, Any]) -> str:
    module, cls = _TRAIN[kind]
    names = {f.name for f in fields(cls)}
    return command_line(module, cls(**{k: v for k, v in train_args.items() if k in names}))


def add_release(cfg: ReleaseConfig) -> dict[str, Any]:
    """Write ``cfg.ckpt`` compactly as ``<name>.pt`` into the released folder and its manifest entry (module
    docstring); returns the entry. ConfigError when the name exists (without ``replace``) or the world is
    not the synthetic world the checkpoint trained on."""
    cfg.check()
    root = _dir(cfg)
    manifest = read_manifest(root)
    name = released_name(str(cfg.name))
    if name in manifest["models"] and not cfg.replace:
        raise ConfigError(f"--name {name}: already released (pass --replace to make it again)")
    source = load_checkpoint(str(cfg.ckpt))
    kind, train_args = str(source["kind"]), dict(source.get("train_args") or {})
    if kind not in _TRAIN:
        raise ConfigError(f"--ckpt {cfg.ckpt}: a {kind!r} checkpoint; only teachers and students are released")
    marker = _marker(cfg.world or train_args.get("data_root", ""))
    dst = compact_checkpoint(str(cfg.ckpt), root / f"{name}.pt")
    made = {"command": cfg.made_with, "train_command": _train_command(kind, train_args), "commit": cfg.commit,
            "world_seed": int(marker["config"]["seed"]), "budget": cfg.budget or _budget(kind, marker, train_args),
            "seed": int(train_args.get("seed", 0)), "source_sha256": file_sha256(str(cfg.ckpt)),
            "source_result": cfg.source_result, "release_command": _command(cfg)}
    trained, valid = training_tracks(marker, train_args)
    entry = {"file": dst.name, "sha256": file_sha256(dst), "bytes": dst.stat().st_size, "kind": kind,
             "sensor": "lidar" if kind == "teacher" else "camera", "description": cfg.description,
             "made_by": made, "trained_tracks": trained, "valid_tracks": valid, "results": []}
    manifest["models"][name] = entry
    _write_manifest(root, manifest)
    return entry


def measure_release(cfg: ReleaseConfig) -> dict[str, dict[str, Any]]:
    """Drive the released files (sha256 verified) on ``cfg.data_root``'s ``cfg.split`` and record each model's
    result under ``cfg.label`` in the manifest; returns {name: result}."""
    cfg.check()
    root = _dir(cfg)
    manifest = read_manifest(root)
    names = [released_name(n) for n in cfg.names] or list(manifest["models"])
    unknown = [n for n in names if n not in manifest["models"]]
    if unknown or not names:
        raise ConfigError(f"--names {unknown or names}: not released; released: {sorted(manifest['models'])}")
    drive_cfg = DriveConfig(data_root=str(cfg.data_root), split=cfg.split, starts=cfg.starts, laps=1,
                            time_limit=cfg.time_limit, seed=cfg.seed, csv_path=cfg.csv_path,
                            no_progress=cfg.no_progress,
                            policy=[f"{n}={resolve(n, root)}" for n in names])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = drive(drive_cfg)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    marker = _marker(str(cfg.data_root))
    fingerprints = sorted({w.track.fingerprint() for w in out["worlds"].values()})
    summary = {r["policy"]: r for r in out["summary"]}
    line = _command(cfg)
    world = {k: marker["config"][k] for k in _WORLD_KEYS if k in marker["config"]}
    results = {}
    for n in names:
        runs = [r for r in out["runs"] if r.policy == n]
        s = summary[n]
        res = {"label": str(cfg.label), "world_seed": int(marker["config"]["seed"]), "world": world, "split": cfg.split,
               "tracks": len(fingerprints), "starts": cfg.starts, "laps": 1, "time_limit": cfg.time_limit,
               "runs": len(runs), "successes": sum(1 for r in runs if r.success), "success": float(s["success"]),
               "progress": round(float(s["progress"]), 4), "collisions": int(s["collisions"]),
               "lap_time_s": round(float(s["lap_time"]), 2) if math.isfinite(s["lap_time"]) else None,
               "track_status": track_status(manifest["models"][n], fingerprints), "track_fingerprints": fingerprints,
               "command": line, "measured": time.strftime("%Y-%m-%d"),
               "cpu_s_all_names": round(cpu, 1), "wall_s_all_names": round(wall, 1)}
        entry = manifest["models"][n]
        entry["results"] = [r for r in entry["results"] if r["label"] != res["label"]] + [res]
        results[n] = res
    _write_manifest(root, manifest)
    return results
