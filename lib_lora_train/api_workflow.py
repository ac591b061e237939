"""The HTTP API's dataset routes: from an empty project to captioned training images, without the tab.

Create a project, add images (multipart upload, or import from a folder inside the host's folders), check,
preprocess, auto-tag, edit tags (remove / replace / trigger first / add / write / undo), list and read captions,
list a run's outputs and delete a run's files. Every route calls the same engine function as the tab
(lib_lora_train.prep.*, ui.reprocess, ui.history). Names from the request are checked by safenames (never
cleaned up), paths must lie in the host's folders, bodies are size-limited. `api.mount` adds this router with the
host's dependencies (the WebUI's --api-auth), like the run routes.
"""
import os
import re
import shutil
import uuid
from typing import Any, Dict, List, Optional

import pydantic
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from .errors import ConfigError, DataError, LoraTrainError
from .safenames import check_name, child_path

MAX_JSON_BYTES = 1 << 20           # a JSON body over 1 MiB is refused (413)
MAX_UPLOAD_BYTES = 512 << 20       # one upload request (all its files) over 512 MiB is refused (413)
MAX_UPLOAD_FILES = 2000

if pydantic.VERSION.startswith("1."):
    class Strict(BaseModel):
        """Unknown keys are refused (422 naming the key), not ignored."""
        class Config:
            extra = "forbid"
else:
    class Strict(BaseModel):  # type: ignore[no-redef]
        """Unknown keys are refused (422 naming the key), not ignored."""
        model_config = pydantic.ConfigDict(extra="forbid")


class ProjectCreate(Strict):
    name: str = Field(..., description="Folder name of the new project (letters, digits, spaces, - _ .)")
    trigger: str = Field("", description="Trigger word: put first in every caption, the LoRA card's activation text")
    purpose: Optional[str] = Field(None, description="character | style | concept | null")


class ProjectCreated(BaseModel):
    name: str = Field(..., description="The project's name (what POST runs takes as `project`)")
    path: str = Field(..., description="The project folder")
    trigger: str = Field("", description="Trigger word")
    purpose: Optional[str] = Field(None, description="character | style | concept | null")


class FolderImport(Strict):
    path: str = Field(..., description="A folder (or image file) inside the host's folders to import from")
    recursive: bool = Field(False, description="Also import images of sub-folders")
    folder: Optional[str] = Field(None, description="Concept name of the training folder (default: the project's)")
    repeats: Optional[int] = Field(None, ge=1, le=1000, description="Repeats per epoch (default: suggested)")
    resolution: int = Field(512, description="Preprocess size: a multiple of 64 (512, 768, 1024)")


class PreprocessRequest(Strict):
    resolution: int = Field(512, description="A multiple of 64 between 64 and 8192")
    mode: str = Field("bucket", description="bucket (keep aspect) | center | focal")
    background: str = Field("white", description="Transparent pixels become white or black")
    flip: bool = Field(False, description="Also write mirrored copies")
    format: str = Field("png", description="png | jpg | webp")


class AutotagRequest(Strict):
    tagger: str = Field(..., description="wd14 (a local .onnx model) | deepbooru | blip (WebUI only) | none")
    model: Optional[str] = Field(None, description="wd14: the .onnx file, inside the host's folders")
    tags_csv: Optional[str] = Field(None, description="wd14: its selected_tags.csv, inside the host's folders")
    threshold: Optional[float] = Field(None, ge=0, le=1, description="Minimum score of a tag")
    existing: str = Field("overwrite", description="overwrite | keep | append | prepend existing captions")
    max_tags: Optional[int] = Field(None, ge=1, le=500, description="Keep the best N tags")


class TagEdit(Strict):
    op: str = Field(..., description="remove | replace | trigger | add | write | undo")
    tags: List[str] = Field(default_factory=list, description="remove / add: the tags; trigger: the trigger words")
    old: Optional[str] = Field(None, description="replace: the tag (or regex) to replace")
    new: Optional[str] = Field(None, description="replace: its replacement (empty removes it)")
    regex: bool = Field(False, description="replace: `old` is a regular expression")
    image: Optional[str] = Field(None, description="write: the image (path relative to the project's img/)")
    caption: Optional[str] = Field(None, description="write: the new caption")


