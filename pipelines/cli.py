"""The ``coevolve`` command.

    coevolve run FILE [key=value ...]                      run (or resume) a recipe
    coevolve status RUN_DIR                                where a run stands
    coevolve config show [FILE] [key=value ...] [--doc]   the resolved config
    coevolve model build REF                               build/locate a model (tiny:// offline)
    coevolve generate [FILE] [key=value ...]               sample from the model in a vLLM actor
    coevolve plan FILE [key=value ...] [--cluster FILE]    placement and memory per device, no GPU
                 [--timings RUN_DIR]                      and the step time, in turns and overlapped
    coevolve plot RUN_DIR                                  a run's figures (MM-Zero, EvoLMM, iReasoner)
    coevolve eval RUN_DIR|MODEL [--tasks ...]              benchmarks for every iteration's policy

User errors (bad config values, missing files, bad model references) exit
with status 2 and a one-line message; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.config import ConfigError, dump_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"coevolve: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `coevolve status RUN | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coevolve",
        description="Self-evolving vision-language models on Ray + vLLM + FSDP2.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe; the same command resumes after any failure")
    _config_args(run)
    run.add_argument("--force-config", action="store_true",
                     help="resume under settings that differ from the run's (run.resume_changed="
                          "true): the old config.yaml is kept as config.N.yaml")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="where a run stands: iteration, phase, step, metrics")
    status.add_argument("run_dir", help="runs/<name>")
    status.set_defaults(func=_status)

    config = sub.add_parser("config", help="inspect configurations")
    config_sub = config.add_subparsers(title="config commands", metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config (file + overrides)")
    _config_args(show)
    show.add_argument("--doc", action="store_true", help="add each field's documentation")
    show.set_defaults(func=_config_show)

    model = sub.add_parser("model", help="model references")
    model_sub = model.add_subparsers(title="model commands", metavar="ACTION")
    build = model_sub.add_parser("build", help="build (tiny://) or locate a model; print its folder")
    build.add_argument("ref", help="tiny://qwen2.5-vl[?hidden=..], a local folder or a hub id")
    build.set_defaults(func=_model_build)

    _generate_parser(sub)
    _plan_parser(sub)
    _export_parser(sub)
    _eval_parser(sub)

    plot = sub.add_parser("plot", help="redraw a run's figures: an MM-Zero run's from its "
                                       "iter_*/coevo.json (iter_*/coevo.png and coevo.png), an "
                                       "EvoLMM or iReasoner phase's curves.png from its metrics")
    plot.add_argument("run_dir", help="runs/<name>")
    plot.set_defaults(func=_plot)
    return parser


def _generate_parser(sub) -> None:
    """coevolve generate: sample the engine a run builds, by hand."""
    gen = sub.add_parser("generate", help="sample answers to an image question in a vLLM engine actor")
    _config_args(gen)
    gen.add_argument("--image", help="image file (default: a bar chart drawn locally)")
    gen.add_argument("--question", default="How many bars are in the chart?")
    gen.add_argument("-n", type=int, default=4, help="samples")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.set_defaults(func=_generate)


def _plan_parser(sub) -> None:
    """coevolve plan: check a layout against a cluster."""
    plan = sub.add_parser("plan", help="check a layout against a cluster: placement and memory "
                                       "per device (exit 2 if it does not fit)")
    _config_args(plan)
    plan.add_argument("--cluster", help="cluster YAML (configs/cluster/*.yaml)")
    plan.add_argument("--nodes", type=int, help="nodes (default 1 with --gpus-per-node)")
    plan.add_argument("--gpus-per-node", type=int)
    plan.add_argument("--cpus-per-node", type=int, help="checked when given")
    plan.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU")
    plan.add_argument("--probe", action="store_true",
                      help="also create the placement groups on Ray (RAY_ADDRESS, else a private "
                           "Ray with logical GPUs) and print the real node and GPU ids")
    plan.add_argument("--timings", metavar="RUN_DIR",
                      help="also predict this layout's step time, in turns and with run.overlap, "
                           "from a run's measured timings (pipelines/runtime/timings.py)")
    plan.set_defaults(func=_plan)


def _export_parser(sub) -> None:
    """coevolve export: copy a run's trained policies."""
    export = sub.add_parser("export", help="copy every trained policy of a run (merged hf/ "
                                           "folders, peft adapters) with its config and code "
                                           "version to one folder")
    export.add_argument("run_dir", help="runs/<name>")
    export.add_argument("--out", help="target folder (default: RUN_DIR/export)")
    export.set_defaults(func=_export)


