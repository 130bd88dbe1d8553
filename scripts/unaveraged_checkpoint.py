"""Write the raw (not averaged) last weights of a `training.ema` run as a checkpoint beside its own.

Weight averaging draws no random numbers, so a run's raw weights are those of the same run without it: scoring
both checkpoints of one run on the same images measures what the average did, paired, at the cost of one
training run instead of two. The raw checkpoint gets the threshold training would have chosen for it from
`calibrate` on the run's validation images, starting from model.threshold (calibrate's default rule, stable_f1,
is training's default `validation.threshold`; pass `--rule` where the run used another):

    python scripts/unaveraged_checkpoint.py RUN                    # writes RUN/raw.safetensors + RUN/raw.json
    defectscan calibrate -m RUN/raw.safetensors -d DATA            # --split val: the run's validation images
    defectscan evaluate -m RUN/raw.safetensors -d DATA --split test

Only for runs that keep their last epoch (what `train` does with fewer than 10 validation images), whose best
checkpoint is that same epoch's average.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from defectscan.errors import DefectscanError
from defectscan.models import load_checkpoint, save_checkpoint
from defectscan.training import RunDir


def write_unaveraged(run_path: Path, name: str = "raw") -> Path:
    """The run's raw last weights as `<run>/<name>.safetensors`; the threshold reset to model.threshold."""
    run = RunDir(run_path)
    state = run.load_state()
    if "averaged" not in state:
        raise DefectscanError(f"{run_path}: the run did not average its weights (training.ema off): its "
                              "checkpoints already hold the raw weights")
    model, spec, meta = load_checkpoint(run.checkpoint("last"))
    model.load_state_dict(state["model"])
    spec = dataclasses.replace(spec, threshold=run.read_config().model.threshold)
    extra = {k: v for k, v in meta.get("extra", {}).items() if k not in ("threshold", "validation_scores")}
    extra["weights"] = "raw: the last epoch's weights without training.ema's average"
    return save_checkpoint(model, spec, run.path / name, extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training run directory (trained with training.ema)")
    parser.add_argument("--name", default="raw", help="checkpoint stem inside the run directory")
    args = parser.parse_args(argv)
    try:
        print(write_unaveraged(args.run, args.name))
    except DefectscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
