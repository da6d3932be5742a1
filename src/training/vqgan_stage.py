"""VQGAN training stage: taming's recipe (L1 + LPIPS + codebook loss, hinge PatchGAN with adaptive weight; optionally
an MSE term, loss.l2_weight, as LlamaGen and MaskGIT use) in plain PyTorch, with codebook health (usage, perplexity,
dead-code restarts), validation, EMA, bf16 autocast, exact resume, graceful stop and DDP.

Run directory: config.json + model.safetensors (VQGAN.from_pretrained(DIR)), train_config.yaml, metrics.jsonl,
checkpoints/step_XXXXXXXX.pt, samples/recon_XXXXXXXX.png.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time

import torch
from einops import rearrange

from ..data.images import tensor_to_pil
from ..utils import STRING, TRAIN_SEED, Section, integer, number, number_list, one_of
from ..vqgan import VQGAN, VQGANConfig
from ..vqgan.losses import LPIPS, NLayerDiscriminator, adaptive_generator_weight, hinge_d_loss
from .codebook import CodebookMonitor
from .common import (EMA, CheckpointManager, GracefulStop, MetricsLogger, ResumableBatches, TimeBudget, TrainOptions,
                     capture_rng, check_finite, claim_run_directory, cleanup_distributed, cosine_lr, is_distributed,
                     is_main, load_config, maybe_compile, progress_bar, report_finish, resolve_bf16, restore_rng,
                     save_yaml, set_seed, settle_decay_with_budget, setup_distributed, start_or_resume, sync_progress)
from .model_card import write_model_card

LOSS_DEFAULTS = dict(l1_weight=1.0, l2_weight=0.0, perceptual_weight=1.0, codebook_weight=1.0, lpips_vgg=None,
                     lpips_lin=None, discriminator=True, disc_start=0, disc_weight=0.75, disc_factor=1.0,
                     disc_num_layers=2, disc_ndf=64)
TRAIN_DEFAULTS = dict(batch_size=8, grad_accum=1, max_steps=10000, lr=None, base_lr=4.5e-6, lr_schedule="constant",
                      warmup_steps=0, min_lr=0.0, decay_steps=None, decay_with_budget=True, bf16=False, ema_decay=None,
                      betas=(0.5, 0.9), grad_clip=None, compile=False, log_every=50, sample_every=1000, val_images=256,
                      ckpt_every=1000, keep_checkpoints=3, num_workers=0, usage_window=100, restart_after=None,
                      restart_draw="uniform", seed=0)
DATA_DEFAULTS = dict(resolution=None, shuffle=True, shuffle_buffer=1024)
# Types beyond what the defaults imply, and ranges: checked when the file is read (load_config names file, line, key).
LOSS_CHECKS = {**{k: number(0) for k in ("l1_weight", "l2_weight", "perceptual_weight", "codebook_weight",
                                          "disc_weight", "disc_factor")},
               "lpips_vgg": STRING.or_none(), "lpips_lin": STRING.or_none(), "disc_start": integer(0),
               "disc_num_layers": integer(1), "disc_ndf": integer(1)}
TRAIN_CHECKS = {**{k: integer(1) for k in ("batch_size", "grad_accum", "max_steps", "log_every", "sample_every",
                                            "val_images", "ckpt_every", "keep_checkpoints", "usage_window")},
                "lr": number(0).or_none("base_lr x global batch"), "base_lr": number(0),
                "lr_schedule": one_of("constant", "cosine"), "warmup_steps": integer(0), "min_lr": number(0),
                "decay_steps": integer(1).or_none("max_steps"), "bf16": one_of(True, False, "auto"),
                "ema_decay": number(0, 1, lo_open=True, hi_open=True).or_none("no EMA"),
                "betas": number_list(2, number(0, 1, hi_open=True)),
                "grad_clip": number(0).or_none("0 or null: no clipping"), "num_workers": integer(0),
                "restart_after": integer(1).or_none("no restarts"), "seed": TRAIN_SEED}
SCHEMA = {"model": VQGANConfig, "loss": Section(LOSS_DEFAULTS, LOSS_CHECKS),
          "train": Section(TRAIN_DEFAULTS, TRAIN_CHECKS),
          "data": Section(DATA_DEFAULTS, {"resolution": integer(1).or_none("model.resolution"),
                                          "shuffle_buffer": integer(1)})}


def resolve_config(opts: TrainOptions, world_size: int) -> dict:
    """The config file (or the checkpoint's config on --resume) with the command line's overrides applied."""
    cfg = load_config(opts.config, SCHEMA)  # the model section is checked by VQGANConfig there, naming the line
    train = cfg["train"]
    if opts.batch_size is not None:
        train["batch_size"] = opts.batch_size
    if opts.max_steps is not None:
        train["max_steps"] = opts.max_steps
    if opts.seed is not None:
        train["seed"] = opts.seed
    settle_decay_with_budget(train, opts)
    if train["lr"] is None:  # taming: lr = base_lr x global batch
        train["lr"] = train["base_lr"] * train["batch_size"] * train["grad_accum"] * world_size
    if cfg["data"]["resolution"] is None:
        cfg["data"]["resolution"] = cfg["model"].get("resolution", VQGANConfig().resolution)
    return cfg


def _learning_rate(train: dict, step: int, time_fraction: float) -> float:
    """`time_fraction`: share of the --max-minutes budget used; with decay_with_budget the cosine follows it too."""
    if train["lr_schedule"] == "constant":
        return train["lr"] * min(1.0, (step + 1) / train["warmup_steps"]) if train["warmup_steps"] else train["lr"]
    decay = train["decay_steps"] or train["max_steps"]
    return cosine_lr(step, train["warmup_steps"], decay, train["lr"], train["min_lr"],
                     time_fraction if train["decay_with_budget"] else 0.0)


def _make_lpips(loss_cfg: dict, device) -> LPIPS | None:
    if loss_cfg["perceptual_weight"] == 0:
        return None
    vgg, lin = loss_cfg["lpips_vgg"], loss_cfg["lpips_lin"]
    if not vgg or not lin:
        if is_main():
            print("note: loss.lpips_vgg / loss.lpips_lin not given: training WITHOUT the perceptual (LPIPS) term",
                  file=sys.stderr)
        return None
    return LPIPS(vgg, lin).to(device)


@torch.no_grad()
def evaluate(model: VQGAN, dataset, batch_size: int, max_images: int, device, bf16: bool) -> tuple[dict, torch.Tensor]:
    """Val L1, PSNR (dB, images in [0,1], per image), code usage over the val images; plus a recon grid tensor."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    world = torch.distributed.get_world_size() if is_distributed() else 1
    limit = math.ceil(max_images / world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # l1 sum, psnr sum, images
    used = torch.zeros(model.codebook_size, dtype=torch.int32, device=device)
    grid = None
    for batch in loader:
        x = batch["image"][: limit - int(sums[2])].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x_hat, q = model(x)
        x_hat = x_hat.float().clamp(-1, 1)
        mse = ((x_hat - x) / 2).pow(2).flatten(1).mean(1)  # per image, on the [0,1] scale
        sums += torch.stack([(x_hat - x).abs().flatten(1).mean(1).sum(), (10 * torch.log10(1 / mse.clamp_min(1e-10))).sum(),
                             torch.tensor(float(x.shape[0]), device=device)]).double()
        used[q.ids.flatten()] = 1
        if grid is None:
            grid = rearrange(torch.stack([x[:8], x_hat[:8]]).cpu(), "r b c h w -> c (r h) (b w)")  # originals above
        if sums[2] >= limit:
            break
    if is_distributed():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    model.train(was_training)
    n = max(1.0, float(sums[2]))
    return {"val_l1": float(sums[0]) / n, "val_psnr": float(sums[1]) / n,
            "val_usage": float(used.float().mean()), "val_images": int(sums[2])}, grid


def save_grid(grid: torch.Tensor, path: str) -> None:
    """A [3, H, W] grid in [-1, 1] (clamped) -> PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensor_to_pil(grid).save(path)


class _LatentCatcher:
    """Keeps the last quant_conv output (the quantizer's input) for dead-code restarts, without a second forward."""

    def __init__(self, module):
        self.latents = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.latents = rearrange(output.detach().float(), "b d h w -> (b h w) d")


def train_vqgan(opts: TrainOptions) -> dict:
    """Train (or resume) a VQGAN; returns a summary dict (steps, stop reason, last val metrics, bad rows)."""
    from ..data import TSVImageText

    info = setup_distributed()
    we_started_dist = is_distributed()
    try:
        with claim_run_directory(opts):
            return _train(opts, info, TSVImageText)
    finally:
        if we_started_dist:
            cleanup_distributed()


def _train(opts: TrainOptions, info, TSVImageText) -> dict:
    device = info.device
    ckpts = CheckpointManager(os.path.join(opts.out, "checkpoints"), keep_last=1)
    cfg, resume_state = start_or_resume(opts, ckpts, lambda: resolve_config(opts, info.world_size))
    mcfg, lcfg, tcfg, dcfg = cfg["model"], cfg["loss"], cfg["train"], cfg["data"]
    ckpts.keep_last = tcfg["keep_checkpoints"]
    seed = tcfg["seed"]

    set_seed(seed)
    model = VQGAN(VQGANConfig.from_dict(mcfg)).to(device)
    disc = (NLayerDiscriminator(3, lcfg["disc_ndf"], lcfg["disc_num_layers"]).to(device)
            if lcfg["discriminator"] else None)
    lpips = _make_lpips(lcfg, device)
    betas = tuple(tcfg["betas"])  # taming's (0.5, 0.9) suit the adversarial game
    opt_g = torch.optim.Adam(model.parameters(), lr=tcfg["lr"], betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tcfg["lr"], betas=betas) if disc is not None else None
    ema = EMA(model, tcfg["ema_decay"]) if tcfg["ema_decay"] else None
    monitor = CodebookMonitor(model.codebook_size, tcfg["usage_window"], tcfg["restart_after"], seed,
                              tcfg["restart_draw"])
    catcher = _LatentCatcher(model.quant_conv)

    dataset = TSVImageText(opts.data, dcfg["resolution"], bad_rows=opts.bad_rows, shuffle=dcfg["shuffle"], seed=seed,
                           shuffle_buffer=dcfg["shuffle_buffer"], limits=opts.image_limits)
    batches = ResumableBatches(dataset, tcfg["batch_size"], tcfg["num_workers"], seed, name=opts.data)
    val_set = (TSVImageText(opts.val, dcfg["resolution"], bad_rows=opts.bad_rows, limits=opts.image_limits)
               if opts.val else None)

    step = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt_g.load_state_dict(resume_state["opt_g"])
        if disc is not None:
            disc.load_state_dict(resume_state["disc"])
            opt_d.load_state_dict(resume_state["opt_d"])
        if ema is not None:
            ema.load_state_dict(resume_state["ema"])
        monitor.load_state_dict(resume_state["codebook"])
        batches.load_state_dict(resume_state["data"])
        restore_rng(resume_state["rng"])
        step = resume_state["step"]
    if is_main():
        os.makedirs(opts.out, exist_ok=True)
        save_yaml(os.path.join(opts.out, "train_config.yaml"), cfg)

    ddp_model = model
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    forward = maybe_compile(ddp_model, tcfg["compile"] if opts.compile is None else opts.compile)

    metrics = MetricsLogger(opts.out, resume_step=step if resume_state is not None else None)
    max_steps, accum = tcfg["max_steps"], tcfg["grad_accum"]
    bf16 = resolve_bf16(tcfg["bf16"], device, where=f"{opts.config or ckpts.latest()}: train.bf16")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    last_ckpt = ckpts.latest()
    budget = TimeBudget(opts.max_minutes, resume_state.get("train_seconds", 0.0) if resume_state else 0.0)
    budget.check_not_spent(last_ckpt)
    time_fraction = budget.fraction()
    stop_reason, last_val = "max_steps", None
    bar = progress_bar(max_steps, step, f"vqgan{' x%d' % info.world_size if info.world_size > 1 else ''}")
    t_last, images_since = time.monotonic(), 0

    def save_checkpoint() -> str:
        state = {"step": step, "model": model.state_dict(), "opt_g": opt_g.state_dict(),
                 "disc": disc.state_dict() if disc is not None else None,
                 "opt_d": opt_d.state_dict() if opt_d is not None else None,
                 "ema": ema.state_dict() if ema is not None else None, "codebook": monitor.state_dict(),
                 "data": batches.state_dict(), "rng": capture_rng(), "config": cfg,
                 "train_seconds": budget.spent_seconds()}
        return ckpts.save(state, step) if is_main() else ckpts.path_for(step)

    def validate_and_sample() -> dict:
        eval_model = model
        if ema is not None:
            eval_model = copy.deepcopy(model)
            ema.copy_to(eval_model)
        result, grid = evaluate(eval_model, val_set, tcfg["batch_size"], tcfg["val_images"], device, bf16)
        if is_main() and grid is not None:
            save_grid(grid, os.path.join(opts.out, "samples", f"recon_{step:08d}.png"))
        metrics.log(step, **result)
        return result

    with GracefulStop() as stop:
        while step < max_steps:
            lr = _learning_rate(tcfg, step, time_fraction)
            for group in opt_g.param_groups + (opt_d.param_groups if opt_d is not None else []):
                group["lr"] = lr
            disc_on = disc is not None and step >= lcfg["disc_start"]
            micro = [next(batches)["image"].to(device) for _ in range(accum)]
            logs: dict[str, float] = {}

            # --- generator (autoencoder) step
            if disc is not None:
                disc.requires_grad_(False)
            opt_g.zero_grad(set_to_none=True)
            fakes = []
            for i, x in enumerate(micro):
                sync = ddp_model.no_sync if (i < accum - 1 and ddp_model is not model) else contextlib.nullcontext
                with sync():
                    with autocast():
                        x_hat, q = forward(x)
                        x_hat = x_hat.float()
                        error = x - x_hat
                        rec, rec_l2 = error.abs().mean(), error.pow(2).mean()  # L1 (taming), MSE (loss.l2_weight)
                        p_loss = lpips(x, x_hat).mean() if lpips is not None else torch.zeros((), device=device)
                        nll = lcfg["l1_weight"] * rec + lcfg["l2_weight"] * rec_l2 + lcfg["perceptual_weight"] * p_loss
                        loss = nll + lcfg["codebook_weight"] * q.loss.float()
                        if disc_on:
                            g_loss = -disc(x_hat).float().mean()
                            d_weight = adaptive_generator_weight(nll, g_loss, model.decoder.conv_out.weight,
                                                                 lcfg["disc_weight"])
                            loss = loss + d_weight * lcfg["disc_factor"] * g_loss
                            _acc(logs, g_loss=g_loss, d_weight=d_weight)
                    check_finite(loss, step + 1, last_ckpt)
                    (loss / accum).backward()
                fakes.append(x_hat.detach())
                monitor.observe(q.ids, step + 1)
                _acc(logs, loss=loss, rec_loss=rec, l2_loss=rec_l2, p_loss=p_loss, q_loss=q.loss,  # rec_loss: L1
                     perplexity=q.perplexity)
            if tcfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            opt_g.step()

            # --- discriminator step
            if disc_on:
                disc.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                for x, fake in zip(micro, fakes):
                    with autocast():  # real and fake in separate passes (BatchNorm statistics), as taming does
                        d_loss = hinge_d_loss(disc(x).float(), disc(fake).float())
                    check_finite(d_loss, step + 1, last_ckpt)
                    (d_loss / accum).backward()
                    _acc(logs, d_loss=d_loss)
                # Not DDP-wrapped (two forwards per backward); average its gradients by hand.
                _all_reduce_mean_grads(disc)
                opt_d.step()

            step += 1
            restarted = monitor.restart(model.quantize, catcher.latents, step, opt_g)
            if ema is not None:
                ema.update(model)
            images_since += accum * len(micro[0]) * info.world_size
            bar.update(1)

            if step % tcfg["log_every"] == 0 or step == max_steps:
                now = time.monotonic()
                means = {k: v / accum for k, v in logs.items()}
                record = dict(means, lr=lr, usage=monitor.usage(step), restarted=restarted,
                              images_per_sec=images_since / max(1e-9, now - t_last))
                metrics.log(step, **record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", usage=f"{record['usage']:.2f}",
                                img_s=f"{record['images_per_sec']:.1f}")
                t_last, images_since = now, 0
            if val_set is not None and (step % tcfg["sample_every"] == 0 or step == max_steps):
                last_val = validate_and_sample()
            if step % tcfg["ckpt_every"] == 0 and step < max_steps:
                last_ckpt = save_checkpoint()

            stop_requested, time_fraction = sync_progress(stop.requested, budget.fraction(), device)
            if (stop_requested or time_fraction >= 1.0) and step < max_steps:
                stop_reason = stop.signal_name or "time budget"
                if not stop.requested and val_set is not None and step % tcfg["sample_every"]:
                    last_val = validate_and_sample()  # the budget ended the run: report the final model
                break
        bar.close()
        catcher.handle.remove()
        last_ckpt = save_checkpoint()
        if is_main():
            final = model
            if ema is not None:
                final = copy.deepcopy(model)
                ema.copy_to(final)
            final.save_pretrained(opts.out)
    metrics.close()
    if is_main():
        cfg_model = model.config
        side, grid = dcfg["resolution"], dcfg["resolution"] // cfg_model.downsample_factor
        write_model_card(
            opts.out, title="tokenpaint VQGAN image tokenizer",
            description=f"A tokenpaint VQGAN: {side}x{side} images <-> {grid}x{grid} grids of "
                        f"ids from {cfg_model.n_embed} codes ({cfg_model.quantizer} quantizer"
                        f"{', EMA weights' if ema is not None else ''}). Train a text-to-image generator on it with "
                        "`python train.py transformer --vqgan path/to/this/folder ...`.",
            usage="import torch\nfrom tokenpaint.vqgan import VQGAN\n\n"
                  'vq = VQGAN.from_pretrained("path/to/this/folder").eval()\n'
                  f"images = torch.rand(1, 3, {side}, {side}) * 2 - 1  # float [B,3,H,W] in [-1,1]\n"
                  f"ids = vq.encode(images)  # long [B,{grid},{grid}]\n"
                  "x_hat = vq.decode(ids)  # float [B,3,H,W], not clamped",
            steps=step, max_steps=max_steps, stop_reason=stop_reason,
            images_seen=step * tcfg["batch_size"] * accum * info.world_size, data=opts.data, val=opts.val,
            tags=("vqgan", "image-tokenizer"))

    bad = batches.bad_rows_skipped
    report_finish(opts, step, max_steps, stop_reason, last_ckpt, bad)
    return {"step": step, "max_steps": max_steps, "stopped": stop_reason, "checkpoint": last_ckpt,
            "val": last_val, "bad_rows_skipped": bad, "out": opts.out}


def _all_reduce_mean_grads(module: torch.nn.Module) -> None:
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def _acc(logs: dict, **values) -> None:
    for k, v in values.items():
        logs[k] = logs.get(k, 0.0) + (float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v))
