"""The ``hpctrain`` command. ``python -m hpctrain options.yaml`` is ``hpctrain train``.

Exit codes: 0 done; 2 a problem with the options, data, architecture or
checkpoint (the message says which); 3 this rank lost contact with another rank
(which died, was killed or hangs); 1 an unexpected error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys

TRAIN_EXAMPLE = """example:
  hpctrain train options.yaml
  hpctrain train options.yaml --output-dir runs/ethanol
  mpiexec -n 4 python -m hpctrain options.yaml
  torchrun --nproc_per_node 4 -m hpctrain options.yaml
  srun python -m hpctrain options.yaml        # inside an sbatch script
"""


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="hpctrain",
        description="Train machine-learning interatomic potentials, from one core to many GPUs.",
        epilog="run 'hpctrain COMMAND --help' for the options of a command",
    )
    from . import __version__

    main.add_argument("--version", action="version", version=f"hpctrain {__version__}")
    commands = main.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a model from an options file",
        description="Train a model as options.yaml describes; writes model.ckpt, "
        "model.pt (metatomic), logs and the resolved options to the run directory.",
        epilog=TRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("options", help="the options file (YAML)")
    train.add_argument(
        "-o",
        "--output-dir",
        help="run directory (default: outputs/YYYY-MM-DD/HH-MM-SS)",
    )
    train.add_argument(
        "--continue",
        dest="continue_from",
        metavar="CHECKPOINT",
        help="continue training from this checkpoint (overrides 'continue_from')",
    )
    return main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `hpctrain options.yaml` and `python -m hpctrain options.yaml` mean `train`
    if argv and not argv[0].startswith("-") and argv[0] not in {"train"}:
        argv.insert(0, "train")
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 2
    from .flow import main_guard, train

    return main_guard(
        train, args.options, output_dir=args.output_dir, continue_from=args.continue_from
    )
