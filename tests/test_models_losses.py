"""Networks (parameter counts, encoder/decoder interface) and the shared losses."""

from __future__ import annotations

import pytest
import torch

from semiseg.losses import ce_dice_loss, cross_entropy, dice_loss
from semiseg.models.base import count_trainable_parameters
from semiseg.models.smp import SmpNetwork
from semiseg.models.unet import UNet
from semiseg.ramps import sigmoid_rampup


def test_unet_has_the_uaps_parameter_count() -> None:
    net = UNet(in_channels=3, num_classes=4)
    assert count_trainable_parameters(net) == 1_814_052
    assert count_trainable_parameters(net.make_decoder()) == 633_300


def test_unet_transposed_upsampling_option() -> None:
    assert count_trainable_parameters(UNet(3, 4, upsampling="transposed")) == 1_944_612


def test_unet_encode_decode_shapes() -> None:
    net = UNet(in_channels=1, num_classes=3).eval()
    image = torch.randn(2, 1, 64, 48)
    features = net.encode(image)
    assert [f.shape[1] for f in features] == [16, 32, 64, 128, 256]
    assert features[-1].shape[-2:] == (4, 3)
    logits = net.decode(features, net.make_decoder().eval())
    assert logits.shape == (2, 3, 64, 48)
    assert torch.equal(net(image), net.decode(net.encode(image)))


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_smp_networks_follow_the_interface(arch: str) -> None:
    net = SmpNetwork(in_channels=3, num_classes=4, arch=arch, encoder_name="resnet18").eval()
    image = torch.randn(1, 3, 64, 64)
    assert net(image).shape == (1, 4, 64, 64)
    assert net.decode(net.encode(image), net.make_decoder().eval()).shape == (1, 4, 64, 64)


def test_smp_unknown_encoder_is_a_config_error() -> None:
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder_name"):
        SmpNetwork(3, 2, encoder_name="no-such-encoder")


def test_cross_entropy_ignores_pixels_and_weights_them() -> None:
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 255]]])
    manual = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert cross_entropy(logits, target) == pytest.approx(manual.item(), rel=1e-6)
    weight = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    only_first = torch.nn.functional.cross_entropy(logits[:, :, :1, :1], target[:, :1, :1])
    assert cross_entropy(logits, target, weight=weight) == pytest.approx(only_first.item() / 3, rel=1e-6)


def test_dice_is_zero_for_a_perfect_prediction_and_when_all_ignored() -> None:
    target = torch.tensor([[[0, 1], [2, 1]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)
    ignored = torch.full_like(target, 255)
    logits.requires_grad_(True)
    loss = ce_dice_loss(logits, ignored)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_dice_by_hand() -> None:
    target = torch.tensor([[[0, 1]]])
    logits = torch.zeros(1, 2, 1, 2)  # uniform probabilities 0.5
    # class 0: intersection 0.5, |P| = 1, |Y| = 1 -> dice 0.5; class 1 alike
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5)


def test_sigmoid_rampup() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert sigmoid_rampup(50, 100) == pytest.approx(torch.exp(torch.tensor(-1.25)).item())
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(500, 100) == 1.0
