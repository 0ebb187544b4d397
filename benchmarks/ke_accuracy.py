"""Does Knowledge Evolution pay off? KE against one generation and two equal-compute baselines.

In a small-data regime (a chosen number of training images per class, a fixed held-out test
set), for every seed it trains

    ke     KE for G generations of E epochs, KELS split at --rate; its generation 1 is N1
           (one generation of plain training: the first generation resets nothing)
    long   one dense network for G*E epochs, the same schedule shape (cosine to zero over the
           whole run): the equal-compute baseline
    small  the fit-sized slim network, freshly initialised, trained for G*E epochs: is
           evolution better than just training the small network?

and reports test accuracy per generation (mean and standard deviation over seeds) for the
dense network and the fit hypothesis, the baselines, and the paired differences per seed.
Writes docs/generations.md (the part below its ANALYSIS marker is written by hand and kept) and
docs/generations.png.

    .venv/bin/python benchmarks/ke_accuracy.py        # the bundled digits: about 20 minutes on 2 CPU cores
    .venv/bin/python benchmarks/ke_accuracy.py --data path/to/images --per-class 0 --image-size 224 \\
        --generations 10 --epochs 200 --device cuda   # the paper's setting, for whoever has a GPU

Finished jobs are kept in --work-dir, named by their settings, so a rerun with the same settings
continues where the last one stopped; delete the directory to measure again from scratch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console

from common import (add_small_data_options, add_training_options, at_least, fit_sized_from_scratch, job_settings,
                    machine, machine_line, markdown_table, rich_table, run_script, settings_digest, write_report)
from kecompress import data as datasets
from kecompress import experiment
from kecompress.callbacks import Callback
from kecompress.config import RunConfig, TrainingConfig
from kecompress.evaluation import accuracy, eval_mode, evaluate
from kecompress.evolution import Evolution
from kecompress.files import atomic_path, save_json
from kecompress.slim import fit_network
from kecompress.split import check_rate

DOCS = Path(__file__).resolve().parent.parent / "docs"
ARMS = ("ke", "long", "small")
JOB_FORMAT = 1  # raise when a job's record changes, so that jobs kept from before are run again
console = Console(width=160)  # logs are not terminals; keep the tables whole


# --- one job: one arm, one seed ------------------------------------------------------------

def run_config(settings: dict, seed: int = 0, generations: int = 1, epochs: int = 1) -> RunConfig:
    """The run of one job; its data (seed 0) are the same for every seed: the test set is fixed."""
    training = TrainingConfig(generations=generations, epochs=epochs, lr=settings["lr"], seed=seed,
                              weight_decay=settings["weight_decay"], warmup_epochs=settings["warmup_epochs"])
    return RunConfig(model=settings["arch"], rate=settings["rate"], seed=seed, data=settings["data"],
                     image_size=settings["image_size"], val_fraction=settings["test_fraction"],
                     batch_size=settings["batch_size"], label_smoothing=settings["label_smoothing"],
                     augment=settings["augment"], training=training)


def training_images(pool, classes, settings: dict, seed: int):
    """The seed's small-data training set: --per-class images of every class, or the whole pool."""
    if not settings["per_class"]:
        return pool
    return datasets.per_class_subset(pool, settings["per_class"], seed, classes)


