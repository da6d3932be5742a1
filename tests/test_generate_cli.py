"""generate.py: outputs (PNG files, grid, EasyNLP output TSV) and argument errors."""

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_pipeline import RESOLUTION, build_run, CAPTIONS, png_bytes, tiny_vqgan
from tokenpaint import Pipeline
from tokenpaint.data import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402  (the script at the repo root)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = TextTokenizer.train(CAPTIONS, root / "spm" / "tok", vocab_size=400)
    return build_run(root, "mim", tokenizer, tiny_vqgan(), sample={"steps": 3, "guidance_scale": 2.0})


def decode_b64_png(field):
    raw = base64.b64decode(field, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return raw, Image.open(io.BytesIO(raw))


def test_prompts_to_tsv_pngs_and_grid(run_dir, tmp_path):
    out_tsv, out_dir = tmp_path / "pred.tsv", tmp_path / "pngs"
    rc = generate.main(["--model", str(run_dir), "--prompt", "a red circle", "一只红色的猫", "--num-images", "2",
                        "--output", str(out_tsv), "--out-dir", str(out_dir), "--grid", "--seed", "5"])
    assert rc == 0
    lines = out_tsv.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for n, (line, text) in enumerate(zip(lines, ["a red circle", "一只红色的猫"])):
        idx, got_text, images = line.split("\t")  # idx \t text \t b64png,b64png
        assert (idx, got_text) == (str(n), text)
        fields = images.split(",")
        assert len(fields) == 2
        for k, field in enumerate(fields):
            raw, image = decode_b64_png(field)
            assert image.size == (RESOLUTION, RESOLUTION)
            assert (out_dir / f"{idx}_{k}.png").read_bytes() == raw
    grid = Image.open(out_dir / "grid.png")
    assert grid.size == (2 * RESOLUTION, 2 * RESOLUTION)
    # the same seed again gives the same bytes; image 3 regenerated alone (seed 5 + 3) equals it too
    again = tmp_path / "again"
    generate.main(["--model", str(run_dir), "--prompt", "一只红色的猫", "--seed", "8", "--out-dir", str(again)])
    assert (again / "0_0.png").read_bytes() == (out_dir / "1_1.png").read_bytes()


def test_prompt_tsv_input_keeps_its_ids(run_dir, tmp_path):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("p7\ta blue star\nq9\ta green square\n", encoding="utf-8")
    out_tsv = tmp_path / "sub" / "pred.tsv"
    generate.main(["--model", str(run_dir), "--input", str(prompts), "--output", str(out_tsv)])
    rows = [line.split("\t") for line in out_tsv.read_text(encoding="utf-8").splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("p7", "a blue star"), ("q9", "a green square")]
    assert all(len(r) == 3 and len(r[2].split(",")) == 1 for r in rows)
    decode_b64_png(rows[0][2])


def test_inpaint_from_the_command_line(run_dir, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8))
    mask = np.zeros((RESOLUTION, RESOLUTION), dtype=np.uint8)
    mask[:, 8:] = 255
    image.save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out_dir = tmp_path / "edit"
    generate.main(["--model", str(run_dir), "--prompt", "a red circle", "--init-image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "mask.png"), "--num-images", "2", "--out-dir", str(out_dir)])
    assert sorted(os.listdir(out_dir)) == ["0_0.png", "0_1.png"]
    # the files are the Pipeline's inpainting (the default mode with a mask) with seeds 0 and 1 ...
    pipe = Pipeline.from_pretrained(run_dir)
    ids = pipe.edit_ids("a red circle", tmp_path / "in.png", mask=tmp_path / "mask.png", num_images=2, seed=0)
    for k, expected in enumerate(pipe.decode(ids)):
        assert (out_dir / f"0_{k}.png").read_bytes() == png_bytes(expected)
    # ... which keeps the tokens left of the mask and regenerates the masked right half
    original = pipe._encode_image(image)[0]  # [4, 4] tokens
    assert torch.equal(ids[:, :, :2], original[:, :2].expand(2, -1, -1))
    assert ((ids[:, :, 2:] != original[:, 2:]).float().mean() >= 0.5)
    assert (out_dir / "0_0.png").read_bytes() != (out_dir / "0_1.png").read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "x", "--top-p", "-0.1"], "--top-p"),
        (["--prompt", "x", "--steps", "0"], "--steps"),
        (["--prompt", "x", "--top-k", "0"], "--top-k"),
        (["--prompt", "x", "--temperature", "0"], "--temperature"),
        (["--prompt", "x", "--guidance-scale", "-1"], "--guidance-scale"),
        (["--prompt", "x", "--num-images", "0"], "--num-images"),
        (["--prompt", "x", "--mask", "m.png"], "--mask needs --init-image"),
        (["--prompt", "x", "--init-image", "missing.png"], "missing.png"),
        (["--input", "missing.tsv"], "missing.tsv"),
        (["--prompt", "x", "--input", "p.tsv"], "not allowed with"),
        ([], "one of the arguments --prompt --input --caption --caption-input is required"),
        (["--caption", "x.png", "--num-captions", "0"], "--num-captions must be >= 1"),
        (["--prompt", "x", "--dtype", "int4"], "--dtype"),
        (["--prompt", "x", "--edit-mode", "img2img"], "--edit-mode needs --init-image"),
        (["--prompt", "x", "--init-image", "in.png", "--edit-mode", "inpaint"], "--mask: mask is required"),
        (["--prompt", "x", "--init-image", "in.png", "--mask", "in.png", "--edit-mode", "img2img"],
         "--mask: mask is not used in mode 'img2img'"),
        (["--prompt", "x", "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_argument_errors(run_dir, capsys, extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (RESOLUTION, RESOLUTION)).save("in.png")
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(run_dir)] + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_dir_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert "nope" in capsys.readouterr().err


def test_runs_as_a_script(run_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", str(run_dir), "--prompt", "a red circle", "--top-p", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2 and "--top-p" in result.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was written before the error
