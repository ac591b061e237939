"""What the tab's Tools section does, as plain functions (no gradio): choosing inputs inside the host's folders,
naming outputs safely, running the engine's tools (lib_lora_train.tools) with progress and a stop button, and
turning results and errors into messages a user reads.

Rules every action follows: inputs come from the host's folders (host.paths.allowed_roots(), plus the host's
default checkpoint); outputs are new files named by the user (a plain name, no folders) in host.paths.loras
(LoRAs) or the first models folder (checkpoints); an existing file is replaced only with overwrite=True and an
input never (the tools refuse it too).
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError
from ..hosts.base import inside, safe_child
from .tools_runner import ActionResult, guarded, size_text

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors",)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
PRECISION_KEEP = "same as input"
SAVE_PRECISIONS = ("fp16", "bf16", "float")


# ---------------------------------------------------------------------------------------------- inputs

def _files(root: str, suffixes: tuple[str, ...], skip: Sequence[str] = ()) -> list[str]:
    out: list[str] = []
    if not root or not os.path.isdir(root):
        return out
    skip_real = [os.path.realpath(s) for s in skip if s]
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in skip_real)
        if real in skip_real:
            continue
        for n in sorted(names):
            if n.lower().endswith(suffixes) and not n.startswith("."):
                out.append(os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/"))
    return out


def list_loras(host) -> list[str]:
    """LoRA files under host.paths.loras (recursive), as paths relative to it."""
    return _files(host.paths.loras, LORA_SUFFIXES)


def default_checkpoint(host) -> str | None:
    try:
        path = (host.base_config() or {}).get("pretrained_model_name_or_path")
    except Exception:  # noqa: BLE001 - a host without a model still lists its folders
        return None
    return os.path.abspath(path) if path and os.path.isfile(path) else None


def checkpoint_roots(host) -> list[str]:
    """The models folders that hold checkpoints (not the LoRA folder, which a host may list among them)."""
    loras = os.path.realpath(host.paths.loras)
    return [r for r in host.paths.models if r and os.path.realpath(r) != loras]


def checkpoint_choices(host) -> dict[str, str]:
    """Label -> path of every checkpoint in the models folders, the host's default checkpoint first."""
    roots = checkpoint_roots(host)
    choices: dict[str, str] = {}
    default = default_checkpoint(host)
    if default:
        choices[f"{os.path.basename(default)} (default)"] = default
    many = len(roots) > 1
    for root in roots:
        for rel in _files(root, CHECKPOINT_SUFFIXES, skip=[host.paths.loras]):
            path = os.path.abspath(os.path.join(root, rel))
            if default and os.path.realpath(path) == os.path.realpath(default):
                continue
            label = f"{os.path.basename(os.path.normpath(root))}/{rel}" if many else rel
            choices.setdefault(label, path)
    return choices


def _typed_path(host, value: str, suffixes: tuple[str, ...], what: str, extra_allowed: Sequence[str] = ()) -> str:
    path = os.path.abspath(os.path.expanduser(value))
    allowed = [os.path.realpath(p) for p in extra_allowed if p]
    if not (inside(path, host.paths.allowed_roots()) or os.path.realpath(path) in allowed):
        raise ConfigError(f"{what} {value}: outside the folders this page may read "
                          f"({', '.join(host.paths.allowed_roots())})")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {value}: no such file")
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{what} {value}: expected a {' / '.join(suffixes)} file")
    return path


def resolve_lora(host, value: str | None, what: str = "LoRA") -> str:
    """A LoRA chosen from the list (a path relative to the LoRA folder) or typed as a path inside the host's
    folders -> its absolute path."""
    value = (value or "").strip()
    if not value:
        raise ConfigError(f"choose a {what} file")
    if not os.path.isabs(value):
        rel = os.path.normpath(value)
        if rel.startswith("..") or os.path.isabs(rel):
            raise ConfigError(f"{what} {value}: not a file in the LoRA folder")
        value = os.path.join(host.paths.loras, rel)
    return _typed_path(host, value, LORA_SUFFIXES, what)


def resolve_checkpoint(host, value: str | None, what: str = "checkpoint") -> str:
    value = (value or "").strip()
    if not value:
        raise ConfigError(f"choose a {what}")
    choices = checkpoint_choices(host)
    if value in choices:
        return choices[value]
    if not os.path.isabs(value):
        for root in checkpoint_roots(host):
            cand = os.path.join(root, os.path.normpath(value))
            if os.path.isfile(cand) and inside(cand, [root]):
                return os.path.abspath(cand)
        raise ConfigError(f"{what} {value}: not in the list; give a full path inside the models folders")
    return _typed_path(host, value, CHECKPOINT_SUFFIXES, what, extra_allowed=[default_checkpoint(host) or ""])


