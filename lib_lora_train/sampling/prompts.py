"""Sample prompts in sd-scripts' formats: one prompt per line with `--x value` flags, or .json / .toml files."""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None       # None: the caller's default size (512 in sd-scripts)
    height: int | None = None
    steps: int = DEFAULT_STEPS
    seed: int | None = None        # None: a fresh random seed at sampling time
    scale: float = DEFAULT_SCALE   # classifier-free guidance (CFG) scale
    sampler: str | None = None     # None: the run's sample_sampler
    index: int = 0                 # position in the prompt file (sd-scripts "enum"), used in file names

    def size(self, default: int = DEFAULT_SIZE) -> tuple[int, int]:
        """(width, height) as sampled: multiples of 8, at least 64 (sd-scripts rounds down)."""
        return _round_size(self.width or default), _round_size(self.height or default)


def _round_size(v: int) -> int:
    return max(64, int(v) - int(v) % 8)


def _clamp_steps(v: int) -> int:
    return max(1, min(1000, int(v)))


# Each flag is matched at the start of one " --"-separated part; value patterns as in sd-scripts, so a
# malformed value (e.g. "--w big") leaves the flag unset rather than failing the whole run.
_FLAGS: list[tuple[str, re.Pattern[str]]] = [
    ("width", re.compile(r"w (\d+)", re.IGNORECASE)),
    ("height", re.compile(r"h (\d+)", re.IGNORECASE)),
    ("seed", re.compile(r"d (\d+)", re.IGNORECASE)),
    ("steps", re.compile(r"s (\d+)", re.IGNORECASE)),
    ("scale", re.compile(r"l ([\d.]+)", re.IGNORECASE)),
    ("negative_prompt", re.compile(r"n (.+)", re.IGNORECASE)),
    ("sampler", re.compile(r"ss (.+)", re.IGNORECASE)),
]


def parse_prompt_line(line: str, index: int = 0) -> PromptSpec:
    """Parse `prompt --n neg --w 512 --h 512 --s 30 --d 42 --l 7.5 --ss euler_a`.

    The prompt is the text before the first " --" (a line that starts with "--" has an empty prompt).
    Unknown flags are ignored, as in sd-scripts.
    """
    text = line.strip()
    parts = (" " + text if text.startswith("--") else text).split(" --")
    values: dict[str, Any] = {}
    for part in parts[1:]:
        for key, pattern in _FLAGS:
            m = pattern.match(part)
            if m is None:
                continue
            raw = m.group(1)
            try:
                values[key] = float(raw) if key == "scale" else raw.strip() if key in (
                    "negative_prompt", "sampler") else int(raw)
            except ValueError:
                pass     # e.g. "--l 1.2.3": ignored like sd-scripts does
            break
    return _spec_from_values(parts[0].strip(), values, index)


def _spec_from_values(prompt: str, v: Mapping[str, Any], index: int) -> PromptSpec:
    return PromptSpec(
        prompt=prompt,
        negative_prompt=v.get("negative_prompt") or None,
        width=_round_size(v["width"]) if v.get("width") is not None else None,
        height=_round_size(v["height"]) if v.get("height") is not None else None,
        steps=_clamp_steps(v["steps"]) if v.get("steps") is not None else DEFAULT_STEPS,
        seed=int(v["seed"]) if v.get("seed") is not None else None,
        scale=float(v["scale"]) if v.get("scale") is not None else DEFAULT_SCALE,
        sampler=v.get("sampler") or None,
        index=index,
    )


# sd-scripts' dict keys (json / toml prompt files) -> PromptSpec fields
_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "sample_steps": "steps", "seed": "seed", "scale": "scale", "sample_sampler": "sampler"}


def prompt_from_dict(d: Mapping[str, Any], index: int = 0, source: str = "prompt") -> PromptSpec:
    """A prompt given as a dict with sd-scripts' keys (prompt, negative_prompt, width, height,
    sample_steps, seed, scale, sample_sampler); other keys are ignored as sd-scripts does."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: each prompt must be a string or a table/object, got {type(d).__name__}")
    if not isinstance(d.get("prompt", ""), str):
        raise ConfigError(f"{source}: 'prompt' must be a string")
    values: dict[str, Any] = {}
    for key, field in _DICT_KEYS.items():
        if key in d and key != "prompt":
            values[field] = d[key]
    try:
        return _spec_from_values(str(d.get("prompt", "")).strip(), values, index)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value in prompt {index}: {e}") from None


def parse_prompts(items: list[Any], source: str = "prompts") -> list[PromptSpec]:
    """Strings (prompt lines) and dicts, numbered in order."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(parse_prompt_line(item, index=len(out)))
        else:
            out.append(prompt_from_dict(item, index=len(out), source=source))
    return out


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Read a sample-prompt file: .txt (a prompt per line, '#' comments, blank lines skipped),
    .json (a list of prompt strings or dicts) or .toml (`[prompt]` defaults + `[[prompt.subset]]`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sample_prompts: file not found: {p}")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sample_prompts: {p} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise ConfigError(f"sample_prompts: {p} must hold a JSON list of prompts")
        return parse_prompts(data, source=str(p))
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sample_prompts: {p} is not valid TOML: {e}") from None
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise ConfigError(f"sample_prompts: {p} needs a [prompt] table with [[prompt.subset]] entries")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return parse_prompts([{**defaults, **sub} for sub in table["subset"]], source=str(p))
    # .txt and anything else: one prompt per line
    lines = [ln.strip() for ln in text.splitlines()]
    return parse_prompts([ln for ln in lines if ln and not ln.startswith("#")], source=str(p))


def with_defaults(spec: PromptSpec, *, seed: int | None = None, sampler: str | None = None) -> PromptSpec:
    """Fill a spec's unset seed / sampler from the run's settings."""
    return replace(spec, seed=spec.seed if spec.seed is not None else seed,
                   sampler=spec.sampler or sampler)
