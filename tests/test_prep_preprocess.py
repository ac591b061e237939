"""Preprocessing: sizes per mode, flattening, rotation, flips and captions, determinism across workers, focal
crops (built-in saliency and the host hook), and bad files skipped with originals unchanged."""
import hashlib
import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_lora_train.errors import ConfigError
from lib_lora_train.prep.corpus import picture, write_odd_files
from lib_lora_train.prep.crop import bucket_geometry, focal_offset
from lib_lora_train.prep.preprocess import PreprocessOptions, preprocess


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_bucket_mode_keeps_aspect_downscales_only_and_uses_multiples_of_64(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save(picture(1, (1000, 700)), src / "wide.png")
    save(picture(2, (600, 1200)), src / "tall.png")
    save(picture(3, (300, 200)), src / "small.png")
    res = preprocess(str(src), str(tmp_path / "out"), PreprocessOptions(resolution=512, workers=1))
    sizes = {os.path.basename(it.source): it.size for it in res.items}
    assert sizes == {"wide.png": (512, 320), "tall.png": (256, 512), "small.png": (256, 192)}
    for it in res.items:
        with Image.open(it.outputs[0]) as im:
            assert im.size == it.size and im.mode == "RGB"
            assert im.size[0] % 64 == 0 and im.size[1] % 64 == 0 and max(im.size) <= 512
    assert bucket_geometry(1000, 700, 768) == ((768, 538), (768, 512))


def test_center_crop_square_and_chosen_size(tmp_path):
    img = Image.new("RGB", (800, 400), "white")
    ImageDraw.Draw(img).rectangle((0, 0, 199, 399), fill="red")  # left quarter red
    src = save(img, tmp_path / "a.png")
    res = preprocess([src], str(tmp_path / "sq"), PreprocessOptions(mode="center", resolution=256, workers=1))
    with Image.open(res.items[0].outputs[0]) as out:
        assert out.size == (256, 256)
        assert out.getpixel((0, 128)) == (255, 255, 255)  # the red left edge was cropped away (centre crop)
    res = preprocess([src], str(tmp_path / "rect"), PreprocessOptions(mode="center", size=(512, 256), workers=1))
    assert res.items[0].size == (512, 256)


def test_transparency_flattened_on_chosen_background(tmp_path):
    rgba = Image.new("RGBA", (320, 320), (0, 0, 255, 0))  # transparent "blue"
    ImageDraw.Draw(rgba).rectangle((100, 100, 220, 220), fill=(255, 0, 0, 255))
    src = save(rgba, tmp_path / "t.png")
    for bg, colour in (("white", (255, 255, 255)), ("black", (0, 0, 0))):
        res = preprocess([src], str(tmp_path / bg), PreprocessOptions(background=bg, workers=1))
        with Image.open(res.items[0].outputs[0]) as out:
            assert out.getpixel((5, 5)) == colour
            assert out.getpixel((160, 160)) == (255, 0, 0)
        assert any("flattened" in n for n in res.items[0].notes)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(img).rectangle((0, 0, 40, 300), fill="black")  # black stripe on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    src = save(img, tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    res = preprocess([src], str(tmp_path / "out"), PreprocessOptions(workers=1))
    with Image.open(res.items[0].outputs[0]) as out:
        assert out.size[1] > out.size[0]               # portrait as displayed
        top = np.asarray(out.convert("L"))[:10].mean()
        assert top < 60                                # the stripe is now at the top


def test_flip_copies_and_captions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save(picture(5, (320, 320)), src / "a.png")
    (src / "a.txt").write_text("sks, smile", encoding="utf-8")
    res = preprocess(str(src), str(tmp_path / "out"), PreprocessOptions(flip=True, workers=1))
    main, flipped = res.items[0].outputs
    assert os.path.basename(flipped) == "a_flip.png"
    with Image.open(main) as a, Image.open(flipped) as b:
        assert np.array_equal(np.asarray(a)[:, ::-1], np.asarray(b))
    for p in (main, flipped):
        assert open(os.path.splitext(p)[0] + ".txt", encoding="utf-8").read() == "sks, smile"


def test_deterministic_across_worker_counts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        save(picture(i, (500 + 40 * i, 420)), src / f"{i}.jpg", quality=90)
    outs = {}
    for w in (1, 2):
        res = preprocess(str(src), str(tmp_path / f"w{w}"), PreprocessOptions(mode="focal", flip=True, workers=w))
        outs[w] = {os.path.basename(p): sha(p) for p in res.written}
    assert outs[1] == outs[2] and len(outs[1]) == 12


def test_bad_files_skipped_named_and_originals_unchanged(tmp_path):
    src = tmp_path / "odd"
    expect = write_odd_files(str(src))
    before = {p: sha(p) for p in expect}
    res = preprocess(str(src), str(tmp_path / "out"), PreprocessOptions(workers=2))
    skipped = {os.path.basename(it.source): it.code for it in res.skipped}
    assert skipped == {"empty.png": "empty_file", "text.jpg": "not_image", "truncated.jpg": "truncated",
                       "truncated.png": "truncated", "corrupt.png": "unreadable", "huge.png": "too_large",
                       "bomb.png": "decompression_bomb", "notes.pdf": "not_image"}
    assert all(it.reason for it in res.skipped)
    ok = [it for it in res.items if it.status == "ok"]
    assert len(ok) == 13 and all(os.path.isfile(it.outputs[0]) for it in ok)
    assert {p: sha(p) for p in expect} == before
    by_name = {os.path.basename(it.source): it for it in res.items}
    with Image.open(by_name["deep16.png"].outputs[0]) as out:  # 16-bit scaled, not clipped to white
        assert 30 < np.asarray(out).mean() < 225
    assert any("not UTF-8" in n for n in by_name["latin1.png"].notes)
    lines = [ln for ln in res.summary_text().splitlines() if ln.startswith("  skipped ")]
    assert sorted(os.path.basename(ln.split(":")[0].split()[-1]) for ln in lines) == sorted(skipped)


def test_output_folder_must_differ_from_source(tmp_path):
    save(picture(1), tmp_path / "a.png")
    with pytest.raises(ConfigError, match="originals are never overwritten"):
        preprocess(str(tmp_path), str(tmp_path), PreprocessOptions(workers=1))


@pytest.mark.parametrize("bad", [dict(resolution=500), dict(resolution=0), dict(mode="smart"),
                                 dict(background="green"), dict(format="gif"), dict(quality=0),
                                 dict(size=(512, 500)), dict(workers=0)])
def test_option_validation(bad):
    with pytest.raises(ConfigError):
        PreprocessOptions(**bad).validate()


def _subject_right(size=(1024, 512)):
    img = Image.new("RGB", size, (250, 250, 250))
    d = ImageDraw.Draw(img)
    for k in range(30):  # a busy, colourful subject in the right quarter
        x = 800 + (k * 37) % 180
        y = 150 + (k * 53) % 200
        d.ellipse((x, y, x + 40, y + 40), fill=((k * 70) % 256, (k * 130) % 256, (k * 200) % 256))
    return img


def test_focal_crop_keeps_the_subject(tmp_path):
    img = _subject_right()
    left, top = focal_offset(img, (512, 512))
    assert top == 0 and left >= 400  # centre would be 256 and cut the subject
    src = save(img, tmp_path / "s.png")
    res = preprocess([src], str(tmp_path / "out"), PreprocessOptions(mode="focal", resolution=512, workers=1))
    with Image.open(res.items[0].outputs[0]) as out:
        right = np.asarray(out)[:, 300:]
        assert (right < 200).any()  # subject pixels are in the crop
    # a plain image is cropped in the centre
    assert focal_offset(Image.new("RGB", (900, 300), "white"), (300, 300)) == (300, 0)


def test_focal_host_hook(tmp_path):
    src = save(_subject_right(), tmp_path / "s.png")
    seen = []

    def corner(image, target):           # a closure: does not pickle, so it runs in this process
        seen.append((image.size, target))
        return (0, 0)
    res = preprocess([src], str(tmp_path / "a"), PreprocessOptions(mode="focal", focal_hook=corner, workers=2))
    assert seen == [((1024, 512), (512, 512))] and res.workers == 1
    with Image.open(res.items[0].outputs[0]) as out, Image.open(src) as orig:
        assert np.array_equal(np.asarray(out), np.asarray(orig.convert("RGB").crop((0, 0, 512, 512))))

    res = preprocess([src], str(tmp_path / "b"), PreprocessOptions(
        mode="focal", focal_hook=lambda im, t: im.crop((100, 0, 100 + t[0], t[1])), workers=1))
    assert res.items[0].status == "ok"
    res = preprocess([src], str(tmp_path / "c"), PreprocessOptions(
        mode="focal", focal_hook=lambda im, t: im.resize((10, 10)), workers=1))
    assert res.items[0].status == "skipped" and res.items[0].code == "focal_crop"


def test_formats_quality_and_stop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        save(picture(i, (512, 512)), src / f"{i}.png")
    hi = preprocess(str(src), str(tmp_path / "hi"), PreprocessOptions(format="jpg", quality=95, workers=1))
    lo = preprocess(str(src), str(tmp_path / "lo"), PreprocessOptions(format="jpg", quality=20, workers=1))
    assert all(p.endswith(".jpg") for p in hi.written)
    assert sum(os.path.getsize(p) for p in lo.written) < sum(os.path.getsize(p) for p in hi.written)
    webp = preprocess(str(src), str(tmp_path / "webp"), PreprocessOptions(format="webp", workers=1))
    with Image.open(webp.written[0]) as im:
        assert im.format == "WEBP"
    stop = threading.Event()
    stop.set()
    res = preprocess(str(src), str(tmp_path / "stopped"), PreprocessOptions(workers=1), stop=stop)
    assert not res.written and all(it.reason.startswith("stopped") for it in res.items)


def test_recursive_names_and_progress(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    save(picture(1), src / "a.png")
    save(picture(2), src / "sub" / "a.png")
    save(picture(3), src / "a.jpg")
    calls = []
    res = preprocess(str(src), str(tmp_path / "out"), PreprocessOptions(workers=1), recursive=True,
                     progress=lambda done, total, item: calls.append((done, total)))
    names = sorted(os.path.basename(p) for p in res.written)
    assert names == ["a-2.png", "a.png", "sub_a.png"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    flat = preprocess(str(src), str(tmp_path / "flat"), PreprocessOptions(workers=1))
    assert len(flat.items) == 2


def test_existing_files_in_the_output_folder_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's own file")
    (out / "b.txt").write_text("the user's own caption")
    src1, src2 = tmp_path / "s1", tmp_path / "s2"
    src1.mkdir()
    src2.mkdir()
    save(picture(1), src1 / "a.png")
    save(picture(2), src1 / "b.png")
    save(picture(3), src2 / "b.png")
    first = preprocess(str(src1), str(out), PreprocessOptions(workers=1))
    assert sorted(os.path.basename(p) for p in first.written) == ["a-2.png", "b-2.png"]
    assert (out / "a.png").read_bytes() == b"the user's own file"
    again = preprocess(str(src1), str(out), PreprocessOptions(workers=1))     # a re-run replaces its own outputs
    assert sorted(again.written) == sorted(first.written)
    other = preprocess(str(src2), str(out), PreprocessOptions(workers=1))     # another b.png gets its own name
    assert [os.path.basename(p) for p in other.written] == ["b-3.png"]
    assert (out / "b.txt").read_text() == "the user's own caption"


def test_saliency_prefers_skin_tones():
    from lib_lora_train.prep.crop import saliency_map
    img = Image.new("RGB", (600, 200), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 40, 160, 160), fill=(224, 172, 140))            # a skin-toned "face" on the left
    lum = int(0.299 * 224 + 0.587 * 172 + 0.114 * 140)
    d.ellipse((440, 40, 560, 160), fill=(lum, lum, lum))          # a grey disc of the same brightness
    sal = saliency_map(img)
    half = sal.shape[1] // 2
    assert sal[:, :half].sum() > 1.3 * sal[:, half:].sum()
    left, _ = focal_offset(img, (200, 200))
    assert left < 100
