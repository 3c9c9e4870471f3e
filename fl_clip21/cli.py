"""The ``fl-clip21`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fl_clip21 import kernels, outputs
from fl_clip21.algorithms import ALGORITHMS
from fl_clip21.calibrate import PROBE_ROUNDS
from fl_clip21.config import ConfigError, check_work, expand_runs, keys_help, load_scenario, parse_sets, resolve
from fl_clip21.flower.stop import RunStopped, StopNow
from fl_clip21.outputs import CHECKPOINT

# fl-clip21 bench --engines: logreg (clients, d) points
ENGINE_POINTS = [(n, d) for n in (10, 100, 1000, 10000) for d in (31, 1001, 10001)]


def _progress(stream=sys.stderr):
    from fl_clip21.report import progress_due, progress_line

    tty = stream.isatty()

    def on_round(name: str, rec: dict[str, Any], rounds: int) -> None:
        k = rec["round"]
        line = progress_line(name, rec, rounds)
        if tty:
            stream.write("\r\033[K" + line + ("\n" if k == rounds else ""))
        elif progress_due(k, rounds):
            stream.write(line + "\n")
        stream.flush()

    return on_round


def _load_resume(folder: Path) -> dict:
    """The resolved scenario an interrupted run saved in ``folder``."""
    if not folder.is_dir():
        raise ConfigError(f"--resume: folder {str(folder)!r} does not exist")
    saved = folder / CHECKPOINT / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume: {str(folder)!r} holds no interrupted run (no {CHECKPOINT}/config.json)")
    try:
        cfg = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {str(saved)!r} cannot be read ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--resume: {str(saved)!r} holds no scenario, got {type(cfg).__name__}")
    try:  # the same rules as a scenario file: an edited config.json gets no shortcut
        return resolve({k: v for k, v in cfg.items() if v is not None})
    except ConfigError as e:
        raise ConfigError(f"--resume: {str(saved)!r}: {e}") from None


def _check_resume(ckpt_root: Path, runs: list[dict]) -> None:
    """Every checkpoint the runs will resume from is intact and was made with the run's configuration.

    Checked here, before the simulation starts, so that a corrupted or edited
    checkpoint, or a corrupted copies file beside it, is an error naming the
    file and what is wrong (and the key, with both values), and no Flower
    simulation starts only to stop at its first round.
    """
    from fl_clip21 import checkpoint
    from fl_clip21.algorithms import algorithm_from_config
    from fl_clip21.copies import CopiesError
    from fl_clip21.flower import saved_state

    for j, cfg in enumerate(runs):
        for name in cfg["algorithms"]:
            path = ckpt_root / f"run-{j}" / f"{name}.npz"
            if not path.exists():
                continue
            what = f"--resume: checkpoint {str(path)!r}"
            try:
                arrays, meta = checkpoint.load(path)
                if meta.get("config"):
                    checkpoint.compare_config(meta["config"], cfg, what)
                if "hyper" in meta and name in ALGORITHMS:
                    checkpoint.compare_config(
                        {"hyper": meta["hyper"]}, {"hyper": dict(algorithm_from_config(name, cfg).hyper)}, what
                    )
                # and the copies of the clients' memories it refers to (header, every slot), changing nothing
                saved_state.check_copies(path, arrays, meta)
            except (OSError, ValueError, CopiesError) as e:
                raise ConfigError(str(e) if str(e).startswith("--resume") else f"--resume: {e}") from None


def _resume_line(runs: list[dict], results: list[dict]) -> str:
    """``resumed: gd after round 60 of 60, clip21-gd after round 17 of 60`` (one entry per run and algorithm)."""
    parts = []
    for cfg, res in zip(runs, results):
        eps = cfg.get("target-epsilon")
        grid = f" (epsilon {eps[0]:g}, seed {cfg['seed']})" if eps else f" (seed {cfg['seed']})"
        grid = grid if len(runs) > 1 else ""
        for name, r in res.items():
            parts.append(f"{name}{grid} after round {r.get('resumed_from_round', 0)} of {cfg['rounds']}")
    return "resumed: " + ", ".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    """``fl-clip21 run``: check the scenario and the output folder, run, write the outputs."""
    if args.ray_address and args.engine != "flower":
        raise ConfigError(f"--ray-address works with --engine flower, got --engine {args.engine}")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out must name a folder, got ''")
    if args.resume:
        if args.engine != "flower":
            raise ConfigError(f"--resume works with --engine flower, got --engine {args.engine}")
        if args.scenario or args.set:
            raise ConfigError("--resume takes the scenario and keys of the interrupted run: give no SCENARIO or --set")
        if args.out is not None:
            raise ConfigError("--resume writes into the folder of the interrupted run: give no --out")
        if args.overwrite:
            raise ConfigError("--resume continues the run in its folder, --overwrite discards it: give one of them")
        cfg = _load_resume(Path(args.resume))
    elif not args.scenario:
        raise ConfigError("run needs a SCENARIO file (or --resume DIR)")
    else:
        cfg = load_scenario(args.scenario, parse_sets(args.set or []))
    from fl_clip21.problems import build_problem

    # data errors surface here, before anything starts, and a run that would take days
    check_work(cfg, build_problem(cfg).layout.size)
    flower = args.engine == "flower"
    if flower:
        from fl_clip21.flower.simulation import backend_config, check_cluster_fits

        # and resources the machine or cluster cannot give, before the simulation starts
        check_cluster_fits(backend_config(cfg, args.ray_address))
    try:
        runs = expand_runs(cfg)
        from fl_clip21.engine import check_flower, check_vectorized

        if flower:
            check_flower(cfg)
        else:
            check_vectorized(cfg)
    except ValueError as e:  # ConfigError, or an epsilon the accountant cannot reach
        raise ConfigError(str(e)) from None
    from fl_clip21.report import output_paths, summary_markdown, write_outputs

    target = args.resume or args.out
    output = outputs.claim(
        Path(target) if target else None, name=cfg["name"], planned=output_paths(runs), overwrite=args.overwrite,
        resume=bool(args.resume), checkpoint=flower,
        wording=outputs.Wording(param="--resume" if args.resume else "--out"),
    )
    with output:
        if flower:
            from fl_clip21.flower.simulation import simulate

            ckpt_root = output.folder / CHECKPOINT
            if args.resume:
                _check_resume(ckpt_root, runs)
            else:
                ckpt_root.mkdir()
                (ckpt_root / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
            dirs = [ckpt_root / f"run-{j}" for j in range(len(runs))]
            kept = f"the checkpoint is kept: continue with fl-clip21 run --resume {output.shown}"
            try:
                results = simulate(
                    runs, on_round=_progress(), verbose=args.verbose, checkpoint_dirs=dirs, ray_address=args.ray_address
                )
            except (RunStopped, StopNow) as e:  # a signal: one line, from main()
                raise type(e)(e.signum, kept) from None
            except BaseException:
                print(f"fl-clip21: {kept}", file=sys.stderr)
                raise
        else:
            from fl_clip21.engine import run_vectorized

            results = [run_vectorized(c, on_round=_progress()) for c in runs]
        if args.resume:
            print(_resume_line(runs, results), file=sys.stderr)
        rows = output.write(lambda folder: write_outputs(folder, list(zip(runs, results))))
        written = output.commit()
    print(summary_markdown(rows, cfg["name"], cfg["target"], bool(cfg.get("secure-noise", False))))
    print(output.wrote(written))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from fl_clip21.tune import cmd_tune

    return cmd_tune(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``fl-clip21 calibrate``: print the update-norm quantiles and the tau they suggest."""
    from fl_clip21.calibrate import calibrate, report

    cfg = load_scenario(args.scenario, parse_sets(args.set or []))
    print(report(calibrate(cfg, args.rounds, args.quantile), cfg, args.quantile))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{what} must be >= 1, got {text!r}")
    return values


