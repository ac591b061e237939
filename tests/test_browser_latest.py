"""The last keystroke is never lost, in a real browser (headless Chromium, the Gradio of this environment).

Gradio 3.41 (A1111, reForge) drops a trigger that arrives while the same event is still running: typing "640"
while the event for "6" runs sent "6" only, and the tab's steps line kept "Resolution must be at least 64, got 6"
in a real reForge. `UIContext.on(latest=...)` re-checks the values when the event ends and sends them again.
Here the handler of the first keystroke is held until the rest has been typed, so the overlap is certain.
"""
import threading

import pytest

from browser_support import Page, free_port, make_driver, skip_reason

REASON = skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

HANG = Page.HANG     # bounds a hang only


def test_keys_typed_while_the_event_runs_are_sent_when_it_ends(tmp_path):
    import gradio as gr

    from lib_lora_train.ui.context import UIContext

    seen, entered, release = [], threading.Event(), threading.Event()

    def handler(ctx, text):
        seen.append(text)
        entered.set()
        assert release.wait(HANG)
        return {"out": f"{text}|{len(seen)}"}

    ctx = UIContext(None, None)
    with gr.Blocks(analytics_enabled=False) as demo:
        ctx.add("event_token", gr.Textbox(visible=False))
        ctx.add("field", gr.Textbox(elem_id="field"))
        ctx.add("out", gr.Textbox(elem_id="out"))
        ctx.on(ctx.c["field"].input, handler, ["field"], ["out"], latest="form")
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_api=False)
    driver = None
    try:
        driver = make_driver(str(tmp_path / "chromium-profile"))
        p = Page(driver, None, str(tmp_path))
        driver.get(f"http://127.0.0.1:{port}/")
        box = p.wait(lambda: p.field("field"), "the text box")
        box.send_keys("6")
        assert entered.wait(HANG), "the first keystroke's event never reached the server"
        box.send_keys("40")                     # while the event for "6" is held on the server
        release.set()
        final = p.wait(lambda: p.value("out") if p.value("out").startswith("640|") else None, "'640' handled",
                       timeout=HANG)
        assert seen[0] == "6" and seen[-1] == "640", seen
        assert final == f"640|{len(seen)}"
        # nothing more is sent once the page shows the last value (the re-check found nothing new)
        assert driver.execute_script("return window.loraTrainEventSeq") == len(seen)
    finally:
        release.set()
        if driver is not None:
            driver.quit()
        demo.close()
