"""Compare models x seeds on one dataset and one protocol: markdown + CSV table and a bar chart.

    python run_compare.py --models SASRec,GRU4Rec,BERT4Rec,FEARec --dataset ml-100k --seeds 3
    python run_compare.py --models SASRec,UR4Rec -d ml-100k --seeds 3 --model_config UR4Rec=my_ur4rec.yaml --epochs 30

Writes <output_dir>/compare.md, compare.csv (mean and std of every metric, time, memory, parameters per model),
compare_cells.csv (one row per model and seed), compare.png and cells/ (one JSON result and log per cell).
Every cell runs in its own process; a failed cell is reported and the others go on; finished cells are reused
when the command is run again with the same settings (failed and changed cells are rerun). --nproc etc. run each
cell distributed, as run_recbole_ur4rec.py does (docs/distributed.md).
A model may be listed as Model:variant (e.g. UR4Rec:hierarchical, with --model_config UR4Rec:hierarchical=FILE)
to run it again with other config files under its own name. Config files of a model, lowest first: --config_files (every model), then --model_config MODEL=FILE[,FILE]
or else <config_dir>/<MODEL>.yaml when --config_dir is given; then --epochs and --extra / --key=value settings.
"""
import argparse
import logging
import sys

from recbole_ur4rec.common.argv import add_distributed_arguments, distributed_arguments, parse_overrides
from recbole_ur4rec.experiments.compare import DEFAULT_MODELS, parse_seeds, run_compare


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names, or Model:variant labels")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--seeds", default="3", help="number of seeds (2020, 2021, ...) or a comma-separated list")
    parser.add_argument("--config_files", default=None, help="config files for every model, separated by spaces")
    parser.add_argument("--model_config", action="append", default=[], metavar="MODEL=FILE[,FILE]",
                        help="a model's own config files (repeatable)")
    parser.add_argument("--config_dir", default=None, help="use <config_dir>/<MODEL>.yaml as a model's own config when present")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap for every cell (RecBole's epochs)")
    parser.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE", help="a setting for every cell (repeatable)")
    parser.add_argument("--output_dir", default=None, help="default results/<dataset>")
    parser.add_argument("--report_only", action="store_true", help="run nothing: write the tables from the finished cells")
    parser.add_argument("--reuse_other_code", action="store_true",
                        help="reuse finished cells that ran another version of the package (default: rerun them)")
    add_distributed_arguments(parser)  # each cell's ranks
    args, unknown = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, unknown, extra=args.extra)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    model_configs = {}
    for item in args.model_config:
        model, _, files = item.partition("=")
        if not files:
            parser.error(f"--model_config {item!r}: expected MODEL=FILE[,FILE]")
        model_configs[model.strip()] = [f for f in files.split(",") if f]
    return args, overrides, model_configs


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the comparison's progress lines
    args, overrides, model_configs = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run_compare(
            models=[m.strip() for m in args.models.split(",") if m.strip()],
            dataset=args.dataset,
            seeds=parse_seeds(args.seeds),
            config_files=args.config_files.split() if args.config_files else None,
            model_configs=model_configs,
            config_dir=args.config_dir,
            overrides=overrides,
            output_dir=args.output_dir,
            report_only=args.report_only,
            reuse_other_code=args.reuse_other_code,
            distributed=distributed_arguments(args),
        )
    except KeyboardInterrupt:
        print("interrupted: finished cells and the table are kept; run the same command again to continue")
        sys.exit(130)
    print(f"ran {len(result['ran'])} cell(s), reused {len(result['reused'])}")
    with open(result["md"], encoding="utf-8") as f:
        print(f.read())
    print(f"table: {result['md']} ({result['csv']}); chart: {result['png']}")
    return result


if __name__ == "__main__":
    main()
