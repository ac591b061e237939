"""What opening a project shows in every section of the tab (on page load, on opening and on creating a project),
and the form fields saved with it. Below the sections' wiring: the tab and the project section both use it."""
from __future__ import annotations

from . import form_store, history_section, params_section, regimages_section, tags_section, train_section
from .common import get_project, project_names
from .compat import update
from .context import Result, UIContext
from .preprocess_section import PP_DEFAULTS, PP_KEYS
from .presets import FORM_KEYS
from .tags_section import TAG_KEYS

TAG_DEFAULTS = {"tag_tagger": "no tagger", "tag_model": "", "tag_csv": "", "tag_threshold": 0.35,
                "tag_existing": "replace"}
OPTION_KEYS = ["import_path"] + PP_KEYS + TAG_KEYS + regimages_section.REG_KEYS   # saved with the form
DATA_OUTPUTS = tags_section.VIEW_KEYS + params_section.ESTIMATE_KEYS
OPEN_OUTPUTS = (["project", "base_model", "trigger", "purpose", "preset"] + OPTION_KEYS + list(FORM_KEYS)
                + params_section.ESTIMATE_KEYS + tags_section.VIEW_KEYS + ["tag_filter", "tag_status", "tag_selected"]
                + history_section.VIEW_KEYS + ["history_status"] + train_section.VIEW_KEYS
                + ["check_report", "check_gallery", "pp_status"])


def resolution_of(ctx: UIContext) -> int:
    try:
        return int(str(ctx.host.base_config().get("resolution", 512)).split(",")[0])
    except ValueError:
        return 512


def open_view(ctx: UIContext, name: str | None) -> Result:
    """Everything the tab shows for project `name` (None: no project): used on page load, on opening and on
    creating a project. Remembers the project as the one open last."""
    names = project_names(ctx)
    out: Result = {"project": update(choices=names, value=name if name in names else None),
                   "base_model": ctx.host.checkpoint_label()}   # the WebUI loads its model after the tab is built
    if name not in names:
        name = None
    out.update(train_section.job_view(ctx, train_section.job_for(ctx, name)))
    out.update(history_section.view(ctx, name))
    out.update(tags_section.view(ctx, name))
    out.update({"tag_filter": "", "tag_status": "", "tag_selected": "", "check_report": "", "check_gallery": [],
                "pp_status": "", "history_status": ""})
    if name is None:
        out.update(params_section.estimate(ctx, None, {}))
        return out
    project = get_project(ctx, name)
    form_store.set_last_project(ctx.host.paths.projects, project.name)
    saved = form_store.load_form(project.root)
    out.update({"trigger": project.trigger, "purpose": saved.get("purpose") or project.purpose or "concept"})
    options = dict(PP_DEFAULTS, pp_resolution=resolution_of(ctx) if resolution_of(ctx) % 64 == 0 else 512)
    options.update(TAG_DEFAULTS)
    options.update(regimages_section.REG_DEFAULTS)
    options["import_path"] = ""
    options.update({k: v for k, v in saved.items() if k in OPTION_KEYS})
    out.update(options)
    out.update(params_section.form_view(ctx, project))
    out.setdefault("preset", None)
    return out
