"""Transformer training stage: a text-conditioned GPT or masked transformer over a trained VQGAN's image ids.

The VQGAN runs once per image (token cache in OUT/cache/), never per step. AdamW with warmup + cosine decay, gradient
clipping and accumulation, optional bf16 autocast, condition dropout, the shared masking schedule for "mim", exact
resume, graceful stop, time budget and DDP (global batch = ranks x batch_size x grad_accum, see transformer_data).

Run directory: config.json (with "kind") + model.safetensors, tokenizer.model, vqgan/, train_config.yaml,
metrics.jsonl, checkpoints/step_XXXXXXXX.pt, samples/sample_XXXXXXXX.png, cache/.

Config: the sections of tokenpaint.transformer.presets (model, tokenizer, train, sample) plus `data` (resolution:
default the VQGAN's; shuffle) and these train keys: seed, decay_steps (the cosine horizon; default max_steps, so
a run stopped by --max-steps and resumed keeps its schedule only if this is set), val_batches, sample_images,
cache_batch_size; `bf16` may be "auto". With --max-minutes alone the decay also follows the share of the time budget
used (train.decay_with_budget), so a time-limited run ends at min_lr; with --max-steps too the lr follows the steps
and the minutes only cap the run (common.settle_decay_with_budget). GPT trains with plain CE; "mim" with label smoothing
(train.label_smoothing) on masked positions. A GPT with model.directions [i2t] trains as a captioner (loss on the
caption and its end); with [t2i, i2t] half of each batch's rows train each direction, the loss is the mean of the two
directions' means (both logged as loss_t2i / loss_i2t), and samples/ holds captions_XXXXXXXX.tsv beside the grids.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

from ..data import TextTokenizer, build_token_cache, iter_rows
from ..data.cache import state_dict_hash, tokenizer_hash
from ..sampling import SampleOptions
from ..transformer import check_mask_schedule, generator_class, load_generator, model_config_from_yaml
from ..transformer.io import check_state_dict, read_generator_config
from ..transformer.presets import CONFIG_SCHEMA
from ..vqgan import VQGAN
from .common import (CheckpointManager, GracefulStop, MetricsLogger, TimeBudget, TrainOptions, capture_rng,
                     check_finite, claim_run_directory, cleanup_distributed, cosine_lr, is_distributed, is_main,
                     load_config, maybe_compile, progress_bar, report_finish, resolve_bf16, restore_rng, save_yaml,
                     set_seed, settle_decay_with_budget, setup_distributed, start_or_resume, sync_progress)
from .model_card import write_model_card
from .transformer_lora import apply_lora_options, attach_adapter, base_path, extend_tokenizer, lora_enabled
from .transformer_data import GlobalBatches, corrupt, rank_rows, split_directions, summed_cross_entropy
from .transformer_samples import caption_samples, sample_grid, validation_loss


def resolve_config(opts: TrainOptions) -> dict:
    """The YAML config (unknown sections/keys name the file and line) with the command line's overrides applied."""
    cfg = load_config(opts.config, CONFIG_SCHEMA)
    train = cfg["train"]
    for key, value in (("batch_size", opts.batch_size), ("max_steps", opts.max_steps), ("seed", opts.seed)):
        if value is not None:
            train[key] = value
    settle_decay_with_budget(train, opts)
    try:
        check_mask_schedule(train["mask_schedule"])
    except ValueError as e:
        raise ValueError(f"{opts.config}: train.mask_schedule: {e}") from None
    try:
        SampleOptions.from_dict(cfg["sample"])  # the training-time samples use these: checked before any step
    except ValueError as e:
        raise ValueError(f"{opts.config}: sample.{e}") from None
    apply_lora_options(cfg, opts, opts.config)
    return cfg


def train_transformer(opts: TrainOptions) -> dict:
    """Train (or resume) a generator; returns a summary (steps, stop reason, losses, cache reuse, bad rows)."""
    info = setup_distributed()
    we_started_dist = is_distributed()
    try:
        with claim_run_directory(opts):
            return _train(opts, info)
    finally:
        if we_started_dist:
            cleanup_distributed()


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _rank0_first(fn):
    """Run fn on rank 0, then on the other ranks (which then reuse what rank 0 wrote: tokenizer, token cache)."""
    result = fn() if is_main() else None
    _barrier()
    if not is_main():
        result = fn()
    return result


# ----------------------------------------------------------------------------- setup


