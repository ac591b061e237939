"""Captions -> token ids -> text conditioning, for every family, as sd-scripts computes it.

Tokenizing (sd-scripts' `_get_input_ids`): without max_token_length, 77 ids BOS ... EOS padded with the
tokenizer's pad token (EOS for SD1 / SDXL's first encoder, "!" = id 0 for the OpenCLIP encoders). With 150 / 225
the caption is tokenized to max_token_length + 2 and cut into 75-token pieces that each get BOS ... and the
last id (EOS or pad). For pad-0 tokenizers a piece that ends in a word gets EOS as its last id, and a piece that
starts with padding gets EOS first.

Encoding: every piece goes through the encoder on its own; the hidden states are joined back as BOS, the
75-token bodies, and the last position (length max_token_length + 2). sd-scripts has an SD2 "empty piece"
fix-up there that compares a token id with a string and so never applies; it is not reproduced. No torch.no_grad
here: a LoRA on the text encoders trains through this.

  SD1 / SD2: last layer (final norm) or, with clip_skip k, layer -k with the final norm (SD2: of the 23-layer
             OpenCLIP conversion, so clip_skip unset is already ldm's "penultimate").
  SDXL:      CLIP-L layer -2 (no norm) ++ bigG layer -2 (no norm) on the channel axis; pooled = bigG's
             final-norm'd first EOS position through text_projection, from the first piece. clip_skip is ignored
             (with a warning), as sd-scripts does: SDXL is always conditioned on the penultimate layers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..transfer import to_device

ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)
SDXL_CLIP_SKIP_NOTE = ("clip_skip is ignored for SDXL: it is always conditioned on the penultimate layers of both "
                       "text encoders (as sd-scripts does)")


@dataclass
class TextConditioning:
    hidden: torch.Tensor                 # encoder_hidden_states [B, L, C]; SDXL: te1 ++ te2 channels
    pooled: torch.Tensor | None = None   # SDXL: [B, projection_dim]; None otherwise


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def _check_max_token_length(max_token_length: int | None) -> None:
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"max_token_length must be one of 75, 150, 225 or unset, not {max_token_length!r}")


def _family(model) -> str:
    info = getattr(model, "info", None)
    return getattr(info, "family", "sd1")


def tokenize(model, captions: list[str] | str, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids [B, n, 77] for the model's (first) tokenizer: n = 1 without max_token_length, else
    max_token_length // 75. `model` is an SDModel or a CLIPTokenizer."""
    return tokenize_with(_tokenizer(model), captions, max_token_length)


def tokenize_all(model, captions: list[str] | str, max_token_length: int | None = None) -> list[torch.Tensor]:
    """Token ids per text encoder ([ids] or, for SDXL, [ids_te1, ids_te2]), for caching encoder inputs."""
    tokenizers = getattr(model, "tokenizers", None) or [_tokenizer(model)]
    return [tokenize_with(tok, captions, max_token_length) for tok in tokenizers]


def tokenize_with(tok, captions: list[str] | str, max_token_length: int | None = None) -> torch.Tensor:
    _check_max_token_length(max_token_length)
    captions = [captions] if isinstance(captions, str) else list(captions)
    width = tok.model_max_length   # 77
    if max_token_length is None or max_token_length + 2 <= width:
        ids = tok(captions, padding="max_length", truncation=True, max_length=width, return_tensors="pt").input_ids
        return ids.unsqueeze(1)
    total = max_token_length + 2
    ids = tok(captions, padding="max_length", truncation=True, max_length=total, return_tensors="pt").input_ids
    body = width - 2
    eos, pad = tok.eos_token_id, tok.pad_token_id
    pieces = []
    for i in range(1, total - 1, body):
        piece = torch.cat([ids[:, :1], ids[:, i:i + body], ids[:, -1:]], dim=1)
        if pad != eos:
            ends_in_word = (piece[:, -2] != eos) & (piece[:, -2] != pad)
            piece[:, -1] = torch.where(ends_in_word, torch.full_like(piece[:, -1], eos), piece[:, -1])
            starts_empty = piece[:, 1] == pad
            piece[:, 1] = torch.where(starts_empty, torch.full_like(piece[:, 1], eos), piece[:, 1])
        pieces.append(piece)
    return torch.stack(pieces, dim=1)


def text_transformer(text_encoder):
    """The module holding embeddings / encoder / final_layer_norm (transformers >= 5.6 has no .text_model in
    CLIPTextModel; CLIPTextModelWithProjection keeps it)."""
    return getattr(text_encoder, "text_model", text_encoder)


def _flat(input_ids: torch.Tensor, device) -> tuple[torch.Tensor, int, int, int]:
    if input_ids.ndim == 2:
        input_ids = input_ids.unsqueeze(1)
    b, n, width = input_ids.shape
    flat = input_ids.reshape(b * n, width)
    return (to_device(flat, device) if device is not None else flat), b, n, width   # no host wait on CUDA


