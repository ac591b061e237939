"""The loss chart: inline SVG that any Gradio version shows in a gr.HTML."""
import xml.etree.ElementTree as ET

from lib_lora_train.ui.chart import MAX_POINTS, loss_chart_svg, running_mean

NS = "{http://www.w3.org/2000/svg}"


def parse(svg):
    return ET.fromstring(svg)


def test_empty_chart_says_so():
    root = parse(loss_chart_svg([]))
    assert "No loss values yet" in "".join(root.itertext())
    assert not root.findall(f"{NS}polyline")


def test_steps_epochs_and_validation_series():
    losses = [(s, 1.0 / s) for s in range(1, 41)]
    svg = loss_chart_svg(losses, [(1, 0.2), (2, 0.05)], steps_per_epoch=20, validation=[(1, 0.3), (2, 0.1)],
                         total_steps=40)
    root = parse(svg)
    lines = root.findall(f"{NS}polyline")
    assert len(lines) == 3                                      # raw loss, running mean, validation
    assert len(lines[0].get("points").split()) == 40
    epochs = [c for c in root.findall(f"{NS}circle") if c.get("class") == "lora-train-epoch-point"]
    assert len(epochs) == 2
    # epoch 2 ends at the last step: its dot sits at the right edge of the plot, below epoch 1's
    assert float(epochs[1].get("cx")) > float(epochs[0].get("cx"))
    assert float(epochs[1].get("cy")) > float(epochs[0].get("cy"))
    assert len([r for r in root.findall(f"{NS}rect") if r.get("class") == "lora-train-validation-point"]) == 2
    text = "".join(root.itertext())
    assert "validation loss" in text and "epoch average" in text


def test_long_runs_are_downsampled_and_nan_dropped():
    losses = [(s, float("nan") if s == 5 else 0.5) for s in range(1, 5001)]
    root = parse(loss_chart_svg(losses))
    pts = root.findall(f"{NS}polyline")[0].get("points").split()
    assert len(pts) == MAX_POINTS


def test_translated_legend():
    root = parse(loss_chart_svg([(1, 0.5), (2, 0.4)], tr=lambda s: {"training loss": "训练损失"}.get(s, s)))
    assert "训练损失" in "".join(root.itertext())


def test_running_mean():
    assert running_mean([(1, 1.0), (2, 3.0), (3, 5.0)], window=2) == [(1, 1.0), (2, 2.0), (3, 4.0)]
