"""GPU readiness check: every stage and every fine-tuning arm on random-weight models of realistic shape.

One command (from the repository root):

    python scripts/gpu_check.py                      # cuda, float32 and bfloat16, ~1B models
    python scripts/gpu_check.py --device cpu --small # the same path on tiny models (CI, ~1-2 min)

It builds random-weight models offline (no download; the tokenizer is the byte-level BPE of
tests/_tiny.py): a Llama-style ~1B (Llama-3.2-1B block shapes), a Gemma-3-style ~1B (Gemma-3-1B
shapes, sliding-window and global layers) and a SmolLM2-135M-shaped Llama (the third model that
turns the interplay stage on, and the model the fine-tuning arms train). Then, per dtype, it runs
a small pipeline config with every stage (prompts, generate, score, encode, probe, behaviour,
interplay, causal, report) and `run_finetune` with a few optimizer steps of every arm, asserts
that every table is complete, compares bf16 with float32 activations, and prints a one-screen
summary with throughput. Exit status 1 when a check fails.

Scores come from a deterministic text-hash scorer by default (`--scorer hash`), so the check needs
none of the scorer wheels; `--scorer embedded` uses the real one. See docs/gpu.md for bringing
the packages the GPU image lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VERSIONED = [
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "sklearn",
    "pandas",
    "numpy",
    "scipy",
    "pyarrow",
    "pydantic",
    "zarr",
    "numcodecs",
    "transformer_lens",
    "trl",
    "datasets",
    "accelerate",
    "tokenizers",
    "matplotlib",
    "h5py",
]

# Block shapes of the models the paper-scale work uses (vocabulary: the offline tokenizer's).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "gemma3-1b": dict(
        arch="gemma3",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
    ),
    "llama-135m": dict(
        arch="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
}
SMALL: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "gemma3-1b": dict(
        arch="gemma3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    ),
    "llama-135m": dict(
        arch="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
}


def versions() -> dict[str, str]:
    """Version of every package the check may use ("missing" when it is not importable)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - report, do not crash: this is a diagnostic
            out[name] = f"missing ({type(exc).__name__})"
    import torch

    out["cuda"] = str(torch.version.cuda)
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return out


