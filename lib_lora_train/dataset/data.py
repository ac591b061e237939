"""TrainingData: the scanned dataset, its buckets, the batches of each epoch and the summary for metadata.

Follows sd-scripts' `DreamBoothDataset` + `BaseDataset.make_buckets`: repeats, regularization balancing, one
bucket per batch, `ceil(count / batch_size)` batches per bucket. Batch order is drawn from (seed, epoch) only.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from ..errors import DataError
from .buckets import BucketAssigner, adjust_bucket_limits
from .captions import count_tags, read_caption
from .config import DatasetParams, SubsetParams, check_dataset_params
from .images import IMAGE_EXTENSIONS, list_images, read_image_size

logger = logging.getLogger(__name__)

SizeReader = Callable[[str], tuple[int, int]]


@dataclass(eq=False)
class ImageItem:
    """One image of one subset (repeats are not separate items; each repeat is a separate sample)."""
    path: str
    caption: str                   # raw caption (file, else class tokens, else "")
    subset_index: int
    dataset_index: int
    is_reg: bool
    num_repeats: int               # after regularization balancing
    original_size: tuple[int, int]
    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    crop: tuple[int, int]          # (left, top) in the resized image
    resize_interpolation: str | None
    subset: SubsetParams = field(repr=False)
    loss_weight: float = 1.0       # prior_loss_weight for reg images, set by set_prior_loss_weight

    @property
    def key(self) -> tuple:
        return (self.path, self.bucket, self.resized_size, self.crop, self.resize_interpolation)


class Sample(NamedTuple):
    item: ImageItem
    flipped: bool


@dataclass
class Batch:
    dataset_index: int
    bucket: tuple[int, int]
    samples: list[Sample]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from (seed, purpose, epoch, ...): stable across runs and Python versions."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class _DatasetState:
    params: DatasetParams
    items: list[ImageItem]
    validation: list[ImageItem]
    subset_counts: list[int | None]   # images per subset after the split (None = subset skipped)
    num_train_images: int
    num_reg_images: int
    num_validation_images: int
    bucket_counts: dict[tuple[int, int], int]
    mean_ar_error: float
    tag_frequency: dict[str, dict[str, int]]
    min_bucket_reso: int | None
    max_bucket_reso: int | None


@dataclass
class _Entry:
    subset_index: int
    path: str
    caption: str
    repeats: int


def _split_validation(paths: list[str], split: float, seed: int) -> tuple[list[str], list[str]]:
    """sd-scripts' split: shuffle with the validation seed, the first ceil(n*(1-split)) train; here the rest
    is validation, so the two never overlap."""
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    cut = math.ceil(len(shuffled) * (1 - split))
    return shuffled[:cut], shuffled[cut:]


class TrainingData:
    def __init__(self, datasets: Sequence[DatasetParams], seed: int, *, size_reader: SizeReader | None = None):
        if not datasets:
            raise DataError("no datasets given")
        self.datasets = list(datasets)
        self.seed = int(seed)
        self.warnings: list[str] = []
        self._read_size = size_reader or read_image_size
        self._sizes: dict[str, tuple[int, int]] = {}
        for ds in self.datasets:
            for msg in ds.warnings:
                self.warnings.append(msg)
        self._states = [self._scan(i, ds) for i, ds in enumerate(self.datasets)]
        self.items: list[ImageItem] = [it for st in self._states for it in st.items]
        if not self.items:
            exts = " ".join(IMAGE_EXTENSIONS)
            raise DataError(f"No data found: none of the image folders contains images ({exts}). In folder mode "
                            f"train_data_dir must be the parent of folders with images, named like 10_mychar")

    # ------------------------------------------------------------ scanning
    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        logger.warning(msg)

    def _size(self, path: str) -> tuple[int, int]:
        if path not in self._sizes:
            self._sizes[path] = tuple(self._read_size(path))  # type: ignore[assignment]
        return self._sizes[path]

    def _scan(self, index: int, ds: DatasetParams) -> _DatasetState:
        label = f"dataset {index + 1}" if len(self.datasets) > 1 else "dataset"
        check_dataset_params(ds, label)
        min_reso = max_reso = None
        if ds.enable_bucket:
            min_reso, max_reso, notes = adjust_bucket_limits(ds.resolution, ds.min_bucket_reso,
                                                             ds.max_bucket_reso, ds.bucket_reso_steps)
            for note in notes:
                self._warn(f"{label}: {note}")
            if ds.bucket_no_upscale:
                self._warn(f"{label}: min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale "
                           f"(each image gets its own bucket)")
        assigner = BucketAssigner(ds.resolution, enable_bucket=ds.enable_bucket, no_upscale=ds.bucket_no_upscale,
                                  min_size=min_reso or 0, max_size=max_reso or 0, steps=ds.bucket_reso_steps)
        val_seed = ds.validation_seed if ds.validation_seed is not None else self.seed

        train: list[_Entry] = []
        reg: list[_Entry] = []
        validation: list[_Entry] = []
        subset_counts: list[int | None] = []
        tag_frequency: dict[str, dict[str, int]] = {}
        seen_dirs: set[str] = set()
        num_train = num_reg = 0
        for j, sub in enumerate(ds.subsets):
            subset_counts.append(None)
            where = f"{label}, folder {sub.image_dir}"
            if sub.num_repeats < 1:
                self._warn(f"{where}: ignored, num_repeats is {sub.num_repeats} (must be at least 1)")
                continue
            dir_key = os.path.normcase(os.path.abspath(sub.image_dir))
            if dir_key in seen_dirs:
                self._warn(f"{where}: ignored, the same folder is already a subset of this dataset")
                continue
            seen_dirs.add(dir_key)
            if not os.path.isdir(sub.image_dir):
                self._warn(f"{where}: ignored, not a folder")
                continue
            if sub.cache_info:
                self._warn(f"{where}: cache_info is ignored (nothing is ever written into image folders)")
            paths = list_images(sub.image_dir)
            val_paths: list[str] = []
            if ds.validation_split > 0 and not sub.is_reg:
                paths, val_paths = _split_validation(paths, ds.validation_split, val_seed)
            if not paths:
                self._warn(f"{where}: ignored, no images ({' '.join(IMAGE_EXTENSIONS)}) found")
                continue
            captions, missing = [], []
            for path in paths:
                cap = read_caption(path, sub)
                if cap is None:
                    missing.append(path)
                    cap = sub.class_tokens or ""
                captions.append(cap)
            count_tags(captions, tag_frequency.setdefault(os.path.basename(os.path.normpath(sub.image_dir)), {}))
            if missing:
                source = f"the class tokens '{sub.class_tokens}'" if sub.class_tokens else "an empty caption"
                shown = ", ".join(os.path.basename(p) for p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                self._warn(f"{where}: no {sub.caption_extension} caption file for {len(missing)} of {len(paths)} "
                           f"images ({shown}{more}); they use {source}")
            for path in val_paths:
                cap = read_caption(path, sub)
                validation.append(_Entry(j, path, (sub.class_tokens or "") if cap is None else cap, 1))
            entries = [_Entry(j, p, c, sub.num_repeats) for p, c in zip(paths, captions)]
            if sub.is_reg:
                reg += entries
                num_reg += sub.num_repeats * len(paths)
            else:
                train += entries
                num_train += sub.num_repeats * len(paths)
            subset_counts[j] = len(paths)

        used_reg = self._balance_reg(label, reg, num_train, num_reg)

        items, ar_errors = [], []
        bucket_counts: dict[tuple[int, int], int] = {}
        for entry in train + used_reg:
            item, err = self._make_item(index, ds, entry, assigner)
            items.append(item)
            ar_errors.append(abs(err))
            bucket_counts[item.bucket] = bucket_counts.get(item.bucket, 0) + item.num_repeats
        val_items = [self._make_item(index, ds, e, assigner)[0] for e in validation]
        mean_err = float(sum(ar_errors) / len(ar_errors)) if ar_errors else 0.0
        return _DatasetState(ds, items, val_items, subset_counts, num_train, num_reg, len(val_items),
                             dict(sorted(bucket_counts.items())), mean_err, tag_frequency, min_reso, max_reso)

    def _balance_reg(self, label: str, reg: list[_Entry], num_train: int, num_reg: int) -> list[_Entry]:
        """sd-scripts: reg samples per epoch = train samples. Images are taken in order with their repeats until
        the count is reached (the last may overshoot); if all are used and it is short, repeats grow by one,
        image by image, cyclically."""
        if num_reg == 0:
            return []
        if num_train < num_reg:
            self._warn(f"{label}: some of the regularization images are not used ({num_reg} reg samples with "
                       f"repeats, but only {num_train} train samples per epoch)")
        used, n, first = [], 0, True
        while n < num_train:
            for entry in reg:
                if first:
                    used.append(entry)
                    n += entry.repeats
                else:
                    entry.repeats += 1
                    n += 1
                if n >= num_train:
                    break
            first = False
        return used

    def _make_item(self, index: int, ds: DatasetParams, entry: _Entry,
                   assigner: BucketAssigner) -> tuple[ImageItem, float]:
        j, path, caption = entry.subset_index, entry.path, entry.caption
        sub = ds.subsets[j]
        w, h = self._size(path)
        place = assigner.assign(w, h)
        interp = sub.resize_interpolation if sub.resize_interpolation is not None else ds.resize_interpolation
        item = ImageItem(path=os.path.abspath(path), caption=caption, subset_index=j, dataset_index=index,
                         is_reg=sub.is_reg, num_repeats=entry.repeats, original_size=(w, h), bucket=place.bucket,
                         resized_size=place.resized_size, crop=place.crop, resize_interpolation=interp, subset=sub)
        return item, place.ar_error

    # ------------------------------------------------------------ epochs
    @property
    def num_batches_per_epoch(self) -> int:
        return sum(math.ceil(c / st.params.batch_size) for st in self._states for c in st.bucket_counts.values())

    @property
    def samples_per_epoch(self) -> int:
        return sum(sum(st.bucket_counts.values()) for st in self._states)

    def set_prior_loss_weight(self, weight: float) -> None:
        for item in self.items:
            item.loss_weight = float(weight) if item.is_reg else 1.0

    def batches_for_epoch(self, epoch: int, group: int = 1) -> list[Batch]:
        """All batches of `epoch`, in training order; a function of (seed, epoch) only.
        group = N (N processes, training/distributed.py): the order is shuffled by runs of N consecutive batches
        of a bucket, so the N batches of a step are the parts of the batch one process with N times the batch
        size takes at that step (group 1 is the single-process order, unchanged)."""
        rng = random.Random(derive_seed(self.seed, "batches", int(epoch)))
        batches: list[Batch] = []
        runs: list[list[Batch]] = []
        for di, st in enumerate(self._states):
            by_bucket: dict[tuple[int, int], list[ImageItem]] = {b: [] for b in st.bucket_counts}
            for item in st.items:
                by_bucket[item.bucket].extend([item] * item.num_repeats)
            bs = st.params.batch_size
            for bucket, members in by_bucket.items():
                rng.shuffle(members)
                for start in range(0, len(members), bs):
                    chunk = members[start:start + bs]
                    samples = [Sample(it, bool(it.subset.flip_aug and rng.random() < 0.5)) for it in chunk]
                    batches.append(Batch(di, bucket, samples))
                    if group > 1 and (start // bs) % group == 0:
                        runs.append([])
                    if group > 1:
                        runs[-1].append(batches[-1])
        if group > 1:
            rng.shuffle(runs)
            return [b for run in runs for b in run]
        rng.shuffle(batches)
        return batches

    # ------------------------------------------------------------ validation
    def validation_items(self) -> list[ImageItem]:
        """Held-out images (dataset-level validation_split; reg images are never held out), each once."""
        return [it for st in self._states for it in st.validation]

    def validation_batches(self) -> list[Batch]:
        """Validation items grouped by dataset and bucket, in a fixed order, never flipped."""
        batches = []
        for di, st in enumerate(self._states):
            by_bucket: dict[tuple[int, int], list[ImageItem]] = {}
            for item in st.validation:
                by_bucket.setdefault(item.bucket, []).append(item)
            bs = st.params.batch_size
            for bucket in sorted(by_bucket):
                members = by_bucket[bucket]
                for start in range(0, len(members), bs):
                    batches.append(Batch(di, bucket, [Sample(it, False) for it in members[start:start + bs]]))
        return batches

    # ------------------------------------------------------------ summary
    def _bucket_info(self, st: _DatasetState) -> dict | None:
        if not st.params.enable_bucket:
            return None  # sd-scripts stores no bucket info without bucketing
        buckets = {str(i): {"resolution": [b[0], b[1]], "count": c}
                   for i, (b, c) in enumerate(st.bucket_counts.items())}
        return {"buckets": buckets, "mean_img_ar_error": st.mean_ar_error}

    def summary(self) -> dict:
        """What the run record and sd-scripts metadata need (ss_num_train_images, ss_tag_frequency, ...)."""
        tag_frequency: dict[str, dict[str, int]] = {}
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        datasets = []
        for st in self._states:
            ds = st.params
            for name, freq in st.tag_frequency.items():
                tag_frequency.setdefault(name, freq)  # a folder used by several datasets counts once
            subsets = []
            for sub, count in zip(ds.subsets, st.subset_counts):
                if count is None:
                    continue
                name = os.path.basename(os.path.normpath(sub.image_dir))
                target = reg_dirs if sub.is_reg else dirs
                unique, k = name, 2
                while unique in target:
                    unique, k = f"{name} ({k})", k + 1
                target[unique] = {"n_repeats": sub.num_repeats, "img_count": count}
                subsets.append({
                    "img_count": count, "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
                    "flip_aug": sub.flip_aug, "random_crop": sub.random_crop, "shuffle_caption": sub.shuffle_caption,
                    "keep_tokens": sub.keep_tokens, "keep_tokens_separator": sub.keep_tokens_separator,
                    "secondary_separator": sub.secondary_separator, "enable_wildcard": sub.enable_wildcard,
                    "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
                    "resize_interpolation": sub.resize_interpolation, "image_dir": name,
                    "class_tokens": sub.class_tokens, "is_reg": sub.is_reg,
                })
            datasets.append({
                "is_dreambooth": True,
                "batch_size_per_device": ds.batch_size,
                "num_train_images": st.num_train_images,
                "num_reg_images": st.num_reg_images,
                "num_validation_images": st.num_validation_images,
                "resolution": tuple(ds.resolution),
                "enable_bucket": ds.enable_bucket,
                "bucket_no_upscale": ds.bucket_no_upscale if ds.enable_bucket else False,
                "min_bucket_reso": st.min_bucket_reso,
                "max_bucket_reso": st.max_bucket_reso,
                "network_multiplier": ds.network_multiplier,
                "tag_frequency": st.tag_frequency,
                "bucket_info": self._bucket_info(st),
                "resize_interpolation": ds.resize_interpolation,
                "num_batches_per_epoch": sum(math.ceil(c / ds.batch_size) for c in st.bucket_counts.values()),
                "samples_per_epoch": sum(st.bucket_counts.values()),
                "subsets": subsets,
            })
        return {
            "num_train_images": sum(st.num_train_images for st in self._states),
            "num_reg_images": sum(st.num_reg_images for st in self._states),
            "num_validation_images": sum(st.num_validation_images for st in self._states),
            "num_batches_per_epoch": self.num_batches_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "tag_frequency": tag_frequency,
            "dataset_dirs": dirs,
            "reg_dataset_dirs": reg_dirs,
            # folder mode has one dataset; with several, each one's is in datasets[i]["bucket_info"]
            "bucket_info": datasets[0]["bucket_info"],
            "datasets": datasets,
        }
