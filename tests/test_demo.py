"""`python -m tokenpaint.demo`: judging samples against prompts, the grid, stage reuse/resume, the whole orchestration
with tiny models (a few optimizer steps each)."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tokenpaint import demo, demo_grid
from tokenpaint.data import DEMO_PROMPTS, SceneAttributes, describe_scene, draw_scene, parse_caption
from tokenpaint.data.glyphs import GLYPH_PROMPTS

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo")


# ----------------------------------------------------------------------------------------------- judging


def test_judge_accepts_the_drawn_scene_in_both_languages():
    attrs = SceneAttributes("blue", "triangle", "large", "right", "top")
    image = draw_scene(attrs, 32, np.random.default_rng(0))
    for lang in ("en", "zh"):
        verdict = demo.judge(image, describe_scene(attrs, lang))
        assert all(verdict.values()), (lang, verdict)


def test_judge_names_the_attribute_that_differs():
    image = draw_scene(SceneAttributes("red", "circle", "large", "left", "middle"), 32)
    verdict = demo.judge(image, "a large green circle on the left")
    assert not verdict["color"] and not verdict["match"] and not verdict["all"]
    assert verdict["shape"] and verdict["position"] and verdict["size"]
    size_only = demo.judge(image, "a small red circle on the left")
    assert size_only["match"] and not size_only["size"] and not size_only["all"]


def test_judge_counts_an_empty_image_as_a_miss_on_everything():
    blank = Image.new("RGB", (32, 32), (238, 238, 232))
    assert not any(demo.judge(blank, "a large red circle in the center").values())


def test_summarize_verdicts_gives_fractions():
    verdicts = [{"match": True, "color": True}, {"match": False, "color": True}, {"match": False, "color": False},
                {"match": True, "color": True}]
    assert demo.summarize_verdicts(verdicts) == {"match": 0.5, "color": 0.75}
    with pytest.raises(ValueError, match="no verdicts"):
        demo.summarize_verdicts([])


# ----------------------------------------------------------------------------------------------- the grid


def test_chinese_labels_fall_back_to_their_english_rendering_without_a_cjk_font():
    assert demo_grid.label_for("左边一个大的紫色三角形", None) == "zh: a large purple triangle on the left"
    assert demo_grid.label_for("a small blue square on the left", None) == "a small blue square on the left"
    assert demo_grid.label_for("左边一个大的紫色三角形", "/some/cjk.ttf") == "左边一个大的紫色三角形"


def test_sample_grid_layout_and_bad_rows():
    prompts = ["a large red circle in the center", "右边一个小的红色三角形", "a small blue square on the left"]
    images = [draw_scene(parse_caption(p), 32) for p in prompts]
    grid = demo.sample_grid([("mim", images), ("gpt", images)], prompts, cell=64)
    assert grid.width == 56 + 3 * 64 and grid.height > 2 * 64
    # the first image is pasted (scaled up, nearest) inside its cell: its centre shows the red circle
    assert grid.getpixel((56 + 32, 32))[0] > 180 and grid.getpixel((56 + 32, 32))[1] < 90
    with pytest.raises(ValueError, match="row 'gpt' has 2 images for 3 prompts"):
        demo.sample_grid([("mim", images), ("gpt", images[:2])], prompts, cell=64)


# ----------------------------------------------------------------------------------------------- stages


def test_stage_state(tmp_path):
    run = tmp_path / "run"
    assert demo.stage_state(str(run)) == "new"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010.pt").write_bytes(b"")
    assert demo.stage_state(str(run)) == "partial"
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    assert demo.stage_state(str(run)) == "partial"  # a stage stopped by Ctrl-C saves its model too
    (run / demo.FINISHED_RECORD).write_text('{"step": 10, "stopped": "time budget"}')
    assert demo.stage_state(str(run)) == "done"
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.unlink()
    (run / demo.FINISHED_RECORD).unlink()
    assert demo.stage_state(str(run)) == "done"  # a model put there by hand, no run to resume


def test_prepare_data_is_written_once_per_parameter_set(tmp_path):
    paths = demo.prepare_data(str(tmp_path), num_train=6, num_val=2, seed=0)
    assert [os.path.basename(p) for p in paths] == ["train.tsv", "val.tsv", "prompts.tsv"]
    mtime = os.stat(paths[0]).st_mtime_ns
    assert demo.prepare_data(str(tmp_path), num_train=6, num_val=2, seed=0) == paths
    assert os.stat(paths[0]).st_mtime_ns == mtime  # reused: the token caches keyed on mtime stay valid
    demo.prepare_data(str(tmp_path), num_train=7, num_val=2, seed=0)
    with open(paths[0], encoding="utf-8") as f:
        assert len(f.readlines()) == 7


def test_demo_tokenizer_makes_content_words_single_pieces(tmp_path):
    train_tsv = demo.prepare_data(str(tmp_path), num_train=400, num_val=2, seed=0)[0]
    path = demo.prepare_tokenizer(train_tsv, str(tmp_path / "tokenizer.model"))
    tokenizer = demo.TextTokenizer(path)
    assert tokenizer.pieces("一个小的橙色正方形在右下角") == ["▁", "一个", "小的", "橙色", "正方形", "在", "右", "下", "角"]
    assert tokenizer.pieces("a small green triangle at the top") == ["▁a", "▁small", "▁green", "▁triangle", "▁at",
                                                                      "▁the", "▁top"]
    mtime = os.stat(path).st_mtime_ns
    assert demo.prepare_tokenizer(train_tsv, path) == path and os.stat(path).st_mtime_ns == mtime  # trained once
    demo.prepare_data(str(tmp_path), num_train=401, num_val=2, seed=0)  # new captions: the tokenizer is dropped
    assert not os.path.exists(path)


def test_bad_flags_are_named(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--minutes-mim", "0"]) == 2
    assert "--minutes-mim must be positive" in capsys.readouterr().err
    assert demo.main(["--out", str(tmp_path), "--config-dir", str(tmp_path)]) == 2
    assert "no vqgan.yaml there" in capsys.readouterr().err


def test_the_dataset_sets_the_default_rows_and_output_directory():
    parse = demo.build_parser().parse_args
    for argv, out, rows in ((["--dataset", "glyphs"], "demo_glyphs", 16000), ([], "demo", 4000),
                            (["--dataset", "glyphs", "--num-train", "9", "--out", "x"], "x", 9)):
        args = parse(argv)
        demo.fill_defaults(args)
        assert (args.out, args.num_train) == (out, rows), argv


# ----------------------------------------------------------------------------------------------- end to end


def tiny_configs(directory) -> str:
    """configs/demo/*.yaml with tiny models and 2 optimizer steps: the demo's orchestration in seconds."""
    os.makedirs(directory, exist_ok=True)
    for name in ("vqgan", "mim", "gpt"):
        with open(os.path.join(CONFIGS, f"{name}.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if name == "vqgan":
            cfg["model"].update(embed_dim=8, n_embed=16, codebook_dim=4, ch=32, ch_mult=[1, 1, 1], z_channels=8)
            cfg["train"].update(batch_size=4, max_steps=2, val_images=4, warmup_steps=1)
        else:
            cfg["model"].update(n_layer=1, n_head=2, n_embd=16)
            cfg["train"].update(batch_size=4, max_steps=2, warmup_steps=1, val_every=1, sample_every=1, ckpt_every=1)
        with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f)
    return str(directory)


def test_demo_end_to_end_then_reuse_then_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", tiny_configs(tmp_path / "configs"), "--num-train", "12",
            "--num-val", "4", "--images-per-prompt", "1", "--seed", "3"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("data", "vqgan", "mim", "gpt", "samples"):
        assert f"[demo] {stage}" in printed
    assert "trained to step 2" in printed
    assert "mim + gpt: training side by side" in printed  # the generators, each in its own process
    for kind in ("mim", "gpt"):
        assert "saved" in (out / "logs" / f"{kind}.log").read_text()  # the child's output went to its log
    for kind in ("vqgan", "mim", "gpt"):
        assert demo.stage_state(str(out / kind)) == "done"
    with Image.open(out / "samples.png") as grid:
        assert grid.width == 56 + len(DEMO_PROMPTS) * demo_grid.CELL
        assert grid.height > 2 * demo_grid.CELL  # one row per generator
    assert str(out / "samples.png") in printed

    # again: everything is reused, nothing retrained
    weights = {kind: os.stat(out / kind / "model.safetensors").st_mtime_ns for kind in ("vqgan", "mim", "gpt")}
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == 3 and ": training" not in printed and "[demo] recipe" not in printed
    assert weights == {kind: os.stat(out / kind / "model.safetensors").st_mtime_ns for kind in weights}

    # a half-finished stage (checkpoints, no final model) resumes instead of starting over
    os.remove(out / "gpt" / "model.safetensors")
    assert demo.stage_state(str(out / "gpt")) == "partial"
    assert demo.main(argv + ["--skip-gpt"]) == 0  # --skip-gpt leaves it alone
    assert demo.stage_state(str(out / "gpt")) == "partial"
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert "resumed to step 2" in capsys.readouterr().out
    assert demo.stage_state(str(out / "gpt")) == "done"


def test_ctrl_c_stops_the_demo_and_the_next_run_resumes_the_stage(tmp_path, capsys, monkeypatch):
    from tokenpaint.training import common

    enter = common.GracefulStop.__enter__

    def signalled_at_once(self):  # Ctrl-C arriving during the first step of the (in-process) VQGAN stage
        enter(self)
        self._handle(signal.SIGINT, None)
        return self

    monkeypatch.setattr(common.GracefulStop, "__enter__", signalled_at_once)
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", tiny_configs(tmp_path / "configs"), "--num-train", "12",
            "--num-val", "4", "--images-per-prompt", "1"]
    assert demo.main(argv) == 130
    err = capsys.readouterr().err
    assert "vqgan stopped at step 1 (SIGINT)" in err and "run it again to resume" in err
    assert demo.stage_state(str(out / "vqgan")) == "partial"  # its model is saved, but it is not finished
    assert not (out / "mim").exists() and not (out / "gpt").exists()  # no generator trained on an unfinished VQGAN

    monkeypatch.undo()
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "vqgan" in printed and "resumed to step 2" in printed
    assert all(demo.stage_state(str(out / kind)) == "done" for kind in ("vqgan", "mim", "gpt"))


def test_a_stage_that_spent_its_budget_but_was_not_recorded_finished(tmp_path, monkeypatch):
    from tokenpaint.training import common

    def spent(self, checkpoint):
        raise common.BudgetSpent(f"--max-minutes 6: the run in {checkpoint} has already trained 6.0 minutes")

    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", tiny_configs(tmp_path / "configs"), "--num-train", "12",
            "--num-val", "4", "--images-per-prompt", "1", "--skip-gpt"]
    assert demo.main(argv) == 0
    stage = {"run_dir": str(out / "mim"), "steps": 2, "minutes": 6.0, "data": str(out / "data" / "train.tsv"),
             "val": str(out / "data" / "val.tsv"), "config": "unused", "seed": 0}
    monkeypatch.setattr(common.TimeBudget, "check_not_spent", spent)
    (out / "mim" / demo.FINISHED_RECORD).unlink()  # killed after saving its model, before it was recorded
    assert demo.stage_state(stage["run_dir"]) == "partial"
    assert demo.run_stage("mim", **stage) == "reused" and demo.stage_state(stage["run_dir"]) == "done"
    (out / "mim" / demo.FINISHED_RECORD).unlink()
    (out / "mim" / "model.safetensors").unlink()  # killed after its last checkpoint, before the model was saved
    with pytest.raises(ValueError, match=r"mim: --max-minutes 6: .* \(here: --minutes-mim\), or delete .*mim"):
        demo.run_stage("mim", **stage)


def test_a_failing_side_by_side_stage_is_reported_and_the_other_one_finishes(tmp_path, capsys):
    configs = tiny_configs(tmp_path / "configs")
    with open(os.path.join(configs, "gpt.yaml"), "a", encoding="utf-8") as f:
        f.write("extra_section:\n  x: 1\n")
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", configs, "--num-train", "12", "--num-val", "4", "--seed", "3"]
    assert demo.main(argv) == 2  # the child's ValueError, re-raised in the parent
    captured = capsys.readouterr()
    assert "gpt.yaml" in captured.err and "unknown section 'extra_section'" in captured.err
    assert f"[demo] gpt failed; the end of {out / 'logs' / 'gpt.log'}" in captured.err
    assert 'File "' in captured.err  # the tail of the child's traceback
    assert demo.stage_state(str(out / "mim")) == "done"  # the other stage was not cut short
    assert demo.stage_state(str(out / "gpt")) == "new"


def test_last_logged_reads_the_newest_loss_and_skips_a_half_written_line(tmp_path):
    assert demo._last_logged(str(tmp_path)) == (0, None)  # no metrics yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5}\n{"step": 10, "val_loss": 2.7}\n'
                                            '{"step": 20, "loss": 2.25}\n{"step": 30, "lo')
    assert demo._last_logged(str(tmp_path)) == (20, 2.25)


def test_one_at_a_time_trains_the_generators_in_this_process(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", tiny_configs(tmp_path / "configs"), "--num-train", "12", "--num-val", "4",
            "--images-per-prompt", "1", "--one-at-a-time"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "side by side" not in printed and not (out / "logs").exists()
    assert printed.index("[demo] mim: training 2 steps") < printed.index("[demo] gpt: training 2 steps")
    assert all(demo.stage_state(str(out / kind)) == "done" for kind in ("mim", "gpt"))


# ----------------------------------------------------------------------------------------------- recipe and caps


def test_the_recipe_is_the_configs_step_counts(tmp_path):
    assert demo.recipe_steps(CONFIGS) == {"vqgan": 1000, "mim": 5000, "gpt": 5000}
    configs = tiny_configs(tmp_path / "configs")
    with open(os.path.join(configs, "mim.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["train"]["max_steps"] = "many"
    with open(os.path.join(configs, "mim.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(ValueError, match=r"mim\.yaml: train\.max_steps \(the demo's recipe for the mim stage\)"):
        demo.recipe_steps(configs)


def test_sample_grid_prints_notes_under_the_rows():
    prompts = ["a large red circle in the center"]
    images = [draw_scene(parse_caption(prompts[0]), 32)]
    plain = demo.sample_grid([("mim", images)], prompts, cell=64)
    noted = demo.sample_grid([("mim", images)], prompts, cell=64, notes=["mim: stopped by --minutes-mim 1 at 10/3000"])
    assert noted.width == plain.width and noted.height > plain.height
    below = noted.crop((0, plain.height, noted.width, noted.height)).convert("RGB")
    assert any(r > 120 and g < 60 for r, g, b in np.asarray(below).reshape(-1, 3))  # the note, in red


def test_a_capped_stage_says_what_share_of_the_recipe_it_trained(tmp_path, capsys):
    configs = tiny_configs(tmp_path / "configs")
    with open(os.path.join(configs, "vqgan.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["train"]["max_steps"] = 4
    with open(os.path.join(configs, "vqgan.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config-dir", configs, "--num-train", "12", "--num-val", "4", "--images-per-prompt",
            "1", "--skip-gpt", "--minutes-vqgan", "1e-6"]  # the cap ends the VQGAN after its first step
    result = demo.run_demo(demo.build_parser().parse_args(argv))
    printed = capsys.readouterr().out
    line = "vqgan: stopped by --minutes-vqgan 1e-06 at 1/4 steps, 25% of the recipe: quality will be lower than the recipe's"
    assert result["capped"] == [line] and f"[demo] note: {line}" in printed
    assert "capped by --minutes-vqgan 1e-06" in printed  # said up front too
    with Image.open(out / "samples.png") as grid:  # the note is drawn under the samples
        assert grid.height > demo.sample_grid([("mim", [Image.new("RGB", (32, 32))] * 8)], DEMO_PROMPTS).height
    assert demo.run_demo(demo.build_parser().parse_args(argv))["capped"] == [line]  # reused: still reported


# ----------------------------------------------------------------------------------------------- same command, same bits


class CpuHog:
    """Busy-looping processes beside the test (a machine running other work)."""

    def __init__(self, count=1):
        self.count = count

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.wait()


def demo_files(out) -> dict:
    names = [f"{kind}/model.safetensors" for kind in ("vqgan", "mim", "gpt")] + ["samples.png", "data/tokenizer.model"]
    return {name: (out / name).read_bytes() for name in names if (out / name).is_file()}


def same_bits_under_load(tmp_path, extra_argv, vqgan_steps, generator_steps) -> None:
    configs = tiny_configs(tmp_path / "configs")
    for name, steps in (("vqgan", vqgan_steps), ("mim", generator_steps), ("gpt", generator_steps)):
        with open(os.path.join(configs, f"{name}.yaml"), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        cfg["train"].update(max_steps=steps, warmup_steps=1)
        with open(os.path.join(configs, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f)
    files, out = [], tmp_path / "demo"
    for hog in (contextlib.nullcontext(), CpuHog()):
        shutil.rmtree(out, ignore_errors=True)  # a second run from nothing, into the same place
        with hog:
            assert demo.main(["--out", str(out), "--config-dir", configs, "--num-train", "16", "--num-val", "4",
                              "--images-per-prompt", "1", *extra_argv]) == 0
        files.append(demo_files(out))
    assert len(files[0]) == len(files[1]) >= 4
    assert [name for name in files[0] if files[0][name] != files[1][name]] == []


def test_same_command_same_bits_with_a_cpu_hog_beside_it(tmp_path):
    """The recipe is steps, the lr follows them and the threads are fixed: a busy machine only takes longer."""
    same_bits_under_load(tmp_path, ["--skip-gpt", "--threads", "1"], vqgan_steps=3, generator_steps=6)


@pytest.mark.slow
def test_same_bits_with_the_generators_side_by_side_under_a_cpu_hog(tmp_path):
    same_bits_under_load(tmp_path, [], vqgan_steps=30, generator_steps=60)


def test_demo_on_the_glyphs_dataset(tmp_path, capsys):
    out = tmp_path / "glyphs"
    argv = ["--dataset", "glyphs", "--out", str(out), "--config-dir", tiny_configs(tmp_path / "configs"),
            "--num-train", "12", "--num-val", "4", "--images-per-prompt", "1", "--skip-gpt"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "12 training rows of glyphs" in printed and "match their prompt in colour, char and position" in printed
    captions = [line.split("\t")[1] for line in (out / "data" / "train.tsv").read_text(encoding="utf-8").splitlines()]
    assert all(("letter" in c or "digit" in c or "字母" in c or "数字" in c) for c in captions)
    assert f'--prompt "{GLYPH_PROMPTS[0]}"' in printed
    with Image.open(out / "samples.png") as grid:
        assert grid.width == 56 + len(GLYPH_PROMPTS) * demo_grid.CELL
