"""What the sections show after a project's images changed (an import, preprocessing again): the tag views and
the steps formula. Below the import and preprocess sections, which both refresh through it."""
from __future__ import annotations

from . import params_section, tags_section
from .common import get_project
from .context import Result, UIContext


def refresh_after_data_change(ctx: UIContext, name: str) -> Result:
    """After images changed (import, preprocess): the tag views and the steps formula."""
    out = tags_section.view(ctx, name)
    project = get_project(ctx, name)
    out.update(params_section.estimate(ctx, name, params_section.form_for_project(ctx, project)))
    return out
