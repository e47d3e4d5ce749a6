"""What each masking costs per pretraining step, against random tiles, on the shipped pretraining recipe.

The network, optimiser, loss and maskers come from the GLaS bundle's ``train.json`` with
``pretrain.json`` merged over it (top-level ids only; the hole fill fixed at mid grey, so no data is
read), and every step is the shipped ``ReconstructionTrainer._iteration`` on one synthetic batch
(masking, forward with the encoder masking, loss, backward, optimiser step). Arms, interleaved
round by round after a warm-up (medians):

    random             random tiles (``pretrain_masking random``; also the step of ``selective``, whose
                       fixed masks come with the batch)
    per-batch          ``SelectiveTileMasker`` ranking tiles at every step (``pretrain_masking per_batch``):
                       ``selective_partitions`` extra forward passes without gradients
    per-batch-every-N  the same, ranking every N-th step and masking random tiles in between
    selective-scoring  the paper's selective masking's extra cost: scoring one batch's tiles at a part's
                       start (``selective_score_passes`` forward passes), once per image and round

Each arm's time per call and its ratio to the random arm (median of per-round ratios) are printed
and written to ``results/pretrain_speed.json`` and the ``pretrain-speed`` block of RESULTS.md::

    python benchmarks/pretrain_speed.py                        # the bundle's image size and batch size
    python benchmarks/pretrain_speed.py --image-size 64 64 --batch-size 2 --rounds 2 --markdown none
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS_DIR, RESULTS_MD, machine, save_result
from speed import ROOT, interleaved, make_samples, paired_ratio

from masksup_med.methods.pretraining import ReconstructionTrainer
from masksup_med.methods.selective_masking import score_tiles
from masksup_med.run.runtime import select_device

CONFIGS = ("bundles/glas/configs/train.json", "bundles/glas/configs/pretrain.json")


def pretrain_parser(**overrides: Any) -> ConfigParser:
    """The GLaS pretraining config (``train.json`` + ``pretrain.json``) with top-level ``overrides``."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / name) for name in CONFIGS])
    parser.update({"pretrain_fill": [0.5, 0.5, 0.5], **overrides})  # no dataset read for the mean colour
    return parser


def build_trainer(masker_id: str, device: torch.device, **overrides: Any) -> ReconstructionTrainer:
    """The recipe's network, optimiser and loss in a ReconstructionTrainer with the masker ``masker_id`` (seeded).

    Each trainer is parsed from its own config, so no two share a network, optimiser or masker.
    """
    torch.manual_seed(0)
    parser = pretrain_parser(**overrides)
    masker = parser.get_parsed_content(masker_id)
    return ReconstructionTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[None],  # never iterated: the benchmark calls _iteration on its own batch
        network=parser.get_parsed_content("network"),
        optimizer=parser.get_parsed_content("optimizer"),
        loss_function=parser.get_parsed_content("loss"),
        masker=masker,
        encoder_masking=parser.get_parsed_content("encoder_masking"),
    )


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median step time of each arm and its ratio to random tiles."""
    parser = pretrain_parser()
    width, height = args.image_size or parser.get_parsed_content("image_size")
    batch_size = args.batch_size or parser.get_parsed_content("batch_size")
    partitions = parser.get_parsed_content("selective_partitions")
    passes = parser.get_parsed_content("selective_score_passes")
    batch = list_data_collate(make_samples(batch_size, (width, height)))
    every = f"per-batch-every-{args.refresh_every}"
    trainers = {
        "random": build_trainer("random_tile_masker", device),
        "per-batch": build_trainer("per_batch_masker", device, selective_refresh_every=1),
        every: build_trainer("per_batch_masker", device, selective_refresh_every=args.refresh_every),
    }
    # one timed call of an arm is `steps` steps, so each call of the every-N arm holds exactly one ranking
    steps_per_call = {name: args.refresh_every if name == every else 1 for name in trainers}

    def steps(name: str) -> None:
        trainer = trainers[name]
        for _ in range(steps_per_call[name]):
            trainer._iteration(trainer, dict(batch))

    scorer = trainers["random"]
    images = torch.as_tensor(batch["image"]).to(device)
    tile_size, ratio = parser.get_parsed_content("pretrain_tile_size"), parser.get_parsed_content("pretrain_mask_ratio")

    def scoring() -> None:
        R = np.random.RandomState(0)
        score_tiles(scorer.network, images, tile_size, ratio, passes, R, encoder_masking=scorer.encoder_masking)

    arms = {name: functools.partial(steps, name) for name in trainers}
    calls = interleaved({**arms, "selective-scoring": scoring}, args.rounds, device)
    steps_per_call["selective-scoring"] = 1
    times = {name: [t / steps_per_call[name] for t in ts] for name, ts in calls.items()}
    arms = {
        name: {"step_s": statistics.median(ts), "ratio_to_random": paired_ratio(times, name, "random")}
        for name, ts in times.items()
    }
    return {
        "settings": {
            "image_size": [width, height],
            "batch_size": batch_size,
            "partitions": partitions,
            "score_passes": passes,
            "refresh_every": args.refresh_every,
            "rounds": args.rounds,
            "device": str(device),
        },
        "arms": arms,
        "machine": machine(),
    }


def markdown_body(result: dict[str, Any], command: str) -> str:
    """The RESULTS.md block: one row per arm."""
    s = result["settings"]
    intro = (
        f"GLaS pretraining recipe, {s['image_size'][0]}x{s['image_size'][1]}, batch {s['batch_size']}, "
        f"{s['partitions']} partitions (per-batch ranking), {s.get('score_passes', '?')} scoring passes (selective), "
        f"{s['rounds']} rounds on {s['device']}; medians. `selective-scoring` is the time to score one batch's "
        "tiles, paid once per image and round; selective's steps cost what random's do."
    )
    lines = [intro, "", "| masking | step (s) | x random tiles |", "|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['step_s']:.3f} | {arm['ratio_to_random']:.2f} |")
    return "\n".join([*lines, "", "```", command, "```"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the pretraining step benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("W", "H"), help="default: the bundle's image_size")
    parser.add_argument("--batch-size", type=int, help="default: the bundle's batch_size")
    parser.add_argument("--refresh-every", type=int, default=4, help="N of the selective-every-N arm")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per arm")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "pretrain_speed.json")
    parser.add_argument("--markdown", default=str(RESULTS_MD), help="Markdown file whose block is replaced, or none")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args, select_device(args.device))
    for name, arm in result["arms"].items():
        print(f"{name:>20}: {arm['step_s']:.3f} s/step, {arm['ratio_to_random']:.2f}x random tiles")
    command = "python benchmarks/pretrain_speed.py" + (f" {' '.join(argv)}" if argv else "")
    save_result(result, args.output, args.markdown, "pretrain-speed", markdown_body(result, command))
    return result


if __name__ == "__main__":
    main()
