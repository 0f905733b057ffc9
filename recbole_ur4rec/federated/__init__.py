"""In-process federated learning for the plugin's models: clients, round plans, engines and aggregation.

The names below are imported on first use (PEP 562): :mod:`.flower.client_app` and :mod:`.flower.worker` stay
free of torch."""
from recbole_ur4rec.lazy import lazy_exports

_EXPORTS = {
    "SERVER_OPTIMIZERS": "recbole_ur4rec.federated.aggregation",
    "FedAvg": "recbole_ur4rec.federated.aggregation",
    "ServerOptimizer": "recbole_ur4rec.federated.aggregation",
    "ENGINES": "recbole_ur4rec.federated.engine",
    "LOCAL_OPTIMIZERS": "recbole_ur4rec.federated.engine",
    "BatchedEngine": "recbole_ur4rec.federated.engine",
    "ClientData": "recbole_ur4rec.federated.engine",
    "LoopEngine": "recbole_ur4rec.federated.engine",
    "round_plan": "recbole_ur4rec.federated.engine",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
