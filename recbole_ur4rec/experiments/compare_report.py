"""The tables and chart of a comparison (:mod:`recbole_ur4rec.experiments.compare`): ``compare.md`` (mean ± std over seeds,
with the protocol in its header), ``compare.csv``, ``compare_cells.csv`` and ``compare.png``."""
import json
import os
import statistics

from recbole_ur4rec.common.tables import markdown_table, write_csv, write_text


def cell_name(model, seed):
    return f"{model.replace(':', '_')}-seed{seed}"


def shown_path(path):
    """``path`` relative to the working directory when it lies inside it (results hold no machine paths)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, std, digits=4):
    if mean is None:
        return ""
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def summarize(cells, models, seeds):
    """One row per model: mean and std over its finished seeds, and its failures."""
    rows = []
    for model in models:
        mine = [cells[cell_name(model, s)] for s in seeds if cell_name(model, s) in cells]
        ok = [c for c in mine if c.get("status") == "ok"]
        failed = [c for c in mine if c.get("status") != "ok"]
        row = {"model": model, "seeds_ok": len(ok), "seeds_failed": len(failed), "seeds_missing": len(seeds) - len(mine)}
        metrics = []
        for c in ok:
            metrics += [m for m in c["test_result"] if m not in metrics]
        for split in ("test", "valid"):
            for metric in metrics:
                mean, std = _mean_std([c[f"{split}_result"].get(metric) for c in ok])
                row[f"{split} {metric} mean"], row[f"{split} {metric} std"] = mean, std
        for key in ("wall_time_s", "peak_rss_mb", "epochs_trained", "best_epoch"):
            row[f"{key} mean"], row[f"{key} std"] = _mean_std([c.get(key) for c in ok])
        row["num_parameters"] = ok[0]["num_parameters"] if ok else None
        row["errors"] = "; ".join(f"seed {c['seed']}: {c['error'].splitlines()[0]}" for c in failed)
        row["_metrics"] = metrics
        rows.append(row)
    return rows


BUDGET_KEYS = ("epochs", "stopping_step", "stage_epochs")  # training budget: may differ per model, shown per model


def _cell_label(cell):
    """The cell's name in the header's lists (its model alone when it names no seed)."""
    return cell_name(cell["model"], cell["seed"]) if "seed" in cell else cell["model"]


def _budget(protocol, last_stage_only=()):
    """The training budget of a model's cells; ``last_stage_only``: its staged cells written before the epochs were
    counted over all stages (their epochs columns count within the last stage)."""
    if protocol.get("stage_epochs"):
        cap = "staged, at most " + ", ".join(f"{stage} {n}" for stage, n in protocol["stage_epochs"].items()) + " epochs"
        cap += f" (the epochs columns of {', '.join(sorted(last_stage_only))} count within the last stage)" if last_stage_only else " (epochs counted over all stages)"
    else:
        cap = f"at most {protocol['epochs']} epochs"
    return f"{cap}, early stopping after {protocol['stopping_step']} validations without improvement"


def _protocol_header(cells, models, seeds, dataset, files_of, overrides):
    protocols, budgets, unrecorded, last_stage_only = {}, {}, [], {}
    for cell in cells.values():
        # a run of one stage counted the whole run either way
        if len((cell.get("protocol") or {}).get("stage_epochs") or {}) > 1 and not cell.get("epochs_over_stages"):
            last_stage_only.setdefault(cell["model"], []).append(_cell_label(cell))
    for cell in cells.values():
        if cell.get("protocol"):
            evaluation = {k: v for k, v in cell["protocol"].items() if k not in BUDGET_KEYS}
            protocols.setdefault(json.dumps(evaluation, sort_keys=True), set()).add(cell["model"])
            budgets.setdefault(cell["model"], _budget(cell["protocol"], last_stage_only.get(cell["model"], ())))
            if "history_masked" not in evaluation:
                unrecorded.append(_cell_label(cell))
    # cells written before masking was recorded differ from the others only by not saying: named, not a protocol
    masking = {json.loads(key).get("history_masked") for key in protocols} - {None}
    only_unrecorded = bool(unrecorded) and len(masking) == 1 and len({
        json.dumps({k: v for k, v in json.loads(key).items() if k != "history_masked"}, sort_keys=True) for key in protocols
    }) == 1
    if only_unrecorded:
        protocols = {key: users for key, users in protocols.items() if "history_masked" in json.loads(key)}
    lines = [f"# {dataset}: {', '.join(models)} over seeds {', '.join(str(s) for s in seeds)}", ""]
    for key, users in protocols.items():
        p = json.loads(key)
        who = "" if len(protocols) == 1 else f" ({', '.join(sorted(users))})"
        lines.append(
            f"- protocol{who}: split {p['split']}, order {p['order']}, grouped by {p['group_by']}, {p['ranking']} ranking; "
            f"metrics {p['metrics']} @ {p['topk']}; best epoch chosen on validation {p['valid_metric']}"
            + {True: "; each user's training items removed from the ranking (general models; sequential ones with "
                     "mask_sequence_history: their earlier items, at test the validation item too)",
               False: "; training items ranked too (no masking)"}.get(p.get("history_masked"), "")
        )
    if only_unrecorded:
        lines.append(f"- masking not recorded (cells written before it was; the protocol above is the other cells'): {', '.join(sorted(unrecorded))}")
    if len(protocols) > 1:
        lines.append("- WARNING: the models ran under different protocols (above); their numbers are not comparable.")
    for model in models:
        if model in budgets:
            lines.append(f"- {model} training budget: {budgets[model]}")
    versions = {}
    for cell in cells.values():
        code = cell.get("code") or {}
        label = code.get("source") or "not recorded"
        if code.get("commit"):
            label += f" (commit {code['commit'][:10]}{'' if code.get('clean') else ', uncommitted changes'})"
        versions.setdefault(label, []).append(_cell_label(cell))
    if len(versions) == 1:
        lines.append(f"- code version of every cell: {next(iter(versions))}")
    elif versions:
        lines.append("- WARNING: the cells ran different versions of the code: " + "; ".join(
            f"{label}: {', '.join(sorted(names))}" for label, names in versions.items()))
    lines.append(f"- overrides for every cell: {overrides or 'none'}")
    for model in models:
        if files_of.get(model):
            lines.append(f"- {model} config files: {', '.join(shown_path(f) for f in files_of[model])}")
    lines.append(
        "- values: test metrics, mean ± sample std over the finished seeds; wall time per cell (data, training, "
        "test); epochs: trained, best epoch: the one kept, counted from 1 (RecBole's log counts from 0; mean over "
        "seeds; equal to the cap means the model was still improving); peak memory: the cell process's max RSS; "
        "params: values in the model's state_dict"
    )
    return "\n".join(lines) + "\n"


def write_report(cells, output_dir, models, seeds, dataset, files_of, overrides):
    """Write compare.md, compare.csv, compare_cells.csv and compare.png; returns their paths."""
    rows = summarize(cells, models, seeds)
    metrics = []
    for row in rows:
        metrics += [m for m in row["_metrics"] if m not in metrics]
    paths = {name: os.path.join(output_dir, f"compare{suffix}") for name, suffix in
             (("md", ".md"), ("csv", ".csv"), ("cells_csv", "_cells.csv"), ("png", ".png"))}

    valid_metric = next((c["protocol"]["valid_metric"].lower() for c in cells.values() if c.get("protocol")), "ndcg@10")
    slices = [m for m in metrics if m.startswith(valid_metric + "/")]  # the evaluation slices of the valid metric
    metrics = [m for m in metrics if "/" not in m]  # overall metrics; every slice metric is in the CSV files
    md_rows = []
    for row in rows:
        md = {"model": row["model"], "seeds": f"{row['seeds_ok']}/{len(seeds)}"}
        for metric in metrics:
            md[metric] = _fmt(row.get(f"test {metric} mean"), row.get(f"test {metric} std"))
        md[f"valid {valid_metric}"] = _fmt(row.get(f"valid {valid_metric} mean"), row.get(f"valid {valid_metric} std"))
        md["epochs"] = _fmt(row["epochs_trained mean"], None, 1)
        md["best epoch"] = _fmt(row["best_epoch mean"], None, 1)
        md["time (s)"] = _fmt(row["wall_time_s mean"], row["wall_time_s std"], 0)
        md["peak RSS (MB)"] = _fmt(row["peak_rss_mb mean"], None, 0)
        md["params"] = f"{row['num_parameters']:,}" if row["num_parameters"] else ""
        md["status"] = "ok" if not row["seeds_failed"] and not row["seeds_missing"] else (
            (f"failed: {row['errors']}" if row["seeds_failed"] else "") + (f" {row['seeds_missing']} seed(s) not finished" if row["seeds_missing"] else "")
        ).strip()
        md_rows.append(md)
    headers = ["model", "seeds"] + metrics + [f"valid {valid_metric}", "epochs", "best epoch", "time (s)", "peak RSS (MB)", "params", "status"]
    text = _protocol_header(cells, models, seeds, dataset, files_of, overrides) + "\n" + markdown_table(headers, md_rows)
    if slices:
        slice_rows = []
        for row in rows:
            r = {"model": row["model"]}
            for metric in slices:
                group = metric.split("/", 1)[1]
                users = row.get(f"test users/{group} mean")
                r[f"{group}"] = _fmt(row.get(f"test {metric} mean"), row.get(f"test {metric} std"))
                r[f"users {group}"] = _fmt(users, None, 0)
            slice_rows.append(r)
        groups = [m.split("/", 1)[1] for m in slices]
        text += (
            f"\nTest {valid_metric} per slice (recbole_ur4rec/evaluation/slices.py: head = the target is among the slice_head_share (default 20%) most-interacted "
            "training items, tail = the others; short / long = the user's training history at most / above the evaluated "
            "users' median; users = evaluated users in the group, mean over seeds):\n\n"
            + markdown_table(["model"] + groups + [f"users {g}" for g in groups], slice_rows)
        )
    write_text(paths["md"], text)

    csv_headers = []
    for row in rows:
        csv_headers += [h for h in row if h not in csv_headers and not h.startswith("_")]
    write_csv(paths["csv"], csv_headers, rows)

    cell_rows = []
    for name, cell in sorted(cells.items()):
        r = {k: cell.get(k) for k in ("model", "seed", "status", "wall_time_s", "peak_rss_mb", "num_parameters", "epochs_trained", "best_epoch")}
        for split in ("test", "valid"):
            for metric, value in (cell.get(f"{split}_result") or {}).items():
                r[f"{split} {metric}"] = value
        r["error"] = (cell.get("error") or "").splitlines()[0] if cell.get("error") else ""
        cell_rows.append(r)
    cell_headers = []
    for r in cell_rows:
        cell_headers += [h for h in r if h not in cell_headers]
    write_csv(paths["cells_csv"], cell_headers or ["model", "seed", "status"], cell_rows)

    _plot(paths["png"], rows, metrics + slices, dataset, seeds)
    return paths


def _plot(path, rows, metrics, dataset, seeds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["seeds_ok"]]
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.5 * len(metrics) * max(1, len(shown)) / 2 + 2)), 5.0))
    width = 0.8 / max(1, len(shown))
    for i, row in enumerate(shown):
        means = [row.get(f"test {m} mean") or 0.0 for m in metrics]
        stds = [row.get(f"test {m} std") or 0.0 for m in metrics]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=f"{row['model']} (n={row['seeds_ok']})")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=30)
    ax.set_ylabel("test metric (mean ± std over seeds)")
    failed = [row["model"] for row in rows if not row["seeds_ok"]]
    title = f"{dataset}, {len(seeds)} seed(s)" + (f"; no result: {', '.join(failed)}" if failed else "")
    ax.set_title(title)
    if shown:
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
