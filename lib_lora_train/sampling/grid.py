"""Labelled image grids (e.g. prompts x before/after) and PNG writing with infotext."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..fsutil import atomic_write

MIN_CELL = 192        # small previews (64 px) are enlarged to at least this, with NEAREST so pixels stay sharp
PAD = 8
LINE_GAP = 3
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Where things are in a grid made by make_grid (pixel coordinates)."""
    cell_w: int
    cell_h: int
    left: int          # x of the first column (width of the row-label column)
    top: int           # y of the first row (title + column-label height)
    rows: int
    cols: int
    width: int
    height: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.left + col * (self.cell_w + PAD)
        y = self.top + row * (self.cell_h + PAD)
        return x, y, x + self.cell_w, y + self.cell_h


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_w: int) -> list[str]:
    """Greedy word wrap to `max_w` pixels (a single over-long word is cut by characters)."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        cur = ""
        for word in para.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if _text_size(draw, cand, font)[0] <= max_w:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = word
            while _text_size(draw, cur, font)[0] > max_w and len(cur) > 1:
                cut = len(cur) - 1
                while cut > 1 and _text_size(draw, cur[:cut], font)[0] > max_w:
                    cut -= 1
                lines.append(cur[:cut])
                cur = cur[cut:]
        lines.append(cur)
    return lines


def _block_height(draw, lines: list[str], font) -> int:
    if not lines:
        return 0
    h = _text_size(draw, "Ag", font)[1]
    return len(lines) * h + (len(lines) - 1) * LINE_GAP


def _draw_lines(draw, xy: tuple[int, int], lines: list[str], font, center_w: int | None = None) -> None:
    x, y = xy
    h = _text_size(draw, "Ag", font)[1]
    for line in lines:
        dx = 0 if center_w is None else max(0, (center_w - _text_size(draw, line, font)[0]) // 2)
        draw.text((x + dx, y), line, fill=INK, font=font)
        y += h + LINE_GAP


def make_grid(images: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, title: str | None = None, *,
              min_cell: int = MIN_CELL, return_layout: bool = False):
    """A grid of `images[row][col]` with row labels on the left, column labels on top and an optional title.

    Cells take the size of the largest image, enlarged by an integer factor (NEAREST) up to at least
    `min_cell` pixels so that 64 px previews stay visible. Returns the image, or (image, GridLayout).
    """
    rows = len(images)
    cols = max((len(r) for r in images), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("make_grid needs at least one image")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {rows} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"make_grid: {len(col_labels)} column labels for {cols} columns")

    src_w = max(im.width for r in images for im in r)
    src_h = max(im.height for r in images for im in r)
    factor = max(1, -(-min_cell // max(src_w, src_h)))     # ceil division
    cell_w, cell_h = src_w * factor, src_h * factor

    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_lines = [_wrap(scratch, lab, font, max(cell_w, 96)) for lab in (row_labels or [])]
    left = PAD
    if row_lines:
        left += max(max((_text_size(scratch, ln, font)[0] for ln in lines), default=0) for lines in row_lines)
        left += PAD
    col_lines = [_wrap(scratch, lab, font, cell_w) for lab in (col_labels or [])]
    col_h = max((_block_height(scratch, lines, font) for lines in col_lines), default=0)
    width = left + cols * (cell_w + PAD)
    title_lines = _wrap(scratch, title, font, width - 2 * PAD) if title else []
    top = PAD
    if title_lines:
        top += _block_height(scratch, title_lines, font) + PAD
    if col_lines:
        top += col_h + PAD
    height = top + rows * (cell_h + PAD)
    layout = GridLayout(cell_w, cell_h, left, top, rows, cols, width, height)

    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_lines:
        _draw_lines(draw, (PAD, PAD), title_lines, font)
    for c, lines in enumerate(col_lines):
        x0, y0, _, _ = layout.cell_box(0, c)
        _draw_lines(draw, (x0, y0 - PAD - col_h), lines, font, center_w=cell_w)
    for r, row in enumerate(images):
        if r < len(row_lines):
            _, y0, _, _ = layout.cell_box(r, 0)
            y = y0 + max(0, (cell_h - _block_height(draw, row_lines[r], font)) // 2)
            _draw_lines(draw, (PAD, y), row_lines[r], font)
        for c, im in enumerate(row):
            x0, y0, _, _ = layout.cell_box(r, c)
            big = im.convert("RGB").resize((im.width * factor, im.height * factor), Image.NEAREST)
            grid.paste(big, (x0 + (cell_w - big.width) // 2, y0 + (cell_h - big.height) // 2))
    return (grid, layout) if return_layout else grid


def save_png_with_text(image: Image.Image, path: str | os.PathLike, text: Mapping[str, str]) -> Path:
    """Write a PNG with tEXt chunks (e.g. {"parameters": infotext}); atomic (temp file + rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for k, v in text.items():
        info.add_text(str(k), str(v))
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return out
