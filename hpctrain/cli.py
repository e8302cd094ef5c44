"""The ``hpctrain`` command: ``train``, ``convert`` (to HDF5 shards), ``inspect``,
``submit``, and for trained models ``eval``, ``export`` and ``plot``.

``python -m hpctrain options.yaml`` is ``hpctrain train``.

Exit codes: 0 done; 2 a problem with the options, data, architecture or
checkpoint (the message says which); 3 this rank lost contact with another rank
(which died, was killed or hangs); 4 the loss became NaN or infinite; 75 stopped by
SIGUSR1/SIGUSR2/SIGTERM or a first Ctrl-C, after a checkpoint when there was
something to save (resume with --continue auto); 130 a second Ctrl-C; 1 an
unexpected error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from . import host_memory
from .errors import HpctrainError, Preempted
from .report import end_status_line, log_to_file

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
        help="continue from this checkpoint, or 'auto': the newest committed one of the "
        "run directory, else start (overrides 'continue_from')",
    )
    train.add_argument(
        "--requeue-on-signal",
        action="store_true",
        help="after the checkpoint that SIGUSR1/SIGUSR2/SIGTERM cause, requeue this SLURM "
        "job (sets checkpoint.requeue)",
    )
    add_convert(commands)
    add_inspect(commands)
    add_submit(commands)
    add_eval(commands)
    add_export(commands)
    add_plot(commands)
    return main


CONVERT_EXAMPLE = """example:
  # extxyz with energy, forces and stress (every label found is stored), 50,000 per shard
  hpctrain convert md-*.xyz -o shards/ --shard-size 50000
  # Hartree and bohr, converted to eV and angstrom; a second energy without gradients
  hpctrain convert data.extxyz -o shards/ --energy-unit Hartree --length-unit bohr \\
      --energy E_total --forces F --target dispersion:E_d3
  # several input files spread over 8 MPI ranks (same bytes as one rank)
  mpiexec -n 8 hpctrain convert part-*.xyz -o shards/ --compression gzip:4
  # with the neighbour pairs within 5 A, read by training instead of searched
  hpctrain convert md-*.xyz -o shards/ --neighbors 5.0

then point the options at the directory:
  training_set:
    systems: {read_from: shards/}
    targets: {energy: {forces: true, stress: true}}
"""

INSPECT_EXAMPLE = """example:
  hpctrain inspect shards/
  hpctrain inspect shards/ --verify    # exit 0 and 'ok', or 2 naming the bad shard
"""


def add_convert(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert ASE-readable files into a directory of HDF5 shards",
        description="Stream structures with their energies, forces and stress from any "
        "files ASE reads (extxyz, ASE db, ...) into HDF5 shards with a manifest.json, "
        "in eV and angstrom. Runs under mpiexec to spread input files over ranks.",
        epilog=CONVERT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="input files, converted in the order given"
    )
    convert.add_argument("-o", "--output", required=True, metavar="DIR", help="shard directory")
    convert.add_argument(
        "--shard-size",
        type=int,
        default=10000,
        metavar="N",
        help="structures per shard (default: 10000)",
    )
    add_label_flags(convert)
    convert.add_argument(
        "--energy-unit", default="eV", metavar="U", help="energy unit of the input (default: eV)"
    )
    convert.add_argument(
        "--length-unit",
        default="angstrom",
        metavar="U",
        help="length unit of the input (default: angstrom)",
    )
    convert.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME:KEY[:per-atom]",
        help="another energy target to store (repeatable)",
    )
    convert.add_argument(
        "--compression",
        default="none",
        metavar="gzip[:LEVEL]|lzf|none",
        help="HDF5 compression of every dataset (default: none)",
    )
    convert.add_argument("--format", metavar="ASE_FORMAT", help="ASE format of the inputs")
    convert.add_argument(
        "--neighbors",
        type=float,
        metavar="CUTOFF",
        help="also store each structure's neighbour pairs within CUTOFF (angstrom), so "
        "that training reads them instead of searching them every epoch; use the "
        "model's cutoff (or more)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace the shards of a non-empty DIR"
    )


def add_label_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``hpctrain convert`` naming the keys of the energy and its gradients."""
    parser.add_argument(
        "--energy", default="energy", metavar="KEY", help="key of the energy (default: energy)"
    )
    parser.add_argument(
        "--forces",
        default="auto",
        metavar="KEY|none|auto",
        help="key of the forces; auto: 'forces' when the first structure has it (default)",
    )
    parser.add_argument(
        "--stress",
        default="auto",
        metavar="KEY|none|auto",
        help="key of the stress; auto: 'stress' when the first structure is periodic and "
        "has it (default)",
    )
    parser.add_argument(
        "--virial",
        default="auto",
        metavar="KEY|none|auto",
        help="key of the virial (energy), stored as stress; auto: 'virial' when no stress "
        "is stored and the first structure is periodic and has it (default)",
    )


