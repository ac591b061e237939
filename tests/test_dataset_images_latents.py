"""Image loading (EXIF, alpha, resize, crop, flip) and the latent cache (memory, disk, invalidation, flips)."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_lora_train.dataset import (DatasetParams, LatentCache, SubsetParams, TrainingData, list_images,
                                    load_image, load_image_tensor, read_image_size)
from lib_lora_train.errors import DataError

EXIF_ORIENTATION = 0x0112


def test_list_images_is_flat_sorted_and_case_insensitive(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "e.bmp", "f.gif", ".hidden.png", "g.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h.png").write_bytes(b"")
    assert [os.path.basename(p) for p in list_images(str(tmp_path))] == ["a.jpg", "b.PNG", "c.JPEG", "d.webp",
                                                                         "e.bmp"]


def test_exif_orientation_applies_to_header_size_and_pixels(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))          # left half blue
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6                       # stored sideways: shown rotated 90 degrees clockwise
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert read_image_size(str(tmp_path / "r.jpg")) == (20, 40)
    loaded = load_image(str(tmp_path / "r.jpg"))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 60             # the blue left half is now on top
    assert bottom[0] > 200 and bottom[2] < 60


def test_alpha_is_flattened_onto_white_and_tensor_range(tmp_path):
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (0, 0, 8, 16))
    img.save(tmp_path / "a.png")
    t = load_image_tensor(str(tmp_path / "a.png"), (16, 16), (16, 16), (0, 0))
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert torch.all(t[:, :, :8] == -1.0) and torch.all(t[:, :, 8:] == 1.0)


def test_resize_cover_crop_and_flip(tmp_path):
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 50))          # a blue strip at the far left gets cropped away
    img.save(tmp_path / "w.png")
    t = load_image_tensor(str(tmp_path / "w.png"), (128, 64), (64, 64), (32, 0))
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0], torch.ones(64, 64), atol=0.02) and torch.allclose(t[2], -torch.ones(64, 64),
                                                                                  atol=0.02)
    uncropped = load_image_tensor(str(tmp_path / "w.png"), (128, 64), (64, 64), (0, 0))
    assert uncropped[2, :, :5].mean() > 0.9          # the strip is inside a left crop
    flipped = load_image_tensor(str(tmp_path / "w.png"), (128, 64), (64, 64), (0, 0), flip=True)
    assert torch.equal(flipped, torch.flip(uncropped, dims=[2]))
    with pytest.raises(DataError, match="was 90x50"):
        load_image_tensor(str(tmp_path / "w.png"), (128, 64), (64, 64), (0, 0), expected_size=(90, 50))
    with pytest.raises(DataError, match="does not fit"):
        load_image_tensor(str(tmp_path / "w.png"), (128, 64), (64, 64), (80, 0))


def test_downscale_averages_area(tmp_path):
    stripes = Image.new("L", (64, 8))
    stripes.putdata([255 * (x % 2) for _ in range(8) for x in range(64)])
    stripes.convert("RGB").save(tmp_path / "s.png")
    t = load_image_tensor(str(tmp_path / "s.png"), (32, 4), (32, 4), (0, 0))
    assert torch.allclose(t, torch.zeros_like(t), atol=0.01)   # 1-px stripes average to grey, no aliasing


# ---------------------------------------------------------------- latent cache


class CountingVAE:
    """8x8 average pooling to 4 channels: deterministic, and mirroring the image mirrors the latent."""

    def __init__(self):
        self.calls, self.images, self.shapes = 0, 0, []

    def __call__(self, x):
        self.calls += 1
        self.images += x.shape[0]
        self.shapes.append(tuple(x.shape))
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def make_data(tmp_path, flip=False):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    sizes = [(64, 64), (70, 64), (64, 64), (150, 50)]   # the last goes to the 96x32 bucket
    for i, size in enumerate(sizes):
        img = Image.new("RGB", size, (40 * i, 255 - 40 * i, 90))
        img.paste((255, 255, 255), (0, 0, size[0] // 3, size[1]))
        img.save(folder / f"{i}.png")
    ds = DatasetParams(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                       bucket_reso_steps=32, subsets=[SubsetParams(image_dir=str(folder), flip_aug=flip)])
    return TrainingData([ds], seed=0), folder


def test_cache_in_memory_and_on_disk_is_reused_across_instances(tmp_path):
    data, folder = make_data(tmp_path)
    before = sorted(os.listdir(folder))
    buckets = sorted({it.bucket for it in data.items})
    assert len(buckets) == 2
    vae = CountingVAE()
    cache = LatentCache(vae, "vae-a", cache_dir=str(tmp_path / "cache"), batch_size=2)
    cache.prepare(data.items, flip_aug=False)
    assert vae.images == 4 and vae.calls == 3        # grouped by bucket: ceil(3/2) + 1
    assert sorted(vae.shapes) == [(1, 3, 32, 96), (1, 3, 64, 64), (2, 3, 64, 64)]
    assert cache.stats.as_dict() == {"memory_hits": 0, "disk_hits": 0, "encoded": 4}
    for it in data.items:
        lat = cache.get(it)
        assert lat.shape == (4, it.bucket[1] // 8, it.bucket[0] // 8)
    cache.prepare(data.items, flip_aug=False)
    assert vae.calls == 3 and cache.stats.memory_hits == 4
    assert sorted(os.listdir(folder)) == before                # nothing written beside the images
    assert len(os.listdir(tmp_path / "cache")) == 4

    vae2 = CountingVAE()
    again = LatentCache(vae2, "vae-a", cache_dir=str(tmp_path / "cache"))
    again.prepare(data.items, flip_aug=False)
    assert vae2.calls == 0 and again.stats.disk_hits == 4
    for it in data.items:
        assert torch.equal(again.get(it), cache.get(it))

    other_vae = LatentCache(CountingVAE(), "vae-b", cache_dir=str(tmp_path / "cache"))
    other_vae.prepare(data.items, flip_aug=False)
    assert other_vae.stats.encoded == 4                        # another VAE never reuses the files


def test_changed_image_is_encoded_again_and_broken_files_are_replaced(tmp_path):
    data, folder = make_data(tmp_path)
    LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "cache")).prepare(data.items, flip_aug=False)
    target = next(it for it in data.items if it.path.endswith("2.png"))
    st = os.stat(target.path)
    os.utime(target.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))   # same bytes, new mtime
    touched = LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "cache"))
    touched.prepare(data.items, flip_aug=False)
    assert touched.stats.encoded == 1 and touched.stats.disk_hits == 3
    Image.new("RGB", (64, 64), (0, 0, 0)).save(target.path)                      # new content
    vae = CountingVAE()
    cache = LatentCache(vae, "v", cache_dir=str(tmp_path / "cache"))
    cache.prepare(data.items, flip_aug=False)
    assert vae.images == 1 and cache.stats.disk_hits == 3
    assert torch.allclose(cache.get(target), torch.full_like(cache.get(target), -1.0))
    victim = next(it for it in data.items if it.path.endswith("0.png"))
    with open(os.path.join(tmp_path / "cache", cache.cache_name(victim)), "wb") as fh:
        fh.write(b"truncated")
    fresh = LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "cache"))
    fresh.prepare(data.items, flip_aug=False)
    assert fresh.stats.encoded == 1 and fresh.stats.disk_hits == 3


def test_flip_aug_caches_the_mirrored_latent_too(tmp_path):
    data, _ = make_data(tmp_path, flip=True)
    vae = CountingVAE()
    cache = LatentCache(vae, "v", cache_dir=str(tmp_path / "cache"), batch_size=4)
    cache.prepare(data.items, flip_aug=None)                   # None: each subset's flip_aug
    assert cache.stats.encoded == 4 and vae.images == 8
    for it in data.items:
        normal, mirrored = cache.get(it), cache.get(it, flipped=True)
        assert torch.allclose(mirrored, torch.flip(normal, dims=[2]), atol=1e-6)
        assert not torch.allclose(mirrored, normal)
    no_flip = LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "nf"))
    no_flip.prepare(data.items, flip_aug=False)
    with pytest.raises(DataError, match="mirrored"):
        no_flip.get(data.items[0], flipped=True)
    # a file without the mirrored latent does not satisfy a flip_aug run
    upgrade = LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "nf"))
    upgrade.prepare(data.items, flip_aug=True)
    assert upgrade.stats.encoded == 4 and upgrade.stats.disk_hits == 0
    reuse = LatentCache(CountingVAE(), "v", cache_dir=str(tmp_path / "nf"))
    reuse.prepare(data.items, flip_aug=True)
    assert reuse.stats.disk_hits == 4


def test_memory_only_cache_and_errors(tmp_path):
    data, _ = make_data(tmp_path)
    cache = LatentCache(CountingVAE(), "v")
    with pytest.raises(DataError, match="prepare"):
        cache.get(data.items[0])
    cache.prepare(data.items, flip_aug=False)
    assert len(cache) == 4 and data.items[0] in cache and not (tmp_path / "cache").exists()
    bad = LatentCache(lambda x: torch.full((x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8), float("nan")), "v")
    with pytest.raises(Exception, match="NaN"):
        bad.prepare(data.items[:1], flip_aug=False)
