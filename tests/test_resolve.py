"""Every option through every surface, and the precedence between any two surfaces (``gradwatch.resolve``).

The surfaces, highest precedence first: ``GradWatch(...)`` keywords (LightningCLI ``init_args`` are keywords
too), the options given to a ``WatchConfig`` passed to it, HF ``gradwatch_*`` fields, ``gradwatch run``
options (which set the variable for the script), ``GRADWATCH_*`` variables, defaults. Each case builds the
real callbacks (Lightning's and the HF Trainer's), with the launcher run in-process on a one-line script.

The option table is derived from the knobs (general options and every family field), so a new option or
family field is covered without an edit here; an option that has no knob states why (:func:`unreachable`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gradwatch
from gradwatch.cadence import Cadence
from gradwatch.config import WatchConfig
from gradwatch.integrations.env_knobs import env_var, knob_text, option_flag
from gradwatch.knobs import Knob, knob_value, knobs, unreachable
from gradwatch.options import GENERAL_OPTIONS, NOT_GIVEN, OPTIONS
from gradwatch.registry import families

SURFACES = ("keyword", "config", "hf", "launcher", "env")  # highest precedence first
# Values the picker cannot find from the type and default alone.
_PICKS: dict[str, tuple[Any, Any]] = {
    "include": (("a*", "b*"), ("c*",)), "exclude": (("*bias",), ("*norm*", "x")),
    "log_dir": ("/tmp/gw-a", "/tmp/gw-b"), "max_overhead": (0.2, 0.3),
    "spectra_stats": (("nuclear_norm",), ("effective_rank", "top1_ratio")),
    "moe_routers": (("router",), ("gate", "w_gate")),
    # each must hold rank_by's default (effective_rank), and rank_by must be one of stats' default
    "example_quality_stats": (("effective_rank", "nuclear_norm"), ("spectral_norm", "effective_rank")),
    "example_quality_rank_by": ("nuclear_norm", "stable_rank"),
}


def _family(knob: Knob) -> Any:
    return next(f for f in families() if f.key == knob.family)


def _valid(knob: Knob, value: Any) -> bool:
    try:
        _expected(knob, value)
    except ValueError:
        return False
    return True


def _expected(knob: Knob, value: Any) -> Any:
    """The value the resolved config holds for ``value`` (normalized as the option or the config does)."""
    value = knob_value(knob, value)
    if knob.family is None:
        return OPTIONS[knob.name].check(knob.name, value)
    fam = _family(knob)
    if knob.field == "every":
        return None if value == 0 else Cadence.every(value)
    return getattr(fam.config_class(**{knob.field: value}), knob.field)  # type: ignore[arg-type]


def picks(knob: Knob) -> tuple[Any, Any]:
    """Two different valid values of ``knob``: the first differs from its default."""
    if knob.name in _PICKS:
        return _PICKS[knob.name]
    if knob.field == "every":
        return 3, 4
    if knob.choices:
        other = [c for c in knob.choices if c != knob.default]
        return other[0], (knob.default if knob.default is not None else other[1])
    if knob.type is bool:
        return (True, False) if knob.default is None else (not knob.default, knob.default)
    d = knob.default
    if knob.type is int:
        candidates = [1, 2, 3] if d is None else [d + 1, d + 2, 2 * d, d - 1, 1, 2]
    else:
        candidates = [0.25, 0.5] if d is None else [d * 0.5, d * 0.75, d * 1.5, d * 2, 0.25, 0.5, 0.75]
    good = [c for c in dict.fromkeys(candidates) if c != d and _valid(knob, c)]
    assert len(good) >= 2, f"no two valid values found for {knob.name}: add it to _PICKS"
    return good[0], good[1]


def _read(config: WatchConfig, knob: Knob) -> Any:
    if knob.family is None:
        return getattr(config, knob.name)
    fam_config = getattr(config, knob.family)
    if knob.field == "every":
        return None if fam_config is None else fam_config.every
    assert fam_config is not None, f"{knob.family} is off"
    return getattr(fam_config, knob.field)  # type: ignore[arg-type]


# ---- the surfaces ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    keyword: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    hf: dict[str, Any] = dataclasses.field(default_factory=dict)
    launcher: dict[str, str] = dataclasses.field(default_factory=dict)  # option flag -> text
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def _code_value(knob: Knob, value: Any) -> tuple[str, Any]:
    """(keyword, value) giving ``value`` in code: a family field as its config (taken whole)."""
    if knob.family is None:
        return knob.name, list(value) if knob.sequence else value
    if knob.field == "every":
        return knob.family, value
    fam = _family(knob)
    return knob.family, fam.config_class(**{knob.field: knob_value(knob, value)})  # type: ignore[arg-type]


def give(setup: Setup, surface: str, knob: Knob, value: Any) -> None:
    if surface in ("keyword", "config"):
        key, code = _code_value(knob, value)
        getattr(setup, surface)[key] = code
    elif surface == "hf":
        setup.hf["gradwatch_" + knob.name] = ",".join(value) if knob.sequence else value
    elif surface == "launcher":
        setup.launcher[option_flag(knob.name)] = _text(knob, value)
    else:
        setup.env[env_var(knob.name)] = _text(knob, value)


def _text(knob: Knob, value: Any) -> str:
    if value is None:
        return "none"
    return ",".join(value) if knob.sequence else knob_text(knob, value)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in [v for v in os.environ if v.startswith("GRADWATCH_")]:
        monkeypatch.delenv(var)
    saved_env, saved_argv, saved_path = dict(os.environ), list(sys.argv), list(sys.path)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    sys.argv[:], sys.path[:] = saved_argv, saved_path


@pytest.fixture(scope="module")
def hosts() -> dict[str, Any]:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from gradwatch.callbacks.lightning import GradWatch as LightningGradWatch
    from gradwatch.callbacks.transformers import GradWatch as HFGradWatch
    from gradwatch.integrations.huggingface import GradWatchArguments

    return {"lightning": LightningGradWatch, "hf": HFGradWatch, "arguments": GradWatchArguments}


def resolve(setup: Setup, hosts: dict[str, Any], tmp_path: Path) -> dict[str, WatchConfig]:
    """The config each callback resolves for ``setup`` (the launcher run in-process on a script that builds
    them; the HF callback reads the fields as at ``on_init_end``)."""
    os.environ.update(setup.env)

    def build() -> dict[str, WatchConfig]:
        config = WatchConfig(**setup.config) if setup.config else None
        out = {}
        if not setup.hf:
            out["lightning"] = hosts["lightning"](config, **setup.keyword).config
        callback = hosts["hf"](config, **setup.keyword)
        callback.read_training_args(hosts["arguments"](**setup.hf))
        out["hf"] = callback.config
        return out

    if not setup.launcher:
        return build()
    from gradwatch import cli

    probe = types.ModuleType("_gw_resolve_probe")
    probe.build, probe.result = build, None  # type: ignore[attr-defined]
    sys.modules[probe.__name__] = probe
    script = tmp_path / "train.py"
    script.write_text("import _gw_resolve_probe as p\np.result = p.build()\n")
    try:
        assert cli.main(["run", *itertools.chain(*setup.launcher.items()), str(script)]) == 0
    finally:
        del sys.modules[probe.__name__]
    return probe.result  # type: ignore[attr-defined,return-value]


def _switch_on(setup: Setup, knob: Knob) -> None:
    """A family field is read only with its family on: switched on from the environment, at its default
    cadence (the lowest surface, so that it decides nothing else)."""
    if knob.family is not None and knob.field != "every":
        setup.env.setdefault(env_var(f"{knob.family}_every"), "-1")


ALL_KNOBS = knobs()
# The precedence between every two surfaces, for every general option and, per family, `every` and one field.
_PAIR_KNOBS = [k for k in ALL_KNOBS if k.family is None or k.field == "every"]
_PAIR_KNOBS += [next(k for k in ALL_KNOBS if k.family == f.key and k.field != "every") for f in families()]


def test_every_option_and_family_field_is_a_knob_or_says_why() -> None:
    names = {k.name for k in ALL_KNOBS}
    why = unreachable()
    for option in GENERAL_OPTIONS:
        assert (option.name in names) != (option.name in why), option.name
        assert option.knob is not None or why[option.name]
    for fam in families():
        for f in dataclasses.fields(fam.config_class):
            assert (f"{fam.key}_{f.name}" in names) != (f"{fam.key}.{f.name}" in why), (fam.key, f.name)
    assert "log_dir" in names  # it has a knob now
    assert set(why) >= {"loss_fn", "on_alert"}  # callables: code only


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("knob", ALL_KNOBS, ids=lambda k: k.name)
def test_every_option_through_every_surface(knob: Knob, surface: str, hosts: dict[str, Any], clean_env: None,
                                            tmp_path: Path) -> None:
    value, _ = picks(knob)
    setup = Setup()
    give(setup, surface, knob, value)
    _switch_on(setup, knob)
    for host, config in resolve(setup, hosts, tmp_path).items():
        assert _read(config, knob) == _expected(knob, value), (host, knob.name, surface)


@pytest.mark.parametrize(("high", "low"), list(itertools.combinations(SURFACES, 2)))
@pytest.mark.parametrize("knob", _PAIR_KNOBS, ids=lambda k: k.name)
def test_precedence_between_any_two_surfaces(knob: Knob, high: str, low: str, hosts: dict[str, Any],
                                             clean_env: None, tmp_path: Path) -> None:
    first, second = picks(knob)
    setup = Setup()
    give(setup, low, knob, second)
    give(setup, high, knob, first)
    _switch_on(setup, knob)
    for host, config in resolve(setup, hosts, tmp_path).items():
        assert _read(config, knob) == _expected(knob, first), (host, knob.name, high, low)


@pytest.mark.parametrize(("high", "low"), list(itertools.combinations(SURFACES, 2)))
@pytest.mark.parametrize("knob", _PAIR_KNOBS, ids=lambda k: k.name)
def test_an_explicit_default_beats_a_lower_surface(knob: Knob, high: str, low: str, hosts: dict[str, Any],
                                                   clean_env: None, tmp_path: Path) -> None:
    """No "equal to the default means not given": ``gradwatch_spectra_every=50`` beats
    ``GRADWATCH_SPECTRA_EVERY=7``."""
    default = knob.default
    if default is None and high == "hf":
        pytest.skip("an HF field of None is the field left out")
    first, _ = picks(knob)
    setup = Setup()
    give(setup, low, knob, first)
    give(setup, high, knob, default)
    _switch_on(setup, knob)
    for host, config in resolve(setup, hosts, tmp_path).items():
        assert _read(config, knob) == _expected(knob, default), (host, knob.name, high, low)


# ---- LightningCLI (jsonargparse, as LightningCLI reads the callback's signature) --------------------


@pytest.fixture(scope="module")
def yaml_parser(hosts: dict[str, Any]) -> Any:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(hosts["lightning"], "callback")
    return parser


def _from_yaml(parser: Any, init_args: dict[str, Any]) -> WatchConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = parser.parse_object({"callback": init_args})
        return parser.instantiate_classes(cfg).callback.config


def _yaml_value(knob: Knob, value: Any) -> tuple[str, Any]:
    if knob.family is None:
        return knob.name, list(value) if knob.sequence else value
    if knob.field == "every":
        return knob.family, value
    return knob.family, {knob.field: list(value) if knob.sequence else value}


@pytest.mark.parametrize("knob", ALL_KNOBS, ids=lambda k: k.name)
def test_every_option_through_lightningcli_yaml_and_over_the_environment(knob: Knob, yaml_parser: Any,
                                                                         clean_env: None) -> None:
    value, other = picks(knob)
    key, text = _yaml_value(knob, value)
    assert _read(_from_yaml(yaml_parser, {key: text}), knob) == _expected(knob, value)
    os.environ[env_var(knob.name)] = _text(knob, other)  # below init_args
    if knob.family is not None and knob.field != "every":
        os.environ[env_var(f"{knob.family}_every")] = "-1"
    assert _read(_from_yaml(yaml_parser, {key: text}), knob) == _expected(knob, value)
    if knob.default is not None or knob.family is None:
        key, text = _yaml_value(knob, knob.default)  # an explicit default in the YAML beats the environment
        assert _read(_from_yaml(yaml_parser, {key: text}), knob) == _expected(knob, knob.default)
    if knob.family is None or knob.field == "every":  # left out of the YAML: the environment decides
        assert _read(_from_yaml(yaml_parser, {}), knob) == _expected(knob, other)


def test_lightningcli_shows_and_saves_an_option_left_out_as_unset(yaml_parser: Any, clean_env: None) -> None:
    cfg = yaml_parser.parse_object({"callback": {"max_overhead": 0.3}})
    assert cfg.callback.include is NOT_GIVEN and cfg.callback.max_overhead == 0.3
    dumped = yaml_parser.dump(cfg)
    assert "include: unset" in dumped and "max_overhead: 0.3" in dumped
    again = yaml_parser.parse_string(dumped)  # a saved config.yaml reads back
    assert again.callback.include is NOT_GIVEN


# ---- the rules behind the table --------------------------------------------------------------------


def test_a_family_switch_and_its_fields_resolve_separately(clean_env: None) -> None:
    from gradwatch.resolve import resolve_config

    env = {"GRADWATCH_SPECTRA_EVERY": "7", "GRADWATCH_SPECTRA_METHOD": "svdvals", "GRADWATCH_SHARPNESS_EVERY": "9"}
    config = resolve_config(keywords={"spectra": True, "sharpness": False}, environ=env)
    assert config.spectra.every == Cadence.every(7) and config.spectra.method == "svdvals"  # True: on, fields below
    assert config.sharpness is None  # off in code beats on in the environment
    config = resolve_config(keywords={"spectra": 10}, environ=env)  # an int: its every; the method from below
    assert config.spectra.every == Cadence.every(10) and config.spectra.method == "svdvals"
    whole = gradwatch.SpectraConfig(every=5)
    config = resolve_config(keywords={"spectra": whole}, environ=env)  # a config object is taken whole
    assert config.spectra == whole
    config = resolve_config(WatchConfig(spectra=whole), {"spectra": 3}, environ=env)  # keywords over a config
    assert config.spectra == dataclasses.replace(whole, every=3)
    config = resolve_config(environ={"GRADWATCH_SPECTRA_EVERY": "0", "GRADWATCH_SPECTRA_METHOD": "svdvals"})
    assert config.spectra is None
    config = resolve_config(environ={"GRADWATCH_SIGNALS_EVERY": "-1"})
    assert config.signals.every == Cadence.within_budget(minimum=10)  # -1: on at its own default


def test_a_config_object_leaves_what_it_was_not_given_to_the_environment(clean_env: None) -> None:
    from gradwatch.resolve import resolve_config

    env = {"GRADWATCH_SPECTRA_EVERY": "7", "GRADWATCH_MAX_OVERHEAD": "0.3"}
    config = resolve_config(WatchConfig(on_error="raise"), environ=env)
    assert config.on_error == "raise" and config.max_overhead == 0.3 and config.spectra.every == Cadence.every(7)
    config = resolve_config(WatchConfig(max_overhead=0.05), environ=env)  # given, equal to its default
    assert config.max_overhead == 0.05
    config = resolve_config(WatchConfig().replace(max_overhead=0.05), environ=env)
    assert config.max_overhead == 0.05


@pytest.mark.parametrize(("surface", "needle"), [
    ("keyword", "`include` expected at least one glob pattern"),
    ("config", "`include` expected at least one glob pattern"),
    ("hf", "gradwatch_include=',' is not valid: `include` expected at least one glob pattern"),
    ("env", "GRADWATCH_INCLUDE=',' is not valid: `include` expected at least one glob pattern"),
    ("launcher", "--include=',' is not valid: `include` expected at least one glob pattern"),
])
def test_an_empty_include_fails_the_same_on_every_surface(surface: str, needle: str, hosts: dict[str, Any],
                                                          clean_env: None, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """An empty ``include`` would watch nothing: it raises from code, fields, variables and the launcher
    alike (it once became ``('*',)`` through the knobs). An empty variable is a variable left unset."""
    setup = Setup()
    if surface in ("keyword", "config"):
        getattr(setup, surface)["include"] = []
    elif surface == "hf":
        setup.hf["gradwatch_include"] = ","
    elif surface == "env":
        setup.env["GRADWATCH_INCLUDE"] = ","
    if surface == "launcher":
        from gradwatch import cli

        (script := tmp_path / "train.py").write_text("pass\n")
        assert cli.main(["run", "--include", ",", str(script)]) == 2
        assert needle.replace("'", "") in capsys.readouterr().err.replace("'", "")
        return
    with pytest.raises(ValueError) as info:
        resolve(setup, hosts, tmp_path)
    assert needle in str(info.value), str(info.value)
    os.environ["GRADWATCH_INCLUDE"] = ""
    assert resolve(Setup(), hosts, tmp_path)["hf"].include == ("*",)


def test_a_misspelled_variable_is_named_in_one_warning_with_the_closest_name(clean_env: None) -> None:
    from gradwatch.integrations import env_knobs
    from gradwatch.resolve import resolve_config

    env_knobs._WARNED.clear()
    env = {"GRADWATCH_SPECTRA_EVRY": "7", "GRADWATCH_MAX_OVERHEED": "0.1", "GRADWATCH_SPECTRA_EVERY": "5"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = resolve_config(environ=env)
        resolve_config(environ=env)  # once per process
    assert config.spectra.every == Cadence.every(5)
    (warning,) = [w for w in caught if "GRADWATCH_" in str(w.message)]
    text = str(warning.message)
    assert "GRADWATCH_SPECTRA_EVRY (did you mean GRADWATCH_SPECTRA_EVERY?)" in text
    assert "GRADWATCH_MAX_OVERHEED (did you mean GRADWATCH_MAX_OVERHEAD?)" in text
    env_knobs._WARNED.clear()


def test_bad_values_name_their_surface(hosts: dict[str, Any], clean_env: None) -> None:
    from gradwatch.integrations.env_knobs import KnobValueError
    from gradwatch.resolve import resolve_config

    with pytest.raises(KnobValueError, match=r"GRADWATCH_SPECTRA_EVERY='ten' is not valid: expected an integer"):
        resolve_config(environ={"GRADWATCH_SPECTRA_EVERY": "ten"})
    with pytest.raises(KnobValueError, match=r"GRADWATCH_SHARPNESS_PROBE_SIZE=0 is not valid"):
        resolve_config(environ={"GRADWATCH_SHARPNESS_PROBE_SIZE": "0"})  # a family that is off is checked too
    with pytest.raises(ValueError, match=r"gradwatch_spectra_method='fast' is not valid"):
        hosts["arguments"](gradwatch_spectra_method="fast")
    with pytest.raises(ValueError, match=r"`max_overhead` expected a number in \[0.0, 1.0\], got 2"):
        hosts["lightning"](max_overhead=2)