def add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="summarize (and verify) a shard directory",
        description="Print the counts, elements, atoms per structure and target "
        "statistics of a shard directory; with --verify, check every file's sha256, "
        "offsets and values too.",
        epilog=INSPECT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("directory", metavar="DIR", help="shard directory")
    inspect.add_argument(
        "--verify", action="store_true", help="check checksums and scan every value"
    )


def run_convert(args: argparse.Namespace) -> None:
    from .data.convert import choose_labels, convert, spec_from_args
    from .launch import rank_hint

    forces, stress, virial, report = choose_labels(
        args.inputs[0], args.format, args.energy, args.forces, args.stress, args.virial
    )
    if rank_hint() == 0:
        print(report, flush=True)
    spec = spec_from_args(
        energy=args.energy,
        forces=forces,
        stress=stress,
        virial=virial,
        energy_unit=args.energy_unit,
        length_unit=args.length_unit,
        targets=args.target,
    )
    convert(
        args.inputs,
        args.output,
        spec,
        units={"length_unit": args.length_unit, "energy_unit": args.energy_unit},
        shard_size=args.shard_size,
        compression=None if args.compression == "none" else args.compression,
        reader=args.format,
        overwrite=args.overwrite,
        pair_cutoff=args.neighbors,
    )


SUBMIT_EXAMPLE = """example:
  hpctrain submit options.yaml --nodes 2 --gpus-per-node 4 --time 12:00:00 \\
      --partition gpu --account myproject
  hpctrain submit options.yaml --dry-run          # print the sbatch script only
  hpctrain submit options.yaml --output-dir runs/a --wait

Every flag can also sit in the 'slurm:' section of options.yaml; flags win. The job
checkpoints, requeues itself and continues when SLURM preempts it or its time runs
out (up to --max-requeues times); submitting again with the same --output-dir
continues a run that stopped for good.
"""


