"""Data-parallel runs: two gloo processes on the CPU under torchrun, through the command line.

Ranks are compared weight by weight after every reset and every generation; a run stopped by
Ctrl-C and then killed in its resumed part ends, after a second resume, bit for bit where an
uninterrupted run does; a user error found by rank 0 alone ends every rank with one line.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import Evolution, KecompressError, distributed, rundir
from kecompress.cli import main
from kecompress.data import demo_datasets

from conftest import terminal_sigint_in_child as terminal_sigint
from kecompress.evaluation import accuracy, evaluate

# Run under torchrun on every rank: saves the bare model's state_dict after every reset and every
# generation, and at a chosen optimizer step either SIGKILLs rank 1 or presses Ctrl-C the way a
# terminal does (SIGINT to every worker and to torchrun, which forwards another one to each).
# After the command it checks that the process group's threads are gone.
SPY = r"""
import os, signal, sys
import torch
import kecompress
import kecompress.experiment as experiment
from kecompress.cli import main
torch.set_num_threads(1)
dumps, action, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank = int(os.environ["RANK"])

class Spy(kecompress.Callback):
    def save(self, model, name):
        if dumps != "-":
            torch.save(model.state_dict(), os.path.join(dumps, f"{name}-rank{rank}.pt"))

    def on_reset(self, loop, generation):
        self.save(loop.model, f"reset{generation - 1}")

    def on_generation_end(self, loop, record):
        self.save(loop.model, f"generation{record.generation}")

def build_with_spy(*args, callbacks=(), original=experiment.build, **kwargs):
    return original(*args, callbacks=[*callbacks, Spy()], **kwargs)
experiment.build = build_with_spy

steps = {"n": 0}
def step(self, *args, original=torch.optim.SGD.step, **kwargs):
    steps["n"] += 1
    if steps["n"] == count and action == "kill" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if steps["n"] == count and action == "ctrl-c":
        os.kill(os.getpid(), signal.SIGINT)
        if rank == 0:
            os.kill(os.getppid(), signal.SIGINT)  # torchrun's agent
    return original(self, *args, **kwargs)
torch.optim.SGD.step = step
status = main(sys.argv[4:])
# The process group's threads must be gone once the command returns: left to interpreter exit,
# gloo's threads are destroyed unjoined and the process aborts, now and then.
threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
if any("gloo" in name for name in threads):
    sys.exit(f"process group threads still running after the command: {threads}")
