"""The ``pipeline`` command.

Exit codes: 0 done, 1 some work failed (or the machine did: no space, disk quota, I/O error), 2 usage or
configuration error (also a path the machine refuses: not writable, read-only, a directory where a file
is expected). Every user-caused error is one
line ``pipeline: error: <message>`` on stderr (the traceback only with ``--debug``); ``--json`` makes
stdout one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from pipeline import distributed
from pipeline.cli_args import CommandParser
from pipeline.errors import ConfigError, PipelineError, environment_fault
from pipeline.executors import BACKENDS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STORE_COMMANDS = {"verify": "verify", "import-features": "import_features", "export": "export_features"}
BUILTIN = ("run", "status", "gc", "runs", "compare")
_GLOBAL_VALUES = ("--cache-dir", "--stages")
_GLOBAL_FLAGS = ("--debug", "--json")

USAGE = """pipeline [--cache-dir DIR] [--stages FILE] [--debug] [--json] COMMAND ...

commands:
  run <stage>|train|eval|all [--stage S] --dataset D [--config FILE] [--set stage.param=value ...] [--force]
        [--backend local|ray|dask [--address A] [--gpus-per-task G]] [--workers N]
        [--fail-fast|--keep-going] [--no-wait]
  status [--dataset D] [--config F] [--set ...]
                                          done / stale (and what changed) / not run / missing, per stage
  gc [--dry-run] [--experiments] [--dataset D ...]
                                          remove what no current key, import or named experiment keeps
  runs [--dataset D]                      every experiment: name or key, what differs, status, mAP, time
  compare A B ... [--plot FILE]           experiments (names or key prefixes) side by side
  verify | import-features | export ...   feature stores (see `pipeline <command> --help`)
  <verb> [<stage>] ...                    a stage's domain command from stages.yaml `commands:`
                                          (evaluate localize, show localize, weights, ...)"""


def _split_globals(argv: list[str]) -> tuple[dict, list[str]]:
    """Take the global options out of argv wherever they are (before or after the command)."""
    opts = {"cache_dir": None, "stages": None, "debug": False, "json": False}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _GLOBAL_VALUES:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name}: expected a value")
                value, i = argv[i + 1], i + 1
            if not value.strip():
                raise ConfigError(f"{name}: expected a path, got {value!r}")
            opts[name[2:].replace("-", "_")] = value
        elif arg in _GLOBAL_FLAGS:
            opts[arg[2:]] = True
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def _workspace(opts: dict):
    from pipeline.runner import Workspace

    if opts["stages"]:
        stages = Path(opts["stages"]).expanduser()
    elif (PROJECT_ROOT / "stages.yaml").is_file():
        stages = PROJECT_ROOT / "stages.yaml"
    else:
        stages = Path("stages.yaml")
    stages = stages.resolve()
    env = os.environ.get("PIPELINE_CACHE")
    if env is not None and not env.strip() and not opts["cache_dir"]:
        raise ConfigError("PIPELINE_CACHE: set but empty (unset it, or name the cache directory)")
    cache = Path(opts["cache_dir"] or env or stages.parent / "cache").expanduser().resolve()
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"--cache-dir {cache}: not a directory")
    return Workspace.open(stages, cache)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if distributed.world_size() > 1:  # under torchrun: rank 0 runs the command, the others its training
        return _guarded(argv, lambda: distributed.run_ranks(lambda: _guarded(argv, lambda: _main(argv))))
    return _guarded(argv, lambda: _main(argv))


def _guarded(argv: list[str], command) -> int:
    """``command()``'s exit code, its errors as one line and their exit code."""
    debug = "--debug" in argv
    try:
        return command()
    except PipelineError as exc:
        if debug:
            traceback.print_exc()
        print(f"pipeline: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pipeline status | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the machine, not a bug: the path and the cause
        if debug:
            traceback.print_exc()
        fault = environment_fault(exc)
        print(f"pipeline: error: {fault}", file=sys.stderr)
        return fault.exit_code
    except Exception as exc:  # a bug, not a user error: say where to look
        if debug:
            traceback.print_exc()
        print(f"pipeline: error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    opts, rest = _split_globals(argv)
    if not rest or rest[0].startswith("-"):
        print(USAGE)
        return 0 if rest and rest[0] in ("-h", "--help") else 2
    verb, rest = rest[0], rest[1:]
    domain = verb not in BUILTIN
    if domain and opts["json"]:
        rest.append("--json")  # domain commands take --json themselves
    ws = _workspace(opts)
    if domain:
        return _domain(ws, opts, verb, rest)
    if verb == "run":
        return _run(ws, opts, rest)
    if verb == "status":
        return _status(ws, opts, rest)
    if verb == "runs":
        return _runs(ws, opts, rest)
    if verb == "compare":
        return _compare(ws, opts, rest)
    return _gc(ws, opts, rest)


def _runs(ws, opts: dict, argv: list[str]) -> int:
    from pipeline.experiments import format_runs, list_runs

    p = CommandParser(prog="pipeline runs", allow_abbrev=False)
    p.add_argument("--dataset", action="append", default=[], help="only this dataset's runs (its name)")
    a = p.parse_args(argv)
    runs = list_runs(ws, a.dataset or None)
    if opts["json"]:
        print(json.dumps({"command": "runs", "runs": [r.to_json() for r in runs]}, default=str))
    else:
        print(format_runs(runs))
    return 0


def _compare(ws, opts: dict, argv: list[str]) -> int:
    from pipeline.experiments import find_run, format_compare, list_runs

    p = CommandParser(prog="pipeline compare", allow_abbrev=False)
    p.add_argument("refs", nargs="+", metavar="NAME_OR_KEY", help="experiment names or key prefixes (pipeline runs)")
    p.add_argument("--plot", type=Path, metavar="FILE", help="PR curves side by side (.png, .pdf, .svg): the "
                                                             "compared stage's compare-plot command")
    p.add_argument("--classes", help="comma-separated classes to plot (default: every class, up to 12)")
    a = p.parse_args(argv)
    if len(a.refs) < 2:
        raise ConfigError("compare: give at least two experiments (names or key prefixes)")
    all_runs = list_runs(ws)
    runs = [find_run(all_runs, ref) for ref in a.refs]
    if len({r.stage for r in runs}) > 1:
        raise ConfigError(f"compare: the runs belong to different stages ({', '.join(sorted({r.stage for r in runs}))})")
    if opts["json"]:
        print(json.dumps({"command": "compare", "runs": [r.to_json() for r in runs]}, default=str))
    else:
        print(format_compare(runs))
    if a.plot is not None:
        verb = "compare-plot"
        if verb not in ws.graph[runs[0].stage].commands:
            raise ConfigError(f"compare --plot: stage {runs[0].stage} declares no {verb} command in {ws.graph.path}")
        argv = ["--out", str(a.plot)] + [x for r in runs for x in ("--run", f"{r.label}={r.dir}")]
        return _domain(ws, opts, verb, [runs[0].stage] + argv + (["--classes", a.classes] if a.classes else []))
    return 0


def _run(ws, opts: dict, argv: list[str]) -> int:
    from pipeline.context import RunOptions
    from pipeline.runner import parse_config, parse_sets, run, targets_for

    p = CommandParser(prog="pipeline run", allow_abbrev=False)
    p.add_argument("what", help="a stage name, or train / eval (with --stage), or all")
    p.add_argument("--stage")
    p.add_argument("--dataset", required=True)
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="STAGE.PARAM=VALUE")
    p.add_argument("--config", metavar="FILE", help="stage -> {param: value} (YAML or JSON), under --set")
    p.add_argument("--force", action="store_true")
    p.add_argument("--backend", choices=BACKENDS, default="local")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--address", help="a running cluster: Ray auto|HOST:PORT, Dask tcp://HOST:PORT")
    p.add_argument("--gpus-per-task", type=float, default=0.0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fail-fast", action="store_true")
    g.add_argument("--keep-going", action="store_true")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--name", help="name this experiment (pipeline runs / compare; gc keeps it)")
    a = p.parse_args(argv)
    if a.workers < 1:
        raise ConfigError(f"--workers {a.workers}: expected a positive number")
    if a.backend == "local" and (a.address or a.gpus_per_task):
        raise ConfigError(f"--{'address' if a.address else 'gpus-per-task'}: only with --backend ray or dask")
    if a.gpus_per_task < 0:
        raise ConfigError(f"--gpus-per-task {a.gpus_per_task:g}: expected 0 or more")
    if a.backend != "local":
        from pipeline.executors import check_installed

        check_installed(a.backend)
    if a.name is not None:
        from pipeline.experiments import check_name

        check_name(a.name)
    sets = (parse_config(a.config) if a.config else []) + parse_sets(a.sets)
    dataset = ws.load_dataset(a.dataset)
    targets = targets_for(ws.graph, dataset, a.what, a.stage)
    options = RunOptions(workers=a.workers, backend=a.backend, address=a.address, gpus_per_task=a.gpus_per_task,
                         fail_fast=a.fail_fast, force=a.force, debug=opts["debug"], json=opts["json"], name=a.name)
    reports = run(ws, dataset, targets, sets, options, wait=not a.no_wait)
    failed = any(r.status in ("failed", "skipped") or r.items.get("failed") for r in reports)
    code = 1 if failed else 0
    if opts["json"]:
        print(json.dumps({"command": "run", "dataset": dataset.name, "stages": [r.to_json() for r in reports],
                          "hashed": ws.index.hashed, "exit_code": code}, default=str))
    else:
        _print_run(reports)
    return code


def _print_run(reports) -> None:
    width = max(len(r.name) for r in reports)
    for r in reports:
        parts = [f"{r.name:<{width}}  {r.status:<8}"]
        if r.items:
            i = r.items
            parts.append(f"{i['total']} items: {i['done']} done, {i['skipped']} skipped, {i['failed']} failed")
        if r.status == "ran":
            parts.append(f"{r.seconds:.1f} s")
        print("  ".join(parts).rstrip(), flush=True)
        if r.message:
            print(f"{'':<{width}}  {r.message}")
        if r.dir:
            print(f"{'':<{width}}  outputs: {r.dir}")
        for f in r.failures:
            print(f"{'':<{width}}  failed {f.get('id')}: {f.get('kind')}: {f.get('message')}", file=sys.stderr)
        if r.summary:
            print(r.summary.rstrip("\n"))


def _status(ws, opts: dict, argv: list[str]) -> int:
    from pipeline.datasets import known_manifests
    from pipeline.runner import parse_config, parse_sets
    from pipeline.status import explain, format_text

    p = CommandParser(prog="pipeline status", allow_abbrev=False)
    p.add_argument("--dataset", action="append", default=[])
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="STAGE.PARAM=VALUE")
    p.add_argument("--config", metavar="FILE")
    a = p.parse_args(argv)
    sets = (parse_config(a.config) if a.config else []) + parse_sets(a.sets)
    out = []
    if a.dataset:  # named datasets: any error in them is the user's to fix (exit 2)
        for name in a.dataset:
            ds = ws.load_dataset(name)
            out.append((ds, explain(ws, ds, sets), None))
    else:  # every manifest: report the ones that cannot be planned and go on
        for path in known_manifests(ws.project_root):
            try:
                ds = ws.load_dataset(path)
                out.append((ds, explain(ws, ds, sets), None))
            except ConfigError as exc:
                out.append((path, [], str(exc)))
    if opts["json"]:
        print(json.dumps({"command": "status", "datasets": [
            {"name": ds.name, "task": ds.task, "manifest": str(ds.path), "stages": rows} if err is None
            else {"name": ds.stem, "manifest": str(ds), "error": err} for ds, rows, err in out]}, default=str))
    else:
        for ds, rows, err in out:
            print(f"dataset {ds.stem}: {err}" if err else format_text(ds, rows))
    return 0


def _gc(ws, opts: dict, argv: list[str]) -> int:
    from pipeline.gc import collect_garbage

    p = CommandParser(prog="pipeline gc", allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--experiments", action="store_true",
                   help="also remove anonymous experiments (outputs of keys no longer current, not named)")
    p.add_argument("--dataset", action="append", default=[])
    a = p.parse_args(argv)
    res = collect_garbage(ws, a.dataset, a.dry_run, experiments=a.experiments)
    if opts["json"]:
        print(json.dumps({"command": "gc", "dry_run": a.dry_run, "removed": [p for p, _ in res.removed],
                          "kept": [{"dir": d, "why": why} for d, why in res.kept],
                          "bytes": res.bytes, "kept_unknown": res.kept_unknown, "held": res.held,
                          "leftovers": res.leftovers}))
        return 0
    for path, why in res.kept:
        print(f"keep {path}: {why}")
    verb = "would remove" if a.dry_run else "removed"
    for path, size in res.removed:
        print(f"{verb} {path} ({_human(size)})")
    for path in res.leftovers:
        print(f"{verb} {path} (left by a killed write)")
    for path in res.held:
        print(f"kept {path}: a running stage reads or writes it", file=sys.stderr)
    for name in res.kept_unknown:
        print(f"kept every output of dataset {name}: its current keys cannot be computed now", file=sys.stderr)
    print(f"{'would reclaim' if a.dry_run else 'reclaimed'} {_human(res.bytes)} ({res.bytes} bytes) "
          f"in {len(res.removed)} entries")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _domain(ws, opts: dict, verb: str, argv: list[str]) -> int:
    """``verify`` / ``import-features`` / ``export`` (stores) and the stages' ``commands:``."""
    import importlib

    from pipeline.commands import CommandContext

    cmd = CommandContext(workspace=ws, debug=opts["debug"], json=opts["json"])
    if verb in STORE_COMMANDS:
        module = importlib.import_module("pipeline.store.commands")
        return int(getattr(module, STORE_COMMANDS[verb])(argv, cmd) or 0)
    graph = ws.graph
    owners = [n for n in graph.order if verb in graph.stages[n].commands]
    if argv and argv[0] in owners:
        stage, argv = argv[0], argv[1:]
    elif len(owners) == 1 and not (argv and argv[0] in graph.stages):
        stage = owners[0]
    elif owners:
        raise ConfigError(f"{verb}: name the stage: pipeline {verb} <stage> ...; one of: {', '.join(owners)}")
    else:
        known = sorted({v for n in graph.order for v in graph.stages[n].commands} | set(STORE_COMMANDS)
                       | set(BUILTIN))
        raise ConfigError(f"unknown command {verb!r}; known: {', '.join(known)}")
    graph.check_command(stage, verb)
    module, fn = graph.stages[stage].commands[verb].split(":")
    if str(graph.root) not in sys.path:
        sys.path.insert(0, str(graph.root))
    return int(getattr(importlib.import_module(module), fn)(argv, cmd) or 0)


if __name__ == "__main__":
    sys.exit(main())
