"""Figures: validation examples per round, semi-supervised pseudo-labels, pretraining reconstructions and
learning curves (logged to the MLflow run), per-group scores of an evaluation (e.g. per video sequence).

Images are tensors in MONAI's axes (``C, W, H``: readers put the width first); :func:`_as_display`
turns them into rows of y for ``imshow``, so a figure shows the image upright.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files / MLflow
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from masksup_med.methods.losses import confidence_mask
from masksup_med.methods.pretraining import mask_images, tile_losses, tiles_to_pixels
from masksup_med.methods.teacher import training_mode_probabilities
from masksup_med.tracking.store import find_run_id
from masksup_med.transforms.base import RandMask

__all__ = [
    "LearningCurveHandler",
    "PseudoLabelFigureHandler",
    "ReconstructionFigureHandler",
    "ValidationFigureHandler",
    "learning_curve_figure",
    "per_group_figure",
    "pseudo_label_image",
    "validation_figure",
]

logger = logging.getLogger(__name__)


def _as_display(image: torch.Tensor, clamp: bool = True) -> np.ndarray:
    """``C, H, W`` tensor (clamped to [0, 1]) to an ``H, W(, 3)`` array for imshow (MONAI's PIL axes are W, H)."""
    array = image.detach().float().cpu()
    array = (array.clamp(0, 1) if clamp else array).numpy()
    array = np.transpose(array, (0, 2, 1))  # PILReader returns W, H: swap back for display
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)


