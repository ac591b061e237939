"""Checkpoint -> diffusers / transformers modules, offline (SD1 for now)."""
from .bundle import ModelInfo, SDModel
from .ckpt import file_hashes, read_checkpoint, save_checkpoint
from .convert import diffusers_to_ldm, ldm_to_diffusers, split_ldm
from .loader import ensure_hashes, load_sd_model
from .text import encode_prompts, encode_tokens, tokenize
from .tiny import tiny_sd1_state_dict, write_tiny_checkpoint
from .tokenizer import clip_tokenizer

__all__ = [
    "ModelInfo", "SDModel", "load_sd_model", "ensure_hashes", "encode_prompts", "encode_tokens", "tokenize",
    "clip_tokenizer", "tiny_sd1_state_dict", "write_tiny_checkpoint", "ldm_to_diffusers", "diffusers_to_ldm",
    "split_ldm", "save_checkpoint", "read_checkpoint", "file_hashes",
]
