"""The Tools section of the Train LoRA tab: Inspect, Merge into checkpoint, Merge LoRAs, Extract, Resize.

`build_tools_section(host, jobs)` creates the components in the current Gradio context (inside the tab's
Blocks); the work is done by tools_actions (plain functions, tested without a browser). Long actions run in a
background thread (ToolRunner), one at a time; their handlers are generators that refresh a status box with the
tool's progress events until the result message comes. Generators need the Gradio queue, which the WebUI turns
on (and the standalone page must). Every elem_id starts with `lora_train_tools_`.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from ..tools.blocks import BLOCK_TABLE, LBW17, LBW26, LBW_PRESETS
from . import tools_actions as act
from .tools_runner import ActionResult, ToolRunner, error_message

P = "lora_train_tools_"
MAX_ROWS = 4
MERGE_METHODS = {"SVD to a rank": "svd", "Concatenate (rank = sum of ranks)": "concat"}
BLOCK_HEADERS = ["Block", "Position of 26", "Position of 17", "U-Net part", "In LoRA", "In LoCon"]
PRESET_HEADERS = ["Preset", "17 values"]
BLOCKS_PLACEHOLDER = "ALL, INALL, MIDD, OUTALL… or 17 / 26 values"


def _table(rows: list[list[Any]], headers: list[str]) -> Any:
    import pandas as pd
    return pd.DataFrame([list(r) for r in rows], columns=list(headers))


def block_rows() -> list[list[Any]]:
    """The which-block-is-which table: LBW name, 1-based position in the 26 / 17 value forms, what it holds."""
    rows: list[list[Any]] = [["BASE", 1, 1, "text encoder", "yes", "yes"]]
    for r in BLOCK_TABLE:
        rows.append([r.name, LBW26.index(r.name) + 1, LBW17.index(r.name) + 1 if r.name in LBW17 else "",
                     r.unet_part, "yes" if r.lierla else "", "yes" if r.c3lier else ""])
    return rows


def preset_rows() -> list[list[str]]:
    return [[name, ",".join(f"{v:g}" for v in values)] for name, values in LBW_PRESETS.items()]


class ToolsSection:
    def __init__(self, host, jobs):
        self.host, self.jobs = host, jobs
        self.runner = ToolRunner(host)
        self.live = act.LiveState(host)
        self.lora_dropdowns: list[Any] = []
        self.ckpt_dropdowns: list[Any] = []

    # ------------------------------------------------------------------ pieces
    def lora_dropdown(self, elem: str, label: str = "LoRA", **kw) -> Any:
        d = gr.Dropdown(choices=act.list_loras(self.host), value=None, label=label, allow_custom_value=True,
                        elem_id=P + elem, **kw)
        self.lora_dropdowns.append(d)
        return d

    def ckpt_dropdown(self, elem: str, label: str, default: bool = True, scale: int = 2) -> Any:
        choices = list(act.checkpoint_choices(self.host))
        value = choices[0] if default and choices and act.default_checkpoint(self.host) else None
        d = gr.Dropdown(choices=choices, value=value, label=label, allow_custom_value=True, elem_id=P + elem,
                        scale=scale)
        self.ckpt_dropdowns.append(d)
        return d

    def refresh(self, elem: str) -> Any:
        return gr.Button("Refresh lists", elem_id=P + elem, size="sm", scale=1, min_width=100)

    def lora_rows(self, prefix: str) -> list[Any]:
        values: list[Any] = []
        for i in range(1, MAX_ROWS + 1):
            with gr.Row():
                values.append(self.lora_dropdown(f"{prefix}_lora{i}", f"LoRA {i}", scale=3))
                values.append(gr.Number(value=1.0, label="Ratio", elem_id=P + f"{prefix}_ratio{i}", scale=1))
                values.append(gr.Textbox(label="Block weights (empty = 1 everywhere)", placeholder=BLOCKS_PLACEHOLDER,
                                         elem_id=P + f"{prefix}_blocks{i}", scale=3))
        return values

    def block_help(self, prefix: str) -> None:
        with gr.Accordion("Which block is which", open=False, elem_id=P + f"{prefix}_blocks_help"):
            gr.Markdown("Block weights follow the LoRA Block Weight extension: 26 values (BASE, IN00-IN11, M00, "
                        "OUT00-OUT11) or the 17-value short form of a LoRA without conv layers; the blocks the "
                        "17 values leave out keep 1.", elem_id=P + f"{prefix}_blocks_note")
            gr.Dataframe(value=_table(block_rows(), BLOCK_HEADERS), headers=BLOCK_HEADERS, interactive=False,
                         wrap=True, elem_id=P + f"{prefix}_block_table")
            gr.Dataframe(value=_table(preset_rows(), PRESET_HEADERS), headers=PRESET_HEADERS, interactive=False,
                         wrap=True, elem_id=P + f"{prefix}_preset_table")

    def run_box(self, prefix: str) -> tuple[Any, Any, Any]:
        with gr.Row():
            status = gr.Textbox(label="Progress", lines=2, interactive=False, elem_id=P + f"{prefix}_status",
                                scale=4)
            stop = gr.Button("Stop", variant="stop", elem_id=P + f"{prefix}_stop", scale=1)
        result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id=P + f"{prefix}_result")
        stop.click(fn=self.runner.stop, inputs=[], outputs=[status], queue=False)
        return status, result, stop

    def output_fields(self, prefix: str, where: str) -> tuple[Any, Any]:
        with gr.Row():
            name = gr.Textbox(label="Output name", placeholder="a file name, no folders", info=where,
                              elem_id=P + f"{prefix}_output_name", scale=3)
            overwrite = gr.Checkbox(value=False, label="Overwrite an existing file",
                                    elem_id=P + f"{prefix}_overwrite", scale=1)
        return name, overwrite

    def streamed(self, label: str, make: Callable[..., Callable[[Any, Any], ActionResult]]) -> Callable:
        """A generator handler: make(*values) -> fn(sink, stop) runs in the runner; yields (status, result)."""
        def handler(*values):
            try:
                fn = make(*values)
            except Exception as e:  # noqa: BLE001 - bad input shows as a message
                yield self.runner.status(), error_message(e)
                return
            yield from self.runner.stream(label, fn)
        return handler

    # ------------------------------------------------------------------ tabs
    def inspect_tab(self) -> None:
        host = self.host
        with gr.Row():
            lora = self.lora_dropdown("inspect_lora", scale=4,
                                      info="Pick a file from the LoRA folder or type a path inside the allowed folders")
            refresh = self.refresh("inspect_refresh")
            run = gr.Button("Inspect", variant="primary", elem_id=P + "inspect_run", scale=1, min_width=100)
        inspected = gr.State(None)
        summary = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id=P + "inspect_summary")
        with gr.Accordion("Modules", open=False, elem_id=P + "inspect_modules_acc"):
            modules = gr.Dataframe(headers=act.MODULE_HEADERS, interactive=False, wrap=True,
                                   elem_id=P + "inspect_modules")
        with gr.Accordion("Metadata", open=False, elem_id=P + "inspect_metadata_acc"):
            metadata = gr.Dataframe(headers=act.METADATA_HEADERS, interactive=False, wrap=True,
                                    elem_id=P + "inspect_metadata")
        gr.Markdown("Edit the title, trigger words and description, then save a copy (with new hashes).",
                    elem_id=P + "inspect_edit_note")
        with gr.Row():
            title = gr.Textbox(label="Title", elem_id=P + "inspect_title")
            trigger = gr.Textbox(label="Trigger words", elem_id=P + "inspect_trigger")
        description = gr.Textbox(label="Description", lines=2, elem_id=P + "inspect_description")
        name, overwrite = self.output_fields("inspect", "saved beside the input, in the LoRA folder")
        in_place = gr.Checkbox(value=False, label="Edit the input file itself instead (rewrites it)",
                               elem_id=P + "inspect_in_place")
        save = gr.Button("Save metadata", elem_id=P + "inspect_save")
        message = gr.Textbox(label="Result", lines=2, interactive=False, elem_id=P + "inspect_result")

        def do_inspect(value):
            try:
                v = act.inspect_file(host, value)
            except Exception as e:  # noqa: BLE001
                return (None, "", gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                        error_message(e))
            return (v.path, v.summary, _table(v.modules, act.MODULE_HEADERS),
                    _table(v.metadata, act.METADATA_HEADERS), v.title, v.trigger_words, v.description,
                    f"Hash check: {v.hash_status}")

        run.click(fn=do_inspect, inputs=[lora],
                  outputs=[inspected, summary, modules, metadata, title, trigger, description, message])

        def do_save(path, t, tw, d, out, ow, inplace):
            if not path:
                return "Inspect a file first."
            return act.save_metadata(host, path, t, tw, d, out, in_place=bool(inplace), overwrite=bool(ow)).message

        save.click(fn=do_save, inputs=[inspected, title, trigger, description, name, overwrite, in_place],
                   outputs=[message])
        self._refreshers.append(refresh)

    def merge_checkpoint_tab(self) -> None:
        host, jobs = self.host, self.jobs
        with gr.Row():
            base = self.ckpt_dropdown("merge_base", "Base checkpoint", scale=4)
            refresh = self.refresh("merge_refresh")
        rows = self.lora_rows("merge")
        self.block_help("merge")
        with gr.Row():
            precision = gr.Dropdown(choices=[act.PRECISION_KEEP, *act.SAVE_PRECISIONS], value=act.PRECISION_KEEP,
                                    label="Save precision", elem_id=P + "merge_precision")
            dylora = gr.Number(value=0, precision=0, label="DyLoRA rank (0 = all)", elem_id=P + "merge_dylora")
        name, overwrite = self.output_fields("merge", "a new checkpoint in the models folder")
        run = gr.Button("Merge and save", variant="primary", elem_id=P + "merge_run")
        with gr.Group(visible=act.live_available(host), elem_id=P + "merge_live_group"):
            gr.Markdown("Or merge into the model loaded now, without writing a file (uses the loaded model, not "
                        "the base checkpoint above).", elem_id=P + "merge_live_note")
            with gr.Row():
                live_run = gr.Button("Load into the live model (no file)", elem_id=P + "merge_live_apply")
                live_restore = gr.Button("Restore", elem_id=P + "merge_live_restore")
            live_text = gr.Textbox(value=self.live.text(), label="Live model", interactive=False,
                                   elem_id=P + "merge_live_state")
        status, result, _ = self.run_box("merge")

        def make(b, *values):
            *row_values, prec, dy, out, ow = values
            lrows = act.rows_from_values(row_values)
            return lambda sink, stop: act.merge_into_checkpoint(
                host, b, lrows, out, save_precision=prec, dylora_rank=dy, overwrite=bool(ow), sink=sink, stop=stop)

        run.click(fn=self.streamed("merge into checkpoint", make),
                  inputs=[base, *rows, precision, dylora, name, overwrite], outputs=[status, result])

        def make_live(*values):
            *row_values, dy = values
            lrows = act.rows_from_values(row_values)
            return lambda sink, stop: act.live_apply(host, jobs, self.live, lrows, dylora_rank=dy, sink=sink,
                                                     stop=stop)

        apply_stream = self.streamed("load into the live model", make_live)

        def do_live(*values):
            for st, res in apply_stream(*values):
                yield st, res, self.live.text()

        live_run.click(fn=do_live, inputs=[*rows, dylora], outputs=[status, result, live_text])

        def do_restore():
            if self.runner.busy:
                return gr.update(), "Wait for the running tool to end first.", self.live.text()
            return gr.update(), act.live_restore(host, self.live).message, self.live.text()

        live_restore.click(fn=do_restore, inputs=[], outputs=[status, result, live_text])
        self._refreshers.append(refresh)

    def merge_loras_tab(self) -> None:
        host = self.host
        refresh = self.refresh("mergelora_refresh")
        rows = self.lora_rows("mergelora")
        self.block_help("mergelora")
        with gr.Row():
            method = gr.Radio(choices=list(MERGE_METHODS), value="SVD to a rank", label="Method",
                              elem_id=P + "mergelora_method")
            rank = gr.Number(value=8, precision=0, label="New rank", elem_id=P + "mergelora_rank")
            conv_rank = gr.Number(value=0, precision=0, label="New conv rank (0 = same)",
                                  elem_id=P + "mergelora_conv_rank")
            precision = gr.Dropdown(choices=list(act.SAVE_PRECISIONS), value="float", label="Save precision",
                                    elem_id=P + "mergelora_precision")
            dylora = gr.Number(value=0, precision=0, label="DyLoRA rank (0 = all)", elem_id=P + "mergelora_dylora")
        name, overwrite = self.output_fields("mergelora", "a new LoRA in the LoRA folder")
        run = gr.Button("Merge LoRAs", variant="primary", elem_id=P + "mergelora_run")
        status, result, _ = self.run_box("mergelora")

        def make(*values):
            *row_values, m, r, cr, prec, dy, out, ow = values
            lrows = act.rows_from_values(row_values)
            return lambda sink, stop: act.merge_loras(
                host, lrows, out, method=MERGE_METHODS.get(m, m), new_rank=r, new_conv_rank=cr,
                save_precision=prec, dylora_rank=dy, overwrite=bool(ow), sink=sink, stop=stop)

        run.click(fn=self.streamed("merge LoRAs", make),
                  inputs=[*rows, method, rank, conv_rank, precision, dylora, name, overwrite],
                  outputs=[status, result])
        self._refreshers.append(refresh)

    def extract_tab(self) -> None:
        host = self.host
        with gr.Row():
            tuned = self.ckpt_dropdown("extract_tuned", "Tuned checkpoint", default=False)
            base = self.ckpt_dropdown("extract_base", "Base checkpoint")
            refresh = self.refresh("extract_refresh")
        with gr.Row():
            dim = gr.Number(value=4, precision=0, label="Rank", elem_id=P + "extract_dim")
            conv_dim = gr.Number(value=0, precision=0, label="Conv rank (0 = no conv layers)",
                                 elem_id=P + "extract_conv_dim")
            clamp = gr.Number(value=0.99, label="Clamp quantile (1 = no clamp)", elem_id=P + "extract_clamp")
            min_diff = gr.Number(value=0.01, label="Minimum text encoder difference",
                                 elem_id=P + "extract_min_diff")
            precision = gr.Dropdown(choices=list(act.SAVE_PRECISIONS), value="float", label="Save precision",
                                    elem_id=P + "extract_precision")
        name, overwrite = self.output_fields("extract", "a new LoRA in the LoRA folder")
        run = gr.Button("Extract LoRA", variant="primary", elem_id=P + "extract_run")
        status, result, _ = self.run_box("extract")

        def make(t, b, d, cd, cq, md, prec, out, ow):
            return lambda sink, stop: act.extract(host, t, b, out, dim=d, conv_dim=cd, clamp_quantile=cq,
                                                  min_diff=md, save_precision=prec, overwrite=bool(ow),
                                                  sink=sink, stop=stop)

        run.click(fn=self.streamed("extract", make),
                  inputs=[tuned, base, dim, conv_dim, clamp, min_diff, precision, name, overwrite],
                  outputs=[status, result])
        self._refreshers.append(refresh)

    def resize_tab(self) -> None:
        host = self.host
        with gr.Row():
            lora = self.lora_dropdown("resize_lora", scale=4,
                                      info="Pick a file from the LoRA folder or type a path inside the allowed folders")
            refresh = self.refresh("resize_refresh")
        with gr.Row():
            method = gr.Dropdown(choices=list(act.RESIZE_METHODS), value="fixed", label="Rank method",
                                 info="fixed: the new rank everywhere; sv_ratio / sv_fro / sv_cumulative: a rank "
                                      "per module, at most the new rank", elem_id=P + "resize_method")
            rank = gr.Number(value=4, precision=0, label="New rank", elem_id=P + "resize_rank")
            conv_rank = gr.Number(value=0, precision=0, label="New conv rank (0 = same)",
                                  elem_id=P + "resize_conv_rank")
            param = gr.Number(value=None, label="Method parameter", elem_id=P + "resize_param",
                              info="sv_ratio: e.g. 10; sv_fro / sv_cumulative: e.g. 0.9")
            precision = gr.Dropdown(choices=list(act.SAVE_PRECISIONS), value="float", label="Save precision",
                                    elem_id=P + "resize_precision")
        name, overwrite = self.output_fields("resize", "a new LoRA in the LoRA folder")
        run = gr.Button("Resize LoRA", variant="primary", elem_id=P + "resize_run")
        status, result, _ = self.run_box("resize")

        def make(lo, m, r, cr, pa, prec, out, ow):
            return lambda sink, stop: act.resize(host, lo, out, method=m, new_rank=r, new_conv_rank=cr,
                                                 dynamic_param=pa, save_precision=prec, overwrite=bool(ow),
                                                 sink=sink, stop=stop)

        run.click(fn=self.streamed("resize", make),
                  inputs=[lora, method, rank, conv_rank, param, precision, name, overwrite], outputs=[status, result])
        self._refreshers.append(refresh)

    def build(self) -> None:
        self._refreshers: list[Any] = []
        with gr.Tabs(elem_id=P + "tabs"):
            with gr.Tab("Inspect", elem_id=P + "inspect_tab"):
                self.inspect_tab()
            with gr.Tab("Merge into checkpoint", elem_id=P + "merge_tab"):
                self.merge_checkpoint_tab()
            with gr.Tab("Merge LoRAs", elem_id=P + "mergelora_tab"):
                self.merge_loras_tab()
            with gr.Tab("Extract", elem_id=P + "extract_tab"):
                self.extract_tab()
            with gr.Tab("Resize", elem_id=P + "resize_tab"):
                self.resize_tab()
        outs = self.lora_dropdowns + self.ckpt_dropdowns

        def refresh_all(*current):
            loras = act.list_loras(self.host)
            ckpts = list(act.checkpoint_choices(self.host))
            # an empty checkpoint field takes the default (inside the WebUI the tab is built before the model
            # loads, so at first there is no default to show)
            chosen = current[len(self.lora_dropdowns):]
            return ([gr.update(choices=loras) for _ in self.lora_dropdowns]
                    + [gr.update(choices=ckpts, value=value or (ckpts[0] if ckpts else None))
                       for value in chosen])

        for button in self._refreshers:
            button.click(fn=refresh_all, inputs=list(self.lora_dropdowns) + list(self.ckpt_dropdowns),
                         outputs=outs, queue=False)


def build_tools_section(host, jobs) -> None:
    """Create the Tools section in the current Gradio context (a Blocks / Tab of the Train LoRA tab)."""
    ToolsSection(host, jobs).build()