def _load_vqgan_and_tokenizer(opts: TrainOptions, cfg: dict) -> tuple[VQGAN, TextTokenizer]:
    """--vqgan / --tokenizer, or those of --init-from (which must match if both are given), else train the tokenizer."""
    init = opts.init_from
    if init is not None:
        for needed in ("config.json", "model.safetensors", "tokenizer.model", "vqgan"):
            if not os.path.exists(os.path.join(init, needed)):
                raise FileNotFoundError(f"--init-from {init}: no {needed} there (expected a `train.py transformer` "
                                        f"run directory)")
    if opts.vqgan_dir is None and init is None:
        raise ValueError("--vqgan VQ_DIR is required (unless --resume or --init-from)")
    vqgan = VQGAN.from_pretrained(opts.vqgan_dir or os.path.join(init, "vqgan"))
    if init is not None and opts.vqgan_dir is not None:
        if state_dict_hash(vqgan) != state_dict_hash(VQGAN.from_pretrained(os.path.join(init, "vqgan"))):
            raise ValueError(f"--vqgan {opts.vqgan_dir} is not the VQGAN that --init-from {init} was trained with "
                             f"({os.path.join(init, 'vqgan')}): its image ids would mean other things; "
                             f"leave out --vqgan to use the run's own")
    if opts.tokenizer is not None:
        tokenizer = TextTokenizer(opts.tokenizer)
        if init is not None and tokenizer_hash(tokenizer) != tokenizer_hash(
                TextTokenizer(os.path.join(init, "tokenizer.model"))):
            raise ValueError(f"--tokenizer {opts.tokenizer} differs from the tokenizer of --init-from {init} "
                             f"({os.path.join(init, 'tokenizer.model')}); leave out --tokenizer to use the run's own")
    elif init is not None:
        tokenizer = TextTokenizer(os.path.join(init, "tokenizer.model"))
    else:
        def train_tokenizer():
            if not is_main():
                return TextTokenizer(os.path.join(opts.out, "tokenizer.model"))
            captions = (row.text for row in iter_rows(opts.data, bad_rows=opts.bad_rows))  # streamed, no images
            print(f"training a SentencePiece tokenizer (vocab {cfg['tokenizer']['vocab_size']}) on {opts.data}",
                  file=sys.stderr)
            trained = TextTokenizer.train(captions, os.path.join(opts.out, "cache", "spm", "tokenizer"),
                                          vocab_size=cfg["tokenizer"]["vocab_size"])
            return TextTokenizer(trained.save(opts.out))
        return vqgan, _rank0_first(train_tokenizer)
    if is_main():
        tokenizer.save(opts.out)
    return vqgan, tokenizer


def _init_weights_from(model, init_dir: str) -> None:
    source = load_generator(init_dir)
    if source.config.kind != model.config.kind:
        raise ValueError(f"--init-from {init_dir} holds a {source.config.kind!r} model, the config asks for "
                         f"{model.config.kind!r}")
    state = source.state_dict()
    check_state_dict(model, state, source=f"--init-from {init_dir}")  # names missing/unexpected/mismatched keys
    model.load_state_dict(state)


def _token_caches(opts, vqgan, tokenizer, resolution, text_len, batch_size, image_size):
    caches = {}
    for name, tsv in (("train", opts.data), ("val", opts.val)):
        if tsv is None:
            continue
        cache = _rank0_first(lambda: build_token_cache(
            tsv, vqgan, tokenizer, os.path.join(opts.out, "cache", name), resolution, text_len=text_len,
            batch_size=batch_size, bad_rows=opts.bad_rows, progress=is_main(), limits=opts.image_limits))
        if tuple(cache.image_grid) != (image_size, image_size):
            raise ValueError(f"token cache of {tsv} holds {cache.image_grid} ids per image, the model expects "
                             f"{image_size}x{image_size} (data.resolution / VQGAN downsample factor)")
        caches[name] = cache
    return caches


