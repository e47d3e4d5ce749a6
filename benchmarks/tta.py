"""Test-time flips: what they change on the test split, and what they cost in images per second on the CPU.

Given a trained bundle run (``--output-dir`` holding ``models/model.pt``; when it holds none, the evaluate
config runs the model the bundle ships), two arms:

    plain   the network once per image (``tta_flips`` false, the default)
    flips   the mean of the network on the image, its horizontal and its vertical flip (``--tta_flips true``)

Quality: the bundle's ``evaluating`` config on the test split, once per arm (its report goes to
``OUTPUT_DIR/eval-tta/ARM/``): mIoU and Dice at the network's size and at each image's own size.
Speed: the same network and the evaluate config's preprocessing on the first ``--images`` test images, read
and resized once beforehand; each round runs every image through each arm's inferer (arms alternate, after a
warm-up), on the CPU; the median round gives images per second (batch 1, as the inference config runs).

Run from the repository root (the test split of Kvasir-SEG is 200 images; scoring takes minutes on 2 cores)::

    python benchmarks/tta.py --output-dir runs/kvasir-long --dataset-dir /path/to/Kvasir-SEG
    python benchmarks/tta.py --output-dir RUN --dataset-dir DIR --image-size 64 64 --images 2 --markdown none
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runs import METRICS, as_cli_overrides, evaluation_command, run_logged, shown_command
from report import BENCHMARKS_DIR, RESULTS_DIR, RESULTS_MD, provenance, save_result

from masksup_med.inference import segmentation_inferer

ROOT = BENCHMARKS_DIR.parent
ARMS = {"plain": False, "flips": True}
WARMUP = 1  # untimed passes over the images before the rounds


def bundle_configs(bundle_dir: Path) -> tuple[list[str], str]:
    """The bundle's training config (as a list of configs; relative to the repository unless ``bundle_dir`` is
    absolute) and its evaluate config."""
    folder = bundle_dir / "configs"
    return [str(folder / "train.json")], str(folder / "evaluate.json")


def score(args: argparse.Namespace, values: dict[str, Any], arm: str) -> dict[str, Any]:
    """Evaluate the run's model on the test split with the arm's ``tta_flips``; metrics and the command."""
    configs, evaluate = bundle_configs(args.bundle_dir)
    eval_dir = args.output_dir / "eval-tta" / arm
    overrides = {**values, "tta_flips": ARMS[arm], "eval_dir": str(eval_dir)}
    command = evaluation_command(configs, evaluate, as_cli_overrides(overrides))
    seconds = run_logged(command, args.output_dir / "tta.log")
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    test = summary["summary"]["test"]
    return {
        "images": summary["images"],
        "model_source": summary["model_source"],
        "test": {m: test[m]["mean"] for m in METRICS},
        "evaluation_seconds": round(seconds, 1),
        "command": shown_command(command),
    }


def prepared(args: argparse.Namespace, values: dict[str, Any]) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The evaluate config's network (on the CPU) and the first ``--images`` test images, preprocessed."""
    configs, evaluate = bundle_configs(args.bundle_dir)
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in [*configs, evaluate]])
    for key, value in {**values, "device": "cpu"}.items():
        parser[key] = value
    parser.get_parsed_content("imports")
    preprocessing = parser.get_parsed_content("evaluate#preprocessing")
    items = parser.get_parsed_content("datalist")["test"][: args.images]
    images = [preprocessing(dict(item))["image"].as_tensor()[None].float() for item in items]
    return parser.get_parsed_content("network").eval(), images


