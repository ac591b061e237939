"""LoRA / LoCon / LoHa / LoKr / DyLoRA / (IA)3 networks with sd-scripts names and file format."""
from .config import NetworkConfig, network_config_from_args
from .delta import apply_deltas, module_delta, module_kind, split_by_module
from .io import addnet_hash, network_hashes, read_network_file, save_network_file
from .network import Network, create_network
from .presets import PRESETS
from .targets import Target, find_targets, lora_name

__all__ = [
    "NetworkConfig", "network_config_from_args", "Network", "create_network", "PRESETS", "Target", "find_targets",
    "lora_name", "module_delta", "module_kind", "apply_deltas", "split_by_module", "save_network_file",
    "read_network_file", "addnet_hash", "network_hashes",
]
