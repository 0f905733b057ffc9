"""In-process federated learning for the plugin's models: clients, round plans, engines and aggregation."""
from recbole_ur4rec.federated.aggregation import SERVER_OPTIMIZERS, FedAvg, ServerOptimizer
from recbole_ur4rec.federated.engine import ENGINES, LOCAL_OPTIMIZERS, BatchedEngine, ClientData, LoopEngine, round_plan

__all__ = ["ENGINES", "LOCAL_OPTIMIZERS", "SERVER_OPTIMIZERS", "BatchedEngine", "ClientData", "FedAvg", "LoopEngine", "ServerOptimizer", "round_plan"]