class CaptionInfo(BaseModel):
    image: str = Field(..., description="Image path relative to the project's img/ folder")
    caption: str = Field(..., description="The caption's first line (comma-separated tags)")
    tags: List[str] = Field(default_factory=list, description="The tags in order")


def _fail(exc: Exception) -> HTTPException:
    return HTTPException(400, str(exc))


class Workflow:
    """The routes' work as plain code (tested through the routes)."""

    def __init__(self, jobs: Any):
        self.jobs, self.host = jobs, jobs.host
        self.paths = jobs.host.paths

    def project(self, name: str):
        from .prep.project import is_project, open_project
        try:
            root = child_path(self.paths.projects, name, "project", existing=())
        except ConfigError as exc:
            raise _fail(exc) from None
        if not is_project(root):
            raise HTTPException(404, f"project '{name}' does not exist in {self.paths.projects}")
        try:
            return open_project(root)
        except LoraTrainError as exc:
            raise _fail(exc) from None

    def inside_roots(self, value: str, what: str) -> str:
        from .hosts.base import inside
        roots = list(self.paths.allowed_roots()) + list(getattr(self.paths, "imports", None) or [])
        if not isinstance(value, str) or not value or "\0" in value:
            raise HTTPException(400, f"{what}: a path is required")
        path = os.path.abspath(os.path.expanduser(value))
        if not inside(path, roots):
            raise HTTPException(400, f"{what}: {value} is outside the folders this host may read "
                                     f"({', '.join(roots)})")
        if not os.path.exists(path):
            raise HTTPException(400, f"{what}: {value} does not exist")
        return path

    def create(self, req: ProjectCreate) -> ProjectCreated:
        from .prep.project import create_project
        os.makedirs(self.paths.projects, exist_ok=True)
        try:
            root = child_path(self.paths.projects, req.name, "name")
            if req.trigger:
                check_trigger(req.trigger)
            if os.path.exists(root):
                raise HTTPException(409, f"a project or folder named '{req.name}' already exists")
            proj = create_project(root, req.name, trigger=req.trigger, purpose=req.purpose)
        except LoraTrainError as exc:
            raise _fail(exc) from None
        return ProjectCreated(name=req.name, path=proj.root, trigger=proj.trigger, purpose=proj.purpose)

    def import_paths(self, proj, sources, *, folder, repeats, resolution, recursive=False) -> Dict[str, Any]:
        from .prep.preprocess import PreprocessOptions
        from .prep.project import import_images
        try:
            if folder is not None:
                check_name(folder, "folder")
            result = import_images(proj, sources, name=folder, repeats=repeats, recursive=recursive,
                                   options=PreprocessOptions(resolution=resolution, workers=1))
        except LoraTrainError as exc:
            raise _fail(exc) from None
        return _import_summary(result)

    def upload(self, proj, files: List[tuple], *, folder, repeats, resolution) -> Dict[str, Any]:
        scratch = os.path.join(proj.root, ".uploads", uuid.uuid4().hex)
        os.makedirs(scratch)
        try:
            paths, seen = [], set()
            for name, data in files:
                try:
                    path = child_path(scratch, name, "file name", existing=seen)
                except ConfigError as exc:
                    raise _fail(exc) from None
                if name in seen:
                    raise HTTPException(400, f"file name: '{name}' is uploaded twice")
                seen.add(name)
                with open(path, "wb") as fh:
                    fh.write(data)
                paths.append(path)
            if not paths:
                raise HTTPException(400, "files: no file in the upload")
            # the folder, not the file list: an import of a folder takes caption files as captions of their
            # images (a list would be taken as images, and the report would call the captions "skipped")
            return self.import_paths(proj, scratch, folder=folder, repeats=repeats, resolution=resolution)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def tag_dataset(self, proj):
        from .prep.tags import TagDataset
        return TagDataset(proj.root)

    def rel(self, proj, path: str) -> str:
        return os.path.relpath(path, proj.train_dir).replace(os.sep, "/")

    def resolve_image(self, proj, image: Optional[str]) -> str:
        if not image:
            raise HTTPException(400, "image: an image path relative to the project's img/ folder is required")
        parts = image.split("/")
        if len(parts) > 2 or any(_bad_part(p) for p in parts):
            raise HTTPException(400, f"image: '{image}' is not <folder>/<file> or <file> inside img/")
        path = os.path.join(proj.train_dir, *parts)
        if not os.path.isfile(path):
            raise HTTPException(404, f"image: no '{image}' in {proj.train_dir}")
        return path


