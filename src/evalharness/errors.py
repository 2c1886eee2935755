"""User-facing errors: each carries a one-line message naming the file, case or key at fault.

The CLI prints ``str(error)`` without a traceback (unless ``hydra.verbose`` is set), marks the
MLflow run FAILED with the message as a tag, and exits non-zero.
"""


class HarnessError(Exception):
    """Base class of errors whose message is meant for the user, on one line."""


class ConfigError(HarnessError):
    """A configuration value is missing or out of range (the message names the key)."""


class SourceError(HarnessError):
    """The model or training configuration could not be found, fetched or loaded safely."""


class DataError(HarnessError):
    """The dataset, split or manifest is unusable as a whole (not a single case)."""


class CaseError(HarnessError):
    """One case cannot be evaluated (bad file, grid mismatch, ...); other cases go on.

    `findings` holds the data-level check results (`mismatches.Mismatch`) behind the failure,
    such as a header disagreement, so the mismatch report can include them.
    """

    def __init__(self, message: str, findings: tuple = ()) -> None:
        super().__init__(message)
        self.findings = findings


def one_line(error: BaseException) -> str:
    """`error`'s whole message on one line (its type name if it has none): what the CLI prints
    and what the run's `evalharness.error` tag holds."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type name if it has none), at most 300
    characters: for one-line messages that quote an error from a library."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
