"""The one exception type of the data package."""


class DataError(ValueError):
  """A dataset cannot be read or does not fit the request.

  The message is a single line naming what is wrong (the file, the dataset, the key) and what
  to do about it, so that a launcher can print it without a traceback.
  """
