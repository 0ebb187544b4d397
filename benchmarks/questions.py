"""The scoreboard's reports beyond results.md, one a question (``scoreboard.py --question NAME``):

    generations    KE generation by generation against one network trained as long and the
                   fit-sized network from scratch: docs/generations.md and .png
    distillation   the fit network learning from the dense one (in-place distillation in its forms,
                   fine-tuning) against plain KE and the fit-sized network: docs/distillation.md
    augmentation   one network trained with each augmentation of --data: augmentation.md (docs/data.md's table)

Each is written from the scoreboard's jobs: a KE arm's job keeps its ``history``, one record a
generation with what :class:`GenerationProbe` measured beside it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn as nn

from common import markdown_table, mean_std, paired
from kecompress.callbacks import Callback
from kecompress.evaluation import accuracy, eval_mode, evaluate
from kecompress.files import atomic_path
from kecompress.slim import fit_network

QUESTIONS = {  # the arms and settings of each question (the command line overrides the settings)
    "generations": {"arms": ("ke", "long", "small-scratch"), "generations": 10, "epochs": 30, "seeds": 3},
    "distillation": {"arms": ("ke", "ke-distill", "distill-from-1", "distill-ramp", "distill-t4-labels",
                              "ke-finetune", "small-scratch"), "generations": 3, "epochs": 10, "seeds": 5,
                     "test_fraction": 0.2},
    "augmentation": {"arms": ("augment-resized-crop", "augment-pad-crop", "augment-none"), "per_class": 0,
                     "generations": 2, "epochs": 15, "seeds": 3},
}
NEEDS = {"generations": ("ke", "long", "small-scratch"), "distillation": ("ke",),  # the arms a report reads
         "augmentation": ("augment-resized-crop",)}


# --- measured beside every generation ------------------------------------------------------

def reset_channel_scale(model: nn.Module, split) -> float | None:
    """Mean |BatchNorm scale| of the reset channels over that of the fit channels, all layers together:
    far below 1 means the dense network has learnt to mute the channels every generation re-draws.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> reset_channel_scale(model, kecompress.split(model, "kels", 0.5, example_inputs=torch.zeros(1, 3, 4, 4)))
        1.0
    """
    totals = {True: [0.0, 0], False: [0.0, 0]}
    for name, module in model.named_modules():
        mask = split.masks.get(f"{name}.weight")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and mask is not None:
            scale = module.weight.detach().abs().cpu()
            for kept in (True, False):
                chosen = mask if kept else ~mask
                totals[kept][0] += scale[chosen].sum().item()
                totals[kept][1] += chosen.sum().item()
    if not totals[True][1] or not totals[False][1]:
        return None
    return (totals[False][0] / totals[False][1]) / (totals[True][0] / totals[True][1])


@torch.no_grad()
def prediction_agreement(dense: nn.Module, fit: nn.Module, loader, device) -> float:
    """Fraction of the test images on which the dense network and its fit predict the same class."""
    same = total = 0
    with eval_mode(dense), eval_mode(fit):
        for inputs, _ in loader:
            inputs = inputs.to(device)
            same += (dense(inputs).argmax(1) == fit(inputs).argmax(1)).sum().item()
            total += len(inputs)
    return same / total


class GenerationProbe(Callback):
    """Keeps every generation's record, with ``fit_as_cut_accuracy`` (the fit with the dense
    network's BatchNorm statistics, KE's paper's measure; the record's fit has its own, re-estimated),
    ``agreement`` (:func:`prediction_agreement`) and ``reset_bn_scale`` (:func:`reset_channel_scale`)."""

    def __init__(self):
        self.history: list[dict] = []

    def on_generation_end(self, loop, record) -> None:
        model, split, device, test = loop.model, loop.split, loop.device, loop.val_loader
        as_cut = fit_network(model, split, fit_batchnorm="inherited", device=device, example_inputs=loop.example_inputs)
        self.history.append({**record.to_json(),
                             "fit_as_cut_accuracy": evaluate(as_cut, test, loop.loss_fn, accuracy, device)[1],
                             "agreement": prediction_agreement(model, loop.fit, test, device),
                             "reset_bn_scale": reset_channel_scale(model, split)})


# --- generations -------------------------------------------------------------------------

def points(values: list[float]) -> str:
    """Accuracies (fractions) as 'mean ± std' in percentage points, to two decimals.

    Example:
        >>> points([0.9, 0.96])
        '93.00 ± 4.24'
    """
    return mean_std(values, decimals=2)


def summarise(jobs: dict, seeds: list[int], generations: int) -> dict:
    """Per-seed lists of the numbers the report compares: KE's per generation, the baselines' at their end."""
    keys = {"dense": "dense_accuracy", "fit": "fit_accuracy", "fit_cut": "fit_as_cut_accuracy",
            "agreement": "agreement", "scale": "reset_bn_scale"}
    ke = [jobs["ke", seed]["history"] for seed in seeds]
    summary = {name: [[history[g][key] for history in ke] for g in range(generations)] for name, key in keys.items()}
    for name, key in keys.items():
        summary[f"long_{name}"] = [jobs["long", seed]["history"][-1][key] for seed in seeds]
    return {**summary, "n1": summary["dense"][0], "last": generations - 1,
            "small": [jobs["small-scratch", seed]["fit_accuracy"] for seed in seeds]}


def differences(summary: dict) -> list[tuple[str, list[float], list[float]]]:
    last = summary["last"]
    return [("KE dense (last generation) - N1", summary["dense"][last], summary["n1"]),
            ("KE fit - KE dense (last generation)", summary["fit"][last], summary["dense"][last]),
            ("KE dense (last generation) - one network, equal compute", summary["dense"][last], summary["long_dense"]),
            ("KE fit (last generation) - fit-sized network from scratch", summary["fit"][last], summary["small"])]


def spread_note(values: list[float], baseline: list[float]) -> str:
    difference, verdict = paired(values, baseline)
    return f" (paired difference {difference} points: {verdict})"


def verdicts(summary: dict, generations: int) -> list[str]:
    """The comparisons said plainly from the numbers."""
    last = summary["last"]
    dense, fit, fit_cut = (statistics.fmean(summary[key][last]) for key in ("dense", "fit", "fit_cut"))
    n1, long, small = (statistics.fmean(summary[key]) for key in ("n1", "long_dense", "small"))
    scale, first_scale = statistics.fmean(summary["scale"][last]), statistics.fmean(summary["scale"][0])
    said = [
        f"KE's dense accuracy at generation {generations} ({100 * dense:.2f}%) is "
        + (f"above N1's ({100 * n1:.2f}%)" if dense > n1 else f"not above N1's ({100 * n1:.2f}%)")
        + spread_note(summary["dense"][last], summary["n1"]) + ".",
        within_a_point(f"The fit network at generation {generations}", fit, dense)
        + spread_note(summary["fit"][last], summary["dense"][last]) + ".",
        within_a_point("As cut out, with the dense network's BatchNorm statistics (KE's paper's measure), it",
                       fit_cut, dense) + spread_note(summary["fit_cut"][last], summary["dense"][last]) + ".",
        against("KE's dense network", dense, "one network trained for as many epochs", long)
        + spread_note(summary["dense"][last], summary["long_dense"]) + ".",
        against("The fit network", fit, "the fit-sized network trained from scratch for as many epochs", small)
        + spread_note(summary["fit"][last], summary["small"]) + ".",
        f"Without KE the same slice of the equal-compute network reaches {100 * statistics.fmean(summary['long_fit']):.2f}% "
        f"(as cut out: {100 * statistics.fmean(summary['long_fit_cut']):.2f}%).",
        f"The dense network and its fit network predict the same class on "
        f"{100 * statistics.fmean(summary['agreement'][last]):.2f}% of the test images at generation {generations} "
        f"(one network trained as long and the same slice of it: {100 * statistics.fmean(summary['long_agreement']):.2f}%). "
        + (f"The BatchNorm scales of the reset channels fell to {scale:.2f} of the fit channels' (generation 1: "
           f"{first_scale:.2f}): the dense network turns down the channels every generation re-draws."
           if scale < 0.5 * first_scale else f"Not by muting the reset channels: their BatchNorm scales are still "
           f"{scale:.2f} of the fit channels' (generation 1: {first_scale:.2f})."),
    ]
    return said


def within_a_point(subject: str, fit: float, dense: float) -> str:
    gap = 100 * (dense - fit)
    return (f"{subject} ({100 * fit:.2f}%) is {abs(gap):.2f} points {'below' if gap > 0 else 'above'} the dense "
            "network: " + ("**within one point**" if gap <= 1 else "**more than one point below**"))


def against(ours: str, ours_mean: float, baseline: str, baseline_mean: float) -> str:
    if ours_mean < baseline_mean:
        return (f"**{ours} loses to {baseline}** ({100 * baseline_mean:.2f}%) by "
                f"{100 * (baseline_mean - ours_mean):.2f} points")
    return f"{ours} beats {baseline} ({100 * baseline_mean:.2f}%) by {100 * (ours_mean - baseline_mean):.2f} points"


def generations_report(jobs: dict, seeds: list[int], measured: dict) -> list[str]:
    """docs/generations.md's measured part."""
    settings = measured["settings"]
    g, e = settings["generations"], settings["epochs"]
    summary = summarise(jobs, seeds, g)
    record = jobs["ke", seeds[0]]["history"][0]
    generation_rows = [[f"{index + 1} (N1)" if index == 0 else str(index + 1), str((index + 1) * e), points(dense),
                        points(fit), points([a - b for a, b in zip(fit, dense)]), points(cut),
                        points(summary["agreement"][index]), f"{statistics.fmean(summary['scale'][index]):.2f}"]
                       for index, (dense, fit, cut) in enumerate(zip(summary["dense"], summary["fit"], summary["fit_cut"]))]
    last = summary["last"]
    baseline_rows = [
        ["N1: one generation (KE's generation 1)", str(e), *(points(summary[key][0]) for key in ("dense", "fit", "fit_cut"))],
        [f"KE, generation {g}", str(g * e), *(points(summary[key][last]) for key in ("dense", "fit", "fit_cut"))],
        ["one network, equal compute", str(g * e), *(points(summary[f"long_{key}"]) for key in ("dense", "fit", "fit_cut"))],
        ["fit-sized network from scratch, equal compute", str(g * e), points(summary["small"]), "-", "-"],
    ]
    minutes = {arm: statistics.fmean(jobs[arm, seed]["seconds"] for seed in seeds) / 60
               for arm in ("ke", "long", "small-scratch")}
    return [
        "# Does Knowledge Evolution pay off? Measured against equal-compute baselines", "",
        *setup_lines(measured, record), "",
        "Test accuracy in percent, mean ± standard deviation over the seeds. N1 is KE's first generation (plain "
        "training: nothing is reset before it). The fit network is the slim network cut out of the dense one with "
        "its BatchNorm statistics re-estimated on the training images for it alone (`--fit-batchnorm re-estimated`, "
        "the default); \"as cut out\" has the statistics the dense network gathered, as KE's paper measures it. "
        "\"Same prediction\": how often the dense network and its fit predict the same class. \"Reset / fit BN "
        "scale\": the mean absolute BatchNorm scale of the reset channels over that of the fit channels.", "",
        f"## KE, generation by generation ({g} generations of {e} epochs)", "",
        *markdown_table(["generation", "epochs so far", "KE dense", "KE fit", "fit - dense", "KE fit, as cut out",
                         "same prediction", "reset / fit BN scale"], generation_rows),
        f"## Against the baselines, at equal training compute ({g * e} epochs)", "",
        *markdown_table(["network", "epochs", "dense network", "its fit network", "its fit, as cut out"], baseline_rows),
        "Paired differences per seed, in points (mean ± std, each seed's):", "",
        *[f"- {name}: {paired(values, baseline)[0]}" for name, values, baseline in differences(summary)], "",
        "## Verdict", "", *[f"- {line}" for line in verdicts(summary, g)], "",
        f"Wall time per seed (mean): KE {minutes['ke']:.1f} min, one network for as long {minutes['long']:.1f} min, "
        f"the fit-sized network {minutes['small-scratch']:.1f} min.", "",
        "![KE accuracy per generation against the baselines](generations.png)", ""]


