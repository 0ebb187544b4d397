"""The scoreboard: which recipe gives the best slim network on small data, against the strongest baselines.

Every arm trains for the same total epochs (G generations of E epochs, or one run of G*E), on the
same training images, with the same loss, optimizer and schedule shape, seed by seed:

    ke              Knowledge Evolution as in the paper (KELS or WELS at --rate, the fit kept, the rest re-drawn)
    ke-distill      KE with in-place distillation of the fit network from generation 2 on (--distill-fit)
    ke-finetune     KE for G-1 generations, then the fit network fine-tuned alone for E epochs with
                    knowledge distillation from the dense network (--finetune-fit E); KELS only
    llf             later-layer forgetting (Zhou et al., ICLR 2022): the last stage re-initialised every generation
    shrink-perturb  every parameter becomes 0.4 p + 0.1 q, q a fresh draw (Ash & Adams, NeurIPS 2020)
    warm-restart    nothing re-initialised: a new optimizer and schedule every generation (the control)
    long            one dense network trained for G*E epochs, and its fit (the same slice, statistics re-estimated)
    long-distill    one generation of G*E epochs with in-place distillation from the first step
    small-scratch   the fit-sized network, freshly initialised, trained for G*E epochs (KELS only)
    small-kd        the fit-sized network trained for G*E epochs with knowledge distillation (T=4, weight
                    0.5; Hinton et al. 2015) from the long arm's dense network of the same seed (KELS only)
    small-ban       born-again fit-sized networks (Furlanello et al., ICML 2018): G generations of E epochs,
                    each a fresh network taught by the labels and the previous generation (T=1, weight 0.5)
    learned-scratch the network of a learned shape (channels by BatchNorm scale, global widths at the uniform
                    fit's MACs) trained from scratch for G*E epochs; the shape learned by E epochs of the dense
                    network with network slimming's L1 penalty (--shape-epochs E --sparsity 1e-4), counted
    learned-kd      learned-scratch with knowledge distillation from the long arm's dense network, as small-kd
    ke-learned      KE whose fit is chosen after generation 1 by BatchNorm scale, global widths at the uniform
                    fit's MACs (--select bn-scale --widths global, the penalty on in generation 1)
    uniform-select  ke-learned at uniform widths (--rate of every group), the channels by BatchNorm scale: "which
                    channels" without "how many"
    lottery         for --split wels: iterative magnitude pruning with rewinding to the end of the first
                    epoch (Frankle et al., ICLR 2019 and ICML 2020), G rounds of E epochs, to the WELS fit's sparsity
    magnitude       for --split wels: the dense network trained for (G-1)*E epochs, pruned once by global weight
                    magnitude to the WELS fit's sparsity, then fine-tuned for E epochs with the pruned weights kept
                    at zero (a new optimizer and schedule)
    edge-popup      for --split wels: edge-popup (Ramanujan et al., CVPR 2020): frozen signed-constant random
                    weights, learned scores keep --rate of every conv and linear layer (the WELS fit's sparsity),
                    G*E epochs, no weight decay
    edge-popup-kels for --split kels: edge-popup over the channels of KELS's coupled groups, as many kept as the
                    KELS fit keeps (its shapes and MACs), cut out as a slim network; G*E epochs, no weight decay

and, chosen with --arms (the distillation and augmentation questions'):

    distill-from-1     from the first step (temperature 1, weight 1, no label term: the slimmable networks' form)
    distill-ramp       from the first step, its weight raised linearly from 0 over generation 1
    distill-t4-labels  from the first step, temperature 4, the fit's own loss on the labels beside it
    augment-NAME       the long arm with --data augmented by NAME (resized-crop, pad-crop, none)

An arm's cost is its training's multiply-accumulates: 3x the forward MACs of every network trained
per image (forward and backward), a teacher's forward pass per image, the in-place distillation
pass, the BatchNorm re-estimation of a fit network, and for small-kd the training of its teacher
(the long arm) too, since a user has to train it first; and its wall time (small-kd's includes its
teacher's). With --label-noise P a seeded fraction P of the training labels becomes another class.

Results of one data set go to docs/scoreboard/<name>.json (the per-seed figures, as --json writes
them) and .png (accuracy against training cost); docs/results.md is then rebuilt from every data set
measured so far (the part below its ANALYSIS marker is written by hand and kept). --question NAME
runs a question's arms and settings instead and writes its own report (benchmarks/questions.py):
docs/generations.md (KE generation by generation) or docs/distillation.md. Finished jobs are kept in
--work-dir, named by their settings, so a rerun continues where the last one stopped.

    .venv/bin/python benchmarks/scoreboard.py                       # the digits, every arm, 5 seeds: about an hour on 2 cores
    .venv/bin/python benchmarks/scoreboard.py --label-noise 0.2
    .venv/bin/python benchmarks/scoreboard.py --data /tmp/animals --per-class 0   # Animal-Shape (benchmarks/animal_shapes.py)
    .venv/bin/python benchmarks/scoreboard.py --data DIR --per-class 0 --image-size 224 \\
        --generations 10 --epochs 200 --lr 0.256 --warmup-epochs 5 --device cuda   # the paper's setting, for a GPU
    .venv/bin/python benchmarks/scoreboard.py --question generations   # docs/generations.md: about 45 min
    .venv/bin/python benchmarks/scoreboard.py --question generations --data /tmp/animals --per-class 0 \
        --out-dir docs/animals                                           # docs/animals/generations.md
    .venv/bin/python benchmarks/scoreboard.py --question distillation  # docs/distillation.md: about 30 min
    .venv/bin/python benchmarks/scoreboard.py --question augmentation --data /tmp/animals --out-dir /tmp/aug
        # docs/data.md's augmentation table (30 epochs, 3 seeds), written to /tmp/aug/augmentation.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

import kecompress
from common import (add_small_data_options, add_training_options, at_least, job_settings, machine, machine_line,
                    markdown_table, mean_std, paired, rich_table, run_script, settings_digest, write_report)
from questions import NEEDS, QUESTIONS, REPORTS, GenerationProbe, write_generations_chart
from kecompress import data as datasets
from kecompress import experiment
from kecompress.augment import AUGMENTATIONS
from kecompress.bench import count_macs_params
from kecompress.callbacks import Callback
from kecompress.config import RunConfig, TrainingConfig
from kecompress.distillation import FitDistillation
from kecompress.edge_popup import found_network
from kecompress.files import atomic_path, save_json
from kecompress.finetune import FitFinetuning
from kecompress.forgetting import from_settings, settings_of
from kecompress.split import check_rate

DOCS = Path(__file__).resolve().parent.parent / "docs"
KELS_ARMS = ("ke", "ke-distill", "ke-finetune", "llf", "shrink-perturb", "warm-restart", "long", "long-distill",
             "small-scratch", "small-kd", "small-ban", "learned-scratch", "learned-kd", "ke-learned", "uniform-select",
             "edge-popup-kels")
WELS_ARMS = ("ke", "ke-distill", "llf", "shrink-perturb", "warm-restart", "long", "long-distill", "lottery",
             "magnitude", "edge-popup")
DISTILLATION_ARMS = ("distill-from-1", "distill-ramp", "distill-t4-labels")  # only when --arms names them
AUGMENT_ARMS = tuple(f"augment-{name}" for name in AUGMENTATIONS)  # likewise
ARM_ORDER = tuple(dict.fromkeys(KELS_ARMS + WELS_ARMS + DISTILLATION_ARMS + AUGMENT_ARMS))  # the tables' rows
FORGETTING = {"ke": "ke", "llf": "llf", "shrink-perturb": "shrink-perturb", "warm-restart": "none"}
# The arms whose jobs keep every generation's record, with GenerationProbe's measurements.
PROBED = (*FORGETTING, "ke-distill", *DISTILLATION_ARMS, "ke-finetune", "long", "long-distill")
SMALL_KD = FitFinetuning(1, temperature=4.0, kd_weight=0.5)  # Hinton et al.'s usual form; epochs unused here
BORN_AGAIN = FitFinetuning(1, temperature=1.0, kd_weight=0.5)
# What a slim network must beat; a sparse one, the same weights kept by magnitude after training
# (and, below, the trained dense network itself: the seed's claim for edge-popup).
BASELINES = ("small-scratch", "small-kd", "magnitude")
# The learned arms' shape: channels by BatchNorm scale, one global ranking to the uniform fit's MACs (the
# default --fit-macs), network slimming's penalty at its paper's CIFAR strength while it is learned.
LEARNED_SHAPE = {"select": "bn-scale", "widths": "global", "sparsity": 1e-4}
KD_ARMS = ("small-kd", "learned-kd")  # they learn from their seed's long arm
JOB_FORMAT = 1  # raise when a job's record changes, so that jobs kept from before are run again
PAPER_SETTING = ("python benchmarks/scoreboard.py --data DIR --per-class 0 --image-size 224 --generations 10 "
                 "--epochs 200 --lr 0.256 --warmup-epochs 5 --device cuda")
DATA_SETS = {  # the four tables of docs/results.md, and the command that fills each
    "digits": "python benchmarks/scoreboard.py",
    "digits-noise20": "python benchmarks/scoreboard.py --label-noise 0.2",
    "animals": "python benchmarks/scoreboard.py --data /tmp/animals --per-class 0",
    "animals-noise20": "python benchmarks/scoreboard.py --data /tmp/animals --per-class 0 --label-noise 0.2",
}


# --- the data ------------------------------------------------------------------------------

class NoisyLabels(Dataset):
    """``dataset`` with a seeded ``fraction`` of its labels replaced by another class, each drawn
    uniformly from the other ``num_classes - 1`` (so that exactly that fraction is wrong).

    Example:
        >>> train, _, _ = datasets.demo_datasets(seed=0)
        >>> noisy = NoisyLabels(train, 0.2, 10, seed=0)
        >>> sum(a != b for a, b in zip(noisy.labels, datasets.class_labels(train))) == round(0.2 * len(train))
        True
    """

    def __init__(self, dataset: Dataset, fraction: float, num_classes: int, seed: int):
        self.dataset = dataset
        labels = datasets.class_labels(dataset)
        generator = torch.Generator().manual_seed(seed)
        wrong = torch.randperm(len(labels), generator=generator)[:round(fraction * len(labels))]
        shifts = torch.randint(1, num_classes, (len(wrong),), generator=generator)
        self.labels = list(labels)
        for index, shift in zip(wrong.tolist(), shifts.tolist()):
            self.labels[index] = (labels[index] + shift) % num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0], self.labels[index]


def run_config(settings: dict, seed: int, generations: int, epochs: int, **fields) -> RunConfig:
    """One arm's run; its data (seed 0) are the same for every seed: the test set is fixed."""
    training = TrainingConfig(generations=generations, epochs=epochs, lr=settings["lr"], seed=seed,
                              weight_decay=settings["weight_decay"], warmup_epochs=settings["warmup_epochs"])
    return RunConfig(model=settings["arch"], split=settings["split"], rate=settings["rate"], seed=seed,
                     data=settings["data"], image_size=settings["image_size"], val_fraction=settings["test_fraction"],
                     batch_size=settings["batch_size"], label_smoothing=settings["label_smoothing"],
                     augment=settings["augment"], training=training, **fields)


