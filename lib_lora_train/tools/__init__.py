"""Post-training tools: inspect, merge into a checkpoint, merge LoRAs (SVD / concat), extract, resize.

Each tool is a plain function taking an optional event `sink` and a `stop` event (see tools/common.py), so the CLI
and the WebUI tab drive them the same way. This package is imported by networks/ for the block numbering, so it
imports nothing heavy at the top level: import the tool modules themselves (tools.merge, tools.extract, ...).
"""