def reset_channel_scale(model: nn.Module, split) -> float | None:
    """Mean |BatchNorm scale| of the reset channels over that of the fit channels, all layers together.

    Far below 1 means the dense network has learnt to mute the channels that every generation
    re-draws, so that it computes nearly what its fit does.
    """
    fit_total = reset_total = fit_count = reset_count = 0.0
    for name, module in model.named_modules():
        mask = split.masks.get(f"{name}.weight")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and mask is not None:
            scale = module.weight.detach().abs().cpu()
            fit_total, fit_count = fit_total + scale[mask].sum().item(), fit_count + mask.sum().item()
            reset_total, reset_count = reset_total + scale[~mask].sum().item(), reset_count + (~mask).sum().item()
    if not fit_count or not reset_count:
        return None
    return (reset_total / reset_count) / (fit_total / fit_count)


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
    """Prints a line per finished generation (worker processes share the terminal) and measures
    more of the fit after each generation:

    * ``fit_as_cut_accuracy``: the slim fit network as cut out, with the BatchNorm statistics the
      dense network gathered (KE's paper's measure). The record's ``fit_accuracy`` is the fit
      network kecompress gives (``loop.fit``), its statistics re-estimated on the training images
      for it alone.
    * ``agreement``: how often the dense network and its fit network predict the same class;
    * ``reset_bn_scale``: :func:`reset_channel_scale`.
    """

    def __init__(self, name: str):
        self.name = name
        self.measured: list[dict] = []

    def on_generation_end(self, loop: Evolution, record) -> None:
        model, split, device, test = loop.model, loop.split, loop.device, loop.val_loader
        as_cut = fit_network(model, split, fit_batchnorm="inherited", device=device, example_inputs=loop.example_inputs)
        measured = {"fit_as_cut_accuracy": evaluate(as_cut, test, loop.loss_fn, accuracy, device)[1],
                    "agreement": prediction_agreement(model, loop.fit, test, device),
                    "reset_bn_scale": reset_channel_scale(model, split)}
        self.measured.append(measured)
        print(f"{self.name}: generation {record.generation}: dense {record.dense:.2%}, fit {record.fit:.2%} "
              f"(as cut out {measured['fit_as_cut_accuracy']:.2%}), same prediction {measured['agreement']:.2%} "
              f"({record.seconds:.0f} s)", flush=True)


def run_job(arm: str, seed: int, settings: dict) -> dict:
    """Train one arm for one seed; return its per-generation records and wall time."""
    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    pool, test, classes = experiment.load_data(run_config(settings))
    train = training_images(pool, classes, settings, seed)
    generations, epochs = settings["generations"], settings["epochs"]
    if arm != "ke":  # the baselines: one generation as long as all of KE's
        generations, epochs = 1, generations * epochs
    probe = GenerationProbe(f"{arm} seed {seed}")
    loop = experiment.build(run_config(settings, seed, generations, epochs), (train, test, classes),
                            device=settings["device"], callbacks=[probe])
    if arm == "small":  # the same data, loss and schedule, for the fit-sized network from scratch
        loop = fit_sized_from_scratch(loop, callbacks=[probe])
    history = loop.run()
    return {"arm": arm, "seed": seed, "settings": settings,
            "history": [{**record.to_json(), **measured} for record, measured in zip(history, probe.measured)],
            "training_images": len(train), "test_images": len(test),
            "seconds": time.perf_counter() - started, "finished_at": time.time()}


