"""The error raised for bad feature input: files, rows, dimensions, settings."""


class FeatureError(ValueError):
    """A feature file, cache, model path or setting is unusable; the message names the file and rows."""
