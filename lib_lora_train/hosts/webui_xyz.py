"""Our X/Y/Z plot axes on the WebUI's live `xyz_grid` module, and the Compare grid made by that script.

Never imports the WebUI: the glue (scripts/lora_train.py) hands in `modules.scripts`, and the xyz_grid module is
found through `scripts.scripts_data` (the WebUI loads script files under generated module names, so it cannot
be imported by name, and a "Reload UI" loads a fresh copy of it).

- `register_axes(xyz_module, loras_dir)` adds "LoRA epoch" and "LoRA weight". Both put one `<lora:FILE_STEM:W>`
  into the cell's prompt; each remembers on the cell's `p` copy what it wrote, so the two combine in any order
  (X is applied before Y before Z). Epochs are named by file stem: every epoch file of a run carries the same
  ss_output_name, so the built-in Lora extension forbids that alias and only the stem resolves.
- `build_xyz_args(script, x=, y=, z=)` builds the X/Y/Z script's positional arguments from the live script: the
  names of its `run()` parameters, the defaults of its `ui()` controls, axis indices looked up in its
  `current_axis_options`. Nothing is hard-coded, so extra axes or a changed signature do not shift anything.
- `run_compare_grid(modules, request)` draws epochs x weights through `scripts_txt2img` (the WebUI's sampler,
  prompt syntax and Lora loading), which saves grid and cells with their infotext as the WebUI's settings say.
"""
from __future__ import annotations

import csv
import inspect
import io
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import ConfigError, Interrupted, ModelError
from .webui_xyz_cells import FAILED_ATTR, STATE_ATTR, guard_cells   # STATE_ATTR: what our axes wrote on a cell's p
from .webui_base import lora_networks_module
from .webui_xyz_lookup import ADDNET_MODEL, ADDNET_WEIGHT, EPOCH_AXIS, PROMPT_SR, WEIGHT_AXIS, XYZ_FILES, XYZ_TITLE

LORA_EXTS = (".safetensors", ".pt", ".ckpt")
_TOKEN = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")


# ---------------------------------------------------------------------------------------------- finding things
def find_xyz_module(scripts_module: Any) -> Any:
    """The live xyz_grid module from `modules.scripts.scripts_data`, or None (a fork without it)."""
    for entry in getattr(scripts_module, "scripts_data", None) or []:
        if os.path.basename(str(getattr(entry, "path", ""))) in XYZ_FILES and hasattr(entry.module, "axis_options"):
            return entry.module
    return None


def find_xyz_script(runner: Any) -> Any:
    """The X/Y/Z plot Script instance of a ScriptRunner (scripts_txt2img), or None."""
    for script in getattr(runner, "selectable_scripts", None) or []:
        title = ""
        try:
            title = str(script.title()).lower()
        except Exception:  # noqa: BLE001 - a broken script: not ours to judge
            pass
        if title == XYZ_TITLE or os.path.basename(str(getattr(script, "filename", ""))) in XYZ_FILES:
            return script
    return None


# ---------------------------------------------------------------------------------------------- our LoRA files
@dataclass
class LoraFile:
    stem: str
    path: str
    epoch: Optional[int]
    run: str              # the run's output_name ("" for files no run record lists)
    created: float


