"""Edge-popup: learned scores over frozen random weights, weight level and kernel level."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.utils import prune

import kecompress
from kecompress import EdgePopup, KecompressError, Split, experiment
from kecompress.cli import main
from kecompress.config import RunConfig, TrainingConfig
from kecompress.edge_popup import apply_edge_popup, edge_popup, edge_popup_channels, kept_count, scores_split, \
    plain_network
from kecompress.export import export_pair
from kecompress.interrupt import RunInterrupted

from conftest import build

SIZE = 32


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.77])
def test_every_layer_keeps_exactly_the_requested_fraction(rate):
    model = apply_edge_popup(build("resnet18"), "edge-popup", rate)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            n = module.weight_mask.numel()
            assert int(module.weight_mask.sum()) == kept_count(n, rate) == n - round((1 - rate) * n)


def test_the_mask_keeps_the_top_scores_of_its_layer():
    conv = edge_popup(nn.Conv2d(3, 4, 3), "weight", rate=0.25)
    conv(torch.randn(1, 3, 8, 8))
    kept = conv.weight_scores.abs()[conv.weight_mask.bool()]
    dropped = conv.weight_scores.abs()[~conv.weight_mask.bool()]
    assert kept.min() > dropped.max()


def test_weights_are_the_signed_kaiming_constant_and_stay_frozen_while_scores_learn():
    model = apply_edge_popup(build("mobilenet_v2"), "edge-popup", 0.5)
    conv = model.features[0][0]
    sigma = (2.0 / (conv.weight_orig[0].numel() * 0.5)) ** 0.5
    assert torch.allclose(conv.weight_orig.abs(), torch.full_like(conv.weight_orig, sigma))
    frozen = {name: p.clone() for name, p in model.named_parameters() if not name.endswith("_scores")}
    scores = {name: p.clone() for name, p in model.named_parameters() if name.endswith("_scores")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in scores)
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, scores[n]) for n, p in model.named_parameters() if n in scores)


def test_remove_makes_the_masked_weight_permanent_like_any_pruning():
    conv = edge_popup(nn.Conv2d(3, 4, 3), "weight", rate=0.5)
    masked = conv.weight.detach().clone()
    prune.remove(conv, "weight")
    assert sorted(name for name, _ in conv.named_parameters()) == ["bias", "weight"]
    assert torch.equal(conv.weight, masked) and conv.weight.requires_grad
    assert not prune.is_pruned(conv) and int(conv.weight.count_nonzero()) == 54


def test_global_unstructured_keeps_the_global_top_scores():
    a, b = nn.Linear(10, 10), nn.Linear(10, 20)
    scores = {(a, "weight"): torch.randn(10, 10), (b, "weight"): torch.randn(20, 10)}
    prune.global_unstructured([(a, "weight"), (b, "weight")], pruning_method=EdgePopup, amount=0.7,
                              importance_scores=scores)
    assert int(a.weight_mask.sum() + b.weight_mask.sum()) == 90
    everything = torch.cat([scores[(a, "weight")].flatten(), scores[(b, "weight")].flatten()]).abs()
    threshold = everything.sort(descending=True).values[89]
    assert torch.equal(a.weight_mask.bool(), scores[(a, "weight")].abs() >= threshold)


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.2])
def test_a_rate_outside_the_open_interval_is_refused(rate):
    with pytest.raises(KecompressError, match="0, 1"):
        edge_popup(nn.Linear(3, 3), "weight", rate=rate)


def test_an_already_pruned_tensor_is_refused():
    layer = prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=0.5)
    with pytest.raises(KecompressError, match="already pruned"):
        edge_popup(layer, "weight", rate=0.5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "regnet_x_400mf"])
def test_kernel_level_masks_are_the_kels_masks_of_the_channels_it_keeps(name):
    """With scores that rank the first channels highest, the learned split is exactly KELS's."""
    model, example = build(name), torch.randn(1, 3, SIZE, SIZE)
    kels = kecompress.split(model, "kels", 0.5, example_inputs=example, grouped="narrow")  # as edge-popup cuts groups
    edge_popup_channels(model, 0.5, example)
    for module in model.modules():
        if "channel_scores" in module._parameters:
            with torch.no_grad():
                module.channel_scores.copy_(torch.arange(module.channel_scores.numel(), 0, -1))
    learned = scores_split(model, 0.5)
    assert learned.masks.keys() == kels.masks.keys()
    assert all(torch.equal(learned.masks[key], kels.masks[key]) for key in kels.masks), name


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_kernel_level_fit_slices_to_its_masked_network_and_exports(name, tmp_path):
    model, example = build(name), torch.randn(1, 3, SIZE, SIZE)
    edge_popup_channels(model, 0.5, example)
    model.train()
    model(torch.randn(8, 3, SIZE, SIZE))  # BatchNorm statistics of the masked network
    model.eval()
    learned = scores_split(model, 0.5)
    kels = kecompress.split(build(name), "kels", 0.5, example_inputs=example)
    assert any(not torch.equal(learned.masks[k], kels.masks[k]) for k in kels.masks)  # not KELS's first channels
    assert learned.fit_count() == kels.fit_count()  # as many channels in every group
    fit = kecompress.slice_fit(plain_network(model, keep_masked=False), learned, example_inputs=example)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(fit(x), model(x), atol=1e-5, rtol=1e-4)
    rows = export_pair(plain_network(model), fit, tmp_path, (3, SIZE, SIZE), exporter="torchscript")
    assert all(row["max_abs_diff"] < 1e-3 for row in rows)


