"""The KD study's report from its finished units (``e2r.workflow.study``): one CSV row per (unit, test track)
and pooled, a mean +- std table over seeds per (camera budget, variant), the issue's goals checked as they
came out, and a plot: held-out error and closed-loop success/progress vs camera budget, BC vs KD.

    rows = study_rows(read_results("runs/study"))       # flat rows: the CSV
    table = summary_table(rows)                          # (budget, variant) -> mean/std/n per metric
    print(format_summary(table)); print(format_goals(goals(table, results)))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from e2r.metrics import write_metrics_csv

__all__ = ["METRICS", "study_rows", "summary_table", "format_summary", "goals", "format_goals", "plot_study",
           "epochs_to_reach", "write_report"]

#: per row: offline weighted MSE and per-action MSE on the held-out tracks; closed-loop success and progress
METRICS = ("overall_weighted_mse", "steering_mse", "speed_mse", "success", "progress", "collisions")


def _closed_loop_by_segment(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """segment -> mean success / progress / collisions over the runs (starts) of the unit's policy."""
    runs = [r for r in result.get("closed_loop", []) if r["row"] == "run" and r["policy"] == result["name"]]
    out: dict[str, dict[str, float]] = {}
    for seg in dict.fromkeys(r["segment"] for r in runs):
        rs = [r for r in runs if r["segment"] == seg]
        out[seg] = {k: float(np.mean([float(r[k]) for r in rs])) for k in ("success", "progress", "collisions")}
    return out


def study_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows: per student unit and the teacher, one row per test track and one ``ALL`` row (pooled:
    offline over every window, closed loop over every run)."""
    units = list(results["units"])
    if results.get("teacher"):
        units.append({**results["teacher"], "budget": 0, "variant": "teacher", "seed": -1})
    rows = []
    for u in units:
        loop = _closed_loop_by_segment(u)
        base = {"unit": u["name"], "variant": u["variant"], "budget": u["budget"], "seed": u["seed"]}
        for seg, m in sorted(u["per_segment"].items()):
            rows.append({**base, "track": seg, **{k: m[k] for k in METRICS[:3]},
                         **loop.get(seg, {k: math.nan for k in METRICS[3:]})})
        pooled = {k: float(np.mean([v[k] for v in loop.values()])) if loop else math.nan for k in METRICS[3:]}
        rows.append({**base, "track": "ALL", **{k: u["test"][k] for k in METRICS[:3]}, **pooled})
    teacher = results.get("teacher")
    if teacher:     # the expert (closed loop only) and "repeat the steering, keep the speed" (offline pooled)
        for name, policy, offline in (("expert", "expert", None),
                                      ("repeat", "constant", teacher["baselines"].get("baseline_prev_steering"))):
            loop = _closed_loop_by_segment({**teacher, "name": policy})
            base = {"unit": name, "variant": name, "budget": 0, "seed": -1}
            nan = {k: math.nan for k in METRICS[:3]}
            rows += [{**base, "track": seg, **nan, **m} for seg, m in sorted(loop.items())]
            rows.append({**base, "track": "ALL", **({k: offline[k] for k in METRICS[:3]} if offline else nan),
                         **{k: float(np.mean([m[k] for m in loop.values()])) if loop else math.nan
                            for k in METRICS[3:]}})
    return rows


def summary_table(rows: Sequence[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """``(budget, variant) -> {metric: (mean, std over seeds, n seeds), "track_std": {metric: mean over seeds
    of the spread across tracks}}`` from the pooled (``ALL``) rows."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    keys = dict.fromkeys((r["budget"], r["variant"]) for r in rows)
    for key in keys:
        pooled = [r for r in rows if (r["budget"], r["variant"]) == key and r["track"] == "ALL"]
        tracks = [r for r in rows if (r["budget"], r["variant"]) == key and r["track"] != "ALL"]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in pooled],
                                 "per_seed": [float(r["overall_weighted_mse"]) for r in pooled]}
        for m in METRICS:
            v = np.array([r[m] for r in pooled], dtype=float)
            entry[m] = (float(np.mean(v)), float(np.std(v)), len(v))
        spread = {}
        for m in METRICS:
            per_seed = [np.std([r[m] for r in tracks if r["seed"] == s]) for s in dict.fromkeys(r["seed"] for r in tracks)]
            spread[m] = float(np.mean(per_seed)) if per_seed else math.nan
        entry["track_std"] = spread
        out[key] = entry
    return dict(sorted(out.items()))


