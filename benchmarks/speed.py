"""What MaskSup costs in compute: training step, masking, inference, FLOP/s and memory, on the GLaS recipe.

The network, optimiser, loss and masking transform come from the shipped bundle config
(``bundles/glas/configs/train.json``, top-level ids only), and every training step is the shipped
``MaskSupTrainer._iteration`` on one prepared batch (forward, loss, backward, optimiser step), so
the figures are those of the real code, not of a re-implementation. Two arms:

    masksup   the bundle as shipped: two passes (image, masked copy), full MaskSupLoss (a1 = a2 = a3 = 1)
    plain     the ablation's ``baseline`` arm (a2 = a3 = 0): one pass, segmentation loss only

The batch is synthetic (random images and labels as MetaTensors, as the data pipeline yields them).
As shipped, the MaskSup trainer masks the batch itself on the training device with the bundle's
``RandMaskBank`` (a bank of pre-drawn free-form masks, drawn once before the timed rounds), so the
MaskSup step includes its masking.

Measures (arms interleaved in alternating order round by round, after warm-up; medians):

1. MaskSup step / plain step (median of the per-round ratios); goal <= 1.9x on CPU, <= 1.5x on GPU.
   Throughput of each arm in images per second.
2. Masking share: the bank's ``mask_batch`` on the whole batch on the device, over the MaskSup
   step; goal < 2 %. For reference, the per-sample free-form stroke transform the bundles used
   before the bank (``RandFreeFormMaskd``, drawing strokes with Pillow on the CPU, image by image),
   and the time to draw the bank once.
3. Inference latency of the MaskSup-trained / plain-trained network (eval mode, ``torch.no_grad``).
4. Achieved FLOP/s of a MaskSup step (FLOPs counted by ``FlopCounterMode``) as a fraction of the
   measured fp32 ``torch.mm`` peak of this device; goal >= 60 %.
5. Peak memory of a few MaskSup steps in a fresh Python process: CUDA ``max_memory_allocated``
   on a GPU, peak resident set size on CPU, each with its value just before the first step.

Run from the repository root (about 4 minutes on 2 busy CPU cores, well under a minute on a GPU)::

    python benchmarks/speed.py                      # writes results/speed.json and the "speed" block of RESULTS.md
    python benchmarks/speed.py --image-size 512 768 --block speed-glas-native \
        --output benchmarks/results/speed_glas_native.json
    python benchmarks/speed.py --image-size 64 64 --batch-size 2 --rounds 2 --markdown none
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import ARMS, TRAIN_CONFIG
from bundle_runs import shown_command
from report import BENCHMARKS_DIR, RESULTS_DIR, RESULTS_MD, machine, save_result

from masksup_med.methods.masksup import MaskSupTrainer
from masksup_med.run.runtime import keep_freed_memory, select_device
from masksup_med.transforms import RandFreeFormMaskd

ROOT = BENCHMARKS_DIR.parent
ARM_OVERRIDES: dict[str, dict[str, Any]] = {"masksup": {}, "plain": {"loss_weights": ARMS["baseline"]["loss_weights"]}}
WARMUP = 1  # untimed calls of every timed function before the rounds
MEMORY_STEPS = 2  # training steps of the memory child: the second runs with Adam's state allocated


@dataclass
class Measure:
    """One row of the results table."""

    key: str
    label: str
    value: float
    shown: str
    goal: str = "—"
    met: bool | None = None


# --- the recipe -------------------------------------------------------------------------------------


def bundle_parser(**overrides: Any) -> ConfigParser:
    """The GLaS training config with top-level ``overrides``, as ``monai.bundle run --key value`` would set them."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / TRAIN_CONFIG))
    parser.update(overrides)
    return parser


def build_trainer(parser: ConfigParser, device: torch.device) -> MaskSupTrainer:
    """The bundle's network, optimiser, loss, masker and AMP setting in a MaskSupTrainer (seeded: arms start equal)."""
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    loss = parser.get_parsed_content("loss")
    return MaskSupTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[None],  # never iterated: the benchmark calls _iteration on its own batch
        network=network,
        optimizer=parser.get_parsed_content("optimizer"),
        loss_function=loss,
        amp=parser.get_parsed_content("amp"),
        amp_kwargs=parser.get_parsed_content("amp_kwargs"),
        batch_masker=parser.get_parsed_content("masking") if loss.uses_masked_pass else None,
    )


