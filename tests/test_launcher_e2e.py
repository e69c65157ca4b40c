"""No code at all, end to end: an unmodified Hugging Face training script, started by the launcher.

The script below is what someone else wrote: a tiny GPT-2 built from a config, an in-memory token dataset,
``TrainingArguments`` parsed with ``HfArgumentParser`` from its own command line, and no mention of gradwatch.
``gradwatch run train.py --report_to gradwatch ...`` with ``GRADWATCH_SPECTRA_EVERY=5`` must put HF's own
scalars and gradwatch's spectra, at that cadence, into one TensorBoard run, in one process and under
``torchrun`` with two CPU processes (gloo).

Also the knobs as a separate dataclass, ``HfArgumentParser((TrainingArguments, GradWatchArguments))``, read
from JSON and YAML files, and bad values failing at parse time with the field's name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tbparse")

from conftest import read_scalars  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
STEPS = 10
EVERY = 5
SPECTRA_STEPS = {1, 5, 10}  # every 5, and the first step
STATS = ("nuclear_norm", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "top1_ratio")
# GPT-2's fused c_attn is split into .q/.k/.v; Conv1D weights are read transposed
MATRICES = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in
            ("attn.c_attn.weight.q", "attn.c_attn.weight.k", "attn.c_attn.weight.v", "attn.c_proj.weight",
             "mlp.c_fc.weight", "mlp.c_proj.weight")]

TRAIN_SCRIPT = '''
"""A plain Hugging Face training script (it knows nothing of gradwatch)."""
import json
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq_len=16, vocab=64):
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens())
    trainer.train()
    with open(os.path.join(args.output_dir, f"rank{args.process_index}.json"), "w") as f:
        json.dump({"world_size": args.world_size, "global_step": trainer.state.global_step}, f)


if __name__ == "__main__":
    main()
'''

SCRIPT_ARGS = ["--report_to", "gradwatch", "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "no",
               "--use_cpu", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0"]


def launcher_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GRADWATCH_SPECTRA_EVERY=str(EVERY),
               GRADWATCH_MAX_OVERHEAD="0")  # no budget: a tiny model's steps are too short to afford a spectrum
    return env


def gradwatch_command() -> list[str]:
    """The console script if installed (``pip install -e .``), else ``python -m gradwatch``."""
    executable = shutil.which("gradwatch") or str(Path(sys.executable).with_name("gradwatch"))
    return [executable] if os.path.exists(executable) else [sys.executable, "-m", "gradwatch"]


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted({p.parent for p in output_dir.rglob("events.out.tfevents.*")})


def check_one_run(output_dir: Path, world_size: int) -> None:
    (run,) = run_dirs(output_dir)  # one run directory, one writer: HF's and gradwatch's charts together
    assert run.parent == output_dir / "runs"  # HF's default run directory
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    scalars = read_scalars(run)
    # HF's own scalars, as report_to="tensorboard" writes them
    assert set(scalars["train/loss"]) == set(range(1, STEPS + 1))
    for tag in ("train/learning_rate", "train/grad_norm", "train/train_runtime"):
        assert tag in scalars, tag
    # gradwatch's, at the cadence the environment set
    for name in MATRICES:
        for stat in STATS:
            tag = f"grad_spectrum/{stat}/{name}"
            assert set(scalars.get(tag, {})) == SPECTRA_STEPS, (tag, sorted(scalars.get(tag, {})))
    assert set(scalars["grad_spectrum/mad/nuclear_norm/transformer.h.*.attn.c_attn.weight.q"]) == SPECTRA_STEPS
    assert "gradwatch/overhead" in scalars
    assert all(v > 0 for v in scalars[f"grad_spectrum/nuclear_norm/{MATRICES[0]}"].values())
    ranks = [json.loads(p.read_text()) for p in sorted(output_dir.glob("rank*.json"))]
    assert [r["world_size"] for r in ranks] == [world_size] * world_size
    assert {r["global_step"] for r in ranks} == {STEPS}


@pytest.mark.slow
def test_unmodified_script_under_gradwatch_run(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run([*gradwatch_command(), "run", "train.py", "--output_dir", str(out),
                           "--per_device_train_batch_size", "4", *SCRIPT_ARGS],
                          cwd=tmp_path, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_one_run(out, world_size=1)


@pytest.mark.slow
def test_unmodified_script_under_torchrun(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    out = tmp_path / "out"
    # --standalone: a rendezvous on a free local port. (`--master_port 0` hands the workers MASTER_PORT=0, and
    # init_process_group then waits forever.)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gradwatch", "run", "train.py",
                           "--output_dir", str(out), "--per_device_train_batch_size", "2", "--ddp_backend", "gloo",
                           *SCRIPT_ARGS],
                          cwd=tmp_path, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_one_run(out, world_size=2)  # rank 1 writes nothing: one run, one event file


# --- the knobs as their own dataclass, from JSON and YAML files -------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("GRADWATCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


def two_dataclass_parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    from gradwatch.integrations.huggingface import GradWatchArguments

    return HfArgumentParser((TrainingArguments, GradWatchArguments))


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def test_json_config_file(tmp_path: Path, clean_env: None) -> None:
    from gradwatch.integrations.huggingface import GradWatchArguments, config_from_training_args

    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "max_steps": 7, "report_to": "tensorboard",
                                "gradwatch_spectra_every": 3, "gradwatch_spectra_method": "svdvals",
                                "gradwatch_include": "*attn*,*mlp*", "gradwatch_max_overhead": 0.2,
                                "gradwatch_sharpness_every": 4, "gradwatch_sharpness_probe_size": 8}))
    training_args, knob_args = two_dataclass_parser().parse_json_file(str(path))
    assert training_args.max_steps == 7 and isinstance(knob_args, GradWatchArguments)
    config = config_from_training_args(knob_args)
    assert [s for s in range(1, 8) if config.spectra.every.is_due(s)] == [1, 3, 6]
    assert config.spectra.method == "svdvals" and config.include == ("*attn*", "*mlp*")
    assert config.max_overhead == 0.2
    assert config.sharpness.probe_size == 8 and config.sharpness.every.is_due(4)


def test_yaml_config_file_trains(tmp_path: Path, clean_env: None) -> None:
    """A YAML file with both dataclasses' fields; the knobs reach a run through ``GradWatch(config)``."""
    from conftest import TokenData
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    from gradwatch.callbacks.transformers import GradWatch
    from gradwatch.integrations.huggingface import config_from_training_args

    path = write_yaml(tmp_path / "args.yaml", {
        "output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
        "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "report_to": ["tensorboard"],
        "gradwatch_spectra_every": 2, "gradwatch_include": ["*c_attn*"],  # a list, as YAML writes one
        "gradwatch_max_overhead": 0, "gradwatch_on_error": "raise"})
    training_args, knob_args = two_dataclass_parser().parse_yaml_file(str(path))
    config = config_from_training_args(knob_args)
    assert config.include == ("*c_attn*",) and config.max_overhead is None and config.on_error == "raise"

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    watch = GradWatch(config)
    Trainer(model=model, args=training_args, train_dataset=TokenData(), callbacks=[watch]).train()
    scalars = read_scalars(watch.log_dir)
    assert set(scalars["train/loss"]) == {1, 2, 3, 4}
    watched = {t.split("/", 2)[2] for t in scalars if t.startswith("grad_spectrum/nuclear_norm/")}
    assert watched == {f"transformer.h.{i}.attn.c_attn.weight.{p}" for i in (0, 1) for p in "qkv"}
    assert set(scalars["grad_spectrum/effective_rank/transformer.h.1.attn.c_attn.weight.k"]) == {1, 2, 4}


