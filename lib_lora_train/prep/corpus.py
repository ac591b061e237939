"""Generated corpora of good, broken and odd files (and folder mistakes), for tests, benchmarks and demos.

Every builder returns what the check must say about each file: {path: set of issue codes}.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def picture(seed: int, size: tuple[int, int] = (320, 320), mode: str = "RGB") -> Image.Image:
    """A distinct picture (random shapes on a random background): no two seeds are near-duplicates."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img if mode == "RGB" else img.convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit grey) with almost no data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def write_good_images(folder: str, n: int, *, start_seed: int = 0, size: tuple[int, int] = (320, 320),
                      captions: bool = True, fmt: str = "png") -> list[str]:
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img{start_seed + i:03d}.{fmt}")
        _write(path, _encoded(picture(start_seed + i, size), "PNG" if fmt == "png" else "JPEG"))
        if captions:
            _write(os.path.splitext(path)[0] + ".txt", f"sks, tag{i % 3}, shape".encode())
        paths.append(path)
    return paths


def write_odd_files(folder: str) -> dict[str, set[str]]:
    """Every kind of broken or odd file the check knows, each with the codes it must get."""
    f = lambda name: os.path.join(folder, name)  # noqa: E731
    expect: dict[str, set[str]] = {}

    def put(name: str, data: bytes, codes: set[str]) -> None:
        expect[_write(f(name), data)] = codes

    base = picture(1000, (320, 320))
    put("empty.png", b"", {"empty_file"})
    put("text.jpg", b"this is not an image, just some text\n" * 10, {"not_image"})
    jpeg = _encoded(picture(1001, (320, 320)), "JPEG", quality=90)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], {"truncated"})
    png = _encoded(picture(1002, (320, 320)), "PNG")
    put("truncated.png", png[: len(png) // 2], {"truncated"})
    broken = bytearray(_encoded(picture(1003, (320, 320)), "PNG"))
    idat = broken.find(b"IDAT")
    for k in range(idat + 20, min(len(broken) - 20, idat + 400)):
        broken[k] ^= 0x5A   # garbage inside the compressed pixel data
    put("corrupt.png", bytes(broken), {"unreadable"})
    put("cmyk.jpg", _encoded(picture(1004, (320, 320)).convert("CMYK"), "JPEG"), {"unusual_mode"})
    put("palette.png", _encoded(picture(1005, (320, 320)).convert("P"), "PNG"), {"unusual_mode"})
    la = picture(1006, (320, 320)).convert("LA")
    put("grey_alpha.png", _encoded(la, "PNG"), {"unusual_mode"})
    arr16 = (np.asarray(picture(1007, (320, 320)).convert("L"), dtype=np.uint16) * 257)
    put("deep16.png", _encoded(Image.fromarray(arr16), "PNG"), {"unusual_mode"})
    rgba = picture(1008, (320, 320)).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, 160, 320), fill=0)
    rgba.putalpha(alpha)
    put("transparent.png", _encoded(rgba, "PNG"), {"transparency"})
    frames = [picture(1009 + k, (320, 320)) for k in range(3)]
    gif_frames = [picture(1020 + k, (320, 320)) for k in range(3)]
    put("animated.png", _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
        {"animated"})
    put("animated.gif", _encoded(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=100),
        {"animated", "not_training_format"})
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", _encoded(picture(1012, (400, 300)), "JPEG", exif=exif.tobytes()), {"exif_orientation"})
    put("small.png", _encoded(picture(1013, (120, 90)), "PNG"), {"too_small"})
    put("huge.png", png_header_only(12000, 8000), {"too_large"})
    put("bomb.png", png_header_only(40000, 40000), {"decompression_bomb"})
    put("dup_a.png", _encoded(base, "PNG"), {"near_duplicate"})
    put("dup_b.jpg", _encoded(base.resize((300, 300), Image.Resampling.LANCZOS), "JPEG", quality=85),
        {"near_duplicate"})
    # captions
    ok = picture(1014, (320, 320))
    put("captioned_empty.png", _encoded(ok, "PNG"), set())
    put("captioned_empty.txt", b"", {"caption_empty"})
    put("latin1.png", _encoded(picture(1015, (320, 320)), "PNG"), set())
    put("latin1.txt", "café, crème brûlée".encode("latin-1"), {"caption_not_utf8"})
    put("orphan.txt", b"sks, lonely caption", {"caption_orphan"})
    put("notes.pdf", b"%PDF-1.4 not really", {"ignored_file"})
    return expect


def write_layout_mistakes(root: str) -> dict[str, tuple[str, set[str]]]:
    """Training folders with one folder mistake each: {name: (train_data_dir, codes expected)}."""
    cases: dict[str, tuple[str, set[str]]] = {}
    # 1. pointing at the image folder itself
    d = os.path.join(root, "points_at_image_folder", "10_mychar")
    write_good_images(d, 3, start_seed=2000)
    cases["image_folder"] = (d, {"folder_is_image_folder"})
    # 2. a folder without a repeat prefix (and nothing else)
    d = os.path.join(root, "no_prefix")
    write_good_images(os.path.join(d, "mychar"), 3, start_seed=2010)
    cases["no_prefix"] = (d, {"folder_no_repeat_prefix"})
    # 3. a non-numeric prefix
    d = os.path.join(root, "non_numeric")
    write_good_images(os.path.join(d, "ten_mychar"), 3, start_seed=2020)
    cases["non_numeric"] = (d, {"folder_no_repeat_prefix"})
    # 4. repeats below 1
    d = os.path.join(root, "zero_repeats")
    write_good_images(os.path.join(d, "0_mychar"), 3, start_seed=2030)
    cases["zero_repeats"] = (d, {"folder_bad_repeats"})
    # 5. images lying in the parent, no subfolder at all
    d = os.path.join(root, "loose_images")
    write_good_images(d, 3, start_seed=2040)
    cases["loose_images"] = (d, {"images_in_parent"})
    # 6. a good folder plus loose images in the parent (a warning: they are not used)
    d = os.path.join(root, "good_plus_loose")
    write_good_images(os.path.join(d, "5_mychar"), 3, start_seed=2050)
    write_good_images(d, 2, start_seed=2060)
    cases["good_plus_loose"] = (d, {"images_in_parent"})
    # 7. a missing underscore: "10mychar"
    d = os.path.join(root, "no_underscore")
    write_good_images(os.path.join(d, "10mychar"), 3, start_seed=2070)
    cases["no_underscore"] = (d, {"folder_no_repeat_prefix"})
    return cases