# ---------------------------------------------------------------------------------------------- outputs

def output_file(folder: str, name: str | None, *, overwrite: bool = False, what: str = "output name") -> str:
    """folder/<name>.safetensors for a plain name; refuses folders in the name and an existing file unless
    overwrite."""
    name = (name or "").strip()
    if not name:
        raise ConfigError(f"{what}: give a name for the new file")
    if any(sep in name for sep in ("/", "\\")):
        raise ConfigError(f"{what} '{name}': a file name only, without folders (files go to {folder})")
    if name.lower().endswith(".ckpt"):
        raise ConfigError(f"{what} '{name}': the tools write .safetensors files only")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    path = safe_child(folder, name, what=what)
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path} exists already; tick 'Overwrite an existing file' to replace it")
    return path


def lora_output(host, name: str | None, overwrite: bool) -> str:
    os.makedirs(host.paths.loras, exist_ok=True)
    return output_file(host.paths.loras, name, overwrite=overwrite)


def checkpoint_output(host, name: str | None, overwrite: bool) -> str:
    roots = checkpoint_roots(host)
    if not roots:
        raise ConfigError("this host has no models folder to write a checkpoint to")
    os.makedirs(roots[0], exist_ok=True)
    return output_file(roots[0], name, overwrite=overwrite)


def _save_precision(value: str | None) -> str | None:
    if value in (None, "", PRECISION_KEEP):
        return None
    if value not in SAVE_PRECISIONS:
        raise ConfigError(f"save precision {value!r}: use {', '.join(SAVE_PRECISIONS)}")
    return value


def _written(host, paths: list[str]) -> None:
    try:
        host.outputs_written(paths)
    except Exception:  # noqa: BLE001 - the file is written; a list refresh failing must not hide that
        log.exception("host.outputs_written failed")




def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------- inspect

MODULE_HEADERS = ["Module", "Part", "Block", "Type", "Rank", "Alpha", "Update norm", "Flags"]
METADATA_HEADERS = ["Key", "Value"]
_LONG = 300


@dataclass
class InspectView:
    """What the Inspect tab shows of one file."""
    path: str
    summary: str                      # several lines of plain text
    modules: list[list[Any]]          # MODULE_HEADERS rows
    metadata: list[list[str]]         # METADATA_HEADERS rows (long values shortened)
    title: str
    trigger_words: str
    description: str
    hash_status: str
    warnings: list[str] = field(default_factory=list)


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def inspect_file(host, lora: str) -> InspectView:
    """Inspect a LoRA (see lib_lora_train.tools.inspect) and lay it out for the tab."""
    from ..tools.inspect import inspect_lora

    path = resolve_lora(host, lora)
    ins = inspect_lora(path)
    norms = [r.norm for r in ins.modules if r.norm is not None]
    h = ins.hash
    lines = [f"File: {path} ({size_text(path)})",
             f"Base model: {ins.base_model_version or 'unknown'} · key convention: {ins.convention}",
             f"Network: {ins.network_module or 'unknown'} · dim {ins.network_dim or '-'} · alpha "
             f"{ins.network_alpha or '-'}" + (f" · args {ins.network_args}" if ins.network_args else ""),
             f"Modules: {len(ins.modules)} ({_counts(ins.parts)}) · types {_counts(ins.types)}",
             f"Ranks: {_counts(ins.ranks)} · alphas {_counts(ins.alphas)}"]
    if norms:
        lines.append(f"Update norms: min {min(norms):.4g} · median {statistics.median(norms):.4g} · "
                     f"max {max(norms):.4g}")
    if h.get("status") == "ok":
        lines.append(f"Hash: ok (sshs_model_hash {str(h.get('addnet_hash'))[:12]})")
    else:
        lines.append(f"Hash: {h.get('status')} (stored {h.get('stored_model_hash') or '-'}, "
                     f"file {h.get('addnet_hash') or '-'})")
    flagged = [f"{r.name} ({', '.join(r.flags)})" for r in ins.modules if r.flags]
    if flagged:
        lines.append("Flagged modules: " + ", ".join(flagged[:8]) + (f" and {len(flagged) - 8} more"
                                                                    if len(flagged) > 8 else ""))
    if ins.top_tags:
        lines.append("Top tags: " + ", ".join(f"{t} ({n})" for t, n in ins.top_tags))
    lines += [f"Warning: {w}" for w in ins.warnings]
    rows = [[r.name, r.part, r.block, r.type, r.rank, r.alpha, None if r.norm is None else float(f"{r.norm:.4g}"),
             ", ".join(r.flags)] for r in ins.modules]
    meta = []
    for k in sorted(ins.metadata):
        v = ins.metadata[k]
        meta.append([k, v if len(v) <= _LONG else v[:_LONG] + f"… ({len(v)} characters)"])
    return InspectView(path, "\n".join(lines), rows, meta, ins.title or "", ins.trigger_phrase or "",
                       ins.description or "", str(h.get("status")), list(ins.warnings))


