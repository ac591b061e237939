"""The dataset layer: sd-scripts folders and dataset_config files, buckets, captions, batches, latent cache."""
from .buckets import BucketAssigner, Placement, adjust_bucket_limits, make_bucket_resolutions
from .captions import count_tags, process_caption, read_caption, read_caption_file
from .config import (DatasetParams, SubsetParams, datasets_from_config, datasets_from_config_file,
                     datasets_from_folders)
from .data import Batch, ImageItem, Sample, TrainingData, derive_seed
from .images import (IMAGE_EXTENSIONS, list_images, load_image, load_image_tensor, load_item_tensor,
                     random_crop_offsets, read_image_size)
from .latents import CacheStats, LatentCache
from .steps import StepPlan, plan_steps, plan_steps_for_data, plan_steps_for_datasets

__all__ = [
    "BucketAssigner", "Placement", "adjust_bucket_limits", "make_bucket_resolutions",
    "count_tags", "process_caption", "read_caption", "read_caption_file",
    "DatasetParams", "SubsetParams", "datasets_from_config", "datasets_from_config_file", "datasets_from_folders",
    "Batch", "ImageItem", "Sample", "TrainingData", "derive_seed",
    "IMAGE_EXTENSIONS", "list_images", "load_image", "load_image_tensor", "load_item_tensor",
    "random_crop_offsets", "read_image_size",
    "CacheStats", "LatentCache",
    "StepPlan", "plan_steps", "plan_steps_for_data", "plan_steps_for_datasets",
]
