"""The ``spannorm`` command: argument parsing, one-line errors, exit codes. No logic of its own."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .config import ConfigError, SpannormError, coerce_enum, read_bounded, short
from .files import atomic_write_text, dumps, os_error
from .model_config import MAX_SIZE, Parametrization, Scheme
from .threads import fit_threads


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2, no usage dump); a command that takes --config lists, in its
    --help, every config key with its doc (from the fields' declarations: :func:`spannorm.config.option`)."""

    lists_config_keys = False

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        if not self.lists_config_keys:
            return super().format_help()
        # (here: only a help that lists the keys reads the config layer, which imports neither torch nor the model)
        from .config import described
        from .run_config import RunConfig

        keys = [f"  {key} (default {short(value)}): {doc}" for key, value, doc in described(RunConfig())]
        head = "config keys (--set KEY=VALUE; spannorm config show prints a config's values with these docs):"
        return super().format_help() + "\n" + "\n".join([head, *keys]) + "\n"


def _path(text: str) -> Path:
    """A path option's value: an empty one is refused (Path("") would be the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a path")
    return Path(text)


def _config_args(p: Parser, default: str | None) -> None:
    p.lists_config_keys = True
    p.add_argument(
        "--config",
        default=default,
        help="a YAML file or a preset name (tiny, small, moe-tiny, moe-small)"
        + (f"; default {default}" if default else ""),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set model.scheme=post train.lr=4e-3 (one or more; repeatable)",
    )
    p.add_argument(
        "--corpus",
        help="a text file or directory to train on instead of the default corpus (same as --set data.corpus=PATH)",
    )


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
        "(same as --set train.device=DEVICE; default: the config's, auto)",
    )


def _model_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (CUDA when available, else CPU; the default), cpu, cuda or cuda:N")


def _data_command(sub) -> None:
    data = sub.add_parser("data", help="corpus and tokenizer tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    prep = data_sub.add_parser("prepare", help="fetch the corpus and tokenize it into memmaps (cached)")
    _config_args(prep, "tiny")


def _config_command(sub) -> None:
    conf = sub.add_parser("config", help="configs: show one resolved, each field with its doc")
    conf_sub = conf.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    show = conf_sub.add_parser("show", help="print a config resolved (preset or file, --set) as YAML with each doc")
    _config_args(show, "tiny")
    _device_arg(show)


def _train_command(sub) -> None:
    tr = sub.add_parser("train", help="train one model")
    _config_args(tr, None)
    tr.add_argument("--out", type=_path, help="run directory (default runs/<config>-<scheme>-<time>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument(
        "--from-hf-config",
        type=_path,
        metavar="PATH",
        help="the model's shape from a Hugging Face Llama config.json (the file, or a local folder holding one; never "
        "the Hub): Llama's block, scheme pre with RMSNorm, before the --set overrides (--set model.scheme=span: any "
        "scheme)",
    )
    _device_arg(tr)


def _probe_command(sub) -> None:
    pr = sub.add_parser("probe", help="signal propagation at init (or on a checkpoint), measured and predicted")
    _config_args(pr, "small")
    pr.add_argument(  # (--scheme: its name before every command said --schemes)
        "--schemes", "--scheme", dest="schemes", default="pre,post,span", help="comma-separated (default pre,post,span)"
    )
    pr.add_argument(
        "--depths", help="comma-separated depths L (default 12,48,96; --coord-check width: the one depth, default 2)"
    )
    pr.add_argument("--d-model", type=int, help="width (default: the config's model.d_model)")
    _device_arg(pr)
    pr.add_argument(  # (--batch: its name before every command said --batch-size)
        "--batch-size",
        "--batch",
        dest="batch_size",
        type=int,
        default=4,
        help="sequences in the probe batch (default 4)",
    )
    pr.add_argument(
        "--checkpoint",
        type=_path,
        help="a run directory: probe its latest checkpoint (with its own config; --schemes, "
        "--depths, --d-model and --config are not used) and add layer-drop sensitivity",
    )
    pr.add_argument(
        "--json",
        type=_path,
        help="output JSON (default runs/probe/probe.json, or coord_check_<axis>.json); PNG plots are written beside it",
    )
    pr.add_argument(
        "--coord-check",
        choices=("width", "depth"),
        help="instead of the probe at init: a coordinate check (spannorm.coord_check) over --sizes, each scheme under "
        "standard and --parametrization; width at --depths' one depth, depth at --d-model (default 64)",
    )
    pr.add_argument(
        "--sizes",
        help="--coord-check: comma-separated widths (default 64,128,256,512,1024) or depths "
        "(default 4,8,16,32,64); the smallest is the base shape",
    )
    pr.add_argument(
        "--parametrization",
        choices=("mup", "completep"),
        help="--coord-check: compared with standard (default mup for width, completep for depth)",
    )
    pr.add_argument("--steps", type=int, default=8, help="--coord-check: Adam steps before the measure (default 8)")
    pr.add_argument("--lr", type=float, default=1e-2, help="--coord-check: the learning rate (default 1e-2)")
    pr.add_argument(
        "--seeds", default="1,2,3", help="--coord-check: comma-separated init seeds, averaged (default 1,2,3)"
    )


def _bench_command(sub) -> None:
    be = sub.add_parser("bench", help="training-step speed and memory of every scheme and of HF Llama")
    be.add_argument("--schemes", default=",".join(s.value for s in Scheme), help="comma-separated (default: all)")
    be.add_argument(
        "--depths", help="depth sweep for pre, span and HF Llama (default 4,8,16,32 on the CPU, 16 on CUDA)"
    )
    be.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast); default both")
    be.add_argument(
        "--reps", type=int, default=5, help="timed rounds of interleaved steps, after 2 warm-up rounds (default 5)"
    )
    be.add_argument(
        "--compile",
        action="store_true",
        help="also time pre, span and HF Llama eager and under torch.compile, all six interleaved (standard depth)",
    )
    be.add_argument("--no-hf", action="store_true", help="skip the Hugging Face LlamaForCausalLM reference")
    be.add_argument(
        "--device",
        default="cpu",
        help="cpu (default; the CPU standard size) or cuda / cuda:N (the GPU standard size, peak allocated memory)",
    )
    be.add_argument("--tf32", action="store_true", help="CUDA: fp32 matmuls in TF32 (all implementations alike)")
    be.add_argument("--json", type=_path, help="write {matmul_peak_flops, rows: [...]} here")
    be.add_argument(
        "--report",
        type=_path,
        metavar="JSON",
        help="time nothing: print the ratios and a Markdown table of a --json result",
    )
    be.add_argument(
        "--moe",
        action="store_true",
        help="time only an 8-expert top-2 MoE span model against a dense one "
        "with the same active parameters (3 interleaved rounds per dtype; --schemes, --depths, HF unused)",
    )


def _schemes_command(sub) -> None:
    sch = sub.add_parser("schemes", help="list every normalization scheme with its equation, init and reference")
    fmt = sch.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of {name, equation, init, reference}")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table (as in the README)")


def _compare_command(sub) -> None:
    cmp_ = sub.add_parser("compare", help="train several schemes and compare them (the main job)")
    _config_args(cmp_, "small")
    cmp_.add_argument("--schemes", default="pre,post,span", help="comma-separated schemes (default pre,post,span)")
    cmp_.add_argument("--out", type=_path, default=Path("runs/compare"), help="output directory (default runs/compare)")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bars")
    _device_arg(cmp_)


def _study_command(sub) -> None:
    st = sub.add_parser(
        "study",
        help="a grid of runs (schemes × depths × lrs × seeds) with results.csv, "
        "report.md, plots and a verdict on each SpanNorm claim",
    )
    st.add_argument("--config", required=True, help="a study YAML file or a shipped study name (tiny, reference)")
    st.add_argument(
        "--out",
        type=_path,
        default=Path("runs/study"),
        help="study directory (default runs/study); running again reuses finished cells",
    )
    st.add_argument(
        "--report-only",
        action="store_true",
        help="train and probe nothing: write results.csv, plots and report.md from the cells finished so far (and "
        "the init probes the study saved; missing ones are named)",
    )
    st.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, each in its own process with cores // jobs threads (default 1: in this process)",
    )
    st.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="append overrides to the study's base config, e.g. --set data.corpus=PATH (one or more; repeatable)",
    )
    st.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local (the default: cells run here, --jobs at once) or slurm (each cell its own Slurm job through "
        "submitit, the study directory on a shared filesystem; pip install 'spannorm[cluster]')",
    )
    st.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--launcher slurm: a submitit parameter, e.g. slurm_partition=gpu, timeout_min=240, gpus_per_node=1, "
        "cpus_per_task=8 (repeatable; defaults timeout_min=1440, cpus_per_task=1)",
    )
    st.add_argument("--corpus", help="train every cell on this text file or directory (same as --set data.corpus=PATH)")
    st.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    _device_arg(st)


def _export_command(sub) -> None:
    ex = sub.add_parser(
        "export", help="a run's newest checkpoint as a Hugging Face folder (config, safetensors, tokenizer)"
    )
    ex.add_argument("run_dir", type=_path, metavar="RUN_DIR", help="the run directory")
    ex.add_argument("out_dir", type=_path, metavar="OUT_DIR", help="the folder to write (must not exist)")
    ex.add_argument(
        "--to",
        choices=["spannorm", "llama"],
        default="spannorm",
        help="spannorm (SpanNormForCausalLM, every scheme; the default) or llama (a plain "
        "LlamaForCausalLM: pre models with RMSNorm and a dense FFN only)",
    )


def _generate_command(sub) -> None:
    ge = sub.add_parser("generate", help="continue a prompt with a run or a Hugging Face folder, streaming the tokens")
    ge.add_argument("model", type=_path, metavar="RUN_OR_HF_DIR", help="a run directory or a Hugging Face folder")
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    ge.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (default 1)")
    ge.add_argument("--top-k", type=int, help="sample among the k most likely tokens only (default: all)")
    ge.add_argument(
        "--top-p",
        type=float,
        help="sample from the smallest set of tokens with probability >= p (nucleus; default 1: all)",
    )
    ge.add_argument("--seed", type=int, help="seed of the sampling (default: unseeded)")
    _model_device_arg(ge)


def _eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte over the validation split and text files")
    ev.add_argument("model", type=_path, metavar="RUN_OR_HF_DIR", help="a run directory or a Hugging Face folder")
    ev.add_argument(
        "--text",
        type=_path,
        action="append",
        default=[],
        metavar="PATH",
        help="evaluate this text file or directory (repeatable; a run's validation split then only with --validation)",
    )
    ev.add_argument(
        "--validation",
        action="store_true",
        help="also score the validation split: a run directory's (scored by default when no --text is given), or "
        "the one a Hugging Face folder's spannorm_run.yaml names (paths of the machine that exported it: read only "
        "when asked)",
    )
    ev.add_argument("--seq-len", type=int, help="window length (default: the run's train.seq_len)")
    ev.add_argument("--batch-size", type=int, help="windows per forward (default: the run's train.batch_size, else 16)")
    ev.add_argument("--json", type=_path, metavar="OUT", help="also write the results to this JSON file")
    ev.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="instead: run these comma-separated lm-eval-harness tasks (spannorm_spelling, shipped; yours with "
        "--include-path; lm-eval's own) with lm-eval's hf model; needs pip install 'spannorm[eval]'",
    )
    ev.add_argument("--include-path", type=_path, metavar="DIR", help="--lm-eval: also find tasks in this YAML folder")
    ev.add_argument("--limit", type=int, metavar="N", help="--lm-eval: score only the first N items of each task")
    _model_device_arg(ev)


def _track_command(sub) -> None:
    tk = sub.add_parser("track", help="replay a run's metrics.jsonl and diagnostics.jsonl into TensorBoard or W&B")
    tk.add_argument("run_dir", type=_path, metavar="RUN_DIR", help="the run directory")
    tk.add_argument(
        "--to",
        required=True,
        metavar="TRACKERS",
        help="comma-separated: tensorboard (RUN_DIR/tensorboard; pip install 'spannorm[tensorboard]') and/or "
        "wandb (RUN_DIR/wandb; pip install 'spannorm[wandb]')",
    )
    tk.add_argument("--wandb-mode", help="offline, online or disabled (default: the run's train.wandb_mode)")
    tk.add_argument("--wandb-project", help="the W&B project (default: the run's train.wandb_project)")


def build_parser() -> Parser:
    parser = Parser(prog="spannorm", description="Train and compare normalization schemes for deep Transformers.")
    parser.add_argument("--version", action="version", version=f"spannorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _data_command(sub)
    _config_command(sub)
    _train_command(sub)
    _probe_command(sub)
    _bench_command(sub)
    _schemes_command(sub)
    _compare_command(sub)
    _study_command(sub)
    _export_command(sub)
    _generate_command(sub)
    _eval_command(sub)
    _track_command(sub)
    return parser


def synopsis(parser: argparse.ArgumentParser | None = None) -> str:
    """One usage line per command, as argparse writes it (the README's command synopsis, checked by a test)."""
    parser = parser or build_parser()
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is not None:
        return "\n".join(synopsis(p) for p in sub.choices.values())
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=10**4)  # (one line a command)
    return parser.format_usage().strip().removeprefix("usage: ").replace(" [-h]", "")


