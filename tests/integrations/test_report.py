"""``gradwatch report`` and ``gradwatch compare`` on run directories written with ``SummaryWriter``: what is
read back, RD against a direct computation, the pages' sections, and the pages rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from _chromium import chromium_path, open_pages  # noqa: E402
from _fake_runs import FAMILIES, STATS, STEPS, spectrum_values, write_fake_run  # noqa: E402

from gradwatch.cli import main  # noqa: E402
from gradwatch.integrations import report  # noqa: E402

NAN_LAYER = "model.layers.1.attn.q_proj.weight"  # its nuclear norm is NaN at step 10 in the full run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return write_fake_run(root / "a", seed=0, full=True), write_fake_run(root / "b", seed=1, full=False)


@pytest.fixture(scope="module")
def pages(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(report index.html of run A, compare index.html of A vs B), written once through the CLI."""
    out = tmp_path_factory.mktemp("pages")
    a, b = runs
    assert main(["report", str(a), "-o", str(out / "report")]) == 0
    assert main(["compare", str(a), str(b), "-o", str(out / "compare")]) == 0
    return out / "report" / "index.html", out / "compare" / "index.html"


def direct_layer_mean(seed: int, stat: str, param: str, full: bool) -> float:
    values = spectrum_values(seed, stat, param)
    if full and stat == "nuclear_norm" and param == NAN_LAYER:
        values = np.delete(values, 2)  # the NaN step is left out of the layer's average
    return float(np.mean(values))


def test_layer_family_and_order() -> None:
    assert report.layer_family("model.layers.3.attn.q_proj.weight") == "model.layers.*.attn.q_proj.weight"
    assert report.layer_family("transformer.h.11.attn.c_attn.weight.q") == "transformer.h.*.attn.c_attn.weight.q"
    assert report.layer_family("0.weight") == "*.weight"
    assert report.layer_family("encoder.block.2.layer.0.fc.weight") == "encoder.block.*.layer.*.fc.weight"
    assert report.layer_family("fc1.weight") == "fc1.weight"
    names = [f"layers.{i}.w" for i in (10, 2, 1)]
    assert sorted(names, key=report.natural_key) == ["layers.1.w", "layers.2.w", "layers.10.w"]
    tags = ["grad_spectrum/nuclear_norm/layers.10.w", "grad_spectrum/nuclear_norm/layers.2.w",
            "grad_spectrum/mad/nuclear_norm/layers.*.w", "grad_spectrum/nonfinite_layers",
            "grad_spectrum/per_example/stable_rank/layers.0.w", "sharpness/lambda_max"]
    assert report.spectrum_layers(tags) == {"nuclear_norm": {"layers.*.w": ["layers.2.w", "layers.10.w"]},
                                            "per_example/stable_rank": {"layers.*.w": ["layers.0.w"]}}


def test_load_run_reads_scalars_and_records(runs: tuple[Path, Path]) -> None:
    run = report.load_run(runs[0])
    assert run.event_dir == runs[0]
    assert run.spectra() == {stat: FAMILIES for stat in STATS}
    nan_series = run.scalars[f"grad_spectrum/nuclear_norm/{NAN_LAYER}"]
    assert nan_series.steps.tolist() == list(STEPS)
    assert math.isnan(nan_series.values[2])
    np.testing.assert_allclose(run.scalars["sharpness/threshold"].values, 38.0)
    assert [r["step"] for r in run.signals] == list(STEPS) and run.signals[0]["pairs"][0]["a"] == [3, 17]
    assert run.alerts[0]["rule"] == "sharpness_over_threshold"
    values, steps = report.layer_matrix(run, "nuclear_norm", FAMILIES["model.layers.*.attn.q_proj.weight"])
    assert values.shape == (4, len(STEPS)) and steps.tolist() == list(STEPS)
    assert np.isnan(values).sum() == 1 and np.isnan(values[1, 2])


def test_stability_tags_split_per_layer_and_run_wide() -> None:
    per_layer, run_wide = report.stability_layers([
        "stability/attention/max_logit", "stability/attention/max_logit/h.1.attn",
        "stability/attention/max_logit/h.0.attn",
        "stability/update_ratio/h.0.mlp.weight", "stability/spike/loss", "sharpness/lambda_max"])
    assert per_layer == {"attention/max_logit": {"h.*.attn": ["h.0.attn", "h.1.attn"]},
                         "update_ratio": {"h.*.mlp.weight": ["h.0.mlp.weight"]}}
    assert run_wide == ["stability/attention/max_logit", "stability/spike/loss"]


def test_load_run_from_a_parent_directory(tmp_path: Path) -> None:
    write_fake_run(tmp_path / "lightning_logs" / "version_0", seed=0, full=False)
    run = report.load_run(tmp_path)
    assert run.event_dir == tmp_path / "lightning_logs" / "version_0"
    write_fake_run(tmp_path / "lightning_logs" / "version_1", seed=1, full=False)
    with pytest.raises(report.RunDirError, match="holds 2 runs with gradwatch data; pass one of them"):
        report.load_run(tmp_path)


