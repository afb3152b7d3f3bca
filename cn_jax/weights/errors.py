"""Errors raised while reading, writing or matching weight files."""


class WeightFileError(ValueError):
    """A weight file cannot be read or does not match the model.

    Raised for missing files, unsupported formats, corrupt or truncated safetensors files,
    pickle checkpoints that were not explicitly allowed, and tensors whose names, shapes or
    dtypes do not fit the model. The message always names the file and, where one is
    involved, the tensor key, so the user can tell which download or conversion went wrong.

    It subclasses ``ValueError`` because the problem lies in the data handed to cn_jax, not
    in the program, and so callers that already catch ``ValueError`` keep working.
    """