def _shortcuts(args) -> list[str]:
    """``--set`` overrides for --corpus and --device."""
    return ([f"data.corpus={args.corpus}"] if args.corpus else []) + (
        [f"train.device={args.device}"] if getattr(args, "device", None) else []
    )


def _load(args):
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .run_config import load_config

    return load_config(args.config, list(args.overrides) + _shortcuts(args))


def cmd_config_show(args) -> None:
    from .config import commented_yaml  # (here: the CLI starts without the config layer)

    command = shlex.join(["spannorm", *args.argv])
    print(f"# {command}: a config --config reads back\n{commented_yaml(_load(args))}")


def cmd_data_prepare(args) -> None:
    import json

    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .data import prepare

    path = prepare(_load(args).data, verify=True)  # (a cached dataset: its files' sha256 checked too)
    meta = json.loads((path / "meta.json").read_text())
    print(
        f"{meta['corpus']}: {len(meta['train_documents'])} train / {len(meta['val_documents'])} val documents "
        f"(split by {meta['split']}), {meta['train_tokens']:,} / {meta['val_tokens']:,} tokens, "
        f"{meta['tokenizer']} vocab {meta['vocab_size']} -> {path}"
    )


MAX_HF_CONFIG_BYTES = 1 << 20  # a Llama config.json is about a kilobyte; /dev/zero or a log given by mistake is not one


