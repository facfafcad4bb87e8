"""User-facing errors.

Every mistake a user can make (bad config, missing file, mismatched store, refused tokenizer, absent backend)
raises an `AlmError` subclass whose message says what is wrong, the offending value, and how to fix it. The CLI
prints that one message and exits with code 2; any other exception is a bug and keeps its traceback.

Imports nothing from `alm`.
"""


class AlmError(Exception):
    """Base class of every error that is the user's to fix."""


class ConfigError(AlmError):
    """A recipe, data spec or `--set` override is invalid (all problems are listed at once)."""


class DataError(AlmError):
    """Input data cannot be read or is unusable (missing file, invalid UTF-8, empty corpus)."""


class TokenizerRefusedError(AlmError):
    """A tokenizer cannot reproduce the exact bytes of a text (normalizer, WordPiece, <unk>)."""


class AlignmentError(AlmError):
    """Teacher and student token sequences do not describe the same text."""


class StoreError(AlmError):
    """A teacher store is missing, unfinished, corrupt, or its output folder is not ours to write."""


class StoreCorruptError(StoreError):
    """A teacher store file is missing, truncated or changed since it was written (names store, shard, file)."""


class StoreBusyError(StoreError):
    """Another worker holds the claim on a shard (names its host and process)."""


class StoreMismatchError(StoreError):
    """A teacher store's fingerprints do not match what the recipe expects."""


class BackendUnavailableError(AlmError):
    """An optional backend (vLLM, peft, datasets) is not installed or cannot run on this machine."""
