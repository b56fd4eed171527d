"""The `alpagasus` command: one subcommand per stage.

    alpagasus rate --config configs/rate_openai.yaml rate.concurrency=64 [--dry-run]
    alpagasus rate --config configs/rate_openai_batch.yaml [--detach | --cancel]
    alpagasus rate --config configs/pilot_chatgpt_vs_claude.yaml --pilot 500
    alpagasus filter --config configs/filter_alpagasus_9k.yaml [--compare OTHER.json]
    alpagasus train --config configs/train_llama_7b.yaml
    alpagasus generate --config FILE generate.model=runs/x/model
    alpagasus judge --config FILE judge.candidate=alpagasus-9k judge.baseline=alpaca-52k
    alpagasus report --config FILE
    alpagasus run --config configs/paper_alpagasus_9k.yaml [--from STAGE | --only STAGE]
    alpagasus demo [--run-dir runs/demo]

Every subcommand takes `--config FILE` and `dotted.key=value` overrides. Exit code 0 means the
stage finished (for rate: every row has a final status); 2 means bad config or input, with the
reason on stderr and nothing sent; 3 (rate --detach) means batches are still running; 4 means the
stage stopped at its spending cap (`max_cost_usd`), what came back saved: raise the cap and rerun.
"""

from __future__ import annotations

import argparse
import json
import sys

from alpagasus_ray import console
from alpagasus_ray.config import load_config
from alpagasus_ray.errors import EXIT_CAP_REACHED, CapReached, user_error
from alpagasus_ray.store.layout import RunDir, trained_model_dir

RUNNING = 3  # exit code of `rate --detach` while batches run


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags such as --dry-run: argparse leaves the later ones over.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    console.setup(args.verbose)
    try:
        return args.func(args)
    except CapReached as e:  # not an error: what came back is saved, and a rerun with a higher cap goes on
        print(f"alpagasus {args.command}: stopped at the spending cap: {e}", file=sys.stderr)
        return EXIT_CAP_REACHED
    except Exception as e:
        error = user_error(e)  # the user's to fix; anything else is a bug, with its traceback
        if error is None:
            raise
        print(f"alpagasus {args.command}: error: {error}", file=sys.stderr)
        console.drop_logs_of_failed_start()
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpagasus", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rate = _stage(sub, "rate", _rate,
                  "score every row with an LLM grader (vLLM or an OpenAI-compatible API)",
                  "Score every (instruction, input, response) row 0-5 with the AlpaGasus grader prompt. "
                  "Writes <run_dir>/rated/ (Parquet) and <run_dir>/rated_summary.json; rerun to resume.")
    sending = rate.add_mutually_exclusive_group()
    sending.add_argument("--dry-run", action="store_true", help="count rows and estimate tokens and cost; send nothing")
    sending.add_argument("--detach", action="store_true",
                         help="batch backends: exit once every request file is sent (exit code 3 while batches run); "
                         "rerun the same command to collect")
    sending.add_argument("--cancel", action="store_true",
                         help="batch backends: cancel the run's batches and keep what they had answered")
    sending.add_argument("--pilot", nargs="?", type=int, const=0, default=None, metavar="N",
                         help="rate a random sample of N rows (default pilot.size, 500) with the rate grader and each "
                         "of pilot.graders, and compare them in <run_dir>/pilot/pilot.md; a full rating with one of "
                         "them takes its ratings as they are")
    filt = _stage(sub, "filter", _filter,
                  "select the training rows from the ratings (threshold, top-k, random-k, subsample, balanced)",
                  "Select rows from <run_dir>/rated/ and write <run_dir>/selected.json, selected.jsonl, "
                  "selection.json and plots/*.png. Only rows rated ok are selected.")
    filt.add_argument("--compare", metavar="OTHER.json", help="report overlap with another selection of the same data")
    _stage(sub, "train", _train,
           "fine-tune on the selected rows with Ray Train + DeepSpeed (the Alpaca recipe)",
           "Fine-tune train.model on train.data (default <run_dir>/selected.json); writes <run_dir>/model/. "
           "Rerun the same command to resume from the last checkpoint.")
    _stage(sub, "generate", _generate,
           "answer the test sets (Koala, Vicuna, WizardLM, Self-Instruct) with a model, greedily",
           "Answer every prompt of generate.test_sets with generate.model (default <run_dir>/model) on vLLM "
           "engines, or an API model; writes <run_dir>/answers/<name>/<test_set>.jsonl. Rerun to resume.")
    _stage(sub, "judge", _judge,
           "compare two models' answers with an LLM judge, in both orders",
           "Ask the judge about every prompt answered by judge.candidate and judge.baseline, candidate first "
           "and then second; writes <run_dir>/judgments/<candidate>_vs_<baseline>/<test_set>.jsonl. Rerun to resume.")
    _stage(sub, "report", _report,
           "win/tie/lose, winning score, categories and plots of every judged pair",
           "Writes <run_dir>/report.json, report.md and plots/*.png from <run_dir>/judgments/.")

    run = _stage(sub, "run", _run,
                 "the whole method: rate -> filter -> train -> generate -> judge -> report",
                 "Run every stage into one run directory. A stage whose settings and inputs are unchanged since "
                 "it last finished is skipped; a changed one runs again with every stage after it.")
    control = run.add_mutually_exclusive_group()
    control.add_argument("--from", dest="first", metavar="STAGE", help="start at this stage (earlier ones already ran)")
    control.add_argument("--only", metavar="STAGE", help="run this stage alone, even if unchanged")

    demo = sub.add_parser(
        "demo",
        help="the whole method on the bundled sample with a tiny local model on CPU (no GPU, key or network)",
        description="Builds a tiny model locally (a smoke-scale stand-in whose scores carry no meaning) and runs "
        "every stage on the bundled Alpaca sample on CPU: rate, filter, train, generate, judge, report.",
    )
    demo.add_argument("--chat", action="store_true",
                      help="the conversation sample instead: each assistant turn rated in its context, the kept "
                      "conversations trained with the chat template (demo_chat.yaml)")
    demo.add_argument("--run-dir", default=None, help="where to write (default: runs/demo, or runs/demo-chat)")
    demo.add_argument("--verbose", action="store_true", help="show every library's and worker's messages")
    demo.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    demo.set_defaults(func=_demo)
    return parser


