"""The tab in a real browser (headless Debian Chromium through selenium).

1. The standalone page: create a project, import toy images, remove a tag from the tag table, train one short
   epoch, watch the progress, the loss chart and the history, then reload the page and find it all again. Checks
   the files on disk at each stage.
2. The WebUI's progress bar: on a host that gives jobs WebUI task ids, the tab's JS hands the running job to the
   WebUI's requestProgress() (recorded by a stand-in; the real one is exercised in the real WebUI by hand).

Runs where gradio, selenium, chromium and chromedriver are all present (.venv-webui); skips elsewhere.
"""
import glob
import os
import re
import time

import pytest

from browser_support import FAKE_PROJECT, Page, PageServer, make_driver, skip_reason

REASON = skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PROJECT = "browser_proj"
N_IMAGES = 6            # toy backgrounds rotate white, blue, yellow, green, black, white
REMOVED_TAG = "white background"
# 6 images x 2 repeats / batch 2 = 6 batches in the one epoch; the default preset (character) updates every 2
# batches (gradient_accumulation_steps 2, shown in the formula): 3 steps
FORM = {"lora_train_repeats": "2", "lora_train_max_train_epochs": "1", "lora_train_train_batch_size": "2",
        "lora_train_network_dim": "4", "lora_train_network_alpha": "4"}
EXPECTED_STEPS = 3


def _serve(tmp_path, fake_webui=False):
    data = tmp_path / "data"
    shots = tmp_path / "shots"
    shots.mkdir()
    server = PageServer(str(data), str(tmp_path / "server.log"), fake_webui=fake_webui)
    driver = None
    try:
        server.start()
        driver = make_driver(str(tmp_path / "chromium-profile"))
        p = Page(driver, server, str(shots))
        p.data = data
        yield p
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


@pytest.fixture
def page(tmp_path):
    yield from _serve(tmp_path)


@pytest.fixture
def webui_page(tmp_path):
    """The tab on a host that gives jobs WebUI progress-task ids (training is a slow stand-in)."""
    yield from _serve(tmp_path, fake_webui=True)


def _captions(data):
    out = {}
    for path in sorted(glob.glob(str(data / "projects" / PROJECT / "img" / "*" / "*.txt"))):
        with open(path, encoding="utf-8") as fh:
            out[os.path.basename(path)] = fh.read().strip()
    return out


def _open_page(p: Page) -> None:
    p.d.get(p.server.url)
    # the page's load event has run when the steps line has its text (it is empty in the initial layout)
    p.wait_value("lora_train_steps", bool, "the load event's text")


def _tag_cell(p: Page, tag: str):
    for cell in p.find_all("#lora_train_tag_table tbody td"):
        if cell.text.strip() == tag:
            return cell
    return None


def _loss_line_points(p: Page) -> int:
    """Points of the longest line in the loss chart's SVG (the per-step training loss)."""
    lines = p.find_all("#lora_train_loss_chart svg polyline, #lora_train_loss_chart svg path")
    counts = [len((el.get_attribute("points") or el.get_attribute("d") or "").split()) for el in lines]
    return max(counts, default=0)


