"""Engine events on a terminal (the CLI's train command and the demo share it)."""
from __future__ import annotations

import sys

from .events import DONE, EPOCH, ERROR, INTERRUPTED, LOG, SAMPLE, SAVED, START, STATE_SAVED, STEP, WARNING, Event


class ProgressPrinter:
    """Renders engine events on a terminal: a tqdm bar with loss, it/s and ETA, plus one line per milestone."""

    def __init__(self, stream=None, bar: bool = True):
        self.stream = stream or sys.stderr
        self.use_bar = bar
        self.bar = None

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        d = event.data
        if event.kind == START:
            self._line(f"steps: {d['formula']}")
            if self.use_bar:
                from tqdm import tqdm
                self.bar = tqdm(total=d["total_steps"], initial=d.get("start_step", 0), file=self.stream,
                                unit="step", dynamic_ncols=True)
        elif event.kind == STEP:
            if self.bar is not None:
                self.bar.n = d["step"]
                self.bar.set_postfix_str(f"epoch {d['epoch']}/{d['epochs']} loss {d['avg_loss']:.4f}",
                                         refresh=False)
                self.bar.refresh()
            elif d["step"] % 10 == 0 or d["step"] == d["total_steps"]:
                self._line(f"step {d['step']}/{d['total_steps']} loss {d['avg_loss']:.4f} "
                           f"{d['it_per_s']:.2f} it/s")
        elif event.kind == EPOCH:
            self._line(f"epoch {d['epoch']}/{d['epochs']} done, average loss {d['avg_loss']:.4f}")
        elif event.kind == SAVED:
            self._line(f"saved {d['path']}")
        elif event.kind == STATE_SAVED:
            self._line(f"state saved to {d['path']}")
        elif event.kind == SAMPLE:
            self._line(f"samples: {', '.join(d['paths'])}")
        elif event.kind in (LOG, WARNING):
            self._line(("warning: " if event.kind == WARNING else "") + d["message"])
        elif event.kind in (DONE, INTERRUPTED, ERROR):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if event.kind == INTERRUPTED:
                self._line(f"interrupted at step {d['step']}; resumable state: {d.get('state')}")
