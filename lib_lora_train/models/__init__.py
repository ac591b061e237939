"""Checkpoint -> diffusers / transformers modules, offline (SD 1.x, SD 2.x, SDXL base architecture)."""
from .bundle import ModelInfo, SDModel
from .ckpt import file_hashes, read_checkpoint, save_checkpoint
from .convert import diffusers_to_ldm, ldm_to_diffusers, split_ldm
from .detect import SUPPORTED, detect_checkpoint, detect_family
from .loader import ensure_hashes, load_sd_model
from .text import TextConditioning, encode_prompts, encode_text, encode_tokens, tokenize, tokenize_all
from .tiny import (tiny_sd1_state_dict, tiny_sd2_state_dict, tiny_sdxl_state_dict, tiny_state_dict,
                   write_tiny_checkpoint)
from .tokenizer import clip_tokenizer, open_clip_tokenizer

__all__ = [
    "ModelInfo", "SDModel", "load_sd_model", "ensure_hashes", "encode_prompts", "encode_text", "encode_tokens",
    "tokenize", "tokenize_all", "TextConditioning", "clip_tokenizer", "open_clip_tokenizer", "tiny_sd1_state_dict",
    "tiny_sd2_state_dict", "tiny_sdxl_state_dict", "tiny_state_dict", "write_tiny_checkpoint", "ldm_to_diffusers",
    "diffusers_to_ldm", "split_ldm", "save_checkpoint", "read_checkpoint", "file_hashes", "detect_checkpoint",
    "detect_family", "SUPPORTED",
]
