"""Only the newest edit counts: events of one browser page that must not land out of order.

Both WebUIs run queued events concurrently (A1111's queue has 64 workers), so on a busy machine the event for
the first keystroke of "64" can finish after the event for "64": the steps line then shows "got 6" and, worse,
the form saved on disk holds 6. Each such event carries a token stamped in the browser when it was sent
("<page id>:<counter>", see `stamp_js`); per page and group the handlers run one at a time, and an event that a
newer one has overtaken does nothing and changes nothing on the page.

Gradio 3.41 (A1111, reForge) has a second way to lose the last keystroke: it drops a trigger that arrives while
the same event is still running. So each ordered event is followed (`.then`) by a re-check in the browser that
sends the values again when they changed meanwhile (`recheck_js`); Gradio 4.x queues such a trigger itself.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Callable

SKIP = "-"   # the token of a re-check that found nothing new: the server changes nothing

_STAMP = """const w = window;
    if (!w.loraTrainPageId) { w.loraTrainPageId = Math.random().toString(36).slice(2) + Date.now().toString(36); }
    w.loraTrainSent = w.loraTrainSent || {};
    w.loraTrainEventSeq = (w.loraTrainEventSeq || 0) + 1;
    w.loraTrainSent[__KEY__] = JSON.stringify(args.slice(1, 1 + __N__));
    args[0] = w.loraTrainPageId + ":" + w.loraTrainEventSeq;
    return args;"""


def stamp_js(key: str, n_inputs: int) -> str:
    """Runs in the browser before the event is sent: a fresh token in the first input (the hidden `event_token`
    box), and the values sent remembered under `key`. Gradio passes the inputs (3.41: then the outputs) and sends
    what this returns."""
    return "(...args) => {\n    " + _fill(_STAMP, key, n_inputs) + "\n}"


def recheck_js(key: str, n_inputs: int) -> str:
    """Runs when the event has finished (`.then`): Gradio 3.41 drops a trigger that comes while the same event is
    still running, so typing "64" fast sends "6" only. If the values now differ from those sent, this sends them
    (a new token); otherwise SKIP."""
    check = """const sent = (window.loraTrainSent || {})[__KEY__];
    if (sent === JSON.stringify(args.slice(1, 1 + __N__))) { args[0] = __SKIP__; return args; }
    """
    return "(...args) => {\n    " + _fill(check + _STAMP, key, n_inputs) + "\n}"


def _fill(js: str, key: str, n_inputs: int) -> str:
    return js.replace("__KEY__", json.dumps(key)).replace("__N__", str(int(n_inputs))) \
        .replace("__SKIP__", json.dumps(SKIP))


MAX_PAGES = 512   # pages remembered; the oldest are forgotten (a forgotten page only loses the ordering)


def parse_token(token: Any) -> tuple[str, int] | None:
    """("page", n) from "page:n"; None for anything else (an API client that sends no token is not ordered)."""
    if not isinstance(token, str) or ":" not in token:
        return None
    page, _, seq = token.rpartition(":")
    try:
        n = int(seq)
    except ValueError:
        return None
    return (page, n) if page and n >= 0 else None


class _Slot:
    __slots__ = ("newest", "lock")

    def __init__(self) -> None:
        self.newest = -1
        self.lock = threading.Lock()


class LatestOnly:
    """Per (page, group): the newest token seen, and a lock that runs that page's handlers of the group in turn."""

    def __init__(self, max_pages: int = MAX_PAGES) -> None:
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_pages

    def _slot(self, key: tuple[str, str], seq: int) -> _Slot:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
                while len(self._slots) > self._max:
                    self._slots.popitem(last=False)
            self._slots.move_to_end(key)
            slot.newest = max(slot.newest, seq)
            return slot

    def run(self, group: str, token: Any, fn: Callable[[], Any], stale: Callable[[], Any]) -> Any:
        """`fn()` unless a newer event of this page and group has arrived, then `stale()` (changes nothing).
        The newer event is registered on arrival, before it waits for its turn, so an older one that is still
        running or waiting knows it has been overtaken."""
        if token == SKIP:
            return stale()
        parsed = parse_token(token)
        if parsed is None:
            return fn()
        page, seq = parsed
        slot = self._slot((page, group), seq)
        with slot.lock:
            if slot.newest > seq:
                return stale()
            result = fn()
        # overtaken while running: what it did on disk the newer one redoes; its values must not reach the page
        return stale() if slot.newest > seq else result
