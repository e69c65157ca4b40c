"""Gradient-spectrum cost and accuracy on real transformer gradients, every method side by side.

One seeded forward/backward of a GPT-2-small-shaped model and/or a MiniLM-shaped BERT classifier
(built from configs: nothing is downloaded) gives the gradients; gradwatch's default selection of
watched matrices (``discover_matrices`` + ``gradient_matrices``: attention q/k/v split, o, MLP
weights; no embeddings, no output head) is then reduced to the six spectrum statistics by:

- ``svd loop``      per-layer ``torch.linalg.svd(G, full_matrices=False)`` (U, S and Vh, in the gradient's
  own float32; the seed papers' way) + statistics,
- ``svdvals loop``  per-layer ``torch.linalg.svdvals`` (float32) + statistics (the baseline of the ratios),
- ``svdvals tall``  the same loop with each wide matrix transposed first (the same singular values; on
  the CPU torch's SVD of a wide matrix is much slower than of its transpose),
- ``gw gram`` / ``gw gram32`` / ``gw svdvals``: ``gradient_spectrum_statistics(mats, method=m)``
  (``gram``, gradwatch's default: on the CPU one matrix per core; elsewhere grouped by shape, one
  batched solve per group).

Every row uses the same formulas (``spectrum_statistics``, Frobenius norm exact from the entries) and
is compared with a float64 ``numpy.linalg.svd`` of the same matrices on the CPU. Timings are the
median of ``--repeats`` rounds, the methods alternating within each round, after one warm-up per
method (one matrix of each shape), with ``torch.cuda.synchronize()`` around each run on a GPU.

    python benchmarks/spectra.py                       # both models, CPU
    python benchmarks/spectra.py --model gpt2 --device cuda --repeats 10

When ``transformers`` is not installed, the GPT-2 matrices are synthetic (random low-rank plus noise
of the same shapes) and the output says so; MiniLM is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from gradwatch.engine.layers import discover_matrices, gradient_matrices
from gradwatch.functional.spectra import STATISTICS, gradient_spectrum_statistics, spectrum_statistics

SHORT = {"nuclear_norm": "nuclear", "spectral_norm": "spectral", "frobenius_norm": "frobenius",
         "stable_rank": "stable_rk", "effective_rank": "eff_rank", "top1_ratio": "top1"}


# ---- gradients ---------------------------------------------------------------------------------

def _gpt2_gradients(device: torch.device, batch: int, seq: int) -> tuple[list[Tensor], str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config()  # GPT-2 small: 12 layers, n_embd 768, 12 heads, vocab 50257
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    mats, _ = gradient_matrices(discover_matrices(model))
    return mats, f"GPT2LMHeadModel(GPT2Config()), random tokens {batch}x{seq}, LM loss, train mode"


def _minilm_gradients(device: torch.device, batch: int, seq: int) -> tuple[list[Tensor], str]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        num_labels=2)
    model = BertForSequenceClassification(config).to(device)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    model(input_ids=ids, labels=labels).loss.backward()
    mats, _ = gradient_matrices(discover_matrices(model))
    return mats, f"BertForSequenceClassification(MiniLM-L6-H384 shape), random tokens {batch}x{seq}, 2 labels"


def _synthetic_gpt2_matrices(device: torch.device, batch: int, seq: int) -> tuple[list[Tensor], str]:
    """GPT-2-small-shaped stand-ins: rank-(batch*seq/4) signal with a decaying spectrum plus 1e-3 noise."""
    g = torch.Generator().manual_seed(1)
    rank = max(1, min(768, batch * seq // 4))
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    mats = []
    for _layer in range(12):
        for m, n in shapes:
            scale = torch.logspace(0, -3, rank, dtype=torch.float64)
            a = torch.randn(m, rank, generator=g, dtype=torch.float64) * scale
            b = torch.randn(rank, n, generator=g, dtype=torch.float64)
            noise = 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)
            mats.append(((a @ b) / rank ** 0.5 + noise).float().to(device))
    return mats, (f"SYNTHETIC (transformers not installed): GPT-2-small shapes, random rank-{rank} "
                  "decaying spectrum + 1e-3 noise, float32")


# ---- methods -----------------------------------------------------------------------------------

def _loop(solver: Callable[[Tensor], Tensor]) -> Callable[[Sequence[Tensor]], dict[str, Tensor]]:
    """A per-layer loop: singular values of each matrix, then the statistics of each, stacked."""

    def run(mats: Sequence[Tensor]) -> dict[str, Tensor]:
        per_layer = []
        for m in mats:
            s = solver(m).double()
            per_layer.append(spectrum_statistics(s, m.double().square().sum()))
        return {k: torch.stack([d[k] for d in per_layer]) for k in STATISTICS}

    return run


def _gradwatch(method: str) -> Callable[[Sequence[Tensor]], dict[str, Tensor]]:
    def run(mats: Sequence[Tensor]) -> dict[str, Tensor]:
        return gradient_spectrum_statistics(mats, STATISTICS, method=method)[0]  # type: ignore[arg-type]

    return run


METHODS: dict[str, Callable[[Sequence[Tensor]], dict[str, Tensor]]] = {
    "svd loop": _loop(lambda m: torch.linalg.svd(m, full_matrices=False).S),
    "svdvals loop": _loop(torch.linalg.svdvals),
    "svdvals tall": _loop(lambda m: torch.linalg.svdvals(m if m.shape[0] >= m.shape[1] else m.t())),
    "gw gram (default)": _gradwatch("gram"),
    "gw gram32": _gradwatch("gram32"),
    "gw svdvals": _gradwatch("svdvals"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(methods: dict[str, Callable[[Sequence[Tensor]], dict[str, Tensor]]], mats: Sequence[Tensor],
                      warm: Sequence[Tensor], repeats: int,
                      device: torch.device) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
    """Median seconds of each method. Rounds alternate the methods (A, B, C, A, B, C, ...) so that drift
    and load from other processes fall on every method alike."""
    for fn in methods.values():
        fn(warm)  # warm-up: library initialisation, workspace allocation, kernel selection
    _sync(device)
    times: dict[str, list[float]] = {label: [] for label in methods}
    outs: dict[str, dict[str, Tensor]] = {}
    for _ in range(repeats):
        for label, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[label] = fn(mats)
            _sync(device)
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(t) for label, t in times.items()}, outs


def _reference(mats: Sequence[Tensor]) -> tuple[dict[str, Tensor], np.ndarray]:
    """float64 LAPACK SVD on the CPU: statistics, and the share of singular values below 3e-4 * s_1."""
    per_layer, tiny = [], []
    for m in mats:
        a = m.detach().double().cpu().numpy()
        s = np.linalg.svd(a, compute_uv=False)
        tiny.append(float(np.mean(s < 3e-4 * s[0])))
        per_layer.append(spectrum_statistics(torch.from_numpy(s), torch.tensor((a * a).sum())))
    return {k: torch.stack([d[k] for d in per_layer]) for k in STATISTICS}, np.asarray(tiny)


def _max_rel_err(values: Tensor, ref: Tensor) -> float:
    v = values.detach().double().cpu()
    return float(((v - ref).abs() / ref.abs()).max())


# ---- report ------------------------------------------------------------------------------------

def benchmark(name: str, mats: list[Tensor], description: str, repeats: int, device: torch.device) -> None:
    print(f"\n=== {name}: {description}")
    shapes = Counter(tuple(m.shape) for m in mats)
    print(f"watched matrices: {len(mats)} ({', '.join(f'{c} x {s[0]}x{s[1]}' for s, c in shapes.items())}), "
          f"dtype {mats[0].dtype}, device {mats[0].device}")
    ref, tiny = _reference(mats)
    print(f"float64 reference: stable rank median {ref['stable_rank'].median():.2f}, effective rank median "
          f"{ref['effective_rank'].median():.1f}; share of singular values < 3e-4*s1: median {np.median(tiny):.2f}, "
          f"max {tiny.max():.2f}")
    warm = list({tuple(m.shape): m for m in mats}.values())  # one matrix of each shape
    seconds, outs = _time_interleaved(METHODS, mats, warm, repeats, device)
    rows = [(label, seconds[label], {k: _max_rel_err(outs[label][k], ref[k]) for k in STATISTICS})
            for label in METHODS]
    base = {label: s for label, s, _ in rows}
    header = (f"{'method':<18} {'seconds':>9} {'vs svdvals':>10} {'vs svd':>7} | "
              + " ".join(f"{SHORT[k]:>9}" for k in STATISTICS))
    print(f"seconds: median of {repeats} runs; speed-up = loop time / method time; "
          "right of '|': max relative error over the matrices vs float64 numpy SVD")
    print(header)
    print("-" * len(header))
    for label, seconds, err in rows:
        print(f"{label:<18} {seconds:>9.4f} {base['svdvals loop'] / seconds:>9.2f}x {base['svd loop'] / seconds:>6.2f}x | "
              + " ".join(f"{err[k]:>9.1e}" for k in STATISTICS))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt2", "minilm", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (median reported); default 3 on CPU, 5 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) before anything runs (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    repeats = args.repeats if args.repeats is not None else (5 if args.device == "cuda" else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}"
    print(f"device: {device} ({hw}); torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"numpy {np.__version__}; repeats {repeats}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers is not installed: GPT-2 gradients are replaced by synthetic matrices of the same "
              "shapes; MiniLM is skipped")
    for name in (["gpt2", "minilm"] if args.model == "both" else [args.model]):
        torch.manual_seed(args.seed)
        if name == "gpt2":
            mats, desc = (_gpt2_gradients(device, 4, 128) if have_hf else _synthetic_gpt2_matrices(device, 4, 128))
        elif have_hf:
            mats, desc = _minilm_gradients(device, 8, 128)
        else:
            continue
        benchmark({"gpt2": "GPT-2 small", "minilm": "MiniLM-L6-H384"}[name], mats, desc, repeats, device)


if __name__ == "__main__":
    main()
