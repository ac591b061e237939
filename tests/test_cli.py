"""The one command line: every subcommand is reachable from `python -m lib_lora_train`."""
from lib_lora_train.cli import build_parser, main


def test_all_subcommands_are_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "steps", "demo", "check", "preprocess", "tag", "tags"} <= set(sub.choices)


def test_check_exit_code_says_whether_training_can_start(tmp_path, capsys):
    from PIL import Image
    good = tmp_path / "train" / "5_zkz"
    good.mkdir(parents=True)
    Image.new("RGB", (300, 300), (200, 10, 10)).save(good / "a.png")
    (good / "a.txt").write_text("zkz")
    assert main(["check", str(tmp_path / "train")]) == 0
    # the same images pointed at directly: the parent-folder mistake
    assert main(["check", str(good)]) == 2
    assert "5_zkz" in capsys.readouterr().out
