"""Evaluation during transformer training: validation loss over the val token cache, sample grids and captions.

Both use their own seeded generators, never the global RNG, so they do not change the training run they watch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from einops import rearrange

from ..data.images import tensor_to_pil
from ..sampling import SampleOptions, sample
from ..sampling import sample_caption
from ..utils import atomic_write_bytes
from .common import is_distributed
from .transformer_data import corrupt, summed_cross_entropy


@torch.no_grad()
def validation_loss(model, cache, batch_size: int, max_batches: int, label_smoothing: float, mask_schedule: str,
                    seed: int, device, autocast) -> dict[str, float]:
    """Mean CE over the first `max_batches` x `batch_size` x ranks rows of the val cache (rank-strided shards), with
    no condition dropout and, for "mim", masks from a fixed generator: the same rows and masks at every evaluation.

    Returns {direction: loss} for each direction the model learns (every row in each of them); "t2i" for "mim"."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    kind = model.config.kind
    directions = list(getattr(model.config, "directions", ["t2i"]))
    mask_id = model.mask_token_id if kind == "mim" else None
    rows = torch.arange(min(len(cache), max_batches * batch_size * world))[rank::world]
    generator = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    totals = torch.zeros(len(directions), 2, dtype=torch.float64, device=device)  # CE sum, counted positions
    was_training = model.training
    model.eval()
    for chunk in rows.split(batch_size):
        idx = chunk.numpy()
        text = torch.from_numpy(cache.text_ids[idx].astype("int64"))
        image = torch.from_numpy(cache.image_ids[idx].astype("int64"))
        for i, direction in enumerate(directions):
            batch = corrupt(kind, text, image, generator, 0.0, mask_schedule, mask_id, direction=direction)
            with autocast():
                logits, _ = model(batch.text_ids.to(device), batch.image_ids.to(device),
                                  **({} if kind == "mim" else {"direction": direction}))
            targets = batch.targets.to(device)
            totals[i] += torch.stack([summed_cross_entropy(logits, targets, label_smoothing).double(),
                                      (targets != -100).sum().double()])
    model.train(was_training)
    if is_distributed():
        dist.all_reduce(totals)
    return {d: float(totals[i, 0] / totals[i, 1].clamp_min(1)) for i, d in enumerate(directions)}


@torch.no_grad()
def caption_samples(model, tokenizer, cache, num_images: int, path: str) -> str:
    """Greedy captions of the first `num_images` images of `cache`, written as `reference caption \t caption` lines
    (the caption direction's counterpart of `sample_grid`)."""
    n = min(num_images, len(cache))
    was_training = model.training
    model.eval()
    ids = sample_caption(model, torch.from_numpy(cache.image_ids[:n].astype("int64")).to(model.device))
    model.train(was_training)
    lines = [f"{row['text']}\t{text}\n" for row, text in zip(cache.captions()[:n], tokenizer.decode(ids))]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return path


@torch.no_grad()
def sample_grid(model, vqgan, cache, num_images: int, sample_cfg: dict, seed: int, path: str) -> str:
    """Generate images for the first `num_images` captions of `cache` and save a grid: the cached reference images
    (VQGAN reconstructions) on top, the samples below. The captions go to `samples/captions.txt`."""
    n = min(num_images, len(cache))
    device = model.device
    text = torch.from_numpy(cache.text_ids[:n].astype("int64")).to(device)
    reference = torch.from_numpy(cache.image_ids[:n].astype("int64")).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = sample(model, text, SampleOptions.from_dict(sample_cfg, source="section sample"), generator=generator)
    model.train(was_training)
    side = model.config.image_size
    grid_ids = rearrange(torch.cat([reference, ids]), "b (h w) -> b h w", h=side, w=side)
    images = vqgan.decode(grid_ids)  # [2n,3,H,W]
    grid = rearrange(images, "(r b) c h w -> c (r h) (b w)", r=2)  # references above, samples below
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensor_to_pil(grid).save(path)
    captions_path = os.path.join(os.path.dirname(path), "captions.txt")
    if not os.path.exists(captions_path):
        with open(captions_path, "w", encoding="utf-8") as f:
            f.writelines(f"{row['text']}\n" for row in cache.captions()[:n])
    return path
