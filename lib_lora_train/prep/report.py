"""The check report: one entry per file with its problems, folder-level problems, and whether training can start.

Severities: "error" = training cannot start as things are (the engine would stop on it) or the file cannot be
used at all; "warning" = training runs but the result may suffer or something is silently ignored; "info" = what
preprocessing or training will do about it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)
EXIT_CAN_TRAIN, EXIT_CANNOT_TRAIN = 0, 2


@dataclass
class Issue:
    code: str                  # stable machine name, e.g. "truncated", "folder_no_repeat_prefix"
    severity: str              # error | warning | info
    message: str               # the reason in words, with the fix
    path: str | None = None    # the file or folder concerned; None: the whole dataset

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "path": self.path}


@dataclass
class FileReport:
    path: str
    kind: str                                   # image | caption | other
    size: tuple[int, int] | None = None          # as displayed (EXIF orientation applied)
    mode: str | None = None
    format: str | None = None
    issues: list[Issue] = field(default_factory=list)
    phash: tuple[int, bytes] | None = field(default=None, repr=False, compare=False)  # for near-duplicates

    def add(self, code: str, severity: str, message: str) -> None:
        self.issues.append(Issue(code, severity, message, self.path))

    @property
    def usable(self) -> bool:
        return not any(i.severity == ERROR for i in self.issues)

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "size": list(self.size) if self.size else None,
                "mode": self.mode, "format": self.format, "usable": self.usable,
                "issues": [i.to_dict() for i in self.issues]}


@dataclass
class CheckReport:
    root: str
    files: list[FileReport] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)   # folder / dataset level
    counts: dict = field(default_factory=dict)
    summary: dict | None = None                          # repeats and the steps formula, when training can start

    def add(self, code: str, severity: str, message: str, path: str | None = None) -> None:
        self.issues.append(Issue(code, severity, message, path))

    @property
    def all_issues(self) -> list[Issue]:
        return self.issues + [i for f in self.files for i in f.issues]

    def by_severity(self, severity: str) -> list[Issue]:
        return [i for i in self.all_issues if i.severity == severity]

    @property
    def can_train(self) -> bool:
        return not self.by_severity(ERROR) and self.counts.get("usable_train_images", 0) > 0

    @property
    def exit_code(self) -> int:
        return EXIT_CAN_TRAIN if self.can_train else EXIT_CANNOT_TRAIN

    def file(self, path: str) -> FileReport | None:
        for f in self.files:
            if f.path == path:
                return f
        return None

    def codes(self, path: str | None = None) -> set[str]:
        """Issue codes, of one file or folder (`path`) or of everything."""
        return {i.code for i in self.all_issues if path is None or i.path == path}

    def to_dict(self) -> dict:
        return {"root": self.root, "can_train": self.can_train, "exit_code": self.exit_code,
                "counts": self.counts,
                "errors": len(self.by_severity(ERROR)), "warnings": len(self.by_severity(WARNING)),
                "issues": [i.to_dict() for i in self.issues], "files": [f.to_dict() for f in self.files],
                "summary": self.summary}

    def summary_text(self, show_info: bool = False) -> str:
        c = self.counts
        lines = [f"checked {self.root}: {c.get('images', 0)} images, {c.get('captions', 0)} caption files, "
                 f"{c.get('other', 0)} other files"]
        shown = (ERROR, WARNING, INFO) if show_info else (ERROR, WARNING)
        for issue in self.issues:
            if issue.severity in shown:
                lines.append(f"  {issue.severity}: {issue.message}")
        for f in self.files:
            for issue in f.issues:
                if issue.severity in shown:
                    lines.append(f"  {issue.severity}: {f.path}: {issue.message}")
        if self.summary and self.summary.get("text"):
            lines.append(self.summary["text"])
        n_err, n_warn = len(self.by_severity(ERROR)), len(self.by_severity(WARNING))
        verdict = "training can start" if self.can_train else "training cannot start"
        lines.append(f"{n_err} error{'s' if n_err != 1 else ''}, {n_warn} warning{'s' if n_warn != 1 else ''}: "
                     f"{verdict}")
        return "\n".join(lines)
