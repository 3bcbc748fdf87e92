"""finetune-predict: class probabilities for image files, from any finetune-train checkpoint.

Batched, on the GPU when there is one, with a progress bar; preprocessing and class names come from the checkpoint
(finetune.classifier). A file that cannot be read is listed in skipped.csv with its reason and the rest are predicted.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from finetune.classifier import load_model
from finetune.config import CONFIG_DIR
from finetune.run.failures import report_user_errors
from finetune.data.preprocessing import CorruptImageError, Preprocessor
from finetune.errors import ConfigError

log = logging.getLogger("finetune")


def input_files(pattern: str) -> list[str]:
    """A file, every file under a folder (hidden ones aside), or what a glob matches; sorted."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    matches = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(f"input={pattern} is not a file or folder and matches no file as a glob")
    return matches


class PreprocessedFiles(Dataset):
    """(model input or None, reason it could not be read) per file, so one bad file does not stop the batch."""

    def __init__(self, paths: list[str], preprocess: Preprocessor):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.preprocess(self.paths[index]), ""
        except CorruptImageError as err:
            return None, str(err).removeprefix(f"cannot read image {self.paths[index]}: ")


def keep_readable(items):
    """Collate: the readable images stacked, and for every item its reason ("" when it was read)."""
    images = [image for image, _ in items if image is not None]
    return (torch.stack(images) if images else None), [reason for _, reason in items]


def predict(cfg: DictConfig) -> dict:
    paths = input_files(str(cfg.input))
    if int(cfg.top_k) < 1:
        raise ConfigError(f"top_k={cfg.top_k} must be at least 1")
    classifier = load_model(cfg.ckpt_path, cfg.get("device"))
    # the classifier stays in this process: workers only decode and preprocess
    loader = DataLoader(PreprocessedFiles(paths, classifier.preprocess), batch_size=int(cfg.batch_size),
                        num_workers=int(cfg.num_workers), collate_fn=keep_readable)
    k = min(int(cfg.top_k), len(classifier.class_names))
    rows, skipped, position = [], [], 0
    batches = track(loader, description="predicting", total=len(loader), disable=not cfg.progress_bar)
    for inputs, reasons in batches:
        batch_paths = paths[position:position + len(reasons)]
        position += len(reasons)
        skipped += [(path, reason) for path, reason in zip(batch_paths, reasons) if reason]
        if inputs is None:
            continue
        top = classifier.top_k(classifier.probabilities(inputs), k)
        read = [path for path, reason in zip(batch_paths, reasons) if not reason]
        rows += [[path] + [value for name, p in pairs for value in (name, f"{p:.6f}")] for path, pairs in zip(read, top)]

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "predictions.csv",
              ["path"] + [f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class", "probability")], rows)
    write_csv(output_dir / "skipped.csv", ["path", "reason"], skipped)
    summary = {"predicted": len(rows), "skipped": len(skipped), "predictions": str(output_dir / "predictions.csv"),
               "top1_counts": dict(Counter(row[1] for row in rows).most_common())}
    print(summarise(summary, skipped))
    if not rows:
        raise ConfigError(f"none of the {len(paths)} file(s) of input={cfg.input} could be read as an image; "
                          f"see {output_dir / 'skipped.csv'}")
    return summary


def write_csv(path: Path, header: list[str], rows: list) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def summarise(summary: dict, skipped: list[tuple[str, str]]) -> str:
    counts = ", ".join(f"{name}: {count}" for name, count in list(summary["top1_counts"].items())[:10])
    lines = [f"predicted {summary['predicted']} image(s) -> {summary['predictions']}",
             f"most likely class: {counts}" if counts else ""]
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s) that could not be read (all in skipped.csv):")
        lines += [f"  {path}: {reason}" for path, reason in skipped[:10]]
    return "\n".join(line for line in lines if line)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@report_user_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
