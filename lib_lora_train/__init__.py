"""LoRA / LyCORIS training engine with sd-scripts-compatible inputs and outputs.

This package never imports the WebUI: the WebUI glue in `scripts/` calls into it.
"""

__version__ = "0.1.0"
