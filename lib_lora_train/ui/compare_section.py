"""The Compare section of the Train LoRA tab: pick the best epoch of a run.

`build_compare_section(host, jobs)` creates the components in the current Gradio context. Choose a run, its
epoch files (default all) and weights (default 0.4, 0.6, 0.8, 1.0), a prompt (the trigger word filled in),
negative prompt, seed, steps, size, sampler -> one grid with labelled rows (epochs) and columns (weights), the
validation-loss table ranked with the suggested epoch marked, and what the curve says in plain words; with
"Measure drift" also a Drift column (how far the control prompts, i.e. prompts without the trigger, moved from the
base model: compare/drift.py) and the epoch suggested by loss and drift, with its reasoning. The grid
comes from `host.compare_grid` when the host has one (the WebUI: its X/Y/Z plot script), else from the engine
(compare_api.run_compare). "Send to txt2img" writes `<lora:NAME:W> trigger`: inside the WebUI into txt2img's
prompt (javascript/lora_train_compare.js), elsewhere into a box to copy from. Every elem_id starts with
`lora_train_compare_`. The handlers are plain methods of CompareSection (tests call them without a browser).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Optional

from .. import background
from ..compare_api import (DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_WEIGHTS, CompareRequest, CompareResult,
                           compare_runs, run_compare)
from ..errors import LoraTrainError

P = "lora_train_compare_"
TABLE_HEADERS = ["Epoch", "Validation loss", "Training loss", "Drift", "Place", "File", "Suggested"]
WEIGHTS_TEXT = ", ".join(f"{w:g}" for w in DEFAULT_WEIGHTS)
ENGINE_SAMPLERS = ("DPM++ 2M Karras", "Euler a", "Euler", "DDIM", "Heun", "PLMS", "DDPM")
JS_SEND = "(text) => { if (typeof loraTrainCompareToTxt2img === 'function') { loraTrainCompareToTxt2img(text); } " \
          "return []; }"


def epoch_label(epoch: int, stem: str) -> str:
    return f"epoch {epoch}: {stem}"


def epoch_of_label(label: str) -> int:
    head = str(label).split(":", 1)[0].strip()
    if not head.startswith("epoch "):
        raise ValueError(f"not an epoch choice: {label!r}")
    return int(head[len("epoch "):])


def send_text(stem: str, weight: Any, trigger: str = "") -> str:
    """What "Send to txt2img" writes: the LoRA card's form, `<lora:NAME:W>` then the trigger word."""
    w = float(weight)
    token = f"<lora:{stem}:{w:g}>"
    return f"{token} {trigger}".strip() if trigger else token


def table_rows(ranking: Any, drift: Any = None) -> list[list[Any]]:
    """One row per epoch, best validation loss first; with a drift report its drift column is filled and its
    suggestion (loss and drift together) is the one marked."""
    def num(v: Optional[float]) -> Any:
        return "" if v is None else round(float(v), 5)
    measured = drift is not None and getattr(drift, "available", False) and drift.rows
    by = drift.by_epoch() if measured else {}
    rows = sorted(ranking.rows, key=lambda r: (r.rank is None, r.rank or 0, r.epoch))

    def marked(r: Any) -> bool:
        return r.epoch == drift.suggested_epoch if measured else r.suggested

    def drift_cell(r: Any) -> Any:
        d = by.get(r.epoch)
        if d is None or d.drift is None:
            return "" if r.epoch else (0.0 if measured else "")
        return f"{d.drift:.4f}" + ("" if d.within is None else (" ✓" if d.within else " ✗"))
    return [[r.epoch, num(r.validation_loss), num(r.train_loss), drift_cell(r), "" if r.rank is None else r.rank,
             os.path.basename(r.file) if r.file else ("(base model)" if r.epoch == 0 else ""),
             "★ suggested" if marked(r) else ""] for r in rows]


def explanation_text(ranking: Any, drift: Any = None) -> str:
    """What the curves say, then (when drift was asked for) the suggestion by loss and drift, or why it is
    missing."""
    text = ranking.explanation
    if drift is not None and drift.explanation:
        text = f"{drift.explanation}\n\n{text}" if drift.available else f"{text}\n\n{drift.explanation}"
    return text