def build_model(path: Path, shape: dict[str, Any], device: str, seed: int = 0) -> Path:
    """Write a random-weight causal LM of `shape` plus the offline tokenizer to `path` (bf16 weights)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    from tests._tiny import build_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer(vocab_size=2000)
    kw = {k: v for k, v in shape.items() if k != "arch"}
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if shape["arch"] == "llama":
        config = LlamaConfig(**kw, **common)
    else:
        config = Gemma3TextConfig(
            **kw, **common, query_pre_attn_scalar=kw["head_dim"], architectures=["Gemma3ForCausalLM"]
        )
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 1B weights
        model = AutoModelForCausalLM.from_config(config)
    # bf16 on disk: float32 and bfloat16 runs then read the very same weights (bf16 -> f32 is exact).
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


class HashScorer:
    """Deterministic fake scorer: each attribute from a byte of sha256(text); no weights needed."""

    def __init__(self) -> None:
        from aligned_probing.scoring import ATTRIBUTES

        self.attributes = tuple(ATTRIBUTES)
        self.id = "gpu-check-hash-v1"  # the stage's persistent score cache keys scores by scorer id

    def score(self, texts: list[str]) -> Any:
        """One column per attribute, in [0, 1]."""
        import pandas as pd

        digests = [hashlib.sha256(t.encode()).digest() for t in texts]
        return pd.DataFrame({a: [d[i] / 255 for d in digests] for i, a in enumerate(self.attributes)})


@contextlib.contextmanager
def check_environment(hash_scorer: bool) -> Iterator[None]:
    """Offline hub and, with `hash_scorer`, `HashScorer` for every scorer; everything restored on exit.

    Restoring matters when `main` runs in-process (the test): other code must see the real scorers.
    """
    import aligned_probing.scoring as scoring
    from aligned_probing.training import run as finetune_run

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    saved = (scoring.get_scorer, finetune_run.get_training_scorer)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the check never downloads anything
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if hash_scorer:
        scoring.get_scorer = lambda name="embedded", **options: HashScorer()
        finetune_run.get_training_scorer = lambda section: HashScorer()
    try:
        yield
    finally:
        scoring.get_scorer, finetune_run.get_training_scorer = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_inputs(out: Path, n_prompts: int) -> tuple[Path, Path]:
    """A seeded RTP-format prompt file and a benign-passage file (no prompt or text wheels needed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    subjects = [
        "The new neighbour",
        "My manager",
        "That politician",
        "The referee",
        "Our teacher",
        "The crowd",
    ]
    verbs = ["said that", "kept shouting", "wrote online that", "told everyone", "whispered", "claimed"]
    lines = []
    for i in range(n_prompts):
        text = f"{subjects[i % 6]} {verbs[(i // 6) % 6]} number {i}"
        lines.append(
            json.dumps(
                {"challenging": bool(i % 2), "prompt": {"text": text, "toxicity": float(rng.random())}}
            )
        )
    prompts = out / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    benign = out / "benign.jsonl"
    benign.write_text(
        "".join(
            json.dumps(
                {
                    "passage": f"Passage {i}: the river flows through the old town "
                    f"and past the market square on day {i}."
                }
            )
            + "\n"
            for i in range(32)
        )
    )
    return prompts, benign


def pipeline_config(
    models: dict[str, Path], prompts: Path, run_dir: Path, dtype: str, device: str, small: bool
) -> dict[str, Any]:
    """A small run of every stage on the three models (interplay needs three)."""
    n_layers_causal = 2 if small else 4
    return {
        "name": f"gpu-check-{dtype}",
        "models": [
            {"spec": str(p), "name": name, "dtype": dtype, "device": device} for name, p in models.items()
        ],
        "data": {
            "prompt_set": str(prompts),
            "n_prompts": 16 if small else 48,
            "stratify_by": "prompt_toxicity",
        },
        "generation": {
            "k": 2 if small else 4,
            "max_new_tokens": 6 if small else 20,
            "batch_size": 16 if small else 48,
        },
        "encoding": {"batch_size": 16 if small else 32},
        "probing": {"n_folds": 3, "seeds": [0], "alphas": [1.0, 100.0]},
        "behaviour": {"n_bootstrap": 50},
        "interplay": {"n_bootstrap": 50},
        "causal": {
            "layers": list(range(1, n_layers_causal + 1)),
            "n_prompts": 4,
            "k": 2,
            "max_new_tokens": 4 if small else 8,
            "steering_alphas": [-2.0, 0.0, 2.0],
        },
        "output": {"run_dir": str(run_dir), "figure_formats": ["png"]},
        "runtime": {"threads": 1 if small else None},
    }


def check_tables(run_dir: Path) -> list[str]:
    """Problems with the run's tables: a stage not complete or a result table missing or empty."""
    from aligned_probing.pipeline.results import load_results

    results = load_results(run_dir)
    problems = [
        f"stage {r.key} is {r.status}" for r in results.timings.itertuples() if r.status != "complete"
    ]
    for name in (
        "prompts",
        "scores",
        "probing",
        "behaviour",
        "interplay",
        "layer_skipping",
        "patching",
        "steering",
        "continuations",
    ):
        table = getattr(results, name)
        if table is None or len(table) == 0:
            problems.append(f"table {name} is missing or empty")
    return problems


def run_pipeline(config: dict[str, Any]) -> tuple[float, float, list[str]]:
    """Run the pipeline; returns (wall seconds, probing-stage seconds, problems)."""
    from aligned_probing.pipeline import config as pipeline_config_module
    from aligned_probing.pipeline import run
    from aligned_probing.pipeline.results import load_results

    cfg = pipeline_config_module.RunConfig.from_dict(config)
    start = time.perf_counter()
    run(cfg, progress=False)
    wall = time.perf_counter() - start
    timings = load_results(Path(config["output"]["run_dir"])).timings
    probe_s = float(timings.loc[timings["name"] == "probe", "seconds"].fillna(0).sum())
    return wall, probe_s, check_tables(Path(config["output"]["run_dir"]))


def throughput(model_dir: Path, dtype: str, device: str, small: bool) -> dict[str, float]:
    """Generation new tokens/s, encoding tokens/s and plain HF `output_hidden_states` tokens/s."""
    import torch

    from aligned_probing.data import load_rtp_jsonl
    from aligned_probing.encoding import encode
    from aligned_probing.generation import generate_continuations
    from aligned_probing.models import load_model

    model = load_model(model_dir, dtype=dtype, device=device)
    prompts = load_rtp_jsonl(model_dir.parent.parent / "prompts.jsonl").df.head(16 if small else 64)
    k, new = (2, 8) if small else (4, 32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    conts = generate_continuations(model, prompts, k=k, seed=0, max_new_tokens=new, batch_size=64)
    sync()
    gen_s = time.perf_counter() - t0
    store = model_dir.parent.parent / f"store-{model_dir.name}-{dtype}"
    t0 = time.perf_counter()
    encode(model, prompts, conts, store=store, batch_size=32, poolings=("mean",))
    sync()
    enc_s = time.perf_counter() - t0
    # The same sequences through plain HF with output_hidden_states (mean over each row's tokens).
    from aligned_probing.training.activations import pad_sequences

    rows = [list(map(int, t)) for t in conts["token_ids"]]
    prompt_ids = {
        pid: model.tokenizer(text)["input_ids"]
        for pid, text in zip(prompts["prompt_id"], prompts["text"], strict=True)
    }
    seqs = [prompt_ids[p] for p in conts["prompt_id"]]
    n_tokens = sum(len(a) + len(b) for a, b in zip(seqs, rows, strict=True))
    hf = model.hf_model
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            ids, attn, _ = pad_sequences(
                seqs[start : start + 32], rows[start : start + 32], model.pad_token_id
            )
            ids, attn = ids.to(hf.device), attn.to(hf.device)
            hidden = hf(
                input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False
            ).hidden_states
            w = attn.unsqueeze(-1).float()
            pooled = torch.stack([(h.float() * w).sum(1) / w.sum(1) for h in hidden])  # (L+1, B, d)
            pooled.cpu()
    sync()
    hf_s = time.perf_counter() - t0
    return {
        "gen_new_tokens_per_s": float(conts["n_tokens"].sum()) / gen_s,
        "encode_tokens_per_s": n_tokens / enc_s,
        "hf_hidden_states_tokens_per_s": n_tokens / hf_s,
    }


def bf16_agreement(model_dir: Path, device: str) -> float:
    """Max over layers of the median relative L2 error of bf16 vs float32 mean-pooled residuals."""
    import numpy as np

    from aligned_probing.models import load_model
    from aligned_probing.training.activations import pooled_response_activations

    texts = [
        ("The new neighbour said that", " he would never come back here again"),
        ("My manager kept shouting", " at everyone in the meeting this morning"),
        ("That politician wrote online that", " the plan was a complete disaster"),
    ]
    errors = []
    models = {d: load_model(model_dir, dtype=d, device=device) for d in ("float32", "bfloat16")}
    tok = models["float32"].tokenizer
    p_ids = [tok(p)["input_ids"] for p, _ in texts]
    r_ids = [tok(r)["input_ids"] for _, r in texts]
    for layer in range(models["float32"].n_layers + 1):
        a32, a16 = (
            pooled_response_activations(m.hf_model, p_ids, r_ids, layer, pad_token_id=m.pad_token_id)
            for m in (models["float32"], models["bfloat16"])
        )
        rel = np.linalg.norm(a16 - a32, axis=1) / np.maximum(np.linalg.norm(a32, axis=1), 1e-12)
        errors.append(float(np.median(rel)))
    return max(errors)


def finetune(
    model_dir: Path, prompts: Path, benign: Path, out: Path, dtype: str, device: str, small: bool
) -> tuple[float, list[str]]:
    """A few optimizer steps of every arm; returns (seconds, problems)."""
    from aligned_probing.training import run_finetune
    from aligned_probing.training.config import ARMS

    cfg = {
        "output_dir": str(out),
        "model": {"spec": str(model_dir), "dtype": dtype, "device": device},
        "data": {"prompts": str(prompts), "n_train": 12 if small else 24, "n_eval": 8 if small else 16},
        "generation": {"k": 3, "max_new_tokens": 4 if small else 12, "batch_size": 32},
        "probes": {"layer": 0.5, "n_ensemble": 2, "n_heldout": 2},
        "training": {
            "arms": list(ARMS),
            "max_steps": 2,
            "per_device_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 48,
            "learning_rate": 1e-4,
            "seeds": [0],
        },
        "evaluation": {"n_benign": 4, "ppl_max_length": 32, "n_boot": 50, "benign_path": str(benign)},
    }
    start = time.perf_counter()
    results = run_finetune(cfg)
    seconds = time.perf_counter() - start
    problems = []
    missing = set(ARMS) - set(results["arm"])
    if missing:
        problems.append(f"fine-tuning arms without results: {sorted(missing)}")
    ppl = results.loc[results["metric"] == "perplexity", "value"]
    if not ((ppl > 1) & ppl.notna()).all():
        problems.append(f"fine-tuning perplexities not finite > 1: {ppl.tolist()}")
    return seconds, problems


def main(argv: list[str] | None = None) -> int:
    """Run the check and print the summary; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny models and sizes (CPU CI)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--scorer", choices=["hash", "embedded"], default="hash")
    parser.add_argument(
        "--bf16-tol",
        type=float,
        default=0.05,
        help="max median relative L2 error of bf16 vs float32 pooled residuals, any layer",
    )
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args(argv)
    with check_environment(hash_scorer=args.scorer == "hash"):
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    versions_used = versions()
    print("versions: " + ", ".join(f"{k}={v}" for k, v in versions_used.items()), flush=True)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("FAIL: --device cuda but torch.cuda.is_available() is False", flush=True)
            return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    for stale in [*out.glob("run-*"), *out.glob("finetune-*"), *out.glob("store-*")]:
        shutil.rmtree(stale)  # a cached stage would fake the timings; the models are kept
    shapes = SMALL if args.small else SHAPES
    t0 = time.perf_counter()
    models = {name: build_model(out / "models" / name, shape, args.device) for name, shape in shapes.items()}
    build_s = time.perf_counter() - t0
    prompts, benign = write_inputs(out, 64)
    summary: dict[str, Any] = {
        "device": args.device,
        "small": args.small,
        "build_s": build_s,
        "dtypes": {},
        "versions": versions_used,
    }
    problems: list[str] = []
    log = out / "steps.log"  # the trainers' and stages' chatter; the screen keeps the summary

    def attempt(name: str, step: Any) -> Any:
        """Run one step with its output in `log`; a crash becomes a problem and the check goes on."""
        with open(log, "a") as stream, contextlib.redirect_stdout(stream):
            try:
                return step()
            except Exception as exc:  # noqa: BLE001 - report every failing step, not only the first
                traceback.print_exc(file=stream)
                problems.append(f"{name} raised {type(exc).__name__}: {str(exc)[:300]} (traceback: {log})")
                return None

    for dtype in args.dtypes:
        row: dict[str, Any] = {}
        config = pipeline_config(models, prompts, out / f"run-{dtype}", dtype, args.device, args.small)
        done = attempt(f"[{dtype}] pipeline", lambda config=config: run_pipeline(config))
        if done is not None:
            wall, probe_s, bad = done
            row.update(pipeline_s=wall, probe_s=probe_s)
            problems += [f"[{dtype}] {b}" for b in bad]
        rates = attempt(
            f"[{dtype}] throughput",
            lambda dtype=dtype: throughput(models["llama-1b"], dtype, args.device, args.small),
        )
        row.update(rates or {})
        if not args.skip_finetune:
            done = attempt(
                f"[{dtype}] fine-tuning",
                lambda dtype=dtype: finetune(
                    models["llama-135m"],
                    prompts,
                    benign,
                    out / f"finetune-{dtype}",
                    dtype,
                    args.device,
                    args.small,
                ),
            )
            if done is not None:
                row["finetune_s"] = done[0]
                problems += [f"[{dtype}] {b}" for b in done[1]]
        summary["dtypes"][dtype] = row
    if "bfloat16" in args.dtypes and "float32" in args.dtypes:
        agreement = {}
        for name in ("llama-1b", "gemma3-1b"):
            error = attempt(
                f"bf16 agreement of {name}", lambda name=name: bf16_agreement(models[name], args.device)
            )
            if error is not None:
                agreement[name] = error
        summary["bf16_rel_error"] = agreement
        problems += [
            f"bf16 vs float32 residuals of {n}: relative error {e:.4f} > tol {args.bf16_tol}"
            for n, e in agreement.items()
            if not e <= args.bf16_tol
        ]
    summary["problems"] = problems
    summary["total_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary, shapes, args.bf16_tol), flush=True)
    return 1 if problems else 0


def format_summary(summary: dict[str, Any], shapes: dict[str, dict[str, Any]], tol: float) -> str:
    """The one-screen summary."""
    lines = [
        f"gpu_check on {summary['device']} ({summary['versions']['gpu']}), small={summary['small']}, "
        f"models built in {summary['build_s']:.0f} s:"
    ]
    for name, s in shapes.items():
        lines.append(
            f"  {name:11s} {s['arch']:6s} d={s['hidden_size']} L={s['num_hidden_layers']} "
            f"heads={s['num_attention_heads']}/{s['num_key_value_heads']}"
        )
    lines.append(
        f"{'dtype':9s} {'pipeline s':>10s} {'probe s':>8s} {'gen tok/s':>10s} {'enc tok/s':>10s} "
        f"{'HF hs tok/s':>11s} {'enc/HF':>6s} {'finetune s':>10s}"
    )
    nan = float("nan")
    for dtype, r in summary["dtypes"].items():
        r = {
            "pipeline_s": nan,
            "probe_s": nan,
            "gen_new_tokens_per_s": nan,
            "encode_tokens_per_s": nan,
            "hf_hidden_states_tokens_per_s": nan,
            **r,
        }
        ratio = r["encode_tokens_per_s"] / r["hf_hidden_states_tokens_per_s"]
        lines.append(
            f"{dtype:9s} {r['pipeline_s']:10.1f} {r['probe_s']:8.1f} {r['gen_new_tokens_per_s']:10.0f} "
            f"{r['encode_tokens_per_s']:10.0f} {r['hf_hidden_states_tokens_per_s']:11.0f} {ratio:6.2f} "
            f"{r.get('finetune_s', float('nan')):10.1f}"
        )
    if "bf16_rel_error" in summary:
        lines.append(
            "bf16 vs float32 pooled residuals, max over layers of the median relative L2 error: "
            + ", ".join(f"{n} {e:.4f}" for n, e in summary["bf16_rel_error"].items())
            + f" (tolerance {tol})"
        )
    lines.append(
        "throughput: generation and encoding on llama-1b; pipeline = every stage on all three models"
    )
    lines.append(
        f"total {summary['total_s']:.0f} s; "
        + (
            "ALL CHECKS PASSED"
            if not summary["problems"]
            else "FAILED:\n  " + "\n  ".join(summary["problems"])
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