# --- statistics ----------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def points(values: list[float]) -> str:
    """Accuracies (fractions) as 'mean ± std' in percentage points."""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def ratio(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def summarise(jobs: dict, seeds: list[int], generations: int) -> dict:
    """Per-seed lists of the numbers the report compares: KE's per generation, the baselines' at their end."""
    keys = {"dense": "dense_accuracy", "fit": "fit_accuracy", "fit_cut": "fit_as_cut_accuracy",
            "agreement": "agreement", "scale": "reset_bn_scale"}
    ke = [jobs["ke", seed]["history"] for seed in seeds]
    summary = {name: [[history[g][key] for history in ke] for g in range(generations)] for name, key in keys.items()}
    for name, key in keys.items():
        summary[f"long_{name}"] = [jobs["long", seed]["history"][-1][key] for seed in seeds]
    return {**summary, "n1": summary["dense"][0], "last": generations - 1,
            "small": [jobs["small", seed]["history"][-1]["dense_accuracy"] for seed in seeds]}


def paired(first: list[float], second: list[float]) -> list[float]:
    return [a - b for a, b in zip(first, second)]


def differences(summary: dict) -> list[tuple[str, list[float]]]:
    last = summary["last"]
    return [
        ("KE dense (last generation) - N1", paired(summary["dense"][last], summary["n1"])),
        ("KE fit - KE dense (last generation)", paired(summary["fit"][last], summary["dense"][last])),
        ("KE dense (last generation) - one network, equal compute", paired(summary["dense"][last], summary["long_dense"])),
        ("KE fit (last generation) - fit-sized network from scratch", paired(summary["fit"][last], summary["small"])),
    ]


def spread_note(values: list[float]) -> str:
    """Whether a mean paired difference stands out of the seed-to-seed spread (two standard errors)."""
    if len(values) < 2:
        return " (one seed: no spread to judge it by)"
    mean, std = mean_std(values)
    beyond = abs(mean) > 2 * std / len(values) ** 0.5
    return (f" (paired difference {100 * mean:+.2f} ± {100 * std:.2f} points over {len(values)} seeds: "
            + ("beyond" if beyond else "within") + " two standard errors)")


def against_baseline(ours: str, ours_mean: float, baseline: str, baseline_said: str, baseline_mean: float,
                     paired_differences: list[float]) -> str:
    """One plain sentence: who wins, by how much, and whether it stands out of the seeds' spread."""
    if ours_mean < baseline_mean:
        return (f"**{ours} loses to {baseline}**: {baseline_said} reaches {100 * baseline_mean:.2f}%, "
                f"{100 * (baseline_mean - ours_mean):.2f} points above it" + spread_note(paired_differences) + ".")
    return (f"{ours} beats {baseline} ({100 * baseline_mean:.2f}%) by {100 * (ours_mean - baseline_mean):.2f} points"
            + spread_note(paired_differences) + ".")


def verdicts(summary: dict, generations: int) -> list[str]:
    """The issue's targets, and the equal-compute comparisons, said plainly from the numbers."""
    named = dict(differences(summary))
    last = summary["last"]
    dense, fit = statistics.fmean(summary["dense"][last]), statistics.fmean(summary["fit"][last])
    n1, long, small = (statistics.fmean(summary[key]) for key in ("n1", "long_dense", "small"))
    fit_cut = statistics.fmean(summary["fit_cut"][last])
    lines = [
        f"KE's dense accuracy at generation {generations} ({100 * dense:.2f}%) is "
        + (f"above N1's ({100 * n1:.2f}%): **met**" if dense > n1 else f"not above N1's ({100 * n1:.2f}%): **missed**")
        + spread_note(named["KE dense (last generation) - N1"]) + ".",
        within_a_point(f"The fit network at generation {generations}", fit, dense)
        + spread_note(named["KE fit - KE dense (last generation)"]) + ".",
        within_a_point("As cut out, with the dense network's BatchNorm statistics (KE's paper's measure), it",
                       fit_cut, dense) + spread_note(paired(summary["fit_cut"][last], summary["dense"][last])) + ".",
        against_baseline("KE's dense network", dense, "the equal-compute baseline", "one network trained "
                         "for as many epochs", long, named["KE dense (last generation) - one network, equal compute"]),
        against_baseline("The fit network", fit, "the fit-sized network trained from scratch",
                         "that network, trained for as many epochs,", small,
                         named["KE fit (last generation) - fit-sized network from scratch"]),
        f"Without KE the same slice of the equal-compute network reaches {100 * statistics.fmean(summary['long_fit']):.2f}% "
        f"(as cut out: {100 * statistics.fmean(summary['long_fit_cut']):.2f}%): the generations are what make the "
        "slim network work.",
        why_the_fit_catches_up(summary, generations),
    ]
    return lines


def why_the_fit_catches_up(summary: dict, generations: int) -> str:
    """What the agreement and BatchNorm scale measurements say, and what they rule out."""
    last = summary["last"]
    scale, first_scale = statistics.fmean(summary["scale"][last]), statistics.fmean(summary["scale"][0])
    agreement = 100 * statistics.fmean(summary["agreement"][last])
    long_agreement = 100 * statistics.fmean(summary["long_agreement"])
    muted = scale < 0.5 * first_scale
    return (f"The dense network and its fit network predict the same class on {agreement:.2f}% of the test images "
            f"at generation {generations} (one network trained as long and the same slice of it: "
            f"{long_agreement:.2f}%): the reset hypothesis, re-drawn every generation, comes to change few of the "
            "dense network's decisions. "
            + (f"The BatchNorm scales of the reset channels fell to {scale:.2f} of the fit channels' "
               f"(generation 1: {first_scale:.2f}): the dense network turns down the channels that every "
               "generation re-draws (normalisation layers are never reset)." if muted else
               f"Not by muting the reset channels: their BatchNorm scales are still {scale:.2f} of the fit "
               f"channels' (generation 1: {first_scale:.2f})."))


def within_a_point(subject: str, fit: float, dense: float) -> str:
    gap = 100 * (dense - fit)
    return (f"{subject} ({100 * fit:.2f}%) is {abs(gap):.2f} points {'below' if gap > 0 else 'above'} the dense "
            "network: " + ("**met** (within one point)" if gap <= 1 else "**missed** (more than one point below)"))


# --- output --------------------------------------------------------------------------------

def generation_rows(summary: dict, epochs: int) -> list[list[str]]:
    rows = []
    for g, (dense, fit, fit_cut) in enumerate(zip(summary["dense"], summary["fit"], summary["fit_cut"])):
        label = f"{g + 1} (N1)" if g == 0 else str(g + 1)
        rows.append([label, str((g + 1) * epochs), points(dense), points(fit), points(paired(fit, dense)),
                     points(fit_cut), points(summary["agreement"][g]), ratio(summary["scale"][g])])
    return rows


def baseline_rows(summary: dict, generations: int, epochs: int) -> list[list[str]]:
    last, total = summary["last"], generations * epochs
    return [
        ["N1: one generation (KE's generation 1)", str(epochs), points(summary["n1"]), points(summary["fit"][0]),
         points(summary["fit_cut"][0])],
        [f"KE, generation {generations}", str(total), points(summary["dense"][last]), points(summary["fit"][last]),
         points(summary["fit_cut"][last])],
        ["one network, equal compute", str(total), points(summary["long_dense"]), points(summary["long_fit"]),
         points(summary["long_fit_cut"])],
        ["fit-sized network from scratch, equal compute", str(total), points(summary["small"]), "-", "-"],
    ]


GENERATION_HEADER = ["generation", "epochs so far", "KE dense", "KE fit", "fit - dense", "KE fit, as cut out",
                     "same prediction", "reset / fit BN scale"]
BASELINE_HEADER = ["network", "epochs", "dense network", "its fit network", "its fit, as cut out"]


def write_markdown(path: Path, summary: dict, jobs: dict, args, settings: dict, command: str) -> None:
    first = jobs["ke", args.seeds[0]]
    record = first["history"][0]
    data = (f"ImageFolder data `{settings['data']}`, training images augmented with {settings['augment']} "
            "(kecompress/augment.py)"
            if settings["data"] else "scikit-learn's bundled 8x8 digits scaled to "
            f"{settings['image_size']}x{settings['image_size']}, no augmentation")
    per_class = (f"{settings['per_class']} training images per class ({first['training_images']} in all), "
                 "drawn anew for every seed" if settings["per_class"] else
                 f"all {first['training_images']} training images")
    job_minutes = sum(job["seconds"] for job in jobs.values()) / 60
    span_minutes = (max(job["finished_at"] for job in jobs.values())
                    - min(job["finished_at"] - job["seconds"] for job in jobs.values())) / 60
    arm_minutes = {arm: statistics.fmean(jobs[arm, seed]["seconds"] for seed in args.seeds) / 60 for arm in ARMS}
    g, e = settings["generations"], settings["epochs"]
    lines = [
        "# Does Knowledge Evolution pay off? Measured against equal-compute baselines",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine_line(machine())}, device {settings['device']}, "
        f"{args.workers} worker process(es) of {settings['threads']} thread(s); "
        f"the jobs took {job_minutes:.0f} minutes of worker time in all, {span_minutes:.0f} minutes from the "
        "first one's start to the last one's end.",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Setup: {data}; {per_class}; a fixed held-out test set of {first['test_images']} images, the same for "
        f"every seed and network. {settings['arch']}, randomly initialised; KELS split at rate {settings['rate']} "
        f"(the fit network has {record['fit_parameters'] / 1e6:.2f}M of {record['dense_parameters'] / 1e6:.2f}M "
        f"parameters). Every generation and baseline: SGD, learning rate {settings['lr']}, momentum 0.9, weight "
        f"decay {settings['weight_decay']}, {settings['warmup_epochs']} warm-up epochs then cosine to zero, batch "
        f"{settings['batch_size']}, label smoothing {settings['label_smoothing']}. {len(args.seeds)} seeds "
        f"({', '.join(map(str, args.seeds))}): a seed sets the training images, the initialisation, the data order "
        "and the resets; the networks of one seed see the same training images, so differences are paired.",
        "",
        "Test accuracy in percent, mean ± standard deviation over the seeds. N1 is KE's first generation (plain "
        "training: nothing is reset before it). The fit network is the slim network cut out of the dense one "
        "(`kecompress.slice_fit`) with its BatchNorm statistics re-estimated on the training images for it "
        "alone, as `kecompress evolve` measures and saves it (`--fit-batchnorm re-estimated`, the default); "
        "\"as cut out\" is the same weights with the statistics the dense network gathered, as KE's paper "
        "measures it (`--fit-batchnorm inherited`). \"Same prediction\": how often the dense network and its "
        "fit network predict the same class. \"Reset / fit BN scale\": the mean absolute BatchNorm scale of "
        "the reset channels over that of the fit channels.",
        "",
        f"## KE, generation by generation ({g} generation{'s' * (g > 1)} of {e} epoch{'s' * (e > 1)})",
        "",
        *markdown_table(GENERATION_HEADER, generation_rows(summary, e)),
        f"## Against the baselines, at equal training compute ({g * e} epochs)",
        "",
        *markdown_table(BASELINE_HEADER, baseline_rows(summary, g, e)),
        "Paired differences per seed, in points (mean ± std; the seeds' values in brackets):",
        "",
        *[f"- {name}: {points(values)} ({', '.join(f'{100 * value:+.2f}' for value in values)})"
          for name, values in differences(summary)],
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in verdicts(summary, g)],
        "",
        f"Wall time per seed (mean): KE {arm_minutes['ke']:.1f} min, one network for as long "
        f"{arm_minutes['long']:.1f} min, the fit-sized network {arm_minutes['small']:.1f} min.",
        "",
        "![KE accuracy per generation against the baselines](generations.png)",
        "",
    ]
    write_report(path, lines)


