"""The kinds of failure a user sees, each as one line and an exit code."""

import errno


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


class EnvironmentFault(PipelineError):
    """The machine refused: no space, an unwritable or read-only path, a directory where a file is
    expected. Exit 1 when rerunning may succeed once the machine is fixed (space, quota, I/O),
    2 when a path must change."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_CAUSES = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error", errno.EMFILE: "too many open files",
    errno.EACCES: "permission denied (not writable or not readable)", errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system", errno.EISDIR: "is a directory where a file is expected",
    errno.ENOTDIR: "a file where a directory is expected", errno.EEXIST: "already exists (a file where a "
    "directory is expected?)", errno.ENOENT: "no such file or directory", errno.ELOOP: "symlink loop",
    errno.ENAMETOOLONG: "file name too long",
}
_RETRYABLE = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE}


def describe_os_error(exc: OSError, where: object = None) -> str:
    """``<path>: <cause>``, e.g. ``/data/cache/extract/ab12: no space left on device``; ``where`` names
    the place when the error carries no file name."""
    cause = _CAUSES.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__).lower()
    path = exc.filename if exc.filename is not None else where
    if path is not None and exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {cause}" if path is not None else cause


def environment_fault(exc: OSError, where: object = None) -> EnvironmentFault:
    return EnvironmentFault(describe_os_error(exc, where), 1 if exc.errno in _RETRYABLE else 2)


def describe_error(exc: BaseException, where: object = None) -> str:
    """One line for a failure message: an OSError as ``<path>: <cause>``, anything else with its type."""
    if isinstance(exc, OSError):
        return describe_os_error(exc, where)
    return f"{type(exc).__name__}: {exc}"
