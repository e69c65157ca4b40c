"""The opposing-signals detector judged on null controls and planted cases, over seeds (issue 14).

Each case (``tests/_support/signals_cases.py``) trains a model with plain SGD through gradwatch's engine with
``SignalsConfig(every=10)`` (a burst of 5 one-step loss changes every 10 steps, the whole training set as the
probe). Nulls are runs in which nothing is an opposing signal: memorising classifiers (binary and 5 classes),
10% label noise, 1:9 class imbalance, the real pretrained MiniLM fine-tuned on real ChatterBot lines, and a
GPT-2-shaped language model; any alarm there is a false alarm. Planted cases give two groups of different
labels a strong shared feature: tabular (also trained until it memorises), scikit-learn's digits with a
bright patch, and MiniLM with a rare token. For each case the table gives, over the seeds:

- ``alarm``: the share of runs that raised the alarm at least once (nulls: the false-alarm rate);
- ``steps``: the mean share of logged probe steps at which the alarm was on;
- ``purity``: the smallest, over seeds, of the strongest pair's purity (the share of each side that is its
  planted group, best matching);
- ``P / R``: the smallest precision and recall, against the planted examples, of the examples the alarm
  names (on a side of an alarming pair at some step), and ``outliers P / R`` the same
  for the movement outliers (in at least half the alarmed rows), which also hold the followers;
- ``probe / step``: the cost of one evaluation of the probe set against one training step (forward,
  backward and the SGD update, without gradwatch); a burst costs 6 of those every 10 steps.

    python benchmarks/signals.py                       # every case, 5 seeds, 300 steps (~25 min on 2 cores)
    python benchmarks/signals.py --cases memorise,planted_tabular --seeds 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "_support"))
from signals_cases import NULLS, PLANTED, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(NULLS + PLANTED), help="comma-separated case names")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.seeds} seeds, {args.steps} steps, "
          f"{args.threads} thread(s)")
    print(f"{'case':<26} {'kind':<8} {'alarm':>6} {'steps':>6} {'purity':>7} {'P / R':>11} {'outliers P / R':>15} "
          f"{'probe / step':>13} {'s/run':>6}")
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        outcomes = [run(name, seed, args.steps) for seed in range(args.seeds)]
        kind = "null" if name in NULLS else "planted"
        alarmed = sum(bool(o.alarms) for o in outcomes) / len(outcomes)
        logged = [len(o.alarms) / max(1, o.probe_steps * 5 // 6) for o in outcomes]
        purity = min(o.purity() for o in outcomes) if kind == "planted" else math.nan
        pr = [o.precision_recall() for o in outcomes]
        precision, recall = (min(p for p, _ in pr), min(r for _, r in pr)) if kind == "planted" else (math.nan,) * 2
        pro = [o.precision_recall("outliers") for o in outcomes]
        o_precision, o_recall = (min(p for p, _ in pro), min(r for _, r in pro)) if kind == "planted" else (math.nan,) * 2
        cost = statistics.median((o.seconds["probe"] / max(1, o.probe_steps)) / (o.seconds["train"] / o.steps)
                                 for o in outcomes)
        seconds = (time.perf_counter() - t0) / len(outcomes)
        print(f"{name:<26} {kind:<8} {alarmed:>6.0%} {statistics.mean(logged):>6.0%} {purity:>7.2f} "
              f"{precision:>5.2f}/{recall:<5.2f} {o_precision:>9.2f}/{o_recall:<5.2f} {cost:>13.2f} {seconds:>6.0f}",
              flush=True)


if __name__ == "__main__":
    main()