def _write_card(opts, kind, step, max_steps, stop_reason, images_seen, caches, lora_base=None,
                directions=("t2i",), new_words=()) -> None:
    what = {"gpt": "a causal GPT over [text ids ; image ids], sampled one id at a time (KV cache, top-k / top-p)",
            "mim": "a bidirectional masked transformer (MaskGIT style), sampled by iterative masked decoding"}[kind]
    if lora_base is not None:  # an adapter run: the card says how to apply it to its base
        title = f"tokenpaint LoRA adapter ({kind})"
        description = (f"A LoRA adapter (`lora.safetensors` + `lora.json`) for the tokenpaint text-to-image model "
                       f"in `{lora_base['path']}` ({what}); it only loads onto those base weights (sha256 "
                       f"{lora_base['sha256']}). Command line: `python generate.py --model path/to/base --lora "
                       f"path/to/this/folder:0.8 --prompt \"a red circle\"`.")
        if new_words:
            description += (f" It adds the words {', '.join(repr(w) for w in new_words)} to the base's tokenizer (one "
                            f"new piece each; `tokenizer.model` here is the extended tokenizer): loading it extends the "
                            f"pipeline's tokenizer and text embedding.")
        usage = ('from tokenpaint import Pipeline\n\n'
                 'pipe = Pipeline.from_pretrained("path/to/base")\n'
                 'pipe.load_lora("path/to/this/folder", scale=0.8)\n'
                 'images = pipe(["a red circle on the left"], num_images=1, seed=0)  # a list of PIL images')
    elif "i2t" in directions:  # a captioner, or one GPT for both directions
        both = "t2i" in directions
        title = f"tokenpaint {'text-to-image and image-to-text GPT' if both else 'captioner'} ({kind})"
        description = ("A tokenpaint GPT over [image ids ; text ids] that writes captions (image -> text)"
                       + (", and over [text ids ; image ids] that draws images (text -> image), every weight shared"
                          if both else "") + ": the image ids come from the VQGAN in `vqgan/`, the text ids from "
                       "`tokenizer.model`. Command line: `python generate.py --model path/to/this/folder --caption "
                       "image.png`" + (" or `--prompt \"a red circle\"`." if both else "."))
        usage = ('from PIL import Image\nfrom tokenpaint import Pipeline\n\n'
                 'pipe = Pipeline.from_pretrained("path/to/this/folder")\n'
                 'captions = pipe.caption([Image.new("RGB", (32, 32), "red")], seed=0)  # a list of strings'
                 + ('\nimages = pipe(["a red circle on the left"], num_images=1, seed=0)  # a list of PIL images'
                    if both else ''))
    else:
        title = f"tokenpaint text-to-image generator ({kind})"
        description = (f"A tokenpaint text-to-image model: {what}, conditioned on SentencePiece "
                       "text ids (`tokenizer.model`) and drawing the image ids of the VQGAN in `vqgan/`, which turns "
                       "them into pixels. Command line: `python generate.py --model path/to/this/folder --prompt "
                       "\"a red circle\"`.")
        usage = ('from tokenpaint import Pipeline\n\n'
                 'pipe = Pipeline.from_pretrained("path/to/this/folder")\n'
                 'images = pipe(["a red circle on the left"], num_images=1, seed=0)  # a list of PIL images')
    write_model_card(
        opts.out, title=title, description=description, usage=usage,
        steps=step, max_steps=max_steps, stop_reason=stop_reason, images_seen=images_seen, data=opts.data,
        data_rows=len(caches["train"]), val=opts.val, val_rows=len(caches["val"]) if "val" in caches else None,
        tags=(kind, "lora") if lora_base is not None else (kind, *(("captioning",) if "i2t" in directions else ())))


# ----------------------------------------------------------------------------- the loop


