"""Run directories written with ``SummaryWriter`` under gradwatch's tags, for the report and compare tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATS = ("nuclear_norm", "stable_rank")
FAMILIES = {
    "model.layers.*.attn.q_proj.weight": [f"model.layers.{i}.attn.q_proj.weight" for i in range(4)],
    "model.layers.*.mlp.fc.weight": [f"model.layers.{i}.mlp.fc.weight" for i in range(4)],
}
STEPS = (1, 5, 10, 15, 20)


def spectrum_values(seed: int, stat: str, param: str) -> np.ndarray:
    """The values a fake run logs for one layer: deterministic in (seed, stat, param)."""
    rng = np.random.default_rng([seed, STATS.index(stat), sum(map(ord, param))])
    return rng.uniform(0.5, 5.0, len(STEPS)) * (10.0 if stat == "nuclear_norm" else 1.0)


def write_fake_run(log_dir: Path, seed: int, *, full: bool = True) -> Path:
    """A run directory with per-layer spectra (and, when ``full``, MAD, sharpness, signals, stability, alerts,
    overhead and a host's own scalar); one NaN in layer 1's q_proj nuclear norm at step 10."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(log_dir))
    for stat in STATS:
        for family, params in FAMILIES.items():
            for param in params:
                values = spectrum_values(seed, stat, param)
                if full and stat == "nuclear_norm" and param == "model.layers.1.attn.q_proj.weight":
                    values[2] = np.nan
                for step, value in zip(STEPS, values):
                    writer.add_scalar(f"grad_spectrum/{stat}/{param}", float(value), step)
            if full:
                for step in STEPS:
                    writer.add_scalar(f"grad_spectrum/mad/{stat}/{family}", 0.1 * step, step)
    if full:
        for step in STEPS:
            writer.add_scalar("train/loss", 2.0 / step, step)
            writer.add_scalar("sharpness/lambda_max", 10.0 + step, step)
            writer.add_scalar("sharpness/lambda_max_precond", 5.0 + 2 * step, step)
            writer.add_scalar("sharpness/threshold", 38.0, step)
            writer.add_scalar("sharpness/ratio", (5.0 + 2 * step) / 38.0, step)
            writer.add_scalar("signals/pair_loss/a", 1.0 + 0.1 * step, step)
            writer.add_scalar("signals/pair_loss/b", 1.0 - 0.02 * step, step)
            writer.add_scalar("signals/opposing_score", 0.05 * step, step)
            writer.add_scalar("gradwatch/overhead", 0.01 + 0.001 * step, step)
            writer.add_scalar("stability/spike/loss", 0.5 * step, step)
            writer.add_scalar("stability/attention/max_logit", 3.0 + step, step)  # run-wide: max over modules
            for i in range(3):
                writer.add_scalar(f"stability/update_ratio/model.layers.{i}.mlp.fc.weight", 1e-3 * (i + 1), step)
            picture = np.full((3, 36, 70), step / STEPS[-1], dtype=np.float32)  # the last one is all white
            writer.add_image("signals/pair_examples", picture, step, dataformats="CHW")
        with open(log_dir / "signals.jsonl", "w", encoding="utf-8") as f:
            for step in STEPS:
                f.write(json.dumps({"step": step, "outliers": [3, 17, 42],
                                    "pairs": [{"a": [3, 17], "b": [42], "score": 0.05 * step,
                                               "alarm": step >= 15}]}) + "\n")
        with open(log_dir / "alerts.jsonl", "w", encoding="utf-8") as f:
            f.write(json.dumps({"step": 15, "rule": "sharpness_over_threshold", "severity": "warning",
                                "message": "lambda_max_precond crossed 2/lr <script>x</script>",
                                "evidence": {"lambda_max_precond": 35.0, "threshold": 38.0},
                                "remedies": ["lower the learning rate", "add warm-up"]}) + "\n")
    writer.close()
    return log_dir
