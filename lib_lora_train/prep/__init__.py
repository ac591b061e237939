"""Dataset preparation: project folders and import, the check ("lint"), preprocessing, auto-tagging, the tag
editor with an on-disk undo history, repeats and regularisation folders. Library functions; the CLI
subcommands are in `prep.cli`, the WebUI tab puts them on screen.

Importing this package does not import onnxruntime (only the WD14 tagger does, when used).
"""
from .autotag import TagOptions, TagRunResult, format_tags, tag_images
from .check import check_dataset, find_near_duplicates, lint_files
from .crop import FocalHook, focal_offset, saliency_map
from .history import History, UndoResult
from .imageio import DEFAULT_MAX_PIXELS, MIN_SHORT_SIDE, ImageProblem
from .preprocess import PreprocessItem, PreprocessOptions, PreprocessResult, preprocess
from .project import (ImportResult, Project, add_reg_images, check_path, create_project, import_images,
                      is_project, open_project)
from .repeats import (DatasetSummary, RepeatSuggestion, dataset_summary, folder_name, rename_repeats,
                      suggest_repeats)
from .report import CheckReport, FileReport, Issue
from .taggers import (BlipTagger, DeepBooruTagger, HostTaggers, NoTagger, StubHostTaggers, Tagger, WD14Tagger,
                      make_tagger)
from .tags import EditResult, TagDataset, TagFilter, split_tags, tag_key

__all__ = [
    "TagOptions", "TagRunResult", "format_tags", "tag_images",
    "check_dataset", "check_path", "find_near_duplicates", "lint_files",
    "FocalHook", "focal_offset", "saliency_map",
    "History", "UndoResult",
    "DEFAULT_MAX_PIXELS", "MIN_SHORT_SIDE", "ImageProblem",
    "PreprocessItem", "PreprocessOptions", "PreprocessResult", "preprocess",
    "ImportResult", "Project", "add_reg_images", "create_project", "import_images", "is_project", "open_project",
    "DatasetSummary", "RepeatSuggestion", "dataset_summary", "folder_name", "rename_repeats", "suggest_repeats",
    "CheckReport", "FileReport", "Issue",
    "BlipTagger", "DeepBooruTagger", "HostTaggers", "NoTagger", "StubHostTaggers", "Tagger", "WD14Tagger",
    "make_tagger",
    "EditResult", "TagDataset", "TagFilter", "split_tags", "tag_key",
]