def _hf_config(path: Path) -> dict:
    """``--from-hf-config``'s config.json (the file, or the one in a local folder; the Hub is never asked) as a dict."""
    import json  # (only this option reads JSON)

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--from-hf-config {str(path)!r} is a folder without a config.json")
        path = path / "config.json"
    raw = read_bounded(path, MAX_HF_CONFIG_BYTES, "--from-hf-config")  # (a missing file: a one-line error)
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (bad JSON, bad UTF-8, or nested too deep)
        raise ConfigError(f"--from-hf-config {str(path)!r} is not valid JSON ({short(str(e), 120)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--from-hf-config {str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def cmd_train(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .device import resolve as resolve_device
    from .run import load_run
    from .train import diverged_at, train

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        if args.config or args.overrides or args.corpus or args.from_hf_config:
            raise ConfigError(
                "--resume uses the run's saved config.yaml: drop --config, --set, --corpus and --from-hf-config"
            )
        cfg = load_run(args.out)
        if args.device:  # a run may resume on another device: its checkpoint loads anywhere
            resolve_device(args.device, "--device")  # a one-line error for a bad value or a missing GPU
            cfg.train.device = args.device
        out = args.out
    else:
        if not args.config:
            raise ConfigError("--config is required: a YAML file or a preset name (tiny, small, moe-tiny, moe-small)")
        if args.from_hf_config:  # (the Llama shape first: an explicit --set wins)
            what = f"--from-hf-config {str(args.from_hf_config)!r}"
            hf_config = _hf_config(args.from_hf_config)
            args.overrides = _hf().model_overrides_from_llama(hf_config, what) + list(args.overrides)
        cfg = _load(args)
        if args.from_hf_config and cfg.train.seq_len > (hf_config.get("max_position_embeddings") or math.inf):
            raise ConfigError(
                f"{what}: max_position_embeddings={hf_config['max_position_embeddings']} is below "
                f"train.seq_len={cfg.train.seq_len}: --set train.seq_len to at most that"
            )
        out = (
            args.out
            or Path("runs") / f"{Path(args.config).stem}-{cfg.model.scheme.value}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet, cli=True)
    if os.environ.get("RANK", "0") != "0":  # (under torchrun, rank 0 reports)
        return
    if summary["diverged"]:  # exit code 0 all the same: the run did what was asked, and studies rely on it
        print(f"spannorm: the run {diverged_at(summary)}: {summary['diverged_reason']}", file=sys.stderr)
    val = summary["final_val_loss"]
    print(
        f"{summary['scheme']}: {summary['steps']} steps, final val loss "
        f"{'—' if val is None else f'{val:.4f}'}, diverged {'yes' if summary['diverged'] else 'no'}, "
        f"{summary['tokens_per_s'] or 0:,.0f} tokens/s -> {out}"
    )


def cmd_compare(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .compare import compare, table

    schemes = _schemes("--schemes", args.schemes)
    base = _load(args)
    command = "spannorm " + " ".join(shlex.quote(a) for a in args.argv)
    summaries = compare(base, schemes, args.out, command, progress=not args.quiet)
    print()
    print(table(summaries))
    print(f"\nreport: {args.out / 'report.md'}  plot: {args.out / 'loss_curves.png'}")


def _launcher(args):
    """--launcher slurm's launcher (None: local); --slurm settings without it, or --jobs with it, refused."""
    if args.launcher == "local":
        if args.slurm:
            raise ConfigError(f"--slurm {args.slurm[0]!r} is only read with --launcher slurm")
        return None
    if args.jobs != 1:
        raise ConfigError(f"--jobs {args.jobs} is not used with --launcher slurm: every cell is a job of its own")
    from .study.launch import Slurm, slurm_parameters  # (here: the CLI starts without loading torch)

    return Slurm(slurm_parameters(args.slurm))


def cmd_study(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .study import load_study, run_study

    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} is invalid: expected a positive integer")
    launcher = _launcher(args)
    study = load_study(args.config, list(args.overrides) + _shortcuts(args))
    command = "spannorm " + " ".join(shlex.quote(a) for a in args.argv)
    rows = run_study(
        study,
        args.out,
        command,
        jobs=args.jobs,
        log=(lambda *a: None) if args.quiet else print,
        report_only=args.report_only,
        launcher=launcher,
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stalled", "diverged", "not run")}
    print(
        f"{len(rows)} cells: {counts['ok']} ok, {counts['stalled']} stalled, {counts['diverged']} diverged"
        + (f", {counts['not run']} not run" if counts["not run"] else "")
        + "\n"
        f"results: {args.out / 'results.csv'}  report: {args.out / 'report.md'}"
    )


def _output_file(flag: str, path: Path) -> None:
    """Refuse an output path that cannot be a file before anything is computed."""
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory: expected the path of a file")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is not a directory")


def _schemes(flag: str, text: str) -> list[Scheme]:
    """A comma-separated list of scheme names, each once."""
    schemes = [coerce_enum(Scheme, flag, s.strip()) for s in text.split(",") if s.strip()]
    valid = ", ".join(s.value for s in Scheme)
    if not schemes:
        raise ConfigError(f"{flag} {text!r} is invalid: expected a comma-separated list of {valid}")
    if twice := [s.value for s in dict.fromkeys(schemes) if schemes.count(s) > 1]:
        raise ConfigError(f"{flag} {text!r} names {', '.join(twice)} twice: expected each scheme once")
    return schemes


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} is invalid: expected comma-separated positive integers, e.g. 12,48,96")
    return values


def cmd_probe(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .probe_command import plot_heatmaps, plot_probe, probe_table, read_diagnostics, run_probe

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: expected a positive integer")
    if args.coord_check is not None:
        return cmd_coord_check(args)
    args.json = args.json or Path("runs/probe/probe.json")
    _output_file("--json", args.json)
    if args.checkpoint is not None:
        schemes, depths, cfg = [], [], None
    else:
        schemes = _schemes("--schemes", args.schemes)
        depths = _int_list("--depths", args.depths or "12,48,96")
        if args.d_model is not None:
            args.overrides = list(args.overrides) + [f"model.d_model={args.d_model}"]
        cfg = _load(args)
        _check_probe_size(cfg, schemes, depths, args.batch_size)
    runs = run_probe(cfg, schemes, depths, args.batch_size, checkpoint=args.checkpoint, device=args.device)
    atomic_write_text(args.json, dumps({"runs": runs}, indent=1))
    plots = [args.json.with_suffix(".png")]
    plot_probe(runs, plots[0])
    if args.checkpoint is not None and (rows := read_diagnostics(args.checkpoint)):
        plots.append(args.json.with_name(args.json.stem + "_heatmap.png"))
        plot_heatmaps(rows, plots[1])
    print(probe_table(runs))
    if args.checkpoint is not None:
        print(
            "\nlayer-drop sensitivity (val loss increase with block l as the identity): "
            + ", ".join(f"{x:.3f}" for x in runs[0]["layer_drop"])
        )
    print(f"\njson: {args.json}  plots: {', '.join(str(p) for p in plots)}")
    bad = [f"{r['scheme']} L={r['depth']}" for r in runs if _has_nan(r) or not math.isfinite(r["loss"])]
    if bad:
        raise SpannormError(f"the probe of {', '.join(bad)} gave a non-finite loss or NaN values (null in {args.json})")


def cmd_coord_check(args) -> None:
    """``spannorm probe --coord-check``: the table, a JSON and a plot."""
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .coord_check import coord_table, plot_coord_check, run_coord_check

    axis = args.coord_check
    sizes = _int_list("--sizes", args.sizes or ("64,128,256,512,1024" if axis == "width" else "4,8,16,32,64"))
    if len(set(sizes)) < 2 or max(sizes) > MAX_SIZE:
        raise ConfigError(f"--sizes {args.sizes!r} is invalid: expected at least two distinct sizes up to {MAX_SIZE:,}")
    for flag, value in (("--steps", args.steps), ("--lr", args.lr)):
        if not value > 0:
            raise ConfigError(f"{flag} {value} is invalid: expected a positive number")
    other = {"width": "model.n_layers", "depth": "model.d_model"}[axis]
    fixed = _int_list("--depths", args.depths or "2") if axis == "width" else [args.d_model or 64]
    if len(fixed) != 1:
        raise ConfigError(f"--depths {args.depths!r} is invalid: --coord-check width takes one depth")
    args.overrides = list(args.overrides) + [f"{other}={fixed[0]}"]
    cfg = _load(args)
    parametrization = args.parametrization or ("mup" if axis == "width" else "completep")
    json_path = args.json or Path(f"runs/probe/coord_check_{axis}.json")
    _output_file("--json", json_path)
    rows = run_coord_check(
        cfg,
        axis,
        sorted(set(sizes)),
        _schemes("--schemes", args.schemes),
        Parametrization(parametrization),
        args.steps,
        args.lr,
        _int_list("--seeds", args.seeds),
        args.batch_size,
    )
    atomic_write_text(json_path, dumps({"rows": rows}, indent=1))
    plot_coord_check(rows, json_path.with_suffix(".png"))
    print(coord_table(rows))
    print(f"\njson: {json_path}  plot: {json_path.with_suffix('.png')}")


def _check_probe_size(cfg, schemes: list, depths: list[int], batch: int) -> None:
    """Refuse a probe too large for this machine before anything is built: the probe holds every scheme × depth
    model at once and one batch of ``batch`` sequences (train.check_memory's estimate, over all of them)."""
    import dataclasses

    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .train import check_memory

    if max(depths) > MAX_SIZE:
        raise ConfigError(f"--depths {max(depths):,} is invalid: expected depths of at most {MAX_SIZE:,}")
    model = dataclasses.replace(cfg.model, n_layers=min(MAX_SIZE, len(schemes) * sum(depths)))
    probe = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, batch_size=batch))
    check_memory(probe, "the probe", "--batch, --depths, --scheme's count, --d-model or train.seq_len")


def _has_nan(x) -> bool:
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, dict):
        x = list(x.values())
    return isinstance(x, list) and any(_has_nan(v) for v in x)


