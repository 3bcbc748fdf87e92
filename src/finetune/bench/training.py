"""finetune-bench: steady-state training throughput and peak memory, template against a hand-written loop.

For each strategy, the template (a real Lightning Trainer fit of FinetuneModule, logging, progress bar and
checkpointing off, as Lightning's own parity tests do) and a plain PyTorch loop doing the same work (same model,
batches, precision, memory format, optimizer, schedule and accuracy metric) run alternately in this process. A naive
baseline, the same Lightning fit in fp32, NCHW, with a default DataLoader over float images, shows what ignoring the
fast paths costs. Prints a table and writes JSON; asserts nothing (targets are read off the table).

    finetune-bench --device cuda                      # 224 px, batch 256, efficientnet_lite0 and resnet50
    finetune-bench --device cpu --models efficientnet_lite0 --image-size 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from finetune.backbones import efficientnet_lite0
from finetune.backbones import timm as timm_backbones
from finetune.bench.report import text_table, write_report
from finetune.callbacks import FreezeAudit
from finetune.callbacks.run_meter import peak_memory_mb, reset_peak_memory
from finetune.config import build_strategy, strategy_names
from finetune.data.base import TensorImageDataModule
from finetune.data.features.cached import CachedFeatureDataModule
from finetune.heads import LinearHead
from finetune.module import FinetuneModule
from finetune.optim import WarmupCosine, param_groups, warmup_cosine

LR, WEIGHT_DECAY = 1e-3, 0.01
GOAL = {"cuda": 0.97, "cpu": 0.9}  # template/raw


@dataclass
class Measurement:
    model: str
    strategy: str
    runner: str  # template | raw | naive
    samples_per_second: float
    peak_memory_mb: float
    batch_size: int
    steps: int
    inputs: str  # images | features


def build_backbone(name: str):
    if name == "efficientnet_lite0":
        return efficientnet_lite0.build(pretrained=True)
    return timm_backbones.build(name, pretrained=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchList:
    """An iterable over fixed batches (a bare list would read as a list of dataloaders to Lightning)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FixedBatches(TensorImageDataModule):
    """The template's data path (uint8 to the device, resize/normalise there) over a fixed list of batches."""

    def __init__(self, batches, image_size: int, num_classes: int):
        self.batches, self._num_classes = batches, num_classes
        super().__init__(batch_size=len(batches[0][1]), image_size=image_size)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def train_dataloader(self):
        return BatchList(self.batches)