def _pm(cell: tuple[float, float, int], fmt: str) -> str:
    mean, std, n = cell
    return "nan" if math.isnan(mean) else f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_summary(table: dict[tuple[int, str], dict[str, Any]]) -> str:
    """Markdown table: one row per (budget, variant), mean ± std over seeds, each seed's value (in seed
    order of the runs), the across-track spread."""
    lines = ["| camera tracks | variant | seeds | offline weighted MSE | per seed | ± across tracks | steering MSE | "
             "speed MSE | closed-loop success | progress |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (budget, variant), e in table.items():
        per_seed = ", ".join(f"{v:.4f}" for v in e["per_seed"]) if budget else "-"
        where = budget if budget else ("LiDAR" if variant == "teacher" else "-")
        lines.append(f"| {where} | {variant} | {e['overall_weighted_mse'][2]} | "
                     f"{_pm(e['overall_weighted_mse'], '{:.4f}')} | {per_seed} | "
                     f"{e['track_std']['overall_weighted_mse']:.4f} | "
                     f"{_pm(e['steering_mse'], '{:.4f}')} | {_pm(e['speed_mse'], '{:.3f}')} | "
                     f"{_pm(e['success'], '{:.2f}')} | {_pm(e['progress'], '{:.3f}')} |")
    return "\n".join(lines)


def epochs_to_reach(curve: Sequence[float], target: float) -> float:
    """The first epoch (1-based) whose value is <= ``target``; NaN if none."""
    for i, v in enumerate(curve, 1):
        if v <= target:
            return float(i)
    return math.nan


def goals(table: dict[tuple[int, str], dict[str, Any]], results: dict[str, Any], kd: str = "kd"
          ) -> list[dict[str, Any]]:
    """The issue's goals as measured for the KD variant ``kd`` against BC: name, value, target, met."""
    budgets = sorted({b for b, v in table if v == "bc" and (b, kd) in table})
    out: list[dict[str, Any]] = []
    if not budgets:
        return out
    small = budgets[0]
    bc, kd_row = table[(small, "bc")], table[(small, kd)]
    ratio = kd_row["overall_weighted_mse"][0] / bc["overall_weighted_mse"][0]
    by_name = {u["name"]: u for u in results["units"]}
    pairs = [by_name[f"{kd}-b{small}-s{s}"]["test"]["overall_weighted_mse"] /
             by_name[f"bc-b{small}-s{s}"]["test"]["overall_weighted_mse"]
             for s in sorted({u["seed"] for u in results["units"]})
             if f"{kd}-b{small}-s{s}" in by_name and f"bc-b{small}-s{s}" in by_name]
    out.append({"goal": f"KD ({kd})/BC offline MSE at {small} camera track(s)",
                "value": f"{ratio:.3f} (ratio of the means; per seed {', '.join(f'{p:.3f}' for p in pairs)})",
                "target": "<= 0.8", "met": ratio <= 0.8})
    teacher = table.get((0, "teacher"))
    success = lambda b, v: table[(b, v)]["success"][0]  # noqa: E731
    if not math.isnan(success(small, kd)):
        lapped = [b for b in budgets if success(b, "bc") > 0]
        out.append({"goal": f"KD ({kd}) success >= BC's + 15 points at every budget where BC completes a lap",
                    "value": ", ".join(f"{b} track(s): KD {success(b, kd):.2f} vs BC {success(b, 'bc'):.2f}"
                                       for b in budgets) + ("" if lapped else " (BC completes no lap)"),
                    "target": "KD >= BC + 0.15", "met": all(success(b, kd) >= success(b, "bc") + 0.15
                                                              for b in lapped)})
        doubled = [b for b in budgets if 2 * b in budgets]
        if doubled:
            out.append({"goal": f"KD ({kd}) with b camera tracks drives as well as BC with 2b",
                        "value": ", ".join(f"KD {b} {success(b, kd):.2f} vs BC {2 * b} {success(2 * b, 'bc'):.2f} "
                                           f"(progress {table[(b, kd)]['progress'][0]:.3f} vs "
                                           f"{table[(2 * b, 'bc')]['progress'][0]:.3f})" for b in doubled),
                        "target": "KD success >= BC's at every b", "met": all(success(b, kd) >= success(2 * b, "bc")
                                                                             for b in doubled)})
        ts = teacher["success"][0] if teacher else math.nan
        cells = [(b, v) for b, v in table if v.startswith("kd") and not math.isnan(success(b, v))]
        best = max(cells, key=lambda k: (success(*k), table[k]["progress"][0]))
        top = success(*best)
        out.append({"goal": "the best KD student drives: >= 50 % success and >= 80 % of the teacher's",
                    "value": f"{best[1]} at {best[0]} track(s) {top:.2f}, teacher {ts:.2f}",
                    "target": ">= 0.5 and >= 0.8 x teacher", "met": bool(top >= 0.5 and top >= 0.8 * ts)})
    students = {k: e for k, e in table.items() if k[1] not in ("teacher", "expert", "repeat")}
    if teacher and students and not math.isnan(teacher["progress"][0]):
        best = max(students, key=lambda k: (students[k]["success"][0], students[k]["progress"][0]))
        bs_, bp = students[best]["success"][0], students[best]["progress"][0]
        ts, tp = teacher["success"][0], teacher["progress"][0]
        out.append({"goal": "the LiDAR teacher drives better than every camera student (closed loop)",
                    "value": f"teacher success {ts:.2f} progress {tp:.3f}; best student {best[1]} at {best[0]} "
                             f"track(s): success {bs_:.2f} progress {bp:.3f}",
                    "target": "teacher > best student", "met": bool((ts, tp) > (bs_, bp))})
    fractions = []
    for u in results["units"]:
        if u["variant"] != kd:
            continue
        twin = by_name.get(f"bc-b{u['budget']}-s{u['seed']}")
        if twin:
            fractions.append(epochs_to_reach(u["valid_losses"], twin["valid_losses"][-1]) / len(twin["valid_losses"]))
    if fractions:
        reached = [f for f in fractions if not math.isnan(f)]
        value = (f"{len(reached)}/{len(fractions)} pairs reach it; median fraction "
                 f"{np.median(reached):.2f}" if reached else f"0/{len(fractions)} pairs reach it")
        out.append({"goal": f"KD ({kd}) reaches BC's final validation loss within 50% of the epochs", "value": value,
                    "target": "<= 0.5 for every pair", "met": len(reached) == len(fractions) and max(reached) <= 0.5})
    return out


def format_goals(rows: list[dict[str, Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"- {'MET' if g['met'] else 'MISSED'}: {g['goal']}: {fmt(g['value'])} (goal {g['target']})"
                     for g in rows)


def plot_study(path: str | Path, table: dict[tuple[int, str], dict[str, Any]]) -> Path:
    """PNG: held-out weighted MSE (left) and closed-loop success / progress (right) vs camera budget, one
    line per variant with ± std over seeds; the teacher as a dashed line."""
    import matplotlib            # optional heavy import, only for the picture
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    variants = list(dict.fromkeys(v for b, v in table if b > 0))      # budget 0: teacher and baselines
    for ax, metric, label in zip(axes, ("overall_weighted_mse", "success", "progress"),
                                 ("held-out weighted MSE (lower is better)", "closed-loop success rate",
                                  "closed-loop lap progress")):
        for v in variants:
            pts = sorted((b, e[metric]) for (b, vv), e in table.items() if vv == v)
            xs = [b for b, _ in pts]
            ax.errorbar(xs, [c[0] for _, c in pts], yerr=[c[1] for _, c in pts], marker="o", capsize=3, label=v,
                        linestyle="-" if len(xs) > 1 else "none")
        for name, style, line in (("teacher", "--", "LiDAR teacher"), ("expert", ":", "expert"),
                                  ("repeat", "-.", "repeat the command")):
            if (0, name) in table and not math.isnan(table[(0, name)][metric][0]):
                ax.axhline(table[(0, name)][metric][0], color="k", linestyle=style, label=line, alpha=0.7)
        ax.set_xlabel("camera training tracks")
        ax.set_title(label, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str | Path, results: dict[str, Any], kd: str = "kd", plot: bool = True) -> dict[str, Any]:
    """``study.csv``, ``study.md`` (table + the goals of the KD variant ``kd``) and ``study.png`` in ``out``;
    returns paths and goals."""
    out = Path(out)
    rows = study_rows(results)
    if not rows:
        raise ValueError(f"{out}: no finished study unit to report")
    csv_path = write_metrics_csv(out / "study.csv", rows)
    table = summary_table(rows)
    met = goals(table, results, kd)
    text = format_summary(table) + "\n\n" + format_goals(met) + "\n"
    (out / "study.md").write_text(text)
    png = plot_study(out / "study.png", table) if plot else None
    return {"csv_path": str(csv_path), "md_path": str(out / "study.md"), "plot_path": str(png) if png else None,
            "table": table, "goals": met, "text": text}