def test_yaml_config_file_training_arguments_subclass(tmp_path: Path, clean_env: None) -> None:
    """The subclass route: ``report_to: gradwatch`` and the knobs as TrainingArguments fields, in one YAML file."""
    from transformers import HfArgumentParser

    from gradwatch.integrations.huggingface import GradWatchTrainingArguments, config_from_training_args

    path = write_yaml(tmp_path / "args.yaml", {"output_dir": str(tmp_path / "out"), "report_to": "gradwatch",
                                              "gradwatch_spectra_every": 5, "gradwatch_exclude": "*mlp*"})
    (args,) = HfArgumentParser(GradWatchTrainingArguments).parse_yaml_file(str(path))
    assert args.report_to == ["gradwatch"]
    config = config_from_training_args(args)
    assert config.spectra.every.is_due(5) and not config.spectra.every.is_due(4) and config.exclude == ("*mlp*",)


@pytest.mark.parametrize("kind", ["json", "yaml"])
@pytest.mark.parametrize("field, value, needles", [
    ("gradwatch_spectra_every", -3, ["an int >= -1"]),
    ("gradwatch_spectra_every", "often", ["an int >= -1"]),
    ("gradwatch_on_error", "explode", ["'warn'", "'raise'"]),
    ("gradwatch_spectra_method", "fast", ["'gram'", "'gram32'", "'svdvals'"]),
    ("gradwatch_max_overhead", 2.0, ["[0.0, 1.0]"]),
    ("gradwatch_sharpness_probe_size", 0, ["probe_size", "an int >= 1"]),  # a family that is off is checked too
    ("gradwatch_include", 3, ["glob patterns"]),
])
def test_invalid_value_in_a_config_file_fails_at_parse_time(tmp_path: Path, clean_env: None, kind: str, field: str,
                                                           value: Any, needles: list[str]) -> None:
    values = {"output_dir": str(tmp_path / "out"), field: value}
    parser = two_dataclass_parser()
    if kind == "json":
        path = tmp_path / "args.json"
        path.write_text(json.dumps(values))
        parse = parser.parse_json_file
    else:
        parse = parser.parse_yaml_file
        path = write_yaml(tmp_path / "args.yaml", values)
    with pytest.raises(ValueError) as info:
        parse(str(path))
    message = str(info.value)
    assert f"{field}={value!r}" in message, message  # the field's name and the value given
    for needle in needles:
        assert needle in message, message


def test_unknown_field_in_a_config_file_is_named(tmp_path: Path, clean_env: None) -> None:
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "gradwatch_spectra_evry": 5}))
    with pytest.raises(ValueError, match="gradwatch_spectra_evry"):  # HF's own check: "keys are not used"
        two_dataclass_parser().parse_json_file(str(path))


def test_command_line_and_file_agree(tmp_path: Path, clean_env: None) -> None:
    """The same knobs as flags and as a file give the same config."""
    from gradwatch.integrations.huggingface import config_from_training_args

    path = write_yaml(tmp_path / "args.yaml", {"output_dir": str(tmp_path), "gradwatch_spectra_every": 4,
                                              "gradwatch_embeddings": True, "gradwatch_exclude": "*bias"})
    _, from_file = two_dataclass_parser().parse_yaml_file(str(path))
    _, from_flags = two_dataclass_parser().parse_args_into_dataclasses(textwrap.dedent("""
        --output_dir {out} --gradwatch_spectra_every 4 --gradwatch_embeddings true --gradwatch_exclude *bias
    """).format(out=tmp_path).split())
    assert from_file == from_flags
    a, b = config_from_training_args(from_file), config_from_training_args(from_flags)
    assert (a.spectra, a.embeddings, a.exclude) == (b.spectra, b.embeddings, b.exclude)
