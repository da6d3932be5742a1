"""Hostile generate.py input: every check that needs no weights is made before they are loaded (bad images and masks,
an incomplete run directory, a device that does not exist, seeds and counts out of range, guidance inf), and every
output location is checked before sampling, so that no generated image is lost to a bad path at the end."""
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_pipeline import CAPTIONS, build_run, tiny_vqgan
from tokenpaint.data import TextTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402  (the script at the repo root)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tokenizer = TextTokenizer.train(CAPTIONS, root / "spm" / "tok", vocab_size=400)
    return build_run(root, "mim", tokenizer, tiny_vqgan(), sample={"steps": 2})


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the model fails the test: the check under test must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the check")
    monkeypatch.setattr(generate.Pipeline, "from_pretrained", load)


def fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def image(path, size=(32, 32), mode="RGB"):
    Image.new(mode, size, 255).save(path)
    return str(path)


def case_files(tmp_path, name):
    """(extra argv, expected message) of an input case."""
    init = image(tmp_path / "in.png")
    if name == "mask size differs":
        return (["--init-image", init, "--mask", image(tmp_path / "m.png", (16, 16), "L")],
                f"--mask {tmp_path / 'm.png'} is 16x16 pixels, --init-image {init} is 32x32: they must be the same size")
    if name == "mask not an image":
        (tmp_path / "m.png").write_text("not an image")
        return ["--init-image", init, "--mask", str(tmp_path / "m.png")], f"--mask {tmp_path / 'm.png'}: not a usable"
    if name == "init image not an image":
        (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return ["--init-image", str(tmp_path / "x.png")], f"--init-image {tmp_path / 'x.png'}: not a usable image"
    if name == "init image EPS":
        (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
        return ["--init-image", str(tmp_path / "x.eps")], "not an image in an accepted format"
    if name == "mask with outpaint":
        return (["--init-image", init, "--mask", image(tmp_path / "m.png", (32, 32), "L"), "--edit-mode", "outpaint"],
                "--mask: mask is not used in mode 'outpaint'")
    if name == "init image a directory":
        (tmp_path / "d.png").mkdir()
        return ["--init-image", str(tmp_path / "d.png")], f"--init-image: {tmp_path / 'd.png'} is not a regular file"
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mask size differs", "mask not an image", "init image not an image",
                                  "init image EPS", "init image a directory", "mask with outpaint"])
def test_bad_edit_inputs_fail_before_loading(run_dir, tmp_path, capsys, no_weights, name):
    extra, message = case_files(tmp_path, name)
    err = fail(["--model", str(run_dir), "--prompt", "a cat", "--out-dir", str(tmp_path / "o"), *extra], capsys)
    assert message in err, err


@pytest.mark.parametrize("missing", ["tokenizer.model", "vqgan", "model.safetensors"])
def test_an_incomplete_run_directory_fails_before_loading(run_dir, tmp_path, capsys, no_weights, missing):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    err = fail(["--model", str(copy), "--prompt", "a cat", "--out-dir", str(tmp_path / "o")], capsys)
    name = "vqgan/config.json" if missing == "vqgan" else missing
    assert f"--model: model directory {copy} has no {name}" in err, err


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "nonsense", "--device nonsense: not a device (expected cpu, cuda, cuda:N or mps)"),
    ("--device", "meta", "--device meta: not a device to generate on"),
    ("--guidance-scale", "inf", "--guidance-scale"),
    ("--guidance-scale", "nan", "--guidance-scale"),
    ("--num-images", str(10**9), "--num-images"),
    ("--seed", "-1", "--seed"),
    ("--seed", str(2**64), "--seed"),
    ("--seed", str(2**64 - 1), "--seed"),  # with two images: seed + 1 overflows
])
def test_bad_flags_fail_before_loading(run_dir, tmp_path, capsys, no_weights, flag, value, message):
    argv = ["--model", str(run_dir), "--prompt", "a cat", "a dog", "--out-dir", str(tmp_path / "o"), flag, value]
    err = fail(argv, capsys)
    assert message in err and "Traceback" not in err, err


def test_the_largest_seeds_that_fit_are_accepted(run_dir, tmp_path):
    assert generate.main(["--model", str(run_dir), "--prompt", "a cat", "a dog", "--seed", str(2**64 - 2),
                          "--out-dir", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0_0.png", "1_0.png"]


@pytest.mark.parametrize("where", ["out-dir is a file", "output in a file's place", "output is a folder",
                                   "grid beside an output in a file's place"])
def test_output_locations_are_checked_before_sampling(run_dir, tmp_path, capsys, no_weights, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = {"out-dir is a file": ["--out-dir", str(blocker)],
            "output in a file's place": ["--output", str(blocker / "out.tsv")],
            "output is a folder": ["--output", str(tmp_path)],
            "grid beside an output in a file's place": ["--output", str(blocker / "out.tsv"), "--grid"]}[where]
    err = fail(["--model", str(run_dir), "--prompt", "a cat", *argv], capsys)
    expected = {"out-dir is a file": f"--out-dir: {blocker} is a file, not a folder",
                "output is a folder": f"--output {tmp_path} is a folder"}.get(where, f"--output: {blocker} is a file")
    assert expected in err, err


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_prompt_tsv_that_is_not_a_file_fails_before_loading(run_dir, tmp_path, capsys, no_weights, kind):
    path = tmp_path / "prompts.tsv"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    err = fail(["--model", str(run_dir), "--input", str(path), "--out-dir", str(tmp_path / "o")], capsys)
    assert f"--input: {path} is not a regular file" in err, err
