"""The released models: small checkpoints shipped inside the package, with a manifest saying how each was made
and what it measured (``e2r/released/manifest.json``).

    python -m pipelines.drive --list_released                    # names, what each is, results, how made
    python -m pipelines.drive --data_root D --policy kd=released:student_dagger --policy teacher=released:teacher

``released:NAME`` is accepted wherever a checkpoint path is (``--policy NAME=CKPT``, ``--teacher_ckpt``,
``--student_ckpt``, ``--mix_teacher``, ``--init_path``): :func:`e2r.checkpoints.checkpoint_path` turns it into the
file through :func:`resolve`, which checks the name against the manifest's grammar and entries, refuses anything
that is not a regular file inside this folder (a symlink, a folder, a FIFO) and verifies the file's size and
sha256 against the manifest before anything reads it. The files store their large weight tensors as float16
(``e2r.checkpoints.compact_checkpoint``); :func:`e2r.checkpoints.load_checkpoint` gives them back as float32.

Manifest (``format`` "e2r-released", ``format_version`` 1): ``{"models": {NAME: entry}}``; an entry holds
``file`` (a plain file name in this folder), ``sha256``, ``bytes``, ``kind`` ("teacher" | "student"),
``sensor``, ``description``, ``made_by`` (the commands, commit, world seed, budget, seed, the source file's
sha256 and what the source measured), ``trained_tracks`` and ``valid_tracks`` (fingerprints of the tracks its
training learned from, and of those whose validation loss picked the kept checkpoint: :func:`track_status`
says whether a track is held out for it) and ``results`` (closed-loop drives of the released file itself: one
dict per world/split).
New entries and results are written by ``python -m pipelines.release`` (``e2r.workflow.release``).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

from e2r.atomic import file_sha256
from e2r.errors import CheckpointError

__all__ = ["RELEASED_DIR", "MANIFEST_NAME", "PREFIX", "FORMAT", "FORMAT_VERSION", "NAME_PATTERN", "ENTRY_KEYS",
           "RESULT_KEYS", "is_released", "released_name", "load_manifest", "check_manifest", "resolve",
           "release_entry", "listing", "track_status", "TRACK_STATUS"]

#: the package folder holding the released checkpoints and their manifest
RELEASED_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
PREFIX = "released:"
FORMAT = "e2r-released"
FORMAT_VERSION = 1
#: a released model's name: lower case letters, digits and ``_``, starting with a letter
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FILE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}\.pt")
ENTRY_KEYS = ("file", "sha256", "bytes", "kind", "sensor", "description", "made_by", "trained_tracks", "valid_tracks",
              "results")
RESULT_KEYS = ("label", "world_seed", "split", "tracks", "starts", "laps", "time_limit", "runs", "successes",
               "success", "progress", "collisions", "track_status", "command")
KINDS = ("teacher", "student")
#: a track for a released model: learned from / picked its checkpoint (valid loss) only / neither
TRACK_STATUS = ("trained on", "valid only", "held out")


def is_released(spec: str | os.PathLike) -> bool:
    """Whether a checkpoint argument names a released model (``released:NAME``) rather than a path."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def released_name(spec: str) -> str:
    """NAME of ``released:NAME``; CheckpointError when NAME breaks the grammar (:data:`NAME_PATTERN`)."""
    name = spec[len(PREFIX):] if is_released(spec) else spec
    if not NAME_PATTERN.fullmatch(name):
        raise CheckpointError(f"{spec!r}: a released model's name is lower-case letters, digits and '_' starting "
                              f"with a letter (python -m pipelines.drive --list_released names them)")
    return name


def _fail(where: Path, what: str) -> CheckpointError:
    return CheckpointError(f"released-model manifest {where}: {what}")


def _check_result(where: Path, name: str, i: int, r: Any) -> None:
    if not isinstance(r, dict):
        raise _fail(where, f"{name}: result {i} is not an object")
    missing = [k for k in RESULT_KEYS if k not in r]
    if missing:
        raise _fail(where, f"{name}: result {i} lacks {missing}")
    runs, successes = r["runs"], r["successes"]
    if not (isinstance(runs, int) and isinstance(successes, int) and 0 <= successes <= runs and runs > 0):
        raise _fail(where, f"{name}: result {i}: successes {successes!r} of runs {runs!r} is not a count")
    if not math.isclose(float(r["success"]), successes / runs, abs_tol=1e-9):
        raise _fail(where, f"{name}: result {i}: success {r['success']!r} != {successes}/{runs}")
    if not (isinstance(r["progress"], (int, float)) and math.isfinite(r["progress"]) and r["progress"] >= 0):
        raise _fail(where, f"{name}: result {i}: progress {r['progress']!r} is not a finite laps count >= 0")
    if r["track_status"] not in TRACK_STATUS:
        raise _fail(where, f"{name}: result {i}: track_status {r['track_status']!r} is not one of {TRACK_STATUS}")


