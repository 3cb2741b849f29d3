"""The exception the data package raises for problems a user can fix (missing files, bad names)."""


class DataError(RuntimeError):
  """A dataset is missing, unreadable or misnamed; the message is one sentence: what and where."""
