"""VQGAN losses: parity with taming-transformers' LPIPS, PatchGAN discriminator, hinge loss and adaptive weight."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tokenpaint.vqgan.losses import (LPIPS, NLayerDiscriminator, PatchGANDiscriminator, VGG16Features,
                                     adaptive_generator_weight, hinge_d_loss)


@pytest.fixture
def taming_lpips(monkeypatch, tmp_path):
    """taming's lpips module, importable without torchvision/requests (stand-ins that only build our VGG16 trunk)."""
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=lambda pretrained=False: VGG16Features())
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    monkeypatch.setitem(sys.modules, "requests", types.ModuleType("requests"))
    monkeypatch.delitem(sys.modules, "taming.modules.losses.lpips", raising=False)
    monkeypatch.delitem(sys.modules, "taming.util", raising=False)
    import taming.modules.losses.lpips as lp

    return lp


def _random_lpips_files(tmp_path):
    torch.manual_seed(0)
    vgg = VGG16Features()
    vgg_state = dict(vgg.state_dict())
    vgg_state["classifier.0.weight"] = torch.randn(4, 4)  # a torchvision file also holds the classifier
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    return vgg_state, lins


def test_lpips_matches_taming(taming_lpips, monkeypatch, tmp_path):
    vgg_state, lins = _random_lpips_files(tmp_path)
    ours = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    monkeypatch.setattr(taming_lpips, "get_ckpt_path", lambda *a, **k: str(tmp_path / "vgg.pth"))
    ref = taming_lpips.LPIPS().eval()
    ref.net.load_state_dict({f"slice{1 + sum(int(k.split('.')[1]) >= b for b in (4, 9, 16, 23))}.{k[9:]}": v
                             for k, v in vgg_state.items() if k.startswith("features.")})
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected, got = ref(x, y), ours(x, y)
    assert got.shape == (2, 1, 1, 1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.training  # the lin dropout must stay off


def test_lpips_loading_is_strict_and_local(tmp_path):
    vgg_state, lins = _random_lpips_files(tmp_path)
    del vgg_state["features.28.bias"]
    vgg_state["features.99.weight"] = torch.zeros(1)
    torch.save(vgg_state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys \(1\): features\.28\.bias; unexpected keys \(1\): features\.99\.weight"):
        LPIPS(str(tmp_path / "broken.pth"), str(tmp_path / "vgg.pth"))
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        LPIPS(str(tmp_path / "no_such_file.pth"), str(tmp_path / "vgg.pth"))
    lins["lin2.model.1.weight"] = torch.rand(1, 7, 1, 1)
    torch.save(lins, tmp_path / "badlin.pth")
    with pytest.raises(ValueError, match=r"badlin\.pth.*2\.model\.1\.weight: file \(1, 7, 1, 1\)"):
        LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "badlin.pth"))


def test_discriminator_matches_taming():
    from taming.modules.discriminator.model import NLayerDiscriminator as TamingD, weights_init

    assert PatchGANDiscriminator is NLayerDiscriminator
    torch.manual_seed(1)
    ours = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=2)
    ref = TamingD(input_nc=3, ndf=8, n_layers=2).apply(weights_init)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same keys and shapes
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    stds = torch.tensor([m.weight.detach().std() for m in convs[1:]])  # N(0, 0.02) init
    assert torch.all((stds > 0.015) & (stds < 0.025))


def test_hinge_and_adaptive_weight_match_taming(taming_lpips):  # vqperceptual imports lpips
    from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator, hinge_d_loss as taming_hinge

    real, fake = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    assert torch.allclose(hinge_d_loss(real, fake), taming_hinge(real, fake))

    torch.manual_seed(2)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    out = last(h)
    nll = out.abs().mean()
    g_loss = -(out * torch.randn_like(out)).mean()
    ref = VQLPIPSWithDiscriminator.calculate_adaptive_weight(SimpleNamespace(discriminator_weight=0.75), nll,
                                                             g_loss, last_layer=last.weight)
    got = adaptive_generator_weight(nll, g_loss, last.weight, disc_weight=0.75)
    assert torch.allclose(got, ref) and not got.requires_grad
    huge = adaptive_generator_weight(nll * 1e9, g_loss * 1e-9, last.weight)
    assert huge.item() == pytest.approx(1e4)  # clamped