def _eval_parser(sub) -> None:
    """coevolve eval: benchmarks after every iteration."""
    ev = sub.add_parser("eval", help="evaluate a run's policy after every iteration (and the base "
                                     "model) or one model on benchmarks; resumable")
    ev.add_argument("target", help="runs/<name>, an hf/ folder, a peft adapter folder, a hub id "
                                   "or tiny://...")
    ev.add_argument("--tasks", nargs="+", help="built-in task names, jsonl:PATH, task YAML files, "
                                               "smoke, or lmms:<task> for lmms-eval's tasks "
                                               "(default: the recipe's benchmarks)")
    ev.add_argument("--lmms-include", help="folder of extra lmms-eval task YAML files")
    ev.add_argument("--data-dir", help="folder with <task>.jsonl or <task>/ (datasets) copies")
    ev.add_argument("--out", help="results folder (default: RUN_DIR/eval, or ./eval)")
    ev.add_argument("--engines", type=int, default=1, help="engines (data parallel)")
    ev.add_argument("--judge", metavar="MODEL", help="LLM judge (folder, hub id or tiny://) "
                                                     "served from a second pool")
    ev.add_argument("--limit", type=int, help="first N items of every task")
    ev.add_argument("--max-tokens", type=int, help="cap every task's response budget "
                                                   "(default: half of generator.max_model_len)")
    ev.set_defaults(func=_eval)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-6")


def _load(args, extra: tuple[str, ...] = ()) -> object:
    # `coevolve config show trainer.lr=1` puts the override in `file`.
    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file:
        file, overrides = None, [file, *overrides]
    return load_config(file, [*overrides, *extra])


def run_config(args):
    """The config `coevolve run` runs: file, overrides, and --force-config."""
    return _load(args, ("run.resume_changed=true",) if args.force_config else ())


def _run(args) -> int:
    from pipelines.runtime.driver import Driver
    from pipelines.runtime.local_ray import ray_session

    cfg = run_config(args)
    with ray_session(num_cpus=_local_cpus(cfg)):
        state = Driver(cfg).run()
    roles = ", ".join(f"{role} {info.path} (version {info.version})"
                      for role, info in sorted(state.roles.items()))
    print(f"run {cfg.run.name} finished: {roles}")
    return 0


def _local_cpus(cfg) -> int:
    """CPUs a private local Ray advertises: the host's, or what the layout asks if more.

    Ray counts CPUs logically; on a laptop the trainer ranks and engines of the
    CPU layout share the cores (each sets its own thread count), so the layout
    must be schedulable even when it asks for more than the host has.
    """
    import os

    from pipelines.layouts import resolve_layout
    from pipelines.registry import build_recipe

    roles = build_recipe(cfg).roles
    p = cfg.placement
    need = 0
    for phase in [None, *p.phases]:
        layout = resolve_layout(p, phase, roles)
        need = max(need, layout.trainer_ranks * p.cpus_per_rank + sum(
            r.engines * max(1, r.cpus_per_engine) for r in layout.roles.values()))
    return max(os.cpu_count() or 1, need)


def _status(args) -> int:
    from pipelines.runtime.status import render_status

    print(render_status(args.run_dir))
    return 0


def _config_show(args) -> int:
    sys.stdout.write(dump_config(_load(args), with_docs=args.doc))
    return 0


def _model_build(args) -> int:
    from actors.models import resolve_model

    print(resolve_model(args.ref))
    return 0


def _plan(args) -> int:
    from pipelines.runtime.plan import run_plan

    cfg = _load(args)
    code = run_plan(cfg, cluster_file=args.cluster, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                    cpus_per_node=args.cpus_per_node, probe=args.probe)
    if args.timings:
        from pipelines.runtime.timings import timings_report

        print()
        print(timings_report(cfg, args.timings), end="")
    return code


