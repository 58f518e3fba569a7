"""The one exception type the input pipelines raise for problems a user can fix."""


class DataError(Exception):
    """A dataset problem explained in words: which root, split, file or class, and what to do."""
