"""Hugging Face integration: config and model round trip, KV-cache generation, transformers.Trainer."""

import subprocess
import sys

import pytest
import torch

from spannorm.model_config import Scheme

hf = pytest.importorskip("spannorm.hf")
hf_model = pytest.importorskip("spannorm.hf_model")

MOE = {"moe": {"n_experts": 4, "top_k": 2, "n_shared_experts": 1}}
# every scheme; one MoE model; the norms and the DyT LLM recipe (its embedding scale)
VARIANTS = [(s.value, {}) for s in Scheme] + [
    ("span", MOE),
    ("pre", {"norm": "layer"}),
    ("span", {"norm": "dyt", "dyt": {"recipe": "llm"}}),
    ("pre", {"qk_norm": "head"}),  # issue 31: Qwen3's axis
    ("pre", {"norm": "derf", "dyt": {"recipe": "llm"}}),  # issue 31: Derf
    ("span", {"qk_norm": "all"}),  # OLMo 2's
    # issue 30: away from the base shape (attention scale sqrt(hd_b)/hd, logits × 1/m, completep's branches × L_b/L)
    ("pre", {"parametrization": "mup", "base_width": 16}),
    ("span", {"parametrization": "completep", "base_width": 16, "base_depth": 2}),
]
IDS = [s + "".join(f"-{k}={v}" for k, v in more.items()) for s, more in VARIANTS]


def tiny_model(scheme, seed=0, **more):
    """A 4-block model (Mix-LN then has a PostNorm and PreNorm blocks) with every parameter moved off
    its init value, so that a weight that failed to load would show in the logits."""
    from spannorm.model_config import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=2, scheme=scheme, **more)
    model = hf.SpanNormForCausalLM(hf.SpanNormConfig.from_model_config(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_import_spannorm_does_not_import_transformers():
    code = "import sys, spannorm, spannorm.cli; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_carries_every_model_field():
    from spannorm.model_config import ModelConfig

    cfg = ModelConfig(
        d_model=64,
        n_heads=4,
        scheme="deepnorm",
        norm="layer",
        moe={"n_experts": 4, "top_k": 1, "capacity_factor": 1.5},
        final_norm=True,
        tie_embeddings=False,
        qk_norm="all",
    )
    config = hf.SpanNormConfig.from_model_config(cfg)
    assert config.scheme == "deepnorm" and config.moe["top_k"] == 1 and config.hidden_size == 64
    assert hf.SpanNormConfig.from_dict(config.to_dict()).model_config() == cfg


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_config_carries_the_parametrization(parametrization):
    """Issue 30: model.parametrization is an enum field like the others (its string in config.json, the enum back);
    base_width and base_depth travel with it, and a config without them is the standard model's."""
    from spannorm.model_config import ModelConfig, Parametrization

    cfg = ModelConfig(d_model=64, n_layers=6, n_heads=4, parametrization=parametrization, base_width=32, base_depth=3)
    config = hf.SpanNormConfig.from_model_config(cfg)
    saved = config.to_dict()
    assert (saved["parametrization"], saved["base_width"], saved["base_depth"]) == (parametrization, 32, 3)
    back = hf.SpanNormConfig.from_dict(saved).model_config()
    assert back == cfg and back.parametrization is Parametrization(parametrization)
    old = {k: v for k, v in saved.items() if k not in ("parametrization", "base_width", "base_depth")}
    assert hf.SpanNormConfig.from_dict(old).model_config().parametrization is Parametrization.STANDARD


@pytest.mark.parametrize(("scheme", "more"), VARIANTS, ids=IDS)
def test_save_pretrained_round_trip(tmp_path, scheme, more):
    from transformers import AutoModelForCausalLM

    model = tiny_model(scheme, **more)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is hf.SpanNormForCausalLM and not any(info.values()), info
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx).logits, model(idx).logits)
        assert torch.equal(model(idx).logits, model.lm(idx)[0])  # the wrapper is the trainer's model


@pytest.mark.parametrize(("scheme", "more"), VARIANTS, ids=IDS)
def test_kv_cache_matches_full_forward(scheme, more):
    """Greedy generate() with the cache gives the tokens it gives without; logits of tokens fed on top
    of a cache (one, then several at once) equal the full forward's."""
    model = tiny_model(scheme, **more)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    lengths = []
    hook = model.lm.embed.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(prompt, use_cache=True, **kw)
    assert lengths == [5] + [1] * 7  # the prompt, then one new token per step
    lengths.clear()
    assert torch.equal(with_cache, model.generate(prompt, use_cache=False, **kw))
    assert lengths == list(range(5, 13))
    hook.remove()

    seq = with_cache[:, :12]
    with torch.no_grad():
        full = model(seq).logits
        out = model(seq[:, :6], use_cache=True)
        cache = getattr(out, hf_model.CACHE)
        step = model(seq[:, 6:7], **{hf_model.CACHE: cache}).logits
        rest = model(seq[:, 7:], **{hf_model.CACHE: cache}).logits
    torch.testing.assert_close(torch.cat([out.logits, step, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_padding_is_refused():
    model = tiny_model("span")
    with pytest.raises(ValueError, match="padding"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_byte_tokenizer_is_the_byte_encoding():
    tok = hf.byte_tokenizer()
    text = "héllo wörld\n\t€ 😀 \x00\x7f  two  spaces"
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert len(tok) == 256


@pytest.mark.parametrize("more", [{}, MOE], ids=["dense", "moe"])
def test_transformers_trainer_trains(tmp_path, more):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (the test extra installs it)
    from conftest import WORDS
    from transformers import Trainer, TrainingArguments

    model = tiny_model("span", **more).train()
    text = " ".join(WORDS * 8).encode("utf-8")
    T = 32
    rows = [torch.tensor(list(text[i : i + T])) for i in range(0, len(text) - T, T)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == args.max_steps and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and result.global_step == args.max_steps
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("qkv.weight"))


def test_the_byte_tokenizer_pads_and_keeps_a_text_s_own_characters(tmp_path):
    """Issue 26: padding=True works with the byte tokenizer (pad: byte 0, attention mask 0 there; 256 ids, as the
    model has), a text holding byte 0's stand-in "Ā" still encodes to its UTF-8 bytes, and both hold after
    save_pretrained and AutoTokenizer."""
    from transformers import AutoTokenizer

    for tok in (hf.byte_tokenizer(), None):
        if tok is None:
            hf.byte_tokenizer().save_pretrained(tmp_path)
            tok = AutoTokenizer.from_pretrained(tmp_path)
        batch = tok(["ab", "abcd"], padding=True)
        assert batch["input_ids"] == [[97, 98, 0, 0], [97, 98, 99, 100]]
        assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
        assert tok("Āb")["input_ids"] == list("Āb".encode()) and len(tok) == 256
        assert tok.decode(tok("naïve Ā")["input_ids"]) == "naïve Ā"
