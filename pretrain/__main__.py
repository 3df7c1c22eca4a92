"""`pretrain` / `python -m pretrain`: train an objective, or write shards.

pretrain [--config FILE] [section.key=value ...]      train; prints one JSON summary line
pretrain --resume RUN_DIR [section.key=value ...]     continue a run from its last checkpoint
pretrain shards {imagefolder,images,imagelist,captions,demo} ...   write WebDataset shards
pretrain publish RUN_DIR --repo ORG/NAME [--private]  upload the export to the Hugging Face Hub

Rerunning a command with the same train.run_name continues that run from its latest checkpoint.

Exit status: 0 done; 2 bad input (one line on stderr); 3 training diverged (NaN/Inf losses,
one line); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint: run the same command again
to continue (75 is EX_TEMPFAIL, "try again later", which schedulers can requeue on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.errors import ConfigError, UserError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shards"]:
        from pretrain.data.cli import main as shards_main

        return shards_main(argv[1:])
    if argv[:1] == ["publish"]:
        from pretrain.hub import main as publish_main

        return publish_main(argv[1:])

    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Self-supervised pretraining of a timm encoder on WebDataset shards. "
        "Use `pretrain shards --help` to write shards, `pretrain publish --help` to upload an "
        "export to the Hugging Face Hub.",
        epilog="The same command with the same train.run_name continues that run. Exit status: "
        f"0 done, {EXIT_BAD_INPUT} bad input, {EXIT_DIVERGED} diverged (NaN/Inf losses), "
        f"{EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after a checkpoint (run again).",
    )
    parser.add_argument("--config", help="YAML file listing what differs from the defaults")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    # Heavy imports only once the arguments parse.
    from pretrain.checkpoint import NonFiniteWeightsError
    from pretrain.config import load_config
    from pretrain.engine import train
    from pretrain.faults import NonFiniteLossError

    try:
        if args.resume:
            run_config = Path(args.resume) / "config.yaml"
            if not run_config.is_file():
                raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
            if args.config:
                raise ConfigError("--resume uses the run's own config.yaml; drop --config")
            config = load_config(run_config, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        summary = train(config, resume_dir=args.resume)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (NonFiniteLossError, NonFiniteWeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    if summary.get("stopped_by"):
        return EXIT_PREEMPTED
    if summary.get("export"):  # only the main process exports and reports
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