sys.exit(status)
"""

STEPS_PER_EPOCH = 6  # 1,438 demo images, 719 a rank, batches of 128


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "spy.py").write_text(SPY)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))
    torch.save(model, root / "tiny.pt")
    return root


def evolve_args(root: Path, out: Path) -> list[str]:
    return ["evolve", str(root / "tiny.pt"), "--image-size", "12", "--generations", "3", "--epochs", "2",
            "--batch-size", "128", "--lr", "0.05", "--seed", "3", "--out", str(out)]


def torchrun(root: Path, argv: list[str], dumps="-", action="none", count=0, name="run") -> tuple[int, dict]:
    """Two processes under torchrun; returns torchrun's exit status, each rank's output, and
    torchrun's own report (its stderr) under "torchrun".

    ``--standalone`` lets torchrun bind a free port itself, so parallel tests never collide."""
    logs = root / f"logs-{name}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3",
               str(root / "spy.py"), str(dumps), action, str(count), *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=terminal_sigint)
    outputs = {"torchrun": result.stderr}
    for rank in (0, 1):
        [folder] = logs.glob(f"*/attempt_0/{rank}")
        outputs[rank] = {"stdout": (folder / "stdout.log").read_text(), "stderr": (folder / "stderr.log").read_text()}
    shutil.rmtree(logs)
    return result.returncode, outputs


def outcome(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())["generations"]
    for record in metrics:
        record.pop("seconds")
    return (metrics, torch.load(run_dir / "dense.pt", weights_only=True),
            torch.load(run_dir / "fit.pt", weights_only=True)["state_dict"])


def assert_same_outcome(run_dir: Path, reference_dir: Path) -> None:
    """Metrics (but the seconds), final dense network and fit network equal, bit for bit."""
    reference_metrics, reference_dense, reference_fit = outcome(reference_dir)
    metrics, dense, fit = outcome(run_dir)
    assert metrics == reference_metrics
    assert same_tensors(dense, reference_dense) and same_tensors(fit, reference_fit)


def same_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


@pytest.fixture(scope="module")
def reference(workspace):
    dumps = workspace / "dumps"
    dumps.mkdir()
    status, outputs = torchrun(workspace, evolve_args(workspace, workspace / "reference"), dumps=dumps)
    assert status == 0, outputs
    return workspace / "reference", dumps, outputs


def test_every_rank_holds_the_same_weights_after_each_reset_and_each_generation(reference):
    _, dumps, _ = reference
    names = ["reset1", "reset2", "generation1", "generation2", "generation3"]
    for name in names:
        rank0 = torch.load(dumps / f"{name}-rank0.pt", weights_only=True)
        rank1 = torch.load(dumps / f"{name}-rank1.pt", weights_only=True)
        assert same_tensors(rank0, rank1), name  # parameters and BatchNorm statistics, bit for bit
    before, after = (torch.load(dumps / f"{name}-rank0.pt", weights_only=True) for name in ("generation1", "reset1"))
    assert not same_tensors(before, after)  # the reset did re-draw something


DISTILL = ["--distill-fit", "--distill-from", "1", "--finetune-fit", "1"]


@pytest.fixture(scope="module")
def distilled(workspace):
    """A run with in-place distillation from generation 1 and a fine-tuning epoch of the fit."""
    dumps = workspace / "distill-dumps"
    dumps.mkdir()
    status, outputs = torchrun(workspace, evolve_args(workspace, workspace / "distilled") + DISTILL, dumps=dumps,
                               name="distill")
    assert status == 0, outputs
    return workspace / "distilled", dumps


def test_distilling_and_fine_tuning_the_fit_keep_every_rank_alike(distilled):
    run_dir, dumps = distilled
    for name in ("generation1", "generation2", "generation3"):
        rank0, rank1 = (torch.load(dumps / f"{name}-rank{rank}.pt", weights_only=True) for rank in (0, 1))
        assert same_tensors(rank0, rank1), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finetune"]["epochs"] == 1 and len(metrics["generations"]) == 3


def test_ctrl_c_while_distilling_then_resume_equals_an_uninterrupted_run(distilled, workspace):
    out = workspace / "distill-interrupted"
    args = evolve_args(workspace, out) + DISTILL
    status, outputs = torchrun(workspace, args, action="ctrl-c", count=2 * STEPS_PER_EPOCH + 3, name="distill-ctrl-c")
    assert status != 0 and "interrupted at generation 2, epoch 1, step 3" in outputs[0]["stderr"]
    status, outputs = torchrun(workspace, args + ["--resume"], name="distill-resume")
    assert status == 0, outputs
    assert_same_outcome(out, distilled[0])
    finetuned = [json.loads((run / "metrics.json").read_text())["finetune"] for run in (out, distilled[0])]
    assert [{key: value for key, value in record.items() if key != "seconds"} for record in finetuned] == \
        [{key: value for key, value in finetuned[1].items() if key != "seconds"}] * 2


def test_only_rank_0_prints_and_writes_files_in_the_usual_format(reference, workspace):
    run_dir, _, outputs = reference
    assert outputs[1] == {"stdout": "", "stderr": ""}
    printed = " ".join(outputs[0]["stdout"].split())  # rich wraps lines at the console's width
    assert "2 processes (gloo)" in printed and "done: generation 3" in printed
    assert outputs[0]["stderr"] == ""
    dense, split, config = rundir.load_run(run_dir)  # the single-process loaders read it as it is
    assert config.world_size == 2
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"].keys() == dense.state_dict().keys()  # no "module." prefix
    assert checkpoint["world_size"] == 2


def test_sharded_metrics_equal_a_single_process_evaluation(reference):
    run_dir, _, _ = reference
    metrics, _, _ = outcome(run_dir)
    dense, split, config = rundir.load_run(run_dir)
    fit = rundir.load_fit(run_dir / "fit.pt", dense=rundir.RunDirectory(run_dir).build_dense(config))
    _, val_set, _ = demo_datasets(image_size=12, seed=3)
    val = torch.utils.data.DataLoader(val_set, batch_size=128)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    # The fit's BatchNorm statistics were re-estimated, each rank on its part of the training
    # data, then averaged: the saved fit network is the one that was measured.
    assert config.fit_batchnorm == "re-estimated"
    assert not torch.allclose(fit[1].running_mean, dense[1].running_mean[:8])
    for model, prefix in ((dense, "dense"), (fit, "fit")):
        loss, metric = evaluate(model, val, loss_fn, accuracy)
        assert metrics[-1][f"{prefix}_accuracy"] == pytest.approx(metric, abs=1e-6)  # float32 batch means
        assert metrics[-1][f"{prefix}_loss"] == pytest.approx(loss, rel=1e-5)


def test_ctrl_c_then_a_killed_rank_then_resume_equals_an_uninterrupted_run(reference, workspace):
    out = workspace / "interrupted"
    args = evolve_args(workspace, out)
    stop_at = 2 * STEPS_PER_EPOCH + 3  # generation 2, epoch 1, step 3
    status, outputs = torchrun(workspace, args, action="ctrl-c", count=stop_at, name="ctrl-c")
    assert status != 0
    message = outputs[0]["stderr"].strip()
    assert message.startswith("kecompress: interrupted at generation 2, epoch 1, step 3; a checkpoint was saved; "
                              "resume with: torchrun --nproc_per_node 2 -m kecompress evolve"), message
    assert len(message.splitlines()) == 1 and outputs[1]["stderr"] == ""
    progress = torch.load(out / "checkpoint.pt", weights_only=True)["epoch_progress"]
    assert progress["steps"] == 3 and len(progress["ranks_rng"]) == 2

    # The resumed run loses rank 1 in generation 3: torchrun stops rank 0, the last epoch checkpoint stays.
    status, _ = torchrun(workspace, args + ["--resume"], action="kill", count=3 * STEPS_PER_EPOCH, name="kill")
    assert status != 0 and not (out / "dense.pt").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["generation"] == 3

    status, outputs = torchrun(workspace, args + ["--resume"], name="resume")
    assert status == 0, outputs
    assert_same_outcome(out, reference[0])


def test_a_user_error_on_rank_0_alone_ends_every_rank_with_one_line(workspace):
    out = workspace / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")  # only rank 0 looks at --out
    status, outputs = torchrun(workspace, evolve_args(workspace, out), name="user-error")
    assert status != 0
    assert outputs[0]["stderr"].strip().splitlines() == [
        f"kecompress: --out {out} is not empty: pass --resume to continue it, or choose another --out"]
    assert outputs[1] == {"stdout": "", "stderr": ""}
    # The first rank to exit ends with status 2; torchrun then stops any rank still shutting down.
    assert "exitcode  : 2 " in outputs["torchrun"]
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def test_resume_with_another_number_of_processes_is_refused(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    status = main(evolve_args(reference[0].parent, run_dir) + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "trained by 2 processes and this run has 1" in err and "torchrun --nproc_per_node 2" in err


@pytest.mark.parametrize("command", [["export", "resnet18", "--onnx"], ["bench", "resnet18"]])
def test_export_and_bench_refuse_torchrun(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == f"kecompress: kecompress {command[0]} runs in one process: " \
                                              "run it without torchrun"


def test_collectives_need_no_process_group_in_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_sum([1, torch.tensor(2.5)]) == [1.0, 2.5]
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    assert distributed.run_on_main(lambda: "rank 0's") == "rank 0's"
    with pytest.raises(KeyError):  # in one process an error simply propagates
        with distributed.fail_together(KeyError):
            raise KeyError("x")


def test_evolution_under_torchrun_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = nn.Linear(4, 2)
    split = kecompress.split(model, "wels", 0.5)
    with pytest.raises(KecompressError, match="call kecompress.distributed.setup"):
        Evolution(model, split, [], [])
