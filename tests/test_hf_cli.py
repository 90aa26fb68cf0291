"""spannorm export (Hugging Face and Llama folders), generate and eval on tiny trained runs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from spannorm.cli import main  # noqa: E402
from spannorm.model_config import Scheme  # noqa: E402
from spannorm.run_config import load_config  # noqa: E402
from spannorm.schemes import use_tied_embeddings  # noqa: E402
from spannorm.train import train  # noqa: E402

RUNS = {  # name -> overrides of the tiny preset
    "span": [],
    "moe": ["model.moe.n_experts=4", "model.moe.top_k=2"],
    "pre": ["model.scheme=pre", "model.tie_embeddings=false"],  # untied head: lm_head.weight of its own
    "pre-bpe": ["model.scheme=pre", "data.tokenizer=bpe", "data.vocab_size=320"],  # tied head
}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Tiny runs of 10 steps (a validation pass and a checkpoint at the end)."""
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    for name, more in RUNS.items():
        cfg = load_config(
            "tiny",
            [
                f"data.corpus={corpus}",
                f"data.cache_dir={cache}",
                "train.max_steps=10",
                "train.eval_interval=10",
                "train.ckpt_interval=10",
                "train.probe_interval=0",
                *more,
            ],
        )
        train(cfg, root / name, progress=False)
    return root


def checkpoint_lm(run_dir):
    """The run's model loaded straight from its checkpoint, without spannorm.hf."""
    from safetensors.torch import load_model

    from spannorm.model import build_model

    cfg = load_config(run_dir / "config.yaml")
    lm = build_model(cfg.model)
    load_model(
        lm, str(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() / "model.safetensors")
    )
    return lm.eval(), cfg


def sample_ids(cfg, n=24):
    return torch.randint(0, cfg.model.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["span", "moe", "pre-bpe"])
def test_export_gives_the_checkpoint_logits(runs, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from spannorm.data import prepare

    out = tmp_path / "hf"
    assert main(["export", str(runs / name), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "spannorm_run.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["model_type"] == "spannorm"
    lm, cfg = checkpoint_lm(runs / name)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = sample_ids(cfg)
    with torch.no_grad():
        assert torch.equal(model(idx).logits, lm(idx)[0])

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    text = "The king, the fool — and 'honour'!\n"
    if cfg.data.tokenizer.value == "byte":
        expected = list(text.encode("utf-8"))
    else:
        from tokenizers import Tokenizer

        expected = Tokenizer.from_file(str(prepare(cfg.data) / "tokenizer.json")).encode(text).ids
        assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer(text, add_special_tokens=False).input_ids == expected
    assert tokenizer.decode(expected) == text


@pytest.mark.parametrize("scheme", [s.value for s in Scheme])
def test_export_every_scheme(corpus, tmp_path, scheme):
    """A 2-step run of each scheme: its export loads with the checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        "tiny",
        [
            f"data.corpus={corpus}",
            f"model.scheme={scheme}",
            "train.max_steps=2",
            "train.eval_interval=2",
            "train.ckpt_interval=2",
            "train.probe_interval=0",
        ],
    )
    train(cfg, tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    lm, cfg = checkpoint_lm(tmp_path / "run")
    idx = sample_ids(cfg)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(idx).logits, lm(idx)[0])


@pytest.mark.parametrize("name", ["pre", "pre-bpe"])
def test_export_to_llama(runs, tmp_path, name):
    """The folder loads in plain transformers (no spannorm import) with our logits within 1e-5 (fp32)."""
    out = tmp_path / "llama"
    assert main(["export", str(runs / name), str(out), "--to", "llama"]) == 0
    lm, cfg = checkpoint_lm(runs / name)
    idx = sample_ids(cfg)
    torch.save(idx, tmp_path / "idx.pt")
    code = f"""
import sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained({str(out)!r}).eval()
AutoTokenizer.from_pretrained({str(out)!r})
assert not any(m.split(".")[0] == "spannorm" for m in sys.modules)
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "idx.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    with torch.no_grad():
        ours = lm(idx)[0]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] == use_tied_embeddings(cfg.model)


def test_export_to_llama_refuses_what_llama_cannot_express(runs, tmp_path, capsys):
    assert main(["export", str(runs / "span"), str(tmp_path / "x"), "--to", "llama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.scheme=span" in err and "PreNorm" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "more",
    [
        {"norm": "layer"},
        {"moe": {"n_experts": 4}},
        {"final_norm": False},
        {"norm": "dyt", "dyt": {"recipe": "llm"}},
        {"qk_norm": "head"},
    ],
    ids=str,
)
def test_llama_refusal_names_the_option(more):
    from spannorm.config import dotted
    from spannorm.hf import llama_refusal
    from spannorm.model import build_model
    from spannorm.model_config import ModelConfig

    reason = llama_refusal(build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, scheme="pre", **more)))
    assert f"model.{next(iter(dotted(more)))}=" in reason  # (a group's option: model.moe.n_experts)
    assert llama_refusal(build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, scheme="pre"))) is None