def cmd_bench(args) -> None:
    import importlib.util
    import json

    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .bench import DEPTHS, GPU_DEPTHS, cases, markdown, moe_cases, moe_ratios, ratios, run
    from .device import resolve as resolve_device
    from .device import slow_bf16_warning

    schemes = [s.value for s in _schemes("--schemes", args.schemes)]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            raise ConfigError(f"--dtypes {args.dtypes!r} is invalid: expected fp32 and/or bf16")
    if args.reps < 1:
        raise ConfigError(f"--reps {args.reps} is invalid: expected a positive integer")
    if args.json:
        _output_file("--json", args.json)
    if args.report:
        raw = read_bounded(args.report, MAX_REPORT_BYTES, "--report")
        try:
            result = json.loads(raw)
            text = "\n".join(moe_ratios(result) + ratios(result)) + "\n\n" + markdown(result)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"--report {str(args.report)!r} is not a spannorm bench --json file ({type(e).__name__}: {e})"
            ) from None
        print(text)
        return
    device = resolve_device(args.device, "--device")  # a one-line error for a bad value or a missing GPU
    if args.device == "auto":
        raise ConfigError("--device 'auto' is invalid for bench: expected cpu, cuda or cuda:N (it sets the size)")
    if "bf16" in dtypes and (warning := slow_bf16_warning(device, "--dtypes bf16")):
        print(warning, file=sys.stderr)
    if args.moe:
        result = run(moe_cases(dtypes, device=args.device, tf32=args.tf32), args.reps)
        print("\n".join(moe_ratios(result)))
        if args.json:
            atomic_write_text(args.json, dumps(result, indent=1))
        return
    if not args.no_hf and importlib.util.find_spec("transformers") is None:
        raise ConfigError("the HF reference needs transformers: pip install 'spannorm[bench]', or pass --no-hf")
    depths = args.depths or ",".join(map(str, DEPTHS if args.device == "cpu" else GPU_DEPTHS))
    result = run(
        cases(schemes, _int_list("--depths", depths), dtypes, not args.no_hf, args.compile, args.device, args.tf32),
        args.reps,
    )
    print("\n".join(ratios(result)) + "\n\n" + markdown(result))
    if args.json:
        atomic_write_text(args.json, dumps(result, indent=1))


