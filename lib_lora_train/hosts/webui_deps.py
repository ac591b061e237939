"""What the extension needs installed in the WebUI's Python, and the check of it.

Plain standard library on purpose: `install.py` loads this file by path in the WebUI's installer process (before
the WebUI, torch or this package are importable there), and the tab calls `check()` to say what is missing.

Two kinds of package:
- ours (`REQUIRED`, `OPTIONAL`): installed by install.py at the exact versions verified on A1111 1.10.1 when
  missing or older than the minimum; a newer one is left alone.
- the WebUI's own (`WEBUI_OWNED`): never installed or upgraded by this extension, only reported when too old,
  because moving one of them breaks the WebUI or other extensions.
"""
import importlib.metadata
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Requirement:
    name: str                  # distribution name as pip knows it
    minimum: str               # the oldest version that works
    pin: str                   # the version install.py installs (verified with the WebUI's pins)
    no_deps: bool = True       # install with --no-deps: its own dependencies are listed here explicitly
    why: str = ""


# Verified together with A1111 1.10.1's pins (transformers 4.30.2, accelerate 0.21.0, numpy 1.26.2, ...).
# diffusers 0.32+ does not import with transformers 4.30.2; lycoris-lora's own dependencies are torch, einops,
# toml, tqdm, numpy, safetensors, of which the WebUI lacks only toml (its einops 0.4.1 has all lycoris uses).
REQUIRED = (
    Requirement("diffusers", "0.31.0", "0.31.0", why="UNet, VAE and noise schedules of the engine"),
    Requirement("lycoris-lora", "4.1.3", "4.1.3", why="LoCon / LoHa / LoKr / (IA)3 network modules"),
    Requirement("toml", "0.10.0", "0.10.2", why="needed by lycoris-lora"),
    Requirement("huggingface-hub", "0.23.2", "0.36.2", why="needed by diffusers"),
)
# Extra optimizers: a run that names one of them says so when it is missing; the tab works without them.
OPTIONAL = (
    Requirement("prodigyopt", "1.0", "1.1.2", why="optimizer_type Prodigy"),
    Requirement("dadaptation", "3.1", "3.2", why="optimizer_type DAdapt*"),
    Requirement("lion-pytorch", "0.1.2", "0.2.5", why="optimizer_type Lion"),
)
# The WebUI's packages: (name, minimum this extension works with). Never installed or upgraded from here.
WEBUI_OWNED = (
    ("torch", "2.1.0"),           # load_state_dict(assign=True) shares the WebUI's tensors
    ("transformers", "4.30.0"),
    ("accelerate", "0.21.0"),
    ("safetensors", "0.3.1"),
    ("numpy", "1.23.0"),
    ("gradio", "3.41.0"),
    ("torchvision", None),
    ("xformers", None),
    ("bitsandbytes", None),
)
NEVER_INSTALL = frozenset(name for name, _ in WEBUI_OWNED)


@dataclass
class Problem:
    name: str
    need: str                  # e.g. ">=0.31.0"
    have: Optional[str]        # installed version or None
    owned_by_webui: bool       # True: reported only, never installed by the extension
    optional: bool = False
    why: str = ""


@dataclass
class Report:
    problems: list = field(default_factory=list)      # [Problem]

    @property
    def blocking(self) -> list:
        return [p for p in self.problems if not p.optional]

    @property
    def ok(self) -> bool:
        return not self.blocking

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems]}


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a broken dist-info reads as "not installed"
        return None


def version_tuple(version: str) -> tuple:
    """A comparable form of a version string: release numbers first; a pre-release sorts before its release.
    Local labels (`+cpu`) are ignored."""
    v = version.split("+", 1)[0].strip().lower()
    m = re.match(r"^v?(\d+(?:\.\d+)*)(.*)$", v)
    if not m:
        return (0,)
    nums = [int(x) for x in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    rest = m.group(2)
    pre = 0 if re.match(r"^[.-]?(a|b|rc|alpha|beta|dev|c|pre|preview)", rest) else 1
    return (tuple(nums), pre)


def at_least(version: Optional[str], minimum: Optional[str]) -> bool:
    if version is None:
        return False
    return minimum is None or version_tuple(version) >= version_tuple(minimum)


def check(version_of: Callable[[str], Optional[str]] = installed_version) -> Report:
    """Every requirement that is missing or too old (the WebUI's own packages only when too old)."""
    report = Report()
    for req in REQUIRED + OPTIONAL:
        have = version_of(req.name)
        if not at_least(have, req.minimum):
            report.problems.append(Problem(req.name, f">={req.minimum}", have, False, req in OPTIONAL, req.why))
    for name, minimum in WEBUI_OWNED:
        if minimum is None:
            continue
        have = version_of(name)
        if not at_least(have, minimum):
            report.problems.append(Problem(name, f">={minimum}", have, True, False, "the WebUI's own package"))
    return report


def to_install(report: Report) -> list:
    """The Requirements install.py should install for `report` (never a WebUI-owned package)."""
    wanted = {p.name for p in report.problems if not p.owned_by_webui}
    return [r for r in REQUIRED + OPTIONAL if r.name in wanted and r.name not in NEVER_INSTALL]


def pip_args(req: Requirement) -> list:
    return ["install", f"{req.name}=={req.pin}"] + (["--no-deps"] if req.no_deps else [])


def fix_command(report: Report, python: str) -> Optional[str]:
    """The one command that installs what the extension itself may install (None when nothing)."""
    blocking = {p.name for p in report.blocking if not p.owned_by_webui}
    reqs = [r for r in REQUIRED if r.name in blocking]
    if not reqs:
        return None
    quoted = f'"{python}"' if " " in python else python
    return f"{quoted} -m pip install --no-deps " + " ".join(f"{r.name}=={r.pin}" for r in reqs)


def describe(report: Report, python: str) -> str:
    """Plain-text lines for the console and the tab."""
    lines = []
    for p in report.problems:
        have = f"version {p.have}" if p.have else "not installed"
        what = f"{p.name} {p.need} ({have})"
        if p.owned_by_webui:
            lines.append(f"{what}: the WebUI's own package; this extension never changes it. Update the WebUI "
                         f"or install a matching version yourself.")
        elif p.optional:
            lines.append(f"{what}: optional, only for {p.why}")
        else:
            lines.append(f"{what}: {p.why}")
    cmd = fix_command(report, python)
    if cmd:
        lines.append(f"Fix: stop the WebUI, run  {cmd}  and start it again.")
    return "\n".join(lines)
