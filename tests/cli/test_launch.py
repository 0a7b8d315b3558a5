"""Starting kdistill: ``python -m kdistill``, a ``--help`` that imports no torch, flags and overrides anywhere on the
line, multi-process launches that work or stop before writing, and files that honour the umask."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_csv, write_yaml

from kdistill._io import atomic_write_text
from kdistill.cli import main

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ENV.pop("WORLD_SIZE", None)


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    teacher = save_tiny_bert(root / "teacher", num_labels=2)
    train = write_csv(root / "train.csv", sentiment_rows(32, seed=1))
    return write_yaml(
        root / "run.yaml",
        f"""task: sequence_classification
data:
  files: {{train: {train}}}
  label_names: [negative, positive]
teacher: {{path: {teacher}}}
student: {{kind: from_teacher, layers: [0, 3]}}
training:
  max_steps: 4
  batch_size: 4
  log_every: 1
  lr_scheduler: constant
{QUIET}output_dir: {root / "run"}
""",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_python_m_kdistill_and_a_help_that_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-m", "kdistill", "--version"], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0 and done.stdout.startswith("kdistill "), done.stderr
    code = (
        "import sys\nfrom kdistill.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr


def test_debug_and_overrides_may_come_anywhere(run_yaml: Path, capsys) -> None:
    assert main(["train", str(run_yaml), "--debug", "distill.kd_loss=klx"]) == 2
    assert "Traceback" in capsys.readouterr().err  # --debug after the subcommand still shows it
    # an override after an option of the subcommand is still an override (here: refused, naming its key)
    assert main(["eval", str(run_yaml.parent / "nowhere"), "--split", "test", "data.limit=3"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["compare", str(run_yaml.parent / "nowhere"), "--limit", "3", "distill.temperature=2"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "unrecognized" not in err
    with pytest.raises(SystemExit):
        main(["params", str(run_yaml.parent), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused_before_writing(run_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "one-of-two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "kdistill", "train", str(run_yaml), f"output_dir={out}"]  # fmt: skip
    done = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=300)
    # kdistill exits 2; accelerate's launcher reports that as its own failure (exit 1, with its traceback)
    assert done.returncode != 0 and "returned non-zero exit status 2" in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("kdistill: error:")]
    assert len(lines) == 1 and "asked for 2 processes but started this one alone" in lines[0], done.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_on_cpus_trains_two_processes_that_write_once(run_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "kdistill", "train", str(run_yaml), f"output_dir={out}"]  # fmt: skip
    done = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run complete") == 1, done.stdout  # only the main process reports
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # each record once: one writer
    assert not (out / ".kdistill.lock").exists()


def test_written_files_honour_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_yaml_no_is_mixed_precision_no_and_the_schedulers_are_transformers_own(tmp_path: Path) -> None:
    import transformers
    import yaml

    from kdistill.config import load_config
    from kdistill.config.schema import LR_SCHEDULERS

    data = yaml.safe_load("task: sequence_classification\ndata: {source: x}\nmode: baseline\nstudent: {kind: bilstm}\n"
                          "training: {mixed_precision: no}\n")  # fmt: skip
    assert data["training"]["mixed_precision"] is False  # what YAML 1.1 makes of an unquoted no
    assert load_config(data=data).training.mixed_precision == "no"
    known = {kind.value for kind in transformers.SchedulerType}
    assert set(LR_SCHEDULERS) <= known  # every name the config accepts is one transformers builds


def test_evaluation_batches_keep_their_order_and_length_behind_a_progress_bar() -> None:
    from kdistill.tasks.base import ShowingProgress

    batches = [{"i": i} for i in range(5)]
    shown = ShowingProgress(batches, "eval test")
    assert len(shown) == 5 and shown[2] == {"i": 2} and list(shown) == batches
