"""Ray Tune search over a recbole_ur4rec or RecBole model, with ASHA on the validation metric.

    python run_hyper.py --model SASRec --dataset ml-100k --params_file hyper/sasrec.hyper --num_samples 8
    python run_hyper.py --model SASRec --dataset ml-100k --params_file hyper/sasrec.hyper --grid --epochs=20

Every trial reports its validation score after every epoch; ASHA stops poor trials early; the best trial
(on validation) is evaluated on the test split. Writes <output_dir>/results.md and results.csv (one row per
trial, rewritten as trials report), best.yaml (use it with run_recbole_ur4rec.py --config_files best.yaml),
ray/ (Ray's trial folders) and checkpoints/<trial_id>/. Other --key=value arguments are RecBole settings
shared by every trial (e.g. --epochs=20 --train_batch_size=512).
"""
import argparse
import sys

from recbole_ur4rec.common.argv import parse_overrides
from recbole_ur4rec.experiments.tuning import run_search


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="SASRec", help="model name (plugin first, then RecBole)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", default=None, help="config files shared by every trial, separated by spaces")
    parser.add_argument("--params_file", required=True, help="search space: RecBole hyper format or .yaml")
    parser.add_argument("--num_samples", type=int, default=1, help="samples of the space (with --grid: grid repetitions)")
    parser.add_argument("--grid", action="store_true", help="try every 'choice' value (grid search) instead of sampling")
    parser.add_argument("--cpus_per_trial", type=float, default=1, help="CPUs Ray reserves per trial (also torch threads)")
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="GPUs Ray reserves per trial")
    parser.add_argument("--max_concurrent", type=int, default=None, help="trials running at once (default: as resources allow)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto or host:6379) instead of a local Ray")
    parser.add_argument("--output_dir", default=None, help="default results/hyper/<dataset>/<model>")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler and of every trial")
    parser.add_argument("--grace_period", type=int, default=None, help="ASHA: validations before a trial may be stopped (default: max(1, epochs/10))")
    parser.add_argument("--reduction_factor", type=float, default=2, help="ASHA: keep 1/reduction_factor of the trials per rung")
    parser.add_argument("--include_defaults", action="store_true", help="the first trial runs the searched keys' default values (one of the samples)")
    args, unknown = parser.parse_known_args(argv)
    return args, parse_overrides(parser, unknown)


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    result = run_search(
        model=args.model,
        dataset=args.dataset,
        params_file=args.params_file,
        config_file_list=args.config_files.split() if args.config_files else None,
        config_dict=overrides,
        output_dir=args.output_dir,
        num_samples=args.num_samples,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        address=args.address,
        seed=args.seed,
        grid=args.grid,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        include_defaults=args.include_defaults,
    )
    best = result["best"]
    print(f"results: {result['results_md']}")
    if best is None:
        print("no trial reported a validation score")
        return result
    print(f"best trial {best['trial']}: {best['params']}")
    print(f"best valid: {best.get('valid_result')}")
    print(f"test (best trial only): {best.get('test_result')}")
    print(f"best config: {result['best_yaml']}")
    return result


if __name__ == "__main__":
    main()
