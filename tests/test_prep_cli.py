"""The check / preprocess / tag / tags subcommands, through their own parser built with `register`."""
import argparse
import json
import os

import pytest

from lib_lora_train.prep.cli import register
from lib_lora_train.prep.corpus import write_good_images, write_odd_files


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="t")
    register(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    assert rest == []
    code = args.func(args, rest)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_exit_codes_and_json(tmp_path, capsys):
    good = tmp_path / "good"
    write_good_images(str(good / "10_sks"), 3)
    code, out, _ = run(["check", str(good), "--workers", "1"], capsys)
    assert code == 0 and "training can start" in out and "steps:" in out
    code, out, _ = run(["check", str(good), "--json", "--workers", "1"], capsys)
    data = json.loads(out)
    assert code == 0 and data["can_train"] is True and data["summary"]["formula"]

    bad = tmp_path / "bad"
    write_odd_files(str(bad / "10_x"))
    code, out, _ = run(["check", str(bad), "--json"], capsys)
    data = json.loads(out)
    assert code == 2 and data["exit_code"] == 2
    named = {f["path"] for f in data["files"] if f["issues"]}
    assert str(bad / "10_x" / "truncated.jpg") in named and str(bad / "10_x" / "bomb.png") in named
    code, out, _ = run(["check", str(bad / "10_x"), "--workers", "1"], capsys)
    assert code == 2 and "points at the image folder" in out
    code, out, _ = run(["check", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in out


def test_check_help_states_exit_codes(capsys):
    parser = argparse.ArgumentParser(prog="t")
    register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit code 0: training can start; 2: it cannot" in text


def test_preprocess_command(tmp_path, capsys):
    src = tmp_path / "src"
    write_good_images(str(src), 3, size=(700, 500))
    write_odd_files(str(src / "odd"))
    out_dir = tmp_path / "out"
    code, out, _ = run(["preprocess", str(src), "--out", str(out_dir), "--resolution", "256", "--mode", "center",
                        "--flip", "--background", "black", "--json", "--workers", "1"], capsys)
    data = json.loads(out)
    assert code == 0 and data["written"] == 6 and data["options"]["mode"] == "center"
    assert sorted(n for n in os.listdir(out_dir) if not n.startswith(".")) == sorted(["img000.png", "img000_flip.png", "img001.png", "img001_flip.png",
                                                  "img002.png", "img002_flip.png", "img000.txt", "img000_flip.txt",
                                                  "img001.txt", "img001_flip.txt", "img002.txt", "img002_flip.txt"])
    code, out, _ = run(["preprocess", str(src / "odd"), "--out", str(tmp_path / "o2"), "--recursive"], capsys)
    assert code == 0 and "skipped" in out and "truncated.jpg" in out
    code, _, err = run(["preprocess", str(src), "--out", str(tmp_path / "o3"), "--resolution", "500"], capsys)
    assert code == 2 and "multiple of 64" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run(["preprocess", str(empty), "--out", str(tmp_path / "o4")], capsys)
    assert code == 2


def test_tag_command(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from lib_lora_train.prep.wd14_tiny import write_tiny_wd14
    from PIL import Image
    (tmp_path / "d" / "10_x").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (300, 300), (230, 20 * i, 20)).save(tmp_path / "d" / "10_x" / f"img00{i}.png")
    model, csv_path = str(tmp_path / "m.onnx"), str(tmp_path / "t.csv")
    write_tiny_wd14(model, csv_path)
    code, out, _ = run(["tag", str(tmp_path / "d"), "--tagger", "wd14", "--model", model, "--tags-csv", csv_path,
                        "--json", "--exclude", "simple_(background)"], capsys)
    data = json.loads(out)
    assert code == 0 and data["counts"] == {"written": 2}
    text = (tmp_path / "d" / "10_x" / "img000.txt").read_text()
    assert "red theme" in text and "simple" not in text
    code, out, err = run(["tag", str(tmp_path / "d"), "--tagger", "deepbooru"], capsys)
    assert code == 2 and "inside the WebUI" in err


def test_tags_commands(tmp_path, capsys):
    folder = tmp_path / "10_sks"
    write_good_images(str(folder), 3)                      # captions "sks, tag<i%3>, shape"
    d = str(tmp_path)
    code, out, _ = run(["tags", "list", d, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["images"] == 3 and {"tag": "shape", "count": 3} in data["tags"]
    code, out, _ = run(["tags", "remove", d, "shape", "--with", "tag0", "--json"], capsys)
    assert json.loads(out)["changed"] == [str(folder / "img000.png")]
    code, out, _ = run(["tags", "add", d, "solo, smile", "--start"], capsys)
    assert code == 0 and "3 of 3 captions changed" in out
    assert (folder / "img001.txt").read_text().startswith("solo, smile, sks")
    code, out, _ = run(["tags", "replace", d, "^tag(\\d)$", "t\\1", "--regex", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["changed"]) == 3
    code, out, _ = run(["tags", "trigger", d, "sks"], capsys)
    assert "keep_tokens = 1" in out
    assert (folder / "img002.txt").read_text().split(", ")[0] == "sks"
    code, out, _ = run(["tags", "undo", d, "--json"], capsys)
    assert json.loads(out)["undone"]["op"] == "trigger"
    for _ in range(3):
        run(["tags", "undo", d], capsys)
    assert (folder / "img000.txt").read_text() == "sks, tag0, shape"
    code, out, _ = run(["tags", "undo", d], capsys)
    assert code == 0 and "nothing to undo" in out
    code, out, _ = run(["tags", "replace", d, "([", "x", "--regex", "--json"], capsys)
    assert code == 2 and "regular expression" in json.loads(out)["error"]


def test_odd_file_names_and_extreme_aspect_do_not_crash(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "10_x"
    write_good_images(str(folder), 2)
    name = os.fsdecode(b"caf\xe9 \xff.png")            # not valid UTF-8: a surrogate-escaped name
    Image.new("RGB", (300, 300), "red").save(os.path.join(str(folder), name), format="PNG")
    Image.new("RGB", (20000, 10), "blue").save(folder / "strip.png")
    code, out, _ = run(["check", str(tmp_path), "--json", "--workers", "1"], capsys)
    data = json.loads(out)
    assert code == 0 and any(f["path"].endswith(name) for f in data["files"])
    strip = next(f for f in data["files"] if f["path"].endswith("strip.png"))
    assert "extreme_aspect" in {i["code"] for i in strip["issues"]}
    code, out, _ = run(["check", str(tmp_path), "--workers", "1"], capsys)
    assert code == 0 and "caf" in out
    code, out, _ = run(["preprocess", str(folder), "--out", str(tmp_path / "o"), "--mode", "center", "--json"],
                       capsys)
    items = {os.path.basename(i["source"]): i for i in json.loads(out)["items"]}
    assert items[name]["status"] == "ok" and items["strip.png"]["code"] == "extreme_aspect"