def cmd_schemes(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .schemes import SCHEMES

    rows = [
        {
            "name": scheme.value,
            "class": cls.__name__,
            "equation": cls.equation,
            "init": cls.init_rule + (f"; {cls.measured.describe()}" if cls.measured else ""),
            "measured_factor": cls.measured.factor if cls.measured else None,
            "base_std": cls.base_std.describe(),
            "base_std_rule": cls.base_std.rule.value,
            "authors_std": cls.base_std.std,
            "authors_width": cls.base_std.width,
            "tied_head": cls.tie_embeddings,
            "reference": cls.reference,
        }
        for scheme, cls in SCHEMES.items()
    ]
    if args.json:
        print(dumps(rows, indent=1, ensure_ascii=False))
        return
    if args.markdown:
        print(
            "| `scheme` | block equation | recommended recipe | σ: base std at width d | tied head | reference |\n"
            "|---|---|---|---|---|---|"
        )
        for row in rows:
            tied = "yes" if row["tied_head"] else "no"
            print(
                f"| `{row['name']}` | {row['equation']} | {row['init']} | {row['base_std']} | {tied} | "
                f"{row['reference']} |"
            )
        return
    for row in rows:
        print(
            f"{row['name']} ({row['class']}): {row['equation']}\n    init: {row['init']}\n    "
            f"σ: {row['base_std']}\n    reference: {row['reference']}"
        )


def _hf():
    """``spannorm.hf`` (imports transformers), with a one-line error when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("this command needs transformers: pip install 'spannorm[hf]'")
    import transformers

    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from . import hf

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return hf


def _load_model(args):
    """(model, tokenizer, run config or None) of args.model on --device (default: auto)."""
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .device import resolve as resolve_device

    device = resolve_device(args.device or "auto", "--device")
    return _hf().load(args.model, device)


def cmd_export(args) -> None:
    out = _hf().export(args.run_dir, args.out_dir, args.to)
    kind = "LlamaForCausalLM" if args.to == "llama" else "SpanNormForCausalLM"
    print(f"{args.run_dir} -> {out} ({kind})")


MAX_REPORT_BYTES = 64 << 20  # a bench --json file is a few kB; /dev/zero or a log given by mistake is not one
MIN_TEMPERATURE = 1e-3  # below it the logits / temperature overflow (1e-39: inf - inf = nan); 0 is greedy


def cmd_generate(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from transformers import TextStreamer

    from .run_config import SEED_RANGE, valid_seed  # (run_config loads torch)

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid: expected a positive integer")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        raise ConfigError(
            f"--temperature {args.temperature} is invalid: expected 0 (greedy) or a finite number >= {MIN_TEMPERATURE}"
        )
    if args.seed is not None and not valid_seed(args.seed):
        raise ConfigError(f"--seed {args.seed} is invalid: expected {SEED_RANGE}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # (bytes that are not UTF-8 on the command line arrive as lone surrogates)
        raise ConfigError("--prompt is not UTF-8 text: give the prompt as UTF-8") from None
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k} is invalid: expected a positive integer")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} is invalid: expected a number in (0, 1]")
    model, tokenizer, _ = _load_model(args)
    _hf().generate(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        streamer=TextStreamer(tokenizer),
    )


def cmd_eval(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .evaluation import evaluate

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is invalid: expected a positive integer")
    if args.json:
        _output_file("--json", args.json)
    if args.lm_eval is not None:
        return cmd_lm_eval(args)
    if args.include_path is not None or args.limit is not None:
        raise ConfigError("--include-path and --limit go with --lm-eval TASKS")
    model, tokenizer, run_cfg = _load_model(args)
    # a run's validation split by default, but not when texts are given (then only with --validation: a split that
    # cannot be scored, its corpus changed or gone, never blocks scoring a text)
    validation = run_cfg is not None and (args.validation or ((args.model / "config.yaml").is_file() and not args.text))
    if args.validation and run_cfg is None:
        raise ConfigError(f"--validation: {str(args.model)!r} holds no spannorm run config (no validation split)")
    run_dir = args.model if (args.model / "config.yaml").is_file() else None
    scores = evaluate(model, tokenizer, run_cfg, args.text, args.seq_len, args.batch_size, validation, run_dir)
    report = {"model": str(args.model)} | scores
    for r in report["results"]:
        print(
            f"{r['name']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}, "
            f"bits per byte {r['bits_per_byte']:.4f} ({r['tokens']:,} tokens, {r['bytes']:,} bytes)"
        )
    if args.json:
        atomic_write_text(args.json, dumps(report, indent=1))


def cmd_lm_eval(args) -> None:
    """``spannorm eval --lm-eval TASKS``: lm-eval-harness's table of the tasks (spannorm.harness)."""
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .device import resolve as resolve_device

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--lm-eval {args.lm_eval!r} is invalid: expected comma-separated task names")
    if args.text:
        raise ConfigError("--text goes without --lm-eval: run them as two commands")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} is invalid: expected a positive integer")
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigError(f"--seq-len {args.seq_len} is invalid: expected a positive integer")
    if not ((args.model / "config.json").is_file() or (args.model / "config.yaml").is_file()):
        raise ConfigError(
            f"{str(args.model)!r} is neither a run directory (config.yaml) nor a Hugging Face folder (config.json)"
        )
    _hf()  # (a one-line error without transformers; registers spannorm's model with the Auto classes)
    from .harness import evaluate, table  # (here: it needs transformers and lm_eval, optional dependencies)

    device = str(resolve_device(args.device or "auto", "--device"))
    out = evaluate(args.model, tasks, args.include_path, args.limit, args.batch_size or 16, device, args.seq_len)
    print(table(out))
    if args.json:
        report = {"model": str(args.model), "lm_eval": {k: out[k] for k in ("results", "versions", "n-samples")}}
        atomic_write_text(args.json, dumps(report, indent=1))


