"""What is derived from the registry when used, for the built-in families too: the package exports (the MoE
family's ``MoEConfig`` among them), the report's tag prefixes (``moe/`` among them) and its sections (a family
without a report hook gets the generic one)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gradwatch
from gradwatch.registry import families


def test_every_registered_config_is_exported() -> None:
    names = [f.config_class.__name__ for f in families()]
    assert "MoEConfig" in names
    for name in names:
        assert name in gradwatch.__all__ and name in dir(gradwatch)
        assert getattr(gradwatch, name) is next(f.config_class for f in families() if f.config_class.__name__ == name)
    namespace: dict[str, object] = {}
    exec("from gradwatch import *", namespace)
    assert "MoEConfig" in namespace and "WatchConfig" in namespace


def test_report_prefixes_and_a_section_for_every_family(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.integrations import report

    assert report.GRADWATCH_PREFIXES == (*(f"{f.stem}/" for f in families()), "gradwatch/")
    assert "moe/" in report.GRADWATCH_PREFIXES
    with SummaryWriter(str(tmp_path / "run")) as writer:  # a run with MoE routing scalars only
        for step in (1, 2, 3):
            writer.add_scalar("moe/load_cv/model.layers.0.mlp.gate", 0.1 * step, step)
            writer.add_scalar("moe/alert", 0.0, step)
    run = report.load_run(tmp_path / "run")  # once refused: moe/ was not a gradwatch prefix
    page = report.write_report(run, tmp_path / "out").read_text()
    assert 'id="moe"' in page and "moe scalars" in page

