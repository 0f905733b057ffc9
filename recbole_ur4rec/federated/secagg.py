"""Secure aggregation of a round's node replies with Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the ClientApp): the server learns the sum of the nodes' partial aggregates, not any one of them.

Flower 1.41 runs SecAgg+ through its legacy ``fit`` records only: the round's global parameters travel as
``fitins.parameters`` (arrays in the order :func:`ordered_names` gives; the names do not travel), the round plan as
``fitins.config``, and a node replies ``fitres.parameters`` (the only masked record), ``fitres.num_examples``,
``fitres.metrics`` and ``fitres.status``. SecAgg+ returns the *mean* of the masked vectors weighted by
``num_examples / max_weight``: every node sends ``num_examples`` 1 (``max_weight`` 1), so the mean times the number
of contributing nodes is their sum. Each node sends ``[its weighted sum of client updates, EXTRAS]`` (its total
weight, how many clients it included and left out, the sum of their losses and their number: :data:`EXTRAS`)
divided by the round's ``weight_scale`` (the sampled clients' total sample count; under DP, where every client
weighs 1, their number), so that the values lie well
inside the quantisation range; the server multiplies back. A node whose values fall outside SecAgg+'s clipping
range refuses the round (SecAgg+ would clip them silently), and so does a node in a SecAgg+ round of fewer than
:data:`~.privacy.SECAGG_MIN_NODES` nodes.

Nothing travels in the clear (``fitres.metrics`` is empty). SecAgg+ quantises every value to a step of
``2 * clipping_range / quantization_range`` (with Flower's defaults 8 and 2^22: 3.8e-6, on values divided by
``weight_scale``), so the aggregate equals plain FedAvg's to that tolerance.
"""
import numpy as np

EXTRAS = ("total", "included", "excluded", "loss_sum", "loss_count")  # after the parameters, in one array


def ordered_names(names):
    """The order in which parameters travel in SecAgg+'s unnamed arrays."""
    return sorted(names)


def secure_sum(grid, node_ids, arrays, fit_config, settings):
    """Sum ``[vector per node]`` over ``node_ids`` with SecAgg+; send them ``arrays`` and ``fit_config``.

    Args:
        settings (dict): ``num_shares``, ``reconstruction_threshold``, ``clipping_range``, ``quantization_range``,
            ``timeout`` of :class:`flwr.server.workflow.SecAggPlusWorkflow`.

    Returns:
        tuple: the summed arrays (float64; None when SecAgg+ halted: too few nodes left for the threshold) and
        ``{node id: its fitres.metrics}`` of the nodes whose vectors are in the sum.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow

    contributions = {}

    class Sum(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            for proxy, fit_res in results:
                contributions[int(proxy.node_id)] = dict(fit_res.metrics)
            return super().aggregate_fit(server_round, results, failures)

    manager = SimpleClientManager()
    for node in node_ids:
        manager.register(GridClientProxy(node_id=int(node), grid=grid, run_id=grid.run.run_id))
    n = len(node_ids)
    strategy = Sum(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n, on_fit_config_fn=lambda r: fit_config)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=manager)
    sent = ArrayRecord({str(i): Array(np.ascontiguousarray(a)) for i, a in enumerate(arrays)})
    context.state.config_records["config"] = ConfigRecord({"current_round": int(fit_config["round"]) + 1})
    context.state.array_records["parameters"] = sent
    workflow = SecAggPlusWorkflow(
        num_shares=settings["num_shares"], reconstruction_threshold=settings["reconstruction_threshold"], max_weight=1.0,
        clipping_range=settings["clipping_range"], quantization_range=settings["quantization_range"], timeout=settings["timeout"],
    )
    workflow(grid, context)
    out = context.state.array_records["parameters"]
    if out is sent or not contributions:
        return None, {}
    mean = [a.numpy().astype(np.float64) for a in out.values()]
    return [m * len(contributions) for m in mean], contributions
