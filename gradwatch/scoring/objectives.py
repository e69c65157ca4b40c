"""The per-example loss each example's gradient is taken of, and the tokenization behind it.

``causal_lm`` (decoder models, the seed papers' protocol; Li et al. 2024, 2025): the prompt and the response are
tokenized as one sequence, and the loss is the mean next-token cross-entropy over the response tokens only
(every prompt position has label -100). The prompt is the tokenizer's chat template applied to the prompt turns
with the generation prompt added when the tokenizer has a template, else the plain layout
``"### Instruction:\\n{prompt}\\n\\n### Response:\\n"`` (a conversation's turns written ``role: content``, one per
paragraph); the response ends with the EOS token when the tokenizer
has one. Too long a pair keeps its response first: the prompt is cut from its start down to no less than half of
``max_length``, then the sequence is cut at ``max_length``.

``pair_cosine`` (encoder models such as BERT/MiniLM, which have no language-model head to score a response
with): prompt and response are encoded separately, each mean-pooled over its tokens, and the loss is
``1 - cos(e(prompt), e(response))``: the positive-pair term of the contrastive objective sentence encoders are
trained with. A response that does not answer its prompt has a larger loss; each side is cut at ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwatch.scoring.data import Example

Objective = Literal["causal_lm", "pair_cosine"]
OBJECTIVES: tuple[str, ...] = ("causal_lm", "pair_cosine")
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"

Encoded = dict[str, Tensor]  # one example: 1-D tensors
Forward = Callable[..., Any]  # model(**inputs) -> outputs


def infer_objective(model: torch.nn.Module) -> Objective:
    """``causal_lm`` for a model with a language-model head that is not an encoder, else ``pair_cosine``."""
    config = getattr(model, "config", None)
    architectures = " ".join(getattr(config, "architectures", None) or [type(model).__name__])
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("gradwatch score-data: encoder-decoder models are not supported (give a decoder "
                         "(causal LM) or an encoder model)")
    if "ForCausalLM" in architectures or "LMHeadModel" in architectures:
        return "causal_lm"
    return "pair_cosine"


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_text(tokenizer: Any, example: Example) -> str:
    """The prompt of ``example`` as the causal LM sees it (chat template or the plain layout)."""
    turns = [{"role": m.role, "content": m.content} for m in example.prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if len(turns) == 1 and turns[0]["role"] == "user":
        return PLAIN_PROMPT.format(prompt=turns[0]["content"])
    return PLAIN_PROMPT.format(prompt="\n\n".join(f"{t['role']}: {t['content']}" for t in turns))


def encode(tokenizer: Any, example: Example, objective: Objective, max_length: int) -> Encoded:
    """One example as the 1-D tensors its loss needs.

    Raises:
        ValueError: nothing of the response is left within ``max_length`` tokens.
    """
    if objective == "causal_lm":
        templated = bool(getattr(tokenizer, "chat_template", None))  # the template writes its own special tokens
        prompt = _ids(tokenizer, prompt_text(tokenizer, example), special=not templated)
        response = _ids(tokenizer, example.response, special=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            response.append(int(eos))
        budget = max(max_length - len(response), max_length // 2)
        prompt = prompt[-budget:] if budget > 0 else []
        ids = (prompt + response)[:max_length]
        labels = ([-100] * len(prompt) + response)[:max_length]
        if sum(1 for t in labels[1:] if t != -100) == 0:  # position 0 is never predicted
            raise ValueError(f"example {example.index}: no response token within max_length={max_length}")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    a = _ids(tokenizer, example.prompt_text, special=True)[:max_length]
    b = _ids(tokenizer, example.response, special=True)[:max_length]
    if not a or not b:
        raise ValueError(f"example {example.index}: an empty prompt or response after tokenization")
    return {"input_ids_a": torch.tensor(a), "input_ids_b": torch.tensor(b)}


def token_count(encoded: Encoded) -> int:
    """The tokens the loss is taken on (response tokens for the causal LM; both sides for the pair)."""
    if "labels" in encoded:
        return int((encoded["labels"][1:] != -100).sum())
    return int(encoded["input_ids_a"].numel() + encoded["input_ids_b"].numel())


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a chunk to its longest member: ids with ``pad_id``, labels with -100, masks with 0."""
    out: dict[str, Tensor] = {}
    for key in examples[0]:
        length = max(e[key].numel() for e in examples)
        fill = -100 if key == "labels" else pad_id
        out[key] = torch.stack([F.pad(e[key], (0, length - e[key].numel()), value=fill) for e in examples])
        if key.startswith("input_ids"):
            mask = torch.stack([F.pad(torch.ones_like(e[key]), (0, length - e[key].numel()), value=0) for e in examples])
            out[key.replace("input_ids", "mask")] = mask
    return out


def causal_lm_loss(forward: Forward, ex: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the response tokens of one (possibly right-padded) example.

    With causal attention, right padding never reaches an earlier position, and the padded positions carry label
    -100, so the loss is that of the unpadded example; the 2-D attention mask is passed all the same (models check
    for padding without one, in data-dependent code ``vmap`` cannot trace).
    """
    mask = ex.get("mask", torch.ones_like(ex["input_ids"]))
    logits = forward(input_ids=ex["input_ids"][None], attention_mask=mask[None]).logits[0, :-1]
    labels = ex["labels"][1:]
    keep = (labels != -100).to(logits.dtype)
    losses = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return (losses * keep).sum() / keep.sum()


def _embed(forward: Forward, ids: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    m = mask.to(dtype)
    # a prepared 4-D additive mask: transformers uses it as given (the 2-D mask path has data-dependent checks
    # that torch.func.vmap cannot trace)
    additive = ((1.0 - m) * torch.finfo(dtype).min)[None, None, None, :]
    hidden = forward(input_ids=ids[None], attention_mask=additive).last_hidden_state[0]
    return (hidden * m[:, None]).sum(0) / m.sum()


def pair_cosine_loss(forward: Forward, ex: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """``1 - cos(mean_pool(f(prompt)), mean_pool(f(response)))`` of one (possibly right-padded) example."""
    mask_a = ex.get("mask_a", torch.ones_like(ex["input_ids_a"]))
    mask_b = ex.get("mask_b", torch.ones_like(ex["input_ids_b"]))
    a = _embed(forward, ex["input_ids_a"], mask_a, dtype)
    b = _embed(forward, ex["input_ids_b"], mask_b, dtype)
    return 1.0 - F.cosine_similarity(a, b, dim=0)


def example_loss(objective: Objective, dtype: torch.dtype) -> Callable[[Forward, Mapping[str, Tensor]], Tensor]:
    """The loss function of ``objective``: ``loss(forward, example) -> scalar``."""
    if objective == "causal_lm":
        return causal_lm_loss
    if objective == "pair_cosine":
        return lambda forward, ex: pair_cosine_loss(forward, ex, dtype)
    raise ValueError(f"gradwatch score-data: objective expected one of {list(OBJECTIVES)}, got {objective!r}")
