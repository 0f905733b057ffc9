"""In-process federated learning for the plugin's models: clients, round plans, engines and aggregation."""
from recbole_ur4rec.federated.aggregation import FedAvg
from recbole_ur4rec.federated.engine import ENGINES, BatchedEngine, ClientData, LoopEngine, round_plan

__all__ = ["ENGINES", "BatchedEngine", "ClientData", "FedAvg", "LoopEngine", "round_plan"]
