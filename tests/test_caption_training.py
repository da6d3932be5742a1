"""train.py transformer for a captioner (model.directions [i2t]) and a GPT trained in both directions, then
Pipeline.caption and generate.py --caption / --caption-input on the runs, and the refused directions."""
import base64
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_transformer_train import env, load_cli, metrics, write_config  # noqa: F401  (env is a fixture)
from tokenpaint import Pipeline
from tokenpaint.data import iter_rows
from tokenpaint.transformer import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402  (the script at the repo root)


@pytest.fixture(scope="module")
def runs(env):  # noqa: F811
    """A captioner and a two-direction GPT through the real CLI, 30 steps each, from the same TSV."""
    cli, out = load_cli(), {}
    for name, directions in (("captioner", ["i2t"]), ("both", ["t2i", "i2t"])):
        config = write_config(env["root"] / f"{name}.yaml", "gpt", model={"directions": directions},
                              sample_every=30, sample_images=3)
        rc = cli.main(["transformer", "--data", env["train"], "--val", env["val"], "--vqgan", env["vq"],
                       "--config", config, "--out", str(env["root"] / name), "--seed", "3", "--threads", "1"])
        assert rc == 0
        out[name] = env["root"] / name
    return out


def test_a_captioner_run_learns_and_writes_captions_while_training(runs):
    records = metrics(runs["captioner"])
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert any("val_loss" in r for r in records)
    lines = (runs["captioner"] / "samples" / "captions_00000030.tsv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 for line in lines)  # reference \t caption
    assert not list((runs["captioner"] / "samples").glob("sample_*.png"))  # no images from a captioner
    config = json.loads((runs["captioner"] / "config.json").read_text())
    assert config["directions"] == ["i2t"]


def test_a_two_direction_run_logs_each_directions_loss_and_both_fall(runs):
    records = metrics(runs["both"])
    trained = [r for r in records if "loss_t2i" in r]
    assert trained and all("loss_i2t" in r for r in trained)
    for direction in ("t2i", "i2t"):
        assert trained[-1][f"loss_{direction}"] < 0.8 * trained[0][f"loss_{direction}"]
    for r in trained:  # the logged loss is the mean of the directions' means
        assert r["loss"] == pytest.approx((r["loss_t2i"] + r["loss_i2t"]) / 2)
    assert any("val_loss_i2t" in r and "val_loss_t2i" in r for r in records)
    assert (runs["both"] / "samples" / "sample_00000030.png").is_file()
    assert (runs["both"] / "samples" / "captions_00000030.tsv").is_file()


def test_pipeline_runs_both_directions_of_the_shared_model_and_refuses_the_captioners_missing_one(runs, env):  # noqa: F811
    both = Pipeline.from_pretrained(runs["both"])
    images = both(["a red circle"], num_images=2, seed=1)
    captions = both.caption(images, seed=0)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    captioner = Pipeline.from_pretrained(runs["captioner"])
    assert captioner.caption(images) == captioner.caption(images, use_kv_cache=False)
    with pytest.raises(ValueError, match="cannot do text-to-image"):
        captioner(["a red circle"])
    with pytest.raises(ValueError, match="cannot do text-to-image"):
        captioner.edit("a red circle", images[0], mode="continue")


@pytest.mark.parametrize("name", ["captioner", "both"])
def test_the_model_card_says_what_the_run_does_and_its_code_runs(runs, name):
    card = (runs[name] / "README.md").read_text(encoding="utf-8")
    assert "- captioning\n" in card and "--caption image.png" in card
    usage = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(usage.replace("path/to/this/folder", str(runs[name])), scope)  # the card's own code works
    assert len(scope["captions"]) == 1 and isinstance(scope["captions"][0], str)
    assert ("images" in scope) == (name == "both")


def _t2i_run(runs, tmp_path) -> Path:
    """A copy of the captioner's run with a text-to-image GPT of the same sizes in it."""
    run = tmp_path / "t2i"
    shutil.copytree(runs["captioner"], run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    config = json.loads((run / "config.json").read_text())
    config.pop("kind")
    GPT(GPTConfig(**{**config, "directions": ["t2i"]})).save_pretrained(run)
    return run


def test_generate_captions_image_files_and_an_image_tsv(runs, env, tmp_path, capsys):  # noqa: F811
    rows = list(iter_rows(env["val"]))[:3]
    files = []
    for i, row in enumerate(rows):
        path = tmp_path / f"img{i}.png"
        Image.open(io.BytesIO(base64.b64decode(row.image))).save(path)
        files.append(str(path))
    assert generate.main(["--model", str(runs["captioner"]), "--caption", *files]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == ["0", "1", "2"]

    images_tsv, out = tmp_path / "images.tsv", tmp_path / "captions.tsv"
    images_tsv.write_text("".join(f"img-{row.idx}\t{row.image}\n" for row in rows), encoding="utf-8")
    assert generate.main(["--model", str(runs["captioner"]), "--caption-input", str(images_tsv),
                          "--output", str(out), "--num-captions", "2", "--temperature", "1.0", "--seed", "4"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"img-{row.idx}" for row in rows for _ in range(2)]
    # greedy from the TSV = greedy from the files (same pixels, same preprocessing)
    greedy = tmp_path / "greedy.tsv"
    generate.main(["--model", str(runs["captioner"]), "--caption-input", str(images_tsv), "--output", str(greedy)])
    assert [line.split("\t")[1] for line in greedy.read_text(encoding="utf-8").splitlines()] == \
        [line.split("\t")[1] for line in printed]


def test_generate_refuses_the_direction_a_run_was_not_trained_for(runs, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    t2i = _t2i_run(runs, tmp_path)
    with pytest.raises(SystemExit):
        generate.main(["--model", str(t2i), "--caption", str(image)])
    assert "trained for text-to-image only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", str(runs["captioner"]), "--prompt", "a red circle"])
    assert "is a captioner" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("0\tnot-base64!!\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        generate.main(["--model", str(runs["captioner"]), "--caption-input", str(bad)])
    assert f"{bad}:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", str(runs["captioner"]), "--caption", str(image), "--temperature", "-1"])
    assert "--temperature: temperature must be a number >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", str(runs["captioner"]), "--caption", str(image), "--max-length", "0"])
    assert "--max-length: max_length must be an integer >= 1" in capsys.readouterr().err