def control_lines(text: Any) -> list[str]:
    """Control prompts from the box: one per line, blank lines skipped."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def sampler_choices(host: Any) -> list[str]:
    own = getattr(host, "sampler_names", None)
    if callable(own):
        try:
            names = [str(n) for n in own()]
            if names:
                return ([DEFAULT_SAMPLER] if DEFAULT_SAMPLER not in names else []) + names
        except Exception:  # noqa: BLE001 - fall back to the engine's list
            pass
    from ..sampling.pipeline import sampler_key
    out = []
    for name in ENGINE_SAMPLERS:
        try:
            sampler_key(name)
            out.append(name)
        except LoraTrainError:
            continue
    return out


class CompareSection:
    def __init__(self, host: Any, jobs: Any):
        self.host, self.jobs = host, jobs
        self._lock = threading.Lock()
        self._stop: Optional[threading.Event] = None
        self.runs: dict[str, str] = {}               # dropdown label -> run record

    # ------------------------------------------------------------------ handlers (plain: tests call them)
    def run_labels(self) -> list[str]:
        choices = compare_runs(self.host, self.jobs)
        self.runs = {c.label: c.record_path for c in choices}
        return [c.label for c in choices]

    def refresh(self, current: Optional[str], seen: Any) -> tuple[list[str], Optional[str], list[str]]:
        """Re-list the runs. A run that appeared since this page last listed them (`seen`: record paths) is
        chosen, newest first: after training, Compare shows the new run, not the one the page opened with. Otherwise
        the chosen run stays chosen even though its label changes with its status."""
        before = self.runs.get(current) if current else None
        names = self.run_labels()
        known = set(seen or ())
        new = [n for n in names if self.runs[n] not in known]
        same = [n for n in names if before is not None and self.runs[n] == before]
        value = new[0] if new and seen is not None else (same[0] if same else (names[0] if names else None))
        return names, value, [self.runs[n] for n in names]

    def record_for(self, label: Optional[str]) -> str:
        if not label:
            raise LoraTrainError("choose a run first")
        if label not in self.runs:
            self.run_labels()
        if label not in self.runs:
            raise LoraTrainError(f"run not found: {label} (press Refresh runs)")
        return self.runs[label]

    def run_view(self, label: Optional[str]) -> dict[str, Any]:
        """What choosing a run fills in: its epoch files (all ticked), trigger word, size, the loss table."""
        from ..compare.ranking import ranking_from_record
        from ..compare.runs import open_run, trigger_word

        if not label:
            return {"epochs": ([], []), "prompt": "", "send_file": ([], None), "table": [], "explanation": "",
                    "size": (None, None), "trigger": ""}
        run = open_run(self.record_for(label))
        ranking = ranking_from_record(run.record, files={f.epoch: f.path for f in run.files})
        choices = [epoch_label(f.epoch, f.name) for f in run.files]
        stems = [f.name for f in run.files]
        best = run.file_for(ranking.suggested_epoch) if ranking.suggested_epoch is not None else None
        trigger = trigger_word(run.record) or ""
        explanation = ranking.explanation
        if run.missing:
            explanation += f"\n\nFiles listed in the run but gone: {', '.join(run.missing)}."
        return {"epochs": (choices, choices), "prompt": trigger, "trigger": trigger,
                "send_file": (stems, best.name if best else (stems[-1] if stems else None)),
                "table": table_rows(ranking), "explanation": explanation, "size": run.resolution}

    def request(self, label: str, epochs: list[str], weights: str, prompt: str, negative: str, seed: Any,
                steps: Any, width: Any, height: Any, sampler: str, control: str = "",
                drift: bool = True) -> CompareRequest:
        from ..compare_api import parse_weights
        if not epochs:
            raise LoraTrainError("tick at least one epoch file")
        return CompareRequest(record_path=self.record_for(label), epochs=[epoch_of_label(e) for e in epochs],
                              weights=parse_weights(weights or WEIGHTS_TEXT), prompt=prompt or "",
                              negative_prompt=negative or "", seed=int(seed if seed not in (None, "") else -1),
                              steps=int(steps or DEFAULT_STEPS), width=int(width) if width else None,
                              height=int(height) if height else None, sampler_name=sampler or DEFAULT_SAMPLER,
                              drift=bool(drift), control_prompts=control_lines(control) or None)

    def make_grid(self, *values: Any, interval: float = 0.5) -> Iterator[dict[str, Any]]:
        """Run the grid in a thread and report: {"status"} while it runs, then the picture, labels and table."""
        try:
            request = self.request(*values)
        except (LoraTrainError, ValueError) as exc:
            yield {"status": f"Error: {exc}"}
            return
        if not self._lock.acquire(blocking=False):
            yield {"status": "A grid is already being made; wait for it or press Stop."}
            return
        stop = self._stop = threading.Event()
        box: dict[str, Any] = {"done": 0, "total": 0}
        started = time.time()

        def progress(done: int, total: int) -> None:
            box["done"], box["total"] = done, total

        def work() -> None:
            try:
                box["result"] = run_compare(self.host, request, stop=stop, progress=progress)
            except BaseException as exc:  # noqa: BLE001 - shown as a message
                box["error"] = exc

        try:
            thread = background.start(work, name="lora-train-compare-grid", stop=stop)
            while thread.is_alive():
                thread.join(interval)
                if thread.is_alive():
                    count = f"{box['done']}/{box['total']} cells, " if box["total"] else ""
                    yield {"status": f"Making the grid: {count}{time.time() - started:.0f} s"
                                     + (" (stopping)" if stop.is_set() else "")}
        finally:
            self._stop = None
            self._lock.release()
        if "error" in box:
            exc = box["error"]
            msg = f"Stopped: {exc}" if stop.is_set() else f"Error: {exc}" if isinstance(exc, (LoraTrainError,
                                                                                            OSError)) \
                else f"Error: {type(exc).__name__}: {exc}"
            yield {"status": msg}
            return
        yield self.result_view(box["result"], time.time() - started)

    def result_view(self, res: CompareResult, seconds: float = 0.0) -> dict[str, Any]:
        lines = [f"Rows (epochs): {' | '.join(s.replace(chr(10), ' ') for s in res.row_labels)}",
                 f"Columns (weights): {' | '.join(res.col_labels)}"]
        state = "Stopped: the cells not drawn are blank" if res.interrupted else "Done"
        status = f"{state}: {len(res.epochs)} epochs x {len(res.weights)} weights, seed {res.seed}, {seconds:.0f} s"
        if res.saved:
            status += f"; saved in {res.saved}"
        failed = list(getattr(res, "failed", None) or [])
        if failed:
            where = ", ".join(sorted({f"epoch {f.epoch} × {f.weight:g}" for f in failed
                                      if f.epoch is not None and f.weight is not None}))
            status += (f"\n{len(failed)} cells failed (grey tiles{': ' + where if where else ''}): "
                       f"{failed[0].reason}")
        drift = getattr(res, "drift", None)
        if drift is not None and drift.available and drift.suggested_epoch is not None:
            status += f"\nSuggested by loss and drift: epoch {drift.suggested_epoch}"
        return {"status": status, "image": res.image, "labels": "\n".join(lines),
                "table": table_rows(res.ranking, drift), "explanation": explanation_text(res.ranking, drift)}

    def stop(self) -> str:
        if self._stop is None:
            return "Nothing is running."
        self._stop.set()
        return "Stopping after the current cell…"

    def send(self, label: Optional[str], stem: Optional[str], weight: Any, prompt: str = "") -> str:
        from ..compare.runs import open_run, trigger_word
        if not stem:
            raise LoraTrainError("choose an epoch file to send")
        trigger = trigger_word(open_run(self.record_for(label)).record) or "" if label else ""
        return send_text(stem, weight if weight not in (None, "") else 1.0, trigger)


# ---------------------------------------------------------------------------------------------- the components
def build_compare_section(host: Any, jobs: Any) -> CompareSection:
    """Create the section's components in the current Gradio context (inside the tab's Blocks)."""
    import gradio as gr

    from .compat import dataframe, js_kwargs

    sec = CompareSection(host, jobs)
    labels = sec.run_labels()
    first = sec.run_view(labels[0]) if labels else sec.run_view(None)
    in_webui = getattr(host, "name", "") == "webui"
    with gr.Column(elem_id=P + "root"):
        gr.Markdown("Draw every chosen epoch file of a run at every weight with one seed: rows are epochs, "
                    "columns are weights. The table ranks the epochs by validation loss and shows how far "
                    "prompts without the trigger drifted from the base model.", elem_id=P + "intro")
        with gr.Row():
            run = gr.Dropdown(choices=labels, value=labels[0] if labels else None, label="Run", scale=4,
                              elem_id=P + "run")
            refresh = gr.Button("Refresh runs", elem_id=P + "refresh", scale=1, min_width=100)
        epochs = gr.CheckboxGroup(choices=first["epochs"][0], value=first["epochs"][1], label="Epoch files",
                                  elem_id=P + "epochs")
        weights = gr.Textbox(value=WEIGHTS_TEXT, label="Weights", info="LoRA weights, one column each",
                             elem_id=P + "weights")
        prompt = gr.Textbox(value=first["prompt"], label="Prompt", lines=2, elem_id=P + "prompt",
                            info="The trigger word is filled in; the grid adds the LoRA itself")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=P + "negative")
        with gr.Row():
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id=P + "seed")
            steps = gr.Number(value=DEFAULT_STEPS, precision=0, label="Steps", elem_id=P + "steps")
            width = gr.Number(value=first["size"][0], precision=0, label="Width", elem_id=P + "width")
            height = gr.Number(value=first["size"][1], precision=0, label="Height", elem_id=P + "height")
            samplers = sampler_choices(host)
            sampler = gr.Dropdown(choices=samplers, value=DEFAULT_SAMPLER if DEFAULT_SAMPLER in samplers else
                                  (samplers[0] if samplers else None), label="Sampler", allow_custom_value=True,
                                  elem_id=P + "sampler")
        with gr.Row():
            drift = gr.Checkbox(value=True, label="Measure drift", elem_id=P + "drift", scale=1,
                                info="Draw prompts without the trigger with the base model and each epoch and "
                                     "show how far they moved")
            control = gr.Textbox(label="Control prompts", lines=2, elem_id=P + "control", scale=3,
                                 info="One per line; empty: the run's captions without the trigger word")
        with gr.Row():
            make = gr.Button("Make grid", variant="primary", elem_id=P + "make")
            stop = gr.Button("Stop", variant="stop", elem_id=P + "stop")
        status = gr.Textbox(label="Progress", interactive=False, elem_id=P + "status")
        image = gr.Image(label="Grid", type="pil", interactive=False, elem_id=P + "image")
        grid_labels = gr.Textbox(label="Rows and columns", lines=2, interactive=False, elem_id=P + "labels")
        table = gr.Dataframe(value=dataframe(first["table"], TABLE_HEADERS), headers=TABLE_HEADERS,
                             interactive=False, wrap=True, label="Epochs by validation loss, with drift",
                             elem_id=P + "table")
        explanation = gr.Textbox(value=first["explanation"], label="What the curves say", lines=4,
                                 interactive=False, elem_id=P + "explanation")
        with gr.Row():
            send_file = gr.Dropdown(choices=first["send_file"][0], value=first["send_file"][1], label="Epoch file",
                                    scale=3, elem_id=P + "send_file")
            send_weight = gr.Number(value=1.0, label="Weight", scale=1, elem_id=P + "send_weight")
            send = gr.Button("Send to txt2img" if in_webui else "Show the prompt text", scale=1,
                             elem_id=P + "send")
        send_box = gr.Textbox(label="Prompt text", interactive=False, elem_id=P + "send_text",
                              info="Opens txt2img with this prompt" if in_webui else "Copy it into a prompt")

    def on_run(label):
        try:
            v = sec.run_view(label)
        except LoraTrainError as exc:
            return [gr.update()] * 8 + [f"Error: {exc}"]
        return [gr.update(choices=v["epochs"][0], value=v["epochs"][1]), v["prompt"],
                gr.update(choices=v["send_file"][0], value=v["send_file"][1]),
                dataframe(v["table"], TABLE_HEADERS), v["explanation"], v["size"][0], v["size"][1], None, ""]

    run_outputs = [epochs, prompt, send_file, table, explanation, width, height, image, status]
    run.change(fn=on_run, inputs=[run], outputs=run_outputs)

    seen = gr.State(list(sec.runs.values()))     # per page: the runs it has listed

    def on_refresh(current, known):
        names, value, known = sec.refresh(current, known)
        return gr.update(choices=names, value=value), known

    refresh.click(fn=on_refresh, inputs=[run, seen], outputs=[run, seen])

    grid_outputs = [status, image, grid_labels, table, explanation]

    def on_make(*values):
        for out in sec.make_grid(*values):
            tab = out.get("table")
            yield [out.get("status", gr.update()), out.get("image", gr.update()), out.get("labels", gr.update()),
                   dataframe(tab, TABLE_HEADERS) if tab is not None else gr.update(),
                   out.get("explanation", gr.update())]

    make.click(fn=on_make, inputs=[run, epochs, weights, prompt, negative, seed, steps, width, height, sampler,
                                   control, drift], outputs=grid_outputs)
    stop.click(fn=sec.stop, inputs=[], outputs=[status], queue=False)

    def on_send(label, stem, weight):
        try:
            return sec.send(label, stem, weight)
        except LoraTrainError as exc:
            return f"Error: {exc}"

    event = send.click(fn=on_send, inputs=[run, send_file, send_weight], outputs=[send_box])
    if in_webui:
        event.then(fn=None, inputs=[send_box], outputs=[], **js_kwargs(JS_SEND))
    return sec
