"""Captions -> token ids -> text-encoder hidden states, with sd-scripts' clip_skip and max_token_length.

max_token_length 150 / 225: the caption is tokenized to max_token_length + 2, cut into 75-token pieces that
each get BOS ... EOS (77 ids), encoded separately, and joined back as BOS, the 75-token bodies of every piece,
and the last EOS: hidden states of length max_token_length + 2 (sd-scripts' SD1 behaviour). No torch.no_grad
here: a LoRA on the text encoder trains through this.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def _check_max_token_length(max_token_length: int | None) -> None:
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"max_token_length must be one of 75, 150, 225 or unset, not {max_token_length!r}")


def tokenize(model, captions: list[str] | str, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids [B, n, 77]: n = 1 without max_token_length, else max_token_length // 75. Padded with EOS
    (SD1's pad token). `model` is an SDModel or a CLIPTokenizer."""
    _check_max_token_length(max_token_length)
    tok = _tokenizer(model)
    captions = [captions] if isinstance(captions, str) else list(captions)
    width = tok.model_max_length   # 77
    if max_token_length is None or max_token_length + 2 <= width:
        ids = tok(captions, padding="max_length", truncation=True, max_length=width, return_tensors="pt").input_ids
        return ids.unsqueeze(1)
    total = max_token_length + 2
    ids = tok(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    body = width - 2
    pieces = [torch.cat([ids[:, :1], ids[:, i:i + body], ids[:, -1:]], dim=1) for i in range(1, total - 1, body)]
    return torch.stack(pieces, dim=1)


def text_transformer(text_encoder):
    """The module holding embeddings / encoder / final_layer_norm (transformers >= 5.6 has no .text_model)."""
    return getattr(text_encoder, "text_model", text_encoder)


def encode_tokens(model, input_ids: torch.Tensor, clip_skip: int | None = None, device=None) -> torch.Tensor:
    """Hidden states [B, L, hidden] for ids from `tokenize` ([B, n, 77], or [B, 77] for one piece).
    clip_skip k > 1 takes the output of the k-th layer from the end and applies the final layer norm."""
    te = model.text_encoder
    n_layers = te.config.num_hidden_layers
    if clip_skip is not None and not (isinstance(clip_skip, int) and 1 <= clip_skip <= n_layers):
        raise ConfigError(f"clip_skip must be an integer from 1 to {n_layers} (the text encoder's layer count), "
                          f"not {clip_skip!r}")
    if input_ids.ndim == 2:
        input_ids = input_ids.unsqueeze(1)
    b, n, width = input_ids.shape
    if device is None:
        device = next(te.parameters()).device
    flat = input_ids.reshape(b * n, width).to(device)
    if clip_skip is None or clip_skip == 1:
        hidden = te(flat)[0]
    else:
        out = te(flat, output_hidden_states=True, return_dict=True)
        hidden = text_transformer(te).final_layer_norm(out.hidden_states[-clip_skip])
    hidden = hidden.reshape(b, n * width, hidden.shape[-1])
    if n == 1:
        return hidden
    body = width - 2
    parts = [hidden[:, :1]] + [hidden[:, i:i + body] for i in range(1, n * width, width)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_prompts(model, captions: list[str] | str, clip_skip: int | None = None,
                   max_token_length: int | None = None, device=None) -> torch.Tensor:
    """Text-encoder hidden states [B, 77, hidden] (or [B, max_token_length + 2, hidden]) for captions."""
    return encode_tokens(model, tokenize(model, captions, max_token_length), clip_skip, device)