def add_submit(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="train as a SLURM job (from a login node)",
        description="Submit the training of options.yaml as a SLURM job through submitit: "
        "one task per GPU (or --tasks-per-node on CPU nodes), each running the same code as "
        "`srun python -m hpctrain options.yaml`, with continue_from: auto.",
        epilog=SUBMIT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("options", help="the options file (YAML)")
    submit.add_argument("--nodes", type=int, help="number of nodes")
    submit.add_argument("--gpus-per-node", type=int, help="GPUs per node (one rank each)")
    submit.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU nodes")
    submit.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    submit.add_argument("--time", help="time limit of each job, e.g. 12:00:00")
    submit.add_argument("--partition", help="SLURM partition")
    submit.add_argument("--account", help="SLURM account")
    submit.add_argument("--max-requeues", type=int, help="requeues allowed (default 10)")
    submit.add_argument(
        "--sbatch",
        action="append",
        metavar="OPTION",
        help="extra sbatch option, e.g. --sbatch=--qos=long",
    )
    submit.add_argument("--job-name", default="hpctrain", help="SLURM job name")
    submit.add_argument(
        "-o", "--output-dir", help="run directory (default: outputs/YYYY-MM-DD/HH-MM-SS)"
    )
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")


def run_inspect(args: argparse.Namespace) -> None:
    from .data.inspection import summarize, verify

    print(summarize(args.directory), flush=True)
    if args.verify:
        count = verify(args.directory)
        print(f"ok: checksums, offsets and values of {count} structures", flush=True)


EVAL_EXAMPLE = """example:
  hpctrain eval outputs/ethanol/model.pt test.xyz -o predictions.xyz --plot parity.png
  hpctrain eval model.pt shards/ --batch-size 64           # an HDF5 shard directory
  hpctrain eval model.pt data.extxyz --energy E_dft --forces F --stress none
  hpctrain eval model.pt r2scan.xyz --variant r2scan   # the energy/r2scan output
  mpiexec -n 4 hpctrain eval model.pt shards/ -o predictions.xyz   # or srun, torchrun

prints MAE and RMSE of the energy per atom and per structure, the forces and the
stress (here of a small model after 3 epochs on examples/rmd17_ethanol_100.xyz):
  run/model.pt on test.xyz: 10 structures (energy, forces), float64, 1 rank, cpu
  target                     MAE          RMSE
  energy [eV/atom]     0.0188236     0.0251161
  energy [eV]           0.169413      0.226045
  forces [eV/A]         0.793722       1.10097

predictions.xyz holds the reference values as energy, forces and stress (ASE reads
them as the calculator's results) and the model's as predicted_energy,
predicted_forces and predicted_stress, in the order of the data.
"""

EXPORT_EXAMPLE = """example:
  hpctrain export outputs/ethanol/model.ckpt -o ethanol.pt --name "ethanol MLIP" \\
      --author "A. Person" --reference "https://doi.org/10.xxxx/yyyy" \\
      --description "mp_transformer trained on 1000 rMD17 ethanol structures"
  hpctrain export outputs/ethanol/checkpoints/step-000004000 -o best.pt

writes the model and the TorchScript extensions it needs, in extensions/ next to it;
use them with metatomic_ase.MetatomicCalculator(model, extensions_directory=...)
"""

PLOT_EXAMPLE = """example:
  hpctrain plot outputs/2025-01-31/10-00-00            # writes .../learning_curves.png
  hpctrain plot runs/ethanol -o ethanol-curves.png
"""


def add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="errors of an exported model on a dataset",
        description="Load an exported model.pt as an MD engine does (metatomic, with its "
        "TorchScript extensions), predict energies, forces and stress for a dataset (a file "
        "ASE reads, or an HDF5 shard directory), print MAE and RMSE per target and "
        "optionally write the predictions and parity plots. Runs under mpiexec, srun or "
        "torchrun with each rank evaluating its share; the metrics are exact.",
        epilog=EVAL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("model", help="the exported model (model.pt)")
    evaluate.add_argument("data", help="structures: a file ASE reads, or a shard directory")
    evaluate.add_argument(
        "-o", "--output", metavar="FILE.xyz", help="write reference and predicted values here"
    )
    evaluate.add_argument("--plot", metavar="FILE.png", help="write parity plots here")
    evaluate.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="structures per batch (16)"
    )
    evaluate.add_argument(
        "--extensions-directory",
        metavar="DIR",
        help="TorchScript extensions of the model (default: extensions/ next to it)",
    )
    evaluate.add_argument(
        "--energy", default="energy", metavar="KEY", help="key of the energy (default: energy)"
    )
    evaluate.add_argument(
        "--forces",
        default="auto",
        metavar="KEY|none|auto",
        help="key of the forces; auto: 'forces' when the data has it (default)",
    )
    evaluate.add_argument(
        "--stress",
        default="auto",
        metavar="KEY|none|auto",
        help="key of the stress; auto: 'stress' when the data has it and is periodic (default)",
    )
    evaluate.add_argument(
        "--energy-unit", default="eV", metavar="U", help="energy unit of the data (default: eV)"
    )
    evaluate.add_argument(
        "--length-unit",
        default="angstrom",
        metavar="U",
        help="length unit of the data (default: angstrom)",
    )
    evaluate.add_argument(
        "--variant",
        metavar="NAME",
        help="the level of theory to evaluate, for a model with several energy outputs "
        "(energy/NAME; default: the plain energy output)",
    )
    evaluate.add_argument("--format", metavar="ASE_FORMAT", help="ASE format of the data")
    evaluate.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto"
    )
    evaluate.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds a rank waits for the others (default: 1800)",
    )


def add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a checkpoint to a metatomic model",
        description="Export a checkpoint of a run (model.ckpt, or a step directory "
        "checkpoints/step-N/) to a metatomic model for MD engines, with the TorchScript "
        "extensions it needs. The architecture is read from the checkpoint.",
        epilog=EXPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("checkpoint", help="model.ckpt or checkpoints/step-N/")
    export.add_argument("-o", "--output", required=True, metavar="FILE.pt", help="the model")
    export.add_argument("--name", help="name of the model")
    export.add_argument(
        "--author", action="append", default=[], metavar="A", help="an author (repeatable)"
    )
    export.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="R",
        help="a reference to cite for the model, e.g. a DOI (repeatable)",
    )
    export.add_argument("--description", help="what the model is, and what it was trained on")
    export.add_argument(
        "--best",
        action="store_true",
        help="export the weights of the best validation that the checkpoint keeps "
        "(what 'export: best' exports at the end of training), not its last ones",
    )