def test_plain_network_has_the_architectures_names_and_the_masked_weights():
    model = apply_edge_popup(build("resnet18"), "edge-popup", 0.5)
    model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    plain = plain_network(model)
    assert plain.state_dict().keys() == build("resnet18").state_dict().keys()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    split = scores_split(model, 0.5)
    assert split.method == "wels" and torch.equal(plain.conv1.weight != 0, split.masks["conv1.weight"])
    random_weights = plain_network(model, keep_masked=False)
    assert torch.equal(random_weights.conv1.weight, model.conv1.weight_orig)


def test_kernel_level_scores_get_gradients_and_the_weights_stay_frozen():
    model = edge_popup_channels(build("resnet18"), 0.5, torch.randn(1, 3, SIZE, SIZE)).train()
    before = {name: p.clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    scores = {name for name, _ in model.named_parameters() if name.endswith("channel_scores")}
    assert changed == scores and len(scores) > 5


# --- the command line ---------------------------------------------------------------------

def cli_config(split: str) -> RunConfig:
    return RunConfig(model="resnet18", split=split, image_size=12, batch_size=256, seed=3,
                     training=TrainingConfig(generations=1, epochs=2, weight_decay=0.0, seed=3))


def cli_args(split: str) -> list[str]:
    return ["evolve", "resnet18", "--split", split, "--image-size", "12", "--batch-size", "256", "--seed", "3",
            "--generations", "1", "--epochs", "2"]


def run_files(run_dir: Path) -> tuple:
    metrics = [{**record, "seconds": 0} for record in json.loads((run_dir / "metrics.json").read_text())["generations"]]
    dense = torch.load(run_dir / "dense.pt", weights_only=True)
    split = Split.load(run_dir / "split.pt")
    return metrics, dense, split


@pytest.mark.parametrize("split", ["edge-popup", "edge-popup-kels"])
def test_an_interrupted_run_resumes_from_the_command_line_bit_for_bit(split, tmp_path, capsys, terminal_sigint):
    assert main([*cli_args(split), "--out", str(tmp_path / "whole")]) == 0

    class StopAt(kecompress.Callback):
        steps = 0

        def on_step_end(self, loop, loss, samples):
            self.steps += 1
            if self.steps == 3:
                loop.request_stop()

    with pytest.raises(RunInterrupted):
        experiment.build(cli_config(split), run_dir=tmp_path / "stopped", callbacks=[StopAt()]).run()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "stopped")]) == 0  # unfinished: the split of the checkpoint's scores
    assert "fit 50.0% of the split's parameters" in " ".join(capsys.readouterr().out.split()) or split != "edge-popup"
    assert main([*cli_args(split), "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    (metrics, dense, learned), (again, dense_again, learned_again) = run_files(tmp_path / "whole"), \
        run_files(tmp_path / "stopped")
    assert metrics == again and dense.keys() == dense_again.keys()
    assert all(torch.equal(dense[key], dense_again[key]) for key in dense)
    assert learned.masks.keys() == learned_again.masks.keys()
    assert all(torch.equal(learned.masks[key], learned_again.masks[key]) for key in learned.masks)
    assert learned.method == ("kels" if split == "edge-popup-kels" else "wels")
    assert main(["export", str(tmp_path / "whole"), "--onnx", "--exporter", "torchscript"]) == 0
    assert (tmp_path / "whole" / "onnx" / "fit.onnx").is_file()


@pytest.mark.parametrize("extra, named", [
    (["--generations", "2"], "--generations 1"), (["--forget", "none"], "--forget"), (["--forget", "ke"], "--forget"),
    (["--distill-fit"], "--distill-fit"), (["--rate", "1"], "(0, 1)"), (["--fit-only"], "--fit-only"),
    (["--weight-decay", "0.001"], "--weight-decay 0")])
def test_what_edge_popup_cannot_do_is_refused_in_one_line(extra, named, tmp_path, capsys):
    out = tmp_path / "run"
    status = main([*cli_args("edge-popup"), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
