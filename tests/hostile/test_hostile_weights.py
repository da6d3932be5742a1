"""Hostile weight files: a crafted pickle is refused in the same words whatever torch says (and never with torch's
advice to turn the check off), corrupt weights name their file, and a config.json naming a huge generator costs
nothing before its weights are read (the model is built on the meta device and materialised from the file)."""
import json
import os
import pickle

import pytest
import torch
from tiny_generators import tiny_gpt, tiny_mim

from tokenpaint.training.common import CheckpointManager
from tokenpaint.transformer import load_generator
from tokenpaint.vqgan import VQGAN
from tokenpaint.vqgan.io import CheckpointError, UnsafeCheckpointError, read_torch_checkpoint


class _Code:
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


# torch's refusal of a pickled global, as worded by a few torch versions (the message is all that differs)
TORCH_REFUSALS = {
    "2.1": "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, "
           "but it can result in arbitrary code execution.Do it only if you get the file from a trusted source. "
           "WeightsUnpickler error: Unsupported class posix.system",
    "2.4": "Weights only load failed. This file can still be loaded, to do so you have two options \n\t(1) Re-running "
           "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary code "
           "execution. Do it only if you got the file from a trusted source.\n\t(2) Alternatively, to load with "
           "`weights_only=True` please check the recommended steps in the following error message.\n\tWeightsUnpickler "
           "error: Unsupported global: GLOBAL posix.system was not an allowed global by default. Please use "
           "`torch.serialization.add_safe_globals([system])` to allowlist this global if you trust this "
           "class/function.",
    "this torch": None,  # the real thing
}


@pytest.mark.parametrize("version", TORCH_REFUSALS)
@pytest.mark.parametrize("reader", ["training checkpoint", "taming checkpoint"])
def test_a_crafted_pickle_is_refused_as_such_in_every_torch_version(tmp_path, monkeypatch, version, reader):
    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "state_dict": {"w": torch.zeros(1)}, "evil": _Code()}, path)
    message = TORCH_REFUSALS[version]
    if message is not None:
        def refuse(*args, **kwargs):
            raise pickle.UnpicklingError(message)
        monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UnsafeCheckpointError) as e:
        CheckpointManager.load(str(path)) if reader == "training checkpoint" else VQGAN.from_pretrained(path)
    text = str(e.value)
    assert text.startswith(f"{path}: refused: the file holds a pickled Python object (posix.system)")
    assert "could run arbitrary code" in text and "nothing in the file was run" in text
    for advice in ("weights_only=False", "will likely succeed", "add_safe_globals", "allow_unsafe_pickle"):
        assert advice not in text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_checkpoint_is_named_without_torch_advice(tmp_path, damage):
    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "w": torch.zeros(100)}, path)
    data = {"truncated": path.read_bytes()[:300], "garbage": b"\x80\x02}q\x00garbage" * 10, "empty": b""}[damage]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"^{path}: ") as e:
        read_torch_checkpoint(path)
    assert "weights_only" not in str(e.value) and "will likely succeed" not in str(e.value)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_mim], ids=["gpt", "mim"])
@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_corrupt_generator_weights_name_the_file(tmp_path, make, damage):
    make().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated or corrupt safetensors file"):
        load_generator(tmp_path)


def test_a_huge_generator_config_fails_on_the_weights_before_allocating(tmp_path):
    """n_embd 2**17 wants ~10^12 bytes: built for real this fails in the allocator (or takes the machine down)."""
    tiny_gpt().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(n_embd=2**17, n_head=2**10, n_layer=48)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'model.safetensors'} does not match GPT: .*shape mismatches"):
        load_generator(tmp_path)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_mim], ids=["gpt", "mim"])
def test_generators_are_materialised_from_the_weights(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    loaded = load_generator(tmp_path)
    assert all(not p.is_meta for p in loaded.parameters()) and all(not b.is_meta for b in loaded.buffers())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    text = torch.randint(1, 40, (2, 6))
    image = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(text, image)[0], loaded(text, image)[0])
