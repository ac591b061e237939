"""The CLIP tokenizers (SD1 / SDXL te1 pad with EOS; SD2 / SDXL te2 with "!"), built offline from the BPE
merges file that open_clip / openai-clip ship.

The vocabulary is derived from the merges exactly as CLIP defines it, written as vocab.json + merges.txt into a
cache folder, and loaded with `CLIPTokenizer.from_pretrained(folder)` (on transformers 5.x, passing
vocab_file= / merges_file= silently builds a 2-token vocabulary).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2      # 48,894: byte tokens, the same with </w>, merges, 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Packages that ship the file, import name -> what to pip install.
_PROVIDERS = {"open_clip": "open-clip-torch", "clip": "openai-clip"}

OPEN_CLIP_PAD = "!"    # id 0

_lock = threading.Lock()
_cached: dict[str, object] = {}


def find_bpe_file() -> Path:
    """The BPE file of an installed package, found without importing the package (open_clip pulls in
    torchvision at import)."""
    for module in _PROVIDERS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        folders = list(spec.submodule_search_locations or [])
        if spec.origin and not folders:
            folders.append(str(Path(spec.origin).parent))
        for folder in folders:
            candidate = Path(folder) / BPE_FILE
            if candidate.is_file():
                return candidate
    raise ModelError(
        f"the CLIP tokenizer vocabulary ({BPE_FILE}) was not found in any installed package; install "
        f"'open-clip-torch' (e.g. pip install --no-deps open-clip-torch, to keep your torch) or 'openai-clip'")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE uses, in CLIP's vocabulary order: bytes that
    are printable Latin-1 characters stand for themselves (in byte order), the rest get code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _merges(bpe_path: Path) -> list[str]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:1 + N_MERGES]   # line 0 is a version header; CLIP uses the first N_MERGES merges
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ModelError(f"{bpe_path} is not CLIP's BPE merges file (expected {N_MERGES} merge pairs)")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ModelError(f"the CLIP vocabulary came out with {len(vocab)} entries instead of {VOCAB_SIZE}")
    return vocab


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lib_lora_train"


def tokenizer_folder(bpe_path: Path | None = None) -> Path:
    """A folder with vocab.json, merges.txt and tokenizer_config.json; written once per vocabulary file."""
    bpe_path = bpe_path or find_bpe_file()
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()[:16]
    for root in (_cache_root(), Path(tempfile.gettempdir()) / f"lib_lora_train-{_user_tag()}"):
        folder = root / f"clip-tokenizer-{digest}"
        if (folder / "tokenizer_config.json").is_file():
            return folder
        try:
            _write_folder(bpe_path, folder)
            return folder
        except OSError:
            continue   # read-only home: fall back to the temp dir
    raise ModelError("cannot write the CLIP tokenizer files to a cache folder or the temp dir")


def _user_tag() -> str:
    try:
        return str(os.getuid())
    except AttributeError:   # Windows
        return os.environ.get("USERNAME", "user")


def _write_folder(bpe_path: Path, folder: Path) -> None:
    merges = _merges(bpe_path)
    vocab = build_vocab(merges)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".clip-tokenizer-"))
    try:
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config = {"model_max_length": MODEL_MAX_LENGTH, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                  "pad_token": EOS, "do_lower_case": True, "errors": "replace",
                  "tokenizer_class": "CLIPTokenizer"}
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        try:
            os.replace(staging, folder)   # whole folder at once, so a reader never sees half of it
        except OSError:
            if not (folder / "tokenizer_config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def clip_tokenizer():
    """The SD1 / SDXL-first-encoder CLIPTokenizer (pad = <|endoftext|>, 77 tokens); built once per process."""
    return _tokenizer(EOS)


def open_clip_tokenizer():
    """The tokenizer of the OpenCLIP text encoders (SD 2.x, SDXL's second): the same vocabulary, padded with
    "!" (id 0) as open_clip pads with 0 and sd-scripts sets pad_token_id = 0; built once per process."""
    return _tokenizer(OPEN_CLIP_PAD)


def _tokenizer(pad: str):
    with _lock:
        if pad not in _cached:
            from transformers import CLIPTokenizer

            folder = tokenizer_folder()
            tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MODEL_MAX_LENGTH,
                                                pad_token=pad)
            _match_slow_tokenizer(tok)
            if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids(EOS) != VOCAB_SIZE - 1:
                raise ModelError(f"the CLIP tokenizer built from {folder} has {len(tok)} tokens instead of "
                                 f"{VOCAB_SIZE}; this transformers version reads the files differently")
            if tok.pad_token != pad or tok.pad_token_id != tok.convert_tokens_to_ids(pad):
                raise ModelError(f"the CLIP tokenizer did not take the pad token {pad!r}")
            _cached[pad] = tok
        return _cached[pad]


def _match_slow_tokenizer(tok) -> None:
    """Give a tokenizers-backed CLIPTokenizer (transformers 5.x has no other) the text splitting of the slow
    one that sd-scripts and the WebUI use (transformers 4.x without spacy: BERT basic tokenization, i.e.
    lower case, accents stripped, every punctuation mark its own word, then CLIP's word pattern). Without this,
    "it's", "café" or "(tag)," come out as different ids than in the WebUI."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not getattr(tok, "is_fast", False):
        return   # the slow tokenizer already works this way
    from tokenizers import Regex, normalizers, pre_tokenizers

    clip_words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=True, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.Split(Regex(clip_words), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