def make_samples(n: int, image_size: Sequence[int], seed: int = 0) -> list[dict[str, MetaTensor]]:
    """``n`` synthetic samples shaped like the pipeline's output: RGB image in [0, 1], binary label."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        image = torch.rand(3, *image_size, generator=gen)
        samples.append({"image": MetaTensor(image), "label": MetaTensor((image[:1] > 0.5).float())})
    return samples


def mask_samples(masking: Callable, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-sample masking transform applied to every sample, as the DataLoader workers do."""
    return [masking(sample) for sample in samples]


def train_step(trainer: MaskSupTrainer, batch: dict[str, Any]) -> None:
    """One shipped training iteration: forward(s), loss, backward, optimiser step."""
    trainer._iteration(trainer, batch)


def infer(network: torch.nn.Module, images: torch.Tensor) -> None:
    """Eval-mode forward without gradients."""
    network.eval()
    with torch.no_grad():
        network(images)


# --- timing -----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Warm up every function, then time each once per round, reversing the order every other round."""
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            times[name].append(timed(fns[name], device))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix and convolution operators ``fn()`` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, n: int, reps: int = 5) -> float:
    """Median FLOP/s of an ``n x n`` fp32 ``torch.mm`` on ``device``."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    return 2 * n**3 / statistics.median(timed(lambda: torch.mm(a, b), device) for _ in range(reps))


# --- memory, in a fresh process -------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. ``ru_maxrss`` would not do there: a child started by
    fork + exec (``subprocess``, multiprocessing ``spawn``) inherits the parent's high-water mark. Elsewhere
    ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def memory_child(device_name: str, image_size: Sequence[int], batch_size: int, steps: int) -> dict[str, float]:
    """Build the MaskSup recipe and run ``steps`` training steps; return memory before and at peak (MiB)."""
    device = torch.device(device_name)
    keep_freed_memory()
    parser = bundle_parser(device=device_name)
    trainer = build_trainer(parser, device)
    batch = list_data_collate(make_samples(batch_size, image_size))
    out = {"rss_before_training_mib": peak_rss_mib()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out["cuda_before_training_mib"] = torch.cuda.memory_allocated(device) / 2**20
    for _ in range(steps):
        train_step(trainer, batch)
    synchronize(device)
    out["rss_peak_mib"] = peak_rss_mib()
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_memory(device: torch.device, image_size: Sequence[int], batch_size: int) -> dict[str, float]:
    """Run :func:`memory_child` in a fresh interpreter, so this process's allocations do not count."""
    call = f"memory_child({str(device)!r}, {list(image_size)!r}, {batch_size}, {MEMORY_STEPS})"
    code = (
        f"import json, sys; sys.path.insert(0, {str(BENCHMARKS_DIR)!r}); import speed; print(json.dumps(speed.{call}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit code {done.returncode}): {call}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the benchmark ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[Measure], dict[str, Any]]:
    """Run all measurements; return the table rows and the raw figures behind them."""
    parsers = {arm: bundle_parser(device=str(device), **overrides) for arm, overrides in ARM_OVERRIDES.items()}
    trainers = {arm: build_trainer(parser, device) for arm, parser in parsers.items()}
    bank = trainers["masksup"].batch_masker
    samples = make_samples(args.batch_size, args.image_size)
    batch = list_data_collate(samples)
    images = batch["image"].as_tensor().to(device)
    bank_seconds = timed(functools.partial(bank.bank, tuple(args.image_size), device), device)  # once per run
    strokes = RandFreeFormMaskd(keys="image", ratio_range=parsers["masksup"].get_parsed_content("mask_ratio_range"))
    strokes.set_random_state(0)

    fns = {arm: functools.partial(train_step, trainer, batch) for arm, trainer in trainers.items()}
    fns["masking"] = functools.partial(mask_samples, strokes, samples)
    fns["mask_batch"] = functools.partial(bank.mask_batch, images)
    flops = {arm: count_flops(fns[arm]) for arm in trainers}  # doubles as each arm's first warm-up call
    train_times = interleaved(fns, args.rounds, device)
    infer_times = interleaved(
        {arm: functools.partial(infer, trainer.network, images) for arm, trainer in trainers.items()},
        args.rounds,
        device,
    )
    peak = matmul_peak(device, args.matmul_size)
    memory = measure_memory(device, args.image_size, args.batch_size)

    step = statistics.median(train_times["masksup"])
    details = {
        "median_seconds": {name: statistics.median(t) for name, t in train_times.items()},
        "inference_median_seconds": {name: statistics.median(t) for name, t in infer_times.items()},
        "train_seconds": train_times,
        "inference_seconds": infer_times,
        "step_flops": flops,
        "achieved_flops_per_s": flops["masksup"] / step,
        "bank_seconds": bank_seconds,
        "bank_size": bank.bank_size,
        "matmul_peak_flops_per_s": peak,
        "memory": memory,
    }
    rows = table_rows(train_times, infer_times, flops["masksup"] / step / peak, memory, device, args.batch_size)
    rows.insert(
        4,
        Measure(
            "bank_seconds",
            f"Drawing the mask bank once ({bank.bank_size} masks, CPU)",
            bank_seconds,
            f"{bank_seconds:.2f} s",
        ),
    )
    return rows, details


def table_rows(
    train: dict[str, list[float]],
    infer_t: dict[str, list[float]],
    flops_fraction: float,
    memory: dict[str, float],
    device: torch.device,
    batch_size: int,
) -> list[Measure]:
    """The results table from the raw figures, with goals and whether they are met."""
    med = {name: statistics.median(t) * 1e3 for name, t in train.items()}
    inf = {name: statistics.median(t) * 1e3 for name, t in infer_t.items()}
    step_ratio = paired_ratio(train, "masksup", "plain")
    step_goal = 1.5 if device.type == "cuda" else 1.9
    throughput = {arm: batch_size / statistics.median(train[arm]) for arm in ("plain", "masksup")}
    shares = {name: paired_ratio(train, name, "masksup") for name in ("masking", "mask_batch")}
    infer_ratio = paired_ratio(infer_t, "masksup", "plain")
    cuda = device.type == "cuda"
    peak = memory["cuda_peak_mib"] if cuda else memory["rss_peak_mib"]
    before = memory["cuda_before_training_mib"] if cuda else memory["rss_before_training_mib"]
    return [
        Measure(
            "masksup_over_plain_step",
            "MaskSup training step (masking included) / plain step",
            step_ratio,
            f"{step_ratio:.2f}x ({med['masksup']:.0f} ms vs {med['plain']:.0f} ms)",
            f"<= {step_goal:.2f}x",
            step_ratio <= step_goal,
        ),
        Measure(
            "throughput_plain",
            "Training throughput, plain (images/s)",
            throughput["plain"],
            f"{throughput['plain']:.1f}",
        ),
        Measure(
            "throughput_masksup",
            "Training throughput, MaskSup (images/s)",
            throughput["masksup"],
            f"{throughput['masksup']:.1f}",
        ),
        Measure(
            "mask_batch_share",
            f"Masking share of a step: mask bank, mask_batch on the batch ({device.type})",
            shares["mask_batch"],
            f"{shares['mask_batch']:.2%} ({med['mask_batch']:.2f} ms)",
            "< 2 %",
            shares["mask_batch"] < 0.02,
        ),
        Measure(
            "masking_share",
            f"For reference: per-sample free-form strokes x {batch_size} (CPU, before the bank)",
            shares["masking"],
            f"{shares['masking']:.2%} ({med['masking']:.1f} ms)",
        ),
        Measure(
            "inference_masksup_over_plain",
            "Inference latency, MaskSup-trained / plain network",
            infer_ratio,
            f"{infer_ratio:.2f}x ({inf['masksup']:.1f} ms vs {inf['plain']:.1f} ms)",
            "1.00x ± 0.05",
            abs(infer_ratio - 1) <= 0.05,
        ),
        Measure(
            "flops_fraction_of_peak",
            "Achieved FLOP/s of a MaskSup step / fp32 matmul peak",
            flops_fraction,
            f"{flops_fraction:.1%}",
            ">= 60 %",
            flops_fraction >= 0.6,
        ),
        Measure(
            "peak_memory_mib",
            f"Peak memory of MaskSup training ({'CUDA allocated' if cuda else 'CPU RSS'})",
            peak,
            f"{peak:.0f} MiB (before training {before:.0f} MiB)",
        ),
    ]


# --- output ---------------------------------------------------------------------------------------------


def cells(m: Measure) -> list[str]:
    """The four table cells of a measure."""
    return [m.label, m.shown, m.goal, "—" if m.met is None else ("yes" if m.met else "no")]


def text_table(rows: list[Measure]) -> str:
    """Fixed-width table for the terminal."""
    lines = [["measure", "value", "goal", "met"], *map(cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def markdown_body(rows: list[Measure], settings: dict[str, Any], info: dict[str, Any], command: str) -> str:
    """The generated "speed" block of RESULTS.md: settings, table, notes, command."""
    size = "x".join(map(str, settings["image_size"]))
    where = info["cuda"] or f"{info['processor']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads"
    table = [
        "| measure | value | goal | met |",
        "|---|---|---|---|",
        *("| " + " | ".join(cells(m)) + " |" for m in rows),
    ]
    summary = (
        f"GLaS recipe from `{TRAIN_CONFIG}` (network, optimiser, loss, masking), batch {settings['batch_size']}, "
        f"{size}, device {settings['device']} ({where}); {settings['rounds']} interleaved rounds after "
        f"{WARMUP} warm-up call(s), medians (ratios: median of per-round ratios)."
    )
    tf32 = (
        " (cuDNN may run the convolutions in TF32: `torch.backends.cudnn.allow_tf32` is True)"
        if (settings["device"].startswith("cuda") and settings["cudnn_allow_tf32"])
        else ""
    )
    notes = (
        "- Plain step: the ablation's `baseline` arm (a2 = a3 = 0), which `MaskSupTrainer` runs as one pass "
        "with the segmentation loss; MaskSup step: the bundle as shipped (two passes, full MaskSupLoss). "
        "Both are `MaskSupTrainer._iteration` on the same prepared batch (forward, loss, backward, Adam step).\n"
        "- The MaskSup step masks its batch on the device with the bundle's `RandMaskBank` (masks drawn once "
        "into a bank, then gathered with random flips and offsets), as the shipped trainer does. The stroke "
        "row is the per-sample transform the bundles used before, which ran in DataLoader workers "
        "(on CPU, competing for the same cores).\n"
        "- FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products); "
        f"peak: median fp32 `torch.mm` of {settings['matmul_size']}x{settings['matmul_size']}"
        f"{tf32}.\n"
        f"- Memory: a fresh process running {MEMORY_STEPS} MaskSup steps; CPU figure: peak resident set size "
        "(`VmHWM` on Linux, since a child's `ru_maxrss` inherits the parent's high-water mark)."
    )
    return "\n".join([summary, "", *table, "", notes, "", f"Command: `{command}`"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the speed benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="default: the bundle's image_size")
    parser.add_argument("--batch-size", type=int, help="default: the bundle's batch_size")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per measurement")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--matmul-size", type=int, help="side of the square matmul for the peak (default 2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "speed.json")
    parser.add_argument("--markdown", default=str(RESULTS_MD), help="Markdown file whose block is replaced, or none")
    parser.add_argument("--block", default="speed", help="name of the Markdown block to replace (default: speed)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print the table, write the JSON and the Markdown block; return what was written."""
    start = time.perf_counter()
    keep_freed_memory()  # as the bundles' initialize does
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = select_device(args.device)
    defaults = bundle_parser()
    args.image_size = list(args.image_size or defaults.get_parsed_content("image_size"))
    args.batch_size = args.batch_size or defaults.get_parsed_content("batch_size")
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    rows, details = measure(args, device)

    command = shown_command([sys.executable, "benchmarks/speed.py", *argv])
    settings = {
        "config": TRAIN_CONFIG,
        "arms": ARM_OVERRIDES,
        "device": str(device),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "warmup": WARMUP,
        "matmul_size": args.matmul_size,
        "memory_steps": MEMORY_STEPS,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    info = machine()
    result = {
        "measures": {m.key: {"label": m.label, "value": m.value, "goal": m.goal, "met": m.met} for m in rows},
        "details": details,
        "settings": settings,
        "machine": info,
        "command": command,
        "runtime_seconds": round(time.perf_counter() - start, 1),
    }
    print(text_table(rows))
    save_result(result, args.output, args.markdown, args.block, markdown_body(rows, settings, info, command))
    return result


if __name__ == "__main__":
    main()
