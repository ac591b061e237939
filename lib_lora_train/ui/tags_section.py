"""Section 3, Tags: auto-tag, the tag frequency table (click a tag, remove it from every caption), the trigger
word first, a per-image caption editor with the image, a tag filter and undo. All edits go through
lib_lora_train.prep.tags.TagDataset (one undo level each, atomic writes)."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..prep.autotag import TagOptions, tag_images
from ..prep.taggers import make_tagger
from ..prep.tags import TagDataset, TagFilter, split_tags
from .common import MAX_GALLERY, cache_dir, gallery, get_project
from .compat import dataframe, update
from .context import Result, UIContext

TAGGER_WORDS = {"no tagger": "none", "WD14 (local model file)": "wd14", "DeepBooru (WebUI)": "deepbooru",
                "BLIP (WebUI)": "blip"}
EXISTING_WORDS = {"replace": "overwrite", "keep": "keep", "append": "append", "prepend": "prepend"}
TAG_KEYS = ["tag_tagger", "tag_model", "tag_csv", "tag_threshold", "tag_existing"]
TAG_HEADERS = ("Tag", "Images")
VIEW_KEYS = ["tag_table", "tag_rows", "tag_gallery", "tag_images", "tag_image", "edit_image", "edit_caption"]


def tagger_choices(ctx: UIContext) -> list[str]:
    words = ["no tagger", "WD14 (local model file)"]
    if ctx.host.taggers() is not None:
        words += ["DeepBooru (WebUI)", "BLIP (WebUI)"]
    return words


def _dataset(ctx: UIContext, project_name: str) -> TagDataset:
    return TagDataset(get_project(ctx, project_name).root)


def _where(filter_text: str | None) -> TagFilter | None:
    tags = split_tags(filter_text or "")
    return TagFilter.of(tags) if tags else None


def view(ctx: UIContext, project_name: str | None, filter_text: str = "", image: str | None = None) -> Result:
    """The table, the gallery and the editor for the (filtered) captions."""
    if not project_name:
        return {"tag_table": dataframe([], [ctx.tr(h) for h in TAG_HEADERS]), "tag_rows": [], "tag_gallery": [],
                "tag_images": [], "tag_image": update(choices=[], value=None), "edit_image": None,
                "edit_caption": ""}
    project = get_project(ctx, project_name)
    ds = TagDataset(project.root)
    where = _where(filter_text)
    freq = ds.frequency(where)
    caps = ds.captions(where)
    rels = [os.path.relpath(c.image, ds.root) for c in caps]
    thumbs = gallery([(c.image, os.path.basename(c.image)) for c in caps], cache_dir(project, "thumbs"))
    if image not in rels:
        image = rels[0] if rels else None
    out: Result = {"tag_table": dataframe([[t, n] for t, n in freq], [ctx.tr(h) for h in TAG_HEADERS]),
                   "tag_rows": [t for t, _ in freq], "tag_gallery": thumbs, "tag_images": rels[:MAX_GALLERY],
                   "tag_image": update(choices=rels, value=image)}
    out.update(editor(ctx, project_name, image))
    return out


def editor(ctx: UIContext, project_name: str | None, image: str | None) -> Result:
    if not project_name or not image:
        return {"edit_image": None, "edit_caption": ""}
    ds = _dataset(ctx, project_name)
    path = ds.resolve_image(image)
    return {"edit_image": path, "edit_caption": ds.read(path)}


def select_tag(ctx: UIContext, rows: list[str], index: Any) -> Result:
    row = index[0] if isinstance(index, (list, tuple)) else index
    if not isinstance(row, int) or not rows or not 0 <= row < len(rows):
        return {}
    return {"tag_selected": rows[row]}


def select_image(ctx: UIContext, project_name: str, images: list[str], index: Any) -> Result:
    i = index[0] if isinstance(index, (list, tuple)) else index
    if not isinstance(i, int) or not images or not 0 <= i < len(images):
        return {}
    out = {"tag_image": update(value=images[i])}
    out.update(editor(ctx, project_name, images[i]))
    return out


def _after_edit(ctx: UIContext, project_name: str, filter_text: str, image: str | None, message: str) -> Result:
    out = view(ctx, project_name, filter_text, image)
    out["tag_status"] = message
    return out


def remove_tag(ctx: UIContext, project_name: str, tag: str, filter_text: str, image: str | None) -> Result:
    if not (tag or "").strip():
        raise ConfigError("click a tag in the table (or type one) first")
    res = _dataset(ctx, project_name).remove(tag.strip())
    out = _after_edit(ctx, project_name, filter_text, image,
                      f"removed '{tag.strip()}' from {len(res.changed)} of {res.matched} captions")
    out["tag_selected"] = ""
    return out


def trigger_first(ctx: UIContext, project_name: str, filter_text: str, image: str | None) -> Result:
    project = get_project(ctx, project_name)
    if not project.trigger:
        raise ConfigError("this project has no trigger word; type one in Project & images first")
    res = TagDataset(project.root).set_trigger(project.trigger)
    return _after_edit(ctx, project_name, filter_text, image,
                       f"'{project.trigger}' is first in {res.matched} captions ({len(res.changed)} changed); "
                       f"keep {res.keep_tokens} first tag(s) when shuffling")


def save_caption(ctx: UIContext, project_name: str, image: str | None, caption: str, filter_text: str) -> Result:
    if not image:
        raise ConfigError("choose an image first")
    res = _dataset(ctx, project_name).write(image, caption or "")
    return _after_edit(ctx, project_name, filter_text, image,
                       f"caption of {os.path.basename(image)} saved" if res.changed else "caption unchanged")


def undo(ctx: UIContext, project_name: str, filter_text: str, image: str | None) -> Result:
    res = _dataset(ctx, project_name).undo()
    if res.level is None:
        return {"tag_status": "nothing to undo"}
    msg = f"undid '{res.level.description}': {len(res.restored)} captions restored"
    if res.conflicts:
        msg += f"; {len(res.conflicts)} changed since then and were left as they are"
    return _after_edit(ctx, project_name, filter_text, image, msg)


def autotag(ctx: UIContext, project_name: str, tagger_word: str, model: str, tags_csv: str, threshold: Any,
            existing_word: str, filter_text: str, image: str | None) -> Result:
    project = get_project(ctx, project_name)
    name = TAGGER_WORDS.get(tagger_word)
    if name is None:
        raise ConfigError(f"unknown tagger {tagger_word!r}")
    if name == "none":
        raise ConfigError("choose a tagger first")
    host_taggers = ctx.host.taggers()
    tagger = make_tagger(name, host=host_taggers, model=(model or "").strip() or None,
                         tags_csv=(tags_csv or "").strip() or None,
                         threshold=float(threshold) if threshold not in (None, "") else None)
    opts = TagOptions(existing=EXISTING_WORDS.get(existing_word, "overwrite"))
    res = tag_images(project.root, tagger, opts)
    return _after_edit(ctx, project_name, filter_text, image, res.summary_text())


def filter_selected(ctx: UIContext, project_name: str, tag: str) -> Result:
    out = view(ctx, project_name, tag or "")
    out["tag_filter"] = tag or ""
    return out


# ---------------------------------------------------------------- layout


def build(ctx: UIContext) -> None:
    import gradio as gr
    add = ctx.add
    with gr.Row():
        add("tag_tagger", gr.Radio(label="Tagger", choices=tagger_choices(ctx), value="no tagger",
                                   elem_id="lora_train_tagger",
                                   info="Writes one caption file per image; nothing is downloaded"))
        add("tag_existing", gr.Radio(label="Existing captions", choices=list(EXISTING_WORDS), value="replace",
                                     elem_id="lora_train_tag_existing",
                                     info="What to do with captions that are already there"))
    with gr.Row():
        add("tag_model", gr.Textbox(label="WD14 model file (.onnx)", elem_id="lora_train_tag_model",
                                    placeholder="/path/to/model.onnx", info="A tagger model on this computer"))
        add("tag_csv", gr.Textbox(label="WD14 tags file (selected_tags.csv)", elem_id="lora_train_tag_csv",
                                  placeholder="/path/to/selected_tags.csv", info="The tag list that comes with it"))
        add("tag_threshold", gr.Slider(label="Threshold", minimum=0.05, maximum=1.0, step=0.05, value=0.35,
                                       elem_id="lora_train_tag_threshold",
                                       info="Lower writes more tags, higher only the sure ones"))
    add("autotag_button", gr.Button("Auto-tag all images", elem_id="lora_train_autotag_button"))
    add("tag_status", gr.Textbox(label="Tag editor", interactive=False, elem_id="lora_train_tag_status"))
    with gr.Row():
        with gr.Column(scale=1):
            add("tag_filter", gr.Textbox(label="Only images with these tags", elem_id="lora_train_tag_filter",
                                         placeholder="tag, another tag",
                                         info="Press Enter to filter; empty shows all"))
            add("tag_table", gr.Dataframe(headers=list(TAG_HEADERS), datatype=["str", "number"], interactive=False,
                                          elem_id="lora_train_tag_table", label="Tag frequency"))
            add("tag_selected", gr.Textbox(label="Selected tag", elem_id="lora_train_tag_selected",
                                           info="Click a tag in the table"))
            with gr.Row():
                add("tag_remove", gr.Button("Remove from every caption", variant="stop",
                                            elem_id="lora_train_tag_remove"))
                add("tag_filter_selected", gr.Button("Show its images", elem_id="lora_train_tag_show"))
            with gr.Row():
                add("trigger_first", gr.Button("Put the trigger word first", elem_id="lora_train_trigger_first"))
                add("tag_undo", gr.Button("Undo last edit", elem_id="lora_train_tag_undo"))
        with gr.Column(scale=2):
            add("tag_gallery", gr.Gallery(label="Images", columns=6, height=300, allow_preview=False,
                                          elem_id="lora_train_tag_gallery"))
            add("tag_image", gr.Dropdown(label="Image", choices=[], elem_id="lora_train_tag_image",
                                         info="Or click an image above"))
            with gr.Row():
                add("edit_image", gr.Image(label="Selected image", type="filepath", interactive=False, height=256,
                                           elem_id="lora_train_edit_image"))
                with gr.Column():
                    add("edit_caption", gr.Textbox(label="Caption", lines=4, elem_id="lora_train_edit_caption",
                                                   info="Comma-separated tags, the trigger word first"))
                    add("caption_save", gr.Button("Save caption", elem_id="lora_train_caption_save"))
    add("tag_rows", gr.State([]))
    add("tag_images", gr.State([]))


def wire(ctx: UIContext) -> None:
    c = ctx.c
    outs = VIEW_KEYS + ["tag_status"]
    ctx.on(c["tag_filter"].submit, view, ["project", "tag_filter", "tag_image"], VIEW_KEYS, status=None)
    ctx.on(c["tag_table"].select, select_tag, ["tag_rows"], ["tag_selected"], select=True, show_progress="hidden")
    ctx.on(c["tag_gallery"].select, select_image, ["project", "tag_images"],
           ["tag_image", "edit_image", "edit_caption"], select=True)
    ctx.on(c["tag_image"].input, editor, ["project", "tag_image"], ["edit_image", "edit_caption"])
    ctx.on(c["tag_remove"].click, remove_tag, ["project", "tag_selected", "tag_filter", "tag_image"],
           outs + ["tag_selected"], status="tag_status")
    ctx.on(c["tag_filter_selected"].click, filter_selected, ["project", "tag_selected"], VIEW_KEYS + ["tag_filter"])
    ctx.on(c["trigger_first"].click, trigger_first, ["project", "tag_filter", "tag_image"], outs,
           status="tag_status")
    ctx.on(c["caption_save"].click, save_caption, ["project", "tag_image", "edit_caption", "tag_filter"], outs,
           status="tag_status")
    ctx.on(c["tag_undo"].click, undo, ["project", "tag_filter", "tag_image"], outs, status="tag_status")
    ctx.on(c["autotag_button"].click, autotag, ["project"] + TAG_KEYS + ["tag_filter", "tag_image"], outs,
           status="tag_status")
