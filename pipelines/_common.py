"""What the training and evaluation pipelines share: their ``main`` bodies (parse the flags into the run
config, error handling, the final summary). The flags themselves are the fields of the run configs
(``e2r.workflow.configs``), declared once there with their help texts."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TypeVar

import torch

from e2r.cli_config import config_from_namespace, parse_config
from e2r.errors import E2RError
from e2r.metrics import metrics_table
from e2r.workflow.evaluate import print_per_look
from stores import StoreError

__all__ = ["training_main", "eval_main", "print_training_summary"]

C = TypeVar("C")


def training_main(name: str, parser: argparse.ArgumentParser, config_cls: type[C], train: Callable[[C], dict[str, Any]],
                  argv: list[str] | None, summary_extra: Callable[[dict[str, Any]], str] = lambda last: "") -> int:
    """Parse ``argv`` into ``config_cls``, run ``train``; print ``<name>: error: ...`` (exit 1) on bad input,
    else the ``done:`` summary (``summary_extra(last history entry)`` inserted before the paths); return 0."""
    try:
        result = train(parse_config(config_cls, parser, argv))
    except (E2RError, StoreError, ValueError, FloatingPointError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print_training_summary(result, summary_extra)
    return 0


def print_training_summary(result: dict[str, Any], summary_extra: Callable[[dict[str, Any]], str] = lambda last: ""
                           ) -> None:
    """The ``done:`` line of a training run (``summary_extra(last history entry)`` before the paths)."""
    h = result["history"]
    last = h[-1] if h else {}
    print(f"done: {len(h)} epochs, last train {last.get('train_loss', float('nan')):.4f}, "
          f"last valid {last.get('valid_loss', float('nan')):.4f}, best {result['best_metric']:.4f}; "
          f"{summary_extra(last)}best model: {result['save_path']}, last state: {result['checkpoint_path']}")


def eval_main(name: str, parser: argparse.ArgumentParser, config_cls: type[C], evaluate: Callable[[C], dict[str, Any]],
              argv: list[str] | None, report_extra: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Parse ``argv`` into ``config_cls``, run ``evaluate`` without gradients; print ``<name>: error: ...``
    (exit 1) on bad input, else the metrics table, the per-look table (synthetic worlds), ``report_extra(result)``
    and the written files; return 0."""
    args = parser.parse_args(argv)
    try:
        cfg = config_from_namespace(config_cls, args)
        with torch.no_grad():
            out = evaluate(cfg)
    except (E2RError, StoreError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.split}: {out['num_windows']} windows, overall = weighted MSE with weights {cfg.overall_weights}")
    print(metrics_table(out["results"]))
    print_per_look(out)
    if report_extra is not None:
        report_extra(out)
    for what in ("csv_path", "plot_path"):
        if out[what]:
            print(f"wrote {out[what]}")
    return 0