def seed_data(settings: dict, seed: int):
    """The seed's training images (``--per-class`` of every class, labels made noisy as asked),
    the fixed test set, and the class names."""
    pool, test, classes = experiment.load_data(run_config(settings, 0, 1, 1))
    train = datasets.per_class_subset(pool, settings["per_class"], seed, classes) if settings["per_class"] else pool
    if settings["label_noise"]:
        train = NoisyLabels(train, settings["label_noise"], len(classes), seed)
    return train, test, classes


# --- the arms ------------------------------------------------------------------------------

class MagnitudeRewind:
    """Iterative magnitude pruning with rewinding as a forgetting strategy: before each generation
    after the first, the smallest surviving weights of the split's layers (globally, by magnitude)
    are pruned so that the kept fraction falls geometrically to ``final_fraction`` at the last
    generation, and every parameter and buffer goes back to what it was at the rewind point.
    :class:`KeepPruned` takes that snapshot and keeps the pruned weights at zero.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> strategy = MagnitudeRewind(final_fraction=0.25, generations=2)
        >>> strategy.rewind = copy.deepcopy(model.state_dict())
        >>> strategy.forget_(model, kecompress.split(model, "wels", 0.5))
        >>> int((model.weight != 0).sum())
        2
    """

    def __init__(self, final_fraction: float, generations: int):
        self.final_fraction, self.generations = final_fraction, generations
        self.masks: dict[str, torch.Tensor] = {}
        self.rewind: dict | None = None
        self.pruned_rounds = 0

    @torch.no_grad()
    def forget_(self, model: nn.Module, split, seed=None) -> None:
        self.pruned_rounds += 1
        keep = self.final_fraction ** (self.pruned_rounds / max(self.generations - 1, 1))
        weights = {name: param for name, param in model.named_parameters() if name in split.masks}
        masks = {name: self.masks.get(name, torch.ones_like(param, dtype=torch.bool)) for name, param in weights.items()}
        scores = torch.cat([(param.abs() * masks[name]).flatten() for name, param in weights.items()])
        pruned = scores.numel() - round(keep * scores.numel())
        threshold = scores.kthvalue(pruned).values if pruned > 0 else -1.0
        self.masks = {name: masks[name] & (param.abs() > threshold) for name, param in weights.items()}
        model.load_state_dict(self.rewind)
        self.apply(model)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights."""
        for name, param in model.named_parameters():
            if name in self.masks:
                param.mul_(self.masks[name])


class KeepPruned(Callback):
    """The lottery arm's training: the rewind point after the first epoch, pruned weights kept at zero."""

    def __init__(self, strategy: MagnitudeRewind):
        self.strategy = strategy

    def on_step_end(self, loop, loss, samples) -> None:
        self.strategy.apply(loop.model)

    def on_epoch_end(self, loop, generation, epoch) -> None:
        if generation == 1 and epoch == 0:
            self.strategy.rewind = copy.deepcopy(loop.model.state_dict())