def round_seconds(inferer: Inferer, network: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Seconds to run every image through ``inferer``."""
    start = time.perf_counter()
    with torch.no_grad():
        for image in images:
            inferer(image, network)
    return time.perf_counter() - start


def speed(network: torch.nn.Module, images: list[torch.Tensor], rounds: int) -> dict[str, dict[str, Any]]:
    """Images per second of each arm (median round; the arms alternate which goes first)."""
    inferers = {arm: segmentation_inferer(flips) for arm, flips in ARMS.items()}
    for _ in range(WARMUP):
        for inferer in inferers.values():
            round_seconds(inferer, network, images)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            times[arm].append(round_seconds(inferers[arm], network, images))
    return {
        arm: {"images_per_second": len(images) / statistics.median(seconds), "round_seconds": seconds}
        for arm, seconds in times.items()
    }


TABLE_HEAD = [
    "| data | images | mIoU | Dice | mIoU (native) | Dice (native) | images/s (CPU) |",
    "|---|---|---|---|---|---|---|",
]


def table_row(name: str, images: int, scores: dict[str, float], speed: str) -> str:
    """One row under :data:`TABLE_HEAD`: the data's name, its image count, its mean scores, the speed cell."""
    return f"| {name} | {images} | {' | '.join(f'{scores[m]:.4f}' for m in METRICS)} | {speed} |"


def markdown_body(result: dict[str, Any]) -> str:
    """The ``tta`` block of RESULTS.md: one row per arm (the test split)."""
    arms, settings = result["arms"], result["settings"]
    rows = list(TABLE_HEAD)
    for arm, figures in arms.items():
        rows.append(table_row(arm, figures["images"], figures["test"], f"{figures['images_per_second']:.2f}"))
    plain, flips = arms["plain"], arms["flips"]
    gain = flips["test"]["iou"] - plain["test"]["iou"]
    cost = plain["images_per_second"] / flips["images_per_second"]
    summary = (
        f"Test-time flips on {plain['images']} test images of `{settings['bundle']}` "
        f"(model `{plain['model_source']}`): mIoU {gain:+.4f}, {cost:.2f}x the time per image. Speed: "
        f"{settings['speed_images']} images, batch 1, {settings['rounds']} rounds (median), "
        f"{result['machine']['torch_threads']} torch threads on {result['machine']['cpu_count']} CPUs; "
        f"commit {result['commit']}."
    )
    return "\n".join([summary, "", *rows, "", f"Command: `{result['command']}`"])


def add_flip_options(parser: argparse.ArgumentParser) -> None:
    """The bundle's folder, the image size and the timing and loading options of a flip benchmark."""
    parser.add_argument("--bundle-dir", type=Path, help="the bundle's folder (default: bundles/BUNDLE)")
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("W", "H"), help="default: the bundle's")
    parser.add_argument("--images", type=int, default=20, help="test images timed per round (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per arm (default 5)")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers of the evaluations")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the flip benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True, help="the trained run (models/model.pt)")
    parser.add_argument("--dataset-dir", type=Path, required=True, help="the dataset whose test split is scored")
    parser.add_argument("--bundle", default="kvasir_seg", help="the bundle the run was trained with")
    add_flip_options(parser)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "tta.json")
    parser.add_argument("--markdown", default=str(RESULTS_MD), help="Markdown file whose block is replaced, or none")
    parser.add_argument("--block", default="tta", help="name of the Markdown block to replace (default: tta)")
    args = parser.parse_args(argv)
    args.bundle_dir = args.bundle_dir or Path("bundles") / args.bundle
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Score both arms, time both, print the table, write the JSON and the Markdown block; return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.output_dir = args.output_dir.resolve()
    values: dict[str, Any] = {
        "output_dir": str(args.output_dir),
        "dataset_dir": str(args.dataset_dir.resolve()),
        "device": "cpu",
        "num_workers": args.num_workers,
    }
    if args.image_size:
        values["image_size"] = list(args.image_size)
    arms = {arm: score(args, values, arm) for arm in ARMS}
    network, images = prepared(args, values)
    for arm, figures in speed(network, images, args.rounds).items():
        arms[arm].update(figures)
    result = {
        "arms": arms,
        "settings": {
            "bundle": args.bundle,
            "output_dir": str(args.output_dir),
            "image_size": args.image_size,
            "speed_images": len(images),
            "rounds": args.rounds,
            "warmup": WARMUP,
        },
        **provenance(shown_command([sys.executable, "benchmarks/tta.py", *argv])),
    }
    save_result(result, args.output, args.markdown, args.block, markdown_body(result), echo=True)
    return result


if __name__ == "__main__":
    main()
