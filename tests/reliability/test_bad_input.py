"""Bad input, property-based: every option of the knob table (:func:`gradwatch.options.knobs`, so an option added
later is covered with no edit here), through every way of setting it, with values drawn by hypothesis (ints,
floats with NaN, infinities, negatives and 0, bools, text, None, lists, wrong types, cadences).

The code surface (``WatchConfig`` and the family config classes) is the reference; each other surface must agree
with it: a value it rejects raises ``ValueError`` (the launcher: exit status 2) whose message names the option as
that surface spells it and shows the value given; a value it accepts reads back equal in the resolved config.
Surfaces: ``GradWatch(...)`` keywords, a ``WatchConfig`` handed over, Hugging Face ``gradwatch_*`` fields and
``--gradwatch_*`` flags, ``GRADWATCH_*`` variables, ``gradwatch run --<name>`` and LightningCLI YAML (the
jsonargparse parse LightningCLI runs for ``trainer.callbacks``). Some promises hold whatever the reference says: no option takes a NaN, an
infinity, a negative number or a value of the wrong type.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.cadence import Cadence
from gradwatch.config import WatchConfig
from gradwatch.environment import env_var, knob_text, option_flag, parse_knob_text
from gradwatch.options import GENERAL_OPTIONS, Knob, knob_value, knobs
from gradwatch.registry import families
from gradwatch.resolve import resolve_config

KNOBS = knobs()
FAMILIES = {f.key: f for f in families()}
SETTINGS = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])
MANY = settings(SETTINGS, max_examples=8)  # the reference itself


def ids(k: Knob) -> str:
    return k.name


# ---- the values drawn ----------------------------------------------------------------------------------


def anything() -> st.SearchStrategy[Any]:
    """Values of every kind, for every knob: most of them are the wrong type for it."""
    return st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=2), st.just({"a": 1}))


def own_type(k: Knob) -> st.SearchStrategy[Any]:
    """Values of the knob's own type, valid or not: edge numbers, its choices, the default."""
    if k.type is bool:
        base = st.booleans()
    elif k.type is int:
        base = st.one_of(st.integers(-3, 3), st.integers(-10**9, 10**9), st.just(2**64))
    elif k.type is float:
        base = st.one_of(st.floats(-2, 2), st.floats(allow_nan=True), st.sampled_from([0.0, 1.0, 1e-9, 1e9]),
                         st.integers(-2, 3))
    elif k.choices or k.sequence:
        pool = list(k.choices or ()) + list(k.default or ()) + ["bogus", "", "*", "net.*"]
        word = st.sampled_from(pool)
        base = st.lists(word, min_size=0, max_size=3).map(tuple) if k.sequence else word
    else:
        base = st.one_of(st.text(max_size=8), st.sampled_from(["effective_rank", "stable_rank", "", "x"]))
    extra = [st.just(k.default)] + ([st.none()] if k.optional else [])
    if k.field == "every":
        extra.append(st.integers(1, 1000).map(Cadence.every))
    return st.one_of(base, *extra)


def values(k: Knob) -> st.SearchStrategy[Any]:
    return st.one_of(own_type(k), own_type(k), anything())


# ---- the reference: the code surface -------------------------------------------------------------------


def code_options(k: Knob, value: Any) -> dict[str, Any]:
    """``value`` of knob ``k`` as ``GradWatch(...)`` keywords (``<key>_every``: -1 on, 0 off, n its every)."""
    if k.family is None:
        return {k.name: value}
    if k.field == "every":
        if type(value) is int and value in (-1, 0):
            return {k.family: value == -1}
        return {k.family: FAMILIES[k.family].config_class(every=value)}
    return {k.family: FAMILIES[k.family].config_class(**{k.field: value})}


def read_back(k: Knob, config: WatchConfig) -> Any:
    if k.family is None:
        return getattr(config, k.name)
    fam = config.families.get(k.family)
    if k.field == "every":
        return None if fam is None else fam.every
    return getattr(fam, k.field)


def expected(k: Knob, value: Any) -> Any:
    """What reads back for an accepted ``value`` (the options' own normalization: a cadence from an int)."""
    cls = FAMILIES[k.family].config_class if k.family else None
    if k.family is None:
        return next(o for o in GENERAL_OPTIONS if o.name == k.name).check(k.name, value)
    if k.field == "every":
        if type(value) is int and value in (-1, 0):
            return None if value == 0 else cls().every
    return getattr(cls(**{k.field: value}), k.field)


