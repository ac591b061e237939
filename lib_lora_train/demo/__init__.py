"""The demo: a synthetic shape world, a tiny base model pre-trained on it, and a toy concept to learn."""
from pathlib import Path

from .toy import TOKEN, demo_prompts, make_toy_dataset

BASE_MODEL = Path(__file__).with_name("tiny_base.safetensors")

__all__ = ["BASE_MODEL", "TOKEN", "demo_prompts", "make_toy_dataset"]
