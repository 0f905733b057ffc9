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


DISTRIBUTED_FLAGS = ("nproc", "world_size", "ip", "port", "group_offset")


def add_distributed_arguments(parser):
    """RecBole's run_recbole.py flags of a distributed run (docs/distributed.md)."""
    group = parser.add_argument_group("distributed training (RecBole's flags; or start the script with torchrun)")
    group.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine (default 1)")
    group.add_argument("--world_size", type=int, default=-1, help="ranks on all machines (default: --nproc)")
    group.add_argument("--ip", type=str, default="localhost", help="address of the machine of rank 0")
    group.add_argument("--port", type=str, default="5678", help="a free port on the machine of rank 0")
    group.add_argument("--group_offset", type=int, default=0, help="global rank of this machine's first process")


def distributed_arguments(args):
    """``{flag: value}`` of the flags :func:`add_distributed_arguments` added, as ``run_recbole_ur4rec`` takes them."""
    return {name: getattr(args, name) for name in DISTRIBUTED_FLAGS}