def write_chart(path: Path, summary: dict, settings: dict) -> None:
    """All generations on the left; on the right the second half, zoomed in to where the lines meet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g, e = settings["generations"], settings["epochs"]
    generations = list(range(1, g + 1))
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    whole, zoom = figure.subplots(1, 2)
    zoom_from = g // 2  # index of the first generation in the zoomed panel
    shown = []
    for key, label, style, colour in (("dense", "KE dense", "-o", "C0"), ("fit", "KE fit", "--s", "C1"),
                                      ("fit_cut", "KE fit, as cut out", ":^", "C4")):
        means = [100 * statistics.fmean(values) for values in summary[key]]
        stds = [100 * mean_std(values)[1] for values in summary[key]]
        for axes in (whole, zoom):
            axes.plot(generations, means, style, color=colour, label=label)
            axes.fill_between(generations, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=colour, alpha=0.15)
        shown += means[zoom_from:]
    for key, label, colour in (("long_dense", f"one network, {g * e} epochs", "C2"),
                               ("small", f"fit-sized network, {g * e} epochs", "C3")):
        mean, std = (100 * value for value in mean_std(summary[key]))
        for axes in (whole, zoom):
            axes.axhline(mean, color=colour, linestyle=":", label=f"{label}: {mean:.1f}")
            axes.axhspan(mean - std, mean + std, color=colour, alpha=0.1)
        shown.append(mean)
    zoom.set_xlim(zoom_from + 0.7, g + 0.3)
    zoom.set_ylim(min(shown) - 2, max(shown) + 2)
    zoom.set_title(f"generations {zoom_from + 1} to {g}, zoomed in")
    for axes in (whole, zoom):
        axes.set_xlabel(f"generation ({e} epoch{'s' * (e > 1)} each; the baselines train for all {g * e} at once)")
        axes.set_ylabel("test accuracy (%)")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    whole.legend(fontsize="small", loc="lower right")
    data = Path(settings["data"]).name if settings["data"] else "digits demo"
    images = f"{settings['per_class']}/class" if settings["per_class"] else "all images"
    whole.set_title(f"{settings['arch']}, KELS {settings['rate']}, {data} ({images}): mean ± std over seeds")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


# --- main ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_small_data_options(parser)
    parser.add_argument("--image-size", type=at_least(1), default=None,
                        help="input size (default: 32 demo, 224 folder)")
    parser.add_argument("--generations", type=at_least(1), default=10, help="KE generations G")
    parser.add_argument("--epochs", type=at_least(1), default=30, help="epochs per generation E")
    parser.add_argument("--rate", type=float, default=RunConfig.rate, help="KELS split rate")
    parser.add_argument("--seeds", type=at_least(1), default=3, help="number of seeds (0, 1, ...)")
    add_training_options(parser)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/ke_accuracy"), help="finished jobs are kept here")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where generations.md and generations.png go")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    args.seeds = list(range(args.seeds))
    cores = os.cpu_count() or 1
    args.workers = args.workers or (1 if args.device.startswith("cuda") else min(cores, 3 * len(args.seeds)))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    default_size = datasets.FOLDER_IMAGE_SIZE if args.data else datasets.DEMO_IMAGE_SIZE
    settings = job_settings(args, ("seeds", "workers", "work_dir", "out_dir"), args.image_size or default_size,
                            JOB_FORMAT)
    # Fail here, in one line, on settings or data that cannot give the small-data regime.
    check_rate(args.rate)
    pool, test, classes = experiment.load_data(run_config(settings, generations=args.generations, epochs=args.epochs))
    training_images(pool, classes, settings, seed=0)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def job_path(arm: str, seed: int) -> Path:  # named by the settings too: other settings keep their own jobs
        return args.work_dir / f"{arm}-seed{seed}-{settings_digest(settings)}.json"

    jobs, pending = {}, []
    for arm in ARMS:  # the longest jobs first, so the workers finish together
        for seed in args.seeds:
            path = job_path(arm, seed)
            if path.is_file() and (kept := json.loads(path.read_text()))["settings"] == settings:
                jobs[arm, seed] = kept
                print(f"{arm} seed {seed}: kept from {path}", flush=True)
            else:
                pending.append((arm, seed))
    console.print(f"{len(pending)} jobs to run, {args.workers} at a time, {settings['threads']} thread(s) each")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool_executor:
        futures = [pool_executor.submit(run_job, arm, seed, settings) for arm, seed in pending]
        for future in as_completed(futures):
            result = future.result()
            save_json(result, job_path(result["arm"], result["seed"]))  # kept at once: a rerun continues
            jobs[result["arm"], result["seed"]] = result
            print(f"{result['arm']} seed {result['seed']}: done in {result['seconds'] / 60:.1f} min", flush=True)

    summary = summarise(jobs, args.seeds, args.generations)
    console.print(rich_table("KE per generation: test accuracy %, mean ± std over seeds", GENERATION_HEADER,
                             generation_rows(summary, args.epochs)))
    console.print(rich_table("Against the baselines at equal compute", BASELINE_HEADER,
                             baseline_rows(summary, args.generations, args.epochs)))
    for name, values in differences(summary):
        console.print(f"{name}: {points(values)} points")
    for line in verdicts(summary, args.generations):
        console.print(line.replace("**", ""))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/ke_accuracy.py", *argv])
    minutes = (time.perf_counter() - started) / 60
    write_markdown(args.out_dir / "generations.md", summary, jobs, args, settings, command)
    write_chart(args.out_dir / "generations.png", summary, settings)
    console.print(f"wrote {args.out_dir / 'generations.md'} and {args.out_dir / 'generations.png'} ({minutes:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("ke_accuracy", main))
