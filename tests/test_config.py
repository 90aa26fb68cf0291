import subprocess
import sys

import pytest

from spannorm import ConfigError, ModelConfig, Scheme, build_model
from spannorm.run_config import load_config, preset_names, run_config_from_dict


def test_public_api_builds_each_scheme():
    for scheme in Scheme:
        model = build_model(ModelConfig(scheme=scheme.value, d_model=32, n_heads=2, n_layers=2))
        assert model.cfg.scheme is scheme


def test_model_config_imports_neither_torch_nor_the_model():
    """ModelConfig and its enums sit below the model: a config can be built and checked without torch.
    The import runs the package's __init__ too, which defers its torch names (LM, build_model, SCHEMES)."""
    code = (
        "import sys; from spannorm.model_config import ModelConfig; ModelConfig(scheme='pre'); "
        "loaded = {'torch', 'spannorm.model', 'spannorm.schemes', 'spannorm.layers'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            dict(scheme="spam"),
            "model.scheme='spam' is invalid: expected one of pre, post, span, deepnorm, b2t, "
            "admin, peri, sandwich, mixln, hybrid, hybrid_star, lns, residual, siamese, deepscale",
        ),
        (dict(scheme="SPAN"), "model.scheme='SPAN'"),  # no case folding, no silent fallback
        (dict(norm="batch"), "model.norm='batch' is invalid: expected one of rms, layer, dyt"),
        (dict(deepscale_k=8.0, n_layers=4), "model.deepscale_k=8.0 is invalid: expected a number in (0, n_layers=4]"),
        (dict(d_model=30, n_heads=4), "model.d_model=30 is invalid: expected a multiple of model.n_heads=4"),
        (dict(d_model=12, n_heads=4), "model.n_heads=4"),  # head size 3 is odd: RoPE needs even
        (dict(n_layers=0), "model.n_layers=0 is invalid: expected a positive integer"),
        (dict(span={"c": -1.0}), "model.span.c=-1.0 is invalid: expected a positive number"),
        (
            dict(span={"scale": "sqrt"}),
            "model.span.scale='sqrt' is invalid: expected one of init, multiplier, norm, none",
        ),
        (dict(init="xavier"), "model.init='xavier' is invalid: expected one of recommended, shared"),
        (dict(dyt={"recipe": "llama"}), "model.dyt.recipe='llama' is invalid: expected one of plain, llm"),
        (dict(dyt={"alpha0_attn": 0.0}), "model.dyt.alpha0_attn=0.0 is invalid: expected a positive number"),
        (dict(moe={"top_k": 0}), "model.moe.top_k=0 is invalid: expected a positive integer"),
        (dict(moe=3), "model.moe=3 is invalid: expected a mapping of n_experts, top_k"),
    ],
)
def test_model_config_errors_name_field_value_and_valid(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert fragment in str(e.value)


def test_presets_load_and_overrides_apply():
    assert {"tiny", "small"} <= set(preset_names())
    cfg = load_config("tiny", ["model.scheme=post", "train.lr=1e-3", "train.precision=bf16"])
    assert cfg.model.scheme is Scheme.POST and cfg.train.lr == 1e-3 and cfg.train.precision.value == "bf16"
    assert cfg.model.vocab_size == 256  # from the byte tokenizer
    bpe = load_config("tiny", ["data.tokenizer=bpe", "data.vocab_size=1000"])
    assert bpe.model.vocab_size == 1000


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.bogus=1"], "unknown key model.bogus; valid keys: model.vocab_size"),
        (["bogus.x=1"], "unknown key bogus; valid top-level keys: model, data, train"),
        (["train.lr=-0.001"], "train.lr=-0.001 is invalid: expected a positive number"),
        (["train.lr=fast"], "train.lr='fast' is invalid: expected a number"),
        (["train.max_steps=1.5"], "train.max_steps=1.5 is invalid: expected an integer"),
        (["model.vocab_size=100"], "model.vocab_size=100 is invalid"),
        (["data.tokenizer=wordpiece"], "data.tokenizer='wordpiece' is invalid: expected byte, bpe, or a path to a"),
        (["lr"], "--set 'lr' is invalid: expected KEY=VALUE"),
    ],
)
def test_run_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert fragment in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*small.*tiny"):
        load_config("huge")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="model=.*a mapping"):
        run_config_from_dict({"model": 3})


def test_every_option_is_declared_once_with_its_doc_and_shown(capsys):
    """Issue 27: each field of a run's config carries its doc where it is defined (config.option); `spannorm config
    show` prints the resolved config as YAML that --config reads back, each field under its doc, and the --help of a
    command that takes --config lists every key with its doc and default."""
    import dataclasses
    import typing

    from spannorm.cli import main
    from spannorm.config import described, parse_yaml, short
    from spannorm.data_config import DataConfig
    from spannorm.model_config import DyTConfig, MoEConfig, SpanConfig
    from spannorm.run_config import GuardConfig, RunConfig, TrainConfig

    def leaves(cls) -> int:  # the fields that hold a value, those of the option groups included
        hints = typing.get_type_hints(cls)
        return sum(
            leaves(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else 1 for f in dataclasses.fields(cls)
        )

    for cls in (RunConfig, ModelConfig, DataConfig, TrainConfig, MoEConfig, DyTConfig, SpanConfig, GuardConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("doc")]
        assert not undocumented, f"{cls.__name__}: fields without a doc: {undocumented}"
    argv = ["config", "show", "--config", "tiny", "--set", "train.lr=0.01", "--set", "model.norm_eps=1e-5"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    cfg = load_config("tiny", ["train.lr=0.01", "model.norm_eps=1e-5"])
    assert run_config_from_dict(parse_yaml(shown, "shown")) == cfg
    flat = " ".join(line.strip().lstrip("# ") for line in shown.splitlines())
    rows = described(cfg)
    assert len(rows) == leaves(RunConfig) == 33 + 7 + 36  # (model, data, train: every option, as before the groups)
    for key, _, doc in rows:
        assert f"{key.rsplit('.', 1)[1]}: " in shown and doc in flat, key
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helped = capsys.readouterr().out
    for key, value, doc in described(RunConfig()):
        assert f"  {key} (default {short(value)}): " in helped and doc in " ".join(helped.split()), key
    assert main(["config", "show", "--set", "train.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == "spannorm: error: train.lr=-1.0 is invalid: expected a positive number"


def test_a_commands_help_and_the_config_layer_load_no_torch():
    """A run's config (spannorm.run_config) and the CLI's --help, config keys included, import neither torch nor the
    data pipeline: a config is built and checked, and help printed, without them."""
    code = (
        "import sys, contextlib, io; from spannorm.run_config import load_config; load_config('tiny'); "
        "from spannorm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['train', '--help'])\n"
        "    except SystemExit: pass\n"
        "loaded = {'torch', 'numpy', 'spannorm.data', 'spannorm.model'} & set(sys.modules); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_set_takes_several_overrides_as_repeated_sets_do(capsys):
    """`--set a=1 b=2` is `--set a=1 --set b=2` (a new user's first try was refused as "unrecognized arguments")."""
    from spannorm.cli import main

    shown = []
    for sets in (
        ["--set", "train.lr=0.01", "model.n_layers=3"],
        ["--set", "train.lr=0.01", "--set", "model.n_layers=3"],
    ):
        assert main(["config", "show", "--config", "tiny", *sets]) == 0
        shown.append(capsys.readouterr().out.split("\n", 1)[1])  # (its first line echoes the command)
    assert shown[0] == shown[1] and "n_layers: 3" in shown[0] and "lr: 0.01" in shown[0]
    assert main(["config", "show", "--config", "tiny", "--set", "train.lr=0.01", "oops"]) == 2
    assert "--set 'oops' is invalid" in capsys.readouterr().err