def cmd_track(args) -> None:
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    from .trackers import replay

    names = [n.strip() for n in args.to.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--to {args.to!r} is invalid: expected tensorboard and/or wandb")
    wandb = {"wandb_mode": args.wandb_mode, "wandb_project": args.wandb_project}
    n_metrics, n_diagnostics = replay(args.run_dir, names, {k: v for k, v in wandb.items() if v is not None})
    print(f"{args.run_dir}: {n_metrics} metrics rows, {n_diagnostics} diagnostics rows -> {', '.join(names)}")


FITTED_THREADS = {"train", "compare", "study", "probe", "eval", "generate"}  # (bench times threads of its own)


def _fit_threads() -> None:
    """torch's threads: the cores not busy with other work (spannorm.threads); train.threads still decides a run's."""
    # imported here, not above: the CLI starts (--help, argument errors) without loading torch
    import torch

    torch.set_num_threads(fit_threads())


def _one_line(message: str) -> str:
    """``message`` on one line that any stream can write (a lone surrogate, from a file's bad escape, escaped)."""
    return " ".join(message.split()).encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = {
        "config": cmd_config_show,
        "data": cmd_data_prepare,
        "train": cmd_train,
        "compare": cmd_compare,
        "schemes": cmd_schemes,
        "probe": cmd_probe,
        "bench": cmd_bench,
        "study": cmd_study,
        "export": cmd_export,
        "generate": cmd_generate,
        "eval": cmd_eval,
        "track": cmd_track,
    }[args.command]
    try:
        if args.command in FITTED_THREADS and "OMP_NUM_THREADS" not in os.environ:
            _fit_threads()
        handler(args)
        sys.stdout.flush()  # here, so that a closed pipe (spannorm schemes | head) is caught below
    except BrokenPipeError:  # the reader went away: end quietly, as a process ended by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
        return 141
    except SpannormError as e:
        print(f"spannorm: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # one at a file edge that no command turned into its own error: one line all the same
        what = repr(str(e.filename)) if e.filename is not None else "a file"
        print(f"spannorm: error: {_one_line(str(os_error(e, what)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spannorm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
