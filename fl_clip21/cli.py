"""The ``fl-clip21`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fl_clip21.config import ConfigError, keys_help, load_scenario, parse_sets


def _progress(stream=sys.stderr):
    tty = stream.isatty()

    def on_round(name: str, rec: dict[str, Any], rounds: int) -> None:
        k = rec["round"]
        line = (
            f"[{name}] round {k}/{rounds}  loss={rec['loss']:.6g}  "
            f"grad_norm_sq={rec['grad_norm_sq']:.3e}  clipped={rec['clip_fraction']:.2f}"
        )
        if rec.get("rejected"):
            line += f"  rejected={rec['rejected']}"
        if tty:
            stream.write("\r\033[K" + line + ("\n" if k == rounds else ""))
        elif k == rounds or k % max(1, rounds // 10) == 0:
            stream.write(line + "\n")
        stream.flush()

    return on_round


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_scenario(args.scenario, parse_sets(args.set or []))
        from fl_clip21.problems import build_problem

        build_problem(cfg)  # data errors surface here, before anything starts
    except ConfigError as e:
        print(f"fl-clip21: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results") / cfg["name"]
    from fl_clip21.flower.simulation import simulate
    from fl_clip21.report import rounds_to_target, write_outputs

    results = simulate(cfg, on_round=_progress(), verbose=args.verbose)
    write_outputs(out, cfg, results)
    for name, res in results.items():
        recs = res["records"]
        hit = rounds_to_target(recs, cfg["target"])
        print(
            f"{name:>16}: final loss {recs[-1]['loss']:.6g}, grad_norm_sq {recs[-1]['grad_norm_sq']:.3e}, "
            f"rounds to {cfg['target']:g}: {hit if hit is not None else 'not reached'}"
        )
    print(f"wrote {out}/metrics.json, config.json, convergence.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-clip21", description="Clip21 and its baselines on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run every algorithm of a scenario on Flower's simulation engine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenario keys (--set KEY=VALUE):\n" + keys_help(),
    )
    run.add_argument("scenario", help="scenario TOML file (see scenarios/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    run.add_argument("--out", help="output folder (default: results/<scenario name>)")
    run.add_argument("--verbose", action="store_true", help="show Flower's logs")
    args = parser.parse_args(argv)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
