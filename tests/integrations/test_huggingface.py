"""Hugging Face glue: ``import gradwatch`` stays light, ``report_to=["gradwatch"]`` works with no code, and
the ``gradwatch_*`` TrainingArguments fields / ``HfArgumentParser`` flags become a validated WatchConfig."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tbparse")

from conftest import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(tmp_path: Any, *parts: str) -> subprocess.CompletedProcess:
    """Run the (separately dedented) code ``parts`` in a fresh interpreter, in ``tmp_path``."""
    code = "\n".join(textwrap.dedent(p) for p in parts)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one intra-op thread (see test_transformers.py)
    return subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)



def test_import_gradwatch_imports_no_host_framework_and_glue_imports_first(tmp_path: Any) -> None:
    proc = run_python(tmp_path, """
        import sys
        import gradwatch
        for name in ('transformers', 'lightning', 'pytorch_lightning', 'torchmetrics'):
            assert name not in sys.modules, name + ' was imported'
        from gradwatch import SpectraConfig, WatchConfig
        WatchConfig(spectra=SpectraConfig(every=3))  # loads the families' metrics: torchmetrics (which itself
        # imports transformers when it is installed), never Lightning or transformers' Trainer machinery
        assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, 'lightning was imported'
        assert 'transformers.trainer' not in sys.modules
        # the adapter imported first of all (it pulls transformers' integration table in itself)
        from gradwatch.callbacks.transformers import GradWatchTensorBoardCallback
        from gradwatch.integrations.huggingface import GradWatchTrainingArguments
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        assert INTEGRATION_TO_CALLBACK['gradwatch'] is GradWatchTensorBoardCallback
        GradWatchTrainingArguments(output_dir='out', report_to=['gradwatch'])
        print('ok')
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


TINY_BERT = """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(1, 100, (16, 8), generator=g)
            self.y = torch.randint(0, 3, (16,), generator=g)
        def __len__(self):
            return 16
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.y[i]}

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=100, num_labels=3))
"""


def test_report_to_gradwatch_after_import_gradwatch_then_transformers(tmp_path: Any) -> None:
    """``import gradwatch`` first, transformers after: the name is registered when transformers' table loads,
    and a plain ``TrainingArguments(report_to=["gradwatch"])`` gives HF's TensorBoard logging plus
    gradwatch's tags in one run directory."""
    proc = run_python(tmp_path, """
        import json, sys
        import gradwatch
        assert 'transformers' not in sys.modules
        from transformers import Trainer, TrainingArguments
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        from gradwatch.callbacks.transformers import GradWatchTensorBoardCallback
        assert INTEGRATION_TO_CALLBACK['gradwatch'] is GradWatchTensorBoardCallback
    """, TINY_BERT, """
        args = TrainingArguments(output_dir='out', use_cpu=True, save_strategy='no', report_to=['gradwatch'],
                                 disable_tqdm=True, per_device_train_batch_size=4, max_steps=3, logging_steps=1)
        trainer = Trainer(model=model, args=args, train_dataset=DS())
        gw = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradWatchTensorBoardCallback)]
        assert len(gw) == 1 and gw[0].gradwatch.trainer is trainer
        assert gw[0].gradwatch in trainer.callback_handler.callbacks  # the adapter itself, beside it
        trainer.train()
        assert '_clip_grad_norm' not in vars(trainer) and 'training_step' not in vars(trainer)
        print(json.dumps({'log_dir': gw[0].gradwatch.log_dir, 'hf_dir': gw[0].logging_dir}))
    """)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    log_dir = os.path.join(str(tmp_path), info["log_dir"])
    assert os.path.realpath(log_dir) == os.path.realpath(os.path.join(str(tmp_path), info["hf_dir"]))
    assert os.path.dirname(os.path.realpath(log_dir)) == os.path.realpath(os.path.join(str(tmp_path), "out", "runs"))
    assert len(os.listdir(os.path.join(str(tmp_path), "out", "runs"))) == 1
    assert len([f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]) == 1  # one shared writer
    scalars = read_scalars(log_dir)
    assert set(scalars["train/loss"]) == {1, 2, 3}  # HF's own logging, as "tensorboard" would do
    assert set(scalars["train/grad_norm"]) == {1, 2, 3}
    # default spectra cadence (step 1, then every 50; the first due computation runs whatever the budget)
    tags = {t for t in scalars if t.startswith("grad_spectrum/spectral_norm/")}
    assert len(tags) == 14  # 2 layers x 6 linears + pooler + classifier
    assert "grad_spectrum/spectral_norm/bert.encoder.layer.1.attention.self.query.weight" in tags
    for t in tags:
        assert set(scalars[t]) == {1} and scalars[t][1] > 0


