"""Every command the README and the docs pages (docs/*.md) show runs, with small settings, so the docs cannot drift
from the code.

Commands that need the network are run offline and must fail with the one-line message the README promises; those
that need a GPU or a cluster are skipped without one. A command added to the README or a docs page without a way to
run it here fails test_every_readme_command_has_a_runner.
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
from pathlib import Path

import lightning as L
import pytest
import torch

from finetune.errors import OfflineError
from finetune.train import train
from tests.conftest import TESTS_DIR, compose_config, make_image_folder
from tests.test_cli import run_cli, run_main

ROOT = TESTS_DIR.parent
# appended after the command's own overrides (the last value wins): what it composes and runs is the command's
SMALL = ["++data.image_size=32", "++data.batch_size=16", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
         "++trainer.limit_val_batches=2", "++trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
         "~callbacks.progress_bar"]
# how each kind of command is run here; `kind(command)` decides
NOT_HERE = {"setup": "CI runs the setup command itself (.ci/run)", "tests": "the test command is this suite",
            "cluster": "needs a SLURM cluster (tests/compare/test_compare.py composes the sweep it starts)"}


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def bash_commands(text: str) -> list[str]:
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    return [line.removeprefix(".venv/bin/") for line in lines if line]


def documented_commands() -> dict[str, str]:
    """{command: the first file that shows it}, README first, then docs/*.md: a command shown twice runs once."""
    found: dict[str, str] = {}
    for document in DOCUMENTS:
        for command in bash_commands(document.read_text()):
            found.setdefault(command, str(document.relative_to(ROOT)))
    return found


def kind(command: str) -> str | None:
    words = shlex.split(command)
    if command.startswith("python3 -m venv"):
        return "setup"
    if words[:3] == ["python", "-m", "pytest"]:
        return "tests"
    if words[0] == "finetune-train":
        if any(w.startswith("hparams_search=") for w in words):
            return "search"
        if "-m" in words:
            return "sweep"
        if any(w.startswith(("backbone=timm", "backbone=torchvision")) for w in words):
            return "offline"
        return "train"
    if words[0] == "finetune-compare":
        if "hydra/launcher=slurm" in words:
            return "cluster"
        return "compare_from" if any(w.startswith("from=") for w in words) else "compare"
    if words[0] in ("finetune-eval", "finetune-cache", "finetune-predict", "finetune-export"):
        return words[0].removeprefix("finetune-")
    if words[0] == "finetune-bench":
        if words[1:2] in (["cache"], ["loader"], ["storage"], ["head_grid"]):
            return f"bench_{words[1]}"
        return "bench_cuda" if "cuda" in words else "bench"
    return None


SOURCES = documented_commands()
COMMANDS = list(SOURCES)


def test_every_readme_command_has_a_runner():
    assert len(COMMANDS) >= 15
    assert any(source.startswith("docs/") for source in SOURCES.values()), "the docs pages' commands are read too"
    assert [f"{SOURCES[c]}: {c}" for c in COMMANDS if kind(c) is None] == []


def with_small_settings(words: list[str]) -> list[str]:
    return [*words, *SMALL]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One feature cache, image folder and finished runs that several commands use."""
    root = tmp_path_factory.mktemp("readme")
    return {"root": root, "cache": root / "cache", "pets": make_image_folder(root / "pets", per_class=10)}


def substitute(words: list[str], shared: dict) -> list[str]:
    replaced = []
    for word in words:
        word = word.replace("~/pets", str(shared["pets"])).replace("~/photos", str(shared["pets"] / "val"))
        word = word.replace("file://my_configs", f"file://{TESTS_DIR / 'extension' / 'configs'}")
        replaced.append(word)
    return replaced


def train_in_process(shared, tmp_path, overrides: list[str]) -> dict:
    cfg = compose_config(tmp_path, [*with_small_settings(substitute(overrides, shared)),
                                    f"paths.cache_dir={shared['cache']}"])
    L.seed_everything(cfg.seed)
    return train(cfg)


@pytest.fixture(scope="module")
def main_run(shared) -> Path:
    run_dir = shared["root"] / "main"
    train_in_process(shared, run_dir, [])
    return run_dir


@pytest.fixture(scope="module")
def sweep(shared) -> tuple[Path, object]:
    command = next(c for c in COMMANDS if kind(c) == "sweep")
    sweep_dir = shared["root"] / "sweep"
    words = shlex.split(command)[1:]
    result = run_main("finetune.train", *with_small_settings(words), f"paths.cache_dir={shared['cache']}",
                      f"hydra.sweep.dir={sweep_dir}", cwd=shared["root"])
    return sweep_dir, result


def main_checkpoint(request, text: str) -> str:
    """A README path to a run's checkpoint, pointed at the main job's run."""
    return text.replace("logs/train/runs/<run>", str(request.getfixturevalue("main_run")))


def check_parameter_efficient_runs(runs: dict, rows: dict, tmp_path: Path) -> None:
    """bitfit, norm and lora on the bundled Lite0 and digits, through the CLI: audit clean, a small share trained,
    lora's adapter under a tenth of its checkpoint, and finetune-eval gives lora's test accuracy from the checkpoint."""
    from finetune.eval import evaluate

    for name in ("bitfit", "norm", "lora"):
        assert json.loads((runs[name] / "param_audit.json").read_text())["violations"] == [], name
        assert 0 < rows[name]["trainable_percent"] < 10, name
    lora = rows["lora"]
    assert (runs["lora"] / "adapter" / "adapter_model.safetensors").exists()
    assert lora["adapter_bytes"] < 0.1 * Path(lora["best_checkpoint"]).stat().st_size
    (tmp_path / "eval").mkdir()
    result = evaluate(compose_config(tmp_path / "eval", [f"ckpt_path={lora['best_checkpoint']}", "trainer.accelerator=cpu",
                                                         "trainer.enable_progress_bar=false",
                                                         "++trainer.limit_test_batches=2"], config_name="eval"))
    assert result["test_acc"] == pytest.approx(lora["test_acc"], abs=1e-6)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, shared, tmp_path, request, monkeypatch):
    how, words = kind(command), shlex.split(command)
    if how in NOT_HERE:
        pytest.skip(NOT_HERE[how])
    if how == "bench_cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

    if how == "train":
        metrics = train_in_process(shared, tmp_path, words[1:])
        assert metrics["test_acc"] >= 0 and (tmp_path / "checkpoints" / "last.ckpt").exists()
        assert json.loads((tmp_path / "param_audit.json").read_text())["violations"] == []
    elif how == "offline":
        import huggingface_hub.constants

        def unreachable(*args, **kwargs):
            raise urllib.error.URLError("Name or service not known")

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the hub
        monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no weights cached from elsewhere
        with pytest.raises(OfflineError, match=r"could not download .*offline\? pass a local file") as raised:
            train_in_process(shared, tmp_path, words[1:])
        assert "\n" not in str(raised.value)
    elif how == "sweep":
        sweep_dir, result = request.getfixturevalue("sweep")
        assert result.returncode == 0, result.stderr[-3000:]
        strategies = [w for w in words if w.startswith("strategy=")][0].split("=")[1].split(",")
        done = [json.loads(p.read_text())["strategy"] for p in sorted(sweep_dir.glob("*/metrics.json"))]
        assert done == strategies
    elif how == "eval":
        from finetune.eval import evaluate

        main_run = request.getfixturevalue("main_run")
        ckpt = words[1].split("=", 1)[1].replace("logs/train/runs/<run>", str(main_run))
        result = evaluate(compose_config(tmp_path, [f"ckpt_path={ckpt}", "trainer.accelerator=cpu",
                                                    "trainer.enable_progress_bar=false"], config_name="eval"))
        assert result["test_acc"] == pytest.approx(json.loads((main_run / "metrics.json").read_text())["test_acc"],
                                                   abs=0.005)
    elif how == "compare":
        from finetune.compare import cli as compare

        def sweep_in_this_process(command: list[str]) -> int:
            """The compare's `finetune-train -m` sweep, run by its main() in this process with Hydra's basic
            launcher: the same jobs without eleven interpreters' imports (tests/compare/test_compare.py runs the real
            launcher's subprocesses)."""
            assert command[1:4] == ["-m", "finetune.train", "-m"]
            words = [w for w in command[3:] if not w.startswith(("hydra/launcher=", "hydra.launcher."))]
            return run_main(command[2], *words, "hydra/launcher=basic", cwd=tmp_path).returncode

        monkeypatch.setattr(compare, "run_sweep", sweep_in_this_process)
        out = tmp_path / "compare"
        # each strategy keeps its own epoch count (a staged one refuses fewer epochs than its phases): two steps each
        small = [o for o in with_small_settings(words[1:]) if o != "trainer.max_epochs=1"] + ["++trainer.max_steps=2"]
        if not any(o.startswith("compare.seeds=") for o in small):  # two seeds: the paired tests pair by seed
            small.append("compare.seeds=[42,43]")
        # the tuning as the command asks (compare.tune, 12 trials by default), on one configuration per strategy here
        trials = next((int(o.split("=")[1]) for o in small if o.startswith("compare.tune.trials=")), 12)
        small = [o for o in small if not o.startswith("compare.tune.trials=")] + [f"compare.tune.trials={min(trials, 1)}"]
        result = run_main("finetune.compare.cli", *small, f"paths.cache_dir={shared['cache']}",
                          f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs = {json.loads(p.read_text())["strategy"]: p.parent for p in out.glob("*_seed42/metrics.json")}
        rows = {name: json.loads((run / "metrics.json").read_text()) for name, run in runs.items()}
        from finetune.config import strategy_names

        listed = next((o.split("=", 1)[1].strip("[]").split(",") for o in small if o.startswith("compare.strategies=")),
                      None)
        assert sorted(rows) == sorted(listed or strategy_names()), "every strategy config, no list kept anywhere"
        assert len(list(out.glob("*_seed43/metrics.json"))) == len(rows), "every strategy once per seed"
        assert result.stdout.index("recommended by") < result.stdout.index("95% interval"), "the line tops the table"
        assert {r["epochs"] for r in rows.values()} == {1}
        assert (out / "comparison.md").exists() and (out / "comparison.png").exists()
        tunings = {p.parent.name: json.loads(p.read_text()) for p in out.glob("tune/*/tuning.json")}
        if trials:  # each strategy's final runs at the configuration its tuning chose; its trials never tested
            assert sorted(tunings) == sorted(rows)
            # one configuration each; lp_ft's probe lr from the head grid, then the rest with Optuna
            assert {s: t["run"] for s, t in tunings.items() if t["run"] != 1} == ({"lp_ft": 2} if "lp_ft" in rows
                                                                                 else {})
            assert "## Tuning" in (out / "comparison.md").read_text() and (out / "tuning.png").exists()
            assert not list(out.glob("tune/*/optuna/*/predictions.csv"))
        else:
            assert not tunings and "## Tuning" not in (out / "comparison.md").read_text()
        if {"bitfit", "norm", "lora"} <= set(rows):
            check_parameter_efficient_runs(runs, rows, tmp_path)
    elif how == "compare_from":
        sweep_dir, _ = request.getfixturevalue("sweep")
        source = words[1].split("=", 1)[1].replace("logs/train/multiruns/<time>", str(sweep_dir))
        result = run_cli("finetune.compare.cli", f"from={source}", f"hydra.run.dir={tmp_path / 'report'}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "full" in result.stdout and (tmp_path / "report" / "comparison.csv").exists()
    elif how in ("predict", "export"):
        result = run_main(f"finetune.{how}", *[main_checkpoint(request, w) for w in substitute(words[1:], shared)],
                          "progress_bar=false" if how == "predict" else "opset=18", f"hydra.run.dir={tmp_path}",
                          cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        if how == "predict":
            rows = (tmp_path / "predictions.csv").read_text().splitlines()
            assert len(rows) == 1 + len(list((shared["pets"] / "val").rglob("*.png")))
            assert rows[0].startswith("path,class_1,probability_1") and rows[1].split(",")[1] in "0123456789"
        else:
            exported = json.loads((tmp_path / "model.json").read_text())
            assert exported["class_names"] == [str(d) for d in range(10)]
            assert exported["parity_max_abs_logit_diff"] < 1e-4
    elif how == "search":
        sweep_dir = tmp_path / "search"
        result = run_main("finetune.train", *with_small_settings(words[1:]), "hydra.sweeper.n_trials=3",
                          f"paths.cache_dir={shared['cache']}", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        best = json.loads((sweep_dir / "best.json").read_text())
        assert best["trials"] == 3 and best["failed"] == [] and Path(best["best_checkpoint"]).exists()
    elif how == "cache":
        from finetune.data.cache_cli import main as cache_main

        request.getfixturevalue("main_run")  # fills the cache
        assert cache_main([*words[1:], "--cache-dir", str(shared["cache"])]) == 0
    elif how == "bench_cache":
        from finetune.bench.cli import main as bench_main

        # one small size, the tiny model, no kill: two real finetune-train processes and the in-process figures
        out = tmp_path / "bench_cache.json"
        bench_main([*words[1:], "--sizes", "300", "--model", "test_efficientnet", "--image-size", "32",
                    "--native-size", "8", "--no-kill", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
        report = json.loads(out.read_text())
        assert [r["run"] for r in report["rows"]] == ["extract", "hit"]
        assert [r["cache_hit"] for r in report["rows"]] == [False, True] and report["rows"][0]["peak_rss_mb"] > 0
        assert report["in_process"]["open_rows"] == 300 + 75 + 75 and min(report["in_process"]["map_over_ram"]) > 0
    elif how == "bench_loader":
        from finetune.bench.cli import main as bench_main

        out = tmp_path / "bench_loader.json"
        bench_main([*words[1:], "--images", "100", "--image-size", "32", "--batch-size", "8", "--workers", "0",
                    "--work-dir", str(tmp_path / "work"), "--out", str(out)])
        report = json.loads(out.read_text())
        assert [r["images"] for r in report["rows"]] == [80, 80], "80 train images (10 val, 10 test): 10 batches"
        assert report["decoded_by_store_build"] == 100 and report["store_over_pil"] > 0
    elif how == "bench_storage":
        from finetune.bench.cli import main as bench_main

        out = tmp_path / "bench_storage.json"
        bench_main([*words[1:], "--rows", "200", "--size", "16", "--libraries", "npy", "safetensors",
                    "--work-dir", str(tmp_path / "work"), "--out", str(out)])
        assert [r["library"] for r in json.loads(out.read_text())["results"]] == ["npy", "safetensors"]
    elif how == "bench_head_grid":
        from finetune.bench.cli import main as bench_main

        # the tiny model on 64 fake rows, two widths: the command's path (tests/bench/test_bench.py checks the table)
        out = tmp_path / "bench_head_grid.json"
        bench_main([*words[1:], "--sizes", "fake:64", "--heads", "1", "2", "--repeats", "1", "--epochs", "fake:64=1",
                    "--batch-size", "16", "--overrides", "backbone=timm", "backbone.name=test_efficientnet",
                    "backbone.pretrained=false", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
        assert [r["heads"] for r in json.loads(out.read_text())["rows"]] == [1, 2]
    elif how in ("bench", "bench_cuda"):
        from finetune.bench.training import benchmark

        tiny = ["--models", "test_efficientnet", "--image-size", "32", "--batch-size", "4", "--cached-batch-size",
                "16", "--num-classes", "5", "--warmup", "1", "--steps", "2", "--repeats", "1", "--no-naive",
                "--strategies", "full", "cached",  # each kind of strategy: tests/bench/test_bench.py
                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "bench.json")]
        assert benchmark([*words[1:], *tiny])


def test_readme_python_api_snippet(shared, request, tmp_path, monkeypatch):
    """The README's load_model lines run as written, on the main job's checkpoint and two image files."""
    from PIL import Image

    text = (ROOT / "README.md").read_text()
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "load_model" in block]
    assert len(snippet.strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    cat = Image.new("RGB", (40, 30), (200, 120, 40))
    cat.save("cat.jpg")
    Image.new("RGB", (20, 20), (10, 10, 10)).save("dog.png")
    names = {"pil_image": cat, "uint8_tensor": torch.full((1, 8, 8), 255, dtype=torch.uint8)}
    exec(main_checkpoint(request, snippet), names)
    assert names["probabilities"].shape == (2, 10)
    assert torch.allclose(names["probabilities"].sum(dim=1), torch.ones(2))