def _load(args, overrides: list[str] | None = None, logs: bool = True):
    """The command's config; its logs go under the run directory from here on (console.py),
    unless `logs` is false (a dry run writes nothing there)."""
    config = load_config(args.config, args.overrides if overrides is None else overrides)
    if logs:
        console.log_to(config.run_dir)
    return config


def _stage(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A stage subcommand: `--config FILE` plus `dotted.key=value` overrides."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--verbose", action="store_true", help="show every library's and worker's messages")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, e.g. rate.concurrency=64")
    parser.set_defaults(func=func)
    return parser


def _rate(args) -> int:
    from alpagasus_ray.stages.rate import run_rate

    config = _load(args, logs=not args.dry_run)
    if args.pilot is not None:
        from alpagasus_ray.stages.pilot import run_pilot

        run_pilot(config, args.pilot or None)
        print(RunDir(config.run_dir).pilot("pilot.md"))
        return 0
    summary = run_rate(config, dry_run=args.dry_run, detach=args.detach, cancel=args.cancel)
    if args.dry_run or args.cancel:
        print(json.dumps(summary, indent=2))
        return 0
    if "running_batches" in summary:
        running = summary["running_batches"]
        print(f"{len(running)} batches still running ({sum(r['rows'] for r in running):,} rows): "
              "rerun the same command to collect them")
        return RUNNING
    print(json.dumps(summary["by_status"]))
    print(RunDir(config.run_dir).rated_summary)
    return 0


def _filter(args) -> int:
    from alpagasus_ray.stages.filter import run_filter

    overrides = [*args.overrides, *([f"filter.compare={args.compare}"] if args.compare else [])]
    config = _load(args, overrides)
    record = run_filter(config)
    print(f"selected {record['selected']:,} of {record['pool']:,} ok rows ({record['mode']})")
    print(RunDir(config.run_dir).selection)
    return 0


def _train(args) -> int:
    from alpagasus_ray.stages.train import run_train

    config = _load(args)
    metrics = run_train(config)
    print(f"trained {metrics.get('step')} steps, final loss {metrics.get('loss', float('nan')):.4f}")
    print(trained_model_dir(config.run_dir, config.train.model_dir))
    return 0


def _generate(args) -> int:
    from alpagasus_ray.stages.generate import run_generate

    config = _load(args)
    for record in run_generate(config):
        print(f"answered {record['prompts']} prompts as {record['name']}: {record['by_finish_reason']}")
    print(RunDir(config.run_dir).answers())
    return 0


def _judge(args) -> int:
    from alpagasus_ray.stages.judge import pair_name, run_judge

    config = _load(args)
    record = run_judge(config)
    print(f"judgments by status: {record['judgments_by_status']}")
    print(RunDir(config.run_dir).judgments(pair_name(record["candidate"], record["baseline"])))
    return 0


def _report(args) -> int:
    from alpagasus_ray.stages.report import ALL, run_report

    config = _load(args)
    report = run_report(config)
    for pair, entry in report.items():
        t = entry[ALL]
        print(f"{pair}: win {t['win']} / tie {t['tie']} / lose {t['lose']}, winning score {t['winning_score']:.4f}")
    print(RunDir(config.run_dir).report_md)
    return 0


def _run(args) -> int:
    from alpagasus_ray.pipeline import StageFailed, run_pipeline

    config = _load(args)
    try:
        results = run_pipeline(config, first=args.first, only=args.only)
    except StageFailed as e:
        print(f"alpagasus run: {e}", file=sys.stderr)
        return 1
    report = results.get("report", {}).get("summary", {}).get("report")
    print(report or config.run_dir)
    return 0


def _demo(args) -> int:
    from alpagasus_ray.demo import run_demo

    run_dir = args.run_dir or ("runs/demo-chat" if args.chat else "runs/demo")
    console.log_to(run_dir)
    print(run_demo(run_dir, args.overrides, chat=args.chat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