def _export(args) -> int:
    from pipelines.runtime.export import export_run

    manifest = export_run(args.run_dir, args.out)
    for name, info in manifest["policies"].items():
        extra = f" (adapters: {', '.join(info['adapters'])})" if info["adapters"] else ""
        print(f"{name}: {info['source']}{extra}")
    return 0


def _eval(args) -> int:
    from pipelines.eval import report
    from pipelines.eval.harness import lmms_tasks, resolve_target, resolve_tasks, run_eval
    from pipelines.runtime.local_ray import ray_session

    if args.engines < 1:
        raise ValueError(f"--engines must be at least 1, got {args.engines}")
    target = resolve_target(args.target, args.out)
    tasks, items, left_out = resolve_tasks(args.tasks, target, args.data_dir, args.limit)
    lmms = lmms_tasks(args.tasks, target)
    if left_out:
        print(f"left out {len(left_out)} task(s) whose data is not here:\n  "
              + "\n  ".join(left_out))
    print(f"evaluating {', '.join(m.label for m in target.models)} on "
          f"{', '.join([t.name for t in tasks] + [f'lmms:{n}' for n in lmms])} -> {target.out}")
    with ray_session(num_cpus=max(os.cpu_count() or 1, args.engines + 1)):
        run_eval(target, tasks, items, engines=args.engines, judge_model=args.judge,
                 data_dir=args.data_dir, max_tokens=args.max_tokens, lmms=lmms,
                 lmms_include=args.lmms_include, limit=args.limit)
    print(report.table(report.load_summary(target.out)))
    print(f"plot: {target.out / 'comparison.png'}, table: {target.out / 'summary.md'}")
    return 0


def _plot(args) -> int:
    from pipelines.recipes.evolmm.figure import plot_run as phase_curves
    from pipelines.recipes.mmzero.coevo import plot_run

    written = phase_curves(args.run_dir) if Path(args.run_dir).is_dir() else []
    if not written or any(Path(args.run_dir).glob("iter_*/coevo.json")):
        written += plot_run(args.run_dir)
    for path in written:
        print(path)
    return 0


def generate_spec(cfg):
    """The engine ``coevolve generate`` samples with: the one a run builds from the config
    (pipelines/runtime/specs.py) for the base model, without adapters, on one device."""
    from pipelines.runtime.specs import engine_spec

    return engine_spec(cfg, cfg.model.path, lora=False)


def _generate(args) -> int:
    import ray

    from actors.generator import GeneratorActor
    from actors.sampling import Request, Sampling, cpu_engine_env
    from pipelines.runtime.local_ray import ray_session

    cfg = _load(args)
    image = _read_image(args.image)
    spec = generate_spec(cfg)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": args.question}]}]
    request = Request(messages, images=[image], sampling=Sampling(
        n=args.n, temperature=cfg.generator.temperature, top_p=cfg.generator.top_p,
        max_tokens=args.max_tokens, seed=cfg.run.seed))
    with ray_session():
        actor = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(2)})(GeneratorActor)
        engine = actor.options(name=f"coevolve/{cfg.run.name}/generate/0").remote(spec, "generate")
        [samples] = ray.get(engine.generate.remote([request]))
        stats = ray.get(engine.stats.remote())
        ray.kill(engine)
    if samples[0].refused:
        print(f"coevolve generate: the engine refused the request: {samples[0].text}",
              file=sys.stderr)
        return 1
    print(f"model {cfg.model.path}: {len(samples[0].prompt_ids)} prompt tokens")
    for i, s in enumerate(samples):
        mean_lp = sum(s.logprobs) / max(len(s.logprobs), 1)
        print(f"[{i}] {len(s.token_ids)} tokens, mean log-prob {mean_lp:.3f}, "
              f"{s.finish_reason}: {s.text!r}")
    print(f"{stats['tokens']} tokens in {stats['seconds']:.2f} s "
          f"({stats['tokens_per_s']:.0f} tokens/s, weight version {stats['version']})")
    return 0


def _read_image(path: str | None) -> bytes:
    if path:
        with open(path, "rb") as f:
            return f.read()
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 168), "white")
    draw = ImageDraw.Draw(image)
    for i, height in enumerate([60, 120, 90, 40]):
        draw.rectangle([20 + 50 * i, 150 - height, 55 + 50 * i, 150], fill=(60, 110, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
