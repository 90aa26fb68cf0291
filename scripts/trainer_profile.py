"""Where a training run's time goes: the real trainer (`spannorm.train.train`) with timers around its parts, against
its pure step (the median time of a step without diagnostics). Prints a Markdown table per size.

    .venv/bin/python scripts/trainer_profile.py            # about 3 minutes on this 2-core machine

Parts: *step* (forward, backward, AdamW, the loss's host sync: every step), *diagnostics* (the extra time of the
steps with per-block diagnostics, every train.probe_interval steps), *validation*, *checkpoint*, *logs* (metrics
and diagnostics rows), *other* (the rest of the loop: divergence check, progress, signals). The trainer's
tokens/s is over the whole fit; the pure step's is the median non-diagnostic step's.
"""

import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

from spannorm import train as train_module
from spannorm.run_config import load_config

SIZES = {  # name -> (preset, overrides): the lr study's cells and the compare preset
    "lr study (d_model 64, L = 12)": (
        "small",
        ["model.d_model=64", "model.n_heads=4", "model.n_layers=12", "train.probe_interval=8", "train.eval_batches=16"],
    ),
    "small preset (d_model 128, L = 8)": ("small", []),
    "bench's standard size (d_model 256, L = 8, BPE 8192, batch 8 × 256), the default intervals": (
        "small",
        ["model.d_model=256", "data.tokenizer=bpe", "data.vocab_size=8192", "train.batch_size=8", "train.seq_len=256"]
        + ["train.eval_batches=8", "train.ckpt_interval=100", "train.probe_interval=50"],
    ),
}
STEPS = 200  # with the presets' intervals: 2 validations (eval_interval 100), 1-2 checkpoints


def profile(preset: str, sets: list[str], out: str) -> dict:
    spent = defaultdict(float)
    step_times = {"plain": [], "probing": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    trainer = train_module.Trainer
    step, checkpoint, evaluate, write = (
        trainer.train_step,
        trainer.checkpoint,
        train_module.evaluate,
        train_module.Logs.write,
    )

    def train_step(self):
        t0 = time.perf_counter()
        result = step(self)
        probe = self.t.probe_interval > 0 and self.step % self.t.probe_interval == self.t.probe_interval - 1
        step_times["probing" if probe else "plain"].append(time.perf_counter() - t0)
        return result

    trainer.train_step, trainer.checkpoint = train_step, timed("checkpoint", checkpoint)
    train_module.evaluate, train_module.Logs.write = timed("validation", evaluate), timed("logs", write)
    fit = trainer.fit
    trainer.fit = timed("fit", fit)
    try:
        cfg = load_config(preset, [*sets, f"train.max_steps={STEPS}"])
        train_module.train(cfg, out, progress=False)
    finally:
        trainer.train_step, trainer.checkpoint, trainer.fit = step, checkpoint, fit
        train_module.evaluate, train_module.Logs.write = evaluate, write
    pure = statistics.median(step_times["plain"])
    probing = step_times["probing"]
    parts = {
        "step": sum(step_times["plain"]) + pure * len(probing),
        "diagnostics": sum(probing) - pure * len(probing),
        "validation": spent["validation"],
        "checkpoint": spent["checkpoint"],
        "logs": spent["logs"],
    }
    parts["other"] = spent["fit"] - sum(parts.values())
    tokens = STEPS * cfg.train.batch_size * cfg.train.seq_len
    return {"parts": parts, "fit": spent["fit"], "trainer": tokens / spent["fit"], "pure": tokens / (pure * STEPS)}


def main() -> None:
    torch.set_num_threads(1)  # (one core, as a study cell: the ratios, not the machine's parallelism)
    for name, (preset, sets) in SIZES.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = profile(preset, sets, f"{tmp}/run")
        print(
            f"\n{name}, {STEPS} steps, one thread: trainer {got['trainer']:,.0f} tokens/s, pure step "
            f"{got['pure']:,.0f} tokens/s ({got['trainer'] / got['pure']:.3f}×)\n"
        )
        print("| part | seconds | share of the fit |")
        print("|---|---|---|")
        for part, seconds in got["parts"].items():
            print(f"| {part} | {seconds:.2f} | {seconds / got['fit']:.1%} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