@pytest.mark.parametrize(
    "more",
    [
        {"parametrization": "mup", "base_width": 16},
        {"parametrization": "completep", "base_depth": 2},
        {"parametrization": "completep", "base_width": 16, "base_depth": 4},  # (width alone)
    ],
    ids=["mup", "completep", "completep-width"],
)
def test_llama_refuses_a_parametrization_away_from_its_base_shape(more):
    """Issue 30: µP's multipliers (attention scale, logits × 1/m) and CompleteP's (branches × L_b/L) are not Llama's:
    refused in one line naming model.parametrization; at its base shape it is the standard model, and exports with
    its logits (fp32, 1e-5)."""
    from spannorm.hf import llama_refusal, to_llama
    from spannorm.model import build_model
    from spannorm.model_config import ModelConfig

    shape = {"d_model": 32, "n_layers": 4, "n_heads": 2, "scheme": "pre", "tie_embeddings": False}
    reason = llama_refusal(build_model(ModelConfig(**shape, **more)))
    name = more["parametrization"]
    assert reason.startswith(f"model.parametrization={name} away from its base shape") and "\n" not in reason
    at_base = ModelConfig(**shape, **more | {"base_width": 32, "base_depth": 4})
    torch.manual_seed(0)
    lm = build_model(at_base).eval()
    assert llama_refusal(lm) is None
    with torch.no_grad():
        for p in lm.parameters():  # (off their init values: a weight that failed to map would show)
            p.add_(0.05 * torch.randn_like(p))
        idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(to_llama(lm, 64, None)(idx).logits, lm(idx)[0], rtol=0, atol=1e-5)


def test_llama_refuses_mhc_in_one_line():
    """Issue 31: Llama has one residual stream; mHC's n streams and their mixing do not map onto it."""
    from spannorm.hf import llama_refusal
    from spannorm.model import build_model
    from spannorm.model_config import ModelConfig

    reason = llama_refusal(build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, scheme="mhc")))
    assert "model.scheme=mhc" in reason and "\n" not in reason