@guarded
def save_metadata(host, lora: str, title: str | None, trigger_words: str | None, description: str | None,
                  output_name: str | None, *, in_place: bool = False, overwrite: bool = False) -> ActionResult:
    """Write the LoRA with new title / trigger words / description (empty: removed) and fresh hashes: to a new
    file `output_name` beside it (in the LoRA folder), or over the input itself only with in_place=True."""
    from ..tools.inspect import edit_metadata

    path = resolve_lora(host, lora)
    fields = dict(title=title or "", trigger_words=trigger_words or "", description=description or "")
    if in_place:
        meta = edit_metadata(path, in_place=True, **fields)
        target = path
    else:
        folder = os.path.dirname(path) if inside(path, [host.paths.loras]) else host.paths.loras
        target = output_file(folder, output_name, overwrite=overwrite)
        if os.path.realpath(target) == os.path.realpath(path):
            raise ConfigError("the new name is the input file; tick 'Edit the input file itself' to change it")
        meta = edit_metadata(path, save_to=target, overwrite=overwrite, **fields)
    _written(host, [target])
    return ActionResult(True, f"Saved {target} ({size_text(target)}), sshs_model_hash "
                        f"{meta['sshs_model_hash'][:12]}", target, {"metadata": meta})


# ---------------------------------------------------------------------------------------------- merges

@dataclass
class LoraRow:
    """One LoRA of a merge as the tab gives it: a name from the list (or a path), a ratio, block weights."""
    lora: str | None
    ratio: float | None = 1.0
    blocks: str | None = None


def rows_from_values(values: Sequence[Any]) -> list[LoraRow]:
    """(lora, ratio, blocks) triples as flat UI values -> LoraRow, empty rows left out."""
    if len(values) % 3:
        raise ValueError("expected (lora, ratio, blocks) triples")
    rows = [LoraRow(values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3)]
    return [r for r in rows if r.lora and str(r.lora).strip()]


def lora_inputs(host, rows: Sequence[LoraRow], dylora_rank: int | None = None):
    """LoraInput per row; dylora_rank (>0) is applied to the inputs marked as DyLoRA in their metadata."""
    from ..models.ckpt import read_safetensors_metadata
    from ..tools.blocks import parse_block_weights
    from ..tools.merge import LoraInput

    if not rows:
        raise ConfigError("choose at least one LoRA")
    rank = _int(dylora_rank, "DyLoRA rank", optional=True)
    out = []
    for i, r in enumerate(rows, 1):
        path = resolve_lora(host, r.lora, what=f"LoRA {i}")
        ratio = 1.0 if r.ratio is None or r.ratio == "" else float(r.ratio)
        blocks = (r.blocks or "").strip() or None
        parse_block_weights(blocks, what=f"block weights of LoRA {i}",      # a clear error before any work;
                            family="auto")                         # the merge checks the LoRA's family
        dy = rank if rank and read_safetensors_metadata(path).get("ss_network_module") == "networks.dylora" \
            else None
        out.append(LoraInput(path, ratio, blocks, dy))
    return out


def _skipped_text(skipped: dict[str, int]) -> str:
    skipped = {k: v for k, v in skipped.items() if v}
    return "" if not skipped else " Skipped (not in this model): " + ", ".join(f"{k}: {v} modules"
                                                                             for k, v in skipped.items()) + "."


