"""models/tokenizer.py and models/text.py: CLIP tokenizer ids, clip_skip, max_token_length, gradients."""
from __future__ import annotations

import pytest
import torch

from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.models import (clip_tokenizer, encode_prompts, encode_tokens, load_sd_model, tiny_sd1_state_dict,
                                   tokenize)
from lib_lora_train.models import tokenizer as tokenizer_module

BOS, EOS = 49406, 49407




@pytest.fixture(scope="module")
def model():
    return load_sd_model(tiny_sd1_state_dict(seed=2))


def test_known_ids():
    tok = clip_tokenizer()
    assert tok is clip_tokenizer()   # built once per process
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    # ids of the slow tokenizer that sd-scripts and the WebUI use (transformers 4.x): punctuation split apart,
    # accents stripped; a tokenizers-backed CLIPTokenizer differs here unless adjusted
    assert tok("it's (tag), café 1.5!!").input_ids == [BOS, 585, 262, 338, 263, 3640, 264, 267, 4979, 272, 269, 276,
                                                        256, 256, EOS]
    assert len(tok) == 49408 and tok.pad_token_id == EOS and tok.model_max_length == 77


def test_vocabulary_is_built_from_the_merges():
    merges = tokenizer_module._merges(tokenizer_module.find_bpe_file())
    vocab = tokenizer_module.build_vocab(merges)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0].split())] == 512
    assert clip_tokenizer().get_vocab() == vocab


def test_missing_vocabulary_names_the_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_PROVIDERS", {"no_such_module_xyz": "nothing"})
    with pytest.raises(ModelError, match="open-clip-torch"):
        tokenizer_module.find_bpe_file()


def test_tokenize_pads_with_eos_and_chunks_like_sd_scripts(model):
    ids = tokenize(model, ["a cat", "a dog"])
    assert ids.shape == (2, 1, 77)
    assert ids[0, 0, :4].tolist() == [BOS, 320, 2368, EOS] and (ids[0, 0, 3:] == EOS).all()
    long_caption = " ".join(f"word{i}" for i in range(120))
    ids = tokenize(model, [long_caption], max_token_length=225)
    assert ids.shape == (1, 3, 77)
    assert (ids[:, :, 0] == BOS).all() and (ids[:, :, -1] == EOS).all()
    flat = model.tokenizer(long_caption, padding="max_length", truncation=True, max_length=227).input_ids
    assert ids[0, :, 1:76].reshape(-1).tolist() == flat[1:226]   # the bodies, in order, lose nothing
    with pytest.raises(ConfigError, match="max_token_length"):
        tokenize(model, ["x"], max_token_length=100)


def test_clip_skip_takes_an_earlier_layer_and_the_final_norm(model):
    te = model.text_encoder
    captions = ["a photo of a cat", "a red car"]
    plain = encode_prompts(model, captions)
    skip2 = encode_prompts(model, captions, clip_skip=2)
    assert plain.shape == skip2.shape == (2, 77, 32)
    assert not torch.allclose(plain, skip2, atol=1e-4)
    ids = model.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    final_norm = (te.text_model if hasattr(te, "text_model") else te).final_layer_norm
    assert len(out.hidden_states) == te.config.num_hidden_layers + 1
    assert torch.allclose(skip2, final_norm(out.hidden_states[-2]), atol=1e-6)
    assert torch.allclose(plain, out.last_hidden_state, atol=1e-6)
    assert torch.allclose(encode_prompts(model, captions, clip_skip=1), plain, atol=1e-6)
    with pytest.raises(ConfigError, match="clip_skip"):
        encode_prompts(model, captions, clip_skip=3)   # the tiny encoder has 2 layers


def test_max_token_length_joins_pieces_like_sd_scripts(model):
    short = encode_prompts(model, ["a photo of a cat"])
    joined = encode_prompts(model, ["a photo of a cat"], max_token_length=225)
    assert joined.shape == (1, 227, 32)
    # the first piece of a short caption is the plain 77-token encoding
    assert torch.allclose(joined[:, :76], short[:, :76], atol=1e-6)
    ids = tokenize(model, ["a photo of a cat"], max_token_length=150)
    pieces = encode_tokens(model, ids.reshape(2, 1, 77))   # each piece alone
    two = encode_prompts(model, ["a photo of a cat"], max_token_length=150)
    assert two.shape == (1, 152, 32)
    assert torch.allclose(two[0, 76:151], pieces[1, 1:76], atol=1e-6)
    assert torch.allclose(two[0, 151], pieces[1, 76], atol=1e-6)


def test_gradients_flow_through_the_text_encoder(model):
    weight = next(p for n, p in model.text_encoder.named_parameters() if "fc1.weight" in n)
    weight.requires_grad_(True)
    try:
        encode_prompts(model, ["a photo of a cat"], clip_skip=2).square().mean().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None