def cmd_bench_engines(args: argparse.Namespace) -> int:
    """``fl-clip21 bench --engines``: the batched engine's figures (fl_clip21.bench_engines)."""
    from fl_clip21.bench_engines import markdown, run_engine_bench

    points = []
    for item in [p for p in args.points.split(",") if p.strip()]:
        n, sep, d = item.strip().partition("x")
        if not sep:
            raise ConfigError(f"--points takes CLIENTSxD items, got {item!r}")
        points.append(tuple(_int_list(f"{n},{d}", f"--points {item!r}")))
    mlp = _int_list(args.mlp_clients, "--mlp-clients")
    if args.rounds < 2 or args.repeats < 1:
        raise ConfigError(f"--rounds must be >= 2 and --repeats >= 1, got {args.rounds!r}, {args.repeats!r}")
    if args.device:
        from fl_clip21.bench_engines import bench_device

        bench_device(args.device)  # a GPU asked for and missing is refused before anything runs
    staged = outputs.stage_file(args.out, overwrite=args.overwrite)
    try:
        result = run_engine_bench(points, mlp, args.rounds, args.repeats, sweep=not args.no_sweep, device=args.device)
        staged.tmp.write_text(json.dumps(result, indent=1))
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    print(markdown(result["results"]))
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.engines:
        return cmd_bench_engines(args)
    if args.device:
        raise ConfigError(f"--device works with --engines, got --device {args.device} without it")
    from fl_clip21.bench import DEFAULT_SCENARIO, MEMORY_SCENARIO, run_bench

    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        print(f"fl-clip21: error: --clients must be integers, got {args.clients!r}", file=sys.stderr)
        return 2
    if not clients or min(clients) < 1 or args.rounds < 1 or args.repeats < 1:
        print(
            f"fl-clip21: error: --clients, --rounds and --repeats must be >= 1, got "
            f"{args.clients!r}, {args.rounds!r}, {args.repeats!r}",
            file=sys.stderr,
        )
        return 2
    if args.soak_rounds != 0 and args.soak_rounds < 5:
        print(f"fl-clip21: error: --soak-rounds must be 0 or >= 5, got {args.soak_rounds!r}", file=sys.stderr)
        return 2
    scenario = Path(args.scenario) if args.scenario else DEFAULT_SCENARIO
    memory = None if args.no_memory else Path(args.memory_scenario or MEMORY_SCENARIO)
    for path in (scenario, memory):
        if path is not None and not path.is_file():
            print(f"fl-clip21: error: scenario file not found: {str(path)!r}", file=sys.stderr)
            return 2
    staged = outputs.stage_file(args.out, overwrite=args.overwrite)
    try:
        run_bench(clients, args.rounds, args.repeats, scenario, staged.tmp, args.soak_rounds, memory)
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    print(f"wrote {args.out}")
    return 0