class SteadyStateTimer(L.Callback):
    """Samples per second from the end of the warm-up steps to the end of fit (device synchronised)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.samples = warmup, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            sync(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += len(batch[-1])

    def on_train_end(self, trainer, module):
        sync(module.device)
        self.rate = self.samples / (time.perf_counter() - self.start)


def last_phase(built):
    """A staged strategy (gradual, lp_ft) in its last phase, its steady state; any other as it is."""
    return built.phase_alone(len(built.phases()) - 1) if len(built.phases()) > 1 else built


def measured_strategy(name: str, cache_dir: str, batch_size: int):
    """The strategy a benchmark row measures."""
    # cache_dir and batch_size reach only strategies whose config has them (cached: its head batch)
    return last_phase(build_strategy(name.split("@")[0], cache_dir=cache_dir, batch_size=batch_size))


def bench_strategy_names() -> list[str]:
    """Every strategy config; staged ones as `<name>@<last phase>`."""
    built = {name: build_strategy(name) for name in strategy_names()}
    return [last_phase(s).name if len(s.phases()) > 1 else name for name, s in built.items()]


def make_module(args, backbone, strategy: str, channels_last: bool) -> FinetuneModule:
    built = measured_strategy(strategy, args.cache_dir, args.cached_batch_size)
    return FinetuneModule(backbone=backbone, head=LinearHead, strategy=built, num_classes=args.num_classes,
                          channels_last=channels_last,
                          optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
                          scheduler=WarmupCosine(warmup_fraction=0.05))


def training_data(args, module, batches, features, device, naive: bool):
    """(datamodule, batch size) as the strategy sees its inputs: images, or stored features for a strategy that
    serves them (random features stand in for an extraction; the extraction itself is not what is measured)."""
    images = FixedBatches(batches, args.image_size, args.num_classes)
    datamodule = module.strategy.wrap_datamodule(images, module)
    if isinstance(datamodule, CachedFeatureDataModule):
        datamodule.use_features({"train": {"features": features[0], "labels": features[1]}}, device)
        return datamodule, args.cached_batch_size, "features"
    if naive:  # float32 images on the host, per-sample collation, no device-side preprocessing
        floats = torch.cat([images.preprocess(b) for b, _ in batches])
        labels = torch.cat([y for _, y in batches])
        return L.LightningDataModule.from_datasets(TensorDataset(floats, labels), batch_size=len(batches[0][1]),
                                                   num_workers=0), len(batches[0][1]), "images"
    return datamodule, len(batches[0][1]), "images"


def fit_template(args, model_name, strategy, batches, features, device, naive=False) -> Measurement:
    backbone = build_backbone(model_name)
    precision = "32-true" if naive or device.type == "cpu" else "bf16-mixed"
    torch.set_float32_matmul_precision("highest" if naive else "high")
    module = make_module(args, backbone, strategy, channels_last=not naive)
    steps = args.warmup + args.steps
    datamodule, batch_size, inputs = training_data(args, module, batches, features, device, naive)
    timer = SteadyStateTimer(args.warmup)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, benchmark=not naive,
                        use_distributed_sampler=False,
                        callbacks=[timer, *([] if naive else [FreezeAudit(output_path=None)])])
    reset_peak_memory(device)
    trainer.fit(module, datamodule=datamodule)
    return Measurement(model_name, strategy, "naive" if naive else "template", timer.rate, peak_memory_mb(device),
                       batch_size, args.steps, inputs)


def fit_raw(args, model_name, strategy, batches, features, device) -> Measurement:
    """The same work as the template in a plain PyTorch loop: the same model and strategy (what trains, which parts
    stay in eval mode, how the backbone runs), batches, precision, memory format, optimizer groups and schedule."""
    module = make_module(args, build_backbone(model_name), strategy, channels_last=True)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True
    module.to(device)
    if device.type == "cuda" and module.backbone_is_conv:
        module.backbone.to(memory_format=torch.channels_last)
    module.train()  # the strategy puts its frozen parts back in eval mode
    trainable = module.strategy.trainable_parameters(module)
    groups, _ = param_groups(module, trainable, LR, WEIGHT_DECAY)  # the template's groups, without phases
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = warmup_cosine(optimizer, args.warmup + args.steps, warmup_fraction=0.05)
    accuracy = MulticlassAccuracy(args.num_classes, average="micro", validate_args=False).to(device)
    mean_loss = MeanMetric(nan_strategy="disable").to(device)
    criterion = nn.CrossEntropyLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images = FixedBatches(batches, args.image_size, args.num_classes)
    serves_features = isinstance(module.strategy.wrap_datamodule(images, module), CachedFeatureDataModule)

    def inputs():
        if serves_features:
            feats, labels = features[0].to(device), features[1].to(device)
            while True:
                for index in torch.randperm(len(labels)).to(device).split(args.cached_batch_size):
                    if len(index) == args.cached_batch_size:
                        yield feats[index], labels[index]
        while True:
            for batch_images, labels in batches:
                yield (images.preprocess(batch_images.to(device, non_blocking=True)),
                       labels.to(device, non_blocking=True))

    def step(x, y):
        with autocast:
            logits = module(x)
            loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        accuracy.update(logits.detach(), y)
        mean_loss.update(loss.detach().expand(len(y)))

    reset_peak_memory(device)
    stream = inputs()
    for _ in range(args.warmup):
        step(*next(stream))
    sync(device)
    start, samples = time.perf_counter(), 0
    for _ in range(args.steps):
        x, y = next(stream)
        step(x, y)
        samples += len(y)
    sync(device)
    rate = samples / (time.perf_counter() - start)
    batch_size = args.cached_batch_size if serves_features else len(batches[0][1])
    return Measurement(model_name, strategy, "raw", rate, peak_memory_mb(device), batch_size, args.steps,
                       "features" if serves_features else "images")


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args) -> list[Measurement]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    results: list[Measurement] = []
    for model_name in args.models:
        num_features = build_backbone(model_name).num_features
        batches = [(torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8),
                    torch.randint(0, args.num_classes, (args.batch_size,))) for _ in range(args.num_batches)]
        feature_count = args.cached_batch_size * args.num_batches
        features = (torch.randn(feature_count, num_features), torch.randint(0, args.num_classes, (feature_count,)))
        for repeat in range(args.repeats):
            for strategy in args.strategies:
                runners = [fit_template, fit_raw] if repeat % 2 == 0 else [fit_raw, fit_template]
                for runner in runners:
                    results.append(runner(args, model_name, strategy, batches, features, device))
                    release(device)
                    print(f"  {model_name} {strategy} {results[-1].runner}: "
                          f"{results[-1].samples_per_second:,.0f} samples/s, {results[-1].peak_memory_mb:,.0f} MB",
                          flush=True)
                if args.naive and results[-1].inputs == "images" and repeat == 0:
                    results.append(fit_template(args, model_name, strategy, batches, features, device, naive=True))
                    release(device)
                    print(f"  {model_name} {strategy} naive: {results[-1].samples_per_second:,.0f} samples/s",
                          flush=True)
    return results


def summarise(results: list[Measurement], goal: float) -> list[dict]:
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        # memory is compared with full fine-tuning's, the strategy that keeps every activation for backward
        full_memory = max((r.peak_memory_mb for r in results if (r.model, r.strategy, r.runner) ==
                           (model, "full", "template")), default=None)
        for strategy in dict.fromkeys(r.strategy for r in results if r.model == model):
            pick = lambda runner: [r for r in results if (r.model, r.strategy, r.runner) == (model, strategy, runner)]
            template, raw, naive = pick("template"), pick("raw"), pick("naive")
            rate = statistics.median(r.samples_per_second for r in template)
            raw_rate = statistics.median(r.samples_per_second for r in raw)
            memory = max(r.peak_memory_mb for r in template)
            rows.append({
                "model": model, "strategy": strategy, "batch_size": template[0].batch_size,
                "template_samples_per_second": round(rate, 1), "raw_samples_per_second": round(raw_rate, 1),
                "template_over_raw": round(rate / raw_rate, 3),
                "meets_goal": rate / raw_rate >= goal,
                "template_peak_memory_mb": round(memory, 1),
                "raw_peak_memory_mb": round(max(r.peak_memory_mb for r in raw), 1),
                "memory_vs_full": round(memory / full_memory, 3) if full_memory else None,
                "naive_samples_per_second": round(naive[0].samples_per_second, 1) if naive else None,
                "speedup_over_naive": round(rate / naive[0].samples_per_second, 2) if naive else None,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ["model", "strategy", "batch", "template/s", "raw/s", "tpl/raw", "peak MB", "mem vs full",
               "naive/s", "vs naive"]
    body = [[r["model"], r["strategy"], str(r["batch_size"]), f"{r['template_samples_per_second']:,.0f}",
             f"{r['raw_samples_per_second']:,.0f}",
             f"{r['template_over_raw']:.3f}" + ("" if r["meets_goal"] else " BELOW GOAL"),
             f"{r['template_peak_memory_mb']:,.0f}",
             "" if r["memory_vs_full"] is None else f"{100 * r['memory_vs_full']:.0f}%",
             "" if r["naive_samples_per_second"] is None else f"{r['naive_samples_per_second']:,.0f}",
             "" if r["speedup_over_naive"] is None else f"{r['speedup_over_naive']:.2f}x"] for r in rows]
    return text_table(headers, body)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=None, help="efficientnet_lite0 (bundled weights) or any timm name")
    parser.add_argument("--strategies", nargs="+", default=bench_strategy_names(), choices=bench_strategy_names())
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on cuda, 64 on cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on cuda, 32 on cpu")
    parser.add_argument("--cached-batch-size", type=int, default=None,
                        help="head batch for cached; default: 16384 on cuda, 4096 on cpu")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--num-batches", type=int, default=4, help="distinct fixed batches cycled through")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="template and raw alternate this many times each")
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive baseline")
    parser.add_argument("--cache-dir", default="logs/feature_cache")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; choose --device cpu")
    defaults = {"models": ["efficientnet_lite0", "resnet50"] if cuda else ["efficientnet_lite0"],
                "image_size": 224 if cuda else 64, "batch_size": 256 if cuda else 32,
                "cached_batch_size": 16384 if cuda else 4096, "warmup": 8 if cuda else 3, "steps": 30 if cuda else 20}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("image_size", "batch_size", "cached_batch_size", "steps", "repeats", "num_batches", "num_classes"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    return args


def benchmark(argv=None) -> list[dict]:
    """Run the benchmark; returns the summary rows (also printed and written as JSON)."""
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"finetune-bench on {device_name}: {args.image_size} px, batch {args.batch_size}, "
          f"cached batch {args.cached_batch_size}, {args.steps} timed steps after {args.warmup}, x{args.repeats}")
    results = run(args)
    rows = summarise(results, GOAL[args.device])
    report = {"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": rows,
              "measurements": [asdict(r) for r in results], "date": time.strftime("%Y-%m-%d")}
    print(format_table(rows))
    print(f"goal: template/raw >= {GOAL[args.device]} on {args.device}")
    write_report(report, args.out)
    return rows


if __name__ == "__main__":
    benchmark()