def merge_into_checkpoint(host, base: str, rows: Sequence[LoraRow], output_name: str, *,
                          save_precision: str | None = PRECISION_KEEP, dylora_rank: int | None = None,
                          overwrite: bool = False, sink=None, stop: threading.Event | None = None) -> ActionResult:
    """LoRAs into the base checkpoint -> a new checkpoint in the first models folder."""
    from ..tools.merge import merge_into_checkpoint as merge

    base_path = resolve_checkpoint(host, base, "base checkpoint")
    specs = lora_inputs(host, rows, dylora_rank)
    out = checkpoint_output(host, output_name, overwrite)
    res = merge(base_path, specs, out, save_precision=_save_precision(save_precision), overwrite=overwrite,
                sink=sink, stop=stop)
    written = getattr(host, "checkpoints_written", None)
    if callable(written):
        try:
            written([res.path])
        except Exception:  # noqa: BLE001
            log.exception("host.checkpoints_written failed")
    merged = ", ".join(f"{k}: {v} modules" for k, v in res.report.merged.items())
    msg = (f"Saved {res.path} ({size_text(res.path)}) in {res.seconds:.1f} s: {len(res.report.changed_keys)} "
           f"tensors changed ({merged}).{_skipped_text({k: len(v) for k, v in res.report.skipped.items()})} "
           f"sha256 {(res.sha256 or '-')[:10]}")
    return ActionResult(True, msg, res.path, res.to_json())


def live_available(host) -> bool:
    """Whether the host can merge into its loaded model (it has the attribute; a model may load later)."""
    return hasattr(host, "live_model")


class LiveState:
    """The section's live merges: one LiveMerger over host.live_model, created on first use."""

    def __init__(self, host) -> None:
        self.host = host
        self._merger = None

    @property
    def merger(self):
        from ..hosts.live_merge import LiveMerger
        if self._merger is None:
            self._merger = LiveMerger(lambda: getattr(self.host, "live_model", None))
        return self._merger

    def text(self) -> str:
        if self._merger is None or not self._merger.applied:
            return "The loaded model has no merged LoRAs from this page."
        return "Merged into the loaded model now: " + "; ".join(h.summary() for h in self._merger.applied)


def _training_running(jobs) -> bool:
    try:
        cur = jobs.current() if jobs is not None else None
    except Exception:  # noqa: BLE001
        return False
    return cur is not None and getattr(cur, "status", None) == "running"


def live_apply(host, jobs, live: LiveState, rows: Sequence[LoraRow], *, dylora_rank: int | None = None,
               sink=None, stop: threading.Event | None = None) -> ActionResult:
    """Merge the LoRAs into the host's loaded model (no file); restorable with live_restore."""
    if not live_available(host):
        raise ConfigError("this host has no loaded model to merge into")
    if _training_running(jobs):
        raise ConfigError("a training run is using the model; load LoRAs into it after the run ends")
    specs = lora_inputs(host, rows, dylora_rank)
    handle = live.merger.apply(specs, sink=sink, stop=stop)
    label = getattr(live.merger.live(), "label", None)
    where = f" ({label()})" if callable(label) else ""
    return ActionResult(True, f"Merged into the loaded model{where} in {handle.seconds:.1f} s: {handle.summary()}. "
                              f"No file was written; press Restore to undo.{_skipped_text(handle.skipped)}",
                        None, {"keys": len(handle.keys), "id": handle.id})


@guarded
def live_restore(host, live: LiveState, *, force: bool = False) -> ActionResult:
    """Undo every live merge of this page: the loaded model's weights as they were, bit for bit."""
    if live._merger is None or not live._merger.applied:
        return ActionResult(True, "Nothing to restore: no LoRA from this page is merged into the loaded model.")
    done = live.merger.restore_all(force=force)
    return ActionResult(True, f"Restored the loaded model's weights ({sum(len(h.keys) for h in done)} tensors, "
                              f"{len(done)} merge{'s' if len(done) != 1 else ''} undone).")


# ---------------------------------------------------------------------------------------------- LoRA tools

def _lora_message(res, extra: str = "") -> str:
    s = res.summary
    ranks = {m.get("rank", m.get("new_rank")) for m in res.modules if m.get("rank", m.get("new_rank")) is not None}
    rank = "-" if not ranks else (str(min(ranks)) if len(ranks) == 1 else f"{min(ranks)}–{max(ranks)}")
    msg = (f"Saved {res.path} ({size_text(res.path)}) in {res.seconds:.1f} s: {s.get('modules', len(res.modules))} "
           f"modules, rank {rank}, sshs_model_hash {res.hashes['sshs_model_hash'][:12]}.")
    return msg + extra


def _energy(res) -> str:
    fro = [m["fro_retained"] for m in res.modules if m.get("fro_retained") is not None]
    if not fro:
        return ""
    return (f" Energy kept (Frobenius): mean {_pct(sum(fro) / len(fro))}, lowest {_pct(min(fro))}"
            f" ({min(res.modules, key=lambda m: m.get('fro_retained', 2.0))['name']}).")