def _train(opts: TrainOptions, info) -> dict:
    device, rank, world = info.device, info.rank, info.world_size
    ckpts = CheckpointManager(os.path.join(opts.out, "checkpoints"))
    cfg, resume_state = start_or_resume(opts, ckpts, lambda: resolve_config(opts))
    lora = lora_enabled(cfg)
    if resume_state is not None:
        latest = ckpts.latest()
        vqgan = VQGAN.from_pretrained(os.path.join(base_path(opts, resume_state) if lora else opts.out, "vqgan"))
        tokenizer = TextTokenizer(os.path.join(opts.out, "tokenizer.model"))
        model_config = generator_class(cfg["model"]["kind"], latest).config_class.from_dict(cfg["model"], source=latest)
    else:
        os.makedirs(opts.out, exist_ok=True)
        vqgan, tokenizer = _load_vqgan_and_tokenizer(opts, cfg)
        resolution = cfg["data"]["resolution"] or vqgan.config.resolution
        if resolution % vqgan.downsample_factor:
            raise ValueError(f"{opts.config}: data.resolution {resolution} is not a multiple of the VQGAN's "
                             f"downsample factor {vqgan.downsample_factor}")
        cfg["data"]["resolution"] = resolution
        model_section = cfg["model"] or (read_generator_config(opts.init_from) if opts.init_from else {})
        model_config = model_config_from_yaml(  # with --init-from, no model section = the base's model
            {**cfg, "model": model_section, "source": opts.config}, text_vocab_size=tokenizer.vocab_size,
            codebook_size=vqgan.codebook_size, image_size=resolution // vqgan.downsample_factor)
        cfg["model"] = {"kind": model_config.kind, **model_config.to_dict()}  # resolved: what resume rebuilds
        if lora and cfg["lora"]["new_words"]:  # the base's tokenizer (and model size) plus the adapter's new pieces
            tokenizer = extend_tokenizer(tokenizer, cfg["lora"]["new_words"], opts.config)
            if is_main():
                tokenizer.save(opts.out)
        if is_main():
            if not lora:  # a LoRA run uses its base's VQGAN
                vqgan.save_pretrained(os.path.join(opts.out, "vqgan"))
            save_yaml(os.path.join(opts.out, "train_config.yaml"), cfg)
    tcfg, scfg = cfg["train"], cfg["sample"]
    bf16 = resolve_bf16(tcfg["bf16"], device, where=f"{latest if opts.resume else opts.config}: train.bf16")
    ckpts.keep_last = tcfg["keep_checkpoints"]
    seed, kind = tcfg["seed"], model_config.kind
    directions = list(getattr(model_config, "directions", ["t2i"]))  # a GPT may caption (i2t) or learn both
    vqgan = vqgan.to(device).prepare_for_inference()

    caches = _token_caches(opts, vqgan, tokenizer, cfg["data"]["resolution"], model_config.text_len,
                           tcfg["cache_batch_size"], model_config.image_size)
    global_batch = world * tcfg["batch_size"]
    batches = GlobalBatches(caches["train"], global_batch, seed, cfg["data"]["shuffle"], name=opts.data)

    set_seed(seed)
    model = generator_class(kind)(model_config).to(device)
    if lora:  # the frozen base and a trainable adapter; `trained` is what the optimizer, DDP and clipping see
        lora_base = {"path": base_path(opts, resume_state)}
        lora_base["sha256"] = resume_state["lora_base"]["sha256"] if resume_state is not None else None
        _init_weights_from(model, lora_base["path"])
        adapter, trained = attach_adapter(model, cfg, tokenizer, lora_base, resume_state)
    else:
        if opts.init_from is not None and resume_state is None:
            _init_weights_from(model, opts.init_from)
        trained = model
    optimizer = trained.configure_optimizers(tcfg["weight_decay"], tcfg["lr"], tuple(tcfg["betas"]), device.type)
    corruption = torch.Generator().manual_seed(seed + 1)  # condition dropout and masks, shared by all ranks
    step = 0
    if resume_state is not None:
        if not lora:
            model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        batches.load_state_dict(resume_state["data"])
        corruption.set_state(resume_state["corruption_rng"])
        restore_rng(resume_state["rng"])
        step = resume_state["step"]
    ddp_model = trained
    if is_distributed():
        ddp_model = torch.nn.parallel.DistributedDataParallel(  # each direction's pass leaves the other head unused
            trained, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len(directions) > 1)

    forward = maybe_compile(ddp_model, tcfg["compile"] if opts.compile is None else opts.compile)
    label_smoothing = getattr(model_config, "label_smoothing", 0.0) if kind == "mim" else 0.0
    mask_id = model.mask_token_id if kind == "mim" else None
    max_steps, accum = tcfg["max_steps"], tcfg["grad_accum"]
    decay_steps = tcfg["decay_steps"] or max_steps
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    metrics = MetricsLogger(opts.out, resume_step=step if resume_state is not None else None)
    last_ckpt = ckpts.latest()
    budget = TimeBudget(opts.max_minutes, resume_state.get("train_seconds", 0.0) if resume_state else 0.0)
    budget.check_not_spent(last_ckpt)
    time_fraction = budget.fraction()
    stop_reason, last_val, losses = "max_steps", None, []
    bar = progress_bar(max_steps, step, f"{kind}{' x%d' % world if world > 1 else ''}")
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.monotonic()}
    sample_rows = caches.get("val", caches["train"])

    def save_checkpoint() -> str:
        weights = {"lora": adapter.state_dict(), "lora_base": lora_base} if lora else {"model": model.state_dict()}
        state = {"step": step, **weights, "optimizer": optimizer.state_dict(),
                 "data": batches.state_dict(), "corruption_rng": corruption.get_state(), "rng": capture_rng(),
                 "config": cfg, "world_size": world, "train_seconds": budget.spent_seconds()}
        return ckpts.save(state, step) if is_main() else ckpts.path_for(step)

    def validate() -> float:
        losses = validation_loss(model, caches["val"], tcfg["batch_size"], tcfg["val_batches"], label_smoothing,
                                 tcfg["mask_schedule"], seed, device, autocast)  # {direction: loss}
        loss = sum(losses.values()) / len(losses)
        metrics.log(step, val_loss=loss, **({f"val_loss_{d}": v for d, v in losses.items()} if len(losses) > 1
                                            else {}))
        return loss

    with GracefulStop() as stop:
        while step < max_steps:
            lr = cosine_lr(step, tcfg["warmup_steps"], decay_steps, tcfg["lr"], tcfg["min_lr"],
                           time_fraction if tcfg["decay_with_budget"] else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []  # global micro-batches, identical on every rank: {direction: TrainingBatch}
            for _ in range(accum):
                parts = split_directions(*next(batches), directions)
                micro.append({d: corrupt(kind, text, image, corruption, model_config.cond_dropout,
                                         tcfg["mask_schedule"], mask_id, direction=d)
                              for d, (text, image) in parts.items()})
            counted = {d: sum(int((m[d].targets != -100).sum()) for m in micro) for d in directions}  # loss positions
            passes = [(d, m[d]) for m in micro for d in directions]
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_losses = 0.0, dict.fromkeys(directions, 0.0)
            for i, (direction, batch) in enumerate(passes):
                text, image, targets = (t.to(device) for t in rank_rows(batch, rank, world))
                sync = ddp_model.no_sync if (i < len(passes) - 1 and is_distributed()) else contextlib.nullcontext
                with sync():
                    with autocast():
                        logits, _ = forward(text, image, **({} if kind == "mim" else {"direction": direction}))
                    ce_sum = summed_cross_entropy(logits, targets, label_smoothing)
                    global_sum = ce_sum.detach().clone()
                    if is_distributed():  # every rank sees the same value, so all stop together on NaN
                        dist.all_reduce(global_sum)
                    check_finite(global_sum, step + 1, last_ckpt)
                    # DDP averages gradients over ranks: x world turns that back into the sum over the global batch;
                    # each direction's mean weighs the same
                    (ce_sum * (world / (counted[direction] * len(directions)))).backward()
                step_losses[direction] += float(global_sum) / counted[direction]
                step_loss += float(global_sum) / (counted[direction] * len(directions))
            grad_norm = None
            if tcfg["grad_clip"]:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in trained.parameters() if p.requires_grad], tcfg["grad_clip"]))
            optimizer.step()
            step += 1
            bar.update(1)
            losses.append(step_loss)
            window["loss"] += step_loss
            for d in step_losses if len(directions) > 1 else ():
                window[f"loss_{d}"] = window.get(f"loss_{d}", 0.0) + step_losses[d]
            window["steps"] += 1
            window["tokens"] += global_batch * accum * model_config.num_image_tokens

            stop_requested, time_fraction = sync_progress(stop.requested, budget.fraction(), device)
            stopping = (stop_requested or time_fraction >= 1.0) and step < max_steps
            last = stopping or step == max_steps  # the final model always gets a log line, val loss and samples
            if step == 1 or step % tcfg["log_every"] == 0 or last:
                now = time.monotonic()
                record = dict(loss=window["loss"] / window["steps"], lr=lr,
                              tokens_per_sec=window["tokens"] / max(1e-9, now - window["t0"]))
                record.update({k: v / window["steps"] for k, v in window.items() if k.startswith("loss_")})
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                metrics.log(step, **record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": now}
            if "val" in caches and (step % tcfg["val_every"] == 0 or last):
                last_val = validate()
            if is_main() and (step % tcfg["sample_every"] == 0 or last):
                if "t2i" in directions:
                    sample_grid(model, vqgan, sample_rows, tcfg["sample_images"], scfg, seed,
                                os.path.join(opts.out, "samples", f"sample_{step:08d}.png"))
                if "i2t" in directions:
                    caption_samples(model, tokenizer, sample_rows, tcfg["sample_images"],
                                    os.path.join(opts.out, "samples", f"captions_{step:08d}.tsv"))
            if step % tcfg["ckpt_every"] == 0 and not last:
                last_ckpt = save_checkpoint()
            if stopping:
                stop_reason = stop.signal_name or "time budget"
                break
        bar.close()
        last_ckpt = save_checkpoint()
        if is_main():
            adapter.save(opts.out) if lora else model.save_pretrained(opts.out)
    metrics.close()
    if is_main():
        _write_card(opts, kind, step, max_steps, stop_reason, step * global_batch * accum, caches,
                    lora_base if lora else None, directions, cfg["lora"]["new_words"] if lora else ())

    bad = caches["train"].meta.get("bad_rows_skipped", 0)
    report_finish(opts, step, max_steps, stop_reason, last_ckpt, bad)
    return {"step": step, "max_steps": max_steps, "stopped": stop_reason, "checkpoint": last_ckpt, "kind": kind,
            "losses": losses, "val_loss": last_val, "cache_reused": {k: c.reused for k, c in caches.items()},
            "bad_rows_skipped": bad, "out": opts.out}
