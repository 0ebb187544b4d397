import os

# One thread per test process, subprocesses included: `make test` runs two processes on two
# cores, and small tensors gain little from a second thread anyway.
os.environ["OMP_NUM_THREADS"] = "1"

import copy  # noqa: E402
import dataclasses  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import kecompress  # noqa: E402
from kecompress.errors import KecompressError  # noqa: E402

torch.set_num_threads(1)

collect_ignore = ["data"]  # run directories of earlier versions and the scripts that made them

# The architectures the toolkit promises to handle, and more torchvision ones beyond them.
REQUIRED_ARCHS = ["resnet18", "resnet50", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
                  "efficientnet_b0", "vgg11_bn", "regnet_x_400mf"]
MORE_ARCHS = ["resnext50_32x4d", "regnet_y_400mf", "mnasnet0_5", "googlenet", "squeezenet1_0", "alexnet"]


def build(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A randomly initialised torchvision classifier (no download)."""
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    size = 224 if name == "alexnet" else 64  # AlexNet's stride-4 stem needs a larger image
    return torch.randn(batch, 3, size, size)


def randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters, so that a test
    comparing outputs would notice a channel cut in the wrong place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def error(call, *args, **kwargs) -> str:
    """The message of the KecompressError that ``call(*args, **kwargs)`` raises, checked to be one line."""
    with pytest.raises(KecompressError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def zero_reset_hypothesis(model: torch.nn.Module, split) -> torch.nn.Module:
    """A copy of ``model`` with the reset hypothesis of ``split`` zeroed: the masked dense network."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in masked.named_parameters():
            param.mul_(split.masks[name])
    return masked


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_cnn() -> nn.Module:
    """A two-convolution BatchNorm CNN for 3x8x8 inputs and 3 classes: the training loop's tests."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Training (36 images, shuffled from ``seed``) and validation (12) loaders for :func:`small_cnn`."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(48, 3, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.2).long()
    train = DataLoader(TensorDataset(x[:36], y[:36]), batch_size=8, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[36:], y[36:]), batch_size=8)
    return train, val


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as in a terminal (Python's KeyboardInterrupt), whatever the shell that started
    the tests did (one that ignores SIGINT, for a job started with ``&`` from a script); the
    handler that was there is put back after the test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def terminal_sigint_in_child() -> None:
    """``preexec_fn`` for a child process that is Ctrl-C'd as from a terminal: SIGINT's default
    action, which Python turns into KeyboardInterrupt, even when this shell ignores SIGINT
    (ignored signals are inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def load_benchmark(name: str):
    """The module of ``benchmarks/NAME.py``, imported as running the script does (its directory on
    the path, for its ``from common import``)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(script.parent))
        spec.loader.exec_module(module)
    return module


def run_benchmark(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a benchmark script in a process group of its own, so that a timeout also ends the worker
    processes it started (left behind, they would slow every later test down)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def small_evolution(run_dir=None, generations: int = 2, **options):
    """The loop's tests' run: :func:`small_cnn` on :func:`loaders`, KELS 0.5, ``generations``
    generations of 2 epochs (5 steps each), seeded, with the Evolution ``options`` given."""
    from kecompress import Evolution, TrainingConfig, split

    torch.manual_seed(0)
    model = small_cnn()
    the_split = split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    return Evolution(model, the_split, train, val, TrainingConfig(generations=generations, epochs=2, lr=0.05, seed=4),
                     run_dir=run_dir, **options)


def strip(history):
    """The records without their wall time, which differs from run to run."""
    return [dataclasses.replace(record, seconds=None) for record in history]


class StopAtStep(kecompress.Callback):
    """Asks the loop to stop (as Ctrl-C does) after its ``step``-th training step."""

    def __init__(self, step):
        self.step, self.steps = step, 0

    def on_step_end(self, loop, loss, samples):
        self.steps += 1
        if self.steps == self.step:
            loop.request_stop()
