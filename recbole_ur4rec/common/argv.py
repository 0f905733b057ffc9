"""Command-line helpers shared by the four CLIs (run_recbole_ur4rec.py, run_hyper.py, run_compare.py and
``python -m recbole_ur4rec.apps.precompute_features``): ``--key=value`` overrides parsed one way, into a dict that travels as
``config_dict``, and RecBole's Config kept from reading ``sys.argv`` itself."""
import ast
import contextlib
import sys


def parse_override(text):
    """Value of a ``key=value`` override, converted as RecBole converts command-line values."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False, "none": None}.get(lowered, text)
    return value


def parse_overrides(parser, unknown, extra=()):
    """``{key: value}`` of the ``--key=value`` arguments ``unknown`` (argparse's leftovers) and of ``extra``
    (``key=value`` strings, e.g. run_compare's ``--extra``); anything else is a usage error of ``parser``."""
    items = []
    for arg in unknown:
        if not (arg.startswith("--") and "=" in arg):
            parser.error(f"unrecognized argument {arg!r}: settings are written --key=value")
        items.append(arg[2:])
    for item in extra:
        if "=" not in item:
            parser.error(f"{item!r}: expected KEY=VALUE")
        items.append(item)
    overrides = {}
    for item in items:
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_override(value.strip())
    return overrides


@contextlib.contextmanager
def isolated_argv():
    """RecBole's Config reads ``--key=value`` from ``sys.argv``: hide the caller's (or Ray worker's) arguments."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved
