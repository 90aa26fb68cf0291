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
        (dict(span_c=-1.0), "model.span_c=-1.0 is invalid: expected a positive number"),
        (dict(span_scale="sqrt"), "model.span_scale='sqrt' is invalid: expected one of init, multiplier, norm, none"),
        (dict(init="xavier"), "model.init='xavier' is invalid: expected one of recommended, shared"),
        (dict(dyt_recipe="llama"), "model.dyt_recipe='llama' is invalid: expected one of plain, llm"),
        (dict(dyt_alpha0_attn=0.0), "model.dyt_alpha0_attn=0.0 is invalid: expected a positive number"),
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
