"""What every section shares: the host, the job manager, the components by name, and the event wiring.

Handlers are plain functions `fn(ctx, *values) -> dict[name, value]`: tests call them directly and read the
dict; `UIContext.on` turns them into Gradio events (components a handler leaves out are not changed, an engine
error becomes a message in the section's status line instead of a broken page).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LoraTrainError
from ..hosts.base import Host
from ..jobs import JobManager
from .latest import LatestOnly, recheck_js, stamp_js

Result = dict[str, Any]


def identity(text: str) -> str:
    return text


@dataclass
class UIContext:
    host: Host
    jobs: JobManager
    tr: Callable[[str], str] = identity          # table headers shown by handlers (standalone --lang)
    c: dict[str, Any] = field(default_factory=dict)
    latest: LatestOnly = field(default_factory=LatestOnly)
    _ordered: int = 0                               # ordered events wired so far (each gets its own browser key)

    def add(self, name: str, component: Any) -> Any:
        if name in self.c:
            raise ValueError(f"component name {name!r} used twice")
        self.c[name] = component
        return component

    def on(self, trigger: Callable, fn: Callable[..., Result], inputs: list[str], outputs: list[str], *,
           status: str | None = None, js: str | None = None, queue: bool | None = None,
           show_progress: str = "full", select: bool = False, latest: str | None = None) -> Any:
        """Wire `fn(ctx, *inputs)` to an event (`trigger` is e.g. `button.click`). With `select`, the handler
        gets the event's index as its last argument (Dataframe / Gallery `.select`). With `latest` (a group
        name), events of one page in that group run in turn and one overtaken by a newer one changes nothing
        (edits that save what was typed: see latest.py); the tab's hidden `event_token` box carries the order."""
        import gradio as gr

        from .compat import js_kwargs, select_index

        outs = list(outputs)

        def finish(result: Result | None) -> Any:
            result = result or {}
            values = [result.get(n, gr.update()) for n in outs]
            if not outs:
                return None
            return values[0] if len(outs) == 1 else values

        def call(args: tuple) -> Any:
            try:
                return finish(fn(self, *args))
            except LoraTrainError as exc:
                if status and status in outs:
                    return finish({status: f"error: {exc}"})
                raise gr.Error(str(exc)) from None
            except OSError as exc:
                msg = f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
                if status and status in outs:
                    return finish({status: msg})
                raise gr.Error(msg) from None
            except Exception as exc:  # noqa: BLE001 - a bug shows as a message; the page keeps working
                traceback.print_exc()
                if status and status in outs:
                    return finish({status: f"error: {type(exc).__name__}: {exc}"})
                raise

        if select and latest:
            raise ValueError("select events are not ordered")
        if select:
            def run_select(evt, *args):
                return call(args + (select_index(evt),))
            run_select.__annotations__ = {"evt": gr.SelectData}
            run: Callable = run_select
        elif latest:
            if js:
                raise ValueError("an ordered event stamps its own token in the browser; it takes no other js")
            group = latest

            def run(token, *args):
                return self.latest.run(group, token, lambda: call(args), lambda: finish(None))
            key = f"{group}:{self._ordered}"
            self._ordered += 1
            js = stamp_js(key, len(inputs))
            inputs = ["event_token"] + list(inputs)
        else:
            def run(*args):
                return call(args)

        kw: dict[str, Any] = dict(fn=run, inputs=[self.c[n] for n in inputs], outputs=[self.c[n] for n in outs],
                                  show_progress=show_progress, **js_kwargs(js))
        if queue is not None:
            kw["queue"] = queue
        event = trigger(**kw)
        if latest:   # the values typed while it ran, which Gradio 3.41 would drop (latest.py)
            event = event.then(**dict(kw, show_progress="hidden", **js_kwargs(recheck_js(key, len(inputs) - 1))))
        return event
