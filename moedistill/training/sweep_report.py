"""The sweep's comparison: `report.json` (every point's held-out KL to the teacher, perplexity
and top-1 agreement, the best point and its distance from the teacher), a table on stdout and
`sweep.png` (KL against alpha for each temperature, KL against k)."""
from __future__ import annotations

import os
from pathlib import Path

import jax

from moedistill import atomic_io


def write_sweep_report(out: Path, refs: dict, results: list[dict]) -> dict:
  best = min(results, key=lambda r: r["kl"])
  t = refs["teacher"]
  report = {"teacher": t, "zero_shot": refs["zero_shot"], "points": results,
            "best": {"point": best["point"], "kl": best["kl"],
                     "kl_gap_to_teacher": best["kl"] - t["kl"],
                     "ppl_ratio_to_teacher": best["ppl"] / t["ppl"],
                     "top1_agreement": best["top1_agreement"]}}
  if jax.process_index() != 0:
    return report
  out.mkdir(parents=True, exist_ok=True)
  print(format_table(refs, results))
  print(f"best: {best['point']} (KL {best['kl']:.4f} vs teacher {t['kl']:.4f}, "
        f"ppl {best['ppl']:.3f} = {best['ppl'] / t['ppl']:.3f}x the teacher's)")
  atomic_io.write_json(out / "report.json", report)
  plot(out, results)
  return report


def format_table(refs: dict, results: list[dict]) -> str:
  lines = [f"{'held-out':<28} {'ppl':>8} {'KL to teacher':>14} {'top-1 agree':>12}"]
  rows = [("teacher", refs["teacher"]), ("zero-shot student", refs["zero_shot"])]
  rows += [(r["point"], r) for r in results]
  for name, r in rows:
    lines.append(f"{name:<28} {r['ppl']:>8.3f} {r['kl']:>14.4f} {r['top1_agreement']:>12.3f}")
  return "\n".join(lines)


def _series(results, x: str, by: str):
  """{label: sorted [(x, kl)]}: one line per value of `by` (and of the other axes)."""
  out: dict[str, list] = {}
  for r in results:
    if x not in r:
      continue
    label = ", ".join(f"{a}={r[a]}" for a in ("temperature", "alpha", "k", "stage_order")
                      if a in r and a != x) or by
    out.setdefault(label, []).append((r[x], r["kl"]))
  return {k: sorted(v) for k, v in out.items()}


def plot(out: Path, results: list[dict]):
  os.environ.setdefault("MPLCONFIGDIR", str(out / ".matplotlib"))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x, by in ((axes[0], "alpha", "temperature"), (axes[1], "k", "alpha")):
    for label, pts in _series(results, x, by).items():
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel("held-out KL to the teacher")
    if ax.lines:
      ax.legend(fontsize=7)
  axes[0].set_title("KL against alpha, one line per T (and other axes)")
  axes[1].set_title("KL against the number of cached logits k")
  fig.tight_layout()
  fig.savefig(out / "sweep.png", dpi=100)
  plt.close(fig)