def test_training_arguments_fields_configure_report_to(tmp_path: Any) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one intra-op thread (see test_transformers.py)
    try:
        _train_with_gradwatch_fields(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_with_gradwatch_fields(tmp_path: Any) -> None:
    from transformers import HfArgumentParser, Trainer

    import gradwatch  # noqa: F401  (registers the report_to name)
    from gradwatch.integrations.huggingface import GradWatchTrainingArguments, config_from_training_args

    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(TINY_BERT), namespace)  # the very model and data of the subprocess test
    model, dataset = namespace["model"], namespace["DS"]()
    (args,) = HfArgumentParser(GradWatchTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "4", "--max_steps", "4", "--logging_steps", "1",
        "--report_to", "gradwatch", "--gradwatch_spectra_every", "3", "--gradwatch_include", "*query*",
        "--gradwatch_max_overhead", "1.0", "--gradwatch_on_error", "raise"])
    assert args.report_to == ["gradwatch"]
    config = config_from_training_args(args)
    assert config.include == ("*query*",)
    assert [s for s in range(1, 10) if config.spectra.every.is_due(s)] == [1, 3, 6, 9]
    assert config.on_error == "raise" and config.max_overhead == 1.0 and config.sharpness is None

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    gw = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GradWatchTensorBoardCallback")
    assert gw.gradwatch.config == config
    scalars = read_scalars(gw.gradwatch.log_dir)
    assert set(scalars["train/loss"]) == {1, 2, 3, 4}
    watched = {t.split("/", 2)[2] for t in scalars if t.startswith("grad_spectrum/nuclear_norm/")}
    assert watched == {f"bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)}
    for name in watched:
        assert set(scalars[f"grad_spectrum/frobenius_norm/{name}"]) == {1, 3}


def test_defaults_when_fields_absent() -> None:
    from types import SimpleNamespace

    from gradwatch.integrations.huggingface import config_from_training_args

    config = config_from_training_args(SimpleNamespace())  # plain TrainingArguments have no gradwatch_* fields
    assert config.spectra is not None and config.spectra.every.is_due(50) and not config.spectra.every.is_due(49)
    assert config.include == ("*",) and config.exclude == () and config.sharpness is None
    config = config_from_training_args(SimpleNamespace(gradwatch_spectra_every=0,
                                                       gradwatch_exclude=" *pooler* , *classifier* "))
    assert config.spectra is None and config.exclude == ("*pooler*", "*classifier*")
    config = config_from_training_args(SimpleNamespace(gradwatch_spectra_every=10, gradwatch_spectra_per_example=True,
                                                       gradwatch_spectra_per_example_every=7,
                                                       gradwatch_sharpness_every=20, gradwatch_sharpness_probe_size=8))
    assert config.spectra.per_example and config.spectra.per_example_every.is_due(7)
    assert config.sharpness is not None and config.sharpness.probe_size == 8 and config.sharpness.every.is_due(20)
    assert config.max_overhead == 0.05
    assert config_from_training_args(SimpleNamespace(gradwatch_max_overhead=0)).max_overhead is None  # no budget


@pytest.mark.parametrize("flag, value, choices", [
    ("--gradwatch_spectra_method", "nope", ["gram", "gram32", "svdvals"]),
    ("--gradwatch_on_error", "ignore", ["warn", "raise"]),
])
def test_bad_flag_raises_value_error_naming_choices(tmp_path: Any, flag: str, value: str, choices: list[str]) -> None:
    from transformers import HfArgumentParser

    from gradwatch.integrations.huggingface import GradWatchTrainingArguments, config_from_training_args

    parser = HfArgumentParser(GradWatchTrainingArguments)
    with pytest.raises(SystemExit):  # argparse refuses a value outside the field's choices, naming them
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "gradwatch", flag, value])
    with pytest.raises(ValueError) as info:  # the dataclass itself, built in code
        GradWatchTrainingArguments(output_dir=str(tmp_path), **{flag.lstrip("-"): value})
    message = str(info.value)
    assert repr(value) in message and all(repr(c) in message for c in choices), message
    # the same message from the plain function, for objects that skip __post_init__
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=repr(value)):
        config_from_training_args(SimpleNamespace(**{flag.lstrip("-"): value}))


def test_probe_examples_are_decoded_with_the_trainers_tokenizer() -> None:
    """The signals table shows probe examples as text: the engine takes decode from the Trainer's tokenizer."""
    import torch

    from gradwatch.integrations.huggingface import token_decoder

    class Tokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join(f"<{i}>" for i in ids)

    class WithTokenizer:
        processing_class = Tokenizer()

    class Without:
        processing_class = None

    decode = token_decoder(WithTokenizer())
    assert decode({"input_ids": torch.tensor([3, 1, 4]), "labels": torch.tensor(1)}) == "<3> <1> <4>"
    assert token_decoder(Without()) is None