def test_export_refuses_an_existing_folder(runs, tmp_path, capsys):
    assert main(["export", str(runs / "span"), str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generate_streams_the_greedy_continuation(runs, tmp_path, capsys):
    """Greedy CLI output = the prompt + the model's greedy continuation, from the run and from its export."""
    from spannorm.hf import byte_tokenizer, from_run

    prompt, n = "The king", 12
    model, _ = from_run(runs / "span")
    tok = byte_tokenizer()
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        for _ in range(n):  # greedy by hand, full forward each step
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    expected = tok.decode(ids[0].tolist())
    args = ["--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0", "--device", "cpu"]
    assert main(["generate", str(runs / "span"), *args]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["export", str(runs / "span"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_sampling_is_seeded(runs, capsys):
    args = [
        "generate",
        str(runs / "pre-bpe"),
        "--prompt",
        "The",
        "--max-new-tokens",
        "10",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--temperature",
        "0.8",
        "--device",
        "cpu",
    ]
    outs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("The")
    assert main(["generate", str(runs / "span"), "--prompt", "x", "--top-p", "1.5"]) == 2


@pytest.mark.parametrize("name", ["span", "moe", "pre-bpe"])
def test_eval_reproduces_the_trainers_validation_loss(runs, name):
    """Scoring the trainer's final validation windows gives its val loss; eval's own windows cover the
    whole split, each token but the first predicted once."""
    from spannorm.data import TokenData, prepare
    from spannorm.evaluation import evaluate, score, windows
    from spannorm.hf import load

    model, tokenizer, cfg = load(runs / name)
    t = cfg.train
    data = TokenData(prepare(cfg.data), t.seq_len)
    trainer_windows = [
        w.numpy() for x, y in data.val_batches(t.batch_size, t.eval_batches) for w in torch.cat([x, y[:, -1:]], 1)
    ]
    nats, tokens = score(model, trainer_windows, t.batch_size)
    summary = json.loads((runs / name / "summary.json").read_text())
    assert nats / tokens == pytest.approx(summary["final_val_loss"], rel=1e-5)

    wins = windows(np.asarray(data.val), t.seq_len)
    assert np.array_equal(np.concatenate([wins[0][:1]] + [w[1:] for w in wins]), data.val)
    (val,) = evaluate(model, tokenizer, cfg, [])["results"]
    assert val["name"] == "validation" and val["tokens"] == data.val.size - 1


def test_eval_bits_per_byte_agree_across_tokenizers(runs, corpus, tmp_path, capsys):
    """A byte run and a BPE run on the same text divide their total nats by the same UTF-8 bytes."""
    text = corpus / "doc00.txt"
    n_bytes = len(text.read_bytes())
    reports = {}
    for name in ("span", "pre-bpe"):
        out = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "eval",
                    str(runs / name),
                    "--text",
                    str(text),
                    "--text",
                    str(corpus),
                    "--validation",
                    "--json",
                    str(out),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        reports[name] = json.loads(out.read_text())
        assert [r["name"] for r in reports[name]["results"]] == ["validation", str(text), str(corpus)]
        for r in reports[name]["results"]:
            assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]))
            assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    byte, bpe = (reports[n]["results"][1] for n in ("span", "pre-bpe"))
    first_token = n_bytes - bpe["bytes"]  # the bytes of the one token neither predicts
    assert byte["bytes"] == byte["tokens"] == n_bytes - 1 and 0 < first_token < 8
    assert bpe["tokens"] < bpe["bytes"] / 2  # a BPE token stands for several bytes
    assert "bits per byte" in capsys.readouterr().out


def test_eval_needs_text_without_a_run_config(runs, tmp_path, capsys):
    from spannorm.hf import from_run

    model, _ = from_run(runs / "span")
    model.save_pretrained(tmp_path / "bare")
    from spannorm.hf import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "bare")
    assert main(["eval", str(tmp_path / "bare"), "--device", "cpu"]) == 2
    assert "--seq-len" in capsys.readouterr().err


def test_an_export_is_readable_by_colleagues_and_says_what_it_is(runs, tmp_path):
    """Issue 26: every file of an exported folder has the umask's permissions (safetensors wrote 0600), a model card
    (README.md with the Hub's metadata block, the run's numbers, no local path), eos in generation_config.json, and
    the tokenizer's model_max_length is the training sequence length."""
    import os
    import stat

    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(runs / "pre-bpe"), str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in out.iterdir()} == {
        f.name: oct(0o666 & ~umask) for f in out.iterdir()
    }
    card = (out / "README.md").read_text()
    summary = json.loads((runs / "pre-bpe" / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert f"final validation loss {summary['final_val_loss']:.4f}" in card and str(tmp_path.parent) not in card
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.model_max_length == load_config(runs / "pre-bpe" / "config.yaml").train.seq_len


@pytest.mark.parametrize(
    "order",
    ["import spannorm; import transformers", "import transformers; import spannorm"],
    ids=["spannorm-first", "transformers-first"],
)
def test_import_spannorm_is_enough_for_the_auto_classes(runs, tmp_path, order):
    """Issue 26: after `import spannorm` (in either order with transformers), AutoModelForCausalLM loads an exported
    folder; `import spannorm` alone imports neither transformers nor torch."""
    assert main(["export", str(runs / "span"), str(tmp_path / "hf")]) == 0
    alone = "import sys, spannorm; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    load = f"{order}; m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}); "
    load += "assert type(m).__name__ == 'SpanNormForCausalLM'"
    for code in (alone, load):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
