"""``torch.func`` helpers of the federated engines (and of per-user parameters in personalised evaluation)."""
from torch import nn


class MethodCall(nn.Module):
    """Calls a method of ``model`` through ``forward``, so ``torch.func.functional_call`` can run any method with
    replaced parameters (their names prefixed ``model.``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, method, *args):
        return getattr(self.model, method)(*args)
