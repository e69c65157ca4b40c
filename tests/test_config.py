"""WatchConfig, the family configs and Cadence: every bad input fails at construction with a message that
names the field, the value given and what was expected (the valid choices where there is a list)."""

from __future__ import annotations

import math
import re

import pytest

import gradwatch
import gradwatch.registry
from gradwatch.config import (
    ON_ERROR_CHOICES,
    SPECTRUM_METHODS,
    SPECTRUM_STATS,
    Cadence,
    SharpnessConfig,
    SpectraConfig,
    WatchConfig,
    as_cadence,
)

STATS_LIST = re.escape(str(list(SPECTRUM_STATS)))


def _msg(field: str, expected: str, value: object) -> str:
    """The regex of ``gradwatch: `field` expected <expected>, got <repr(value)>``."""
    return re.escape(f"gradwatch: `{field}` expected {expected}, got {value!r}")


# ---- Cadence ---------------------------------------------------------------------------------------------


def test_every_due_at_multiples_and_step_one() -> None:
    c = Cadence.every(10)
    due = [t for t in range(1, 61) if c.is_due(t)]
    assert due == [1, 10, 20, 30, 40, 50, 60]


def test_every_first_false() -> None:
    c = Cadence.every(10, first=False)
    assert [t for t in range(1, 61) if c.is_due(t)] == [10, 20, 30, 40, 50, 60]
    assert [t for t in range(1, 6) if Cadence.every(1, first=False).is_due(t)] == [1, 2, 3, 4, 5]


def test_log_spaced_per_decade_4() -> None:
    c = Cadence.log_spaced(per_decade=4)
    due = [t for t in range(1, 1001) if c.is_due(t)]
    expected = sorted({round(10 ** (k / 4)) for k in range(0, 13)})
    assert due == expected
    assert due == [1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000]


@pytest.mark.parametrize("per_decade", [1, 3, 5, 10, 20])
def test_log_spaced_other_densities(per_decade: int) -> None:
    c = Cadence.log_spaced(per_decade)
    due = [t for t in range(1, 3001) if c.is_due(t)]
    expected = sorted({round(10 ** (k / per_decade)) for k in range(0, 4 * per_decade + 1)} & set(range(1, 3001)))
    assert due == expected


def test_at_explicit_steps() -> None:
    c = Cadence.at([7, 3, 7, 100])
    assert [t for t in range(1, 201) if c.is_due(t)] == [3, 7, 100]
    assert not any(Cadence.at([]).is_due(t) for t in range(1, 50))


def test_union() -> None:
    c = Cadence.every(25, first=False) | Cadence.at([1, 7]) | Cadence.log_spaced(per_decade=1)
    assert [t for t in range(1, 101) if c.is_due(t)] == [1, 7, 10, 25, 50, 75, 100]
    with pytest.raises(TypeError):
        Cadence.every(2) | 5  # type: ignore[operator]


def test_cadence_equality_and_hash() -> None:
    assert Cadence.every(5) == Cadence.every(5)
    assert Cadence.every(5) != Cadence.every(5, first=False)
    assert Cadence.every(5) != Cadence.every(6)
    assert Cadence.log_spaced(4) == Cadence.log_spaced(per_decade=4)
    assert Cadence.at([3, 1]) == Cadence.at([1, 3, 3])
    assert len({Cadence.every(5), Cadence.every(5), Cadence.at([2])}) == 2
    # configs built from the same values compare equal (they hold Cadences)
    assert SpectraConfig() == SpectraConfig()
    assert WatchConfig(sharpness=True) == WatchConfig(sharpness=SharpnessConfig())
    assert SpectraConfig(every=10) != SpectraConfig(every=20)


def test_cadence_repr() -> None:
    assert repr(Cadence.every(50)) == "Cadence.every(50)"
    assert repr(Cadence.every(50, first=False)) == "Cadence.every(50, first=False)"
    assert repr(Cadence.every(3) | Cadence.at([9, 2])) == "Cadence.every(3) | Cadence.at([2, 9])"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None])