def test_compare_rd_matches_direct_computation(runs: tuple[Path, Path]) -> None:
    comparisons = report.compare_runs(report.load_run(runs[0]), report.load_run(runs[1]))
    assert [(c.statistic, c.family) for c in comparisons] == [(s, f) for s in STATS for f in FAMILIES]
    for c in comparisons:
        params = FAMILIES[c.family]
        a = np.array([direct_layer_mean(0, c.statistic, p, full=True) for p in params])
        b = np.array([direct_layer_mean(1, c.statistic, p, full=False) for p in params])
        expected = np.mean(np.abs(a - b) / np.abs(a))
        assert c.params == tuple(params) and c.layers_used == len(params)
        np.testing.assert_allclose(c.a, a, rtol=1e-6)
        np.testing.assert_allclose(c.b, b, rtol=1e-6)
        assert c.rd == pytest.approx(expected, rel=1e-6)
    assert report.compare_runs(report.load_run(runs[0]), report.load_run(runs[0]))[0].rd == 0.0


def test_relative_difference_skips_unusable_layers() -> None:
    rd, used = report.relative_difference(np.array([2.0, 0.0, np.nan, 4.0]), np.array([1.0, 5.0, 1.0, 5.0]))
    assert used == 2 and rd == pytest.approx((0.5 + 0.25) / 2)
    rd, used = report.relative_difference(np.array([0.0]), np.array([1.0]))
    assert used == 0 and math.isnan(rd)


def test_compare_command_prints_the_table(runs: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(runs[0]), str(runs[1]), "-o", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"statistic\s+family\s+layers\s+RD", out)
    rows = {(m[0], m[1]): float(m[3]) for m in re.findall(r"^(\w+)\s+(\S+)\s+(\d+)\s+([0-9.e+-]+)$", out, re.M)}
    for stat in STATS:
        for family, params in FAMILIES.items():
            a = np.array([direct_layer_mean(0, stat, p, full=True) for p in params])
            b = np.array([direct_layer_mean(1, stat, p, full=False) for p in params])
            assert rows[(stat, family)] == pytest.approx(np.mean(np.abs(a - b) / np.abs(a)), rel=1e-3)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(saved["rows"]) == len(STATS) * len(FAMILIES)
    assert str(tmp_path / "cmp" / "index.html") in out


def test_compare_without_common_layers(tmp_path: Path, runs: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("grad_spectrum/nuclear_norm/encoder.0.weight", 1.0, 1)
    assert main(["compare", str(runs[0]), str(tmp_path / "other"), "-o", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare" in err and "Traceback" not in err


def test_report_page_sections_and_figures(pages: tuple[Path, Path]) -> None:
    index = pages[0]
    page = index.read_text()
    for anchor in ("spectra", "sharpness", "signals", "stability", "alerts", "overhead"):
        assert f'id="{anchor}"' in page
    images = re.findall(r'<img src="([^"]+)"', page)
    # per statistic and family a heatmap, per statistic a MAD chart; sharpness; pair loss and the other
    # signals; stability's run-wide panels and its update-ratio heatmap; overhead
    # signals' last logged thumbnails (signals/pair_examples) as they were written
    assert len(images) == len(STATS) * (len(FAMILIES) + 1) + 7
    for src in images:
        data = (index.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and (len(data) > 1000 or "pair_examples" in src)
    (thumbs,) = [src for src in images if "pair_examples" in src]
    from io import BytesIO

    from PIL import Image

    picture = np.asarray(Image.open(BytesIO((index.parent / thumbs).read_bytes())).convert("RGB"))
    assert picture.shape == (36, 70, 3) and (picture == 255).all()  # the last step's image, whole
    assert f"Examples of the pairs at step {STEPS[-1]}" in page and 'width="140" height="72"' in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page  # records are escaped
    assert "lower the learning rate" in page and "ALARM" in page
    assert "model.layers.*.attn.q_proj.weight" in page


def test_report_leaves_out_absent_sections(runs: tuple[Path, Path], tmp_path: Path) -> None:
    page = report.write_report(report.load_run(runs[1]), tmp_path / "b").read_text()
    assert 'id="spectra"' in page
    for anchor in ("sharpness", "signals", "stability", "alerts", "overhead"):
        assert f'id="{anchor}"' not in page
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "alerts.jsonl").write_text(
        json.dumps({"step": 3, "rule": "loss_spike", "severity": "critical", "message": "loss jumped",
                    "evidence": {"loss": 9.0}, "remedies": []}) + "\n{torn line")
    page = report.write_report(report.load_run(tmp_path / "records"), tmp_path / "r").read_text()
    assert 'id="alerts"' in page and 'id="spectra"' not in page and "loss jumped" in page


def test_report_on_a_directory_without_gradwatch_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from torch.utils.tensorboard import SummaryWriter

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no gradwatch data" in err and "no TensorBoard event files" in err
    with SummaryWriter(str(tmp_path / "hf")) as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    assert main(["report", str(tmp_path / "hf")]) == 2
    assert "only other tags (train/loss)" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "hf"), str(tmp_path / "nope")]) == 2
    assert "no gradwatch data" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "gradwatch-report").exists()


@pytest.mark.skipif(chromium_path() is None, reason="headless Chromium is not installed "
                                                     "(Debian: apt-get install -y chromium)")
def test_pages_render_in_headless_chromium(pages: tuple[Path, Path]) -> None:
    results = open_pages([p.resolve().as_uri() for p in pages])
    for page, result in zip(pages, results):
        assert result.title.startswith("gradwatch")
        assert result.errors == [], f"{page}: {result.errors}"
        expected = len(re.findall(r"<img ", page.read_text()))
        assert len(result.images) == expected > 0
        for image in result.images:
            assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image


def test_report_without_matplotlib_says_what_to_install(runs: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(runs[0]), "-o", str(tmp_path / "r")]) == 2
    assert "pip install 'gradwatch[report]'" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), str(runs[1]), "-o", str(tmp_path / "c")]) == 2
    assert "need matplotlib" in capsys.readouterr().err