def fit_distillation(arm: str, epochs: int) -> FitDistillation | None:
    """The in-place distillation of a distilling KE arm (None for any other), ``epochs`` a generation's.

    Example:
        >>> fit_distillation("distill-ramp", 12).ramp_epochs, fit_distillation("ke", 12)
        (12, None)
    """
    forms = {"ke-distill": FitDistillation(), "distill-from-1": FitDistillation(start_generation=1),
             "distill-ramp": FitDistillation(start_generation=1, ramp_epochs=epochs),  # over generation 1
             "distill-t4-labels": FitDistillation(temperature=4.0, label_weight=1.0, start_generation=1)}
    return forms.get(arm)


def forward_macs(loop) -> tuple[int, int]:
    """Forward MACs of one image through the dense network and through its fit (sliced for
    KELS; a WELS fit is the dense network with zeros, which dense kernels compute at full cost)."""
    shape = loop.input_shape
    dense, _ = count_macs_params(loop.model, shape)
    if loop.split.method != "kels":
        return dense, dense
    fit, _ = count_macs_params(kecompress.slice_fit(loop.model, loop.split, example_inputs=loop.example_input()), shape)
    return dense, fit


def run_job(arm: str, seed: int, settings: dict, teacher_file: str | None = None) -> dict:
    """Train one arm for one seed; its test accuracies (fractions, None where the arm has no
    such network), training MACs and wall time."""
    torch.set_num_threads(settings["threads"])
    started = time.process_time()  # the job's CPU time: its figure does not grow with other processes' load
    if arm in AUGMENT_ARMS:  # the arm's augmentation of --data, not the settings'
        settings = {**settings, "augment": arm.removeprefix("augment-")}
    data = seed_data(settings, seed)
    images = len(data[0])
    g, e = settings["generations"], settings["epochs"]
    total = g * e
    device = settings["device"]
    probe = GenerationProbe() if arm in PROBED else None

    def build(generations: int, epochs: int, seed_: int = seed, **fields):
        return experiment.build(run_config(settings, seed_, generations, epochs, **fields), data, device=device,
                                callbacks=[probe] if probe else [])

    extra = {}
    if arm in FORGETTING or fit_distillation(arm, e):
        forget = settings_of(from_settings({"name": FORGETTING.get(arm, "ke")}))
        distill = fit_distillation(arm, e)
        loop = build(g, e, forget=forget, distill_fit=distill and distill.identity())
        dense_macs, fit_macs = forward_macs(loop)
        history = loop.run()
        dense, fit = history[-1].dense, history[-1].fit
        macs = 3 * dense_macs * images * total + fit_macs * images * g  # + a re-estimation pass a generation
        if distill:
            macs += 3 * fit_macs * images * e * (g - distill.start_generation + 1)
    elif arm == "ke-finetune":
        loop = build(g - 1, e, finetune_fit=FitFinetuning(e).identity())
        dense_macs, fit_macs = forward_macs(loop)
        history = loop.run()
        dense, fit = history[-1].dense, loop.progress.finetune.fit
        macs = (3 * dense_macs * images * (g - 1) * e + fit_macs * images * (g - 1)  # the generations
                + (3 * fit_macs + dense_macs) * images * e)  # the fit trained, the dense network teaching
    elif arm in ("long", "long-distill", *AUGMENT_ARMS):
        distill = FitDistillation(start_generation=1).identity() if arm == "long-distill" else None
        loop = build(1, total, distill_fit=distill)
        dense_macs, fit_macs = forward_macs(loop)
        [record] = loop.run()
        dense, fit = record.dense, record.fit
        macs = 3 * dense_macs * images * total + fit_macs * images + (3 * fit_macs * images * total if distill else 0)
        if arm == "long" and teacher_file:  # small-kd's teacher
            torch.save(loop.model.state_dict(), teacher_file)
    elif arm in ("small-scratch", "small-kd"):
        loop = build(1, total)
        dense_macs, fit_macs = forward_macs(loop)
        if arm == "small-kd":
            loop.model.load_state_dict(torch.load(teacher_file, weights_only=True))
            teacher = loop.model  # the long job's record lies beside its network
            teacher_job = json.loads(Path(teacher_file).with_suffix(".json").read_text())
        student = build(1, total, fit_only=True)  # what `kecompress evolve --fit-only` trains
        if arm == "small-kd":
            experiment.learn_from(student, teacher, SMALL_KD)
            extra["teacher_seconds"] = teacher_job["seconds"]
        [record] = student.run()
        dense, fit = None, record.dense
        macs = 3 * fit_macs * images * total
        if arm == "small-kd":  # the teacher's own training (the long arm's), then its forward passes
            macs += teacher_job["train_macs"] + dense_macs * images * total
    elif arm == "small-ban":
        previous = None
        for generation in range(1, g + 1):
            if generation == 1:
                dense_macs, fit_macs = forward_macs(build(1, e))
            student = build(1, e, seed_=seed + 1000 * (generation - 1), fit_only=True)  # its own start and data order
            if previous is not None:
                experiment.learn_from(student, previous, BORN_AGAIN)
            [record] = student.run()
            previous = student.model
        dense, fit = None, record.dense
        macs = 3 * fit_macs * images * total + fit_macs * images * e * (g - 1)
    elif arm == "lottery":
        loop = build(g, e)
        strategy = MagnitudeRewind(loop.split.fit_fraction(), g)
        loop.forgetting = strategy
        loop.callbacks.append(KeepPruned(strategy))
        dense_macs, fit_macs = forward_macs(loop)
        history = loop.run()
        dense, fit = None, history[-1].dense  # the last round's network is the pruned ticket
        macs = 3 * dense_macs * images * total
        extra["ticket_fraction"] = sum(int(mask.sum()) for mask in strategy.masks.values()) / loop.split.total_count()
    elif arm == "magnitude":
        dense_loop = build(1, (g - 1) * e)
        dense_loop.run()
        loop = build(1, e)
        loop.model.load_state_dict(dense_loop.model.state_dict())
        strategy = MagnitudeRewind(loop.split.fit_fraction(), generations=2)  # one pruning round, to the final fraction
        strategy.rewind = copy.deepcopy(loop.model.state_dict())  # "rewinding" to the trained weights: none
        strategy.forget_(loop.model, loop.split)
        loop.callbacks.append(KeepPruned(strategy))
        dense_macs, fit_macs = forward_macs(loop)
        [record] = loop.run()
        dense, fit = None, record.dense  # the pruned, fine-tuned network
        macs = 3 * dense_macs * images * total
        extra["kept_fraction"] = sum(int(mask.sum()) for mask in strategy.masks.values()) / loop.split.total_count()
    elif arm in ("edge-popup", "edge-popup-kels"):
        config = run_config(settings, seed, 1, total)
        config = replace(config, split=arm, training=replace(config.training, weight_decay=0.0))
        loop = experiment.build(config, data, device=device)
        dense_macs, _ = count_macs_params(loop.model, loop.input_shape)
        fit_macs = count_macs_params(found_network(loop.model, settings["rate"], loop.example_input()),
                                     loop.input_shape)[0] if arm == "edge-popup-kels" else dense_macs
        [record] = loop.run()
        dense, fit = None, record.fit  # the found network (record.dense is the random one it was found in)
        macs = 3 * dense_macs * images * total + fit_macs * images  # the masked network trained; a re-estimation
        extra["random_network_accuracy"] = record.dense
    elif arm in ("learned-scratch", "learned-kd"):
        loop = build(1, total)
        dense_macs, _ = forward_macs(loop)
        if arm == "learned-kd":
            loop.model.load_state_dict(torch.load(teacher_file, weights_only=True))
            teacher = loop.model
            teacher_job = json.loads(Path(teacher_file).with_suffix(".json").read_text())
        student = build(1, total, fit_only=True, **LEARNED_SHAPE, shape_epochs=e)  # --fit-only --shape-epochs E
        fit_macs, _ = count_macs_params(student.model, student.input_shape)
        if arm == "learned-kd":
            experiment.learn_from(student, teacher, SMALL_KD)
            extra["teacher_seconds"] = teacher_job["seconds"]
        [record] = student.run()
        dense, fit = None, record.dense
        macs = 3 * dense_macs * images * e + 3 * fit_macs * images * total  # the shape's dense epochs, then the fit
        if arm == "learned-kd":
            macs += teacher_job["train_macs"] + dense_macs * images * total
        extra["fit_mac_share"] = fit_macs / dense_macs
    elif arm in ("ke-learned", "uniform-select"):
        shape = LEARNED_SHAPE if arm == "ke-learned" else {**LEARNED_SHAPE, "widths": "uniform"}
        loop = build(g, e, select_after=1, **shape)
        history = loop.run()
        dense_macs, fit_macs = forward_macs(loop)  # the fit as chosen after generation 1
        dense, fit = history[-1].dense, history[-1].fit
        macs = 3 * dense_macs * images * total + fit_macs * images * g
        extra["fit_mac_share"] = fit_macs / dense_macs
    else:
        raise ValueError(f"unknown arm {arm}")
    if probe:
        extra["history"] = probe.history
    seconds = time.process_time() - started + extra.get("teacher_seconds", 0.0)
    return {"arm": arm, "seed": seed, "settings": settings, "dense_accuracy": dense, "fit_accuracy": fit,
            "train_macs": macs, "seconds": seconds, "training_images": images, "test_images": len(data[1]),
            "dense_macs": dense_macs, "fit_macs": fit_macs, **extra}


