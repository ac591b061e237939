"""Every visible English string of the tab has a Simplified Chinese translation (localizations/zh_CN.json, the
WebUI's mechanism: exact text -> translation), and the standalone page can apply it."""
import json
import os
import re

import pytest

gr = pytest.importorskip("gradio")

from lib_lora_train.hosts.base import BasicHost, HostPaths  # noqa: E402
from lib_lora_train.jobs import JobManager  # noqa: E402
from lib_lora_train.presets import builtin  # noqa: E402
from lib_lora_train.ui import build_tab, i18n  # noqa: E402

ZH = os.path.join(i18n.LOCALIZATIONS, "zh_CN.json")


class WebUILikeHost(BasicHost):
    """Offers the WebUI's taggers, so the tagger choices that only appear there are checked too."""

    def taggers(self):
        return object()


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("i18n")
    host = WebUILikeHost(HostPaths(str(root / "projects"), str(root / "loras")))
    return build_tab(host, JobManager(host))


def load_zh():
    with open(ZH, encoding="utf-8") as fh:
        return json.load(fh)


def test_json_is_a_flat_map_of_chinese_text():
    zh = load_zh()
    assert zh and all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in zh.items())
    han = re.compile(r"[\u4e00-\u9fff]")
    # every value is Chinese, except names kept as they are
    names = {"Alpha", "DeepBooru (WebUI)", "BLIP (WebUI)"}
    assert [k for k, v in zh.items() if not han.search(v) and k not in names
            and not re.fullmatch(r"LoRA( \d+)?", k)] == []


def test_every_visible_string_is_translated(blocks):
    strings = i18n.visible_strings(blocks)
    texts = {t for t, _ in strings}
    # the walk really sees labels, help lines, buttons, placeholders, Markdown, word choices and headers
    for sample in ("Trigger word", "Start training", "e.g. zkz", "keep aspect ratio", "Last loss",
                   "DeepBooru (WebUI)", "How fast the image model learns; 0.0001 is a safe start",
                   builtin()["concept"].describe("sd1"), "Project & images"):
        assert sample in texts, sample
    missing = i18n.missing(blocks, load_zh())
    assert missing == [], "untranslated: " + "; ".join(f"{t!r} ({w})" for t, w in missing)


def test_an_untranslated_label_is_caught(blocks):
    zh = dict(load_zh())
    del zh["Trigger word"]
    assert ("Trigger word", "lora_train_trigger.label") in i18n.missing(blocks, zh)


def test_standalone_translation_keeps_the_values(tmp_path):
    host = BasicHost(HostPaths(str(tmp_path / "p"), str(tmp_path / "l")))
    b = build_tab(host, JobManager(host), lang="zh_CN")
    comps = {getattr(c, "elem_id", None): c for c in b.blocks.values()}
    assert comps["lora_train_trigger"].label == "触发词"
    assert comps["lora_train_train_button"].value == "开始训练"
    purpose = comps["lora_train_purpose"]
    assert ("角色", "character") in [tuple(c) for c in purpose.choices]      # shown in Chinese, value English
    assert purpose.value == "character"
    assert comps["lora_train_history_table"].headers[0] == "训练记录"
    assert b.lora_train_ctx.tr("Last loss") == "最终损失"
    with pytest.raises(FileNotFoundError):
        i18n.load("xx_XX")