def add_plot(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot",
        help="learning curves of a run as a PNG",
        description="Plot a run's metrics.csv: the training loss, each validation RMSE "
        "(and MAE) per target, and the learning rate, against the epoch, as one PNG.",
        epilog=PLOT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of hpctrain train")
    plot.add_argument(
        "-o", "--output", metavar="FILE.png", help="default: RUN_DIR/learning_curves.png"
    )


def run_plot(args: argparse.Namespace) -> None:
    from .plots import learning_curves

    path = learning_curves(args.run_dir, args.output)
    print(f"wrote {path}", flush=True)


COMMANDS = {"train", "convert", "inspect", "submit", "eval", "export", "plot"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `hpctrain options.yaml` and `python -m hpctrain options.yaml` mean `train`
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        argv.insert(0, "train")
    args = parser().parse_args(argv)
    host_memory.configure()  # before torch's first tensor
    if args.command is None:
        parser().print_help()
        return 2
    if args.command == "train":
        return run_train(args)

    if args.command == "convert":
        return main_guard(run_convert, args)
    if args.command == "inspect":
        return main_guard(run_inspect, args)
    if args.command == "submit":
        from .submit import run_submit

        return main_guard(run_submit, args)
    if args.command == "eval":
        from .eval_command import run_eval

        return main_guard(run_eval, args)
    if args.command == "export":
        from .export_command import run_export

        return main_guard(run_export, args)
    return main_guard(run_plot, args)


def run_train(args: argparse.Namespace) -> int:
    """``hpctrain train``, with the stop-signal handlers held from before the heavy
    imports to the end of the run (:mod:`hpctrain.signals`)."""
    from .errors import Preempted
    from .signals import StopRequest

    with StopRequest() as stop:
        try:
            with stop.immediately("while starting: nothing was saved, nothing is lost"):
                from .flow import train
        except Preempted as stopped:
            print(f"hpctrain: {stopped}", file=sys.stderr)
            if args.requeue_on_signal and stop.requeue:
                from . import launch
                from .options import SlurmOptions

                env = launch.detect()
                if env.is_main:
                    launch.requeue_slurm_job(env, SlurmOptions().max_requeues)
            return stopped.exit_code
        return main_guard(
            train,
            args.options,
            output_dir=args.output_dir,
            continue_from=args.continue_from,
            requeue=args.requeue_on_signal,
            stop=stop,
        )


EXIT_USER_ERROR = 2


EXIT_LOST_RANK = 3


def main_guard(function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``function``; report hpctrain errors without a traceback, on stderr and in
    the run's ``train.log``: by rank 0 alone when the ranks agreed on it, else by every
    rank that has one (other ranks than 0 prefix theirs). Returns the exit status.

    (torch is imported only to report an error: ``plot`` and ``inspect`` do without.)
    """

    def report(message: str, all_ranks: bool = False) -> None:
        from . import launch

        rank = launch.rank_hint()
        if rank == 0 or all_ranks:
            print(("" if rank == 0 else f"[rank {rank}] ") + message, file=sys.stderr)
            launch.tell_launcher(message)
        else:
            launch.tell_launcher("hpctrain: stopped with rank 0, which says why")
        log_to_file(message)

    try:
        try:
            function(*args, **kwargs)
        finally:
            end_status_line()  # a progress bar on screen ends before any message
        return 0
    except Preempted as stop:
        report(f"hpctrain: {stop}")
        return stop.exit_code
    except HpctrainError as error:
        report(f"hpctrain: error: {error}", all_ranks=not error.agreed)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    except RuntimeError as error:
        from . import launch

        if not launch.is_communication_failure(error):
            log_to_file(f"hpctrain: unexpected error\n{traceback.format_exc()}")
            raise
        report(
            f"hpctrain: error: rank {launch.rank_hint()} lost contact with another rank "
            "(it died, was killed, or hangs); its own output says why. Training stopped; "
            f"continue from the last checkpoint. Details: {str(error).splitlines()[0]}",
            all_ranks=True,
        )
        return EXIT_LOST_RANK
    except KeyboardInterrupt:
        report(
            "hpctrain: interrupted (a second Ctrl-C stops at once, without a checkpoint)",
            all_ranks=True,
        )
        return 130
    except Exception:
        log_to_file(f"hpctrain: unexpected error\n{traceback.format_exc()}")
        raise
    finally:
        sys.stdout.flush()
