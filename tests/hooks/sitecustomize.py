"""Pauses training runs where a test chooses, so that a test sends its signal or kill
at a known point whatever the speed of the machine.

Python imports this module at start-up when this folder is on ``PYTHONPATH`` (tests
put it there for the processes they launch: plain, mpiexec, torchrun, SLURM jobs).
It does nothing unless ``HPCTRAIN_TEST_PAUSE_AT`` is set:

``HPCTRAIN_TEST_PAUSE_AT=5,40,export``
    points where each rank pauses, once per point and rank (a resumed run that
    passes the point again goes on): a number is the end of that optimizer step;
    ``load`` is before the datasets are read, ``last-validation`` the start of the
    validation after the last epoch, ``export`` before the model is exported
``HPCTRAIN_TEST_PAUSE_DIR=DIR``
    where a pausing rank writes ``paused-POINT-rank-R`` (holding its process id); it
    goes on once it has received a stop signal (SIGUSR1, SIGUSR2, SIGTERM, SIGINT) or
    when ``DIR/release-POINT`` exists. A point written ``POINT!`` waits for the
    release alone, and writes ``received-POINT-rank-R`` once a stop signal came (for
    tests that send more than one signal).
"""

import functools
import importlib.abc
import os
import sys
import time
from pathlib import Path

PAUSE_AT = {p for p in os.environ.get("HPCTRAIN_TEST_PAUSE_AT", "").split(",") if p}
TIMEOUT_S = 600


def pause(point) -> None:
    from hpctrain import run

    context = run.current()
    deaf = f"{point}!" in PAUSE_AT
    if str(point) not in PAUSE_AT and not deaf:
        return
    folder = Path(os.environ["HPCTRAIN_TEST_PAUSE_DIR"])
    marker = folder / f"paused-{point}-rank-{context.rank}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + TIMEOUT_S
    noticed = folder / f"received-{point}-rank-{context.rank}"
    while deaf or not (context.stop and context.stop.received):
        if deaf and context.stop and context.stop.received and not noticed.exists():
            noticed.write_text(context.stop.received)
        if (folder / f"release-{point}").exists():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"test pause at {point}: neither a signal nor a release came")
        time.sleep(0.02)


def before(function, point):
    @functools.wraps(function)
    def paused(*args, **kwargs):
        pause(point)
        return function(*args, **kwargs)

    return paused


def patch_engine(engine) -> None:
    train_step, validate = engine.Engine.train_step, engine.Engine.validate

    def paused_train_step(self, *args, **kwargs):
        loss = train_step(self, *args, **kwargs)
        pause(self.progress.step)
        return loss

    def paused_validate(self):
        if self.progress.epoch == self.hypers.num_epochs:
            pause("last-validation")
        return validate(self)

    engine.Engine.train_step = paused_train_step
    engine.Engine.validate = paused_validate


def patch_startup(startup) -> None:
    startup.load_datasets = before(startup.load_datasets, "load")


def patch_export(export) -> None:
    export.export_model = before(export.export_model, "export")


PATCHES = {
    "hpctrain.engine": patch_engine,
    "hpctrain.startup": patch_startup,
    "hpctrain.export": patch_export,
}


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies ``PATCHES`` to their modules right after each is imported."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if PAUSE_AT:
    sys.meta_path.insert(0, PatchOnImport())
