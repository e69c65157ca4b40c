"""Instability proxies for transformer training (family ``stability``): see divergence coming before the
loss shows it.

One diagnostic per quantity, all under the tag stem ``stability``:

====================  =====================================================================  ===============
diagnostic            tags                                                                   interval state
====================  =====================================================================  ===============
AttentionLogits       ``stability/attention/max_logit/<attn>``, ``.../entropy_min/<attn>``,   max, min
                      ``stability/attention/max_logit`` (max over modules)
OutputLogits          ``stability/logits/{log_z_mean,log_z_max,max_abs}``                    mean, max, max
ActivationRMS         ``stability/activations/rms/<block>``                                  RMS over all
UpdateRatio           ``stability/update_ratio/<param>``                                     mean
AdamEpsShare          ``stability/adam/eps_share/<param>``, ``stability/adam/rms_over_eps/<param>``  mean
LossSpikes            ``stability/spike/loss`` (max robust z-score over the interval)        max
GradNormSpikes        ``stability/spike/grad_norm`` (the same, of the watched gradients' norm) max
NoiseScale            ``stability/noise_scale`` (B_simple), ``stability/noise_scale/examples``  last EMA value
SharpnessRatio        no tag of its own: the sustained-sharpness alert (with ``sharpness``)   last ratio
====================  =====================================================================  ===============

plus ``stability/alert``: 1 when any rule of the family held during the interval, else 0, written once per
logging event by the family's last diagnostic (see :class:`AlertBoard`).

Attention (Wortsman et al. 2023; Zhai et al. 2023): the logits are recomputed from the q and k that
``scaled_dot_product_attention`` receives inside each attention module's forward (after rotary embeddings,
qk-norms and grouped-query sharing), see :mod:`gradwatch.functional.attention`. ``nn.MultiheadAttention``
calls that never reach SDPA (``need_weights=True``, the fused inference path) are rebuilt from the module's
weights and inputs. A module that ran without an SDPA call (an "eager" attention implementation) is named
once and skipped. For an interval of several observations ``entropy_min`` is the smallest per-observation
value (each: min over heads of the mean over batch and queries) and ``max_logit`` the largest.

Output logits: read from the first Hugging Face model with a head in the module tree (``.logits`` of its
output; positions where its ``attention_mask`` keyword is 0 are left out), else from the output head (the
last ``nn.Linear`` named ``lm_head``, ``classifier``, ``head``, ``decoder``, ``output``, ``fc_out`` or
``logits``; every position), else from the top model's output (a tensor, or its ``logits``).

Blocks (activation RMS): the members of each ``nn.ModuleList`` that contain an attention module, their
output's first tensor, RMS over every element (padding included).

Alert rules (each evidence has the values, thresholds and trend; remedies quote the current lr / eps):

- ``stability/attention_logit_level``: the max attention logit >= ``attention_logit_level`` (default 100;
  warning) or >= ``attention_logit_critical`` (default 1e4, where every run of Wortsman et al. diverged;
  critical).
- ``stability/attention_logit_growth``: the max attention logit >= ``growth_min_logit`` (20) and at least
  ``attention_growth`` (4x) what it was ``growth_window`` (5) logging events earlier.
- ``stability/attention_entropy_collapse``: some module's ``entropy_min`` < ``entropy_floor`` (0.1 nats).
- ``stability/log_z_drift``: |log_z_mean - its first logged value| > ``log_z_drift`` (20 nats).
- ``stability/update_ratio_jump``: a parameter's update ratio > ``update_ratio_factor`` (10x) the median of
  its previous ``level_window`` (20) logged values, once ``level_warmup`` (3) exist.
- ``stability/adam_eps_dominates``: a parameter's eps share > ``eps_share_limit`` (0.5).
- ``stability/loss_spike``, ``stability/grad_norm_spike``: robust z-score > ``spike_threshold`` (6) against
  the previous ``spike_window`` (100) observations, after ``spike_warmup`` (50); ``stability/nonfinite_loss``
  and ``stability/nonfinite_grad_norm`` (critical) for an inf/NaN value.

- ``stability/sharpness_above_threshold`` (with the ``sharpness`` family on): the last ``sharpness_sustain``
  (3) estimates of ``sharpness/ratio`` (lambda_max over 2/lr, or Adam's 38/lr) all above
  ``sharpness_ratio_limit`` (1.0), read from what the sharpness family logged (capability ``"logged"``).

Rules are evaluated at logging events (one host transfer per diagnostic); the engine says each rule once
per cooldown.

Gradient noise scale (McCandlish et al. 2018, appendix A): B_simple = tr(Sigma) / |G|^2 from the step's
gradient norms at two batch sizes, which the engine reads with gradient hooks inside the user's backward on
due steps (capability ``"micro_batches"``): one micro-batch against a rank's accumulated gradient under
gradient accumulation, else one rank's gradient against the all-reduced one; with one process and no
accumulation there is one batch size and nothing to log (said once when ``noise_scale=True`` was asked for).

Ranks: the activation diagnostics and the optimizer ones run on every rank (``runs_on = "all_ranks"``):
attention maxima / minima and logit / activation sums are all-reduced over the ranks' batches, and
FSDP2-sharded weights and optimizer states are summed shard by shard, so every rank holds the same values.
The spike detectors run on rank zero: its loss, and the (all-reduced) gradients' norm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradwatch.cadence import Cadence, as_cadence
from gradwatch.checks import check_bool, check_choice, check_float, check_int, fail
from gradwatch.functional.attention import (
    MAX_EXACT_LEN,
    AttentionStatistics,
    attention_logit_statistics,
    multihead_attention_qk,
)
from gradwatch.functional.stability import (
    LogitStatistics,
    NoiseScaleEstimator,
    RobustSpikeDetector,
    adam_eps_statistics,
    adam_states,
    logit_statistics,
    update_ratio_terms,
)
from gradwatch.metrics.base import ActivationSite, Alert, Chart, ChartGroup, Diagnostic, Results, StepContext
from gradwatch.registry import BuildInputs, Family

_BIG = 1e12


@dataclass(frozen=True)
class StabilityConfig:
    """Instability proxies (family ``stability``; off by default).

    Attributes:
        every: cadence of every quantity; the spike detectors log at this cadence and observe at
            ``spike_every``.
        attention, logits, activations, update_ratio, adam, spikes, noise_scale: switch each quantity.
            ``noise_scale=None`` (the default) logs B_simple where the run gives two batch sizes (gradient
            accumulation, or several ranks) and stays quiet where it does not; ``True`` says so once there.
        max_exact_seq_len: attention statistics are exact up to this many query positions; longer
            sequences are measured at this many evenly spaced query positions (first and last included).
        attention_precision: dtype of the recomputed attention logits (``"float64"`` or ``"float32"``).
        attention_logit_level: max attention logit that raises a warning.
        attention_logit_critical: max attention logit that raises a critical alert (>= the level).
        attention_growth: growth factor of the max attention logit over ``growth_window`` logging events
            that raises an alert.
        growth_window: logging events over which the growth is measured.
        growth_min_logit: the growth rule applies only once the max logit is at least this.
        entropy_floor: an attention module whose entropy_min (nats) falls below this raises an alert
            (0 turns the rule off).
        log_z_drift: drift of log_z_mean from its first logged value (nats) that raises an alert.
        update_ratio_factor: a parameter's update ratio above this many times its running median alerts.
        level_window: logged values in the running median of each update ratio.
        level_warmup: logged values needed before the update-ratio rule applies.
        eps_share_limit: Adam eps share of a parameter above which an alert is raised.
        spike_threshold: robust z-score (x - median) / (1.4826 MAD) above which a loss / gradient norm
            is a spike.
        spike_every: cadence at which the spike detectors observe (every step by default: a spike between
            two observations is not seen; each observation is a few small device ops and reads the
            gradients' norm).
        spike_window: observations in the spike detector's running window.
        spike_warmup: steps before the spike detector scores anything (<= ``spike_window``).
        sharpness_ratio_limit: with the sharpness family on, ``sharpness/ratio`` above this for
            ``sharpness_sustain`` estimates in a row raises an alert.
        sharpness_sustain: consecutive sharpness estimates above the limit that raise it.
    """

    every: int | Cadence = 10
    attention: bool = True
    logits: bool = True
    activations: bool = True
    update_ratio: bool = True
    adam: bool = True
    spikes: bool = True
    noise_scale: bool | None = None
    max_exact_seq_len: int = MAX_EXACT_LEN
    attention_precision: Literal["float64", "float32"] = "float64"
    attention_logit_level: float = 100.0
    attention_logit_critical: float = 1e4
    attention_growth: float = 4.0
    growth_window: int = 5
    growth_min_logit: float = 20.0
    entropy_floor: float = 0.1
    log_z_drift: float = 20.0
    update_ratio_factor: float = 10.0
    level_window: int = 20
    level_warmup: int = 3
    eps_share_limit: float = 0.5
    spike_threshold: float = 6.0
    spike_every: int | Cadence = 1
    spike_window: int = 100
    spike_warmup: int = 50
    sharpness_ratio_limit: float = 1.0
    sharpness_sustain: int = 3

    def __post_init__(self) -> None:
        name = "StabilityConfig"
        object.__setattr__(self, "every", as_cadence(f"{name}.every", self.every))
        object.__setattr__(self, "spike_every", as_cadence(f"{name}.spike_every", self.spike_every))
        for f in ("attention", "logits", "activations", "update_ratio", "adam", "spikes"):
            check_bool(f"{name}.{f}", getattr(self, f))
        if self.noise_scale is not None:
            check_bool(f"{name}.noise_scale", self.noise_scale)
        check_int(f"{name}.max_exact_seq_len", self.max_exact_seq_len, minimum=1)
        check_choice(f"{name}.attention_precision", self.attention_precision, ("float64", "float32"))
        floats = {
            "attention_logit_level": (0.0, _BIG, True), "attention_logit_critical": (0.0, _BIG, True),
            "attention_growth": (1.0, _BIG, True), "growth_min_logit": (0.0, _BIG, False),
            "entropy_floor": (0.0, 100.0, False), "log_z_drift": (0.0, _BIG, True),
            "update_ratio_factor": (1.0, _BIG, True), "eps_share_limit": (0.0, 1.0, True),
            "spike_threshold": (0.0, _BIG, True), "sharpness_ratio_limit": (0.0, _BIG, True),
        }
        for f, (low, high, open_low) in floats.items():
            object.__setattr__(self, f, check_float(f"{name}.{f}", getattr(self, f), low=low, high=high,
                                                    open_low=open_low))
        if self.attention_logit_critical < self.attention_logit_level:
            raise fail(f"{name}.attention_logit_critical", self.attention_logit_critical,
                       f"a number >= attention_logit_level ({self.attention_logit_level})")
        check_int(f"{name}.growth_window", self.growth_window, minimum=1)
        check_int(f"{name}.level_window", self.level_window, minimum=2)
        check_int(f"{name}.level_warmup", self.level_warmup, minimum=1)
        if self.level_warmup > self.level_window:
            raise fail(f"{name}.level_warmup", self.level_warmup, f"an int in [1, level_window={self.level_window}]")
        check_int(f"{name}.sharpness_sustain", self.sharpness_sustain, minimum=1)
        check_int(f"{name}.spike_window", self.spike_window, minimum=3)
        check_int(f"{name}.spike_warmup", self.spike_warmup, minimum=2)
        if self.spike_warmup > self.spike_window:
            raise fail(f"{name}.spike_warmup", self.spike_warmup, f"an int in [2, spike_window={self.spike_window}]")


# ---- shared pieces ------------------------------------------------------------------------------


class AlertBoard:
    """Collects whether any diagnostic of the family raised an alert since the last ``stability/alert``.

    Every diagnostic of a built family reports to the board; only the one marked ``emits_flag`` (the last
    one built, computed last at a logging event) writes ``stability/alert``, so the tag is written once
    per logging event. A diagnostic built on its own (no board) writes its own flag.
    """

    def __init__(self) -> None:
        self.raised = False

    def report(self, alerts: Sequence[Alert]) -> None:
        self.raised = self.raised or bool(alerts)

    def take(self) -> bool:
        raised, self.raised = self.raised, False
        return raised


def _fmt(x: float) -> str:
    """1e-2 -> '0.01', 1e-8 -> '1e-8', 3e-4 -> '0.0003'."""
    return f"{x:.3g}".replace("e-0", "e-").replace("e+0", "e+")


def _optimizer_settings(ctx: StepContext) -> dict[str, float]:
    try:
        opt = ctx.optimizer
        group = opt.param_groups[0]
    except Exception:  # noqa: BLE001 - the settings only decorate remedies
        return {}
    out: dict[str, float] = {}
    for key in ("lr", "eps", "weight_decay"):
        value = group.get(key)
        if isinstance(value, Tensor):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    betas = group.get("betas")
    if betas is not None:
        out["beta2"] = float(betas[1])
    return out


def _lower_lr(settings: Mapping[str, float]) -> str:
    lr = settings.get("lr")
    if lr is None:
        return "lower the learning rate (e.g. by 3x)"
    return f"lower the learning rate from {_fmt(lr)} (e.g. to {_fmt(lr / 3)})"


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
        return None
    for attr in ("last_hidden_state", "hidden_states"):  # dataclass-like model outputs
        t = getattr(value, attr, None)
        if isinstance(t, Tensor):
            return t
    return None


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _reduced(ctx: StepContext, t: Tensor, op: Literal["sum", "max", "min"]) -> Tensor:
    """``t`` reduced over ranks (a no-op on one process). NaN entries stay NaN: they are mapped to the
    reduction's neutral value on the way and back where no rank had a value."""
    if getattr(ctx, "world_size", 1) <= 1:
        return t
    if op == "sum":
        return ctx.all_reduce(t, "sum")
    neutral = -math.inf if op == "max" else math.inf
    out = ctx.all_reduce(t.nan_to_num(nan=neutral), op)
    return torch.where(out == neutral, torch.full_like(out, math.nan), out) if op == "min" else out


class _StabilityDiagnostic(Diagnostic):
    """Common parts: the config, cadences, remedies' settings, the alert board and once-only messages."""

    stem = "stability"

    def __init__(self, config: StabilityConfig | None = None, board: AlertBoard | None = None,
                 emits_flag: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config if config is not None else StabilityConfig()
        self.board = board
        self.emits_flag = board is None if emits_flag is None else emits_flag
        self.step: int | None = None
        self.settings: dict[str, float] = {}
        self._said: set[str] = set()
        self._to_say: list[tuple[str, str]] = []

    def observe_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def _say_later(self, key: str, message: str) -> None:
        """From inside a hook: remember a message, said once at the next observe."""
        if key not in self._said:
            self._said.add(key)
            self._to_say.append((key, message))

    def _flush_messages(self, ctx: StepContext | None) -> None:
        say = getattr(ctx, "say_once", None)
        for key, message in self._to_say:
            if say is not None:
                say(f"stability/{key}", message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._to_say.clear()

    def _begin_observe(self, ctx: StepContext) -> None:
        self.step = ctx.step
        self.settings = _optimizer_settings(ctx) if "optimizer" in self.needs else {}
        self._flush_messages(ctx)

    def _results(self, scalars: dict[str, Tensor], alerts: list[Alert]) -> Results:
        if self.board is not None:
            self.board.report(alerts)
        if self.emits_flag:
            raised = self.board.take() if self.board is not None else bool(alerts)
            scalars["stability/alert"] = torch.tensor(float(raised), dtype=torch.float64)
        return Results(scalars=scalars, alerts=tuple(alerts))

    def _nan_result(self, tags: Sequence[str]) -> Results:
        """What an interval whose observations all failed logs: NaN of ``tags`` (and the flag, if this one
        writes it)."""
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return self._results({t: nan for t in tags}, [])


# ---- module discovery ---------------------------------------------------------------------------

AttentionKind = Literal["mha", "sdpa"]


def _has_children(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _attention_kind(module: nn.Module) -> AttentionKind | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if (_has_children(module, "q_proj", "k_proj") or _has_children(module, "c_attn")
            or _has_children(module, "query", "key")):
        return "sdpa"
    if type(module).__name__.endswith(("Attention", "SelfAttention")):
        return "sdpa"
    return None


def find_attention_modules(model: nn.Module) -> list[tuple[str, AttentionKind]]:
    """``(name, kind)`` of every attention module: ``nn.MultiheadAttention`` (``"mha"``), and modules with
    Llama-like ``q_proj``/``k_proj``, GPT-2's fused ``c_attn``, BERT's ``query``/``key`` or a class name
    ending in ``Attention`` (``"sdpa"``: read through their SDPA calls). Of nested candidates only the
    innermost is kept (``BertSelfAttention``, not ``BertAttention``)."""
    found = [(name, kind) for name, m in model.named_modules() if (kind := _attention_kind(m)) is not None]
    names = [n for n, _ in found]

    def has_candidate_below(name: str) -> bool:
        prefix = f"{name}." if name else ""
        return any(o != name and o.startswith(prefix) for o in names)

    return [(n, k) for n, k in found if not has_candidate_below(n)]


def find_blocks(model: nn.Module, attention: Sequence[str]) -> list[str]:
    """Names of the transformer blocks: members of an ``nn.ModuleList`` containing an attention module
    (the innermost such list wins)."""
    blocks: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList):
            continue
        for i, _ in enumerate(m):
            child = f"{name}.{i}" if name else str(i)
            if any(a == child or a.startswith(child + ".") for a in attention):
                blocks.append(child)
    return [b for b in blocks if not any(o != b and o.startswith(b + ".") for o in blocks)]


_HEAD_NAMES = ("lm_head", "classifier", "head", "decoder", "output", "fc_out", "logits")


def find_logits_module(model: nn.Module) -> tuple[str, Literal["hf", "head", "top"]]:
    """Where the output logits are read (see the module docstring)."""
    for name, m in model.named_modules():
        if hasattr(m, "config") and callable(getattr(m, "get_output_embeddings", None)):
            cls = type(m).__name__
            if "For" in cls or "LMHead" in cls:
                return name, "hf"
    head = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            head = name
    if head is not None:
        return head, "head"
    return "", "top"


def _submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)


# ---- attention ----------------------------------------------------------------------------------


class AttentionLogits(_StabilityDiagnostic):
    """Max attention logit and min-over-heads attention entropy per attention module.

    ``update(max_logit, entropy_min)`` takes two (n_modules,) vectors of one observation (NaN / -inf where a
    module was not measured); :meth:`observe` builds them from what the hooks reduced during the step.
    Carried state: the last logged global max logits (for the growth rule).
    """

    needs = frozenset({"activations", "optimizer"})
    runs_on = "all_ranks"  # the step's batch spans the ranks: max / min over them

    def __init__(self, names: Sequence[str], kinds: Sequence[AttentionKind] | None = None,
                 config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.names = tuple(names)
        self.kinds = tuple(kinds) if kinds is not None else ("sdpa",) * len(self.names)
        n = len(self.names)
        self.add_state("max_logit", torch.full((n,), -math.inf, dtype=torch.float64), dist_reduce_fx="max",
                       persistent=True)
        self.add_state("entropy_min", torch.full((n,), math.inf, dtype=torch.float64), dist_reduce_fx="min",
                       persistent=True)
        self.history: list[tuple[int | None, float]] = []  # carried: (step, global max) per logging event
        self._pending: dict[int, list[Tensor]] = {}
        self._sdpa_seen: dict[int, bool] = {}
        self._dtype = torch.float64 if self.config.attention_precision == "float64" else torch.float32

    # hooks ---------------------------------------------------------------------------------------

    def _add(self, i: int, stats: AttentionStatistics) -> None:
        cur = self._pending.get(i)
        if cur is None:
            self._pending[i] = [stats.max_logit, stats.entropy_sum, stats.rows]
        elif cur[0].shape == stats.max_logit.shape:
            self._pending[i] = [torch.maximum(cur[0], stats.max_logit), cur[1] + stats.entropy_sum,
                                cur[2] + stats.rows]
        else:  # several calls with different head counts inside one module: keep per-call minima apart
            mx = torch.maximum(cur[0].amax(), stats.max_logit.amax()).reshape(1)
            ent = torch.minimum((cur[1] / cur[2]).nan_to_num(math.inf).amin(),
                                stats.entropy.nan_to_num(math.inf).amin()).reshape(1)
            self._pending[i] = [mx, ent, torch.ones(1, dtype=ent.dtype, device=ent.device)]

    def _on_attention(self, i: int):
        def on_attention(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False) -> None:
            self._sdpa_seen[i] = True
            self._add(i, attention_logit_statistics(query, key, attn_mask, is_causal, scale, enable_gqa,
                                                    max_exact_len=self.config.max_exact_seq_len,
                                                    dtype=self._dtype))
        return on_attention

    def _on_forward(self, i: int):
        name, kind = self.names[i], self.kinds[i]

        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen = self._sdpa_seen.pop(i, False)
            if seen:
                return
            if kind == "mha":
                self._mha_fallback(i, module, args, kwargs)
                return
            self._say_later(f"unreadable/{name}",
                            f"gradwatch: stability: attention module {name!r} ({type(module).__name__}) made no "
                            "scaled_dot_product_attention call (an eager or custom attention kernel?); its "
                            "attention logits are not measured")
        return on_forward

    def _mha_fallback(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        inputs = multihead_attention_qk(module, bound["query"], bound["key"], bound.get("key_padding_mask"),
                                        bound.get("attn_mask"), bool(bound.get("is_causal", False)))
        self._add(i, attention_logit_statistics(inputs.query, inputs.key, inputs.attn_mask, False, inputs.scale,
                                                max_exact_len=self.config.max_exact_seq_len, dtype=self._dtype))

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=n, module=_submodule(model, n), on_forward=self._on_forward(i),
                               on_attention=self._on_attention(i)) for i, n in enumerate(self.names)]

    # metric --------------------------------------------------------------------------------------

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        mx, ent = self.take_pending()
        self.update(_reduced(ctx, mx, "max"), _reduced(ctx, ent, "min"))

    def take_pending(self) -> tuple[Tensor, Tensor]:
        """(max_logit, entropy_min) per module from what the hooks reduced since the last call."""
        n = len(self.names)
        mx = torch.full((n,), -math.inf, dtype=torch.float64)
        ent = torch.full((n,), math.nan, dtype=torch.float64)
        if self._pending:
            device = next(iter(self._pending.values()))[0].device
            mx, ent = mx.to(device), ent.to(device)
            for i, (m, s, r) in self._pending.items():
                mx[i] = m.amax().to(torch.float64)
                ent[i] = (s / r).to(torch.float64).nan_to_num(math.inf).amin()
        self._pending.clear()
        self._sdpa_seen.clear()
        return mx, torch.where(torch.isinf(ent) & (ent > 0), torch.full_like(ent, math.nan), ent)

    def update(self, max_logit: Tensor, entropy_min: Tensor) -> None:  # type: ignore[override]
        max_logit = max_logit.to(self.max_logit.device, self.max_logit.dtype)
        entropy_min = entropy_min.to(self.entropy_min.device, self.entropy_min.dtype)
        self.max_logit = torch.fmax(self.max_logit, max_logit)
        self.entropy_min = torch.fmin(self.entropy_min, entropy_min)

    def compute(self) -> Results:
        mx = torch.where(torch.isfinite(self.max_logit), self.max_logit, torch.full_like(self.max_logit, math.nan))
        ent = torch.where(torch.isfinite(self.entropy_min), self.entropy_min,
                          torch.full_like(self.entropy_min, math.nan))
        scalars: dict[str, Tensor] = {}
        for i, n in enumerate(self.names):
            scalars[f"stability/attention/max_logit/{n}"] = mx[i]
            scalars[f"stability/attention/entropy_min/{n}"] = ent[i]
        if self.names:
            overall = mx.nan_to_num(nan=-math.inf).amax()
            overall = torch.where(torch.isfinite(overall), overall, torch.full_like(overall, math.nan))
        else:
            overall = torch.tensor(math.nan, dtype=torch.float64)
        scalars["stability/attention/max_logit"] = overall
        return self._results(scalars, self._alerts(mx, ent, overall))

    def _alerts(self, mx: Tensor, ent: Tensor, overall: Tensor) -> list[Alert]:
        cfg = self.config
        host = torch.cat([mx, ent, overall.reshape(1)]).tolist()  # the one host transfer
        n = len(self.names)
        per_max, per_ent, top = host[:n], host[n:2 * n], host[-1]
        alerts: list[Alert] = []
        if math.isnan(top):
            return alerts
        worst = self.names[max(range(n), key=lambda j: -math.inf if math.isnan(per_max[j]) else per_max[j])]
        trend = [[s, v] for s, v in self.history[-cfg.growth_window:]] + [[self.step, top]]
        remedies = [_lower_lr(self.settings),
                    "qk-layernorm (LayerNorm on queries and keys before the dot product; Wortsman et al. 2023)",
                    "a longer learning-rate warm-up", "gradient clipping (e.g. max norm 1.0)"]
        if top >= cfg.attention_logit_level:
            critical = top >= cfg.attention_logit_critical
            alerts.append(Alert(
                rule="stability/attention_logit_level", severity="critical" if critical else "warning",
                message=(f"max attention logit {top:.4g} in {worst!r} is above "
                         f"{_fmt(cfg.attention_logit_critical if critical else cfg.attention_logit_level)}"
                         + (" (runs past ~1e4 diverged in Wortsman et al. 2023)" if critical else "")),
                evidence={"max_logit": top, "module": worst, "threshold": cfg.attention_logit_level,
                          "critical_threshold": cfg.attention_logit_critical, "trend": trend,
                          "per_module": {m: v for m, v in zip(self.names, per_max) if not math.isnan(v)}},
                remedies=remedies))
        if len(self.history) >= cfg.growth_window:
            past = self.history[-cfg.growth_window][1]
            if top >= cfg.growth_min_logit and past > 0 and top / past >= cfg.attention_growth:
                alerts.append(Alert(
                    rule="stability/attention_logit_growth", severity="warning",
                    message=(f"max attention logit grew {top / past:.3g}x (from {past:.4g} to {top:.4g}) over the "
                             f"last {cfg.growth_window} logging events"),
                    evidence={"max_logit": top, "earlier": past, "growth": top / past,
                              "threshold": cfg.attention_growth, "window": cfg.growth_window,
                              "min_logit": cfg.growth_min_logit, "module": worst, "trend": trend},
                    remedies=remedies))
        if cfg.entropy_floor > 0:
            low = {m: v for m, v in zip(self.names, per_ent) if not math.isnan(v) and v < cfg.entropy_floor}
            if low:
                which = min(low, key=low.get)
                alerts.append(Alert(
                    rule="stability/attention_entropy_collapse", severity="warning",
                    message=f"attention entropy collapsed to {low[which]:.3g} nats in {which!r} "
                            f"(floor {_fmt(cfg.entropy_floor)})",
                    evidence={"entropy_min": low[which], "module": which, "threshold": cfg.entropy_floor,
                              "modules_below": low, "max_logit": top},
                    remedies=["qk-layernorm", "sigma-reparametrisation of the attention weights (Zhai et al. 2023)",
                              _lower_lr(self.settings), "a longer learning-rate warm-up"]))
        self.history = (self.history + [(self.step, top)])[-(cfg.growth_window + 1):]
        return alerts

    def failed_result(self) -> Results:
        return self._nan_result(["stability/attention/max_logit"]
                                + [f"stability/attention/max_logit/{n}" for n in self.names])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/attention", "max attention logit",
                           ("stability/attention/max_logit",
                            *(f"stability/attention/max_logit/{n}" for n in self.names))),
                ChartGroup("stability/attention", "attention entropy (min over heads)",
                           tuple(f"stability/attention/entropy_min/{n}" for n in self.names))]

    def carried_state(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.history = [(None if s is None else int(s), float(v)) for s, v in state.get("history", [])]


# ---- output logits ------------------------------------------------------------------------------


def _logits_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.dim() >= 2 and output.is_floating_point() else None
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, Tensor) and v.dim() >= 2 and v.is_floating_point():
                return v
    return None