def merge_loras(host, rows: Sequence[LoraRow], output_name: str, *, method: str = "svd", new_rank: int | None = 8,
                new_conv_rank: int | None = None, save_precision: str | None = "float",
                dylora_rank: int | None = None, overwrite: bool = False, sink=None,
                stop: threading.Event | None = None) -> ActionResult:
    """LoRAs into one LoRA: SVD of the summed updates to new_rank ("svd"), or the rank concatenation
    ("concat")."""
    from ..tools.merge_lora import merge_loras_to_file

    if method not in ("svd", "concat"):
        raise ConfigError(f"merge method {method!r}: use svd or concat")
    specs = lora_inputs(host, rows, dylora_rank)
    out = lora_output(host, output_name, overwrite)
    concat = method == "concat"
    res = merge_loras_to_file(specs, out, new_rank=None if concat else _int(new_rank, "new rank"),
                              new_conv_rank=None if concat else _int(new_conv_rank, "new conv rank", optional=True),
                              concat=concat, save_precision=_save_precision(save_precision), overwrite=overwrite,
                              sink=sink, stop=stop)
    _written(host, [res.path])
    return ActionResult(True, _lora_message(res, "" if concat else _energy(res)), res.path, res.to_json(False))


def _int(value: Any, what: str, optional: bool = False) -> int | None:
    if value is None or value == "" or (optional and float(value) <= 0):
        if optional:
            return None
        raise ConfigError(f"{what}: give a number")
    v = float(value)
    if v != int(v) or v < 1:
        raise ConfigError(f"{what}: {value} is not a whole number >= 1")
    return int(v)


def extract(host, tuned: str, base: str, output_name: str, *, dim: int = 4, conv_dim: int | None = None,
            clamp_quantile: float | None = 0.99, min_diff: float = 0.01, save_precision: str | None = "float",
            overwrite: bool = False, sink=None, stop: threading.Event | None = None) -> ActionResult:
    """A LoRA (LoCon with conv_dim) of the difference tuned - base, by SVD."""
    from ..tools.extract import extract_lora_to_file

    tuned_path = resolve_checkpoint(host, tuned, "tuned checkpoint")
    base_path = resolve_checkpoint(host, base, "base checkpoint")
    if os.path.realpath(tuned_path) == os.path.realpath(base_path):
        raise ConfigError("the tuned and the base checkpoint are the same file")
    out = lora_output(host, output_name, overwrite)
    clamp = None if clamp_quantile in (None, "") or float(clamp_quantile) >= 1.0 else float(clamp_quantile)
    res = extract_lora_to_file(base_path, tuned_path, out, dim=_int(dim, "rank"),
                               conv_dim=_int(conv_dim, "conv rank", optional=True), clamp_quantile=clamp,
                               min_diff=float(min_diff or 0.0), save_precision=_save_precision(save_precision),
                               overwrite=overwrite, sink=sink, stop=stop)
    _written(host, [res.path])
    te = res.summary.get("text_encoder")
    extra = _energy(res) + (" Text encoder: same in both, not extracted." if te == "same" else "")
    return ActionResult(True, _lora_message(res, extra), res.path, res.to_json(False))


RESIZE_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")


def resize(host, lora: str, output_name: str, *, method: str = "fixed", new_rank: int = 4,
           new_conv_rank: int | None = None, dynamic_param: float | None = None,
           save_precision: str | None = "float", overwrite: bool = False, sink=None,
           stop: threading.Event | None = None) -> ActionResult:
    """A LoRA at a lower rank: fixed, or per module by sv_ratio / sv_fro / sv_cumulative (new_rank caps it)."""
    from ..tools.resize import resize_lora_to_file

    if method not in RESIZE_METHODS:
        raise ConfigError(f"resize method {method!r}: use one of {', '.join(RESIZE_METHODS)}")
    path = resolve_lora(host, lora)
    out = lora_output(host, output_name, overwrite)
    dynamic = None if method == "fixed" else method
    if dynamic and (dynamic_param is None or dynamic_param == ""):
        raise ConfigError(f"{method} needs its parameter")
    res = resize_lora_to_file(path, out, new_rank=_int(new_rank, "new rank"),
                              new_conv_rank=_int(new_conv_rank, "new conv rank", optional=True),
                              dynamic_method=dynamic, dynamic_param=float(dynamic_param) if dynamic else None,
                              save_precision=_save_precision(save_precision), overwrite=overwrite, sink=sink,
                              stop=stop)
    _written(host, [res.path])
    return ActionResult(True, _lora_message(res, _energy(res)), res.path, res.to_json(False))
