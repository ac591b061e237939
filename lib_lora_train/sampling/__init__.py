"""Preview sampling (DPM++ 2M Karras by default), sd-scripts prompt files, labelled grids."""
from .grid import make_grid, save_png_with_text
from .prompts import PromptSpec, parse_prompt_line, read_prompt_file

__all__ = ["PromptSpec", "parse_prompt_line", "read_prompt_file", "make_grid", "save_png_with_text", "generate"]


def __getattr__(name):
    # the pipeline imports diffusers; load it only when asked for
    if name == "generate":
        from .pipeline import generate

        return generate
    raise AttributeError(name)
