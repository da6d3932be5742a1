"""Generate (or edit) images from a trained transformer run directory.

    python generate.py --model RUN_DIR --prompt "a red circle" "一只猫" --num-images 4 --out-dir outputs/
    python generate.py --model RUN_DIR --input prompts.tsv --output predictions.tsv   # EasyNLP predict schema
    python generate.py --model RUN_DIR --prompt "a cat" --init-image in.png --mask mask.png --edit-mode inpaint
    python generate.py --model RUN_DIR --lora STYLE_RUN:0.8 --lora OTHER_RUN:0.5 --prompt "an orange square"
    python generate.py --model CAPTIONER_DIR --caption a.png b.png            # image -> text: idx \t caption
    python generate.py --model CAPTIONER_DIR --caption-input images.tsv --output captions.tsv   # idx \t imgbase64

Image i of the request (prompt-major) uses seed + i, so any single image can be regenerated alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tokenpaint.pipeline import (EDIT_MODES, INFERENCE_DTYPES, QUANT_DTYPES, Pipeline, check_edit_mode,
                                 check_run_dir, default_edit_mode, make_grid)
from tokenpaint.sampling import CAPTION_OPTIONS, OptionError, SampleOptions, check_option, check_seeds
from tokenpaint.transformer.lora import parse_lora_spec

SAMPLE_FLAGS = ("steps", "guidance_scale", "top_k", "top_p", "temperature", "jacobi_window")  # options with a flag
# option names whose flag is not `--` + the name with dashes
FLAGS = {"mode": "--edit-mode", "mask": "--mask", "use_kv_cache": "--no-kv-cache"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="transformer run directory (train.py transformer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="one or more prompts")
    src.add_argument("--input", metavar="PROMPTS.tsv", help="prompt TSV: idx \\t text")
    src.add_argument("--caption", nargs="+", action="extend", metavar="IMG",
                     help="caption these image files (a GPT trained with model.directions holding i2t)")
    src.add_argument("--caption-input", metavar="IMAGES.tsv", help="caption an image TSV: idx \\t imgbase64")
    p.add_argument("--output", metavar="OUT.tsv",
                   help="write idx \\t text \\t b64png[,b64png...] (captioning: idx \\t text; default stdout)")
    p.add_argument("--out-dir", metavar="DIR", help="write {idx}_{k}.png (default outputs/ when --output is not given)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, help="masked decoding steps (mim)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (1 = off)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="replaces the empty prompt of guidance")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, help="nucleus sampling in [0, 1] (gpt; 0 = only the most likely id)")
    p.add_argument("--temperature", type=float, help="captioning: 0 is greedy (default: the run's caption_temperature, 0)")
    p.add_argument("--num-captions", type=int, default=1, help="captions per image (one output row each)")
    p.add_argument("--max-length", type=int, metavar="N", help="captioning: at most N text ids (default text_len)")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the whole sequence each step (gpt)")
    p.add_argument("--jacobi-window", type=int, metavar="W",
                   help="gpt: speculative Jacobi decoding, W draft tokens per pass (same distribution, fewer passes)")
    p.add_argument("--init-image", metavar="PATH", help="edit this image instead of generating from scratch")
    p.add_argument("--mask", metavar="PATH", help="white = regenerate (same size as --init-image)")
    p.add_argument("--strength", type=float, default=0.6, help="img2img: share of tokens regenerated")
    p.add_argument("--edit-mode", choices=EDIT_MODES,
                   help="default: inpaint with --mask, else img2img (mim) / continue (gpt)")
    p.add_argument("--grid", action="store_true", help="also write grid.png (a row per prompt)")
    p.add_argument("--dtype", choices=sorted(INFERENCE_DTYPES), default="float32",
                   help="cast the generator once; int8: int8 weights (faster decoding on CPU, docs/PERFORMANCE.md)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: all cores)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA adapter (a `train.py transformer --lora` run directory or its lora.safetensors) "
                        "at SCALE (default 0.8); repeat to mix several")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator first (pays off for many images on a GPU; see benchmarks/)")
    return p


def flag(option: str) -> str:
    """The command-line flag of an option name (as OptionError names it)."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def sample_options(args) -> dict:
    """The sampler options given on the command line (the others keep the run's defaults)."""
    given = {name: getattr(args, name) for name in SAMPLE_FLAGS if getattr(args, name) is not None}
    return {**given, "use_kv_cache": not args.no_kv_cache}