def _masks(logits: torch.Tensor) -> torch.Tensor:
    """``B, 1, *spatial`` predicted masks from logits: sigmoid > 0.5 for one channel, else the arg-max class."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits) > 0.5).float()
    return torch.softmax(logits, 1).argmax(1, keepdim=True).float()


NOT_CONFIDENT = (0.5, 0.5, 0.5)  # one channel: grey, between background (black) and foreground (white)
NOT_CONFIDENT_MULTICLASS = (1.0, 0.0, 0.0)  # several classes take the grey levels: red


def pseudo_label_image(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """The teacher's pseudo-label of one image (``C, *spatial`` probabilities) as the figure draws it.

    Where the teacher is confident (:func:`~masksup_med.methods.losses.confidence_mask` at ``threshold``, as
    the student's loss counts pixels) the pixel shows its class: one channel, black background and
    white foreground, returned as ``1, *spatial`` with the other pixels grey (0.5); several channels,
    class ``k`` of ``C`` as grey level ``k / (C - 1)``, returned as ``3, *spatial`` with the other
    pixels red. Those pixels do not train the student.
    """
    confident = confidence_mask(probabilities[None], threshold)[0]
    if probabilities.shape[0] == 1:
        shown = (probabilities > 0.5).float()
        return torch.where(confident, shown, torch.full_like(shown, NOT_CONFIDENT[0]))
    level = probabilities.argmax(0, keepdim=True).float() / (probabilities.shape[0] - 1)
    colour = torch.tensor(NOT_CONFIDENT_MULTICLASS, dtype=level.dtype, device=level.device)
    colour = colour.view(3, *([1] * (probabilities.dim() - 1)))
    return torch.where(confident, level.expand(3, *level.shape[1:]), colour)


COLUMN_TITLES = {
    "image": "image",
    "label": "ground truth",
    "pred": "prediction",
    "image_masked": "masked input",
    "pred_masked": "prediction on masked",
    "pseudo_label": "teacher pseudo-label\n(grey: not confident)",
    "student_input": "student input\n(strong view, masked)",
    "student_pred": "student prediction",
    "reconstruction": "reconstruction",
    "tile_loss": "L1 per masked tile",
}


def validation_figure(rows: Sequence[dict[str, torch.Tensor]], title: str, heatmaps: Sequence[str] = ()) -> plt.Figure:
    """A grid, one row per example, one column per key of the rows (image, ground truth, prediction, ...).

    Keys in ``heatmaps`` are drawn in colour from 0 to the column's largest value, with a colour bar
    (NaN: left white); every other key in grey over [0, 1].
    """
    columns = tuple(rows[0]) if rows else ("image",)
    names = tuple(COLUMN_TITLES.get(key, key.replace("_", " ")) for key in columns)
    finite = {
        key: np.concatenate([_as_display(row[key], clamp=False).ravel() for row in rows])
        for key in heatmaps
        if key in columns
    }
    top = {key: float(values[np.isfinite(values)].max(initial=0.0)) for key, values in finite.items()}
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, key in enumerate(columns):
            ax = axes[r, c]
            if key in top:
                shown = ax.imshow(_as_display(row[key], clamp=False), cmap="viridis", vmin=0, vmax=max(top[key], 1e-6))
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            else:
                ax.imshow(_as_display(row[key]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curve_figure(histories: dict[str, list[tuple[int, float]]], title: str) -> plt.Figure:
    """Loss terms (left) and validation metrics (right) against the epoch."""
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, points in sorted(histories.items()):
        if not points:
            continue
        steps, values = zip(*points)
        ax = metric_ax if name.startswith("val_") else loss_ax
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    for ax, label in ((loss_ax, "training loss (epoch mean)"), (metric_ax, "validation")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_group_figure(
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str], title: str
) -> plt.Figure:
    """Bars of each metric's mean (± std) per group, e.g. per video sequence, each group's image count above."""
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) * len(metrics) + 1.5), 3.6))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        means = [summaries[n][metric]["mean"] for n in names]
        stds = [summaries[n][metric]["std"] for n in names]
        ax.bar(
            [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(names))],
            means,
            width,
            yerr=stds,
            capsize=2,
            label=metric,
        )
    for x, name in enumerate(names):
        count = max(s["n"] for s in summaries[name].values())
        ax.annotate(f"n={count}", (x, 1.0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("mean over images")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


class _RunFigureHandler:
    """Shared part: find the MLflow run by name and log a figure to it, never failing training."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str, enabled: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.enabled = enabled
        self.logged: list[str] = []
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """The MLflow run's id, looked up by name once (the run exists once MLFlowHandler has started it)."""
        if self._run_id is None:
            self._run_id = find_run_id(self.tracking_uri, self.experiment_name, self.run_name)
        return self._run_id

    def attach(self, engine: Engine) -> None:
        """Log at ``Events.EPOCH_COMPLETED`` of ``engine`` (the evaluator: after each validation round)."""
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _draw_and_log(self, draw: Callable[[], plt.Figure | None], artifact_file: str) -> None:
        """Log the figure ``draw()`` returns (nothing when it returns None); an error only logs a warning."""
        try:
            fig = draw()
        except Exception as e:  # noqa: BLE001 - a figure is never worth a failed training run
            logger.warning(f"could not draw figure {artifact_file}: {type(e).__name__}: {e}")
            return
        if fig is not None:
            self._log(fig, artifact_file)

    def _log(self, fig: plt.Figure, artifact_file: str) -> None:
        try:
            run_id = self.run_id
            mlflow.MlflowClient(tracking_uri=self.tracking_uri).log_figure(run_id, fig, artifact_file)
            self.logged.append(artifact_file)
        except Exception as e:  # noqa: BLE001 - a figure is never worth a failed training run
            logger.warning(f"could not log figure {artifact_file} to MLflow: {type(e).__name__}: {e}")
        finally:
            plt.close(fig)


class _ExampleFigureHandler(_RunFigureHandler):
    """Shared part of the figures drawn from fixed examples: the first ``num_images`` items of ``dataset``.

    ``seed`` reseeds the handler's own copies of random transforms before each figure, so figures
    are comparable over a run and training's random streams are left alone.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        num_images: int = 3,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(tracking_uri, experiment_name, run_name, enabled)
        self.dataset = dataset
        self.num_images = num_images
        self.seed = seed

    def examples(self) -> list[dict]:
        """The fixed examples (fewer when the dataset is smaller)."""
        return [self.dataset[i] for i in range(min(self.num_images, len(self.dataset)))]


class ValidationFigureHandler(_ExampleFigureHandler):
    """After each validation round, log image / truth / prediction (and masked input / prediction on it).

    The examples are the first ``num_images`` items of the (preprocessed, unshuffled) validation
    dataset. With a ``masker`` (a method that trains on masked images), each is also masked with a
    copy of it reseeded every round, so rounds are comparable. Attach to the evaluator.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        network: torch.nn.Module,
        masker: RandMask | None,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        num_images: int = 3,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(dataset, tracking_uri, experiment_name, run_name, num_images, seed, enabled)
        self.network = network
        self.masker = copy.deepcopy(masker) if masker is not None else None

    @torch.no_grad()
    def rows(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Predictions of the current network on the fixed examples (and on their masked copies)."""
        if self.masker is not None:
            self.masker.set_random_state(self.seed)
        was_training = self.network.training
        self.network.eval()
        rows = []
        try:
            for item in self.examples():
                image = torch.as_tensor(item["image"]).float()
                inputs = [image] if self.masker is None else [image, torch.as_tensor(self.masker(image))]
                preds = _masks(self.network(torch.stack(inputs).to(device)))
                row = {"image": image, "label": torch.as_tensor(item["label"]).float(), "pred": preds[0]}
                if self.masker is not None:
                    row.update({"image_masked": inputs[1], "pred_masked": preds[1]})
                rows.append(row)
        finally:
            self.network.train(was_training)
        return rows

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch

        def draw() -> plt.Figure | None:
            rows = self.rows(next(self.network.parameters()).device)
            return validation_figure(rows, f"{self.run_name}: validation examples, epoch {epoch}") if rows else None

        self._draw_and_log(draw, f"figures/validation_epoch_{epoch:04d}.png")


class PseudoLabelFigureHandler(_ExampleFigureHandler):
    """After each validation round, what the semi-supervised student learns from, next to the ground truth.

    For the first ``num_images`` validation items (which have ground truth), one row: the image, its
    ground truth, the pseudo-label as training makes it (the ``source`` network in training-mode
    normalisation with its running statistics left alone, probabilities averaged over ``scales``;
    drawn by :func:`pseudo_label_image`: grey where it is less than ``threshold`` confident), the
    student's input (the image through the ``strong`` transforms, then ``masker``)
    and the student's prediction on it. ``strong`` and ``masker`` are copies reseeded every round,
    so rounds are comparable and training's random streams are left alone. ``student`` must be the
    plain network (under DDP the module inside, since this runs on one process only). Attach to the
    evaluator.

    Args:
        dataset: the preprocessed validation items (with ground truth).
        source: the network the pseudo-labels come from (the plain network itself, or the EMA teacher).
        student: the plain student network.
        strong: the strong augmentation(s) the student's input goes through, as in training.
        masker: the student's masker (copied and reseeded every round).
        tracking_uri, experiment_name, run_name: the MLflow run the figures go to.
        threshold: the teacher's confidence threshold, as in training.
        scales: input scales the teacher's probabilities are averaged over, as in training.
        activation: ``"sigmoid"`` or ``"softmax"``, as the unsupervised loss.
        num_images: how many validation items are drawn.
        seed: seed of the reseeded copies of ``strong`` and ``masker``.
        enabled: False attaches nothing.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        source: torch.nn.Module,
        student: torch.nn.Module,
        strong: Callable | Sequence[Callable],
        masker: RandMask,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        threshold: float = 0.95,
        scales: Sequence[float] = (1.0,),
        activation: str = "sigmoid",
        num_images: int = 3,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(dataset, tracking_uri, experiment_name, run_name, num_images, seed, enabled)
        self.source = source
        self.student = student
        self.strong = Compose(copy.deepcopy(strong if isinstance(strong, Sequence) else [strong]))
        self.masker = copy.deepcopy(masker)
        self.threshold = float(threshold)
        self.scales = tuple(scales)
        self.activation = activation

    @torch.no_grad()
    def rows(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Image, ground truth, pseudo-label, student input and student prediction for each example."""
        items = self.examples()
        if not items:
            return []
        self.strong.set_random_state(self.seed)
        self.masker.set_random_state(self.seed)
        images = torch.stack([torch.as_tensor(item["image"]).float() for item in items]).to(device)
        strong = torch.stack(
            [torch.as_tensor(self.strong({"image": item["image"]})["image_strong"]).float() for item in items]
        ).to(device)
        student_input = self.masker.mask_batch(strong)[0]
        probabilities = training_mode_probabilities(self.source, images, self.scales, self.activation)
        was_training = self.student.training
        self.student.eval()
        try:
            student_pred = _masks(self.student(student_input))
        finally:
            self.student.train(was_training)
        return [
            {
                "image": images[i],
                "label": torch.as_tensor(item["label"]).float(),
                "pseudo_label": pseudo_label_image(probabilities[i], self.threshold),
                "student_input": student_input[i],
                "student_pred": student_pred[i],
            }
            for i, item in enumerate(items)
        ]

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        title = f"{self.run_name}: pseudo-labels (confidence >= {self.threshold:g}) and the student, epoch {epoch}"

        def draw() -> plt.Figure | None:
            rows = self.rows(next(self.student.parameters()).device)
            return validation_figure(rows, title) if rows else None

        self._draw_and_log(draw, f"figures/pseudo_labels_epoch_{epoch:04d}.png")


class ReconstructionFigureHandler(_ExampleFigureHandler):
    """Every ``interval`` epochs of pretraining (and after the last), log image / masked input / reconstruction /
    tile loss.

    The examples are the first ``num_images`` items of ``dataset`` (preprocessed, not augmented: the
    same images every time). They are masked as in training, by a copy of the trainer's masker
    reseeded each time (a selective masker ranks the tiles with the current network), and the
    network reconstructs them. The last column is the mean L1 error of the reconstruction per masked
    tile of ``tile_size`` pixels (:func:`~masksup_med.methods.pretraining.tile_losses`), the quantity the
    selective masker ranks by; visible tiles are blank. Attach to the trainer.

    Args:
        dataset: the preprocessed pretraining items the examples are taken from.
        network: the network being pretrained.
        masker: the trainer's masker (copied and reseeded every time).
        tile_size: tile side of the masker, in pixels.
        tracking_uri, experiment_name, run_name: the MLflow run the figures go to.
        num_images: how many examples are drawn.
        interval: draw every ``interval`` epochs (and after the last).
        seed: seed of the reseeded masker copy.
        enabled: False attaches nothing.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        network: torch.nn.Module,
        masker: object,
        tile_size: int,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        num_images: int = 3,
        interval: int = 1,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__(dataset, tracking_uri, experiment_name, run_name, num_images, seed, enabled)
        self.network = network
        self.masker = copy.deepcopy(masker)
        self.tile_size = int(tile_size)
        self.interval = max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
        """Log every ``interval`` epochs of the trainer and when it completes (unless that epoch is logged)."""
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
            engine.add_event_handler(Events.COMPLETED, self._final)

    @torch.no_grad()
    def rows(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """The fixed examples, masked, reconstructed by the current network, and the masked tiles' per-tile loss."""
        items = self.examples()
        if not items:
            return []
        images = torch.stack([torch.as_tensor(item["image"]).float() for item in items]).to(device)
        self.masker.set_random_state(self.seed)
        was_training = self.network.training
        self.network.eval()
        try:
            masked, holes = mask_images(self.masker, images, self.network)
            reconstruction = self.network(masked).float()
        finally:
            self.network.train(was_training)
        losses = tile_losses((reconstruction - images).abs().mean(dim=1), self.tile_size)
        hidden = tile_losses(holes.float(), self.tile_size) > 0.5
        heat = tiles_to_pixels(
            torch.where(hidden, losses, torch.full_like(losses, float("nan"))), images.shape[2:], self.tile_size
        )
        return [
            {
                "image": images[i],
                "image_masked": masked[i],
                "reconstruction": reconstruction[i],
                "tile_loss": heat[i][None],
            }
            for i in range(len(items))
        ]

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch

        def draw() -> plt.Figure | None:
            rows = self.rows(next(self.network.parameters()).device)
            title = f"{self.run_name}: masked reconstruction, epoch {epoch}"
            return validation_figure(rows, title, heatmaps=("tile_loss",)) if rows else None

        self._draw_and_log(draw, f"figures/reconstruction_epoch_{epoch:04d}.png")

    def _final(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self(engine)


class LearningCurveHandler(_RunFigureHandler):
    """At the end of training, plot the run's epoch losses and validation metrics from MLflow.

    Attach to the trainer, after MONAI's MLFlowHandler.
    """

    def attach(self, engine: Engine) -> None:
        """Log at ``Events.COMPLETED`` of the trainer."""
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        try:
            run_id = self.run_id
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            names = [n for n in client.get_run(run_id).data.metrics if n.startswith(("train_loss", "val_"))]
            histories = {n: [(m.step, m.value) for m in client.get_metric_history(run_id, n)] for n in names}
        except Exception as e:  # noqa: BLE001 - curves are optional
            logger.warning(f"could not read the metric history for learning curves: {type(e).__name__}: {e}")
            return
        # train_loss* (LossTermAveragesHandler) and val_* are logged once per epoch with step = epoch
        self._log(learning_curve_figure(histories, f"{self.run_name}: learning curves"), "figures/learning_curves.png")
