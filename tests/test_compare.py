"""finetune-compare: its strategies in their own processes, the scheduler, and the report from a multirun folder
(every strategy of the README's command is compared in tests/test_readme.py)."""

from __future__ import annotations

import csv
import json

from finetune.report import collect_runs, format_text, write_report
from tests.conftest import TINY
from tests.test_cli import run_cli, run_main


def fake_multirun(folder):
    for i, (strategy, acc, seconds, memory) in enumerate(
            [("cached", 0.88, 0.7, 900.0), ("full", 0.98, 80.0, 1500.0), ("no_grad", 0.88, 20.0, 1200.0)]):
        run = folder / str(i)
        run.mkdir(parents=True)
        metrics = {"strategy": strategy, "backbone": "efficientnet_lite0", "data": "DigitsDataModule",
                   "val_acc": acc + 0.01, "test_acc": acc, "fit_seconds": seconds,
                   "train_samples_per_second": 1257 * 10 / seconds, "peak_memory_mb": memory,
                   "trainable_params": 12810, "total_params": 3383818, "epochs": 10, "device": "cpu"}
        if strategy == "cached":
            metrics.update(extract_seconds=5.2, cache_hit=False)
        (run / "metrics.json").write_text(json.dumps(metrics))
    (folder / "multirun.yaml").write_text("hydra: {}\n")


def test_report_from_a_multirun_folder(tmp_path):
    fake_multirun(tmp_path / "sweep")
    rows = collect_runs(tmp_path / "sweep")
    assert [r["strategy"] for r in rows] == ["full", "no_grad", "cached"], "strategies in their natural order"
    paths = write_report(rows, tmp_path / "report")
    with open(paths["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["full", "no_grad", "cached"]
    assert table[2]["extract_seconds"] == "5.2" and table[2]["cache_hit"] == "False"
    markdown = paths["md"].read_text()
    assert "| strategy | test acc | val acc | fit s | train samples/s | peak memory MB |" in markdown
    assert "| cached | 0.8800 |" in markdown
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    text = format_text(rows)
    assert text.splitlines()[0].startswith("strategy") and "5.2" in text


def test_compare_from_cli_on_an_existing_multirun(tmp_path):
    fake_multirun(tmp_path / "sweep")
    result = run_cli("finetune.compare", f"from={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached" in result.stdout and (tmp_path / "out" / "comparison.png").exists()


def test_compare_rejects_an_unknown_strategy(tmp_path):
    result = run_main("finetune.compare", "compare.strategies=[full,frozen]", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    from finetune.config import strategy_names

    assert result.returncode == 2 and f"choose from: {', '.join(strategy_names())}" in result.stderr


def test_compare_starts_the_next_strategy_as_soon_as_any_running_one_finishes(monkeypatch, tmp_path):
    """jobs=2: a slot freed by a short run is taken at once, not after the oldest run ends; a failed run is reported
    and the others go on."""
    from finetune import compare

    finished, seen_running = [], {}

    class Run:  # stands in for a finetune-train process: done after `polls` polls, exit 1 for "bad"
        def __init__(self, command):
            self.strategy = next(w for w in command if w.startswith("strategy=")).split("=", 1)[1]
            self.polls, self.returncode = {"long": 40}.get(self.strategy, 2), None
            seen_running[self.strategy] = [s for s in ("long", "short", "bad", "last") if s in started
                                           and s not in finished]
            started.append(self.strategy)

        def poll(self):
            self.polls -= 1
            if self.polls <= 0 and self.returncode is None:
                self.returncode = int(self.strategy == "bad")
                finished.append(self.strategy)
            return self.returncode

    started: list[str] = []
    monkeypatch.setattr(compare.subprocess, "Popen", Run)
    monkeypatch.setattr(compare.time, "sleep", lambda seconds: None)
    failed = compare.run_strategies(["long", "short", "bad", "last"], [], tmp_path, jobs=2)
    assert failed == ["bad"] and started == ["long", "short", "bad", "last"]
    assert seen_running["last"] == ["long"], "the last started while the long one still ran"
    assert finished[-1] == "long"


def test_compare_trains_each_strategy_in_its_own_process_and_reports_them(tmp_path):
    """The real thing, two strategies at once: each a `python -m finetune.train` child with the overrides given."""
    out = tmp_path / "out"
    result = run_main("finetune.compare", *TINY, "trainer.max_epochs=1", "compare.strategies=[freeze,cached]",
                      "compare.jobs=2", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {json.loads(p.read_text())["strategy"]: json.loads(p.read_text()) for p in out.glob("*/metrics.json")}
    assert sorted(rows) == ["cached", "freeze"] and {r["backbone"] for r in rows.values()} == {"test_efficientnet"}
    assert (out / "freeze" / "train.log").exists() and (out / "comparison.md").exists()
    assert "freeze" in result.stdout and "cached" in result.stdout
