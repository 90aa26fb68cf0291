"""Hugging Face integration: tokenizers, loading and export; ``SpanNormConfig`` and ``SpanNormForCausalLM`` live in
:mod:`spannorm.hf_model` (the file an export carries as its remote code).

Importing this module imports ``transformers`` and registers the classes with ``AutoConfig`` /
``AutoModelForCausalLM``; ``import spannorm`` imports it as soon as transformers is, never before. After it,
``AutoModelForCausalLM.from_pretrained(folder)`` loads any folder ``spannorm export`` wrote; where spannorm is
not installed, ``from_pretrained(folder, trust_remote_code=True)`` loads it from the code the folder carries.

``SpanNormForCausalLM`` wraps the one model implementation, :class:`spannorm.model.LM`, as ``.lm``
(checkpoint keys ``lm.<LM key>``), every scheme, dense and MoE. Its KV cache: each attention's
``kv_cache`` hook (``nn.Attention``) appends the new keys and values to a ``transformers`` Cache
and the new tokens' RoPE positions start at the cached length (``LM.head_input(idx, start)``).
Padding is not supported (an ``attention_mask`` with zeros is an error): one prompt, or prompts of
one length. With ``capacity_factor`` set, an MoE layer's capacity depends on the tokens of the
forward, so incremental and full-sequence decoding may drop different assignments.

A run directory becomes a Hugging Face folder (``export``)::

    config.json, model.safetensors       SpanNormConfig (model_type "spannorm") and the weights
    tokenizer.json, tokenizer_config.json  a PreTrainedTokenizerFast (AutoTokenizer loads it)
    spannorm_run.yaml                    the run's config (data and seq_len: ``spannorm eval`` finds
                                         the validation split with it)
    modeling_spannorm.py, config.py, ...  the remote code (config.json's ``auto_map``): hf_model.py and the
                                         modules it imports (``REMOTE_MODULES``), verbatim, for trust_remote_code
    README.md                            the model card: what was trained, on what, and how to load it

``to="llama"``: a plain ``LlamaForCausalLM`` folder for a ``pre`` model with RMSNorm (the only
scheme, norm and FFN Llama's equations express; everything else is refused with the reason).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .checkpoint import safetensors_os_errors
from .config import ConfigError, SpannormError, require, short
from .data_config import EOT, Tokenizer
from .files import atomic_dir, os_error
from .hf_model import REMOTE_MODULES, SpanNormConfig, SpanNormForCausalLM
from .model import LM
from .model_config import ModelConfig, NormType, Parametrization, QKNorm, Scheme
from .parametrization import recipe_config
from .run import RunDir
from .run_config import load_config
from .schemes import SCHEMES, use_final_norm, use_qk_norm, use_tied_embeddings

RUN_FILE = "spannorm_run.yaml"  # the run config inside an exported folder
REMOTE_FILE = "modeling_spannorm.py"  # an exported folder's copy of hf_model.py, its remote code (auto_map)
AUTO_MAP = {
    "AutoConfig": "modeling_spannorm.SpanNormConfig",
    "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM",
}

AutoConfig.register(SpanNormConfig.model_type, SpanNormConfig)
AutoModelForCausalLM.register(SpanNormConfig, SpanNormForCausalLM)


# --- tokenizers ------------------------------------------------------------------------------


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte b = 0..255 (the ByteLevel pre-tokenizer's alphabet):
    printable Latin-1 bytes stand for themselves, the others map to chr(256), chr(257), … in order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer (token id = UTF-8 byte value, 0..255) as a ``tokenizers`` byte-level
    tokenizer: ByteLevel pre-tokenizer (no regex split, no prefix space), a BPE with the 256 byte
    symbols and no merges, ByteLevel decoder. Its pad token is byte 0 (NUL, which no corpus spannorm trains on
    holds: a file with NUL bytes is refused as binary), so that ``padding=True`` works with the 256 ids the
    model has; ``split_special_tokens`` keeps a text's own "Ā" (byte 0's stand-in) two bytes, never the pad.
    No eos: bytes have no end-of-document convention, and the byte runs put none between documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = byte_chars()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=chars[0], split_special_tokens=True)


def run_tokenizer(cfg, run_dir: Path) -> PreTrainedTokenizerFast:
    """A run's tokenizer (``cfg``: its RunConfig): the byte tokenizer, or the BPE it was trained with
    (``<|endoftext|>``, the document separator, as eos) or the tokenizer.json it was given (its special tokens as
    the run's data.json recorded them): the copy in the run directory, else (a run written before runs kept one)
    its dataset's, refused when the corpus changed since (:meth:`RunDir.dataset`)."""
    if cfg.data.tokenizer is Tokenizer.BYTE:
        return byte_tokenizer()
    run = RunDir(run_dir, "run")
    path = run.tokenizer_file if run.tokenizer_file.is_file() else run.dataset(cfg) / "tokenizer.json"
    special = {"eos_token": EOT}
    if cfg.data.tokenizer_kind == "file":
        recorded = run.data_file if run.data_file.is_file() else run.dataset(cfg) / "meta.json"
        special = json.loads(recorded.read_text()).get("special_tokens", {})
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **special)
    except Exception as e:  # (tokenizers raises its own Exception for a damaged file)
        raise SpannormError(f"the run's tokenizer {str(path)!r} cannot be read ({short(str(e))})") from None


# --- loading ---------------------------------------------------------------------------------


def from_run(run_dir: Path) -> tuple[SpanNormForCausalLM, object]:
    """(model with the newest checkpoint's weights, RunConfig) of a run directory."""
    run = RunDir(run_dir, "run")
    cfg = run.config()
    model = SpanNormForCausalLM(SpanNormConfig.from_model_config(cfg.model))
    run.load_weights(model.lm)  # the newest checkpoint that verifies against its sha256 manifest, as a resume
    return model.eval(), cfg


def from_folder(path: Path):
    """(model, tokenizer) of a Hugging Face folder. A folder's own Python is never run (trust_remote_code=False,
    nor asked about on a terminal) and its weights are read from safetensors only (a pickle can run code); a
    folder that transformers cannot load (a damaged or missing file) is one line."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        tokenizer("a text", add_special_tokens=False)  # (a damaged tokenizer_config.json fails only when used)
    except Exception as e:  # (transformers, safetensors and tokenizers raise many kinds, some their own)
        raise SpannormError(
            f"{str(path)!r} cannot be loaded as a Hugging Face folder ({type(e).__name__}: {short(str(e), 200)}); "
            "expected config.json, model.safetensors and a tokenizer, as spannorm export writes"
        ) from None
    return model, tokenizer


def folder_weights(path: Path, what: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, LM state dict) of a folder ``spannorm export`` wrote (``what`` names it in errors); a Llama
    folder or any other model type is refused in one line."""
    from safetensors.torch import load_file

    try:
        config = SpanNormConfig.from_pretrained(path)
        if config.model_type != SpanNormConfig.model_type:
            raise ValueError(f"model_type {config.model_type!r}")
        weights = load_file(path / "model.safetensors")
    except Exception as e:  # (a folder of another model, or damaged)
        raise SpannormError(
            f"{what} is not a folder of `spannorm export --to spannorm` ({type(e).__name__}: {short(str(e), 120)})"
        ) from None
    lm = {k.removeprefix("lm."): v for k, v in weights.items()}
    return config.model_config(), lm


def load(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, RunConfig or None) of a run directory or of a Hugging Face folder
    (``spannorm export``'s, or any causal LM folder with a tokenizer)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        model, cfg = from_run(path)
        tokenizer = run_tokenizer(cfg, path)
    elif (path / "config.json").is_file():
        model, tokenizer = from_folder(path)
        cfg = None
        if (path / RUN_FILE).is_file():  # (its cache_dir is ours: a shared folder never chooses where we write)
            cfg = load_config(path / RUN_FILE)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=None))
    else:
        raise ConfigError(
            f"{str(path)!r} is neither a run directory (config.yaml) nor a Hugging Face folder (config.json)"
        )
    return model.to(device), tokenizer, cfg


# --- export ----------------------------------------------------------------------------------


def llama_refusal(lm: LM) -> str | None:
    """Why Llama cannot express ``lm`` exactly, or None. Llama's decoder:
    h = x + Attn(RMSNorm(x)); x' = h + SwiGLU(RMSNorm(h)); logits = RMSNorm(x_L)·W_headᵀ, with
    RoPE (rotate-half), no embedding norm or scale and no factor before the head."""
    cfg = lm.cfg
    if cfg.scheme is not Scheme.PRE:
        return (
            f"model.scheme={cfg.scheme.value}: Llama's block is PreNorm (h = x + Attn(N(x)); x' = h + FFN(N(h))), "
            "only scheme pre maps onto it"
        )
    if cfg.norm is not NormType.RMS:
        return f"model.norm={cfg.norm.value}: Llama's norm is RMSNorm (model.norm=rms)"
    if cfg.moe.enabled:
        return f"model.moe.n_experts={cfg.moe.n_experts}: Llama's FFN is one dense SwiGLU (model.moe.n_experts=0)"
    if use_qk_norm(cfg) is not QKNorm.NONE:
        return f"model.qk_norm={use_qk_norm(cfg).value}: Llama has no query or key norm (model.qk_norm=none)"
    if not use_final_norm(cfg):
        return "model.final_norm=false: Llama always applies a final RMSNorm before the head"
    if cfg.parametrization is not Parametrization.STANDARD and lm.cfg != recipe_config(cfg):
        return (
            f"model.parametrization={cfg.parametrization.value} away from its base shape: its multipliers on the "
            "attention logits, the logits or the branches are not Llama's"
        )
    if SCHEMES[cfg.scheme].embed_norm or lm.embed_scale is not None or lm.head_scale != 1.0:
        return "the model scales or normalizes the embedding or the head input, which Llama does not"
    return None


def llama_state_dict(lm: LM) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names. Layouts: ``attn.qkv`` rows are [q; k; v] (d rows each, head
    h at rows h·hd..(h+1)·hd of each, as Llama's q/k/v_proj) and RoPE is rotate-half in both, so
    q, k, v need no permutation; ``ffn.up`` rows are [gate; up] (silu(gate·y) ⊙ up·y), Llama's
    gate_proj and up_proj. A tied head is the embedding (``lm_head.weight`` = ``embed_tokens``)."""
    sd = {
        "model.embed_tokens.weight": lm.embed.weight,
        "model.norm.weight": lm.final_norm.weight,
        "lm_head.weight": lm.head_weight,
    }
    for i, block in enumerate(lm.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3)
        gate, up = block.ffn.up.weight.chunk(2)
        sd |= {
            p + "input_layernorm.weight": block.norm1.weight,
            p + "post_attention_layernorm.weight": block.norm2.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.ffn.down.weight,
        }
    return {k: v.detach().clone() for k, v in sd.items()}


def to_llama(lm: LM, max_positions: int, eos_token_id: int | None):
    """A ``LlamaForCausalLM`` with ``lm``'s weights (refuses with a SpannormError if Llama cannot express it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    reason = llama_refusal(lm)
    if reason is not None:
        raise SpannormError(f"--to llama: cannot express this model as LlamaForCausalLM: {reason}")
    cfg = lm.cfg
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=use_tied_embeddings(cfg),
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(llama_state_dict(lm))
    return model.eval()


def model_overrides_from_llama(config: dict, what: str = "config.json") -> list[str]:
    """``--set`` overrides (``model.*``) for a model of the shape of a Hugging Face Llama ``config.json``
    (``config``: its parsed JSON; ``what`` names it in errors): :func:`to_llama`'s correspondence read the other
    way, and Llama's block (scheme pre, RMSNorm, a dense FFN; a later override picks any other scheme). What
    spannorm cannot express (grouped-query attention, an activation but silu, biases, dropout, scaled RoPE, a
    head_dim of its own, another model_type) is refused in one line naming the field; an absent (or null) field
    takes LlamaConfig's default. model.vocab_size is checked against the tokenizer's vocabulary when the run config
    is built; max_position_embeddings is no model field (it is only checked to be a positive integer here)."""
    sizes = {  # Llama field: ModelConfig field (to_llama: intermediate_size = ffn_dim)
        "vocab_size": "vocab_size",
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
    }
    config = {key: value for key, value in config.items() if value is not None}  # (null: absent, as LlamaConfig)
    for key in sizes:
        if key not in config:
            raise ConfigError(f"{what} has no {key}: expected a Llama config.json")
    for key in [*sizes, "max_position_embeddings"]:
        value = config.get(key)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        require(ok, f"{what}: {key}", value, "a positive integer")
    n_heads, head_dim = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    fixed = {  # Llama field: (the one value spannorm expresses, which is LlamaConfig's default, and why)
        "model_type": ("llama", "expected a Llama config.json"),
        "hidden_act": ("silu", "spannorm's FFN is SwiGLU (hidden_act silu)"),
        "num_key_value_heads": (n_heads, f"spannorm has no grouped-query attention (expected {n_heads})"),
        "head_dim": (head_dim, f"spannorm's head size is hidden_size / num_attention_heads (expected {head_dim})"),
        "attention_bias": (False, "spannorm's attention has no biases"),
        "mlp_bias": (False, "spannorm's FFN has no biases"),
        "attention_dropout": (0.0, "spannorm has no dropout"),
    }
    for key, (value, why) in fixed.items():
        if config.get(key, value) != value:
            raise ConfigError(f"{what}: {key}={short(config[key])} cannot be expressed: {why}")
    rope = {}  # (transformers 5 writes rope_parameters, with rope_theta; transformers 4 rope_theta and rope_scaling)
    for key in ("rope_parameters", "rope_scaling"):
        require(isinstance(config.get(key, {}), dict), f"{what}: {key}", config.get(key), "a mapping or null")
        rope |= config.get(key, {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{what}: rope_type={short(rope_type)} cannot be expressed: spannorm's RoPE is unscaled")
    numbers = {  # ModelConfig field: (Llama field, its value or LlamaConfig's default)
        "norm_eps": ("rms_norm_eps", config.get("rms_norm_eps", 1e-6)),
        "rope_theta": ("rope_theta", config.get("rope_theta", rope.get("rope_theta", 10000.0))),
    }
    for key, value in numbers.values():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
        require(ok, f"{what}: {key}", value, "a positive number")
    tied = config.get("tie_word_embeddings", False)
    require(isinstance(tied, bool), f"{what}: tie_word_embeddings", tied, "true or false")
    model = (
        {"scheme": Scheme.PRE.value, "norm": NormType.RMS.value, "moe.n_experts": 0}
        | {ours: config[key] for key, ours in sizes.items()}
        | {ours: value for ours, (_, value) in numbers.items()}
        | {"tie_embeddings": tied}
    )
    return [f"model.{key}={json.dumps(value)}" for key, value in model.items()]


def export(run_dir: Path, out_dir: Path, to: str = "spannorm") -> Path:
    """Write the run's newest checkpoint as a Hugging Face folder ``out_dir`` (must not exist):
    ``to="spannorm"`` (SpanNormForCausalLM) or ``"llama"`` (plain LlamaForCausalLM)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"OUT_DIR {str(out_dir)!r} already exists: choose a new folder")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
    model, cfg = from_run(run_dir)
    tokenizer = run_tokenizer(cfg, run_dir)
    if to == "llama":
        model = to_llama(model.lm, cfg.train.seq_len, tokenizer.eos_token_id)
    elif to != "spannorm":
        raise ConfigError(f"--to {to!r} is invalid: expected spannorm or llama")
    tokenizer.model_max_length = cfg.train.seq_len  # (what it was trained on; RoPE itself has no limit)
    if tokenizer.eos_token_id is not None:  # (BPE: <|endoftext|> ends a generation; bytes have no such token)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:  # (bytes: NUL)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    card = model_card(cfg, RunDir(run_dir, "RUN_DIR").summary(), type(model).__name__)
    if to == "spannorm":
        model.config.auto_map = AUTO_MAP
    try:
        with atomic_dir(out_dir) as tmp, safetensors_os_errors(out_dir / "model.safetensors"):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            portable_tokenizer_config(tmp / "tokenizer_config.json")
            if to == "spannorm":
                write_remote_code(tmp)
            shutil.copyfile(Path(run_dir) / "config.yaml", tmp / RUN_FILE)
            (tmp / "README.md").write_text(card)
    except OSError as e:
        raise os_error(e, f"OUT_DIR {str(out_dir)!r}", "nothing was written there") from None
    return out_dir


def portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class that transformers 4.x and 5.x both know: transformers 5 writes its own
    ``TokenizersBackend``, which AutoTokenizer of transformers 4 cannot find; both load ``PreTrainedTokenizerFast``."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_remote_code(folder: Path) -> None:
    """The folder's remote code (config.json's ``auto_map``): hf_model.py as ``modeling_spannorm.py`` and verbatim
    copies of the package modules it imports, so transformers loads the folder where spannorm is not installed."""
    package = Path(__file__).parent
    shutil.copyfile(package / "hf_model.py", folder / REMOTE_FILE)
    for name in REMOTE_MODULES:
        shutil.copyfile(package / f"{name}.py", folder / f"{name}.py")


def model_card(cfg, summary: dict | None, kind: str) -> str:
    """README.md of an exported folder: the Hub's metadata block, then what the model is, what it was trained on
    and how well, and how to load and reproduce it. It names no local path (the corpus by its name only)."""
    m, block = cfg.model, SCHEMES[cfg.model.scheme]
    corpus = Path(cfg.data.corpus).name
    moe = f", MoE: {m.moe.n_experts} experts, top-{m.moe.top_k}" if m.moe.enabled else ""
    s = summary or {}
    trained = (
        f"{s['steps']:,} steps, {s['tokens']:,} tokens; final validation loss {s['final_val_loss']:.4f} nats/token"
        if s.get("final_val_loss") is not None and "tokens" in s
        else "the run had not finished when it was exported"
    )
    load = (
        "`transformers.AutoModelForCausalLM.from_pretrained(folder)` (plain transformers)"
        if kind == "LlamaForCausalLM"
        else "`transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and "
        "`AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` (the folder's modeling_spannorm.py; spannorm "
        "need not be installed), or `import spannorm` first and no remote code"
    )
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            f"tags: [spannorm, {m.scheme.value}, {m.norm.value}]",
            "---",
            "",
            f"# {m.scheme.value} ({kind}), trained with spannorm",
            "",
            f"- **Block:** {block.equation} (N: {m.norm.value}), {block.reference}",
            f"- **Size:** {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads{moe}"
            + (f", {s['n_params']:,} parameters" if "n_params" in s else ""),
            f"- **Data:** {corpus}, {cfg.data.tokenizer_kind} tokenizer (vocabulary {cfg.data.model_vocab_size}), "
            f"sequences of {cfg.train.seq_len} tokens",
            f"- **Training:** {trained}",
            f"- **Load:** {load}",
            "- **Reproduce:** `spannorm train --config spannorm_run.yaml` (the run's config, in this folder; its "
            "data.corpus names the exporting machine's path)",
            "",
        ]
    )


# --- generation ------------------------------------------------------------------------------


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    streamer=None,
) -> str:
    """Continue ``prompt``: greedy at temperature 0, else sampling from softmax(logits/T) restricted
    to the ``top_k`` most likely tokens and to the smallest set of probability ≥ ``top_p`` (nucleus);
    ``streamer`` (e.g. ``transformers.TextStreamer``) receives tokens as they come. Returns the new text."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise ConfigError("--prompt '' is invalid: expected at least one character")
    if seed is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
            streamer=streamer,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )
    return tokenizer.decode(out[0, ids.shape[1] :])
