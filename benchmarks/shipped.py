"""The model a bundle ships, as a user gets it: no training, no MLflow store, only ``bundles/B/models/model.pt``.

Three figures, each from the bundle's own configs run the way a user runs them:

- its test split, with and without test-time flips (``benchmarks/tta.py``'s two arms);
- its speed on the CPU, images per second with and without flips (the same script's timing);
- every frame of another dataset it never trained on, pooled over that dataset's splits
  (``benchmarks/defaults.py``'s cross-dataset check: for Kvasir-SEG, the CVC-ClinicDB sample).

The evaluations run from ``--work-dir``, a folder without a ``models/model.pt`` of its own, so the evaluate
config falls back to the shipped model (its checksum is checked before each load); the record holds the
model's SHA-256 and the path every evaluation actually loaded. Run from the repository root::

    python benchmarks/shipped.py --bundle kvasir_seg      # the "kvasir_seg-shipped" block of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tta
from bundle_runs import ROOT, shown_command
from defaults import SPLITS, STUDIES, BundleStudy, score_elsewhere
from report import RESULTS_DIR, RESULTS_MD, provenance, save_result

from masksup_med.run.shipped import file_sha256, shipped_model, verify_shipped

NAMES = {"kvasir_seg": "Kvasir-SEG", "cvc-clinicdb": "CVC-ClinicDB sample", "glas": "GLaS"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the shipped-model benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="kvasir_seg", choices=sorted(STUDIES))
    parser.add_argument("--dataset-dir", help="the data whose test split is scored (default: the bundle's own)")
    parser.add_argument(
        "--cross",
        nargs=2,
        action="append",
        metavar=("DATASET", "DIR"),
        help="another dataset scored on every frame (repeatable; default: the bundle's, e.g. the CVC-ClinicDB sample)",
    )
    parser.add_argument("--work-dir", type=Path, help="evaluation folder (default: benchmarks/runs/shipped-BUNDLE)")
    tta.add_flip_options(parser)
    parser.add_argument("--output", type=Path, help="JSON record (default: benchmarks/results/shipped_BUNDLE.json)")
    parser.add_argument("--markdown", default=str(RESULTS_MD), help="Markdown file whose block is replaced, or none")
    parser.add_argument("--block", help="name of the Markdown block to replace (default: BUNDLE-shipped)")
    args = parser.parse_args(argv)
    study = STUDIES[args.bundle]
    args.bundle_dir = args.bundle_dir or Path("bundles") / args.bundle
    args.dataset_dir = args.dataset_dir or study.dataset_dir
    args.cross = [tuple(c) for c in args.cross] if args.cross is not None else list(study.cross)
    args.work_dir = (args.work_dir or Path("benchmarks") / "runs" / f"shipped-{args.bundle}").resolve()
    args.output = args.output or RESULTS_DIR / f"shipped_{args.bundle}.json"
    args.block = args.block or f"{args.bundle}-shipped"
    return args


def the_shipped_model(bundle_dir: Path, work_dir: Path) -> Path:
    """The bundle's shipped model, its checksum checked; refused when the bundle ships none or ``work_dir`` holds a
    model of its own (the configs would run that one instead)."""
    model = shipped_model(ROOT / bundle_dir)
    if model is None:
        raise SystemExit(f"{bundle_dir} ships no model (no models/model.pt in its large_files.yml): nothing to score")
    verify_shipped(model)
    own = work_dir / "models" / "model.pt"
    if own.exists():
        raise SystemExit(f"{own} exists: the evaluate config would run it instead of the shipped model; remove it")
    return model


def markdown_body(result: dict[str, Any]) -> str:
    """The shipped-model block of RESULTS.md: the test split per arm, the other datasets, the commands."""
    bundle, arms = result["bundle"], result["arms"]
    rows = list(tta.TABLE_HEAD)
    for arm, figures in arms.items():
        label = f"{NAMES.get(bundle, bundle)} test, {'flips' if arm == 'flips' else 'no flips'}"
        rows.append(tta.table_row(label, figures["images"], figures["test"], f"{figures['images_per_second']:.2f}"))
    for other in result["elsewhere"]:
        name = f"{NAMES.get(other['dataset'], other['dataset'])}, every frame, no flips"
        rows.append(tta.table_row(name, other["images"], other, "—"))
    commands = [result["command"], *(a["command"] for a in arms.values())]
    commands += [c for other in result["elsewhere"] for c in other["commands"]]
    head = (
        f"`{result['model']}` (SHA-256 `{result['sha256'][:16]}…`), run as shipped: no training, no store. "
        f"Speed: {result['speed_images']} test images, batch 1, median of {result['rounds']} rounds, "
        f"{result['machine']['torch_threads']} torch threads on {result['machine']['cpu_count']} CPUs; "
        f"commit {result['commit']}."
    )
    return "\n".join([head, "", *rows, "", "```", *commands, "```"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Score and time the shipped model, print the table, write the JSON and the Markdown block; return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    model = the_shipped_model(args.bundle_dir, args.work_dir)
    tta_argv = ["--output-dir", str(args.work_dir), "--dataset-dir", str(args.dataset_dir)]
    tta_argv += ["--bundle", args.bundle, "--bundle-dir", str(args.bundle_dir), "--images", str(args.images)]
    tta_argv += ["--rounds", str(args.rounds), "--num-workers", str(args.num_workers), "--markdown", "none"]
    tta_argv += ["--output", str(args.work_dir / "tta.json")]
    if args.image_size:
        tta_argv += ["--image-size", *map(str, args.image_size)]
    flips = tta.main(tta_argv)
    study = BundleStudy(args.bundle, str(args.dataset_dir), bundle_dir=str(args.bundle_dir))
    elsewhere = [score_elsewhere(study, args.work_dir, dataset, folder) for dataset, folder in args.cross]
    loaded = {a["model_source"] for a in flips["arms"].values()}
    for dataset, _ in args.cross:
        for split in SPLITS:
            summary = args.work_dir / "eval" / dataset / split / "summary.json"
            loaded.add(json.loads(summary.read_text(encoding="utf-8"))["model_source"])
    if loaded != {str(model)}:
        raise RuntimeError(f"the evaluations loaded {sorted(loaded)}, not the shipped model {model}")
    result = {
        "bundle": args.bundle,
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
        "sha256": file_sha256(model),
        "arms": flips["arms"],
        "elsewhere": elsewhere,
        "speed_images": flips["settings"]["speed_images"],
        "rounds": args.rounds,
        **provenance(shown_command([sys.executable, "benchmarks/shipped.py", *argv])),
    }
    save_result(result, args.output, args.markdown, args.block, markdown_body(result), echo=True)
    return result


if __name__ == "__main__":
    main()
