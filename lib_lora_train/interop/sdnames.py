"""sd-scripts' option names as data (read from its argument parsers, train_network.py and
sdxl_train_network.py of kohya-ss/sd-scripts 48d368fa), and what importing them means here."""
from __future__ import annotations

TRAIN_NETWORK_OPTIONS = frozenset("""
adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier bucket_no_upscale bucket_reso_steps
cache_info cache_latents cache_latents_to_disk caption_dropout_every_n_epochs caption_dropout_rate caption_extension
caption_extention caption_prefix caption_separator caption_suffix caption_tag_dropout_rate clip_skip color_aug
conditioning_data_dir config_file console_log_file console_log_level console_log_simple cpu_offload_checkpointing
dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout
debiased_estimation_loss debug_dataset deepspeed dim_from_weights dynamo_backend enable_bucket enable_wildcard
face_crop_aug_range flip_aug fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16
fused_backward_pass gradient_accumulation_steps gradient_checkpointing highvram huber_c huber_scale huber_schedule
huggingface_path_in_repo huggingface_repo_id huggingface_repo_type huggingface_repo_visibility huggingface_token
in_json initial_epoch initial_step ip_noise_gamma ip_noise_gamma_random_strength keep_tokens keep_tokens_separator
learning_rate log_config log_prefix log_tracker_config log_tracker_name log_with logging_dir loss_type lowram
lr_decay_steps lr_scheduler lr_scheduler_args lr_scheduler_min_lr_ratio lr_scheduler_num_cycles lr_scheduler_power
lr_scheduler_timescale lr_scheduler_type lr_warmup_steps masked_loss max_bucket_reso max_data_loader_n_workers
max_grad_norm max_timestep max_token_length max_train_epochs max_train_steps max_validation_steps mem_eff_attn
metadata_author metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from
metadata_preprocessor metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase metadata_usage_hint
min_bucket_reso min_snr_gamma min_timestep mixed_precision multires_noise_discount multires_noise_iterations
network_alpha network_args network_dim network_dropout network_module network_train_text_encoder_only
network_train_unet_only network_weights no_half_vae no_metadata noise_offset noise_offset_random_strength
offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path optimizer_args
optimizer_type output_config output_dir output_name persistent_data_loader_workers pretrained_model_name_or_path
prior_loss_weight random_crop reg_data_dir resize_interpolation resolution resume resume_from_huggingface
sample_at_first sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs
save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state
save_model_as save_n_epoch_ratio save_precision save_state save_state_on_train_end save_state_to_huggingface
scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa secondary_separator seed shuffle_caption skip_cache_check
skip_until_initial_step text_encoder_lr token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile
train_batch_size train_data_dir training_comment unet_lr use_8bit_adam use_lion_optimizer v2 v_parameterization
v_pred_like_loss vae vae_batch_size validate_every_n_epochs validate_every_n_steps validation_seed validation_split
wandb_api_key wandb_run_name weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
zero_terminal_snr
""".split())
SDXL_ONLY_OPTIONS = frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                               "disable_mmap_load_safetensors"})
SD_SCRIPTS_OPTIONS = TRAIN_NETWORK_OPTIONS | SDXL_ONLY_OPTIONS

# sd-scripts' samplers (--sample_sampler choices)
SD_SCRIPTS_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                       "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")

# Options (of sd-scripts, accelerate or the GUIs) that change how fast or where a run goes, or what it logs,
# but not the trained file: an import reports them as ignored, with the reason.
NO_EFFECT = {
    "xformers": "an attention kernel; PyTorch's SDPA gives the same result here",
    "sdpa": "an attention kernel; PyTorch's SDPA is always used here",
    "mem_eff_attn": "an attention kernel; PyTorch's SDPA is always used here",
    "lowram": "where models are loaded; no effect on the result",
    "highvram": "memory handling only",
    "persistent_data_loader_workers": "data loader processes; no effect on the result",
    "max_data_loader_n_workers": "data loader processes; no effect on the result",
    "num_cpu_threads_per_process": "accelerate's CPU threads; no effect on the result",
    "log_with": "logging only; the run record (events.jsonl) is written beside the outputs",
    "logging_dir": "logging only; the run record (events.jsonl) is written beside the outputs",
    "log_prefix": "logging only", "log_tracker_name": "logging only", "log_tracker_config": "logging only",
    "log_config": "logging only", "wandb_api_key": "W&B logging only (the key is not copied)",
    "wandb_run_name": "logging only", "console_log_file": "logging only", "console_log_level": "logging only",
    "console_log_simple": "logging only", "use_wandb": "logging only",
    "ddp_timeout": "multi-GPU transport", "ddp_gradient_as_bucket_view": "multi-GPU transport",
    "ddp_static_graph": "multi-GPU transport", "gpu_ids": "which GPU; the host picks the device",
    "huggingface_repo_id": "uploading; never done here (no network)", "huggingface_token": "uploading (not copied)",
    "huggingface_repo_type": "uploading", "huggingface_repo_visibility": "uploading",
    "huggingface_path_in_repo": "uploading", "async_upload": "uploading", "save_state_to_huggingface": "uploading",
    "resume_from_huggingface": "uploading",
    "skip_cache_check": "cache bookkeeping; caches here are checked by content",
    "tokenizer_cache_dir": "the tokenizer is built offline here",
    "disable_mmap_load_safetensors": "how the checkpoint is read",
    "torch_compile": "a speed option; the result is the same", "dynamo_backend": "a speed option",
    "output_config": "writes sd-scripts' own config; the run record holds the full config here",
    "config_file": "the file itself", "cache_info": "cache bookkeeping",
    "vae_batch_size": "latent caching batch; no effect on the result",
}

# sd-scripts treats 0 (or an empty value) as "off" for these: imported as unset, which means the same here.
ZERO_IS_OFF = frozenset({
    "noise_offset", "min_snr_gamma", "multires_noise_iterations", "adaptive_noise_scale", "ip_noise_gamma",
    "network_dropout", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "max_train_steps",
    "max_train_epochs", "sample_every_n_epochs", "sample_every_n_steps", "max_timestep", "scale_weight_norms",
    "v_pred_like_loss", "clip_skip", "vae_batch_size", "save_n_epoch_ratio", "save_last_n_steps",
    "save_last_n_steps_state", "save_last_n_epochs_state", "max_validation_steps", "validate_every_n_steps",
    "validate_every_n_epochs", "lr_decay_steps", "initial_epoch", "initial_step", "max_token_length",
})
