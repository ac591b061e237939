"""The Train LoRA tab built on a BasicHost with the embedded tiny model (no browser, no launch), for tests that
call its handlers or its wired events directly."""
from lib_lora_train.hosts.base import BasicHost, HostPaths
from lib_lora_train.jobs import JobManager
from lib_lora_train.models import write_tiny_checkpoint


def tiny_host(root) -> BasicHost:
    """Projects, LoRAs and a tiny checkpoint under `root` (a pathlib.Path); 64 px on the CPU."""
    ckpt = write_tiny_checkpoint(str(root / "models" / "tiny.safetensors"))
    return BasicHost(HostPaths(str(root / "projects"), str(root / "loras"), [str(root / "models")]),
                     default_checkpoint=str(ckpt), config={"resolution": "64", "device": "cpu"})


def tiny_tab(root):
    """(blocks, ctx) of the whole tab on `tiny_host(root)`."""
    from lib_lora_train.ui import build_tab
    host = tiny_host(root)
    blocks = build_tab(host, JobManager(host))
    return blocks, blocks.lora_train_ctx
