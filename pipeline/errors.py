"""The two kinds of failure a user sees, each as one line and an exit code."""


class PipelineError(Exception):
    """An error shown to the user as one line (no traceback unless --debug)."""

    exit_code = 2


class ConfigError(PipelineError):
    """Bad input or configuration: a file, a field, a parameter. Exit code 2.

    The message names the file (or the stage / parameter) and what is wrong, e.g.
    ``data/thumos.yaml: videos: environment variable THUMOS_VIDEOS is not set``.
    """

    exit_code = 2


class WorkFailed(PipelineError):
    """Some items of a stage failed; the rest were kept. Exit code 1."""

    exit_code = 1
