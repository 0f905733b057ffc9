"""The ServerApp: the whole RecBole run (:func:`~recbole_ur4rec.quick_start.run_recbole_ur4rec` with
``federated_engine: flower``) inside a :class:`~recbole_ur4rec.federated.flower_nodes.FlowerSession`."""
import json
import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from recbole_ur4rec.common.tables import write_json
from recbole_ur4rec.federated.flower_nodes import FlowerSession
from recbole_ur4rec.quick_start import run_recbole_ur4rec


def _settings(run_config):
    """RecBole settings from the run config (keys of apps/flower/app/pyproject.toml)."""
    text = str(run_config.get("config-json", "{}"))
    try:
        config_dict = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"run config key 'config-json' must be a JSON object of RecBole settings, got {text!r} ({err})") from None
    if not isinstance(config_dict, dict):
        raise ValueError(f"run config key 'config-json' must be a JSON object of RecBole settings, got {text!r}")
    return {
        "model": str(run_config.get("model", "FedDMMR")),
        "dataset": str(run_config.get("dataset", "ml-100k")),
        "config_file_list": str(run_config.get("config-files", "")).split() or None,
        "config_dict": {**config_dict, "federated_engine": "flower"},
    }


def _secagg(run_config):
    """SecAgg+'s settings from the run config, or None when ``secagg`` is false."""
    if not bool(run_config.get("secagg", False)):
        return None
    return {
        "num_shares": float(run_config.get("secagg-num-shares", 1.0)),
        "reconstruction_threshold": float(run_config.get("secagg-threshold", 0.67)),
        "clipping_range": float(run_config.get("secagg-clipping-range", 8.0)),
        "quantization_range": int(run_config.get("secagg-quantization-range", 2**22)),
        "timeout": float(run_config.get("round-timeout", 600.0)),
    }


def _server_main(grid: Grid, context: Context) -> None:
    """Run the whole RecBole training with ``federated_engine: flower``; write the result to run config ``output``."""

    run_config = context.run_config
    output = str(run_config.get("output", ""))
    session = None
    try:
        session = FlowerSession(
            grid, _settings(run_config), round_timeout=float(run_config.get("round-timeout", 600.0)),
            min_nodes=int(run_config.get("min-nodes", 1)), node_wait=float(run_config.get("node-wait", 60.0)),
            secagg=_secagg(run_config), eval_timeout=float(run_config.get("eval-timeout", 1800.0)),
        )
        with session:
            settings = session.settings
            result = run_recbole_ur4rec(settings["model"], settings["dataset"], settings["config_file_list"], settings["config_dict"])
    except Exception:
        if output:
            write_json(output, {"error": traceback.format_exc(), "rounds": session.rounds if session else []}, indent=None)
        raise
    if output:
        write_json(output, {"result": result, "rounds": session.rounds}, indent=None)


server_app = ServerApp()
server_app.main()(_server_main)