def test_cadence_every_bad(bad: object) -> None:
    with pytest.raises(ValueError, match=_msg("every", "an int >= 1", bad)):
        Cadence.every(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_cadence_log_spaced_bad(bad: object) -> None:
    with pytest.raises(ValueError, match=_msg("per_decade", "an int >= 1", bad)):
        Cadence.log_spaced(bad)  # type: ignore[arg-type]


def test_cadence_at_bad() -> None:
    with pytest.raises(ValueError, match=_msg("steps", "an int >= 1", 0)):
        Cadence.at([5, 0])
    with pytest.raises(ValueError, match=_msg("steps", "an int >= 1", 2.0)):
        Cadence.at([2.0])  # type: ignore[list-item]


def test_as_cadence() -> None:
    c = as_cadence("x", 7)
    assert c == Cadence.every(7)
    same = Cadence.at([4])
    assert as_cadence("x", same) is same
    for bad in (0, -2, 1.0, True, "7", None):
        with pytest.raises(ValueError, match=_msg("x", "a positive int or a gradwatch.Cadence", bad)):
            as_cadence("x", bad)


# ---- SpectraConfig ---------------------------------------------------------------------------------------


def test_spectra_defaults() -> None:
    c = SpectraConfig()
    assert c.every == Cadence.every(50)
    assert c.stats == SPECTRUM_STATS
    assert c.method == "gram"
    assert c.mad is True and c.per_example is False
    assert c.embeddings is None and c.output_head is None  # deprecated here: WatchConfig(embeddings=...)
    assert c.heatmap_every == Cadence.every(500)
    assert SpectraConfig(heatmap_every=0).heatmap_every is None
    assert SpectraConfig(stats=["top1_ratio", "nuclear_norm"]).stats == ("top1_ratio", "nuclear_norm")
    cad = Cadence.log_spaced(3)
    assert SpectraConfig(every=cad).every is cad


@pytest.mark.parametrize("field", ["every", "per_example_every", "heatmap_every"])
@pytest.mark.parametrize("bad", [-1, 1.5, "50"])
def test_spectra_cadence_fields(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=_msg(f"SpectraConfig.{field}", "a positive int or a gradwatch.Cadence", bad)):
        SpectraConfig(**{field: bad})


def test_spectra_every_zero() -> None:
    with pytest.raises(ValueError, match=_msg("SpectraConfig.every", "a positive int or a gradwatch.Cadence", 0)):
        SpectraConfig(every=0)


def test_spectra_unknown_statistic() -> None:
    with pytest.raises(ValueError, match=r"`SpectraConfig\.stats` expected a non-empty list drawn from " + STATS_LIST
                                         + r" \('nuclear' is not one of them\), got \['spectral_norm', 'nuclear'\]"):
        SpectraConfig(stats=["spectral_norm", "nuclear"])


def test_spectra_stats_string_and_empty() -> None:
    with pytest.raises(ValueError, match=r"`SpectraConfig\.stats` expected a list drawn from " + STATS_LIST
                                         + r", got 'nuclear_norm'"):
        SpectraConfig(stats="nuclear_norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`SpectraConfig\.stats` expected a non-empty list drawn from " + STATS_LIST
                                         + r" \(it is empty\), got \[\]"):
        SpectraConfig(stats=[])
    with pytest.raises(ValueError, match=r"`SpectraConfig\.stats` expected a list drawn from .*, got 3"):
        SpectraConfig(stats=3)  # type: ignore[arg-type]


def test_spectra_unknown_method() -> None:
    with pytest.raises(ValueError, match=_msg("SpectraConfig.method", f"one of {list(SPECTRUM_METHODS)}", "svd")):
        SpectraConfig(method="svd")  # type: ignore[arg-type]
    assert "['gram', 'gram32', 'svdvals']" in str(list(SPECTRUM_METHODS))


@pytest.mark.parametrize("field", ["mad", "embeddings", "output_head", "per_example"])
def test_spectra_bool_fields(field: str) -> None:
    with pytest.raises(ValueError, match=_msg(f"SpectraConfig.{field}", "True or False", "yes")):
        SpectraConfig(**{field: "yes"})
    with pytest.raises(ValueError, match=_msg(f"SpectraConfig.{field}", "True or False", 1)):
        SpectraConfig(**{field: 1})


def test_spectra_per_example_size() -> None:
    with pytest.raises(ValueError, match=_msg("SpectraConfig.per_example_size", "an int >= 1", 0)):
        SpectraConfig(per_example_size=0)


def test_spectra_shard_buffer_bytes() -> None:
    assert SpectraConfig().shard_buffer_bytes == 16 * 2**20
    with pytest.raises(ValueError, match=_msg("SpectraConfig.shard_buffer_bytes", "an int >= 4096", 100)):
        SpectraConfig(shard_buffer_bytes=100)


# ---- SharpnessConfig -------------------------------------------------------------------------------------


def test_sharpness_defaults() -> None:
    c = SharpnessConfig()
    assert (c.probe_size, c.max_iter, c.tol, c.top_k, c.trace_samples) == (256, 50, 1e-3, 1, 0)
    assert c.every == Cadence.every(500)
    assert SharpnessConfig(top_k=5, max_iter=5).top_k == 5
    assert SharpnessConfig(tol=0.5).tol == 0.5
    assert SharpnessConfig(tol=0.25).tol == 0.25
    assert SharpnessConfig(trace_samples=0).trace_samples == 0


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"every": 0}, _msg("SharpnessConfig.every", "a positive int or a gradwatch.Cadence", 0)),
    ({"probe_size": 0}, _msg("SharpnessConfig.probe_size", "an int >= 1", 0)),
    ({"probe_size": 8.0}, _msg("SharpnessConfig.probe_size", "an int >= 1", 8.0)),
    ({"max_iter": 0}, _msg("SharpnessConfig.max_iter", "an int >= 1", 0)),
    ({"tol": 0.0}, _msg("SharpnessConfig.tol", "a number in (0.0, 0.5]", 0.0)),
    ({"tol": -1e-3}, _msg("SharpnessConfig.tol", "a number in (0.0, 0.5]", -1e-3)),
    ({"tol": 0.6}, _msg("SharpnessConfig.tol", "a number in (0.0, 0.5]", 0.6)),
    ({"tol": math.nan}, _msg("SharpnessConfig.tol", "a number in (0.0, 0.5]", math.nan)),
    ({"tol": "1e-3"}, _msg("SharpnessConfig.tol", "a number in (0.0, 0.5]", "1e-3")),
    ({"top_k": 0}, _msg("SharpnessConfig.top_k", "an int >= 1", 0)),
    ({"top_k": 6, "max_iter": 5}, _msg("SharpnessConfig.top_k", "an int <= max_iter (5)", 6)),
    ({"trace_samples": -1}, _msg("SharpnessConfig.trace_samples", "an int >= 0", -1)),
    ({"warm_start": "no"}, _msg("SharpnessConfig.warm_start", "True or False", "no")),
    ({"precondition": None}, _msg("SharpnessConfig.precondition", "True or False", None)),
])
def test_sharpness_bad(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SharpnessConfig(**kwargs)


# ---- WatchConfig -----------------------------------------------------------------------------------------


def test_watch_defaults() -> None:
    c = WatchConfig()
    assert isinstance(c.spectra, SpectraConfig)
    assert c.spectra == SpectraConfig()
    assert c.sharpness is None
    assert c.include == ("*",) and c.exclude == ()
    assert c.max_overhead == 0.05 and c.on_error == "warn" and c.log_dir is None and c.probe_seed == 0
    assert gradwatch.WatchConfig is WatchConfig


def test_watch_true_false_coercion() -> None:
    c = WatchConfig(spectra=False, sharpness=True)
    assert c.spectra is None
    assert isinstance(c.sharpness, SharpnessConfig) and c.sharpness == SharpnessConfig()
    assert WatchConfig(spectra=None).spectra is None
    custom = SharpnessConfig(every=10)
    assert WatchConfig(sharpness=custom).sharpness is custom
    assert WatchConfig(include="*.q_proj.weight").include == ("*.q_proj.weight",)
    assert WatchConfig(exclude=["a*", "b*"]).exclude == ("a*", "b*")
    assert WatchConfig(max_overhead=None).max_overhead is None
    assert WatchConfig(max_overhead=1).max_overhead == 1.0


@pytest.mark.parametrize(("field", "bad", "cls"), [
    ("spectra", "yes", "SpectraConfig"),
    ("spectra", -1, "SpectraConfig"),
    ("spectra", 2.5, "SpectraConfig"),
    ("spectra", SharpnessConfig(), "SpectraConfig"),
    ("sharpness", {"every": 5}, "SharpnessConfig"),
    ("sharpness", SpectraConfig(), "SharpnessConfig"),
])
def test_watch_family_wrong_type(field: str, bad: object, cls: str) -> None:
    expected = f"True, False, an int >= 0 (its `every`; 0: off), a gradwatch.Cadence or a gradwatch.{cls}"
    with pytest.raises(ValueError, match=_msg(field, expected, bad)):
        WatchConfig(**{field: bad})


def test_watch_family_int_or_cadence_is_its_every() -> None:
    """``GradWatch(spectra=10)`` (the callbacks' docstring example): an int for a family is its ``every``."""
    assert WatchConfig(spectra=10).spectra == SpectraConfig(every=10)
    assert WatchConfig(sharpness=1).sharpness == SharpnessConfig(every=1)
    assert WatchConfig(spectra=Cadence.at([1, 7])).spectra == SpectraConfig(every=Cadence.at([1, 7]))
    assert WatchConfig(spectra=0).spectra is None  # 0: off, as the knobs say


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("bad", [[1], ["*", ""], 5, [None]])
def test_watch_include_exclude_type(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=_msg(field, "a list of non-empty glob patterns (str)", bad)):
        WatchConfig(**{field: bad})


def test_watch_include_empty() -> None:
    with pytest.raises(ValueError, match=_msg("include", "at least one glob pattern, e.g. ['*']", [])):
        WatchConfig(include=[])


def test_watch_on_error() -> None:
    with pytest.raises(ValueError, match=_msg("on_error", f"one of {list(ON_ERROR_CHOICES)}", "ignore")):
        WatchConfig(on_error="ignore")  # type: ignore[arg-type]
    assert "['warn', 'raise']" == str(list(ON_ERROR_CHOICES))
    assert WatchConfig(on_error="raise").on_error == "raise"


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.inf, math.nan, True, "0.05"])
def test_watch_max_overhead(bad: object) -> None:
    with pytest.raises(ValueError, match=_msg("max_overhead", "a number in [0.0, 1.0]", bad)):
        WatchConfig(max_overhead=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("off", [0, 0.0, None])
def test_watch_max_overhead_zero_or_none_turns_the_budget_off(off: object) -> None:
    assert WatchConfig(max_overhead=off).max_overhead is None  # the same meaning as --gradwatch_max_overhead 0


def test_watch_other_fields() -> None:
    with pytest.raises(ValueError, match=_msg("log_dir", "a directory path (a non-empty str) or None", 3)):
        WatchConfig(log_dir=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=_msg("probe_seed", "an int in 0..18446744073709551615", -1)):
        WatchConfig(probe_seed=-1)
    with pytest.raises(ValueError, match=_msg("loss_fn", "a callable loss_fn(model, batch) -> Tensor[B]", "mse")):
        WatchConfig(loss_fn="mse")  # type: ignore[arg-type]


def test_from_kwargs() -> None:
    assert WatchConfig.from_kwargs() == WatchConfig()
    base = WatchConfig(on_error="raise")
    assert WatchConfig.from_kwargs(base) is base
    merged = WatchConfig.from_kwargs(base, sharpness=True, max_overhead=0.2)
    assert merged.on_error == "raise" and merged.max_overhead == 0.2 and isinstance(merged.sharpness, SharpnessConfig)
    assert WatchConfig.from_kwargs(spectra=False).spectra is None


def test_from_kwargs_sets_an_option_back_to_its_default() -> None:
    """No "equal to the default means not given": a keyword given is given, whatever its value."""
    base = WatchConfig(max_overhead=0.2, spectra=SpectraConfig(every=5))
    back = WatchConfig.from_kwargs(base, max_overhead=0.05, spectra=True)
    assert back.max_overhead == 0.05 and back.spectra == SpectraConfig()
    assert {"max_overhead", "spectra"} <= back.given
    assert WatchConfig.from_kwargs(base, max_overhead=gradwatch.NOT_GIVEN) is base  # LightningCLI's "left out"
    assert WatchConfig().given == frozenset() and WatchConfig(on_error="warn").given == {"on_error"}


def test_from_kwargs_unknown_option() -> None:
    valid = re.escape(str(["spectra", "sharpness", *[f.key for f in gradwatch.registry.families()][2:],
                           "include", "exclude", "embeddings", "output_head", "log_dir", "max_overhead",
                           "on_error", "probe_seed", "loss_fn", "on_alert", "alert_cooldown", "max_unshard_gb"]))
    with pytest.raises(ValueError, match=r"unknown option 'spectrum'; valid options are " + valid):
        WatchConfig.from_kwargs(spectrum=True)
    with pytest.raises(ValueError, match=r"unknown option 'every'"):
        WatchConfig.from_kwargs(WatchConfig(), every=5)


def test_from_kwargs_bad_config() -> None:
    with pytest.raises(ValueError, match=_msg("config", "a gradwatch.WatchConfig or None", {"spectra": True})):
        WatchConfig.from_kwargs({"spectra": True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=_msg("on_error", "one of ['warn', 'raise']", "loud")):
        WatchConfig.from_kwargs(WatchConfig(), on_error="loud")


def test_configs_are_frozen() -> None:
    c = WatchConfig()
    with pytest.raises(AttributeError):
        c.on_error = "raise"  # type: ignore[misc]


def test_watch_alert_options() -> None:
    with pytest.raises(ValueError, match=_msg("on_alert", "a callable on_alert(alert) or None", "print")):
        WatchConfig(on_alert="print")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=_msg("alert_cooldown", "an int >= 0", -5)):
        WatchConfig(alert_cooldown=-5)
    assert WatchConfig(on_alert=print).on_alert is print


def test_layer_selection_is_shared_and_spectra_fields_are_deprecated() -> None:
    assert WatchConfig(embeddings=True, output_head=True).embeddings is True
    with pytest.raises(ValueError, match=_msg("embeddings", "True or False", "yes")):
        WatchConfig(embeddings="yes")  # type: ignore[arg-type]
    with pytest.warns(DeprecationWarning, match=r"use WatchConfig\(embeddings=True\)"):
        cfg = WatchConfig(spectra=SpectraConfig(embeddings=True))
    assert cfg.embeddings is True


def test_config_is_immutable_and_replace_validates() -> None:
    cfg = WatchConfig()
    with pytest.raises(AttributeError, match="immutable"):
        cfg.include = ("x",)  # type: ignore[misc]
    assert cfg.replace(sharpness=True).sharpness == SharpnessConfig()
    assert cfg == WatchConfig() and cfg != cfg.replace(spectra=False)
    with pytest.raises(ValueError, match="probe_seed"):
        cfg.replace(probe_seed=-1)
