"""One training process of tests/test_distributed.py (run as a script, CPU only).

    python dist_worker.py --data D --out O --atlas A.npz --steps N (--cluster H:P,H:P --task-index I
        | --local-replicas R) [--per-replica-batch B]

Trains the tiny test config (tests/test_model.py TINY) with :func:`inference.train.train`; prints
one line and exits 2 on a HipAtlas error, as the ``hipatlas`` command does.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--atlas", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--cluster")
    parser.add_argument("--task-index", type=int)
    parser.add_argument("--local-replicas", type=int, default=1)
    parser.add_argument("--per-replica-batch", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--graph", action="store_true", help="trace the step (default: eager, no tracing)")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import numpy as np
    import tensorflow as tf

    from inference import distributed
    from inference import train as T
    from inference.errors import HipAtlasError
    from test_model import TINY

    tf.config.threading.set_intra_op_parallelism_threads(1)
    if args.cluster:
        strategy, _ = distributed.make_strategy(distributed.parse_cluster(args.cluster, args.task_index))
    elif args.local_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.local_replicas)
        strategy, _ = distributed.make_strategy(devices=[f"/cpu:{i}" for i in range(args.local_replicas)])
    else:
        strategy = None
    with np.load(args.atlas) as data:
        atlas = {"volume": data["volume"], "labels": data["labels"]}
    settings = T.TrainConfig(steps=args.steps, learning_rate=1e-3, seed=5, checkpoint_every=args.checkpoint_every,
                             validate_every=args.checkpoint_every, val_limit=1, log_every=1,
                             run_eagerly=not args.graph)
    try:
        result = T.train(TINY, args.data, args.out, train_config=settings, atlas=atlas, strategy=strategy,
                         per_replica_batch=args.per_replica_batch)
    except HipAtlasError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"steps": result.steps_done, "resumed_from_step": result.resumed_from_step,
                      "batch_size": json.loads((pathlib.Path(args.out) / "run.json").read_text())
                      ["train_config"]["batch_size"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