def _join_pieces(hidden: torch.Tensor, b: int, n: int, width: int) -> torch.Tensor:
    """[B*n, 77, C] -> [B, 77, C] (n = 1) or [B, n*75 + 2, C]: BOS, every piece's body, the last position."""
    hidden = hidden.reshape(b, n * width, hidden.shape[-1])
    if n == 1:
        return hidden
    body = width - 2
    parts = [hidden[:, :1]] + [hidden[:, i:i + body] for i in range(1, n * width, width)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def _device_of(module):
    return next(module.parameters()).device


def encode_tokens(model, input_ids, clip_skip: int | None = None, device=None) -> torch.Tensor:
    """Hidden states [B, L, C] for ids from `tokenize` ([B, n, 77], or [B, 77] for one piece); SDXL takes the
    list from `tokenize_all`. clip_skip k > 1 takes layer -k and applies the final layer norm (SD1 / SD2)."""
    return encode_text_tokens(model, input_ids, clip_skip=clip_skip, device=device).hidden


def encode_text_tokens(model, input_ids, *, clip_skip: int | None = None, device=None) -> TextConditioning:
    """TextConditioning for ids from `tokenize_all` (a list, one tensor per encoder) or, for one encoder,
    `tokenize`."""
    ids_list = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    if _family(model) == "sdxl":
        if len(ids_list) != 2:
            raise ConfigError("SDXL needs token ids for both text encoders: use tokenize_all(model, captions)")
        if clip_skip not in (None, 1):
            warnings.warn(SDXL_CLIP_SKIP_NOTE, stacklevel=3)
        return _encode_sdxl(model, ids_list[0], ids_list[1], device)
    if len(ids_list) != 1:
        raise ConfigError(f"this model has one text encoder; got token ids for {len(ids_list)}")
    return TextConditioning(_encode_single(model.text_encoder, ids_list[0], clip_skip, device))


def _encode_single(te, input_ids: torch.Tensor, clip_skip: int | None, device) -> torch.Tensor:
    n_layers = te.config.num_hidden_layers
    if clip_skip is not None and not (isinstance(clip_skip, int) and 1 <= clip_skip <= n_layers):
        raise ConfigError(f"clip_skip must be an integer from 1 to {n_layers} (the text encoder's layer count), "
                          f"not {clip_skip!r}")
    flat, b, n, width = _flat(input_ids, device or _device_of(te))
    if clip_skip is None or clip_skip == 1:
        hidden = te(flat)[0]
    else:
        out = te(flat, output_hidden_states=True, return_dict=True)
        hidden = text_transformer(te).final_layer_norm(out.hidden_states[-clip_skip])
    return _join_pieces(hidden, b, n, width)


def _encode_sdxl(model, ids1: torch.Tensor, ids2: torch.Tensor, device) -> TextConditioning:
    te1, te2 = model.text_encoder, model.text_encoder_2
    flat1, b, n, width = _flat(ids1, device or _device_of(te1))
    flat2, b2, n2, width2 = _flat(ids2, device or _device_of(te2))
    if (b, n, width) != (b2, n2, width2):
        raise ConfigError(f"the two encoders' token ids differ in shape: {tuple(ids1.shape)} vs {tuple(ids2.shape)}")
    h1 = te1(flat1, output_hidden_states=True, return_dict=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True, return_dict=True)
    h2 = out2.hidden_states[-2]
    last = out2.last_hidden_state   # after the final layer norm
    eos_at = (flat2 == model.tokenizer_2.eos_token_id).int().argmax(dim=1)   # first EOS (0 if none)
    pooled = last[torch.arange(last.shape[0], device=last.device), eos_at.to(last.device)]
    proj = te2.text_projection
    pooled = proj(pooled.to(proj.weight.dtype)).to(last.dtype)
    hidden = torch.cat([_join_pieces(h1, b, n, width), _join_pieces(h2, b, n, width).to(h1)], dim=-1)
    return TextConditioning(hidden=hidden, pooled=pooled.reshape(b, n, -1)[:, 0])   # first piece's pooled


def encode_text(model, captions: list[str] | str, *, clip_skip: int | None = None,
                max_token_length: int | None = None, device=None) -> TextConditioning:
    """The text conditioning of captions for any family (see the module docstring)."""
    return encode_text_tokens(model, tokenize_all(model, captions, max_token_length), clip_skip=clip_skip,
                              device=device)


def encode_prompts(model, captions: list[str] | str, clip_skip: int | None = None,
                   max_token_length: int | None = None, device=None) -> torch.Tensor:
    """encoder_hidden_states [B, 77 | max_token_length + 2, C] for captions (= encode_text(...).hidden)."""
    return encode_text(model, captions, clip_skip=clip_skip, max_token_length=max_token_length,
                       device=device).hidden
