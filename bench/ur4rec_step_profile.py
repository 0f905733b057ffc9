"""Profile: where a UR4Rec training step goes, per stage objective (cProfile over fixed batches, one thread).

    python bench/ur4rec_step_profile.py --dataset amazon-beauty --data_path dataset
    python bench/ur4rec_step_profile.py --dataset amazon-beauty --config '{"train_batch_size": 256}'

Prints seconds per step of the ``pretrain_retriever`` and ``pretrain_backbone`` stages and the functions taking the
most cumulative time of the retriever steps. Other settings are UR4Rec's defaults and the dataset's.
"""
import argparse
import cProfile
import json
import pstats
import time

from recbole_ur4rec.build import build
from recbole_ur4rec.registry import get_trainer


def timed_steps(trainer, batches):
    """Seconds per training step of the trainer's current stage over ``batches`` (its own epoch loop: learning-rate
    schedule, clipping and logging included)."""
    start = time.perf_counter()
    trainer._train_epoch(batches, 0)
    return (time.perf_counter() - start) / len(batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--config", type=json.loads, default={}, help="JSON settings over the defaults")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    args = parser.parse_args(argv)
    settings = {"threads": 1, "state": "WARNING", "show_progress": False, **args.config}
    if args.data_path:
        settings["data_path"] = args.data_path
    config, model, _, train_data, _, _ = build("UR4Rec", args.dataset, config_dict=settings, log=False)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.steps_per_epoch = len(train_data)
    batches = []
    for batch in train_data:
        batches.append(batch)
        if len(batches) == 2 * args.steps + 3:
            break
    seconds = {}
    for index, stage in reversed(list(enumerate(trainer.stages[:2]))):  # pretrain_retriever first, then the backbone
        trainer._enter_stage(index)
        timed_steps(trainer, batches[:3])  # warm-up
        seconds[stage.name] = timed_steps(trainer, batches[3 : 3 + args.steps])
        if stage.name == "pretrain_retriever":
            profile = cProfile.Profile()
            profile.enable()
            timed_steps(trainer, batches[3 + args.steps :])
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    print(f"train_batch_size {config['train_batch_size']}, {len(train_data)} steps an epoch")
    for name, value in seconds.items():
        print(f"{name}: {value:.3f} s a step")


if __name__ == "__main__":
    main()