def test_train_a_lora_in_the_browser(page, tmp_path):
    from lib_lora_train.demo.toy import FOLDER, make_toy_dataset

    p = page
    toy = make_toy_dataset(tmp_path / "toy", n_images=N_IMAGES) / FOLDER
    originals = {f: (toy / f).read_bytes() for f in os.listdir(toy)}
    _open_page(p)

    # 1. a project
    p.type("lora_train_project_name", PROJECT)
    p.type("lora_train_trigger", "zkz")
    p.button("lora_train_create_project")
    p.wait_value("lora_train_project_status", lambda v: "created project" in v, "'created project'")
    assert os.path.isfile(p.data / "projects" / PROJECT / "project.json")
    p.wait_value("lora_train_project", lambda v: v == PROJECT, "the new project as the open one")

    # 2. import the toy images by typing their folder
    p.type("lora_train_import_path", str(toy))
    p.button("lora_train_import_button")
    p.wait_value("lora_train_project_status", lambda v: v.startswith("imported"), "the import result")
    before = _captions(p.data)
    assert len(before) == N_IMAGES
    assert sum(REMOVED_TAG in c for c in before.values()) == 2

    # 3. the tag table: click a tag, remove it from every caption; the files on disk change
    cell = p.wait(lambda: _tag_cell(p, REMOVED_TAG), f"'{REMOVED_TAG}' in the tag table")
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
    cell.click()
    p.wait_value("lora_train_tag_selected", lambda v: v == REMOVED_TAG, "the clicked tag")
    p.button("lora_train_tag_remove")
    p.wait_value("lora_train_tag_status", lambda v: f"removed '{REMOVED_TAG}' from 2" in v, "the removal")
    after = _captions(p.data)
    assert set(after) == set(before)
    assert not any(REMOVED_TAG in c for c in after.values())
    assert all(c.startswith("zkz") for c in after.values())
    assert sum(after[k] != before[k] for k in after) == 2
    p.wait(lambda: _tag_cell(p, REMOVED_TAG) is None, "the removed tag to leave the table")
    assert {f: (toy / f).read_bytes() for f in os.listdir(toy)} == originals      # originals untouched

    # 4. parameters: one short epoch; the live steps formula follows the typed values
    for elem_id, value in FORM.items():
        p.type(elem_id, value)
    p.wait_value("lora_train_steps", lambda v: v.startswith(f"{EXPECTED_STEPS} steps"),
                 f"'{EXPECTED_STEPS} steps'")
    # each edit left the browser stamped with its order (ui/latest.py: an overtaken edit changes nothing)
    assert p.d.execute_script("return window.loraTrainEventSeq || 0") >= len(FORM)

    # 5. train: the progress moves, the loss chart draws, the file shows up in the history
    p.button("lora_train_train_button")
    seen = []

    def finished():
        state = p.progress()
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        return state if state and state["status"] in ("done", "failed", "interrupted") else None

    final = p.wait(finished, "the run to end", poll=0.1)
    assert final["status"] == "done", (final, p.value("lora_train_train_status"), p.value("lora_train_log"))
    assert final["step"] == final["total"] == str(EXPECTED_STEPS), seen
    assert any(s["status"] in ("queued", "running") and int(s["step"]) < EXPECTED_STEPS for s in seen), seen
    steps = [int(s["step"]) for s in seen]
    assert steps == sorted(steps), seen                     # the bar only moves forward

    assert _loss_line_points(p) == EXPECTED_STEPS          # one point per step on the chart's loss line
    lora = p.data / "loras" / PROJECT / f"{PROJECT}.safetensors"
    p.wait(lambda: lora.name in p.text("lora_train_history_table"), f"{lora.name} in the history table")
    assert lora.is_file() and lora.stat().st_size > 0
    assert (p.data / "loras" / PROJECT / f"{PROJECT}.json").is_file()        # the Lora card sidecar
    assert str(lora) in p.value("lora_train_outputs")

    # 6. a reload shows the project, its form and the finished run again
    p.d.refresh()
    _open_page(p)
    p.wait_value("lora_train_project", lambda v: v == PROJECT, "the project open last")
    p.wait(lambda: (p.progress() or {}).get("status") == "done", "the finished run's progress")
    state = p.progress()
    assert state["step"] == state["total"] == str(EXPECTED_STEPS)
    assert lora.name in p.text("lora_train_history_table")
    assert re.search(r"\bdone\b", p.text("lora_train_history_table"))
    assert p.value("lora_train_max_train_epochs") == "1"
    assert _loss_line_points(p) == EXPECTED_STEPS
    assert _tag_cell(p, REMOVED_TAG) is None and _tag_cell(p, "zkz") is not None


# The WebUI's requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress), recorded instead of run
RECORD_REQUEST_PROGRESS = """
window.loraTrainCalls = [];
window.requestProgress = function (id, container, gallery, atEnd, onProgress) {
    var holder = container.parentNode;
    var next = holder.nextElementSibling;
    window.loraTrainCalls.push({id: id, holder: holder.id, before: next ? next.id : null,
                                gallery: gallery ? gallery.id : null});
    window.loraTrainAtEnd = atEnd;
};
"""


def test_webui_progress_bar_follows_the_running_job(webui_page):
    """Inside the WebUI the tab hands the running job's task id to the WebUI's requestProgress() once, puts its
    bar above the tab's progress and the live preview on the sample image, and attaches again only while the job
    still moves after the WebUI's bar went away."""
    p = webui_page
    _open_page(p)
    p.wait_value("lora_train_project", lambda v: v == FAKE_PROJECT, "the open project")
    p.d.execute_script(RECORD_REQUEST_PROGRESS)

    def calls():
        return p.d.execute_script("return window.loraTrainCalls;")

    def webui_bar_class():
        return "lora-train-webui-progress" in (p.find("#lora_train_root").get_attribute("class") or "")

    p.button("lora_train_train_button")
    p.wait(lambda: len(calls()) == 1, "the WebUI's requestProgress to be called")
    job_id = re.search(r"\((\w+)\)$", p.value("lora_train_train_status")).group(1)
    call = calls()[0]
    assert call == {"id": f"task(lora-train-{job_id})", "holder": "lora_train_webui_progress",
                    "before": "lora_train_progress", "gallery": "lora_train_sample"}
    assert p.progress()["task-id"] == call["id"] and webui_bar_class()
    step = int(p.progress()["step"])
    p.wait(lambda: int(p.progress()["step"]) >= step + 2, "the job to move two steps")
    assert len(calls()) == 1                                 # one bar per job, not one per poll

    # the WebUI's bar ends (e.g. its inactivity limit) while the job runs on: it comes back once the job moves
    p.d.execute_script("window.loraTrainAtEnd();")
    assert not webui_bar_class()
    p.wait(lambda: len(calls()) == 2, "the bar to attach again while the job runs")
    assert calls()[1]["id"] == call["id"]

    # the tab's Stop ends the job; the ended bar does not come back for a job that no longer runs
    p.button("lora_train_stop_button")
    p.wait(lambda: (p.progress() or {}).get("status") == "interrupted", "the job to stop")
    p.d.execute_script("window.loraTrainAtEnd();")
    p.wait(lambda: "interrupted" in p.value("lora_train_train_status"), "the final view")
    n_ticks = p.d.execute_script("return window.loraTrainCalls.length;")
    time.sleep(3.5)                                          # two poll periods: nothing may attach now
    assert len(calls()) == n_ticks == 2 and not webui_bar_class()