def lora_files(root: str) -> list[LoraFile]:
    """The LoRA files of our output folders (<root>/<project>/, the folders holding run records), grouped per
    run (newest run first, its epochs in order), then files there that no record lists (newest first). Other
    folders of the Lora folder (the user's own LoRAs) are left out."""
    from ..compare.runs import open_run
    from ..record import RECORD_SUFFIX

    runs: list[tuple[float, list[LoraFile]]] = []
    seen: set[str] = set()
    strays: list[LoraFile] = []
    folders = sorted(e.path for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")) \
        if os.path.isdir(root) else []
    for folder in folders:
        names = sorted(os.listdir(folder))
        records = [n for n in names if n.endswith(RECORD_SUFFIX)]
        for name in records:
            try:
                run = open_run(os.path.join(folder, name))
            except Exception:  # noqa: BLE001 - a record being written or damaged: its files count as strays
                continue
            created = float(run.record.get("created") or 0)
            files = [LoraFile(f.name, f.path, f.epoch, run.output_name, created) for f in run.files]
            seen.update(os.path.realpath(f.path) for f in files)
            runs.append((created, files))
        for name in names if records else []:
            path = os.path.join(folder, name)
            if name.endswith(LORA_EXTS) and os.path.realpath(path) not in seen and os.path.isfile(path):
                strays.append(LoraFile(os.path.splitext(name)[0], path, None, "", os.path.getmtime(path)))
    out = [f for _, files in sorted(runs, key=lambda t: -t[0]) for f in files]
    return out + sorted(strays, key=lambda f: -f.created)


class _FileIndex:
    """lora_files() of a folder, re-read at most every `ttl` seconds (axis labels ask once per value)."""

    def __init__(self, loras_dir: Callable[[], str], ttl: float = 2.0):
        self.loras_dir, self.ttl = loras_dir, ttl
        self._at, self._files = -1e9, []

    def files(self) -> list[LoraFile]:
        if time.monotonic() - self._at > self.ttl:
            try:
                self._files = lora_files(self.loras_dir())
            except OSError:
                self._files = []
            self._at = time.monotonic()
        return self._files

    def stems(self) -> list[str]:
        out: list[str] = []
        for f in self.files():
            if f.stem not in out:
                out.append(f.stem)
        return out

    def epoch_of(self, stem: str) -> Optional[int]:
        return next((f.epoch for f in self.files() if f.stem == stem), None)


# ---------------------------------------------------------------------------------------------- the prompt token
def weight_text(w: float) -> str:
    return f"{float(w):.6g}"


def _token_weight(token: str) -> Optional[float]:
    parts = token[1:-1].split(":")
    try:
        return float(parts[2]) if len(parts) > 2 else None
    except ValueError:
        return None


def set_lora_token(p: Any, *, name: Optional[str] = None, weight: Optional[float] = None,
                   names: Sequence[str] = ()) -> None:
    """Put `<lora:NAME:W>` into p.prompt for one axis value. `names`: stems whose token already in the prompt this
    axis may take over (the axis values, our files). What was written is kept on p (a fresh dict: p is the
    cell's shallow copy), so the other axis, applied later, rewrites the same token."""
    st = dict(getattr(p, STATE_ATTR, None) or {})
    if name is not None:
        st["name"] = str(name)
    if weight is not None:
        st["weight"] = float(weight)
    token = st.get("token")
    if token is None or token not in p.prompt:
        token = None
        wanted = set(names) | ({st["name"]} if st.get("name") else set())
        found = next((m for m in _TOKEN.finditer(p.prompt) if m.group(1).strip() in wanted), None)
        if found is not None:
            token = found.group(0)
            st.setdefault("name", found.group(1).strip())
            if "weight" not in st and _token_weight(token) is not None:
                st["weight"] = _token_weight(token)
    if not st.get("name"):
        setattr(p, STATE_ATTR, st)      # weight first, file later (the other axis) or never (no LoRA named)
        return
    new = f"<lora:{st['name']}:{weight_text(st.get('weight', 1.0))}>"
    p.prompt = p.prompt.replace(token, new, 1) if token else (f"{p.prompt.rstrip()} {new}".strip())
    st["token"] = new
    setattr(p, STATE_ATTR, st)


# ---------------------------------------------------------------------------------------------- registering
def _axis(module: Any, label: str, typ: Any, apply: Callable, **kw: Any) -> Any:
    """An AxisOption of the live module, passing only the keywords its constructor knows (older releases lack
    `choices` / `prepare`)."""
    cls = module.AxisOption
    try:
        known = set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        known = set(kw)
    return cls(label, typ, apply, **{k: v for k, v in kw.items() if k in known})


def register_axes(xyz_module: Any, loras_dir: Callable[[], str], *, networks: Callable[[], Any] = lora_networks_module
                  ) -> list[Any]:
    """Add (or, when already there, replace in place) our two axes on the live xyz_grid module. Idempotent:
    calling it again (import + on_before_ui, a Reload UI running the script again) never adds them twice, and
    the built-in axes keep their indices (ours go at the end). Returns the two AxisOption objects."""
    index = _FileIndex(loras_dir)

    def apply_epoch(p, x, xs):
        set_lora_token(p, name=str(x).strip(), names=[str(v).strip() for v in xs] + index.stems())

    def apply_weight(p, x, xs):
        set_lora_token(p, weight=float(x), names=index.stems())

    def confirm_epoch(p, xs):
        nets = networks()
        if nets is None:
            return                      # no Lora extension to ask; the prompt token says the rest
        missing = [x for x in xs if str(x).strip() not in nets.available_networks]
        if missing and hasattr(nets, "list_available_networks"):
            nets.list_available_networks()
            missing = [x for x in xs if str(x).strip() not in nets.available_networks]
        if missing:
            raise RuntimeError(f"{EPOCH_AXIS}: the Lora extension does not know {', '.join(map(str, missing))} "
                               f"(file stems of LoRA files inside its Lora folder)")

    def confirm_weight(p, xs):
        bad = [x for x in xs if not math.isfinite(float(x))]
        if bad:
            raise RuntimeError(f"{WEIGHT_AXIS}: not a number: {bad}")

    def format_epoch(p, opt, x):
        epoch = index.epoch_of(str(x))
        return f"{x} (epoch {epoch})" if epoch is not None else str(x)

    axes = [
        _axis(xyz_module, EPOCH_AXIS, str, apply_epoch, format_value=format_epoch, confirm=confirm_epoch,
              cost=0.3, choices=index.stems),
        _axis(xyz_module, WEIGHT_AXIS, float, apply_weight, confirm=confirm_weight),
    ]
    guard_cells(xyz_module, networks)   # cells with our axes that fail show as "failed", not black
    options = xyz_module.axis_options
    for axis in axes:
        at = next((i for i, o in enumerate(options) if getattr(o, "label", None) == axis.label), None)
        if at is None:
            options.append(axis)
        else:
            options[at] = axis
    return axes


def ensure_axes(scripts_module: Any, loras_dir: Callable[[], str]) -> bool:
    """register_axes on the xyz module found in scripts_data; False when there is none (yet)."""
    module = find_xyz_module(scripts_module)
    if module is None:
        return False
    register_axes(module, loras_dir)
    return True


# ---------------------------------------------------------------------------------------------- the argument list
@dataclass
class Axis:
    label: str                  # an AxisOption label of the live script ("LoRA epoch", "Prompt S/R", ...)
    values: Sequence[Any]


# Settings of the X/Y/Z script a programmatic grid wants; names are run()'s parameter names, set only when the
# live script has them.
GRID_OPTIONS = {"draw_legend": True, "include_lone_images": False, "include_sub_grids": False,
                "no_fixed_seeds": False, "vary_seeds_x": False, "vary_seeds_y": False, "vary_seeds_z": False,
                "margin_size": 0, "csv_mode": False}


def xyz_arg_names(script: Any) -> list[str]:
    """The names of the script's run() arguments after `p`, in order (x_type, x_values, ...)."""
    params = list(inspect.signature(script.run).parameters.values())
    if params and params[0].name == "self":       # an unbound function (a class attribute)
        params = params[1:]
    params = params[1:]                             # p
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise ModelError("the X/Y/Z plot script's run() takes *args; its argument names cannot be read")
    return [p.name for p in params]


def csv_text(values: Sequence[Any]) -> str:
    """Values as the X/Y/Z text field takes them (CSV: a value with a comma is quoted)."""
    buf = io.StringIO()
    csv.writer(buf).writerow([str(v) for v in values])
    return buf.getvalue().strip()


def build_xyz_args(script: Any, x: Axis, y: Optional[Axis] = None, z: Optional[Axis] = None,
                   **options: Any) -> list:
    """The X/Y/Z script's positional arguments (what `script.run(p, *args)` and the API's `script_args` take),
    built from the live script: run()'s parameter names place each value, the ui() controls give the defaults,
    the axis types are indices into `script.current_axis_options` (the list its ui() filtered for the tab)."""
    axes = getattr(script, "current_axis_options", None)
    if not axes:
        raise ModelError("the X/Y/Z plot script has no axis list yet (its ui() makes it when the WebUI builds its "
                         "page); open the WebUI page once, or wait until it has started")
    labels = [getattr(o, "label", None) for o in axes]
    names = xyz_arg_names(script)
    controls = getattr(script, "controls", None)
    if controls is not None and len(controls) != len(names):
        raise ModelError(f"the X/Y/Z plot script's ui() has {len(controls)} controls but its run() takes "
                         f"{len(names)} arguments; this WebUI version is not supported")
    args = [getattr(c, "value", None) for c in controls] if controls is not None else [None] * len(names)
    pos = {n: i for i, n in enumerate(names)}
    for letter, axis in zip("xyz", (x, y, z)):
        label = axis.label if axis is not None else "Nothing"
        if f"{letter}_type" not in pos or f"{letter}_values" not in pos:
            raise ModelError(f"the X/Y/Z plot script's run() has no {letter}_type / {letter}_values argument")
        if label not in labels:
            raise ConfigError(f"the X/Y/Z plot script has no axis {label!r} (its axes: "
                              f"{', '.join(str(lb) for lb in labels)})")
        values = [str(v) for v in axis.values] if axis is not None else []
        args[pos[f"{letter}_type"]] = labels.index(label)
        args[pos[f"{letter}_values"]] = csv_text(values)
        if f"{letter}_values_dropdown" in pos:
            args[pos[f"{letter}_values_dropdown"]] = values
    for key, value in {**GRID_OPTIONS, **options}.items():
        if key in pos:
            args[pos[key]] = value
    return args


def full_script_args(runner: Any, script: Any, script_args: Sequence[Any]) -> list:
    """The whole `p.script_args` of a ScriptRunner: every script's ui() defaults at its args_from..args_to (as
    the API's default vector), `script` selected (position 0 = its index + 1) with `script_args` in its range."""
    span = script.args_to - script.args_from
    if len(script_args) != span:
        raise ModelError(f"{len(script_args)} arguments for a script that takes {span}")
    last = max([int(getattr(s, "args_to", 0) or 0) for s in runner.scripts] + [script.args_to, 1])
    args: list = [None] * last
    for s in runner.scripts:
        controls = getattr(s, "controls", None)
        start, stop = getattr(s, "args_from", None), getattr(s, "args_to", None)
        if controls and start is not None and stop is not None and stop - start == len(controls):
            args[start:stop] = [getattr(c, "value", None) for c in controls]
    args[script.args_from:script.args_to] = list(script_args)
    args[0] = list(runner.selectable_scripts).index(script) + 1
    return args


# ---------------------------------------------------------------------------------------------- the grid
def _labels(opt: Any, values: Sequence[Any], p: Any) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(str(opt.format_value(p, opt, v)))
        except Exception:  # noqa: BLE001 - a label is never worth failing the grid for
            out.append(str(v))
    return out


def run_compare_grid(webui_modules: Any, request: Any, *, stop: Optional[threading.Event] = None,
                     progress: Optional[Callable[[int, int], None]] = None, method: str = "auto",
                     wait_s: float = 120.0) -> Any:
    """The Compare grid of `request` (a compare_api.CompareRequest) made by the WebUI's X/Y/Z plot script:
    rows = epoch files, columns = weights. Holds the queue lock while it runs, gives shared.state back as it
    found it, stops cleanly at Interrupt (or `stop`): the cells not drawn stay blank and `interrupted` is set."""
    from ..compare.ranking import ranking_from_record
    from ..compare.runs import open_run, trigger_word
    from ..compare_api import CompareResult, check_request, choose_files, parse_weights

    from .webui_xyz_runtime import (XYZModules, _addnet_names, _Busy, _processing, _StateGuard, check_visible,
                                    pick_method)

    check_request(request)
    m = XYZModules.of(webui_modules)
    run = open_run(request.record_path)
    files = choose_files(run, request.epochs)
    weights = parse_weights(request.weights)
    prompt = (request.prompt or "").strip() or (trigger_word(run.record) or "")
    if not prompt:
        raise ConfigError("no prompt given and the run has no trigger word; write a prompt")
    rw, rh = run.resolution
    width, height = int(request.width or rw), int(request.height or rh)
    runner = getattr(m.scripts, "scripts_txt2img", None)
    script = find_xyz_script(runner) if runner is not None else None
    if script is None:
        raise ModelError("the WebUI's X/Y/Z plot script is not loaded (txt2img's Script menu lacks it)")
    labels = [getattr(o, "label", None) for o in getattr(script, "current_axis_options", None) or []]
    method = pick_method(labels, method)
    stems = [f.name for f in files]
    wtext = [weight_text(w) for w in weights]
    if method == "lora_train":
        check_visible(m, files)
        x, y = Axis(WEIGHT_AXIS, wtext), Axis(EPOCH_AXIS, stems)
    elif method == "addnet":
        x, y = Axis(ADDNET_WEIGHT, wtext), Axis(ADDNET_MODEL, _addnet_names(m, files))
    else:   # Prompt S/R on the token's parts: ":0.4>" and "lora:STEM:" occur nowhere else in a prompt
        check_visible(m, files)
        prompt = f"{prompt} <lora:{stems[0]}:{wtext[0]}>"
        x, y = Axis(PROMPT_SR, [f":{w}>" for w in wtext]), Axis(PROMPT_SR, [f"lora:{s}:" for s in stems])
    xyz_args = build_xyz_args(script, x, y)
    p = _processing(m, request, prompt, width, height)
    p.is_api = True     # before script_args: the built-in seed/sampler scripts must not reset p from UI defaults
    p.scripts = runner
    p.script_args = tuple(full_script_args(runner, script, xyz_args))
    guard_cells(find_xyz_module(m.scripts), m.lora_networks)
    failed: list = []
    setattr(p, FAILED_ATTR, failed)       # the cells' copies of p share this list
    guard = _StateGuard(m.shared.state, stop, progress)
    try:
        with _Busy(m, wait_s), guard:
            processed = runner.run(p, *p.script_args)
            if processed is None:
                processed = m.processing.process_images(p)
    finally:
        close = getattr(p, "close", None)
        if callable(close):
            close()
        total = getattr(getattr(m.shared, "total_tqdm", None), "clear", None)
        if callable(total):
            total()
    images = list(getattr(processed, "images", None) or [])
    if not images and guard.interrupted:
        raise Interrupted("the grid was interrupted before its first cell")
    if not images:
        raise ModelError("the X/Y/Z plot script made no image (see the WebUI's console for why)")
    axes = script.current_axis_options
    x_opt, y_opt = axes[labels.index(x.label)], axes[labels.index(y.label)]
    infotexts = list(getattr(processed, "infotexts", None) or [""])
    saved = p.outpath_grids if getattr(m.shared.opts, "grid_save", False) else None
    ranking = ranking_from_record(run.record, files={f.epoch: f.path for f in run.files})
    return CompareResult(
        image=images[0], row_labels=_labels(y_opt, list(y.values), p),
        col_labels=_labels(x_opt, [float(w) for w in weights] if x_opt.type is float else list(x.values), p),
        epochs=[f.epoch for f in files], files=[f.path for f in files], weights=weights, prompt=prompt,
        seed=int(getattr(processed, "seed", request.seed)), infotext=str(infotexts[0] or ""), ranking=ranking,
        method=method, interrupted=guard.interrupted, saved=saved, extra={"xyz_args": xyz_args},
        failed=_placed(failed, files))


def _placed(failed: list, files: Sequence[Any]) -> list:
    """Failed cells with their epoch and file (known by the LoRA file stem in the cell's prompt)."""
    by_stem = {f.name: f for f in files}
    for cell in failed:
        ef = by_stem.get(cell.file or "")
        cell.epoch, cell.file = (ef.epoch, ef.path) if ef is not None else (None, cell.file)
    return failed