def reference(k: Knob, value: Any) -> tuple[bool, Any]:
    """(True, what reads back) or (False, the message) of ``value`` set in code."""
    try:
        config = WatchConfig(**code_options(k, value))
    except ValueError as error:
        return False, str(error)
    return True, read_back(k, config)


def names(k: Knob) -> tuple[str, ...]:
    """How a code message may name the option: the knob, its field, the family config's field."""
    out = [k.name, f"`{k.field}`", f" {k.field}", f'"{k.field}"']  # ` level_window=2`: a limit set by another field
    if k.family:
        out += [f"{FAMILIES[k.family].config_class.__name__}.{k.field}", f"`{k.family}`"]
    return tuple(out)


def check_rejected(message: str, spellings: tuple[str, ...], shown: tuple[str, ...]) -> None:
    assert any(s in message for s in spellings), f"{message!r} names none of {spellings}"
    assert any(s in message for s in shown), f"{message!r} shows none of {shown}"


def shown(value: Any) -> tuple[str, ...]:
    out = [repr(value), str(value)]
    if isinstance(value, tuple):
        out.append(repr(list(value)))
    return tuple(out)


# ---- promises that need no reference ----------------------------------------------------------------


def never_valid(k: Knob, value: Any) -> bool:
    """NaN, infinities, negatives (``<key>_every``: below -1), and values of another type than the knob's."""
    if value is None:
        return not k.optional and k.field != "every"
    if isinstance(value, Cadence):
        return k.field != "every"
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < (-1 if k.field == "every" else 0):
        return True
    if k.type is bool:
        return not isinstance(value, bool)
    if k.type is int:
        return isinstance(value, bool) or not isinstance(value, int)
    if k.type is float:
        return isinstance(value, bool) or not isinstance(value, (int, float))
    if k.sequence:
        return not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)) and \
            not isinstance(value, str)
    return not isinstance(value, str)


@pytest.mark.parametrize("k", KNOBS, ids=ids)
@MANY
@given(data=st.data())
def test_code_rejects_what_no_option_takes_and_round_trips_the_rest(k: Knob, data: st.DataObject) -> None:
    value = data.draw(values(k))
    ok, got = reference(k, value)
    if never_valid(k, value):
        assert not ok, f"{k.name}={value!r} accepted as {got!r}"
    if ok:
        assert got == expected(k, value)
        assert WatchConfig(**code_options(k, value)) == WatchConfig(**code_options(k, value))
    else:
        check_rejected(got, names(k), shown(value))


# ---- the other surfaces agree with the reference ---------------------------------------------------------


def check_keywords_and_config_object(k: Knob, value: Any) -> None:
    ok, want = reference(k, value)
    for surface in ("keywords", "config"):
        try:
            opts = code_options(k, value)
            config = resolve_config(keywords=opts, environ={}) if surface == "keywords" else \
                resolve_config(WatchConfig(**opts), environ={})
        except ValueError as error:
            assert not ok, f"{surface}: {k.name}={value!r} rejected though valid in code: {error}"
            check_rejected(str(error), names(k), shown(value))
            continue
        assert ok and read_back(k, config) == want, (surface, k.name, value)


def typed(k: Knob, value: Any) -> Any:
    """A text surface's typed value as the knob takes it (a list knob's text split at commas)."""
    return knob_value(k, value)


def check_hf_field(k: Knob, value: Any) -> None:
    from gradwatch.integrations.huggingface import GradWatchArguments, config_from_training_args

    if value is None or isinstance(value, Cadence):  # None: not given; a cadence is not a field's type
        return
    try:
        ok, want = reference(k, typed(k, value))
    except ValueError:  # not even a list of text: the field must refuse it too
        ok, want = False, ""
    field = "gradwatch_" + k.name
    on = {f"gradwatch_{k.family}_every": -1} if k.family and k.field != "every" else {}  # its family on
    try:
        config = config_from_training_args(GradWatchArguments(**{field: value, **on}), environ={})
    except ValueError as error:
        assert not ok, f"{field}={value!r} rejected though valid in code: {error}"
        check_rejected(str(error), (field,), shown(value))
        return
    assert ok and read_back(k, config) == want, (field, value)


def texts(k: Knob) -> st.SearchStrategy[str]:
    """What a variable or option may hold: the text of a drawn value, or any text."""
    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else knob_text(k, v)
    return st.one_of(values(k).filter(lambda v: not isinstance(v, (Cadence, dict))).map(text),
                     st.text(max_size=6), st.sampled_from(["nan", "inf", "-1", "1e3", " 2 ", "none", "true"]))