def setup_lines(measured: dict, record: dict) -> list[str]:
    settings = measured["settings"]
    data = (f"ImageFolder `{Path(settings['data']).name}` ({settings['augment']} augmentation)" if settings["data"]
            else f"the bundled 8x8 digits at {settings['image_size']} px")
    images = f"{settings['per_class']} training images a class" if settings["per_class"] else "all training images"
    return [f"Measured {measured['date']} on {measured['machine']}. Command: `{measured['command']}`.", "",
            f"Setup: {data}, {images} ({measured['training_images']} in all), drawn anew for every seed; a fixed "
            f"test set of {measured['test_images']} images. {settings['arch']}, KELS at rate {settings['rate']} (the fit "
            f"has {record['fit_parameters'] / 1e6:.2f}M of {record['dense_parameters'] / 1e6:.2f}M parameters); SGD lr "
            f"{settings['lr']}, {settings['warmup_epochs']} warm-up epochs then cosine, batch {settings['batch_size']}, "
            f"label smoothing {settings['label_smoothing']}; {len(measured['seeds'])} seeds, paired: the networks of "
            "one seed see the same training images."]


def write_generations_chart(path: Path, jobs: dict, seeds: list[int], settings: dict) -> None:
    """KE's dense and fit accuracy per generation (mean ± std over seeds) against the baselines' lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g, e = settings["generations"], settings["epochs"]
    summary = summarise(jobs, seeds, g)
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    generations = list(range(1, g + 1))
    for key, label, style, colour in (("dense", "KE dense", "-o", "C0"), ("fit", "KE fit", "--s", "C1"),
                                      ("fit_cut", "KE fit, as cut out", ":^", "C4")):
        means = [100 * statistics.fmean(values) for values in summary[key]]
        stds = [100 * (statistics.stdev(values) if len(values) > 1 else 0.0) for values in summary[key]]
        axes.plot(generations, means, style, color=colour, label=label)
        axes.fill_between(generations, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color=colour, alpha=0.15)
    for key, label, colour in (("long_dense", f"one network, {g * e} epochs", "C2"),
                               ("small", f"fit-sized network, {g * e} epochs", "C3")):
        mean = 100 * statistics.fmean(summary[key])
        axes.axhline(mean, color=colour, linestyle=":", label=f"{label}: {mean:.1f}")
    axes.set_xlabel(f"generation ({e} epochs each; the baselines train for all {g * e} at once)")
    axes.set_ylabel("test accuracy (%)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    data = Path(settings["data"]).name if settings["data"] else "digits"
    axes.set_title(f"{settings['arch']}, KELS {settings['rate']}, {data}: mean ± std over seeds")
    with atomic_path(path) as target:
        figure.savefig(target, format="png", dpi=110)


# --- distillation ------------------------------------------------------------------------

DEFAULT_DISTILLATION = "ke-distill"  # what --distill-fit does unless told otherwise


def distillation_report(jobs: dict, seeds: list[int], measured: dict) -> list[str]:
    """docs/distillation.md's measured part: each arm's final fit network against KE's and against the
    fit-sized network from scratch, paired per seed, and the other forms against the default."""
    arms = measured["results"]["arms"]
    final = {arm: [jobs[arm, seed]["fit_accuracy"] for seed in seeds] for arm in arms}
    rows, said = [], []
    for arm in arms:
        history = [jobs[arm, seed].get("history") for seed in seeds]
        compared = []
        for baseline, name in (("ke", "KE's fit network"), ("small-scratch", "the fit-sized network from scratch")):
            if baseline not in arms or baseline == arm:
                compared.append("")
                continue
            difference, verdict = paired(final[arm], final[baseline])
            compared.append(f"{difference}: {verdict}")
            said.append(f"{arm} against {name}: {difference} points: {verdict}.")
        if arm.startswith("distill-") and DEFAULT_DISTILLATION in arms:
            for key in ("dense_accuracy", "fit_accuracy"):  # the other forms against --distill-fit's default
                difference, verdict = paired([run[-1][key] for run in history],
                                             [jobs[DEFAULT_DISTILLATION, seed]["history"][-1][key] for seed in seeds])
                said.append(f"{arm} against {DEFAULT_DISTILLATION} (the default), last {key.split('_')[0]} network: "
                            f"{difference} points: {verdict}.")
        per_generation = ([mean_std([run[index][key] for run in history]) for index in (0, -1)
                           for key in ("dense_accuracy", "fit_accuracy")] if None not in history else ["", "", "", ""])
        finetuned = mean_std(final[arm]) if arm == "ke-finetune" else ""
        rows.append([arm, *per_generation[:3], per_generation[3] or mean_std(final[arm]), finetuned, *compared,
                     f"{statistics.fmean(jobs[arm, seed]['seconds'] for seed in seeds) / 60:.1f}"])
    settings = measured["settings"]
    return [
        "# The fit network learning from the dense one: measured", "",
        *setup_lines(measured, jobs["ke", seeds[0]]["history"][0]), "",
        f"Test accuracy (%), mean ± std over the seeds, {settings['generations']} generations of "
        f"{settings['epochs']} epochs (ke-finetune: one generation fewer, then as many epochs of fine-tuning; "
        "small-scratch: all the epochs at once). The arms are `benchmarks/scoreboard.py`'s.", "",
        *markdown_table(["arm", "dense, gen 1", "fit, gen 1", "dense, last", "fit, last", "fit fine-tuned",
                         "final fit − KE's fit (points, per seed)", "final fit − fit-sized from scratch",
                         "minutes a run"], rows),
        *[f"- {line}" for line in said], ""]


# --- augmentation ------------------------------------------------------------------------

def augmentation_report(jobs: dict, seeds: list[int], measured: dict) -> list[str]:
    """Each augmentation's network against resized-crop's (ImageNet's, what every image folder got before)."""
    before = [jobs["augment-resized-crop", seed]["dense_accuracy"] for seed in seeds]
    rows = []
    for arm in measured["results"]["arms"]:
        values = [jobs[arm, seed]["dense_accuracy"] for seed in seeds]
        difference, verdict = paired(values, before) if arm != "augment-resized-crop" else ("", "")
        rows.append([arm.removeprefix("augment-"), mean_std(values), difference, verdict])
    settings = measured["settings"]
    return ["# Augmentation of small images: measured", "",
            f"Measured {measured['date']} on {measured['machine']}. Command: `{measured['command']}`.", "",
            f"{settings['arch']} trained once for {settings['generations'] * settings['epochs']} epochs (no KE: the "
            f"scoreboard's long arm) with each augmentation of `{Path(settings['data']).name}` at "
            f"{settings['image_size']} px, {measured['training_images']} training images, a test set of "
            f"{measured['test_images']}; test accuracy (%), mean ± std over {len(seeds)} seeds, paired per seed:", "",
            *markdown_table(["augmentation", "test accuracy", "− resized-crop (points)", "verdict"], rows)]


REPORTS = {"generations": generations_report, "distillation": distillation_report,
           "augmentation": augmentation_report}
