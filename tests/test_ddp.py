"""Lightning DDP on 2 CPU processes (gloo): every strategy trains, ranks end identical, and multirun stays tidy."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.data.feature_cache import FeatureCache
from tests.conftest import TINY
from tests.test_cli import run_cli

DDP = [*TINY, "trainer=ddp_cpu", "trainer.max_epochs=2", "+callbacks.digest._target_=tests.faults.WriteWeightDigest",
       "+callbacks.digest.output_dir=${paths.output_dir}"]


@pytest.mark.parametrize("strategies", ["full,no_grad", "freeze,cached"])
def test_every_strategy_trains_under_ddp_and_ranks_end_identical(tmp_path, strategies):
    sweep = tmp_path / "sweep"
    result = run_cli("finetune.train", "-m", f"strategy={strategies}", *DDP, f"hydra.sweep.dir={sweep}",
                     f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # one folder per job, no stray run folders from the relaunched rank (lightning-hydra-template's duplicates)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    for job, strategy in enumerate(strategies.split(",")):
        run = sweep / str(job)
        rank0, rank1 = ((run / f"weights_rank{r}.txt").read_text() for r in (0, 1))
        assert rank0 == rank1, f"{strategy}: ranks hold different weights after fit"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["strategy"] == strategy
        assert json.loads((run / "param_audit.json").read_text())["violations"] == []


def test_ddp_cached_extraction_gathers_features_in_dataset_order(tmp_path):
    ddp = run_cli("finetune.train", *TINY, "trainer=ddp_cpu", "strategy=cached", "trainer.max_epochs=1",
                  "data.num_samples=70",  # 70 train / 17 val and test: shares of unequal size, padding to drop
                  f"paths.cache_dir={tmp_path / 'ddp'}", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    reference = run_cli("finetune.train", *TINY, "strategy=cached", "trainer.max_epochs=1", "data.num_samples=70",
                        f"paths.cache_dir={tmp_path / 'ref'}", f"hydra.run.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    gathered, expected = FeatureCache(tmp_path / "ddp"), FeatureCache(tmp_path / "ref")
    assert {e["key"] for e in gathered.entries()} == {e["key"] for e in expected.entries()}, "same identity, same key"
    for entry in expected.entries():
        want, got = expected.load(entry["key"]), gathered.load(entry["key"])
        assert torch.equal(want["labels"], got["labels"]), "dataset order, no padded duplicates"
        torch.testing.assert_close(got["features"], want["features"], rtol=1e-4, atol=1e-5)