def family_on(k: Knob) -> dict[str, str]:
    """``GRADWATCH_<KEY>_EVERY=-1`` for a family's field (its family on, so the field reads back)."""
    return {env_var(f"{k.family}_every"): "-1"} if k.family and k.field != "every" else {}


def text_reference(k: Knob, text: str) -> tuple[bool, Any]:
    try:
        return reference(k, typed(k, parse_knob_text(k, text, env_var(k.name))))
    except ValueError as error:
        return False, str(error)


def check_environment_variable(k: Knob, text: str) -> None:
    ok, want = text_reference(k, text)
    try:
        config = resolve_config(environ={env_var(k.name): text, **family_on(k)})
    except ValueError as error:
        assert not ok, f"{env_var(k.name)}={text!r} rejected though valid: {error}"
        check_rejected(str(error), (env_var(k.name),), (repr(text), text.strip()))
        return
    assert ok and read_back(k, config) == want, (k.name, text)


@pytest.mark.parametrize("k", KNOBS, ids=ids)
@SETTINGS
@given(data=st.data())
def test_keywords_config_objects_hf_fields_and_variables_agree(k: Knob, data: st.DataObject) -> None:
    value = data.draw(values(k))
    check_keywords_and_config_object(k, value)
    check_hf_field(k, value)
    check_environment_variable(k, data.draw(texts(k).filter(lambda t: t.strip() != "" and "\x00" not in t)))


SCRIPT = "import gradwatch, gradwatch.resolve as r\ngradwatch._bad_input_seen = r.resolve_config()\n"


BAD_TEXTS = ("nan", "-5", "maybe", "1.5", "bogus", "")


def first_bad_text(k: Knob) -> str | None:
    """A text the reference rejects (None for a free-text knob that takes any text)."""
    return next((t for t in BAD_TEXTS if t and not text_reference(k, t)[0]), None)


def launcher_texts() -> st.SearchStrategy[tuple[Knob, str]]:
    return st.sampled_from(KNOBS).flatmap(lambda k: st.tuples(st.just(k), texts(k).filter(
        lambda t: t.strip() != "" and "\x00" not in t)))


def test_launcher_options_agree_for_every_knob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each knob's default (valid) and a text it rejects, as ``gradwatch run --<name>=TEXT``."""
    for k in KNOBS:
        for text in (knob_text(k, k.default) if k.field != "every" else "-1", first_bad_text(k)):
            if text:
                check_launcher(k, text, tmp_path, capsys)