def _bad_part(part: str) -> bool:
    try:
        check_name(part, "image")
        return False
    except ConfigError:
        return True


def check_trigger(trigger: str) -> None:
    if any(ord(c) < 32 or c in ",\n" for c in trigger) or trigger != trigger.strip() or len(trigger) > 100:
        raise ConfigError(f"trigger: {trigger!r} must be one short tag (no commas, line breaks or control "
                          f"characters, no spaces around it)")


def _import_summary(result) -> Dict[str, Any]:
    d = result.to_dict()
    pre = d["preprocess"]
    return {"folder": os.path.basename(d["folder"]), "written": pre["written"], "skipped": pre["skipped"],
            "problems": [{"file": os.path.basename(i["source"]), "reason": i["reason"]}
                         for i in pre["items"] if i["status"] != "ok"],
            "suggestion": d["suggestion"]}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (also without Content-Length)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_FILENAME = re.compile(r';\s*filename=(?:"((?:[^"\\\r\n]|\\.)*)"|([^;"\s]+))\s*(?:;|$)', re.IGNORECASE)
_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def _part_filename(head: bytes) -> Optional[str]:
    """The file name of one part exactly as sent, or None for a plain form field. Parsed here rather than by
    the email module, whose get_filename strips spaces and repairs broken quotes (both map one name onto
    another) and whose header decoding replaces non-ASCII bytes."""
    try:
        lines = head.decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        raise HTTPException(400, "file name: the part's headers are not UTF-8") from None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        m = _FILENAME.search(value)
        if m is None:
            if "filename" in value.lower():
                raise HTTPException(400, f"file name: cannot read it from {value[:200]!r}")
            return None
        return re.sub(r"\\(.)", r"\1", m.group(1)) if m.group(1) is not None else m.group(2)
    raise HTTPException(400, "files: a part has no Content-Disposition header")


def parse_upload(content_type: str, body: bytes, filename: Optional[str]) -> List[tuple]:
    """(file name, bytes) of each file part of a multipart/form-data body, or of a raw body named by ?filename."""
    if content_type.lower().startswith("multipart/form-data"):
        m = _BOUNDARY.search(content_type)
        if m is None:
            raise HTTPException(400, "files: the multipart Content-Type has no boundary")
        delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
        chunks = body.split(delimiter)
        if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
            raise HTTPException(400, "files: the multipart body is cut short or malformed")
        files = []
        for chunk in chunks[1:-1]:
            if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n") or b"\r\n\r\n" not in chunk:
                raise HTTPException(400, "files: a multipart part is malformed")
            head, _, data = chunk[2:-2].partition(b"\r\n\r\n")
            name = _part_filename(head)
            if name is not None:
                files.append((name, data))
        if len(files) > MAX_UPLOAD_FILES:
            raise HTTPException(413, f"files: {len(files)} files in one upload; the limit is {MAX_UPLOAD_FILES}")
        return files
    if filename is None:
        raise HTTPException(415, "send multipart/form-data with file parts, or the raw file with ?filename=NAME")
    return [(filename, body)]


def limit_json_body(request: Request) -> None:
    """Router dependency: a declared body over MAX_JSON_BYTES is refused before it is read (uploads excepted)."""
    declared = request.headers.get("content-length")
    if request.url.path.endswith("/images"):
        return
    if declared and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise HTTPException(413, f"the request body is {int(declared)} bytes; the limit is {MAX_JSON_BYTES}")