class OutputLogits(_StabilityDiagnostic):
    """log Z (logsumexp over classes) mean and max over positions, and max |logit|, of the model's output.

    ``update(stats)`` takes a :class:`gradwatch.functional.stability.LogitStatistics`. Carried state: the
    first logged log_z_mean (the drift rule's reference) and recent values.
    """

    needs = frozenset({"activations", "optimizer"})
    runs_on = "all_ranks"  # sums and maxima over every rank's batch

    def __init__(self, module_name: str = "", source: Literal["hf", "head", "top"] = "top",
                 config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.module_name = module_name
        self.source = source
        self.add_state("z_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("z_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("z_max", torch.full((), -math.inf, dtype=torch.float64), dist_reduce_fx="max", persistent=True)
        self.add_state("max_abs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max", persistent=True)
        self.reference: float | None = None
        self.history: list[tuple[int | None, float]] = []
        self._pending: list[Any] = []

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        logits = _logits_of(output)
        if logits is None:
            self._say_later("logits", f"gradwatch: stability: the output of {self.module_name or 'the model'!r} "
                            f"({type(module).__name__}) has no logits to read; stability/logits is not logged")
            return
        mask = None
        if self.source == "hf":
            m = kwargs.get("attention_mask")
            if isinstance(m, Tensor) and m.dim() == 2 and tuple(m.shape) == tuple(logits.shape[:2]):
                mask = m
        self._pending.append(logit_statistics(logits, mask))

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=self.module_name, module=_submodule(model, self.module_name),
                               on_forward=self._on_forward)]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        pending, self._pending = self._pending, []
        dev = pending[0].log_z_sum.device if pending else self.z_sum.device
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        sums = torch.stack([sum((p.log_z_sum.to(dev, torch.float64) for p in pending), zero),
                            sum((p.count.to(dev, torch.float64) for p in pending), zero)])
        maxima = torch.stack([torch.stack([p.log_z_max.to(dev, torch.float64) for p in pending]).amax() if pending
                              else torch.tensor(-math.inf, dtype=torch.float64, device=dev),
                              torch.stack([p.max_abs.to(dev, torch.float64) for p in pending]).amax() if pending
                              else zero])
        sums, maxima = _reduced(ctx, sums, "sum"), _reduced(ctx, maxima, "max")
        self.update(LogitStatistics(log_z_sum=sums[0], log_z_max=maxima[0], max_abs=maxima[1], count=sums[1]))

    def update(self, stats: Any) -> None:  # type: ignore[override]
        dev, dt = self.z_sum.device, self.z_sum.dtype
        self.z_sum = self.z_sum + stats.log_z_sum.to(dev, dt)
        self.z_count = self.z_count + stats.count.to(dev, dt)
        self.z_max = torch.maximum(self.z_max, stats.log_z_max.to(dev, dt))
        self.max_abs = torch.maximum(self.max_abs, stats.max_abs.to(dev, dt))

    def compute(self) -> Results:
        mean = self.z_sum / self.z_count
        z_max = torch.where(self.z_count > 0, self.z_max, torch.full_like(self.z_max, math.nan))
        scalars = {"stability/logits/log_z_mean": mean, "stability/logits/log_z_max": z_max,
                   "stability/logits/max_abs": torch.where(self.z_count > 0, self.max_abs,
                                                           torch.full_like(self.max_abs, math.nan))}
        return self._results(scalars, self._alerts(mean))

    def _alerts(self, mean: Tensor) -> list[Alert]:
        value = float(mean.item())  # the one host transfer
        if math.isnan(value):
            return []
        alerts: list[Alert] = []
        if self.reference is None:
            self.reference = value
        drift = value - self.reference
        if abs(drift) > self.config.log_z_drift:
            alerts.append(Alert(
                rule="stability/log_z_drift", severity="warning",
                message=f"output log Z drifted by {drift:+.3g} nats (from {self.reference:.4g} to {value:.4g})",
                evidence={"log_z_mean": value, "reference": self.reference, "drift": drift,
                          "threshold": self.config.log_z_drift,
                          "trend": [[s, v] for s, v in self.history[-5:]] + [[self.step, value]]},
                remedies=["z-loss 1e-4 * (log Z)^2 on the output logits (Wortsman et al. 2023)",
                          _lower_lr(self.settings), "weight decay on the output layer"]))
        self.history = (self.history + [(self.step, value)])[-6:]
        return alerts

    def failed_result(self) -> Results:
        return self._nan_result(["stability/logits/log_z_mean", "stability/logits/log_z_max",
                                 "stability/logits/max_abs"])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/logits", "output log Z",
                           ("stability/logits/log_z_mean", "stability/logits/log_z_max")),
                ChartGroup("stability/logits", "max |logit|", ("stability/logits/max_abs",))]

    def carried_state(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": [list(h) for h in self.history]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.reference = state.get("reference")
        self.history = [(None if s is None else int(s), float(v)) for s, v in state.get("history", [])]


# ---- activations --------------------------------------------------------------------------------


class ActivationRMS(_StabilityDiagnostic):
    """RMS of each transformer block's output (residual-stream growth): sqrt(sum x^2 / count) over every
    element of the block's outputs during the interval. ``update(sum_sq, count)`` takes (n_blocks,) vectors."""

    needs = frozenset({"activations"})
    runs_on = "all_ranks"  # sums over every rank's batch

    def __init__(self, blocks: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.blocks = tuple(blocks)
        n = len(self.blocks)
        self.add_state("sum_sq", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self._pending: dict[int, tuple[Tensor, int]] = {}

    def _on_forward(self, i: int):
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = _first_tensor(output)
            if x is None or not x.is_floating_point():
                return
            with torch.no_grad():
                sq = x.detach().float().square().sum().to(torch.float64)
            prev = self._pending.get(i)
            self._pending[i] = (sq, x.numel()) if prev is None else (prev[0] + sq, prev[1] + x.numel())
        return on_forward

    def activation_sites(self, model: nn.Module) -> list[ActivationSite]:
        return [ActivationSite(name=b, module=_submodule(model, b), on_forward=self._on_forward(i))
                for i, b in enumerate(self.blocks)]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        n = len(self.blocks)
        pending, self._pending = self._pending, {}
        device = next(iter(pending.values()))[0].device if pending else self.sum_sq.device
        sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        count = torch.zeros(n, dtype=torch.float64, device=device)
        for i, (sq, c) in pending.items():
            sum_sq[i] = sq
            count[i] = c
        both = _reduced(ctx, torch.stack([sum_sq, count]), "sum")
        self.update(both[0], both[1])

    def update(self, sum_sq: Tensor, count: Tensor) -> None:  # type: ignore[override]
        self.sum_sq = self.sum_sq + sum_sq.to(self.sum_sq.device, self.sum_sq.dtype)
        self.count = self.count + count.to(self.count.device, self.count.dtype)

    def compute(self) -> Results:
        rms = (self.sum_sq / self.count).sqrt()
        return self._results({f"stability/activations/rms/{b}": rms[i] for i, b in enumerate(self.blocks)}, [])

    def failed_result(self) -> Results:
        return self._nan_result([f"stability/activations/rms/{b}" for b in self.blocks])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/activations", "block output RMS",
                           tuple(f"stability/activations/rms/{b}" for b in self.blocks))]


# ---- optimizer ----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


class UpdateRatio(_StabilityDiagnostic):
    """||W_after - W_before|| / ||W_before|| per watched parameter, from the engine's snapshot of the weights
    before the optimizer step. ``update(ratios)`` takes an (n_params,) vector (NaN where missing); the
    interval value is the mean. Carried state: each parameter's recent logged values (its running level)."""

    needs = frozenset({"weights_before", "optimizer"})
    phase = "step_end"
    runs_on = "all_ranks"  # FSDP2 shards: each rank sums its own rows, then the sums are all-reduced

    def __init__(self, params: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.params = tuple(params)
        n = len(self.params)
        self.add_state("total", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.levels: dict[str, list[float]] = {}

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        before = ctx.weights_before()
        params = ctx.params
        sums, sharded = [], []
        for name in self.params:
            if name in before and name in params:
                sums.append(update_ratio_terms(_local(before[name]), _local(params[name])))
                sharded.append(hasattr(params[name], "to_local"))
            else:
                sums.append(torch.full((2,), math.nan, dtype=torch.float64))
                sharded.append(False)
        if not sums:
            return
        device = self.total.device
        table = torch.stack([t.to(device) for t in sums])  # (n, 2): ||dW||^2, ||W||^2 (this rank's rows)
        if any(sharded):
            rows = torch.tensor(sharded, device=device)
            table = torch.where(rows[:, None], _reduced(ctx, table.nan_to_num(0.0), "sum"), table)
        self.update((table[:, 0] / table[:, 1]).sqrt())

    def update(self, ratios: Tensor) -> None:  # type: ignore[override]
        ratios = ratios.to(self.total.device, self.total.dtype)
        finite = torch.isfinite(ratios)
        self.total = self.total + torch.where(finite, ratios, torch.zeros_like(ratios))
        self.count = self.count + finite.to(self.count.dtype)

    def compute(self) -> Results:
        mean = self.total / self.count
        scalars = {f"stability/update_ratio/{p}": mean[i] for i, p in enumerate(self.params)}
        return self._results(scalars, self._alerts(mean))

    def _alerts(self, mean: Tensor) -> list[Alert]:
        cfg = self.config
        values = mean.tolist()  # the one host transfer
        flagged: dict[str, tuple[float, float]] = {}
        for p, v in zip(self.params, values):
            hist = self.levels.get(p, [])
            if math.isnan(v):
                continue
            if len(hist) >= cfg.level_warmup:
                level = _median(hist)
                if level > 0 and v > cfg.update_ratio_factor * level:
                    flagged[p] = (v, level)
            if v > 0:  # a skipped step (fp16 overflow) is no level
                self.levels[p] = (hist + [v])[-cfg.level_window:]
        if not flagged:
            return []
        worst = max(flagged, key=lambda p: flagged[p][0] / flagged[p][1])
        v, level = flagged[worst]
        return [Alert(
            rule="stability/update_ratio_jump", severity="warning",
            message=(f"update/weight ratio of {worst!r} is {v:.3g}, {v / level:.3g}x its running level {level:.3g}"
                     + (f" ({len(flagged)} parameters above {_fmt(cfg.update_ratio_factor)}x)" if len(flagged) > 1
                        else "")),
            evidence={"param": worst, "update_ratio": v, "level": level, "factor": v / level,
                      "threshold": cfg.update_ratio_factor, "parameters": {p: r for p, (r, _) in flagged.items()},
                      "trend": self.levels.get(worst, [])[-6:]},
            remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                      "a longer learning-rate warm-up",
                      "inspect the step's batch for outliers"])]

    def failed_result(self) -> Results:
        return self._nan_result([f"stability/update_ratio/{p}" for p in self.params])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/update_ratio", "||dW|| / ||W||",
                           tuple(f"stability/update_ratio/{p}" for p in self.params))]

    def carried_state(self) -> dict[str, Any]:
        return {"levels": {p: list(v) for p, v in self.levels.items()}}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.levels = {p: [float(x) for x in v] for p, v in state.get("levels", {}).items()}