@settings(SETTINGS, max_examples=40)
@given(case=launcher_texts())
def test_launcher_options_agree(case: tuple[Knob, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_launcher(*case, tmp_path, capsys)


def check_launcher(k: Knob, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gradwatch
    from gradwatch.cli import main

    ok, want = text_reference(k, text)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    saved = dict(os.environ)
    try:
        capsys.readouterr()
        on = [f"{option_flag(v.removeprefix('GRADWATCH_').lower())}=-1" for v in family_on(k)]
        code = main(["run", f"{option_flag(k.name)}={text}", *on, str(script)])
        err = capsys.readouterr().err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if code != 0:
        assert code == 2 and not ok, f"{option_flag(k.name)}={text!r} refused though valid: {err}"
        check_rejected(err, (option_flag(k.name),), (repr(text), text.strip()))
        return
    assert ok and read_back(k, gradwatch._bad_input_seen) == want, (k.name, text)  # type: ignore[attr-defined]


# ---- LightningCLI YAML ---------------------------------------------------------------------------------


def yaml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parse_callback(init_args: dict[str, Any]) -> Any:
    """The GradWatch a LightningCLI ``trainer.callbacks`` entry builds (jsonargparse's parse, no Trainer)."""
    import lightning.pytorch as pl
    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[pl.Callback])
    entry = {"class_path": "gradwatch.callbacks.lightning.GradWatch", "init_args": init_args}
    cfg = parser.parse_string(yaml.safe_dump({"callbacks": [entry]}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.instantiate_classes(cfg).callbacks[0]


def yaml_values(k: Knob) -> st.SearchStrategy[Any]:
    """Values YAML holds natively, of the knob's type or not (a string for a number is text: left to the
    text surfaces), no cadence (code only)."""
    def native(v: Any) -> bool:
        if isinstance(v, (Cadence, dict)):
            return False
        return not isinstance(v, str) or k.type is str
    return values(k).filter(native)


def test_lightning_cli_yaml_agrees_for_every_knob() -> None:
    """Each knob's default (valid) and a value of the wrong type (a number for text, a list for the others)."""
    pytest.importorskip("jsonargparse")
    for k in KNOBS:
        for value in (k.default if k.field != "every" else 7, 5 if k.type is str else [3]):
            check_yaml(k, value)


@settings(SETTINGS, max_examples=40)
@given(case=st.sampled_from(KNOBS).flatmap(lambda k: st.tuples(st.just(k), yaml_values(k))))
def test_lightning_cli_yaml_agrees(case: tuple[Knob, Any]) -> None:
    pytest.importorskip("jsonargparse")
    check_yaml(*case)


def check_yaml(k: Knob, value: Any) -> None:
    from argparse import ArgumentError

    if k.family is None:
        init_args = {k.name: yaml_value(value)}
    elif k.field == "every":
        if type(value) is int and value in (-1, 0):
            init_args = {k.family: value == -1}
        else:
            init_args = {k.family: {"every": yaml_value(value)}}
    else:
        init_args = {k.family: {k.field: yaml_value(value)}}
    ok, want = reference(k, value)
    try:
        callback = parse_callback(init_args)
    except (ValueError, ArgumentError) as error:
        assert not ok, f"YAML {init_args} rejected though valid in code: {error}"
        check_rejected(str(error), names(k), shown(yaml_value(value)) + shown(value))
        return
    assert ok and read_back(k, callback.config) == want, (init_args, want)


# ---- the family keywords and the callables -----------------------------------------------------------


@pytest.mark.parametrize("key", list(FAMILIES))
@SETTINGS
@given(value=anything())
def test_family_keywords(key: str, value: Any) -> None:
    """``spectra=...``: True, False, None, an int >= 0, a Cadence or its config; anything else names it."""
    valid = value is None or isinstance(value, bool) or (type(value) is int and value >= 0)
    try:
        config = resolve_config(keywords={key: value}, environ={})
    except ValueError as error:
        assert not valid, error
        check_rejected(str(error), (f"`{key}`",), shown(value))
        return
    assert valid
    on = value is True or (type(value) is int and value > 0 and not isinstance(value, bool))
    assert (key in config.families) == on
    if on and value is not True:
        assert config.families[key].every == Cadence.every(value)


@pytest.mark.parametrize("name", [o.name for o in GENERAL_OPTIONS if o.knob is None])
@SETTINGS
@given(value=anything())
def test_options_without_a_knob(name: str, value: Any) -> None:
    """``loss_fn``, ``on_alert`` (code only): a callable or None; anything else names the option."""
    try:
        config = WatchConfig(**{name: value})
    except ValueError as error:
        assert value is not None
        check_rejected(str(error), (f"`{name}`",), shown(value))
        return
    assert value is None and getattr(config, name) is None


def test_hf_flags_agree_for_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    """``--gradwatch_<name> TEXT`` through ``HfArgumentParser``: each knob's default reads back; a text the code
    rejects fails naming the flag (gradwatch's ValueError, or argparse's exit 2 for text of another type)."""
    transformers = pytest.importorskip("transformers")
    from gradwatch.integrations.huggingface import GradWatchArguments, config_from_training_args

    parser = transformers.HfArgumentParser(GradWatchArguments)
    for k in KNOBS:
        flag = "--gradwatch_" + k.name
        on = [f"--gradwatch_{k.family}_every", "-1"] if k.family and k.field != "every" else []
        good = knob_text(k, k.default) if k.field != "every" else "-1"
        if good and (k.default is not None or k.type is str):  # argparse reads no `none` as an int
            (args,) = parser.parse_args_into_dataclasses([flag, good, *on])
            assert read_back(k, config_from_training_args(args, environ={})) == text_reference(k, good)[1], flag
        bad = first_bad_text(k)
        if bad is None:
            continue
        capsys.readouterr()
        with pytest.raises((ValueError, SystemExit)) as info:
            parser.parse_args_into_dataclasses([flag, bad, *on])
        message = str(info.value) if info.type is not SystemExit else capsys.readouterr().err
        assert info.type is not SystemExit or info.value.code == 2
        check_rejected(message, (flag, flag.lstrip("-")), (repr(bad), bad))
