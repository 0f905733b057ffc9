"""Train and evaluate a recbole_ur4rec or RecBole model: RecBole's run_recbole.py flags, plus checkpoints.

    python run_recbole_ur4rec.py -m SASRec -d ml-100k --epochs=5
    python run_recbole_ur4rec.py --resume saved/SASRec-<time>-last.pth
    python run_recbole_ur4rec.py --checkpoint saved/SASRec-<time>.pth [--data_path=dataset]  # moved without its data
    python run_recbole_ur4rec.py -m FastSASRec -d ml-100k --nproc 2                # 2 ranks: gloo on CPU, NCCL on GPUs
"""
import argparse
import sys

from recbole_ur4rec.common.argv import add_distributed_arguments, distributed_arguments, isolated_argv, parse_overrides
from recbole_ur4rec.quick_start import EVALUATION_SETTINGS, evaluate_checkpoint, run_recbole_ur4rec


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default=None, help="model name (default SASRec)")
    parser.add_argument("--dataset", "-d", type=str, default=None, help="dataset name (default ml-100k)")
    parser.add_argument("--config_files", type=str, default=None, help="config files, separated by spaces")
    parser.add_argument("--checkpoint", type=str, default=None, help="evaluate this checkpoint instead of training")
    parser.add_argument("--resume", type=str, default=None, help="continue the run that wrote this checkpoint")
    parser.add_argument("--nosave", action="store_true", help="write no checkpoint (the test split still uses the best-validation weights, kept in memory)")
    add_distributed_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    return args, parse_overrides(parser, unknown)


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.checkpoint:
        if args.nproc != 1 or args.world_size != -1:
            raise SystemExit("--checkpoint evaluates in one process: drop --nproc and --world_size")
        others = sorted(set(overrides) - {"data_path", *EVALUATION_SETTINGS})
        if others:
            raise SystemExit(
                f"--checkpoint evaluates with the settings stored in the checkpoint; drop {others} "
                f"(only --data_path may say where the data lies now, and {', '.join(EVALUATION_SETTINGS)} how to rank)"
            )
        with isolated_argv():
            evaluation = {key: overrides[key] for key in EVALUATION_SETTINGS if key in overrides}
            result = evaluate_checkpoint(args.checkpoint, overrides.get("data_path"), evaluation)
        print(f"valid: {dict(result['valid_result'])}")
        print(f"test: {dict(result['test_result'])}")
        return result
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    model, dataset = args.model, args.dataset
    if args.resume is None:
        model, dataset = model or "SASRec", dataset or "ml-100k"
    with isolated_argv():  # the overrides travel as config_dict (above the config files), not through sys.argv
        result = run_recbole_ur4rec(
            model=model,
            dataset=dataset,
            config_file_list=config_file_list,
            config_dict=overrides or None,
            saved=not args.nosave,
            resume_file=args.resume,
            **distributed_arguments(args),
        )
    if result is None:  # a machine of a distributed run without rank 0: rank 0's machine prints the results
        return None
    print(f"best valid: {dict(result['best_valid_result'] or {})}")
    print(f"test: {dict(result['test_result'] or {})}")
    if result["model_file"]:
        print(f"best model: {result['model_file']}")
    return result


if __name__ == "__main__":
    main()