class AdamEpsShare(_StabilityDiagnostic):
    """Per watched parameter, the share of entries whose sqrt(v_hat) is below Adam's eps, and sqrt(mean v_hat)
    / eps (the gradient RMS Adam sees, against eps), read after the optimizer step from
    ``state[p]["exp_avg_sq"]`` (``max_exp_avg_sq`` with amsgrad), ``state[p]["step"]`` and the group's
    betas/eps. ``update(shares, rms_over_eps)`` takes (n_params,) vectors (NaN where missing)."""

    needs = frozenset({"optimizer"})
    phase = "step_end"
    runs_on = "all_ranks"  # FSDP2 shards its optimizer state: counts and sums are all-reduced

    def __init__(self, params: Sequence[str], config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.params = tuple(params)
        n = len(self.params)
        self.add_state("total", torch.zeros((2, n), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("count", torch.zeros((2, n), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.no_adam_state = False

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        index = {id(p): self.params.index(n) for n, p in ctx.params.items() if n in self.params}
        n = len(self.params)
        device = self.total.device
        table = torch.zeros((n, 3), dtype=torch.float64, device=device)  # entries below eps, entries, sum v_hat / eps^2
        found = torch.zeros(n, dtype=torch.bool)
        sharded = torch.zeros(n, dtype=torch.bool)
        for st in adam_states(ctx.optimizer):
            i = index.get(id(st.param))
            if i is None:
                continue
            v = _local(st.exp_avg_sq)
            share, rms = adam_eps_statistics(v, st.step, st.beta2, st.eps)
            count = float(v.numel())
            table[i] = torch.stack([share * count, torch.tensor(count, dtype=torch.float64, device=share.device),
                                    rms.square() * count]).to(device)
            found[i] = True
            sharded[i] = hasattr(st.exp_avg_sq, "to_local")
        self.no_adam_state = not bool(found.any())
        if self.no_adam_state:
            self._say_later("adam", "gradwatch: stability: the optimizer keeps no Adam second moments "
                            "(exp_avg_sq) for the watched parameters; stability/adam is not logged")
            self._flush_messages(ctx)
            return
        if bool(sharded.any()):
            rows = sharded.to(device)[:, None]
            table = torch.where(rows, _reduced(ctx, table, "sum"), table)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        keep = found.to(device)
        share = torch.where(keep, table[:, 0] / table[:, 1], nan)
        rms_over_eps = torch.where(keep, (table[:, 2] / table[:, 1]).sqrt(), nan)
        self.update(share, rms_over_eps)

    def update(self, shares: Tensor, rms_over_eps: Tensor) -> None:  # type: ignore[override]
        values = torch.stack([shares, rms_over_eps]).to(self.total.device, self.total.dtype)
        finite = torch.isfinite(values)
        self.total = self.total + torch.where(finite, values, torch.zeros_like(values))
        self.count = self.count + finite.to(self.count.dtype)

    def compute(self) -> Results:
        mean = self.total / self.count
        scalars: dict[str, Tensor] = {}
        for i, p in enumerate(self.params):
            scalars[f"stability/adam/eps_share/{p}"] = mean[0, i]
            scalars[f"stability/adam/rms_over_eps/{p}"] = mean[1, i]
        shares = mean[0].tolist()  # the one host transfer
        over = {p: s for p, s in zip(self.params, shares) if not math.isnan(s) and s > self.config.eps_share_limit}
        alerts: list[Alert] = []
        if over:
            worst = max(over, key=over.get)
            eps = self.settings.get("eps")
            alerts.append(Alert(
                rule="stability/adam_eps_dominates", severity="warning",
                message=(f"Adam's eps exceeds sqrt(v_hat) for {over[worst]:.0%} of {worst!r}'s entries: their updates "
                         "are damped by eps rather than normalised"),
                evidence={"param": worst, "eps_share": over[worst], "threshold": self.config.eps_share_limit,
                          "parameters": over, "eps": eps},
                remedies=[f"a smaller AdamW eps (now {_fmt(eps)}; e.g. 1e-15, Wortsman et al. 2023)" if eps is not None
                          else "a smaller AdamW eps (e.g. 1e-15, Wortsman et al. 2023)",
                          "check for vanishing gradients in those layers"]))
        return self._results(scalars, alerts)

    def failed_result(self) -> Results:
        if self.no_adam_state:  # not an Adam-like optimizer: nothing to log, not a failure
            return self._results({}, [])
        return self._nan_result([f"stability/adam/eps_share/{p}" for p in self.params])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/adam", "share of entries with sqrt(v_hat) < eps",
                           tuple(f"stability/adam/eps_share/{p}" for p in self.params)),
                ChartGroup("stability/adam", "sqrt(mean v_hat) / eps",
                           tuple(f"stability/adam/rms_over_eps/{p}" for p in self.params))]


# ---- spikes -------------------------------------------------------------------------------------


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all entries of ``tensors`` together (one fused kernel where torch has one)."""
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total is not None and len({t.device for t in tensors}) == 1:
        return total(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(tensors[0].device) for t in tensors]))


class _Spikes(_StabilityDiagnostic):
    """Spikes of one scalar series by robust running statistics, observed every step, logged at ``every``.

    Each step's value is scored against the previous ``spike_window`` steps: z = (x - median) / (1.4826 MAD)
    (see :class:`gradwatch.functional.stability.RobustSpikeDetector`), after ``spike_warmup`` steps; the
    window lives on the device, so no step syncs with the host. Logged: the interval's max z
    (``stability/spike/<quantity>``; absent until warmed up). ``update(value)`` scores one value. Carried
    state: the window.
    """

    quantity: str = ""
    label: str = ""

    def __init__(self, config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.detector = RobustSpikeDetector(self.config.spike_window, self.config.spike_warmup)
        f64 = torch.float64
        self.add_state("z_max", torch.tensor(-math.inf, dtype=f64), dist_reduce_fx="max", persistent=True)
        self.add_state("at_max", torch.tensor(math.nan, dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("spikes", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("nonfinite", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self._scored = [0]  # host-side: steps past the warm-up in this interval (reset with the states)

    def observe_cadence(self) -> Cadence:
        return self.config.spike_every  # type: ignore[return-value]

    def log_cadence(self) -> Cadence:
        return self.config.every  # type: ignore[return-value]

    def reset(self) -> None:
        super().reset()
        self._scored[0] = 0

    def update(self, value: Tensor | float) -> None:  # type: ignore[override]
        """Score one value (a handful of small device ops; nothing is moved to the host)."""
        v = torch.as_tensor(value).detach().reshape(()).to(self.z_max.device, torch.float64)
        z = self.detector.score(v)
        # in place: a state reassignment costs an nn.Module __setattr__ per tensor, every step
        self.nonfinite.add_((~torch.isfinite(v)).to(torch.float64))
        if z is not None:
            self.at_max.copy_(torch.where(z > self.z_max, v, self.at_max))
            torch.maximum(self.z_max, z, out=self.z_max)
            self.spikes.add_((z > self.config.spike_threshold).to(torch.float64))
            self._scored[0] += 1

    @property
    def scored(self) -> int:
        """Steps past the warm-up in this interval."""
        return self._scored[0]

    def compute(self) -> Results:
        zmax, spikes, nonfinite, at = torch.stack([self.z_max, self.spikes, self.nonfinite,
                                                   self.at_max]).tolist()  # the one host transfer
        scalars: dict[str, Tensor] = {}
        if self.scored > 0:
            scalars[f"stability/spike/{self.quantity}"] = self.z_max.clone()
        alerts: list[Alert] = []
        if nonfinite > 0:
            alerts.append(Alert(
                rule=f"stability/nonfinite_{self.quantity}", severity="critical",
                message=f"the {self.label} was inf/NaN at {int(nonfinite)} step(s) of this interval",
                evidence={"nonfinite_steps": int(nonfinite)},
                remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                          "z-loss 1e-4 * (log Z)^2", "bf16 instead of fp16, or a lower loss scale"]))
        if spikes > 0:
            hist = self.detector.history()
            finite = hist[torch.isfinite(hist)]
            median = float(finite.median()) if finite.numel() else math.nan
            thr = self.config.spike_threshold
            alerts.append(Alert(
                rule=f"stability/{self.quantity}_spike", severity="warning",
                message=(f"{self.label} spiked to {at:.4g} (robust z {zmax:.3g} > {_fmt(thr)}, window median "
                         f"{median:.4g}) at {int(spikes)} step(s) of this interval"),
                evidence={"value": at, "z": zmax, "threshold": thr, "spikes": int(spikes),
                          "window_median": median, "window": self.config.spike_window,
                          "trend": [v if math.isfinite(v) else None for v in hist[-8:].tolist()]},
                remedies=[_lower_lr(self.settings), "gradient clipping (e.g. max norm 1.0)",
                          "a longer learning-rate warm-up", "inspect the batches at those steps"]))
        return self._results(scalars, alerts)

    def failed_result(self) -> Results:
        return self._results({}, [])

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/spike", f"{self.label} robust z-score (max over interval)",
                           (f"stability/spike/{self.quantity}",))]

    def carried_state(self) -> dict[str, Any]:
        return {"window": self.detector.state_dict()}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        if "window" in state:
            self.detector.load_state_dict(state["window"])


class LossSpikes(_Spikes):
    """Spikes of the training loss (``stability/spike/loss``), at the step's end."""

    quantity = "loss"
    label = "loss"
    needs = frozenset({"loss", "optimizer"})
    phase = "step_end"

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        if ctx.loss is not None:
            self.update(ctx.loss)


class GradNormSpikes(_Spikes):
    """Spikes of the gradient norm (``stability/spike/grad_norm``): the Frobenius norm over the watched
    matrices' true gradients (unscaled, pre-clip), when they are ready."""

    quantity = "grad_norm"
    label = "gradient norm"
    needs = frozenset({"gradients", "optimizer"})
    phase = "gradients_ready"

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        matrices, _ = ctx.gradients()
        if matrices:
            self.update(_total_norm([m.detach() for m in matrices]))


# ---- gradient noise scale -----------------------------------------------------------------------


class NoiseScale(_StabilityDiagnostic):
    """Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

    From the step's squared gradient norms at two batch sizes b < B (``ctx.batch_gradient_norms()``, see
    :class:`gradwatch.engine.context.BatchGradientNorms`): |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b) and
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B), each smoothed by a bias-corrected EMA (carried state)
    before the ratio is taken. ``stability/noise_scale`` is the smoothed ratio (examples); the batch size at
    which training is about as efficient in steps as in examples. ``stability/noise_scale/examples`` is B,
    the examples behind the big gradient, to read it against.
    """

    needs = frozenset({"micro_batches"})
    phase = "gradients_ready"
    runs_on = "all_ranks"  # the norms are reduced over ranks, and every rank must agree on going quiet

    def __init__(self, config: StabilityConfig | None = None, decay: float = 0.95, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.estimator = NoiseScaleEstimator(decay)
        self.add_state("value", torch.full((), math.nan, dtype=torch.float64), dist_reduce_fx=None, persistent=True)
        self.add_state("b_big", torch.full((), math.nan, dtype=torch.float64), dist_reduce_fx=None, persistent=True)
        self.inactive = False

    def observe_cadence(self) -> Cadence:
        return Cadence.at(()) if self.inactive else self.config.every  # type: ignore[return-value]

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        norms = ctx.batch_gradient_norms()
        if norms is None:
            if self.config.noise_scale:
                ctx.say_once("stability/noise_scale", "gradwatch: stability: stability/noise_scale is not logged: "
                             f"{getattr(ctx, 'batch_gradient_norms_reason', '') or 'one batch size only'}")
            else:  # asked for only where possible (the default): no more hooks in this run
                self.inactive = True
            return
        self.update(norms.sq_norm_small, norms.b_small, norms.sq_norm_big, norms.b_big)

    def update(self, sq_norm_small: Tensor | float, b_small: float,  # type: ignore[override]
               sq_norm_big: Tensor | float, b_big: float) -> None:
        self.estimator.update(sq_norm_small, b_small, sq_norm_big, b_big)
        self.value = self.estimator.value.to(self.value.device)
        self.b_big = torch.tensor(float(b_big), dtype=torch.float64, device=self.value.device)

    def compute(self) -> Results:
        return self._results({"stability/noise_scale": self.value.clone(),
                              "stability/noise_scale/examples": self.b_big.clone()}, [])

    def failed_result(self) -> Results:
        return self._results({}, [])  # one batch size at this step: nothing to log

    def charts(self) -> list[Chart]:
        return [ChartGroup("stability/noise_scale", "gradient noise scale B_simple and the batch (examples)",
                           ("stability/noise_scale", "stability/noise_scale/examples"))]

    def carried_state(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict()}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        if "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])


# ---- sustained sharpness ------------------------------------------------------------------------


class SharpnessRatio(_StabilityDiagnostic):
    """The sustained-sharpness rule: the sharpness family's ``sharpness/ratio`` (lambda_max over the
    stability threshold 2/lr, or Adam's 38/lr: Cohen et al. 2021, 2022) above ``sharpness_ratio_limit`` for
    ``sharpness_sustain`` consecutive estimates raises ``stability/sharpness_above_threshold``.

    It reads what the sharpness family logged (capability ``"logged"``), so it sees each estimate once, at
    the first of its own observations after that estimate was written. Carried state: the recent estimates.
    """

    needs = frozenset({"logged", "optimizer"})
    phase = "step_end"

    def __init__(self, config: StabilityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.recent: list[tuple[int, float]] = []  # (step, ratio) of the last sharpness_sustain estimates

    def observe(self, ctx: StepContext) -> None:
        self._begin_observe(ctx)
        got = ctx.logged("sharpness/ratio")
        if got is None or (self.recent and got[0] <= self.recent[-1][0]):
            return
        self.update(*got)

    def update(self, step: int, ratio: float) -> None:  # type: ignore[override]
        self.recent = (self.recent + [(int(step), float(ratio))])[-self.config.sharpness_sustain:]

    def compute(self) -> Results:
        limit, k = self.config.sharpness_ratio_limit, self.config.sharpness_sustain
        alerts: list[Alert] = []
        ratios = [r for _, r in self.recent]
        if len(ratios) == k and all(math.isfinite(r) and r > limit for r in ratios):
            alerts.append(Alert(
                rule="stability/sharpness_above_threshold", severity="warning",
                message=(f"sharpness lambda_max has been above its stability threshold for {k} estimate(s) in a "
                         f"row (ratio {ratios[-1]:.3g} > {_fmt(limit)}): steps of this size overshoot along the top "
                         "Hessian direction; loss spikes or divergence often follow"),
                evidence={"ratios": ratios, "steps": [s for s, _ in self.recent], "limit": limit, "sustain": k},
                remedies=[_lower_lr(self.settings), "a longer learning-rate warm-up",
                          "gradient clipping (e.g. max norm 1.0)"]))
        return self._results({}, alerts)

    def failed_result(self) -> Results:
        return self._results({}, [])

    def carried_state(self) -> dict[str, Any]:
        return {"recent": [list(x) for x in self.recent]}

    def load_carried_state(self, state: Mapping[str, Any]) -> None:
        self.recent = [(int(s), float(r)) for s, r in state.get("recent", [])]


# ---- the family ---------------------------------------------------------------------------------


def _unique_params(watched: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(w.param_name for w in watched))


def build(config: StabilityConfig, inputs: BuildInputs) -> list[Diagnostic]:
    """The family's diagnostics for ``inputs.model``; the last one built writes ``stability/alert`` (the loss
    spike detector when it observes every step, else the last of the others)."""
    model = inputs.model
    out: list[_StabilityDiagnostic] = []
    params = _unique_params(inputs.watched)
    # first: these two may log at fewer events than the others (one batch size: quiet; no new estimate)
    if config.noise_scale is not False and params:
        out.append(NoiseScale(config))
    families = getattr(inputs.config, "families", None) or {}
    if "sharpness" in families:
        out.append(SharpnessRatio(config))
    attention = find_attention_modules(model) if model is not None else []
    if config.attention and attention:
        out.append(AttentionLogits([n for n, _ in attention], [k for _, k in attention], config))
    if config.logits and model is not None:
        name, source = find_logits_module(model)
        out.append(OutputLogits(name, source, config))
    if config.activations and attention:
        blocks = find_blocks(model, [n for n, _ in attention])
        if blocks:
            out.append(ActivationRMS(blocks, config))
    if config.update_ratio and params:
        out.append(UpdateRatio(params, config))
    if config.adam and params:
        out.append(AdamEpsShare(params, config))
    spikes: list[_StabilityDiagnostic] = []
    if config.spikes:
        if inputs.watched:
            spikes.append(GradNormSpikes(config))
        spikes.append(LossSpikes(config))
    # the last one writes stability/alert: it must log at every logging event (the engine computes in build
    # order), which the spike detectors do when they observe every step
    out = out + spikes if config.spike_every == Cadence.every(1) else spikes + out
    board = AlertBoard()
    for d in out:
        d.board, d.emits_flag = board, False
    if out:
        out[-1].emits_flag = True
    return list(out)


FAMILY = Family(key="stability", stem="stability", config_class=StabilityConfig, default_on=False, build=build,
                summary="attention-logit growth, attention entropy, output log Z, update/weight ratios, Adam eps "
                        "share, loss and gradient spikes, with alerts",
                knobs=("max_exact_seq_len", "attention_logit_level", "attention_growth", "entropy_floor",
                       "log_z_drift", "update_ratio_factor", "spike_threshold", "spike_every", "spike_window",
                       "spike_warmup", "sharpness_ratio_limit"))

__all__ = ["FAMILY", "ActivationRMS", "AdamEpsShare", "AlertBoard", "AttentionLogits", "GradNormSpikes", "LossSpikes",
           "NoiseScale", "OutputLogits", "SharpnessRatio", "StabilityConfig", "UpdateRatio", "build", "find_attention_modules",
           "find_blocks", "find_logits_module"]
