"""Benchmark: does the fit network gain from learning from the dense one? In-place distillation
(in several forms) and fine-tuning against plain KE, on a small data set.

For each seed, on the bundled digits (or an ImageFolder, ``--data``) with ``--per-class`` training
images a class and the whole validation set as the test set, it trains KE for ``--generations``
generations of ``--epochs`` epochs in each variant:

- ``ke``: plain Knowledge Evolution (the fit only survives the resets);
- ``distill-from-1``: in-place distillation as slimmable networks do it (temperature 1, weight 1,
  no label term, from the first step);
- ``distill-from-2``: the same from generation 2 on (generation 1 is then plain training), the
  default of ``--distill-fit``, chosen from these measurements;
- ``distill-ramp``: from the first step, its weight raised linearly from 0 over generation 1
  (``--distill-from 1 --distill-ramp EPOCHS``);
- ``distill-t4-labels``: temperature 4 and the fit's own loss on the labels beside it, from the first step;
- ``ke-finetune``: plain KE, then the fit fine-tuned alone for ``--epochs`` epochs with knowledge
  distillation from the dense network;
- ``fit-scratch``: the bar any of them must clear, the fit-sized network trained from scratch for
  as many epochs as all the generations together, on the same data, loss and schedule.

It prints and writes (``--report``, above a hand-written part it keeps) dense and fit test
accuracy after generation 1 and after the last, the fine-tuned fit, each variant's final fit
network against KE's and against the fit-sized network from scratch, paired per seed, a verdict
only where a difference is beyond two standard errors, and the wall time of a run (one thread). Finished runs are kept in ``--work-dir``, so a rerun continues.

Usage:
    .venv/bin/python benchmarks/fit_distillation.py [--seeds 3] [--per-class 20] [--generations 3]
        [--epochs 10] [--jobs 2] [--variants ke distill ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import (at_least, fit_sized_from_scratch, machine, machine_line, markdown_table, mean_std,  # noqa: E402
                    paired, rich_table, run_script, write_report)

VARIANTS = {
    "ke": {},
    "distill-from-1": {"distill_fit": {"start_generation": 1}},
    "distill-from-2": {"distill_fit": {"start_generation": 2}},
    # from the first step, its weight raised linearly over generation 1 (--distill-from 1 --distill-ramp E)
    "distill-ramp": {"distill_fit": {"start_generation": 1, "ramp_epochs": "one generation"}},
    "distill-t4-labels": {"distill_fit": {"temperature": 4.0, "label_weight": 1.0, "start_generation": 1}},
    "ke-finetune": {"finetune_fit": {}},
    "fit-scratch": {"from_scratch": True},
}
DEFAULT = "distill-from-2"  # what --distill-fit does unless told otherwise
FORMAT = 1  # of the jobs' files: a change of what a job computes gets a new number


def job_settings(options: dict, variant: str, seed: int) -> dict:
    """Everything one run depends on; its file in the work directory is named by it."""
    return {"format": FORMAT, "variant": variant, "seed": seed,
            **{key: options[key] for key in ("model", "rate", "per_class", "generations", "epochs", "lr",
                                               "image_size", "batch_size", "data")}}


def run_job(settings: dict) -> dict:
    """Train one variant for one seed (in a process of its own, one torch thread); its results."""
    import torch

    from kecompress import experiment
    from kecompress.config import RunConfig, TrainingConfig
    from kecompress.data import per_class_subset
    from kecompress.distillation import FitDistillation
    from kecompress.finetune import FitFinetuning

    torch.set_num_threads(1)
    variant = VARIANTS[settings["variant"]]
    seed = settings["seed"]
    distill = variant.get("distill_fit")
    finetune = variant.get("finetune_fit")
    scratch = variant.get("from_scratch", False)
    generations, epochs = settings["generations"], settings["epochs"]
    config = RunConfig(
        model=settings["model"], rate=settings["rate"], seed=seed, data=settings["data"],
        image_size=settings["image_size"], batch_size=settings["batch_size"],
        training=TrainingConfig(generations=1 if scratch else generations,
                                epochs=generations * epochs if scratch else epochs, lr=settings["lr"], seed=seed),
        distill_fit=None if distill is None else FitDistillation(
            **{**distill, **({"ramp_epochs": epochs} if distill.get("ramp_epochs") == "one generation" else {})}
        ).identity(),
        finetune_fit=None if finetune is None else FitFinetuning(settings["epochs"], **finetune).identity())
    train, test, classes = experiment.load_data(dataclasses.replace(config, seed=0))  # one test set for all seeds
    started = time.perf_counter()
    loop = experiment.build(config, (per_class_subset(train, settings["per_class"], seed), test, classes))
    if scratch:
        loop = fit_sized_from_scratch(loop)
    history = loop.run()
    return {"settings": settings, "dense": [record.dense for record in history],
            "fit": [record.fit for record in history],
            "finetuned_fit": loop.progress.finetune.fit if loop.progress.finetune else None,
            "seconds": time.perf_counter() - started}


def run_all(options: dict) -> dict[str, list[dict]]:
    """Every variant's results, seed by seed: from the work directory where a run finished before."""
    work = Path(options["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    jobs = {(variant, seed): job_settings(options, variant, seed)
            for variant in options["variants"] for seed in range(options["seeds"])}
    path = lambda settings: work / (  # noqa: E731
        "-".join(f"{key}={value}" for key, value in settings.items() if key != "data").replace("/", "_") + ".json")
    todo = [settings for settings in jobs.values() if not path(settings).exists()]
    with ProcessPoolExecutor(max_workers=options["jobs"]) as pool:
        for result in pool.map(run_job, todo):
            path(result["settings"]).write_text(json.dumps(result))
            print(f"done: {result['settings']['variant']} seed {result['settings']['seed']} "
                  f"({result['seconds']:.0f} s)", flush=True)
    return {variant: [json.loads(path(jobs[variant, seed]).read_text()) for seed in range(options["seeds"])]
            for variant in options["variants"]}


def summary(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]], list[str]]:
    """The table's header and rows, and the verdicts, of what was measured: each variant's final
    fit network against KE's and against the fit-sized network trained from scratch, seed by seed."""
    header = ["variant", "dense, gen 1", "fit, gen 1", "dense, last", "fit, last", "fit fine-tuned",
              "final fit − KE's fit (points, per seed)", "final fit − fit-sized from scratch", "s a run"]
    final = {variant: [run["dense"][-1] if VARIANTS[variant].get("from_scratch")
                       else run["finetuned_fit"] if run["finetuned_fit"] is not None else run["fit"][-1]
                       for run in runs] for variant, runs in results.items()}
    rows, verdicts = [], []
    for variant, runs in results.items():
        compared = []
        for baseline, name in (("ke", "KE's fit network"), ("fit-scratch", "the fit-sized network from scratch")):
            if baseline not in results or baseline == variant:
                compared.append("")
                continue
            difference, verdict = paired(final[variant], final[baseline])
            compared.append(f"{difference}: {verdict}")
            verdicts.append(f"{variant} against {name}: {difference} points: {verdict}.")
        if "distill_fit" in VARIANTS[variant] and variant != DEFAULT and DEFAULT in results:
            for network in ("dense", "fit"):  # the other forms of distillation against --distill-fit's default
                difference, verdict = paired([run[network][-1] for run in runs],
                                             [run[network][-1] for run in results[DEFAULT]])
                verdicts.append(f"{variant} against {DEFAULT} (the default), last {network} network: "
                                f"{difference} points: {verdict}.")
        scratch = VARIANTS[variant].get("from_scratch")
        finetuned = [run["finetuned_fit"] for run in runs if run["finetuned_fit"] is not None]
        per_generation = [] if scratch else [mean_std([run[key][index] for run in runs])
                                              for index in (0, -1) for key in ("dense", "fit")]
        rows.append([variant, *(per_generation[:2] if per_generation else ["", ""]),
                     *(per_generation[2:] if per_generation else ["", mean_std(final[variant])]),
                     mean_std(finetuned) if finetuned else "", *compared,
                     f"{statistics.fmean(run['seconds'] for run in runs):.0f}"])
    return header, rows, verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None, help="an ImageFolder directory (default: the bundled digits)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rate", type=at_least(0.01, float), default=0.5)
    parser.add_argument("--per-class", type=at_least(1), default=20, help="training images a class")
    parser.add_argument("--seeds", type=at_least(2), default=3)
    parser.add_argument("--generations", type=at_least(2), default=3)
    parser.add_argument("--epochs", type=at_least(1), default=10, help="a generation's, and the fine-tuning's")
    parser.add_argument("--lr", type=at_least(1e-6, float), default=0.1)
    parser.add_argument("--image-size", type=at_least(8), default=32)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=at_least(1), default=2, help="runs at a time, one thread each")
    parser.add_argument("--work-dir", default="runs/fit-distillation", help="finished runs are kept here")
    parser.add_argument("--report", default=None, help="markdown file to write (its hand-written part is kept)")
    options = vars(parser.parse_args(argv))
    started = time.perf_counter()
    results = run_all(options)
    header, rows, verdicts = summary(results)
    from rich.console import Console

    console = Console()
    (console if console.is_terminal else Console(width=160)).print(rich_table("dense and fit test accuracy (%), mean ± std over seeds", header, rows))
    for verdict in verdicts:
        print(verdict)
    described = machine_line(machine(1))
    command = "python benchmarks/fit_distillation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"machine: {described}; {time.perf_counter() - started:.0f} s this run")
    if options["report"]:
        data = Path(options["data"]).name if options["data"] else "the bundled digits"
        write_report(Path(options["report"]), [
            "# The fit network learning from the dense one: measured", "",
            f"{options['model']}, KELS rate {options['rate']}, {options['generations']} generations of "
            f"{options['epochs']} epochs, {options['per_class']} training images a class of {data}, "
            f"{options['seeds']} seeds; test accuracy (%) on the held-out images, mean ± std over the seeds. "
            f"Machine: {described}. Command: `{command.strip()}`.", "",
            *markdown_table(header, rows), *[f"- {verdict}" for verdict in verdicts], ""])
    return 0


if __name__ == "__main__":
    sys.exit(run_script("fit_distillation.py", main))
