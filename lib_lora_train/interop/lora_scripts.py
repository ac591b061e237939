"""lora-scripts (秋葉 Akegarasu) train.ps1 / train.sh: their variables, and what the script does with them.

The variables are read line by line (only plain assignments are understood: anything else before the
"DO NOT MODIFY" line is reported with its line number). The script's fixed options and the options a variable
feeds directly are read from its `accelerate launch` command, so a script of another version maps by what it
really passes; the conditional part (which flags a variable switches on) follows the script's own if-blocks.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Any

from ..errors import ConfigError
from .translate import Translator, _falsy

MARKER = "DO NOT MODIFY"
_PS_ASSIGN = re.compile(r"^\$(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<value>.*)$")
_SH_ASSIGN = re.compile(r"^(?:export\s+)?(?P<name>[A-Za-z_]\w*)=(?P<value>.*)$")
PATH_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "network_weights",
             "resume", "dataset_config", "sample_prompts")


class ScriptSyntaxError(ConfigError):
    pass


def _strip_comment(value: str) -> str:
    out, quote = [], None
    for ch in value:
        if quote:
            out.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        elif ch == "#":
            break
        else:
            out.append(ch)
    return "".join(out).strip()


def _value(raw: str, variables: dict[str, Any], ps: bool, lineno: int, line: str) -> Any:
    text = _strip_comment(raw)
    if ps and text.lower() in ("$true", "$false"):
        return text.lower() == "$true"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        inner = text[1:-1]
        if text[0] == '"':
            inner = re.sub(r"\$\{?(\w+)\}?", lambda m: str(variables.get(m.group(1), m.group(0))), inner)
        return inner
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        x = float(text)
        return int(x) if x.is_integer() and "." not in text and "e" not in text.lower() else x
    if ps and re.fullmatch(r"\$\w+", text):
        if text[1:] in variables:
            return variables[text[1:]]
    if not ps and re.fullmatch(r"[\w./:\\-]*", text):
        return text
    raise ScriptSyntaxError(f"line {lineno}: {'PowerShell' if ps else 'shell'} syntax this importer does not "
                            f"handle: {line.strip()!r} (only plain `{'$' if ps else ''}name = value` assignments "
                            f"of strings and numbers are read)")


def parse_variables(text: str, ps: bool) -> tuple[dict[str, Any], list[str]]:
    """(variables in order, lines of the script after the marker)."""
    variables: dict[str, Any] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if MARKER in s:
            return variables, lines[i:]
        if not s or s.startswith("#"):
            continue
        m = (_PS_ASSIGN if ps else _SH_ASSIGN).match(s)
        if not m:
            raise ScriptSyntaxError(f"line {i}: {'PowerShell' if ps else 'shell'} syntax this importer does not "
                                    f"handle: {s!r} (expected `{'$' if ps else ''}name = value` before the "
                                    f"'{MARKER}' line)")
        variables[m.group("name")] = _value(m.group("value"), variables, ps, i, line)
    raise ScriptSyntaxError(f"no '{MARKER}' line: not a lora-scripts train script this importer knows")


def _launch_tokens(body: list[str], ps: bool) -> list[str]:
    """The tokens of the `accelerate launch` command (continuation lines joined)."""
    joined, cont = [], "`" if ps else "\\"
    collecting = False
    for line in body:
        s = line.strip()
        if not collecting and ("accelerate" in s and "launch" in s):
            collecting = True
        if collecting:
            more = s.endswith(cont)
            joined.append(s[:-1] if more else s)
            if not more:
                break
    try:
        return shlex.split(" ".join(joined), posix=True)
    except ValueError:
        return " ".join(joined).split()


def _var_ref(token: str) -> str | None:
    m = re.fullmatch(r"\$\{?(\w+)\}?", token.strip("\"'"))
    return m.group(1) if m else None


def read(text: str, t: Translator, *, ps: bool, source_dir: str) -> None:
    variables, body = parse_variables(text, ps)
    body_text = "\n".join(body)
    v = variables
    used: set[str] = set()

    # ---- the model family (the script picks the trainer from model_type)
    mt = str(v.get("model_type", "sd1.5")).lower()
    fam = {"sd1.5": "sd1", "sd2.0": "sd2", "sdxl": "sdxl"}.get(mt)
    t.report.family = fam or mt
    if "model_type" in v:
        used.add("model_type")
        if fam is None:
            t.unsupported("model_type", v["model_type"], f"{mt} models are not supported (sd1.5, sd2.0 and sdxl "
                                                         f"are)", blocking=True)
        else:
            t.set("model_type", v["model_type"], {}, f"the model family: {fam}"
                  + (" (sdxl_train_network.py)" if fam == "sdxl" else ""), changed=False)
    sh_bug = not ps and "ext_args+=" in body_text and "extArgs[@]" in body_text
    if "clip_skip" in v:
        used.add("clip_skip")
        if fam == "sd1":
            if sh_bug and not _falsy(v["clip_skip"]) and int(float(v["clip_skip"])) != 1:
                t.arg("clip_skip", "clip_skip", v["clip_skip"],
                      "train.sh adds --clip_skip to `ext_args` but passes `extArgs`, so sd-scripts never got it "
                      "and trained with clip skip 1; carried as you set it")
            else:
                t.arg("clip_skip", "clip_skip", v["clip_skip"])
        else:
            t.ignore("clip_skip", v["clip_skip"], f"the script passes clip_skip for sd1.5 only (model_type {mt})")
    if fam == "sd2":
        why = "model_type sd2.0 passes --v2"
        if sh_bug:
            why = ("train.sh adds --v2 to `ext_args` but passes `extArgs`, so sd-scripts never got it; set as "
                   "model_type sd2.0 means")
        t.set("(model_type sd2.0)", None, {"v2": True}, why, changed=sh_bug)

    # ---- options the launch command passes (fixed, or straight from a variable)
    tokens = _launch_tokens(body, ps)
    if not tokens:
        t.report.notes.append("no accelerate launch command found after the marker; only the variables were read")
    script_seen = False
    for tok in tokens:
        name = os.path.basename(tok.strip("\"'"))
        bare = _var_ref(tok)
        if name.endswith(".py") or (bare is not None and ("file" in bare or "script" in bare)):
            script_seen = True
            continue
        if not tok.startswith("--"):
            continue
        key, eq, value = tok[2:].partition("=")
        if not script_seen:
            if key == "num_cpu_threads_per_process":
                t.ignore("(launch) --" + key, value, "accelerate's CPU threads; no effect on the result")
            continue
        ref = _var_ref(value) if eq else None
        if ref is not None:
            used.add(ref)
            if ref not in v:
                t.report.notes.append(f"--{key} takes ${ref}, which the script does not set")
                continue
            val = v[ref]
            field = ref
        else:
            val, field = (value if eq else True), f"(fixed in the script) --{key}"
        if key in ("log_prefix",):
            t.ignore(field if ref is None else f"{field} (--{key})", val, "logging only")
            continue
        if key in PATH_KEYS and isinstance(val, str) and val and not os.path.isabs(val):
            new = os.path.normpath(os.path.join(source_dir, val))
            t.set(field, val, {key: new}, "a path relative to the lora-scripts folder (assumed to be the "
                                           "script's folder)")
            continue
        t.arg(field, key, val)

    # ---- the if-blocks
    def flag(name: str, key: str) -> None:
        if name in v:
            used.add(name)
            on = not _falsy(v[name])
            t.set(name, v[name], {key: True} if on else {}, "" if on else "0: not passed", changed=False)

    flag("train_unet_only", "network_train_unet_only")
    flag("train_text_encoder_only", "network_train_text_encoder_only")
    flag("save_state", "save_state")
    flag("parameterization", "v_parameterization")
    for name, key in (("network_weights", "network_weights"), ("reg_data_dir", "reg_data_dir"),
                      ("resume", "resume")):
        if name in v:
            used.add(name)
            val = v[name]
            if isinstance(val, str) and val and not os.path.isabs(val):
                t.set(name, val, {key: os.path.normpath(os.path.join(source_dir, val))},
                      "a path relative to the lora-scripts folder (assumed to be the script's folder)")
            else:
                t.arg(name, key, val)
    if "optimizer_type" in v:
        used.add("optimizer_type")
        t.arg("optimizer_type", "optimizer_type", v["optimizer_type"] or "AdamW")
        if str(v["optimizer_type"]) == "DAdaptation":
            t.set("(optimizer DAdaptation)", None, {"optimizer_args": ["decouple=True"]},
                  "the script adds decouple=True for DAdaptation", changed=False)
    lyco = str(v.get("network_module", "")) == "lycoris.kohya"
    for name in ("algo", "conv_dim", "conv_alpha", "dropout"):
        if name in v:
            used.add(name)
            if not lyco:
                t.ignore(name, v[name], "the script passes it only when network_module is lycoris.kohya")
    if lyco:
        args = [f"conv_dim={v.get('conv_dim', 4)}", f"conv_alpha={v.get('conv_alpha', 4)}",
                f"algo={v.get('algo', 'lora')}"]
        if not _falsy(v.get("dropout", "0")):
            args.append(f"dropout={v.get('dropout')}")
        t.set("network_module", v.get("network_module"), {"network_args": args},
              "with lycoris.kohya the script passes algo, conv_dim, conv_alpha and dropout as network_args",
              changed=False)
        for name in ("algo", "conv_dim", "conv_alpha", "dropout"):
            if name in v:
                why = "0 is the default: left out" if name == "dropout" and _falsy(v[name]) else ""
                t.report.add(name, "carried", v[name], {"network_args": f"{name}={v[name]}"} if not why else None,
                             why)
    for name in ("noise_offset", "min_snr_gamma"):
        if name in v:
            used.add(name)
            t.arg(name, name, v[name])
    if "stop_text_encoder_training" in v:
        used.add("stop_text_encoder_training")
        n = v["stop_text_encoder_training"]
        if _falsy(n):
            t.ignore("stop_text_encoder_training", n, "0: not passed")
        else:
            t.unsupported("stop_text_encoder_training", n,
                          "lora-scripts passes --stop_text_encoder_training, which sd-scripts' train_network.py "
                          "does not have (only train_db.py does): that run stopped at once with 'unrecognized "
                          "arguments'. Stopping the text encoder after N steps is not available here; the text "
                          "encoder trains for the whole run (set train_unet_only = 1 to leave it untrained)")
    for name in ("multi_gpu",):
        if name in v:
            used.add(name)
            if _falsy(v[name]):
                t.ignore(name, v[name], "one GPU")
            else:
                t.set(name, v[name], {}, "--multi_gpu --num_processes=2 split each epoch's batches over two GPUs "
                                         "in sd-scripts (half the steps); here one device trains every batch")
    for name, why in (("lowram", "where models are loaded; no effect on the result"
                       + ("; note train.sh passes --lowram even at 0 (`[[ $lowram ]]` is true for \"0\")"
                          if not ps else "")),
                      ("persistent_data_loader_workers", "data loader processes; no effect on the result"),
                      ("use_wandb", "logging only"), ("wandb_api_key", "logging only (the key is not copied)"),
                      ("log_tracker_name", "logging only")):
        if name in v:
            used.add(name)
            t.ignore(name, v[name], why)
    for name, value in v.items():
        if name in used:
            continue
        if re.search(r"\$\{?" + re.escape(name) + r"\b", body_text):
            t.unsupported(name, value, "the script uses this variable in a way this importer does not know")
        else:
            t.ignore(name, value, "the script does not use it")
