"""e2r-kd: distil a LiDAR racing policy (teacher) into a camera policy (student) through a memorybank.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it: OpenMP threads
(torch's intra-op threads) that wait at a barrier then sleep instead of spinning. It must happen before torch
loads its OpenMP runtime, so the entry points (``pipelines``, ``bench``) import ``e2r`` first. On this
project's shared CPUs spinning waiters burned most of a training step's CPU time: the tiny student's step at
2 threads took ~2000 CPU-ms spinning and ~360 sleeping (docs/PERFORMANCE.md).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
