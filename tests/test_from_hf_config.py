"""spannorm train --from-hf-config: a model of the shape of a Hugging Face Llama config.json, any scheme."""

import json

import pytest

pytest.importorskip("transformers")

from conftest import one_line_error  # noqa: E402

from spannorm.cli import main  # noqa: E402
from spannorm.hf import model_overrides_from_llama  # noqa: E402
from spannorm.model import build_model  # noqa: E402
from spannorm.run_config import load_config  # noqa: E402
from spannorm.schemes import use_final_norm, use_tied_embeddings  # noqa: E402
from spannorm.train import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = [  # a pre model with RMSNorm (what --to llama exports), none of whose shape is the tiny preset's default
    "model.scheme=pre",
    "model.d_model=48",
    "model.n_heads=3",
    "model.n_layers=3",
    "model.d_ff=80",
    "model.norm_eps=1e-5",
    "model.rope_theta=500000.0",
    "model.tie_embeddings=false",
]
QUICK = ["train.max_steps=2", "train.eval_interval=2", "train.ckpt_interval=2", "train.probe_interval=0"]
LLAMA = {  # a hand-written Llama config.json of the tiny preset's shape (transformers 4's way of writing rope_theta)
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
}


def shape(m):
    """The fields of a ModelConfig that a Llama config.json carries."""
    return {
        "vocab_size": m.vocab_size,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "ffn_dim": m.ffn_dim,
        "norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "tied": use_tied_embeddings(m),
    }


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """(source run's RunConfig, its `export --to llama` folder)."""
    root = tmp_path_factory.mktemp("llama")
    cfg = load_config("tiny", [f"data.corpus={corpus}", *QUICK, *SHAPE])
    train(cfg, root / "run", progress=False)
    assert main(["export", str(root / "run"), str(root / "hf"), "--to", "llama"]) == 0
    return cfg, root / "hf"


def write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_round_trip_through_export_to_llama(exported, corpus):
    from transformers import LlamaForCausalLM

    source, folder = exported
    overrides = model_overrides_from_llama(json.loads((folder / "config.json").read_text()))
    cfg = load_config("tiny", [f"data.corpus={corpus}", *overrides])  # (the tiny preset: scheme span, d_model 32)
    assert shape(cfg.model) == shape(source.model)
    assert (cfg.model.scheme.value, cfg.model.norm.value, cfg.model.moe.enabled, use_final_norm(cfg.model)) == (
        "pre",
        "rms",
        False,
        True,
    )
    llama = LlamaForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in build_model(cfg.model).parameters()) == llama.num_parameters()


def test_train_from_hf_config_any_scheme(exported, corpus, tmp_path, capsys):
    source, folder = exported
    out = tmp_path / "span"
    argv = ["train", "--config", "tiny", "--from-hf-config", str(folder), "--corpus", str(corpus), "--quiet"]
    sets = ["--set", "model.scheme=span"] + [a for s in QUICK for a in ("--set", s)]
    assert main([*argv, *sets, "--out", str(out)]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.model.scheme.value == "span" and shape(cfg.model) == shape(source.model)
    # the file itself rather than its folder; an explicit --set wins over the file's value
    out = tmp_path / "one-layer"
    argv[4] = str(folder / "config.json")
    assert main([*argv, *sets, "--set", "model.n_layers=1", "--out", str(out)]) == 0
    assert load_config(out / "config.yaml").model.n_layers == 1
    capsys.readouterr()


def test_transformers_5_rope_parameters(tmp_path, tiny_overrides):
    config = {k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    cfg = load_config("tiny", tiny_overrides + model_overrides_from_llama(config))
    assert cfg.model.rope_theta == 250000.0 and cfg.model.tie_embeddings is True


def test_absent_fields_take_llamas_defaults(tiny_overrides):
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    cfg = load_config("tiny", tiny_overrides + model_overrides_from_llama({k: LLAMA[k] for k in required}))
    assert (cfg.model.norm_eps, cfg.model.rope_theta, cfg.model.tie_embeddings) == (1e-6, 10000.0, False)


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "SwiGLU"]),
        ({"num_key_value_heads": 1}, ["num_key_value_heads=1", "grouped-query"]),
        ({"head_dim": 8}, ["head_dim=8"]),
        ({"attention_bias": True}, ["attention_bias=True", "biases"]),
        ({"attention_dropout": 0.1}, ["attention_dropout=0.1", "dropout"]),
        ({"model_type": "mistral"}, ["model_type='mistral'"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_type='llama3'"]),
        ({"hidden_size": None}, ["has no hidden_size"]),
        ({"num_hidden_layers": 2.5}, ["num_hidden_layers=2.5", "a positive integer"]),
        ({"rms_norm_eps": -1}, ["rms_norm_eps=-1", "a positive number"]),
        ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings='yes'"]),
        ({"vocab_size": 32000}, ["model.vocab_size=32000", "expected 256", "tokenizer's vocabulary"]),
        ({"max_position_embeddings": 16}, ["max_position_embeddings=16", "train.seq_len=32"]),
    ],
)
def test_what_spannorm_cannot_express_is_one_line(tmp_path, capsys, corpus, change, fragments):
    path = write(tmp_path, LLAMA | change)
    argv = [
        "train",
        "--config",
        "tiny",
        "--corpus",
        str(corpus),
        "--from-hf-config",
        str(path),
        "--out",
        str(tmp_path / "r"),
    ]
    one_line_error(capsys, argv, *fragments)
    assert not (tmp_path / "r").exists()


def test_bad_files_are_one_line(tmp_path, capsys):
    def error(path, *fragments):
        one_line_error(capsys, ["train", "--config", "tiny", "--from-hf-config", str(path)], *fragments)

    error(tmp_path / "missing.json", "missing.json", "does not exist")
    error(tmp_path, "without a config.json")
    error(write(tmp_path, "[1, 2]"), "must hold a JSON object")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 32,')
    error(bad, "bad.json", "is not valid JSON")
    bad.write_bytes(b"\xff\xfe{}")
    error(bad, "is not valid JSON")
    bad.write_text("[" * 100_000 + "]" * 100_000)
    error(bad, "is not valid JSON")
    one_line_error(
        capsys, ["train", "--out", str(tmp_path), "--resume", "--from-hf-config", str(bad)], "--from-hf-config"
    )
