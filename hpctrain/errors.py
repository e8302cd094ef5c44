"""Errors meant for people: each names the file, key or structure at fault."""


class HpctrainError(Exception):
    """Base class of every error that the command line reports without a traceback.

    ``agreed``: every rank of the run holds this error, with every rank's message (see
    :func:`hpctrain.launch.agree_on_errors`), so rank 0 alone reports it.
    """

    agreed = False


class OptionsError(HpctrainError):
    """An options file (or a hypers section) is malformed."""


class ArchitectureError(HpctrainError):
    """An architecture cannot be found, or does not follow the architecture API."""


class DataError(HpctrainError):
    """A dataset cannot be read, or its content does not match the options."""


class LaunchError(HpctrainError):
    """The launch environment (SLURM, torchrun, MPI) is inconsistent."""


class CheckpointError(HpctrainError):
    """A checkpoint cannot be read or does not fit the run."""


class Preempted(HpctrainError):
    """A stop signal arrived; a checkpoint was written and the run can continue."""

    exit_code = 75  # EX_TEMPFAIL: "try again", i.e. resume me


class TrainingDiverged(HpctrainError):
    """The loss became NaN or infinite; nothing of the broken state was saved."""

    exit_code = 4


class JobFailed(HpctrainError):
    """A submitted SLURM job ended without a trained model."""

    exit_code = 1
