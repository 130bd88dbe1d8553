"""Run a study's unfinished cells several at once, on one GPU or a large CPU machine, within a deadline.

    python scripts/run_study_parallel.py copy-labeled ../shared/datasets/bsdata carry/bsdata
    python scripts/run_study_parallel.py run configs/benchmark/bsdata_cpu.yaml --out runs/study-gpu --device cuda \
        --jobs 6 --seconds 420 [--cells CELL ...] [--backbones NAME ...] [--collect DIR]

`copy-labeled` copies a LabelMe dataset with a split file (BSData's image_data.json) without what its cells do not
read, for a lent machine that takes a limited upload: the labeled images only (every labeled one, so label budgets
draw the same images as from the original) and LabelMe files without their embedded `imageData` (masks are drawn
from the polygons). Pretraining rows read the unlabeled images too: they do not run from such a copy. The copy
keeps the directory's name, which is how a study's records name the dataset.

Each cell is one `defectscan benchmark STUDY --cell CELL --device D` process with its own `--out` directory
(OUT/cells/CELL), so processes share nothing but the study's `records:` directory, where each writes its own
`CELL.json`: exactly what a serial `defectscan benchmark` writes, checked against the study the same way when the
study resumes. Cells run in the study's order (seed by seed) unless `--cells` names them; cells that already have
a record are skipped, and so are rows that pretrain (their shared pretraining cache is not safe to fill from
several processes at once). Nothing is launched that would end after `--seconds` (by `--job-seconds`, the
expected length of a cell); what still runs `--grace` seconds after it is stopped and leaves no record.

`--collect DIR` packs the records made by this run into DIR/records.tar.gz and the cells' logs into
DIR/logs.tar.gz, for a lent machine whose disk does not outlive the session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def copy_labeled(src: Path, dst: Path) -> int:
    """Copy the labeled images of `src`, their LabelMe files without imageData, and its split file; returns the
    number of images copied."""
    entries = json.loads((src / "image_data.json").read_text(encoding="utf-8"))["images"]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(exist_ok=True)
    n = 0
    for entry in entries:
        if not entry.get("train_test_split") or not entry.get("annotations"):
            continue
        shutil.copy2(src / "images" / entry["filename"], dst / "images" / entry["filename"])
        labelme = json.loads((src / "masks" / entry["annotations"]).read_text(encoding="utf-8"))
        labelme["imageData"] = None
        (dst / "masks" / entry["annotations"]).write_text(json.dumps(labelme), encoding="utf-8")
        n += 1
    shutil.copy2(src / "image_data.json", dst / "image_data.json")
    return n


def _kill(proc: subprocess.Popen) -> None:
    """Stop a cell's whole process group (the benchmark and its DataLoader workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cp = sub.add_parser("copy-labeled", help="the labeled part of a BSData-layout dataset, for a lent machine")
    cp.add_argument("src", type=Path)
    cp.add_argument("dst", type=Path)
    r = sub.add_parser("run", help="run unfinished cells several at once")
    r.add_argument("study", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="auto")
    r.add_argument("--jobs", type=int, default=4, help="cells at once")
    r.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    r.add_argument("--seconds", type=float, default=3600, help="launch nothing expected to end after this")
    r.add_argument("--job-seconds", type=float, default=120, help="expected length of one cell")
    r.add_argument("--grace", type=float, default=60, help="stop what still runs this long after --seconds")
    r.add_argument("--cells", nargs="+", help="these cells, in this order (default: every unfinished one)")
    r.add_argument("--backbones", nargs="+", help="only the cells of these rows")
    r.add_argument("--collect", type=Path, help="pack this run's records and logs here")
    args = ap.parse_args()
    if args.command == "copy-labeled":
        print(f"{copy_labeled(args.src, args.dst)} labeled images copied to {args.dst}")
        return
    sys.exit(run(args, r.error))


def run(args: argparse.Namespace, error) -> int:
    """The `run` command; returns the exit status (1 if a cell failed)."""
    from defectscan.studies.benchmark import load_study

    study = load_study(args.study)
    cells = {c.name: c for c in study.cells()}
    records_dir = study.records
    if records_dir is None:
        error(f"{args.study} keeps no `records:`: its cells' results would stay in --out's cell directories")
    unknown = [name for name in args.cells or [] if name not in cells]
    if unknown:
        error(f"no cells {', '.join(unknown)} in {args.study}")
    asked = [cells[name] for name in args.cells] if args.cells else list(cells.values())
    asked = [c for c in asked if not args.backbones or c.backbone.name in args.backbones]
    pretraining = [c.name for c in asked if c.backbone.pretrain is not None]
    queue = [c for c in asked if c.backbone.pretrain is None and not study.record(c).is_file()]
    records_before = {p.name for p in records_dir.glob("*.json")}

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_file = (args.out / "runner.log").open("a", encoding="utf-8")

    def say(msg: str) -> None:
        line = f"[{time.time() - t0:6.0f} s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    say(f"{len(queue)} cells to run, {args.jobs} at once: {' '.join(c.name for c in queue)}")
    if pretraining:
        say(f"left to `defectscan benchmark` (their rows pretrain first): {' '.join(pretraining)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: list[tuple[str, int, float]] = []
    try:
        while queue or running:
            for name, (proc, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    done.append((name, proc.returncode, time.time() - start))
                    say(f"done {name} rc={proc.returncode} in {time.time() - start:.0f} s")
            while queue and len(running) < args.jobs:
                cell = queue.pop(0)
                left = args.seconds - (time.time() - t0)
                if args.job_seconds > left:
                    say(f"not started {cell.name}: {left:.0f} s left")
                    continue
                cmd = [sys.executable, "-m", "defectscan", "benchmark", str(args.study), "--out",
                       str(args.out / "cells" / cell.name), "--cell", cell.name, "--device", args.device,
                       "--threads", str(args.threads)]
                log = args.out / "cells" / f"{cell.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                running[cell.name] = (subprocess.Popen(f"{shlex.join(cmd)} > {shlex.quote(str(log))} 2>&1", shell=True,
                                                       env=env, start_new_session=True), time.time())
                say(f"start {cell.name}")
            if time.time() - t0 > args.seconds + args.grace:
                for name in list(running):
                    _kill(running.pop(name)[0])
                    say(f"stopped {name} at the deadline (no record)")
                break
            time.sleep(1)
    finally:  # the cells run in their own process groups: an interrupted runner must not leave them running
        for proc, _ in running.values():
            _kill(proc)
    failed = [name for name, rc, _ in done if rc != 0]
    say(f"finished: {len(done) - len(failed)} cells recorded" + (f", failed: {' '.join(failed)}" if failed else ""))
    if args.collect:
        args.collect.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.collect / "records.tar.gz", "w:gz") as tar:
            for path in sorted(records_dir.glob("*.json")):
                if path.name not in records_before:
                    tar.add(path, arcname=path.name)
        with tarfile.open(args.collect / "logs.tar.gz", "w:gz") as tar:
            tar.add(args.out / "runner.log", arcname="runner.log")
            for path in sorted((args.out / "cells").glob("*.log")):
                tar.add(path, arcname=path.name)
    return 1 if failed else 0


if __name__ == "__main__":
    main()
