"""The import report: one entry per field of the source file, so nothing is dropped without a word.

Statuses: carried (same meaning here), changed (old -> new, with why), ignored (does not change the trained
file), unsupported (this engine cannot do it: the run would differ, or cannot start) and error (the value is
wrong). `blocking` entries keep a run from starting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("carried", "changed", "ignored", "unsupported", "error")
TITLES = {"carried": "Carried over", "changed": "Changed", "ignored": "Ignored (no effect on the result)",
          "unsupported": "Not supported", "error": "Errors"}


@dataclass
class Entry:
    field: str                 # the field as the source names it (a variable, a JSON key, a TOML key)
    status: str
    old: Any = None            # the source's value
    new: dict[str, Any] | None = None   # what it became here: {our key: value}
    why: str = ""
    blocking: bool = False     # keeps a run from starting

    def line(self) -> str:
        old = _show(self.old)
        if self.status == "carried":
            text = f"{self.field} = {old}"
            if self.new and list(self.new) != [self.field]:
                text += " -> " + ", ".join(f"{k} = {_show(v)}" for k, v in self.new.items())
        elif self.new:
            text = f"{self.field} = {old} -> " + ", ".join(f"{k} = {_show(v)}" for k, v in self.new.items())
        else:
            text = f"{self.field} = {old}"
        return text + (f"  ({self.why})" if self.why else "")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) < 80 else repr(value[:77] + "...")
    return repr(value)


@dataclass
class Report:
    source: str                # the file
    format: str                # kohya_ss GUI JSON, lora-scripts train.ps1, sd-scripts TOML, ...
    family: str = "sd1"        # sd1 | sd2 | sdxl | (other: not supported)
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)   # our sd-scripts-named keys
    validation_error: str | None = None

    def add(self, field_: str, status: str, old: Any = None, new: dict[str, Any] | None = None, why: str = "",
            blocking: bool = False) -> Entry:
        assert status in STATUSES, status
        e = Entry(field_, status, old, new, why, blocking or status == "error")
        self.entries.append(e)
        return e

    @property
    def can_start(self) -> bool:
        return self.validation_error is None and not any(e.blocking for e in self.entries)

    def reasons(self) -> list[str]:
        """Why a run cannot start (empty when it can)."""
        out = [f"{e.field}: {e.why}" for e in self.entries if e.blocking]
        if self.validation_error:
            out.append(self.validation_error)
        return out

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for e in self.entries if e.status == s) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "family": self.family, "can_start": self.can_start,
                "reasons": self.reasons(), "counts": self.counts(), "notes": list(self.notes),
                "entries": [asdict(e) for e in self.entries], "config": dict(self.config)}

    def text(self) -> str:
        lines = [f"{self.source}: {self.format}, model family {self.family}"]
        c = self.counts()
        lines.append(", ".join(f"{c[s]} {s}" for s in STATUSES))
        for status in STATUSES:
            group = [e for e in self.entries if e.status == status]
            if group:
                lines.append(f"{TITLES[status]}:")
                lines.extend(f"  {e.line()}" for e in group)
        for note in self.notes:
            lines.append(f"Note: {note}")
        if self.can_start:
            lines.append("A run can start from this configuration.")
        else:
            lines.append("A run cannot start from this configuration:")
            lines.extend(f"  {r}" for r in self.reasons())
        return "\n".join(lines)
