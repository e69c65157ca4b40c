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

The package, one concept a module: ``config`` (:class:`StabilityConfig`), ``discovery`` (where to look in a
model), ``base`` (the common diagnostic base, reductions over ranks), ``alerts`` (the alert board and what
remedies quote), one module per diagnostic with its rules (``attention``, ``output_logits``, ``activations``,
``update_ratio``, ``adam_eps``, ``spikes``, ``noise_scale``, ``sharpness_ratio``), and ``family`` (``build``
and the registration ``FAMILY``). Every name below is importable from ``gradwatch.metrics.stability``.
"""

from gradwatch.metrics.stability.activations import ActivationRMS
from gradwatch.metrics.stability.adam_eps import AdamEpsShare
from gradwatch.metrics.stability.alerts import AlertBoard
from gradwatch.metrics.stability.attention import AttentionLogits
from gradwatch.metrics.stability.config import StabilityConfig
from gradwatch.metrics.stability.discovery import find_attention_modules, find_blocks, find_logits_module
from gradwatch.metrics.stability.family import FAMILY, build
from gradwatch.metrics.stability.noise_scale import NoiseScale
from gradwatch.metrics.stability.output_logits import OutputLogits
from gradwatch.metrics.stability.sharpness_ratio import SharpnessRatio
from gradwatch.metrics.stability.spikes import GradNormSpikes, LossSpikes
from gradwatch.metrics.stability.update_ratio import UpdateRatio

__all__ = ["FAMILY", "ActivationRMS", "AdamEpsShare", "AlertBoard", "AttentionLogits", "GradNormSpikes", "LossSpikes",
           "NoiseScale", "OutputLogits", "SharpnessRatio", "StabilityConfig", "UpdateRatio", "build",
           "find_attention_modules", "find_blocks", "find_logits_module"]