def check_args(parser: argparse.ArgumentParser, args) -> tuple[list[tuple[str, str]], str]:
    """Every check that needs no model weights; returns ([(idx, text)], generator kind)."""
    config = Path(args.model) / "config.json"
    try:
        check_run_dir(args.model)
    except FileNotFoundError as e:
        parser.error(f"--model: {e}")
    captioning = args.caption is not None or args.caption_input is not None
    try:
        model_config = json.loads(config.read_text(encoding="utf-8"))
        kind = model_config.get("kind")
    except json.JSONDecodeError as e:
        parser.error(f"--model: {config}: invalid JSON at line {e.lineno}: {e.msg}")
    try:
        for name in ("num_images", "batch_size", "strength", "seed"):
            check_option(name, getattr(args, name))
        if captioning:  # the caption call's arguments follow the caption_* options' rules (temperature 0: greedy)
            for name in CAPTION_OPTIONS:
                if getattr(args, name) is not None:
                    check_option("caption_" + name, getattr(args, name), name)
        SampleOptions().replace(**{k: v for k, v in sample_options(args).items()
                                   if not (captioning and k in CAPTION_OPTIONS)})
    except OptionError as e:
        parser.error(f"{flag(e.name)}: {e}")
    if args.num_captions < 1:
        parser.error(f"--num-captions must be >= 1, got {args.num_captions}")
    check_device(parser, args.device)
    if (args.jacobi_window or 1) > 1 and args.no_kv_cache:
        parser.error("--jacobi-window needs the KV cache; drop --no-kv-cache")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.lora = [parse_lora(parser, spec) for spec in args.lora]
    directions = model_config.get("directions", ["t2i"]) if kind == "gpt" else ["t2i"]
    if captioning:
        source = "--caption" if args.caption is not None else "--caption-input"
        if "i2t" not in directions:
            what = "a masked (mim) model" if kind == "mim" else f"a GPT trained for text-to-image only " \
                                                               f"(model.directions: {directions})"
            parser.error(f"{source}: {args.model} is {what} and cannot caption images; train a GPT with "
                         f"model.directions [i2t] or [t2i, i2t] (configs/demo/captioner.yaml, gpt_both.yaml)")
        for wrong, value in (("--init-image", args.init_image), ("--mask", args.mask), ("--out-dir", args.out_dir),
                             ("--grid", args.grid), ("--negative-prompt", args.negative_prompt)):
            if value:
                parser.error(f"{wrong} does not apply to {source} (captioning writes idx \\t text)")
        for path in args.caption or [args.caption_input]:
            if not os.path.isfile(path):
                parser.error(f"{source}: file {path} does not exist")
        return [], kind
    if "t2i" not in directions:
        parser.error(f"{'--prompt' if args.prompt is not None else '--input'}: {args.model} is a captioner "
                     f"(model.directions: {directions}) and cannot generate images; use --caption IMG or "
                     f"--caption-input IMAGES.tsv")
    editing = [name for name, value in (("--mask", args.mask), ("--edit-mode", args.edit_mode)) if value]
    if editing and not args.init_image:
        parser.error(f"{editing[0]} needs --init-image")
    for name, path in (("--init-image", args.init_image), ("--mask", args.mask), ("--input", args.input)):
        if path and not os.path.exists(path):
            parser.error(f"{name}: file {path} does not exist")
        if path and not os.path.isfile(path):
            parser.error(f"{name}: {path} is not a regular file (a directory, FIFO or device)")
    check_images(parser, args)
    if args.init_image:
        args.edit_mode = args.edit_mode or default_edit_mode(kind, has_mask=args.mask is not None)
        try:
            check_edit_mode(kind, args.edit_mode, has_mask=args.mask is not None)
        except OptionError as e:
            parser.error(f"{flag(e.name)}: {e}")
    if args.prompt is not None:
        prompts = [(str(i), text) for i, text in enumerate(args.prompt)]
    else:
        from tokenpaint.data import read_prompts

        try:
            prompts = read_prompts(args.input)
        except ValueError as e:
            parser.error(f"--input: {e}")
        if not prompts:
            parser.error(f"--input: {args.input} holds no prompts")
    try:  # image i of the request uses seed + i
        check_seeds(args.seed, len(prompts) * args.num_images)
    except OptionError as e:
        parser.error(f"--seed: {e}")
    return prompts, kind


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """--device names a device this machine has: cpu, cuda[:N] or mps."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device}: not a device (expected cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            parser.error(f"--device {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        parser.error(f"--device {device}: not a device to generate on (expected cpu, cuda, cuda:N or mps)")


def check_images(parser: argparse.ArgumentParser, args) -> None:
    """--init-image and --mask are images (under the data limits: formats, pixels, file size) of the same size."""
    from tokenpaint.data.images import ImageLimits, decode_image, read_regular_file

    limits, sizes = ImageLimits(allow_outside_paths=True), {}
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path:
            try:
                sizes[flag] = decode_image(read_regular_file(path, limits.max_file_bytes), limits).size
            except (OSError, ValueError, SyntaxError) as e:
                parser.error(f"{flag} {path}: not a usable image ({e})")
    if "--mask" in sizes and "--init-image" in sizes and sizes["--mask"] != sizes["--init-image"]:
        (mw, mh), (iw, ih) = sizes["--mask"], sizes["--init-image"]
        parser.error(f"--mask {args.mask} is {mw}x{mh} pixels, --init-image {args.init_image} is {iw}x{ih}: they "
                     f"must be the same size")


def output_paths(args) -> tuple[str | None, str | None]:
    """(folder of the PNGs or None, the grid's path or None); captioning writes no images."""
    if args.caption is not None or args.caption_input is not None:
        return None, None
    out_dir = args.out_dir or (None if args.output else "outputs")
    grid = None
    if args.grid:
        grid = os.path.join(out_dir, "grid.png") if out_dir else str(Path(args.output).with_suffix(".grid.png"))
    return out_dir, grid


def check_outputs(parser: argparse.ArgumentParser, args) -> None:
    """Every output location can be written, checked before any sampling (a folder is created, a probe file written
    and removed), so that no generated image is lost to a bad path at the end."""
    import tempfile

    out_dir, _ = output_paths(args)
    if args.output and os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a folder; expected a file name such as out.tsv")
    folders = [("--out-dir", out_dir), ("--output", os.path.dirname(os.path.abspath(args.output)) if args.output
                                        else None)]
    for flag, folder in folders:
        if folder is None:
            continue
        if os.path.exists(folder) and not os.path.isdir(folder):
            parser.error(f"{flag}: {folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            parser.error(f"{flag}: cannot write to {folder}: {e.strerror or e}")


def parse_lora(parser: argparse.ArgumentParser, spec: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); the path must exist."""
    try:
        path, scale = parse_lora_spec(spec)
    except ValueError as e:
        parser.error(f"--lora {e}")
    if not os.path.exists(path):
        parser.error(f"--lora {spec}: no LoRA adapter at {path}")
    return path, scale


def load_pipeline(parser: argparse.ArgumentParser, args) -> Pipeline:
    """The run's Pipeline with --threads, --dtype, --device, the --lora adapters and --compile applied."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    quantize_after_lora = args.dtype in QUANT_DTYPES and args.lora  # int8 layers take no LoRA hooks: fuse first
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=None if quantize_after_lora else args.dtype)
    for path, scale in args.lora:
        try:
            pipe.load_lora(path, scale=scale)
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"--lora {path}: {e}")
    if quantize_after_lora:
        pipe.fuse_lora().quantize(args.dtype)
    if args.compile:
        pipe.compile()
    return pipe


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts, _ = check_args(parser, args)
    check_outputs(parser, args)
    if args.caption is not None or args.caption_input is not None:
        return caption_main(parser, args)
    out_dir, grid_path = output_paths(args)

    pipe = load_pipeline(parser, args)
    options = dict(negative_prompt=args.negative_prompt, batch_size=args.batch_size, progress=True,
                   **sample_options(args))
    n = args.num_images
    if args.init_image:
        images = []
        for j, (_, text) in enumerate(prompts):  # image i of the request keeps the seed seed + i
            images += pipe.edit(text, args.init_image, mask=args.mask, mode=args.edit_mode, strength=args.strength,
                                seed=args.seed + j * n, num_images=n, **options)
    else:
        images = pipe([text for _, text in prompts], num_images=n, seed=args.seed, **options)
    per_prompt = [images[j * n : (j + 1) * n] for j in range(len(prompts))]

    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for (idx, _), row in zip(prompts, per_prompt):
            safe_idx = idx.replace(os.sep, "_")
            for k, image in enumerate(row):
                image.save(os.path.join(out_dir, f"{safe_idx}_{k}.png"))
    if grid_path:
        make_grid(images, columns=n).save(grid_path)
    if args.output:
        from tokenpaint.data import write_output_tsv

        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_output_tsv(args.output, [(idx, text, row) for (idx, text), row in zip(prompts, per_prompt)])
    where = " and ".join(x for x in (out_dir, args.output) if x)
    print(f"wrote {len(images)} image(s) for {len(prompts)} prompt(s) to {where}", file=sys.stderr)
    return 0


def caption_main(parser: argparse.ArgumentParser, args) -> int:
    """--caption / --caption-input: `idx \\t caption` rows (one per caption) to --output or stdout."""
    from tokenpaint.data import BadRowError, read_images, write_text_tsv

    if args.caption is not None:
        images = [(str(i), path) for i, path in enumerate(args.caption)]
    else:
        try:
            images = read_images(args.caption_input)
        except BadRowError as e:
            parser.error(f"--caption-input: {e}")
        if not images:
            parser.error(f"--caption-input: {args.caption_input} holds no images")
    pipe = load_pipeline(parser, args)
    n = args.num_captions
    captions = pipe.caption([image for _, image in images], num_captions=n, seed=args.seed,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_length=args.max_length, batch_size=args.batch_size,
                            use_kv_cache=not args.no_kv_cache, progress=True)
    rows = [(idx, captions[j * n + k]) for j, (idx, _) in enumerate(images) for k in range(n)]
    if args.output:
        write_text_tsv(args.output, rows)
        print(f"wrote {len(rows)} caption(s) of {len(images)} image(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.writelines(f"{idx}\t{text}\n" for idx, text in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
