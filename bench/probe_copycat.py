"""Does a policy steer from what it sees, or copy its previous-steering input? (the copycat check)

    python bench/probe_copycat.py --data_root data/synthetic-default --teacher_ckpt runs/demo-*/teacher.pt

Runs the teacher on windows of a split twice: with the recorded previous command as its steering input, and
with that input zeroed. A copycat predicts ~0 steering with the input zeroed whatever the scene; a policy that
drives from its sensors still predicts close to the true steering. Prints both beside the truth and the MSE.
"""
from __future__ import annotations

import argparse

import torch

from e2r.data.datasets import LidarSequenceDataset, collate_lidar
from e2r.models.teacher import load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True)
    p.add_argument("--teacher_ckpt", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--windows", type=int, default=16, help="windows spread evenly over the split (default 16)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_teacher(args.teacher_ckpt)
    ds = LidarSequenceDataset(args.data_root, args.split, 5, 1)
    step = max(1, len(ds) // args.windows)
    b = collate_lidar([ds[i] for i in range(0, len(ds), step)][:args.windows])
    with torch.no_grad():
        given = model(b["points"], b["speed"], b["steering"])[:, -1, 0]
        zeroed = model(b["points"], b["speed"], torch.zeros_like(b["steering"]))[:, -1, 0]
    truth = b["actions"][:, -1, 0]
    print(f"true steering (deg)          {truth.numpy().round(2)}")
    print(f"pred, previous command given {given.numpy().round(2)}  MSE {float(((given - truth) ** 2).mean()):.4f}")
    print(f"pred, previous command zero  {zeroed.numpy().round(2)}  MSE {float(((zeroed - truth) ** 2).mean()):.4f}")


if __name__ == "__main__":
    main()
