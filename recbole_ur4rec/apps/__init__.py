"""Applications that build whole runs on top of the quick start: the feature precomputation command, the
federated partition command and the Flower deployment (ServerApp, ClientApp, node service and worker)."""
