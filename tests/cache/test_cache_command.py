"""``kdistill cache RUN.yaml`` on a tiny causal-LM run and a tiny classification run: written, resumed, refused."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm"))
from test_run import write_model, write_records

from kdistill.cache import CacheReader
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.runs.parts import build_parts
from kdistill.tasks.base import predict_logits


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    config = {
        "task": "causal_lm",
        "data": {"files": {"train": str(write_records(tmp_path / "train.jsonl", 10))}, "max_length": 24},
        "teacher": {"path": str(write_model(tmp_path / "teacher"))},
        "student": {"kind": "from_teacher", "layers": [0]},
        "distill": {"kd_loss": "forward_kl", "temperature": 2.0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cache_holds_the_teachers_top_k_and_resumes(run_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = ["cache", str(run_yaml), "--out", str(out), "--k", "5", "--dtype", "float32", "--shard-size", "4"]
    assert main(args) == 0
    reader = CacheReader(out)
    assert reader.is_complete() and len(reader) == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["k"], manifest["temperature"], manifest["vocab_size"]) == (5, 2.0, 128)

    parts = build_parts(load_config(run_yaml).model_copy(update={"mode": "distill"}))
    example = parts.train_examples[3]
    batch = parts.collate([example])
    [[logits]] = predict_logits(parts.teacher, [batch], parts.task.view, inputs="teacher")
    counted = parts.task.view.kd_mask(batch)[0]
    expected = torch.log_softmax(logits[0][counted] / 2.0, dim=-1).topk(5, dim=-1)
    [entry] = reader.get(3)
    torch.testing.assert_close(entry["logprobs"], expected.values, rtol=1e-6, atol=1e-6)  # batched vs alone
    assert torch.equal(entry["ids"].long(), expected.indices)

    shards = sorted(out.glob("shard-*.safetensors"))
    mtimes = {path: path.stat().st_mtime_ns for path in shards}
    shards[-1].unlink()  # a run killed before its last shard
    assert main(args) == 0
    assert all(path.stat().st_mtime_ns == mtimes[path] for path in shards[:-1])
    assert CacheReader(out).is_complete()


def test_cache_of_another_temperature_is_refused_by_name(run_yaml: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    assert main(["cache", str(run_yaml), "--out", str(out), "--k", "all"]) == 0
    assert main(["cache", str(run_yaml), "distill.temperature=1.0", "--out", str(out), "--k", "all"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_two_workers_write_one_cache(run_yaml: Path, tmp_path: Path, monkeypatch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["cache", str(run_yaml), "--out", str(one), "--shard-size", "3"]) == 0
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["cache", str(run_yaml), "--out", str(two), "--shard-size", "3"]) == 0
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert os.environ["WORLD_SIZE"] == "2"


def test_bad_k_is_refused(run_yaml: Path, tmp_path: Path, capsys) -> None:
    assert main(["cache", str(run_yaml), "--out", str(tmp_path / "c"), "--k", "500"]) == 2
    assert "--k 500" in capsys.readouterr().err


def classification_run(tmp_path: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
    from cli_support import save_tiny_bert, sentiment_rows, write_csv

    return {
        "task": "sequence_classification",
        "data": {
            "files": {
                "train": str(write_csv(tmp_path / "train.csv", sentiment_rows(40))),
                "validation": str(write_csv(tmp_path / "validation.csv", sentiment_rows(16, seed=1))),
            },
            "max_length": 16,
        },
        "teacher": {"path": str(save_tiny_bert(tmp_path / "teacher"))},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "distill": {"kd_weight": 1.0, "hard_weight": 0.0, "temperature": 2.0},
        "training": {
            "max_steps": 5,
            "batch_size": 8,
            "optimizer": "sgd",
            "learning_rate": 0.5,
            "log_with": [],
            "progress": False,
            "lr_scheduler": "constant",
            "max_grad_norm": None,
        },
    }


def live_and_cached_runs(config: dict, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Cache the run's teacher (k = all, float32), train live and from the cache, and check that both runs end
    alike (metrics and student weights); returns the run's YAML path and the live student's weights."""
    from safetensors.torch import load_file

    from kdistill.runs.run import run

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["cache", str(path), "--out", str(tmp_path / "cache"), "--k", "all", "--dtype", "float32"]) == 0
    live = run(load_config(path, [f"output_dir={tmp_path / 'live'}"]))
    cached = run(
        load_config(path, [f"output_dir={tmp_path / 'cached'}", f"distill.teacher_cache={tmp_path / 'cache'}"])
    )
    assert cached.metrics == pytest.approx(live.metrics, abs=1e-6)
    a, b = load_file(live.student_dir / "model.safetensors"), load_file(cached.student_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    return path, a


def test_a_run_from_a_full_cache_ends_like_the_live_run(tmp_path: Path) -> None:
    path, a = live_and_cached_runs(classification_run(tmp_path), tmp_path)
    start = build_parts(load_config(path)).student.state_dict()
    assert max(float((a[key] - start[key]).abs().max()) for key in a) > 1e-3  # the runs trained


def test_a_run_refuses_a_cache_written_for_other_settings(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_run(tmp_path)))
    assert main(["cache", str(path), "--out", str(tmp_path / "cache"), "--k", "1"]) == 0
    args = ["train", str(path), f"output_dir={tmp_path / 'out'}", f"distill.teacher_cache={tmp_path / 'cache'}"]
    assert main([*args, "distill.temperature=1.0"]) == 2
    assert "'temperature' is 2.0 but the run has 1.0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main([*args, "distill.layer_map=last"]) == 2  # the cache holds no teacher features for the match
    assert "'features' is [] but the run has ['layer 4']" in capsys.readouterr().err
    assert main(args) == 0  # top-1 cache, renormalized: trains
    other = tmp_path / "cross"
    assert main(["cache", str(path), "distill.cross_tokenizer=align", "--out", str(other)]) == 2
    assert "distill.cross_tokenizer='align'" in capsys.readouterr().err
    assert not other.exists()  # refused before the directory was made


