"""Stopping a training gracefully on SIGTERM (what Docker, Kubernetes and SLURM send before they kill).

:class:`SignalStopHandler` turns the signal into a flag; at the next iteration boundary the trainer
stops (``engine.terminate``, without its COMPLETED handlers: no final validation, no registration)
and the epoch checkpoint is written with the state of that iteration, so ``--resume true`` loses
nothing. ignite resumes such a checkpoint mid-epoch: ``iteration`` says how far the epoch went, the
resumed run starts that epoch again at the next iteration (``iteration % epoch_length``) and runs
its remaining iterations, on batches of a fresh pass over the data, then the epoch's validation,
learning-rate step and checkpoint as usual. A signal that arrives in an epoch's last iteration lets
the epoch end first (validation, its checkpoint), then stops.

The run's driver (:meth:`masksup_med.tracking.run.RunTrackingHandler.run`) marks the MLflow run
KILLED and ends the process with :meth:`SignalStopHandler.exit` (code 128 + the signal: 143). A second
signal stops the process at once, as if there were no handler. A training's DataLoaders take
:func:`worker_init` as ``worker_init_fn``, so their worker processes live through a SIGTERM sent to
the whole process group (torchrun, SLURM); PyTorch's workers die of it, and the trainer with them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.data.utils import worker_init_fn as monai_worker_init

__all__ = ["SignalStopHandler", "worker_init"]

logger = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[Engine, SignalStopHandler] = weakref.WeakKeyDictionary()


class SignalStopHandler:
    """On SIGTERM, stop the trainer at the next iteration boundary with an epoch checkpoint to resume from.

    Attach to the trainer after its epoch CheckpointSaver (:func:`masksup_med.run.resume.attach_handlers`
    does). The signal handler is installed while the trainer runs. Under DDP the processes agree at
    each iteration whether to stop, so they stop at the same one.

    Args:
        saver: the trainer's epoch CheckpointSaver; its epoch checkpoint is written when the run stops
            (None: nothing is written).
        signals: the signals that stop the run gracefully.
    """

    def __init__(self, saver: Any = None, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self.saver = saver
        self.signals = tuple(signals)
        self.received: int | None = None
        self.checkpoint: Path | None = None
        self.stopped_at: tuple[int, int, int] | None = None  # epoch, iteration in the epoch, epoch length
        self._previous: dict[int, Any] = {}

    @classmethod
    def of(cls, engine: Engine) -> SignalStopHandler | None:
        """The handler attached to ``engine``, if any."""
        return _ATTACHED.get(engine)

    def attach(self, engine: Engine) -> None:
        """Install the signal handler when ``engine`` starts; check for a stop after each iteration and epoch."""
        _ATTACHED[engine] = self
        engine.add_event_handler(Events.STARTED, self.install)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.TERMINATE, self.terminated)
        engine.add_event_handler(Events.COMPLETED, self.restore)

    def install(self, engine: Engine | None = None) -> None:
        """Catch :attr:`signals` (only possible in the main thread; elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not in the main thread: no signal handler installed")
            return
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self, engine: Engine | None = None) -> None:
        """Put back the signal handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: stop now, as without this handler
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning(
            f"{signal.Signals(signum).name} received: training stops after this iteration and saves a checkpoint "
            "to resume from (send it again to stop at once)"
        )

    def _stop_requested(self) -> bool:
        stop = self.received is not None
        if idist.get_world_size() > 1:  # every process stops at the same iteration, or one waits forever
            stop = bool(idist.all_reduce(int(stop), op="MAX"))
            if stop and self.received is None:
                self.received = signal.SIGTERM
        return stop

    def iteration_completed(self, engine: Engine) -> None:
        """Stop after this iteration when a signal came, unless it ends the epoch (then :meth:`epoch_completed`)."""
        if self._stop_requested() and engine.state.iteration % engine.state.epoch_length:
            engine.terminate(skip_completed=True)

    def epoch_completed(self, engine: Engine) -> None:
        """Stop once this epoch's handlers (validation, its checkpoint) have run, when a signal came."""
        if self._stop_requested():
            engine.terminate(skip_completed=True)

    def terminated(self, engine: Engine) -> None:
        """Write the epoch checkpoint of the iteration the trainer stopped at (when a signal stopped it)."""
        if self.received is None:
            return
        epoch_length = engine.state.epoch_length
        done = engine.state.iteration - (engine.state.epoch - 1) * epoch_length
        self.stopped_at = (engine.state.epoch, done, epoch_length)
        checkpoint = getattr(self.saver, "_interval_checkpoint", None)
        if checkpoint is not None:
            checkpoint(engine)  # at an epoch's end this writes the epoch's checkpoint again, unchanged
            priority = checkpoint.score_function(engine)
            names = [item.filename for item in checkpoint._saved if item.priority == priority]
            if names:
                self.checkpoint = Path(self.saver.save_dir) / names[-1]
                if idist.get_rank() == 0:  # the one process that writes it
                    logger.info(
                        f"saved {self.checkpoint} (epoch {self.stopped_at[0]}, iteration {done} of {epoch_length})"
                    )
        self.restore()

    def describe(self) -> str:
        """Where the run stopped and what was saved, in words."""
        name = signal.Signals(self.received).name if self.received is not None else "a signal"
        if self.stopped_at is None:
            where = ""
        elif self.stopped_at[1] == self.stopped_at[2]:
            where = f" after epoch {self.stopped_at[0]}"
        else:
            where = f" in epoch {self.stopped_at[0]} after iteration {self.stopped_at[1]} of {self.stopped_at[2]}"
        saved = f"; its state is in {self.checkpoint}" if self.checkpoint else "; no checkpoint was written"
        return f"training stopped by {name}{where}{saved}"

    def exit(self, note: str = "") -> NoReturn:
        """Print the last line (where the run stopped, ``note``, how to continue) and end with 128 + the signal."""
        if idist.get_rank() == 0:
            advice = "continue it with --resume true" if self.checkpoint else "start it again"
            note = f"; {note}" if note else ""
            # on a line of its own: a progress bar may have left the cursor at the end of its line
            print(f"\nmasksup-med: {self.describe()}{note}; {advice}.", file=sys.stderr, flush=True)
        raise SystemExit(128 + (self.received or signal.SIGTERM))


def worker_init(worker_id: int) -> None:
    """A DataLoader worker's start (``worker_init_fn``): MONAI's (each worker's own random state), then SIGTERM
    left to the trainer.

    A SIGTERM sent to the whole process group (torchrun, SLURM) would kill the workers (PyTorch's
    handler), and their trainer with a DataLoader error at any point of its step. Here the worker
    blocks SIGTERM and a thread of its own waits for it: sent by the trainer (which ends its workers
    so at exit), the worker exits; sent by anyone else, it is ignored, and the trainer stops gracefully.
    Where ``signal.sigwaitinfo`` does not exist (not Linux), nothing changes.
    """
    monai_worker_init(worker_id)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = multiprocessing.parent_process()  # the trainer, however the worker was started (fork, spawn, ...)
    trainer = parent.pid if parent is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on block it too
    threading.Thread(target=_exit_when_the_trainer_asks, args=(trainer,), name="sigterm-wait", daemon=True).start()


def _exit_when_the_trainer_asks(trainer: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == trainer or not _alive(trainer):
            os._exit(0)  # as the trainer's DataLoader expects of a worker it ends


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
