"""Config-value checks shared by the plugin's models and trainers: a bad value fails with the key and what was expected."""


def check_config_value(config, key, kind, low=None, high=None, choices=None, optional=False, low_open=False, high_open=False):
    """``config[key]`` if it is one of ``choices``, or of ``kind`` within [low, high] (``low_open`` / ``high_open``
    exclude the bound); ``optional`` also accepts ~. Otherwise a ValueError naming the key and what was expected."""
    value = config[key]
    if optional and value is None:
        return None
    if choices is not None:
        if value not in choices:
            raise ValueError(f"config key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = "an int" if kind is int else "a number"
        bound = f" {'>' if low_open else '>='} {low}" if low is not None else ""
        bound += f"{' and' if bound else ''} {'<' if high_open else '<='} {high}" if high is not None else ""
        raise ValueError(f"config key {key!r} must be {what}{bound}{' or ~' if optional else ''}, got {value!r}")
    return value
