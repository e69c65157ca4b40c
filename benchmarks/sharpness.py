"""Cost of the sharpness estimate along one training run: warm-started Lanczos vs cold power iteration.

Full-batch gradient descent (SGD lr 0.05) on 1,000 scikit-learn digits with a 64-128-128-10 tanh MLP and
loss 0.5 * sum of squares per example (REFERENCE section 2). At every ``--every``-th step the Hessian of the
training loss is probed three ways on the same operator:

- reference: Lanczos from a random start, tol 1e-8 (converged);
- gradwatch: Lanczos warm-started from the previous checkpoint's top eigenvector, tol ``--tol`` (1e-3, the
  default of ``SharpnessConfig``), as the ``Sharpness`` diagnostic runs it;
- PyHessian: cold power iteration from a random start, stopping at 1e-3 relative change (``power_iteration``),
  up to 100 products.

It prints HVPs, wall time and relative error against the reference per checkpoint, then the totals and
their ratios, and how often power iteration missed 1e-3 relative accuracy.

    python benchmarks/sharpness.py [--steps 400] [--every 25]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn

from gradwatch.functional.hessian import HessianOperator, lanczos_top_eigenvalues, power_iteration


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="warm Lanczos vs cold power iteration along a training run")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-3, help="gradwatch's Lanczos tolerance (relative residual)")
    p.add_argument("--accuracy", type=float, default=1e-3, help="relative error counted as a miss")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:args.examples], dtype=torch.float32) / 16
    y = nn.functional.one_hot(torch.tensor(d.target[:args.examples]), 10).float()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=args.lr)

    def loss() -> torch.Tensor:
        return 0.5 * (model(x) - y).square().sum(1).mean()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {sum(q.numel() for q in params)} parameters, "
          f"{args.examples} examples, SGD lr {args.lr} (2/lr = {2 / args.lr:g}), sharpness every {args.every} steps")
    header = (f"{'step':>5} {'lambda_ref':>10} {'ref_hvps':>8} | {'lz_hvps':>7} {'lz_ms':>7} {'lz_relerr':>9} | "
              f"{'pi_hvps':>7} {'pi_ms':>7} {'pi_relerr':>9} {'pi_miss':>7}")
    print(header)
    print("-" * len(header))
    warm = None
    tot = {"lz_hvps": 0, "lz_s": 0.0, "pi_hvps": 0, "pi_s": 0.0, "misses": 0, "lz_misses": 0, "n": 0,
           "lz_max_err": 0.0, "pi_max_err": 0.0}
    for step in range(1, args.steps + 1):
        if step == 1 or step % args.every == 0:
            with HessianOperator(loss, params) as op:
                ref = lanczos_top_eigenvalues(op.matvec, op.dim, max_iter=300, tol=1e-8,
                                              generator=torch.Generator().manual_seed(1000 + step))
                lam = float(ref.eigenvalues[0])
                t0 = time.perf_counter()
                lz = lanczos_top_eigenvalues(op.matvec, op.dim, max_iter=100, tol=args.tol, init=warm)
                lz_s = time.perf_counter() - t0
                warm = lz.eigenvectors[:, 0]
                t0 = time.perf_counter()
                pi = power_iteration(op.matvec, op.dim, max_iter=100, tol=1e-3,
                                     generator=torch.Generator().manual_seed(2000 + step))
                pi_s = time.perf_counter() - t0
            lz_err = abs(float(lz.eigenvalues[0]) - lam) / abs(lam)
            pi_err = abs(pi.value - lam) / abs(lam)
            miss = pi_err > args.accuracy
            tot["lz_hvps"] += lz.num_matvecs
            tot["lz_s"] += lz_s
            tot["pi_hvps"] += pi.num_matvecs
            tot["pi_s"] += pi_s
            tot["misses"] += miss
            tot["lz_misses"] += lz_err > args.accuracy
            tot["n"] += 1
            tot["lz_max_err"] = max(tot["lz_max_err"], lz_err)
            tot["pi_max_err"] = max(tot["pi_max_err"], pi_err)
            print(f"{step:>5} {lam:>10.4f} {ref.num_matvecs:>8} | {lz.num_matvecs:>7} {1e3 * lz_s:>7.1f} {lz_err:>9.1e} | "
                  f"{pi.num_matvecs:>7} {1e3 * pi_s:>7.1f} {pi_err:>9.1e} {'MISS' if miss else '':>7}")
        opt.zero_grad()
        loss().backward()
        opt.step()
    print("-" * len(header))
    n = tot["n"]
    print(f"totals over {n} checkpoints: warm Lanczos {tot['lz_hvps']} HVPs, {tot['lz_s']:.2f} s "
          f"(max rel err {tot['lz_max_err']:.1e}, {tot['lz_misses']}/{n} above {args.accuracy:g}); "
          f"cold power iteration {tot['pi_hvps']} HVPs, {tot['pi_s']:.2f} s (max rel err {tot['pi_max_err']:.1e})")
    print(f"ratio power/Lanczos: HVPs {tot['pi_hvps'] / tot['lz_hvps']:.2f}x, wall time {tot['pi_s'] / tot['lz_s']:.2f}x")
    print(f"power iteration missed {args.accuracy:g} relative accuracy at {tot['misses']}/{n} checkpoints")
    return tot


if __name__ == "__main__":
    main()