def test_a_run_with_hidden_state_matches_from_a_cache_ends_like_the_live_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from kdistill.runs.run import run

    config = classification_run(tmp_path)
    config["distill"].update({"layer_map": "uniform", "layer_map_projection": "linear", "layer_map_weight": 2.0})
    path, a = live_and_cached_runs(config, tmp_path)
    assert CacheReader(tmp_path / "cache").features == ["layer 2", "layer 4"]  # teacher layers of the 2-layer student
    without = run(load_config(path, [f"output_dir={tmp_path / 'kd_only'}", "distill.layer_map=null"]))
    c = load_file(without.student_dir / "model.safetensors")
    assert max(float((a[key] - c[key]).abs().max()) for key in a) > 1e-3  # the matches changed the training


def test_attention_matches_are_not_cached(run_yaml: Path, tmp_path: Path, capsys) -> None:
    match = '[{"teacher": "layer 1", "student": "layer 1", "feature": "attention", "loss": "attention_mse"}]'
    out = tmp_path / "cache"
    assert main(["cache", str(run_yaml), f"distill.matches={match}", "--out", str(out)]) == 2
    assert "attention maps cannot be cached" in capsys.readouterr().err
    assert not out.exists()


def cache_command(run_yaml: Path, out: Path) -> list[str]:
    return ["cache", str(run_yaml), "distill.layer_map=last", "--out", str(out), "--shard-size", "3", "--k", "7"]


@pytest.fixture
def one_worker_cache(run_yaml: Path, tmp_path: Path) -> Path:
    """The reference: one uninterrupted worker, with teacher features (10 examples, 4 shards).

    Written by a process like the workers it is compared with (one torch thread each): a float16 value may differ
    in its last bit between thread counts, and the pytest process may run with another.
    """
    cache_process(run_yaml, tmp_path / "one")
    assert CacheReader(tmp_path / "one").features == ["layer 4"]  # the 4-layer teacher's last
    return tmp_path / "one"


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def cache_process(run_yaml: Path, out: Path) -> None:
    """``kdistill cache`` in its own process, one worker."""
    import subprocess

    command = [sys.executable, "-m", "kdistill.cli", *cache_command(run_yaml, out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()


def test_two_worker_processes_at_once_write_the_one_worker_cache(
    run_yaml: Path, tmp_path: Path, one_worker_cache: Path
) -> None:
    import subprocess

    out = tmp_path / "two"
    command = [sys.executable, "-m", "kdistill.cli", *cache_command(run_yaml, out)]
    workers = [
        subprocess.Popen(command, env=subprocess_env(RANK=str(rank), WORLD_SIZE="2"), stderr=subprocess.PIPE)
        for rank in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()
    assert directory_bytes(out) == directory_bytes(one_worker_cache)  # every shard and the manifest, no temp files


KILL_IN_SECOND_SHARD_WRITE = """
import os, signal, sys
import safetensors.torch as st
real, calls = st.save_file, []
def torn(tensors, filename, metadata=None):
    calls.append(filename)
    real(tensors, filename, metadata=metadata)
    if len(calls) == 2:  # killed in the middle of writing shard 1: half of its temporary file on disk
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = torn
from kdistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_killed_mid_write_resumes_to_the_same_bytes(
    run_yaml: Path, tmp_path: Path, one_worker_cache: Path
) -> None:
    import subprocess

    out = tmp_path / "killed"
    command = [sys.executable, "-c", KILL_IN_SECOND_SHARD_WRITE, *cache_command(run_yaml, out)]
    killed = subprocess.run(command, env=subprocess_env(), capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()
    names = sorted(path.name for path in out.iterdir())
    assert names[0].startswith(".shard-00001.safetensors.tmp-")  # the torn temporary file
    assert names[1:] == ["manifest.json", "shard-00000.safetensors"]
    cache_process(run_yaml, out)  # the rerun resumes: shard 0 kept, the torn shard 1 and the rest written
    assert directory_bytes(out) == directory_bytes(one_worker_cache)