# --- running the jobs ----------------------------------------------------------------------

def run_jobs(arms: list[str], seeds: list[int], settings: dict, work_dir: Path, workers: int,
             needs_history: bool = False) -> dict:
    """Every (arm, seed) job's result: kept from ``work_dir`` where it finished before (with its
    generations' history where ``needs_history`` and the arm keeps one), run otherwise, ``workers``
    at a time. small-kd waits for its seed's long arm, whose dense network it learns from."""
    digest = settings_digest(settings)
    path = lambda arm, seed: work_dir / f"{arm}-seed{seed}-{digest}.json"  # noqa: E731
    teacher = lambda seed: work_dir / f"long-seed{seed}-{digest}.pt"  # noqa: E731
    jobs, waiting = {}, []
    for arm in arms:
        for seed in seeds:
            kept = json.loads(path(arm, seed).read_text()) if path(arm, seed).is_file() else None
            if kept and ("history" in kept or not (needs_history and arm in PROBED)):
                jobs[arm, seed] = kept
                print(f"{arm} seed {seed}: kept from {path(arm, seed)}", flush=True)
            else:
                waiting.append((arm, seed))
    needs_teacher = {seed for arm, seed in waiting if arm in KD_ARMS}
    for seed in needs_teacher:  # a long job kept from before without its network: train it again
        if ("long", seed) not in waiting and not teacher(seed).is_file():
            waiting.append(("long", seed))
    print(f"{len(waiting)} jobs to run, {workers} at a time, {settings['threads']} thread(s) each", flush=True)

    def ready(arm, seed):
        return arm not in KD_ARMS or (teacher(seed).is_file() and path("long", seed).is_file())

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        running = {}
        while waiting or running:
            for arm, seed in [job for job in waiting if ready(*job)][:max(0, workers - len(running))]:
                waiting.remove((arm, seed))
                file = str(teacher(seed)) if arm in ("long", *KD_ARMS) and seed in needs_teacher else None
                running[pool.submit(run_job, arm, seed, settings, file)] = arm, seed
            if not running:
                raise RuntimeError(f"jobs that can never start: {waiting}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                arm, seed = running.pop(future)
                result = future.result()
                save_json(result, path(arm, seed))  # kept at once: a rerun continues
                jobs[arm, seed] = result
                dense, fit = (f"{100 * result[key]:.1f}%" if result[key] is not None else "-"
                              for key in ("dense_accuracy", "fit_accuracy"))
                print(f"{arm} seed {seed}: dense {dense}, fit {fit} ({result['seconds'] / 60:.1f} min)", flush=True)
    return jobs


# --- what the jobs say ---------------------------------------------------------------------

def results_json(jobs: dict, arms: list[str], seeds: list[int]) -> dict:
    """The machine-readable results: per arm, each seed's accuracies (fractions), MACs and seconds."""
    keys = ("seed", "dense_accuracy", "fit_accuracy", "train_macs", "seconds")
    return {"arms": {arm: {"per_seed": [{key: jobs[arm, seed][key] for key in keys} for seed in seeds]}
                     for arm in arms}}


def fit_values(results: dict, arm: str) -> list[float]:
    return [row["fit_accuracy"] for row in results["arms"][arm]["per_seed"]]


def mean_of(results: dict, arm: str, key: str) -> float | None:
    values = [row[key] for row in results["arms"][arm]["per_seed"]]
    return None if None in values else statistics.fmean(values)


def recommend(results: dict) -> str:
    """The cheapest arm (by training MACs) whose fit network is not worse, beyond two standard
    errors of the paired differences, than the arm with the best mean fit accuracy, among the
    arms whose mean fit no cheaper arm beats (a spread-out arm must not win a tie that a cheaper,
    better arm lost).

    Example:
        >>> row = lambda fit, macs: {"seed": 0, "dense_accuracy": None, "fit_accuracy": fit, "train_macs": macs, "seconds": 1}
        >>> recommend({"arms": {"a": {"per_seed": [row(0.9, 10), row(0.8, 10)]},
        ...                     "b": {"per_seed": [row(0.89, 5), row(0.81, 5)]}}})
        'b'
        >>> recommend({"arms": {"best": {"per_seed": [row(0.9, 10), row(0.9, 10), row(0.9, 10)]},
        ...                     "cheap": {"per_seed": [row(0.8, 1), row(0.8, 1), row(0.81, 1)]},
        ...                     "spread": {"per_seed": [row(0.95, 5), row(0.4, 5), row(0.9, 5)]}}})
        'best'
    """
    fit, cost = {}, {}
    for arm in results["arms"]:
        fit[arm], cost[arm] = mean_of(results, arm, "fit_accuracy"), mean_of(results, arm, "train_macs")
    best = max(fit, key=fit.get)
    undominated = [arm for arm in fit if not any(cost[other] < cost[arm] and fit[other] > fit[arm] for other in fit)]
    tied = [arm for arm in undominated
            if arm == best or paired(fit_values(results, arm), fit_values(results, best))[1] != "worse"]
    return min(tied, key=cost.get)


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for arm, entry in results["arms"].items():
        per_seed = entry["per_seed"]
        dense = [row["dense_accuracy"] for row in per_seed]
        label = f"{arm} (measured {entry['date']})" if "date" in entry else arm  # kept from an earlier table
        rows.append([label, "-" if None in dense else mean_std(dense), mean_std(fit_values(results, arm)),
                     f"{mean_of(results, arm, 'train_macs') / 1e12:.2f}",
                     f"{mean_of(results, arm, 'seconds') / 60:.1f}"])
    return rows


def comparisons(results: dict) -> list[tuple[str, str, str]]:
    """Paired differences of every arm's fit network against the baselines, and of every dense
    network against the long arm's: (what, difference, verdict)."""
    lines = []
    for baseline in (name for name in BASELINES if name in results["arms"]):
        for arm in results["arms"]:
            if arm != baseline:
                difference, verdict = paired(fit_values(results, arm), fit_values(results, baseline))
                lines.append((f"{arm} fit − {baseline}", difference, verdict))
    if "long" in results["arms"]:
        long = [row["dense_accuracy"] for row in results["arms"]["long"]["per_seed"]]
        for arm in results["arms"]:
            if arm != "long" and mean_of(results, arm, "dense_accuracy") is not None:
                dense = [row["dense_accuracy"] for row in results["arms"][arm]["per_seed"]]
                lines.append((f"{arm} dense − long dense", *paired(dense, long)))
        if "magnitude" in results["arms"]:  # a WELS table: does a sparse network match the dense one?
            for arm in results["arms"]:
                if arm != "long":
                    lines.append((f"{arm} fit − long dense", *paired(fit_values(results, arm), long)))
    return lines


def with_earlier_arms(results: dict, settings: dict, seeds: list[int], earlier_file: Path) -> dict:
    """``results`` with the arms of ``earlier_file`` (a data set's JSON, as this script writes it)
    that this run did not measure, when that file was measured with the very same settings (data,
    model, epochs, versions, job format) and has every one of ``seeds``, taken for those seeds alone
    (differences are paired seed by seed): a new arm joins a table without retraining the others.
    Each arm carries the date it was measured on.

    Example:
        >>> import tempfile
        >>> row = {"seed": 0, "dense_accuracy": None, "fit_accuracy": 0.9, "train_macs": 1, "seconds": 1}
        >>> earlier = Path(tempfile.mkdtemp()) / "digits.json"
        >>> save_json({"arms": {"a": {"per_seed": [row]}, "b": {"per_seed": [row]}},
        ...            "measured": {"settings": {"lr": 0.1}, "date": "2026-11-30"}}, earlier)
        >>> sorted(with_earlier_arms({"arms": {"b": {"per_seed": [row]}}}, {"lr": 0.1}, [0], earlier)["arms"])
        ['a', 'b']
        >>> sorted(with_earlier_arms({"arms": {"b": {"per_seed": [row]}}}, {"lr": 0.2}, [0], earlier)["arms"])
        ['b']
        >>> sorted(with_earlier_arms({"arms": {"b": {"per_seed": [row]}}}, {"lr": 0.1}, [0, 1], earlier)["arms"])
        ['b']
    """
    if not earlier_file.is_file():
        return results
    earlier = json.loads(earlier_file.read_text())
    if earlier["measured"]["settings"] != settings:
        return results
    arms = {}
    for arm, entry in earlier["arms"].items():
        rows = {row["seed"]: row for row in entry["per_seed"]}
        if arm not in results["arms"] and all(seed in rows for seed in seeds):
            arms[arm] = {"date": entry.get("date", earlier["measured"]["date"]),
                         "per_seed": [rows[seed] for seed in seeds]}
    return {**results, "arms": {**arms, **results["arms"]}}


def verdict_lines(results: dict) -> list[str]:
    """The recommendation and the moonshot's conditions, said plainly."""
    chosen = results["recommended"]
    arms, lines = results["arms"], []
    fit = mean_of(results, chosen, "fit_accuracy")
    lines.append(f"Recommended: **{chosen}** (fit {100 * fit:.1f}%, {mean_of(results, chosen, 'train_macs') / 1e12:.2f} "
                 "TMACs of training): the cheapest arm whose fit network is not worse, beyond two standard errors, "
                 "than the best mean fit, among the arms that no cheaper arm beats on mean fit.")
    for baseline in (name for name in BASELINES if name in arms and name != chosen):
        difference, verdict = paired(fit_values(results, chosen), fit_values(results, baseline))
        cost = mean_of(results, chosen, "train_macs") / mean_of(results, baseline, "train_macs")
        lines.append(f"{chosen} against {baseline}: {difference} points, {verdict}; at {cost:.2f}x its training MACs.")
    return lines


def write_chart(path: Path, results: dict, title: str) -> None:
    """Left: fit accuracy (and dense, where an arm has one) against training cost; right: each
    arm's fit accuracy, best first; mean ± std over the seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    by_cost, by_arm = figure.subplots(1, 2, width_ratios=[3, 2])
    colours = {arm: f"C{index % 10}" for index, arm in enumerate(results["arms"])}

    def spread(values):
        return 100 * statistics.fmean(values), 100 * statistics.stdev(values) if len(values) > 1 else 0.0

    for arm in results["arms"]:
        cost = mean_of(results, arm, "train_macs") / 1e12
        for key, marker, filled in (("fit_accuracy", "o", True), ("dense_accuracy", "s", False)):
            values = [row[key] for row in results["arms"][arm]["per_seed"]]
            if None not in values:
                mean, std = spread(values)
                by_cost.errorbar(cost, mean, yerr=std, fmt=marker, color=colours[arm], capsize=3,
                                 markerfacecolor=colours[arm] if filled else "white")
    by_cost.set_xlabel("training cost (TMACs, forward and backward; teachers included)")
    by_cost.set_ylabel("test accuracy (%): ● fit network, □ dense network")
    by_cost.grid(alpha=0.3)
    ranked = sorted(results["arms"], key=lambda arm: mean_of(results, arm, "fit_accuracy"))
    for row, arm in enumerate(ranked):
        mean, std = spread(fit_values(results, arm))
        by_arm.barh(row, mean, xerr=std, color=colours[arm], capsize=3)
    by_arm.set_yticks(range(len(ranked)), ranked)
    by_arm.set_xlabel("fit network's test accuracy (%)")
    by_arm.grid(axis="x", alpha=0.3)
    figure.suptitle(title)
    with atomic_path(path) as target:
        figure.savefig(target, format="png", dpi=110)


def section(name: str, measured: dict) -> list[str]:
    """docs/results.md's part for one data set."""
    settings, results = measured["settings"], measured["results"]
    data = (f"ImageFolder `{Path(settings['data']).name}` ({settings['augment']} augmentation)" if settings["data"]
            else "the bundled 8x8 digits")
    images = f"{settings['per_class']} training images a class" if settings["per_class"] else "all training images"
    noise = f", {settings['label_noise']:.0%} of the training labels replaced by another class" \
        if settings["label_noise"] else ""
    return [
        f"## {name}",
        "",
        f"{data[0].upper()}{data[1:]} at {settings['image_size']} px, {images} ({measured['training_images']}){noise}; a fixed test set of "
        f"{measured['test_images']} images. {settings['arch']}, {settings['split'].upper()} at rate {settings['rate']}; "
        f"{settings['generations']} generations of {settings['epochs']} epochs, or one run of "
        f"{settings['generations'] * settings['epochs']}; SGD lr {settings['lr']}, cosine, batch {settings['batch_size']}, "
        f"label smoothing {settings['label_smoothing']}; {len(measured['seeds'])} seeds. Measured "
        f"{measured['date']} on {measured['machine']}. Command: `{measured['command']}`.",
        "",
        "Test accuracy (%), mean ± std over the seeds; training cost in TMACs (10¹² multiply-accumulates) and "
        "minutes per seed (one worker thread on the CPU"
        + ("; an arm marked with a date was measured then, with the same settings and seeds, and kept: its "
           "minutes are wall time, the others' the job's CPU time" if any("date" in entry for entry in results["arms"].values())
           else "") + "):",
        "",
        *markdown_table(["arm", "dense network", "fit network", "training TMACs", "minutes"], table_rows(results)),
        "Paired differences per seed, in points (mean ± std, then each seed's), and whether beyond two standard errors:",
        "",
        *[f"- {what}: {difference}: {verdict}" for what, difference, verdict in comparisons(results)],
        "",
        *[f"- {line}" for line in verdict_lines(results)],
        "",
        f"![accuracy against training cost, {name}](scoreboard/{name}.png)",
        "",
    ]


def write_results_md(path: Path, measured_dir: Path) -> None:
    """docs/results.md from every data set measured so far, in DATA_SETS's order, then the others."""
    measured = {}
    for file in sorted(measured_dir.glob("*.json")):
        written = json.loads(file.read_text())
        measured[file.stem] = {**written["measured"], "results": {key: written[key] for key in ("arms", "recommended")}}
    order = [name for name in DATA_SETS if name in measured] + [name for name in measured if name not in DATA_SETS]
    missing = [name for name in DATA_SETS if name not in measured]
    lines = [
        "# The scoreboard: which recipe gives the best slim network on small data",
        "",
        "Every arm trains for the same total epochs on the same images, seed by seed "
        "(`benchmarks/scoreboard.py` says what each arm is and how its cost is counted). The fit network "
        "of a KE arm is the slim network cut out of the dense one, its BatchNorm statistics re-estimated; "
        "the small-* arms train a network of the fit's shape directly. A difference counts only beyond "
        "two standard errors of the per-seed paired differences. The paper's setting, for whoever has a GPU: "
        f"`{PAPER_SETTING}`.",
        "",
    ]
    for name in order:
        lines += section(name, measured[name])
    if missing:
        lines += ["## Not measured yet", "", *[f"- {name}: `{DATA_SETS[name]}`" for name in missing], ""]
    write_report(path, lines)


def write_question(question: str, jobs: dict, seeds: list[int], measured: dict, out_dir: Path) -> None:
    """A question's report (and chart) in ``out_dir``, its hand-written part kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir / f"{question}.md", REPORTS[question](jobs, seeds, measured))
    written = [out_dir / f"{question}.md"]
    if question == "generations":
        write_generations_chart(out_dir / "generations.png", jobs, seeds, measured["settings"])
        written.append(out_dir / "generations.png")
    print(f"wrote {' and '.join(map(str, written))}", flush=True)


# --- main ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_small_data_options(parser)
    parser.add_argument("--name", default=None,
                        help="the data set's name in docs/results.md (default: digits or the folder's name, "
                             "-noiseNN with label noise)")
    parser.add_argument("--split", choices=("kels", "wels"), default="kels")
    parser.add_argument("--question", choices=tuple(QUESTIONS), default=None,
                        help="run a question's arms and settings and write its report (docs/QUESTION.md) "
                             "instead of results.md")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: every arm of the split)")
    parser.add_argument("--image-size", type=at_least(1), default=32)
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels made wrong")
    parser.add_argument("--generations", type=at_least(2), default=5, help="generations G")
    parser.add_argument("--epochs", type=at_least(1), default=12, help="epochs per generation E")
    parser.add_argument("--rate", type=float, default=RunConfig.rate, help="split rate")
    parser.add_argument("--seeds", type=at_least(2), default=5, help="number of seeds (0, 1, ...)")
    add_training_options(parser)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/scoreboard"), help="finished jobs are kept here")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where results.md and scoreboard/ go")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    question = parser.parse_known_args(argv)[0].question
    if question:  # its settings become the defaults; the command line still overrides them
        preset = QUESTIONS[question]
        parser.set_defaults(**{key: value for key, value in preset.items() if key != "arms"},
                            arms=",".join(preset["arms"]))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    if not 0 <= args.label_noise < 1:
        parser.error(f"--label-noise must be in [0, 1), got {args.label_noise}")
    every = (KELS_ARMS if args.split == "kels" else WELS_ARMS) + DISTILLATION_ARMS + AUGMENT_ARMS
    args.arms = [arm.strip() for arm in args.arms.split(",")] if args.arms else [
        arm for arm in every if arm not in DISTILLATION_ARMS + AUGMENT_ARMS]
    if unknown := [arm for arm in args.arms if arm not in every]:
        parser.error(f"--arms: {', '.join(unknown)} not arms of --split {args.split}; choose from {', '.join(every)}")
    if not args.data and any(arm in AUGMENT_ARMS for arm in args.arms):
        parser.error("the augment-* arms augment an image folder's training images: pass --data DIR")
    if args.question and (missing := [arm for arm in NEEDS[args.question] if arm not in args.arms]):
        parser.error(f"--question {args.question} compares against {', '.join(missing)}: add it to --arms")
    args.seeds = list(range(args.seeds))
    args.workers = args.workers or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    data_name = Path(args.data).name if args.data else "digits"
    args.name = args.name or data_name + (f"-noise{round(100 * args.label_noise)}" if args.label_noise else "") \
        + ("-wels" if args.split == "wels" else "")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    settings = job_settings(args, ("seeds", "workers", "work_dir", "out_dir", "json", "arms", "name", "question"),
                            args.image_size, JOB_FORMAT)
    check_rate(args.rate)  # a bad setting or data set fails here, in one line
    seed_data(settings, 0)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    jobs = run_jobs(args.arms, args.seeds, settings, args.work_dir, args.workers, needs_history=bool(args.question))
    results = results_json(jobs, args.arms, args.seeds)
    scoreboard = args.out_dir / "scoreboard"
    if not args.question:
        results = with_earlier_arms(results, settings, args.seeds, scoreboard / f"{args.name}.json")
        results["arms"] = dict(sorted(results["arms"].items(), key=lambda item: ARM_ORDER.index(item[0])))
    results["recommended"] = recommend(results)
    first = jobs[args.arms[0], args.seeds[0]]
    measured = {"results": results, "settings": settings, "seeds": args.seeds,
                "command": shlex.join(["python", "benchmarks/scoreboard.py", *argv]),
                "machine": machine_line(machine()), "date": datetime.date.today().isoformat(),
                "training_images": first["training_images"], "test_images": first["test_images"]}
    from rich.console import Console

    console = Console(width=160)
    console.print(rich_table(f"{args.name}: test accuracy %, mean ± std over {len(args.seeds)} seeds",
                             ["arm", "dense network", "fit network", "training TMACs", "minutes"], table_rows(results)))
    for what, difference, verdict in comparisons(results):
        console.print(f"{what}: {difference}: {verdict}")
    for line in verdict_lines(results):
        console.print(line.replace("**", ""))

    if args.question:
        write_question(args.question, jobs, args.seeds, measured, args.out_dir)
        if args.json:
            save_json(results, args.json)
        return 0
    scoreboard.mkdir(parents=True, exist_ok=True)
    save_json({**results, "measured": {key: value for key, value in measured.items() if key != "results"}},
              scoreboard / f"{args.name}.json")
    if args.json:
        save_json(results, args.json)
    write_chart(scoreboard / f"{args.name}.png", results, f"{args.name}: {settings['arch']}, "
                f"{args.split.upper()} {args.rate}, {args.generations}x{args.epochs} epochs, {len(args.seeds)} seeds")
    write_results_md(args.out_dir / "results.md", scoreboard)
    console.print(f"wrote {args.out_dir / 'results.md'} and {scoreboard / args.name}.json/.png "
                  f"({(time.perf_counter() - started) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("scoreboard", main))