def check_manifest(manifest: Any, where: Path = Path(MANIFEST_NAME)) -> dict[str, Any]:
    """The manifest, checked (CheckpointError naming the entry and field at fault): format and version, every
    entry's fields, names and file names by the grammar, sha256 as 64 hex digits, kinds, result counts."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(where, f"format is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(where, f"format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    models = manifest.get("models")
    if not isinstance(models, dict):
        raise _fail(where, "'models' is not an object")
    files: set[str] = set()
    for name, entry in models.items():
        if not NAME_PATTERN.fullmatch(str(name)):
            raise _fail(where, f"model name {name!r} breaks the name grammar {NAME_PATTERN.pattern}")
        if not isinstance(entry, dict):
            raise _fail(where, f"{name}: entry is not an object")
        missing = [k for k in ENTRY_KEYS if k not in entry]
        if missing:
            raise _fail(where, f"{name}: entry lacks {missing}")
        if not (isinstance(entry["file"], str) and _FILE_PATTERN.fullmatch(entry["file"])):
            raise _fail(where, f"{name}: file {entry['file']!r} is not a plain .pt file name of this folder")
        if entry["file"] in files:
            raise _fail(where, f"{name}: file {entry['file']!r} belongs to another entry too")
        files.add(entry["file"])
        if not (isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise _fail(where, f"{name}: sha256 {entry['sha256']!r} is not 64 lower-case hex digits")
        if not (isinstance(entry["bytes"], int) and entry["bytes"] > 0):
            raise _fail(where, f"{name}: bytes {entry['bytes']!r} is not a positive size")
        if entry["kind"] not in KINDS:
            raise _fail(where, f"{name}: kind {entry['kind']!r} is not one of {KINDS}")
        if not isinstance(entry["made_by"], dict) or not isinstance(entry["made_by"].get("command"), str):
            raise _fail(where, f"{name}: made_by has no command")
        for key in ("trained_tracks", "valid_tracks"):
            if not (isinstance(entry[key], list) and all(isinstance(t, str) for t in entry[key])):
                raise _fail(where, f"{name}: {key} is not a list of track fingerprints")
        if not isinstance(entry["results"], list):
            raise _fail(where, f"{name}: results is not a list")
        for i, r in enumerate(entry["results"]):
            _check_result(where, name, i, r)
    return manifest


def load_manifest(root: Optional[Path] = None) -> dict[str, Any]:
    """The checked manifest of ``root`` (default: the package's :data:`RELEASED_DIR`)."""
    path = Path(root or RELEASED_DIR) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(path, f"cannot be read as JSON: {e}") from None
    return check_manifest(manifest, path)


def release_entry(name: str, root: Optional[Path] = None) -> dict[str, Any]:
    """The manifest entry of a released model (CheckpointError naming the released models when unknown)."""
    name = released_name(name)
    models = load_manifest(root)["models"]
    if name not in models:
        raise CheckpointError(f"{PREFIX}{name}: no released model of that name; released: "
                              f"{', '.join(sorted(models)) or 'none'}")
    return models[name]


def resolve(spec: str, root: Optional[Path] = None) -> Path:
    """The checked file of ``released:NAME`` (or a bare NAME): a regular file (not a symlink) inside ``root``
    whose size and sha256 equal the manifest's. CheckpointError otherwise (name, missing, not a regular file,
    changed: the message says which)."""
    base = Path(root or RELEASED_DIR)
    entry = release_entry(spec, base)
    path = base / entry["file"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{spec}: the released file {path} is missing (a broken install?)") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{spec}: {path} is not a regular file (a symlink, folder, FIFO or device); refused")
    if st.st_size != entry["bytes"]:
        raise CheckpointError(f"{spec}: {path} holds {st.st_size} bytes, the manifest says {entry['bytes']}: the "
                              f"file was changed; refused")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{spec}: {path} has sha256 {digest[:16]}..., the manifest says "
                              f"{entry['sha256'][:16]}...: the file was changed; refused")
    return path


def track_status(entry: dict[str, Any], fingerprints: list[str]) -> str:
    """What the tracks (fingerprints) are for a released model (:data:`TRACK_STATUS`): "trained on" when its
    training learned from any of them, "valid only" when one only picked its checkpoint, else "held out"."""
    if set(fingerprints) & set(entry["trained_tracks"]):
        return TRACK_STATUS[0]
    return TRACK_STATUS[1] if set(fingerprints) & set(entry["valid_tracks"]) else TRACK_STATUS[2]


def _result_line(r: dict[str, Any]) -> str:
    return (f"{r['label']} ({r['track_status']}): {r['successes']}/{r['runs']} laps ({r['success']:.0%}), progress "
            f"{r['progress']:.3f}, {r['tracks']} tracks x {r['starts']} starts, {r['time_limit']:g} s")


def listing(root: Optional[Path] = None) -> str:
    """The text of ``python -m pipelines.drive --list_released``: per model its name, kind, what it is, its
    measured results and how it was made."""
    base = Path(root or RELEASED_DIR)
    models = load_manifest(base)["models"]
    lines = [f"released models ({len(models)}, in {base}); drive one with --policy NAME=released:<name>"]
    for name, e in models.items():
        made = e["made_by"]
        lines += ["", f"{PREFIX}{name}  [{e['kind']}, {e['sensor']}, {e['bytes'] / 1e6:.2f} MB]",
                  f"  {e['description']}"]
        facts = [f"{k.replace('_', ' ')} {made[k]}" for k in ("world_seed", "budget", "seed", "commit") if k in made]
        lines.append("  made: " + ", ".join(facts))
        lines.append(f"  by:   {made['command']}")
        if made.get("train_command"):
            lines.append(f"  same training as: {made['train_command']}")
        if made.get("source_result"):
            lines.append(f"  as trained (float32 source): {made['source_result']}")
        lines += [f"  measured {_result_line(r)}" for r in e["results"]] or ["  measured: nothing yet"]
    return "\n".join(lines)