DEBUG_HELP = "show the traceback of an error"
HELP_HELP = "show this help and exit; after a SCENARIO, the keys below show that scenario's values"
KEYS_TITLE = "scenario keys (--set KEY=VALUE):\n"
OVERWRITE_HELP = (
    "write into a non-empty --out, replacing the outputs an earlier fl-clip21 run wrote there "
    "(as its manifest records them) and leaving every other file alone"
)


def _help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Print ``parser``'s help and exit 0; given a SCENARIO, its keys show the scenario's values (and --set's).

    A scenario that cannot be resolved is a :class:`ConfigError`, as it would be for the run.
    """
    if args.scenario:
        cfg = load_scenario(args.scenario, parse_sets(args.set or []))
        given = f"{args.scenario}{' with --set' if args.set else ''}"
        parser.epilog = (
            f"scenario keys (--set KEY=VALUE) as {given} resolves them; "
            "* marks a value that differs from the built-in default:\n" + keys_help(cfg)
        )
    parser.print_help()
    parser.exit()


def main(argv: list[str] | None = None) -> int:
    """``fl-clip21``: exit 0 when done, 2 on bad input (one line, no traceback), 1 on anything else."""
    parser = argparse.ArgumentParser(prog="fl-clip21", description="Clip21 and its baselines on Flower.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # Also after the command; SUPPRESS keeps the subcommand from resetting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    # -h is ours in run and sweep: it reads the SCENARIO given with it, which argparse's own -h cannot.
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run every algorithm of a scenario on Flower's simulation engine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=KEYS_TITLE + keys_help(), add_help=False,
    )
    run.add_argument("-h", "--help", action="store_true", help=HELP_HELP)
    run.add_argument("scenario", nargs="?", help="scenario TOML file (see scenarios/)")
    run.add_argument(
        "--resume", metavar="DIR",
        help="continue the interrupted run whose output folder is DIR (flower engine)",
    )
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    run.add_argument(
        "--out", help="output folder, new or empty (default: a new folder results/<scenario name>, else "
        "results/<scenario name>-2, -3, ...)",
    )
    run.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    run.add_argument("--verbose", action="store_true", help="show Flower's logs")
    run.add_argument(
        "--engine", choices=("flower", "vectorized"), default="flower",
        help="flower: Flower's simulation engine (default); vectorized: in-process, batched gradients, "
        "same results (not for Flower's own strategies, flower-dp-*: their batched twins are dp-fedavg and "
        "dp-fedavg-adaptive)",
    )
    run.add_argument(
        "--ray-address", metavar="ADDR",
        help="run the simulated clients on the existing Ray cluster at ADDR (host:port of its head, "
        "e.g. 10.0.0.5:6379; default: $RAY_ADDRESS if set, else a new local Ray instance; "
        "'local' forces a new local instance)",
    )
    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="the Flower engine's cost: clip21-gd vs Flower's FedAvg in one simulation, bytes, memory, "
        "and the vectorized engine's speed-up (about 25 minutes with the defaults)",
    )
    bench.add_argument("--clients", default="10,100,1000", help="client counts, comma-separated")
    bench.add_argument("--rounds", type=int, default=5, help="timed rounds per repeat")
    bench.add_argument("--repeats", type=int, default=2, help="alternating repeats (median is reported)")
    bench.add_argument("--scenario", help="scenario file (default: scenarios/bench/logreg-nonconvex.toml)")
    bench.add_argument(
        "--soak-rounds", type=int, default=50,
        help="a run of this many clip21-gd rounds at the largest count, with the driver's memory after each (0: none)",
    )
    bench.add_argument(
        "--memory-scenario", help="scenario of the memory-per-client figure (default: scenarios/bench/memory.toml)"
    )
    bench.add_argument("--no-memory", action="store_true", help="skip the memory-per-client figure")
    bench.add_argument(
        "--engines", action="store_true",
        help="instead: the batched engine against the memory-bandwidth bound and a per-client-loop proxy (in process)",
    )
    bench.add_argument(
        "--points", default=",".join(f"{n}x{d}" for n, d in ENGINE_POINTS),
        help="--engines: logreg points CLIENTSxD, comma-separated",
    )
    bench.add_argument("--mlp-clients", default="20,200", help="--engines: client counts of the digits MLP")
    bench.add_argument("--no-sweep", action="store_true", help="--engines: skip the 60-run sweep")
    bench.add_argument(
        "--device", choices=("cpu", "cuda", "auto"),
        help="--engines: also run every point on torch on this device (auto: cuda where torch sees a GPU, else cpu)",
    )
    bench.add_argument("--out", default="bench.json", help="JSON output file (not an existing one)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sweep = sub.add_parser(
        "sweep", parents=[common],
        help="every algorithm of a scenario over a grid of scenario values (CSV, Markdown, heat maps)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=KEYS_TITLE + keys_help(), add_help=False,
    )
    sweep.add_argument("-h", "--help", action="store_true", help=HELP_HELP)
    # Optional for argparse, so that --help works without one; cmd_sweep requires it.
    sweep.add_argument("scenario", nargs="?", help="scenario TOML file (see scenarios/)")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", help="a key and its values (repeatable)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key in every cell")
    sweep.add_argument("--engine", choices=("vectorized", "flower"), default="vectorized", help="default: vectorized")
    sweep.add_argument(
        "--out", help="output folder, new or empty (default: a new folder results/<scenario name>-sweep, "
        "else ...-sweep-2, -3, ...)",
    )
    sweep.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    tune = sub.add_parser(
        "tune", parents=[common],
        help="each algorithm at its best cell of a grid (chosen on selection seeds), evaluated on held-out seeds",
    )
    tune.add_argument("scenario", help="scenario TOML file (its target-epsilon list: each epsilon tuned on its own)")
    tune.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", help="a hyper-parameter and its values")
    tune.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key in every cell")
    tune.add_argument("--metric", default="final_loss", help="final_loss (default, lowest), final_accuracy (highest) "
                      "or final_grad_norm_sq (lowest)")
    tune.add_argument("--select-seeds", default="0", help="seeds the best cell is chosen on (default 0)")
    tune.add_argument("--eval-seeds", default="1,2,3", help="held-out seeds the winners are evaluated on")
    tune.add_argument(
        "--memory-budget", metavar="SIZE", help="bytes a batch of cells may take, e.g. 8GB or 512MiB (default: half "
        "the memory available at the start); larger grids run in more batches",
    )
    tune.add_argument("--out", help="output folder (default: a new results/<scenario name>-tune)")
    tune.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    calibrate = sub.add_parser(
        "calibrate", parents=[common],
        help="choose tau: quantiles of the clients' update norms (unclipped GD/SGD, in process) and the tau they suggest",
    )
    calibrate.add_argument("scenario", help="scenario TOML file (see scenarios/)")
    calibrate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    calibrate.add_argument(
        "--rounds", type=int, default=PROBE_ROUNDS,
        help=f"probe rounds K: tau is the largest QUANTILE of rounds 1..K (default {PROBE_ROUNDS}; round 1 alone "
        "misleads when the updates grow once training starts)",
    )
    calibrate.add_argument(
        "--quantile", default="q50", choices=("q10", "q50", "q90", "max"),
        help="the quantile of each round's update norms tau is taken from (default q50: clips about half "
        "the updates of that round)",
    )
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from fl_clip21.sweep import cmd_sweep

        command = cmd_sweep
    else:
        command = {"bench": cmd_bench, "calibrate": cmd_calibrate, "tune": _cmd_tune}.get(args.command, cmd_run)
    try:
        if kernels.ENV_ERROR is not None:
            raise ConfigError(kernels.ENV_ERROR)
        if getattr(args, "help", False):
            _help(run if args.command == "run" else sweep, args)
        return command(args)
    except (ConfigError, outputs.OutputError) as e:
        if args.debug:
            raise
        print(f"fl-clip21: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # SIGINT or SIGTERM during a simulation (fl_clip21.flower.stop)
        if args.debug:
            raise
        print(f"fl-clip21: {e}", file=sys.stderr)
        return e.exit_status
    except StopNow as e:
        # A second signal interrupted Flower's runtime mid-way (Ray is shut down in its finally):
        # its worker threads may still wait on Ray, and the interpreter's exit would join them.
        print(f"fl-clip21: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(e.exit_status)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fl-clip21: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        text = " ".join(str(e).splitlines())
        print(
            f"fl-clip21: error: {type(e).__name__}: {text} (run again with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
