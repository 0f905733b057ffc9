"""Search spaces of Ray Tune searches (run_hyper.py), read from RecBole's formats.

Search spaces use RecBole's hyper format, one parameter a line (``#`` starts a comment)::

    learning_rate loguniform -9.21,-4.61     # exp(U(-9.21, -4.61)): 1e-4 .. 1e-2
    hidden_size choice [32, 64, 128]
    dropout_prob uniform 0.1,0.5
    n_layers quniform 1,3,1                  # 1, 2 or 3 (integers when all three bounds are integers)

or RecBole's yaml form ``{choice: {hidden_size: [32, 64]}, loguniform: {learning_rate: [-9.21, -4.61]}}``.
As in RecBole (hyperopt's ``hp.loguniform``), ``loguniform a,b`` bounds are natural-log exponents: the value
is ``exp(U(a, b))``, log-uniform between ``e**a`` and ``e**b``.
"""
import ast
import math
import os

import yaml

SEARCH_TYPES = ("choice", "uniform", "quniform", "loguniform")


class SearchSpaceError(ValueError):
    """A params file (or yaml search space) is malformed."""


# ----------------------------------------------------------------------------------------- search space


def _check_param(where, name, kind, value):
    if kind not in SEARCH_TYPES:
        raise SearchSpaceError(f"{where}: unknown search type {kind!r} for {name!r} (expected one of {', '.join(SEARCH_TYPES)})")
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value:
            raise SearchSpaceError(f"{where}: 'choice' for {name!r} needs a non-empty list, got {value!r}")
        return list(value)
    expected = 3 if kind == "quniform" else 2
    if not isinstance(value, (list, tuple)) or len(value) != expected:
        form = "low,high,q" if kind == "quniform" else "low,high"
        raise SearchSpaceError(f"{where}: {kind!r} for {name!r} needs {form}, got {value!r}")
    try:
        bounds = [float(v) for v in value]
    except (TypeError, ValueError):
        raise SearchSpaceError(f"{where}: {kind!r} bounds for {name!r} must be numbers, got {value!r}") from None
    if not bounds[0] < bounds[1]:
        raise SearchSpaceError(f"{where}: {kind!r} for {name!r} needs low < high, got {value!r}")
    if kind == "quniform" and bounds[2] <= 0:
        raise SearchSpaceError(f"{where}: 'quniform' step q for {name!r} must be positive, got {value!r}")
    return [int(v) if isinstance(v, int) else b for v, b in zip(value, bounds)]


def parse_params_file(path):
    """Read a search space: RecBole's hyper format (``name type values`` lines) or a ``.yaml``/``.yml`` file.

    Returns:
        dict: ``{name: (type, values)}`` in file order, type one of :data:`SEARCH_TYPES`.

    Raises:
        SearchSpaceError: naming the file, the line and what was expected.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise SearchSpaceError(f"params file {path} does not exist")
    space = {}
    if path.endswith((".yaml", ".yml")):
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f) or {}
        if not isinstance(content, dict):
            raise SearchSpaceError(f"{path}: expected a mapping of search type to {{name: values}}, got {type(content).__name__}")
        for kind, params in content.items():
            if not isinstance(params, dict):
                raise SearchSpaceError(f"{path}: {kind!r} must map parameter names to values, got {params!r}")
            for name, value in params.items():
                if name in space:
                    raise SearchSpaceError(f"{path}: parameter {name!r} appears twice")
                space[name] = (kind, _check_param(f"{path}", name, kind, value))
    else:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                where = f"{path}:{number}"
                parts = line.split(None, 2)
                if len(parts) < 3:
                    raise SearchSpaceError(f"{where}: expected 'name type values' (e.g. 'learning_rate choice [0.001, 0.01]'), got {line!r}")
                name, kind, text = parts
                if name in space:
                    raise SearchSpaceError(f"{where}: parameter {name!r} appears twice")
                if kind == "choice":
                    try:
                        value = ast.literal_eval(text)
                    except (ValueError, SyntaxError):
                        raise SearchSpaceError(f"{where}: 'choice' values for {name!r} must be a Python list literal, got {text!r}") from None
                else:
                    value = [v.strip() for v in "".join(text.split()).split(",")]
                    try:
                        value = [ast.literal_eval(v) for v in value]
                    except (ValueError, SyntaxError):
                        raise SearchSpaceError(f"{where}: {kind!r} bounds for {name!r} must be numbers, got {text!r}") from None
                space[name] = (kind, _check_param(where, name, kind, value))
    if not space:
        raise SearchSpaceError(f"params file {path} defines no parameter")
    return space


def to_tune_space(space, grid=False):
    """Ray Tune domains for a parsed search space.

    ``grid=True`` turns every ``choice`` into a grid search (every value is tried, ``num_samples`` times);
    the other types are sampled. ``loguniform a,b`` follows RecBole: log-uniform between ``e**a`` and ``e**b``.
    """
    from ray import tune

    domains = {}
    for name, (kind, value) in space.items():
        if kind == "choice":
            domains[name] = tune.grid_search(value) if grid else tune.choice(value)
        elif kind == "uniform":
            domains[name] = tune.uniform(value[0], value[1])
        elif kind == "loguniform":
            domains[name] = tune.loguniform(math.exp(value[0]), math.exp(value[1]))
        elif all(isinstance(v, int) for v in value):
            domains[name] = tune.qrandint(value[0], value[1], value[2])
        else:
            domains[name] = tune.quniform(value[0], value[1], value[2])
    return domains


# ----------------------------------------------------------------------------------------- trial
