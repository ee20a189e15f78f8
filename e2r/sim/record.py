"""Closed-loop drives recorded as data: every car of a run written as a segment in the dataset layout.

    recorder = DriveRecorder("data/synth", "round_01", world, policy_name="mixed", info={"round": 1})
    runs = run_closed_loop(policy, world, starts, cfg, recorder=recorder)     # segments appear at the end

A recorded segment is what a real car with both sensors logs while a policy drives it (layout of
``e2r.sim.world``, checked by ``pipelines.check_dataset``)::

    <root>/<split>/<segment>_cNN/meta/data.csv       timestamp, lidar_filepath, image_filepath, velocity,
                                                      wheel_angle, speed_command, x, y, yaw, control,
                                                      expert_wheel_angle, expert_speed_command
                                                      [student_wheel_angle, student_speed_command,
                                                       teacher_wheel_angle, teacher_speed_command]
    <root>/<split>/<segment>_cNN/meta/recorded.json  who drove, from where, how the run ended
    <root>/<split>/<segment>_cNN/lidar/000123.bin    float32 (N, 4), the frames the policy saw
    <root>/<split>/<segment>_cNN/camera/000123.png   RGB at the world's camera size, the frames the policy saw
    <root>/<split>/<segment>_cNN/camera/calib.json

``velocity`` is the speed measured at the step, ``wheel_angle`` / ``speed_command`` the commands *executed*
at the step (whoever gave them: ``control``), x, y, yaw the pose at the step. These are not expert labels
(unless the expert drove: ``"expert_labels": true``): a recorded segment is marked by ``meta/recorded.json``
(:func:`is_recorded`), and training takes the teacher's actions as its targets. ``expert_wheel_angle`` /
``expert_speed_command`` are what the simulator's expert would have commanded in the same state: only the
oracle baseline reads them, after :func:`label_by_expert` names them as the labels in ``recorded.json``
(``"label_columns"``); the KD path never does. When student and teacher share the car (mixed control), the
``student_*`` / ``teacher_*`` columns hold what each would have commanded at the step (their disagreement:
``SegmentTable.disagreement``, which on-policy training may use to choose the windows it keeps).

Crash safety: each car's segment is written into ``<root>/.tmp-<split>-<segment>`` and renamed into place
when its run is complete (a crashed run leaves no half segment; its temporary folders are removed by the
next recording of the same segment); an existing segment of the same name is refused.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from e2r.atomic import write_text_atomic
from e2r.data.layout import RECORDED_RELPATH
from e2r.sim.policies import ExpertPolicy, Observation
from e2r.sim.world import CSV_COLUMNS, calib_dict, begin_segment, finish_segment

__all__ = ["DriveRecorder", "RECORD_COLUMNS", "PROPOSAL_COLUMNS", "RECORDED_JSON", "EXPERT_LABEL_COLUMNS", "is_recorded", "read_recorded",
           "label_by_expert"]

#: data.csv columns of a recorded segment (the dataset's, then who drove and the expert's would-be command)
RECORD_COLUMNS = CSV_COLUMNS + ("control", "expert_wheel_angle", "expert_speed_command")
#: ... then, for a mixed drive, what the student and the teacher would each have commanded
PROPOSAL_COLUMNS = ("student_wheel_angle", "student_speed_command", "teacher_wheel_angle", "teacher_speed_command")
RECORDED_JSON = RECORDED_RELPATH
#: the oracle's labels: what the simulator's expert would have commanded in each recorded state
EXPERT_LABEL_COLUMNS = {"wheel_angle": "expert_wheel_angle", "speed_command": "expert_speed_command"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_recorded(segment_dir: str | Path) -> bool:
    """Whether a segment folder holds a recorded drive (its commands are not expert labels)."""
    return (Path(segment_dir) / RECORDED_JSON).is_file()


def read_recorded(segment_dir: str | Path) -> dict[str, Any]:
    """The ``meta/recorded.json`` of a recorded segment (ValueError naming the file when unreadable)."""
    path = Path(segment_dir) / RECORDED_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable recording description ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


class DriveRecorder:
    """Writes every car of one :func:`e2r.sim.closed_loop.run_closed_loop` call as a segment of ``split``
    under ``root`` (module docstring); ``info``: extra JSON-able facts for each ``recorded.json`` (round,
    mixing probability, ...); ``expert_drives``: the simulator's expert drives every step, so the executed
    commands are expert labels (``"expert_labels": true``: more expert data, as a control). ``segments``: the
    segment names written, after the run."""

    def __init__(self, root: str | Path, split: str, world: Any, policy_name: str,
                 info: Optional[dict[str, Any]] = None, expert_drives: bool = False) -> None:
        for what, name in (("split", split), ("policy name", policy_name)):
            if not _NAME.match(name):
                raise ValueError(f"recording {what} {name!r}: use letters, digits, '_', '-', '.' (max 64)")
        self.root, self.split, self.world, self.policy_name = Path(root), split, world, policy_name
        self.info = dict(info or {})
        self.expert_drives = bool(expert_drives)
        self.expert = ExpertPolicy("expert")
        self.segments: list[str] = []
        self._cars: list[dict[str, Any]] = []
        self._proposals: Optional[bool] = None     # whether the run's policy proposes (student, teacher) commands

    def begin(self, start_indices: Sequence[int], seq_len: int) -> None:
        """Open one temporary segment folder per car (car k starts at centre-line sample ``start_indices[k]``)."""
        world = self.world
        self.expert.reset(world.track, world.config, len(start_indices), seq_len)
        calib = json.dumps(calib_dict(world.config), indent=1) + "\n"
        self._cars = []
        for k, start in enumerate(start_indices):
            name = f"{world.segment}_c{k:02d}"
            final, tmp = begin_segment(self.root, self.split, name)
            (tmp / "lidar").mkdir()
            (tmp / "camera").mkdir()
            (tmp / "camera" / "calib.json").write_text(calib)
            self._cars.append({"name": name, "final": final, "tmp": tmp, "start": int(start),
                               "rows": []})
        self._proposals = None

    def step(self, obs: Observation, images: Sequence[np.ndarray], points: Sequence[np.ndarray],
             steer: np.ndarray, speed: np.ndarray, control: Optional[Sequence[str]],
             proposals: Optional[tuple[np.ndarray, np.ndarray]] = None) -> None:
        """One step of the observed cars: their full-size camera frames (H, W, 3) uint8 and LiDAR frames
        (N, 4) float32 as the policy saw them, the executed commands (B,), who gave them (B,) or None (the
        policy itself), and for a mixed policy ``(student, teacher)`` (B, 2) each: what each would have
        commanded (``MixedPolicy.proposals``; given at every step of a run or at none)."""
        if self._proposals is None:
            self._proposals = proposals is not None
        if self._proposals != (proposals is not None):
            raise ValueError("DriveRecorder.step: proposals must be given at every step of a run or at none")
        rate = float(self.world.rate_hz)
        e_steer, e_speed = self.expert.act(obs)
        s = obs.state
        for b, car in enumerate(obs.cars.tolist()):
            rec = self._cars[car]
            stamp = f"{obs.t:06d}"
            np.asarray(points[b], dtype="<f4").tofile(rec["tmp"] / "lidar" / f"{stamp}.bin")
            Image.fromarray(images[b]).save(rec["tmp"] / "camera" / f"{stamp}.png", format="PNG", compress_level=1)
            who = self.policy_name if control is None else str(control[b])
            rec["rows"].append(f"{obs.t / rate:.3f},lidar/{stamp}.bin,camera/{stamp}.png,{s.v[b]:.4f},"
                               f"{steer[b]:.4f},{speed[b]:.4f},{s.x[b]:.4f},{s.y[b]:.4f},{s.yaw[b]:.6f},{who},"
                               f"{e_steer[b]:.4f},{e_speed[b]:.4f}"
                               + ("".join(f",{v:.4f}" for v in (*proposals[0][b], *proposals[1][b]))
                                  if proposals is not None else ""))

    def finish(self, runs: Sequence[Any]) -> list[str]:
        """Write each car's data.csv and recorded.json (``runs``: the cars' RunResults, in order) and move the
        segments into place; returns their names."""
        for rec, run in zip(self._cars, runs):
            doc = {"kind": "closed-loop drive", "policy": self.policy_name, "split": self.split,
                   "source_split": self.world.split, "source_segment": self.world.segment,
                   "track_fingerprint": self.world.track.fingerprint(), "start_index": rec["start"],
                   "steps": int(run.steps), "end": run.end, "laps": int(run.laps), "progress": float(run.progress),
                   "expert_labels": self.expert_drives,
                   "labels": ("the expert drove: wheel_angle and speed_command are its commands" if self.expert_drives
                              else "wheel_angle and speed_command are the executed commands, not expert labels; "
                                   "expert_* columns are the simulator's expert in the same state (oracle baseline only)"),
                   **self.info}
            (rec["tmp"] / RECORDED_JSON).write_text(json.dumps(doc, indent=1) + "\n")
            header = ",".join(RECORD_COLUMNS + (PROPOSAL_COLUMNS if self._proposals else ()))
            finish_segment(rec["tmp"], rec["final"], [header] + rec["rows"])
            self.segments.append(rec["name"])
        return list(self.segments)


def label_by_expert(root: str | Path, split: str) -> list[str]:
    """The oracle baseline (simulator only): mark every recorded segment of ``root/split`` as labelled by the
    simulator's expert, its ``expert_*`` columns the action labels (``"label_columns"`` and ``"expert_labels":
    true`` in ``recorded.json``, replaced atomically) -> the segments marked. ValueError naming a segment that
    is not a recording."""
    folder = Path(root) / split
    marked = []
    for segment in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        doc = read_recorded(segment)
        doc.update({"expert_labels": True, "label_columns": dict(EXPERT_LABEL_COLUMNS),
                    "labels": "oracle: the simulator's expert labels every recorded state (expert_* columns); "
                              "wheel_angle and speed_command are the executed commands"})
        write_text_atomic(segment / RECORDED_JSON, json.dumps(doc, indent=1) + "\n")
        marked.append(segment.name)
    return marked
