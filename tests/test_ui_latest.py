"""Edits that land out of order: an event overtaken by a newer one of the same page changes nothing.

Found in a real reForge under load: typing "64" into Resolution sent two events, the one for "6" finished last,
and the steps line kept "must be at least 64, got 6" (the saved form could hold 6 as well)."""
import threading

import pytest

from lib_lora_train.ui.latest import SKIP, LatestOnly, parse_token, recheck_js, stamp_js

HANG = 600   # seconds: a bound for a wait that should be instant, not a speed


def _stale():
    return "stale"


def test_tokens_are_read_strictly():
    assert parse_token("abc:3") == ("abc", 3)
    assert parse_token("a:b:12") == ("a:b", 12)
    for bad in (None, "", "abc", ":3", "abc:", "abc:x", "abc:-1", 5, ["a:1"]):
        assert parse_token(bad) is None, bad


def test_an_older_event_that_arrives_later_changes_nothing():
    gate, done = LatestOnly(), []
    assert gate.run("form", "p:2", lambda: done.append(64) or "steps for 64", _stale) == "steps for 64"
    assert gate.run("form", "p:1", lambda: done.append(6) or "got 6", _stale) == "stale"
    assert done == [64]                    # the stale handler did not run at all (no save of 6)
    assert gate.run("form", "p:3", lambda: "steps for 640", _stale) == "steps for 640"


def test_pages_groups_and_untokened_calls_are_independent():
    gate = LatestOnly()
    assert gate.run("form", "p:5", lambda: "a", _stale) == "a"
    assert gate.run("form", "q:1", lambda: "other page", _stale) == "other page"
    assert gate.run("notes", "p:1", lambda: "other group", _stale) == "other group"
    assert gate.run("form", None, lambda: "API client", _stale) == "API client"
    assert gate.run("form", "p:5", lambda: "same token again", _stale) == "same token again"


def test_an_event_overtaken_while_running_returns_nothing_and_the_newer_runs_after_it():
    gate, order = LatestOnly(), []
    started, release = threading.Event(), threading.Event()
    results = {}

    def slow_old():
        started.set()
        assert release.wait(HANG)
        order.append("old")
        return "got 6"

    old = threading.Thread(target=lambda: results.setdefault("old", gate.run("form", "p:1", slow_old, _stale)))
    old.start()
    assert started.wait(HANG)
    new = threading.Thread(target=lambda: results.setdefault(
        "new", gate.run("form", "p:2", lambda: order.append("new") or "steps for 64", _stale)))
    new.start()
    # the newer event is registered on arrival, before its turn: wait until it is, then let the older one finish
    slot = gate._slots[("p", "form")]
    for _ in range(HANG * 100):
        if slot.newest == 2:
            break
        threading.Event().wait(0.01)
    assert slot.newest == 2
    release.set()
    old.join(HANG)
    new.join(HANG)
    assert order == ["old", "new"]         # one at a time: the newer save is the last write
    assert results == {"old": "stale", "new": "steps for 64"}


def test_pages_are_forgotten_oldest_first():
    gate = LatestOnly(max_pages=3)
    for page in "abcd":
        gate.run("form", f"{page}:1", lambda: None, _stale)
    assert [k[0] for k in gate._slots] == ["b", "c", "d"]


def test_a_recheck_that_found_nothing_new_changes_nothing():
    gate, ran = LatestOnly(), []
    assert gate.run("form", SKIP, lambda: ran.append(1), _stale) == "stale" and not ran


def test_the_browser_functions_fill_the_first_input_and_remember_what_was_sent():
    stamp, recheck = stamp_js("form:3", 5), recheck_js("form:3", 5)
    for js in (stamp, recheck):
        assert js.startswith("(...args) =>") and "args[0] =" in js and js.rstrip().endswith("return args;\n}")
        assert 'w.loraTrainSent["form:3"] = JSON.stringify(args.slice(1, 1 + 5))' in js
        assert "__" not in js                      # every placeholder filled
    assert '(window.loraTrainSent || {})["form:3"]' in recheck and 'args[0] = "-"' in recheck


# ------------------------------------------------------------- wired into the tab


def _dependency(blocks, elem_id, fn_name):
    """(config entry, fn) of the event on `elem_id` (gradio 3.41 keeps fns in a list, 4.x by id in order)."""
    deps = blocks.get_config_file()["dependencies"]
    fns = blocks.fns if isinstance(blocks.fns, list) else list(blocks.fns.values())
    for dep, fn in zip(deps, fns):
        targets = [t[0] if isinstance(t, (tuple, list)) else t for t in dep["targets"]]
        if any(t in blocks.blocks and blocks.blocks[t].elem_id == elem_id for t in targets):
            return dep, fn.fn
    raise AssertionError(f"no event on {elem_id}")


def test_the_tabs_form_edits_are_ordered(tmp_path):
    gr = pytest.importorskip("gradio")
    from lib_lora_train.demo.toy import make_toy_dataset
    from lib_lora_train.ui import form_store, params_section, project_section
    from lib_lora_train.ui.presets import FORM_KEYS
    from ui_support import tiny_tab

    blocks, ctx = tiny_tab(tmp_path)
    toy = make_toy_dataset(str(tmp_path / "toy"), 4) / "10_zkz"
    project_section.create(ctx, "p", "zkz", "character")
    project_section.import_folder(ctx, "p", str(toy), False, "white", "keep aspect ratio", 64, False)
    project = project_section.get_project(ctx, "p")
    values = params_section.form_for_project(ctx, project)

    def form(resolution):
        return [dict(values, resolution=resolution)[k] for k in FORM_KEYS]

    dep, fn = _dependency(blocks, "lora_train_resolution", "changed")
    token_id = ctx.c["event_token"]._id
    assert dep["inputs"][0] == token_id and "loraTrainEventSeq" in str(dep.get("js"))
    outs = fn("page:2", "p", *form(64))
    assert str(outs[0]).split(" steps")[0].isdigit()                   # the steps line for 64
    assert form_store.load_form(project.root)["resolution"] == 64
    late = fn("page:1", "p", *form(6))                                  # "6", sent first, lands last
    assert all(o == gr.update() for o in late)
    assert form_store.load_form(project.root)["resolution"] == 64
    # the same handler without a token (a client that does not stamp) is not held back
    assert "at least 64" in str(fn(None, "p", *form(6))[0])
    # the other edits that save what was typed are ordered too
    for elem_id in ("lora_train_trigger", "lora_train_history_notes", "lora_train_preset"):
        dep, _ = _dependency(blocks, elem_id, None)
        assert dep["inputs"][0] == token_id and "loraTrainEventSeq" in str(dep.get("js")), elem_id
