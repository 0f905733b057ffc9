"""In-process federated learning for the plugin's models: clients, round plans, engines and aggregation.

The names below are imported on first use (PEP 562): :mod:`.flower.client_app` and :mod:`.flower.worker` stay
free of torch."""
from recbole_ur4rec.common.lazy import lazy_exports

_EXPORTS = {
    "SERVER_OPTIMIZERS": "recbole_ur4rec.federated.aggregation",
    "FedAvg": "recbole_ur4rec.federated.aggregation",
    "ServerOptimizer": "recbole_ur4rec.federated.aggregation",
    "ENGINES": "recbole_ur4rec.federated.local_engines",
    "LOCAL_OPTIMIZERS": "recbole_ur4rec.federated.local_engines",
    "BatchedEngine": "recbole_ur4rec.federated.local_engines",
    "ClientData": "recbole_ur4rec.federated.local_engines",
    "LoopEngine": "recbole_ur4rec.federated.local_engines",
    "round_plan": "recbole_ur4rec.federated.local_engines",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
