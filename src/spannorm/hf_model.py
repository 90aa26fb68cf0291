"""The Hugging Face model classes: ``SpanNormConfig`` and ``SpanNormForCausalLM`` (spannorm.hf documents them).

An exported folder carries this file as its ``modeling_spannorm.py``, next to verbatim copies of the modules it
imports (``REMOTE_MODULES``), and names its classes in config.json's ``auto_map``: with ``trust_remote_code=True``
transformers loads the folder where spannorm is not installed. So it imports only torch, transformers and those
modules, which import nothing of spannorm's but each other (tests/test_hf_portable.py checks both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import LEGACY_KEYS, to_dict, upgrade_config
from .model import LM
from .model_config import ModelConfig
from .schemes import use_tied_embeddings

# the package's modules an exported folder copies beside this file (its remote code): this file's imports, closed
REMOTE_MODULES = ("config", "device", "model_config", "layers", "moe", "parametrization", "schemes", "model")
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
# an attribute of a folder exported before the option groups -> its old flat ModelConfig key (LEGACY_KEYS): each of
# those but top_k, which was moe_top_k (Hugging Face reads a top-level top_k as a sampling parameter)
OLD_ATTRS = {("moe_top_k" if k == "model.top_k" else k[6:]): k[6:] for k in LEGACY_KEYS if k.startswith("model.")}
# the cache's name in forward() and in the output: "cache" (transformers >= 5), "past_key_values" before
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SpanNormConfig(PretrainedConfig):
    """Every ``ModelConfig`` field as an attribute of the same name, its option groups (``moe``, ``dyt``, ``span``)
    as mappings, enums as their strings; :meth:`model_config` validates them back into a ``ModelConfig``. A
    config.json exported before the groups (their fields flat: ``n_experts``, ``moe_top_k``, ``span_scale``) is read
    as the same config."""

    model_type = "spannorm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, **kwargs):
        given = {OLD_ATTRS.get(k, k): kwargs.pop(k) for k in list(kwargs) if k in MODEL_FIELDS or k in OLD_ATTRS}
        given = upgrade_config({"model": given})["model"]
        for name, default in to_dict(ModelConfig()).items():
            value = to_dict(given.get(name, default))
            # (a group given in part: the rest at its defaults)
            setattr(self, name, default | value if isinstance(default, dict) and isinstance(value, dict) else value)
        kwargs.setdefault("tie_word_embeddings", use_tied_embeddings(self.model_config()))  # (informative)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> SpanNormConfig:
        return cls(**to_dict(cfg), **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})


@contextlib.contextmanager
def kv_caching(lm: LM, cache):
    """Within the block, every attention of ``lm`` stores its keys and values in ``cache`` (layer i
    in cache layer i) and attends to the cached ones; nothing when ``cache`` is None."""
    if cache is None:
        yield
        return
    for i, block in enumerate(lm.blocks):
        block.attn.kv_cache = functools.partial(cache.update, layer_idx=i)
    try:
        yield
    finally:
        for block in lm.blocks:
            block.attn.kv_cache = None


class SpanNormForCausalLM(PreTrainedModel, GenerationMixin):
    """``spannorm.model.LM`` as a Hugging Face causal LM: logits = head_input · W_headᵀ;
    with ``labels``, loss = mean CE(logits[:, t], labels[:, t+1]) over labels ≠ −100 (labels shifted
    inside, as every HF causal LM), plus ``LM.moe_loss()`` in training mode (the trainer's objective)."""

    config_class = SpanNormConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"

    def __init__(self, config: SpanNormConfig):
        super().__init__(config)
        self.lm = LM(config.model_config())  # initialized by the scheme's own rule
        self.post_init()

    def _init_weights(self, module):
        """Nothing: ``LM`` initializes itself with its scheme's rule when it is built."""

    def get_input_embeddings(self):
        return self.lm.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("SpanNormForCausalLM does not support padding: pass one prompt, or prompts of one length")
        if cache is None and use_cache:
            cache = DynamicCache()
        start = cache.get_seq_length() if cache is not None else 0
        with kv_caching(self.lm, cache):
            x = self.lm.head_input(input_ids, start)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.lm.head_weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if self.training:
                loss = loss + self.lm.moe_loss()
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})
