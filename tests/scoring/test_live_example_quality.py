"""The live data-quality family under the Hugging Face Trainer: a tiny GPT-2 (from a config) with a tokenizer;
the tails are decoded by the Trainer's tokenizer and logged as TensorBoard text beside the distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import _scoring_tiny as tiny  # noqa: E402
from _support.tensorboard import read_series, read_texts  # noqa: E402


class Lines(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.items = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in texts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.items[i])
        return {"input_ids": ids, "labels": ids.clone()}


TEXTS = [f"line {i}: the cat sat on mat {i}" if i % 2 else f"zq{i} xv kk jj {i}" for i in range(12)]


def test_tails_decoded_by_the_trainers_tokenizer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from gradwatch.callbacks.transformers import GradWatch
    from gradwatch.metrics.example_quality import ExampleQualityConfig

    tok = tiny.tokenizer()
    data = Lines(tok, [f"{t:<16}"[:16] for t in TEXTS])  # equal lengths: the collator stacks them
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_strategy="no", report_to=["tensorboard"],
                             disable_tqdm=True, per_device_train_batch_size=4, max_steps=2, logging_steps=1, seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False)
    watch = GradWatch(spectra=False, sharpness=False, signals=False, stability=False,
                      example_quality=ExampleQualityConfig(every=1, size=6, tails=1), max_overhead=None,
                      on_error="raise")
    Trainer(model=tiny.gpt2(), args=args, train_dataset=data, processing_class=tok, callbacks=[watch],
            data_collator=default_data_collator).train()
    run_dir = tmp_path / "runs"
    series = read_series(run_dir, ("example_quality/",))
    assert set(series["example_quality/effective_rank/median"]) == {1, 2}
    for role in ("q", "k", "v", "o", "mlp"):  # GPT-2's fused c_attn split, c_proj, mlp.c_fc/c_proj
        assert set(series[f"example_quality/nuclear_norm/{role}/median"]) == {1, 2}
    texts = read_texts(run_dir, "example_quality/tails")
    assert [step for step, _ in texts] == [1, 2]
    text = texts[-1][1]
    rows = [line for line in text.splitlines() if line.startswith(("| low", "| high"))]
    assert len(rows) == 2
    decoded = {tok.decode(data.items[i]).replace(" ", "") for i in range(len(data))}
    for row in rows:  # each tail example is shown as the tokenizer decodes it
        assert row.split("|")[4].strip().replace(" ", "") in decoded
