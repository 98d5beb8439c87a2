"""User-facing errors: the CLI prints these as one line, without a traceback."""


class MonaiFLError(Exception):
    """An error caused by user input (a path, a name, a file's content) with a readable message."""


class DataNotFoundError(MonaiFLError):
    """A dataset file is missing in every place searched."""


class ChecksumError(MonaiFLError):
    """A file's checksum differs from the official one."""


class ManifestError(MonaiFLError):
    """A site manifest is malformed or does not match the data."""


class DataFormatError(MonaiFLError):
    """An image, label or datalist file is unreadable or inconsistent."""
