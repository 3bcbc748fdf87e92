"""On a CUDA GPU: the fast paths are on (bf16-mixed, channels_last, features on the device, compile) and the
strategies still freeze exactly what they claim. Skipped without CUDA; run by scripts/gpu_check.sh."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from finetune.eval import evaluate
from finetune.build import build
from finetune.train import train
from tests.conftest import TINY, compose_config, fit, initial_state, snapshot

pytestmark = pytest.mark.gpu
ON_GPU = [o.replace("trainer.accelerator=cpu", "trainer.accelerator=gpu") for o in TINY]


class SeenInFit(L.Callback):
    """The module as it trains: after fit, Lightning's teardown moves it back to the CPU (Strategy.teardown) and
    reverts SyncBatchNorm to BatchNorm (DDPStrategy.teardown), so a check made after fit sees neither."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.device = module.device.type
        self.sync_batchnorm = any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())


@pytest.mark.parametrize("strategy", ["full", "freeze", "no_grad", "cached", "bitfit", "norm", "lora"])
def test_strategy_on_gpu_uses_the_fast_paths_and_freezes_exactly(tmp_path, strategy):
    if strategy == "lora":
        pytest.importorskip("peft")
    cfg = compose_config(tmp_path, [*ON_GPU, f"strategy={strategy}"])
    before = initial_state(cfg)
    seen = SeenInFit()
    trainer, module, datamodule = fit(cfg, callbacks=(seen,))
    after = {n: t.cpu() for n, t in snapshot(module).items()}
    assert str(trainer.precision) == "bf16-mixed" and seen.device == "cuda"
    assert module.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    frozen = module.strategy.frozen_names(module)  # bf16 autocast must not touch a frozen weight or buffer
    assert strategy == "full" or frozen
    for name, value in before.items():
        if name in frozen:
            assert torch.equal(value, after[name]), name
        if name.startswith("head."):
            assert not torch.equal(value, after[name]), name
    if strategy == "cached":
        assert datamodule.resident["train"][0].device.type == "cuda", "the features fit: they live on the GPU"
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []


def test_compiled_backbone_trains_saves_plain_keys_and_evaluates(tmp_path):
    cfg = compose_config(tmp_path, [*ON_GPU, "strategy=full", "compile=true", "trainer.max_epochs=1"])
    L.seed_everything(cfg.seed)
    metrics = train(cfg)
    checkpoint = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    result = evaluate(compose_config(eval_dir, [f"ckpt_path={metrics['best_checkpoint']}",
                                                "trainer.enable_progress_bar=false"], config_name="eval"))
    assert abs(result["test_acc"] - metrics["test_acc"]) <= 0.005


def test_default_precision_is_bf16_on_gpu(tmp_path):
    cfg = compose_config(tmp_path, [])
    assert cfg.trainer.precision == "bf16-mixed"


def test_a_model_trained_on_the_gpu_predicts_and_exports_as_on_the_cpu(tmp_path):
    """load_model puts the model on the GPU by default; its probabilities and the exported TorchScript's logits
    agree with the CPU's (TF32 matmuls and cuDNN allow small differences)."""
    from finetune import load_model
    from finetune.export import export

    cfg = compose_config(tmp_path, [*ON_GPU, "strategy=lora", "trainer.max_epochs=1"])
    metrics = train(cfg)
    images = list(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    on_gpu, on_cpu = load_model(metrics["best_checkpoint"]), load_model(metrics["best_checkpoint"], device="cpu")
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu(images), on_cpu(images), atol=1e-3)
    exported = export(metrics["best_checkpoint"], "torchscript", tmp_path / "export")
    assert exported["parity_max_abs_logit_diff"] < 1e-4  # exported and checked on the CPU


def test_the_store_decoded_on_the_gpu_trains_and_its_eval_pixels_match_pil(tmp_path):
    """data.store_decode=auto on a GPU: JPEGs decoded by nvJPEG in batches, PNGs by PIL, resized on the GPU; eval
    pixels within a few levels of the PIL path (another JPEG decoder and a float resize; the figure goes in the
    GPU note), and a training run with device augmentation (roi_align) freezes exactly."""
    from tests.data.test_image_store import image_run, noisy_folder

    root = noisy_folder(tmp_path / "images")
    run = image_run(root, "data.store=true", f"data.store_dir={tmp_path / 'store'}")
    on_gpu = [o.replace("trainer.accelerator=cpu", "trainer.accelerator=gpu") for o in run]
    stored, _ = build(compose_config(tmp_path, on_gpu))
    files, _ = build(compose_config(tmp_path, [o for o in on_gpu if not o.startswith("data.store")]))
    stored.prepare_data()
    assert stored.store.decoder == "torchvision-cuda" and stored.store.report["images_decoded"] == 24
    for split in ("train", "val"):
        want = torch.cat([b[0] for b in files.split_loader(split, 64, shuffle=False)]).int()
        got = torch.cat([b[0] for b in stored.split_loader(split, 64, shuffle=False)]).int()
        difference = (got - want).abs()
        print(f"{split}: GPU-decoded store vs PIL eval pixels: max {difference.max().item()}, "
              f"mean {difference.float().mean().item():.3f} levels")
        assert difference.float().mean() < 2 and difference.max() <= 32
    metrics = train(compose_config(tmp_path / "run", on_gpu))
    assert metrics["images_decoded"] == 0 and metrics["device"].startswith("cuda")
    assert json.loads((tmp_path / "run" / "param_audit.json").read_text())["violations"] == []


@pytest.mark.parametrize("strategy", ["gradual", "freeze"])
def test_sync_batchnorm_under_ddp_keeps_frozen_batchnorm_frozen(tmp_path, strategy):
    """trainer.sync_batchnorm=true: Lightning swaps every BatchNorm for a SyncBatchNorm after the strategy prepared
    the model; the frozen ones must still be in eval and unchanged (the audit checks; tests/strategies/test_staged.py simulates
    the swap on the CPU)."""
    from tests.strategies.test_staged import GRADUAL

    chosen = GRADUAL if strategy == "gradual" else ["strategy=freeze"]
    cfg = compose_config(tmp_path, [*ON_GPU, *chosen, "+trainer.strategy=ddp", "+trainer.sync_batchnorm=true"])
    seen = SeenInFit()
    fit(cfg, callbacks=(seen,))
    assert seen.device == "cuda" and seen.sync_batchnorm, "Lightning converted them while training"
    assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []
