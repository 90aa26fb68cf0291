"""``spannorm eval``: loss, perplexity and bits per byte of a causal LM over whole texts.

A token sequence x_0 … x_{N−1} is cut into non-overlapping windows of T + 1 tokens at stride T
(the last one shorter): window w is x_{wT} … x_{wT+T}, its inputs the first T tokens and its
targets the last T, so every token but x_0 is predicted exactly once, from the tokens of its window
before it (at most T of them, the context length the model trained with). Over the predicted tokens

    loss = total nats / tokens,   perplexity = exp(loss),   bits per byte = total nats / (ln 2 · bytes)

where bytes is the UTF-8 length of the text the predicted tokens stand for: 1 per byte-tokenizer
token, the byte string of each byte-level BPE token, what each token adds to a decoded text for any other
tokenizer (:func:`token_bytes`), 0 for a special token (``<|endoftext|>``,
BPE's document separator, is predicted but stands for no text). Loss and perplexity depend on the
tokenizer; bits per byte does not: a byte run and a BPE run scoring the same text divide by the
same bytes (up to the first token's, which neither predicts).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import TokenData, documents_at, prepare
from .run import RunDir


def windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens at stride seq_len; the last may be shorter."""
    return [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens and ids beyond the tokenizer). A byte-level
    tokenizer's (GPT-2's alphabet, ``hf.byte_chars``): the bytes its token string spells. Any other's (a
    SentencePiece-style ▁ word piece, WordPiece, ...): a byte-fallback token <0xNN> is 1, and token t is the bytes
    that decoding (anchor, t) adds to decoding the anchor alone, the anchor a plain token ("a"), so that a leading
    space a decoder drops at the start of a text is counted as the text has it."""
    from .hf import byte_chars  # (here: spannorm.hf imports transformers, an optional dependency)

    value = {c: b for b, c in enumerate(byte_chars())}
    special = set(tokenizer.all_special_ids)
    out = np.zeros(max(vocab_size, len(tokenizer)), dtype=np.int64)
    pieces = {i: tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer)) if i not in special}
    if all(p is not None and all(c in value for c in p) for p in pieces.values()):
        for i, piece in pieces.items():
            out[i] = len(piece)
        return out
    anchor = tokenizer("a", add_special_tokens=False).input_ids[-1:]
    if len(anchor) != 1 or anchor[0] in special:
        raise ConfigError("bits per byte needs a tokenizer that encodes 'a' as a plain token; this one does not")
    base = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False).encode())
    for i, piece in pieces.items():
        if piece is not None and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[i] = 1
        elif piece is not None:
            out[i] = len(tokenizer.decode(anchor + [i], clean_up_tokenization_spaces=False).encode()) - base
    return out


@torch.no_grad()
def score(model, wins: list[np.ndarray], batch_size: int = 16) -> tuple[float, int]:
    """(total nats, predicted tokens) of ``model`` (a Hugging Face causal LM) over the windows,
    batched by window length; cross-entropy in float32 (or float64 for a float64 model)."""
    model.eval()
    device = next(model.parameters()).device
    nats, tokens = 0.0, 0
    by_length: dict[int, list[np.ndarray]] = {}
    for w in wins:
        by_length.setdefault(len(w), []).append(w)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            batch = torch.from_numpy(np.stack(group[i : i + batch_size]).astype(np.int64)).to(device)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            acc = torch.promote_types(logits.dtype, torch.float32)
            nats += F.cross_entropy(logits.flatten(0, 1).to(acc), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
    return nats, tokens


def result(name: str, nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / tokens
    return {
        "name": name,
        "tokens": tokens,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / (math.log(2) * n_bytes),
    }


def evaluate_ids(
    model, name: str, sequences: list[np.ndarray], seq_len: int, sizes: np.ndarray, batch_size: int
) -> dict:
    """The result over token sequences scored separately (each file is one sequence)."""
    wins = [w for ids in sequences for w in windows(np.asarray(ids), seq_len)]
    if not wins:
        raise ConfigError(f"{name!r} holds fewer than two tokens: nothing to score")
    n_bytes = int(sum(sizes[w[1:]].sum() for w in wins))
    if n_bytes == 0:
        raise ConfigError(f"{name!r} holds only special tokens (<|endoftext|>): no text to score per byte")
    nats, tokens = score(model, wins, batch_size)
    return result(name, nats, tokens, n_bytes)


def evaluate(
    model,
    tokenizer,
    run_cfg,
    texts: list[Path],
    seq_len: int | None = None,
    batch_size: int | None = None,
    validation: bool = True,
    run_dir: Path | None = None,
) -> dict:
    """{seq_len, results: [...]}: the validation split of the run (when ``run_cfg`` is given and ``validation``)
    and each text file or directory (a directory's files each scored on their own, the sums reported). ``run_dir``:
    the run directory the model is from, whose validation split is refused when its corpus changed since."""
    if seq_len is None:
        if run_cfg is None:
            raise ConfigError("--seq-len is required: this folder holds no spannorm run config to take it from")
        seq_len = run_cfg.train.seq_len
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len} is invalid: expected a positive integer")
    batch_size = batch_size or (run_cfg.train.batch_size if run_cfg is not None else 16)
    sizes = token_bytes(tokenizer, model.config.vocab_size)
    results = []
    if run_cfg is not None and validation:
        dataset = RunDir(run_dir, "the run").dataset(run_cfg) if run_dir is not None else prepare(run_cfg.data)
        val = TokenData(dataset, None).val  # (its windows: those of a text, of any length)
        results.append(evaluate_ids(model, "validation", [np.asarray(val)], seq_len, sizes, batch_size))
    for path in texts:
        if not Path(path).exists():
            raise ConfigError(f"--text {str(path)!r} does not exist: expected a text file or directory")
        docs = documents_at(Path(path), f"--text {str(path)!r}", "--text file")  # (a path, never a corpus name)
        ids = [np.asarray(tokenizer(text, add_special_tokens=False).input_ids) for _, text in docs]
        results.append(evaluate_ids(model, str(path), ids, seq_len, sizes, batch_size))
    if not results:
        raise ConfigError(
            "nothing to evaluate: pass --text PATH (or --validation: the validation split of a folder's "
            "spannorm_run.yaml)"
        )
    return {"seq_len": seq_len, "results": results}
