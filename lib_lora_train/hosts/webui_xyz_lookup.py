"""What the X/Y/Z modules share (webui_xyz: the axes and the Compare grid; webui_xyz_runtime: what the grid needs
around the script): the axis labels ours and others' add, and finding a script's module (the built-in Lora's
module is found by webui_base.lora_networks_module, as for the host)."""
from __future__ import annotations

import os
from typing import Any

EPOCH_AXIS = "LoRA epoch"
WEIGHT_AXIS = "LoRA weight"
XYZ_FILES = ("xyz_grid.py", "xy_grid.py")
XYZ_TITLE = "x/y/z plot"
ADDNET_FILE = "additional_networks.py"
ADDNET_MODEL, ADDNET_WEIGHT = "AddNet Model 1", "AddNet Weight 1"
PROMPT_SR = "Prompt S/R"


def find_script_module(scripts_module: Any, filename: str) -> Any:
    for entry in getattr(scripts_module, "scripts_data", None) or []:
        if os.path.basename(str(getattr(entry, "path", ""))) == filename:
            return entry.module
    return None
