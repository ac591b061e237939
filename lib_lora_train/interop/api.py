"""POST /lora-train/v1/import: a settings file's text -> {config, report} (added to the API's router).

No `from __future__ import annotations`: FastAPI reads the handler's annotations at runtime. Works with FastAPI
0.94 + pydantic 1 and current releases (plain models, nothing version-specific)."""
import base64
import binascii
import os
from typing import Any, Dict, List, Optional

from fastapi import HTTPException
from pydantic import BaseModel, Field


class ImportRequest(BaseModel):
    filename: str = Field(..., description="The file's name; its extension tells the format (.json kohya_ss GUI, "
                                           ".ps1 / .sh lora-scripts, .toml sd-scripts or lora-scripts)")
    content: Optional[str] = Field(None, description="The file's text")
    content_base64: Optional[str] = Field(None, description="Or the file's bytes, base64-encoded")


class ImportEntry(BaseModel):
    field: str = Field(..., description="The field as the source names it")
    status: str = Field(..., description="carried | changed | ignored | unsupported | error")
    old: Any = Field(None, description="The source's value")
    new: Optional[Dict[str, Any]] = Field(None, description="What it became here: {option: value}")
    why: str = Field("", description="The reason, in words")
    blocking: bool = Field(False, description="True when it keeps a run from starting")


class ImportReport(BaseModel):
    format: str = Field(..., description="The detected format")
    family: str = Field(..., description="The model family the source trains (sd1, sd2, sdxl, or another)")
    can_start: bool = Field(..., description="Whether a run can start from `config`")
    reasons: List[str] = Field(default_factory=list, description="Why it cannot, when it cannot")
    counts: Dict[str, int] = Field(default_factory=dict, description="Entries per status")
    notes: List[str] = Field(default_factory=list, description="Things to know (missing paths, ...)")
    entries: List[ImportEntry] = Field(default_factory=list, description="Every field of the source")
    text: str = Field("", description="The report as text")


class ImportResponse(BaseModel):
    config: Dict[str, Any] = Field(..., description="sd-scripts-named options, ready for POST runs `config` (leave "
                                                     "out the folder keys: the project sets them)")
    report: ImportReport
    files: Dict[str, str] = Field(default_factory=dict, description="Extra files the source implies (e.g. "
                                                                    "sample_prompts.txt), name -> text")


def import_text(request: ImportRequest) -> ImportResponse:
    from . import import_settings
    if request.content_base64 is not None:
        try:
            data = base64.b64decode(request.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "content_base64 is not valid base64") from None
    elif request.content is not None:
        data = request.content.encode("utf-8")
    else:
        raise HTTPException(400, "give content (text) or content_base64")
    result = import_settings(data=data, name=os.path.basename(request.filename) or "upload")
    rep = result.report.to_dict()
    report = ImportReport(format=rep["format"], family=rep["family"], can_start=rep["can_start"],
                          reasons=rep["reasons"], counts=rep["counts"], notes=rep["notes"],
                          entries=[ImportEntry(**e) for e in rep["entries"]], text=result.report.text())
    return ImportResponse(config=result.config, report=report, files=result.extra_files)


def add_import_route(router: Any) -> None:
    @router.post("/import", response_model=ImportResponse, summary="Import settings from another trainer",
                 responses={400: {"description": "No content"}})
    def post_import(request: ImportRequest) -> ImportResponse:
        """A kohya_ss GUI .json, a lora-scripts train.ps1 / train.sh or an sd-scripts / lora-scripts .toml, as
        text: the options in this engine's (sd-scripts') names and a report of every field (carried, changed,
        ignored, not supported). Bad input is a report with `can_start` false, not an error."""
        return import_text(request)