TAG = "LoRA training"


def _errors(*codes: int) -> Dict[int, Dict[str, Any]]:
    text = {400: "Bad request (the field is named)", 404: "Not found", 409: "Conflict", 413: "Body too large"}
    return {c: {"description": text[c]} for c in codes}


def build_workflow_router(jobs: Any, dependencies: List[Any]) -> APIRouter:
    wf = Workflow(jobs)
    router = APIRouter(dependencies=dependencies, tags=[TAG])

    @router.post("/projects", response_model=ProjectCreated, status_code=201, summary="Create a project",
                 responses=_errors(400, 409))
    def post_project(req: ProjectCreate) -> ProjectCreated:
        """A new dataset project with its trigger word and purpose; the name must be a plain folder name (never
        cleaned up: names that differ from an existing one only by case or look-alike characters are refused)."""
        return wf.create(req)

    @router.post("/projects/{project}/images", summary="Upload images", responses=_errors(400, 404, 413),
                 openapi_extra={"requestBody": {"content": {
                     "multipart/form-data": {"schema": {"type": "object", "properties": {"files": {
                         "type": "array", "items": {"type": "string", "format": "binary"}}}}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def post_images(project: str, request: Request,
                          folder: Optional[str] = Query(None, description="Concept name of the training folder"),
                          repeats: Optional[int] = Query(None, ge=1, le=1000, description="Repeats per epoch"),
                          resolution: int = Query(512, description="Preprocess size, a multiple of 64"),
                          filename: Optional[str] = Query(None, description="Raw upload: the file's name")
                          ) -> Dict[str, Any]:
        """multipart/form-data with one or more file parts (captions `name.txt` may come along), or one raw file
        with ?filename=. Checked, kept as byte copies in source/, preprocessed into img/<repeats>_<folder>."""
        proj = wf.project(project)
        body = await read_body(request, MAX_UPLOAD_BYTES)
        files = parse_upload(request.headers.get("content-type", ""), body, filename)
        return wf.upload(proj, files, folder=folder, repeats=repeats, resolution=resolution)

    @router.post("/projects/{project}/import", summary="Import a folder", responses=_errors(400, 404))
    def post_import(project: str, req: FolderImport) -> Dict[str, Any]:
        """Import images from a folder inside the host's folders (originals are only read)."""
        proj = wf.project(project)
        path = wf.inside_roots(req.path, "path")
        return wf.import_paths(proj, path, folder=req.folder, repeats=req.repeats, resolution=req.resolution,
                               recursive=req.recursive)

    @router.post("/projects/{project}/check", summary="Check the dataset", responses=_errors(400, 404))
    def post_check(project: str) -> Dict[str, Any]:
        """The check report of the project's training (and regularisation) images: every problem with its file."""
        from .prep.check import check_dataset
        proj = wf.project(project)
        reg = proj.reg_dir if proj.folders(reg=True) else None
        try:
            return check_dataset(proj.train_dir, reg, purpose=proj.purpose, workers=1).to_dict()
        except LoraTrainError as exc:
            raise _fail(exc) from None

    @router.post("/projects/{project}/preprocess", summary="Preprocess again", responses=_errors(400, 404))
    def post_preprocess(project: str, req: PreprocessRequest) -> Dict[str, Any]:
        """Preprocess the project's source copies again with these options (edited captions are kept; the old
        images are moved aside, never deleted)."""
        from .prep.preprocess import PreprocessOptions
        from .ui.reprocess import reprocess_project
        proj = wf.project(project)
        try:
            opts = PreprocessOptions(resolution=req.resolution, mode=req.mode, background=req.background,
                                     flip=req.flip, format=req.format, workers=1)
            opts.validate()
            results = reprocess_project(proj, opts)
        except LoraTrainError as exc:
            raise _fail(exc) from None
        return {"folders": [{"folder": os.path.basename(r.folder), "written": r.written, "skipped": r.skipped,
                             "kept_captions": r.kept_captions, "note": r.note} for r in results]}

    @router.post("/projects/{project}/autotag", summary="Auto-tag", responses=_errors(400, 404))
    def post_autotag(project: str, req: AutotagRequest) -> Dict[str, Any]:
        """Write captions with a tagger; the whole run is one undo level of the tag editor."""
        from .prep.autotag import TagOptions, tag_images
        from .prep.taggers import make_tagger
        proj = wf.project(project)
        model = wf.inside_roots(req.model, "model") if req.model else None
        csv = wf.inside_roots(req.tags_csv, "tags_csv") if req.tags_csv else None
        try:
            tagger = make_tagger(req.tagger, host=wf.host.taggers(), model=model, tags_csv=csv,
                                 threshold=req.threshold)
            result = tag_images(proj.root, tagger, TagOptions(existing=req.existing, max_tags=req.max_tags))
        except LoraTrainError as exc:
            raise _fail(exc) from None
        return {"tagger": result.tagger, "written": sum(i.status == "written" for i in result.items),
                "skipped": [{"image": wf.rel(proj, i.image), "reason": i.reason} for i in result.items
                            if i.status == "skipped"], "undo_level": result.level}

    @router.get("/projects/{project}/captions", response_model=List[CaptionInfo], summary="List captions",
                responses=_errors(400, 404))
    def get_captions(project: str) -> List[CaptionInfo]:
        """Every training image of the project with its caption."""
        proj = wf.project(project)
        ds = wf.tag_dataset(proj)
        return [CaptionInfo(image=wf.rel(proj, c.image), caption=", ".join(c.tags), tags=list(c.tags))
                for c in ds.captions()]

    @router.get("/projects/{project}/caption", response_model=CaptionInfo, summary="Read one caption",
                responses=_errors(400, 404))
    def get_caption(project: str, image: str = Query(..., description="Image path relative to img/")
                    ) -> CaptionInfo:
        """The caption of one training image (`folder/file` relative to the project's img/)."""
        proj = wf.project(project)
        path = wf.resolve_image(proj, image)
        (cap,) = wf.tag_dataset(proj).captions(images=[path])
        return CaptionInfo(image=wf.rel(proj, path), caption=", ".join(cap.tags), tags=list(cap.tags))

    @router.post("/projects/{project}/tags", summary="Edit tags", responses=_errors(400, 404))
    def post_tags(project: str, req: TagEdit) -> Dict[str, Any]:
        """One tag-editor operation on every caption of the project (write: one image); each is one undo level."""
        proj = wf.project(project)
        ds = wf.tag_dataset(proj)
        try:
            if req.op == "remove":
                res = ds.remove(_need(req.tags, "tags"))
            elif req.op == "add":
                res = ds.add(_need(req.tags, "tags"))
            elif req.op == "trigger":
                res = ds.set_trigger(", ".join(_need(req.tags, "tags")))
            elif req.op == "replace":
                res = ds.replace(_need(req.old, "old"), req.new or "", regex=req.regex)
            elif req.op == "write":
                res = ds.write(wf.resolve_image(proj, req.image), _need(req.caption, "caption"))
            elif req.op == "undo":
                res = ds.undo()
            else:
                raise HTTPException(400, f"op: {req.op!r} is not one of remove, replace, trigger, add, write, undo")
        except (ConfigError, DataError) as exc:
            raise _fail(exc) from None
        if hasattr(res, "to_dict"):
            return res.to_dict()
        return {"undone": res.level.description if res.level is not None else None, "restored": len(res.restored),
                "conflicts": [wf.rel(proj, c) for c in res.conflicts]}

    from .api_regimages import add_reg_images_route
    add_reg_images_route(router, wf, Strict, _errors, _fail)   # POST /projects/{project}/reg-images
    return router


def _need(value: Any, field: str) -> Any:
    if value in (None, "", []):
        raise HTTPException(400, f"{field}: required for this op")
    return value
