"""Hybrid models and priming (SPEC 7): tiny random sources of every family, built offline from
configs. Mixers run their PyTorch reference backend on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gka_kernels.hybrid import HybridCache, HybridConfig, HybridForCausalLM, cache_bytes_per_token  # noqa: E402
from gka_kernels.hybrid.align import AlignConfig, Aligner, trainable_parameters  # noqa: E402
from gka_kernels.hybrid.pattern import parse_pattern, pattern_from_layers, uniform_layers  # noqa: E402
from gka_kernels.hybrid.selection import (SlidingWindowAttention, score_layers_swa,  # noqa: E402
                                          select_layers_swa, sliding_window_mask)
from gka_kernels.hybrid.transfer import convert_to_hybrid  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are many small ops: one thread is faster and deterministic on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_source(family: str = "llama", seed: int = 0, **overrides):
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_name)(cfg).eval()
    if family == "qwen2":  # random biases so that dropping them is visible
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_()
    return model


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


# -- pattern --------------------------------------------------------------------------------------

def test_pattern_parsing_and_placement():
    assert parse_pattern("*-GKA-GKA-*", 4) == ["*", "GKA", "GKA", "*"]
    assert pattern_from_layers(4, [1, 3], "mamba2") == "*-M2-*-M2"
    assert uniform_layers(8, 2) == [2, 6] and uniform_layers(4, 4) == [0, 1, 2, 3] and uniform_layers(5, 0) == []
    with pytest.raises(ValueError, match="unknown token"):
        parse_pattern("*-SWA-*", 3)
    with pytest.raises(ValueError, match="expected 4 tokens"):
        parse_pattern("*-GKA", 4)
    with pytest.raises(ValueError, match="ssm"):
        pattern_from_layers(4, [1], "rwkv")
    src = make_source()
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        HybridConfig(text_config=src.config.to_dict(), hybrid_override_pattern="*-*-GDN")
    with pytest.raises(ValueError, match="ssm_config"):
        HybridConfig(text_config=src.config.to_dict(), ssm_config={"GDN": {"num_iter": 3}})


# -- weight transfer ------------------------------------------------------------------------------

def _expected_gate(w_o: torch.Tensor, w_v: torch.Tensor, groups: int) -> torch.Tensor:
    """0.5 * (W_O^T + W_V with every row repeated ``groups`` times), written as a row loop."""
    rows = torch.stack([w_v[r // groups] for r in range(w_v.shape[0] * groups)])
    return 0.5 * (w_o.t() + rows)


@pytest.mark.parametrize("token", ["GKA", "GDN", "M2"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_weight_transfer_tensor_by_tensor(family, token):
    src = make_source(family)
    pattern = f"*-{token}-*-{token}"
    hybrid, log = convert_to_hybrid(src, pattern)
    H, HKV, D = 4, 2, 8
    groups = H // HKV
    for i in (1, 3):
        attn = src.model.layers[i].self_attn
        mixer = hybrid.model.layers[i].self_attn.mixer
        wq, wk, wv, wo = (getattr(attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate = _expected_gate(wo, wv, groups)
        if token in ("GKA", "GDN"):
            assert torch.equal(mixer.q_proj.weight, wq) and torch.equal(mixer.k_proj.weight, wk)
            assert torch.equal(mixer.v_proj.weight, wv) and torch.equal(mixer.o_proj.weight, wo)
            assert torch.allclose(mixer.g_proj.weight, gate, rtol=0, atol=1e-7)
        else:
            z, x, b, c, dt = mixer.in_proj.weight.split([H * D, HKV * D, HKV * D, H * D, H], dim=0)
            assert torch.allclose(z, gate, rtol=0, atol=1e-7)
            assert torch.equal(x, wv) and torch.equal(b, wk) and torch.equal(c, wq)
            assert torch.equal(mixer.out_proj.weight, wo)
            assert not torch.equal(dt, torch.zeros_like(dt))
        assert (mixer.A_log.exp() >= 1.0 - 1e-6).all()  # fresh init of the layer, not transformers' init
        conv = next(m for n, m in mixer.named_modules() if n.endswith("conv1d"))
        assert conv.weight.std() > 0.1  # the layer's own conv init survived post_init
        line = log[i]
        assert line.startswith(f"layer   {i} {token}") and "RoPE" in line and "fresh" in line
        if family == "qwen2":
            assert "q_proj.bias" in line and "cannot be carried" in line
        if family == "qwen3":
            assert "q_norm" in line and "k_norm" in line
    # everything outside the replaced attention is the source's, tensor by tensor
    src_sd, hyb_sd = src.state_dict(), hybrid.state_dict()
    for name, value in src_sd.items():
        if name.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")):
            assert name not in hyb_sd
        else:
            assert torch.equal(hyb_sd[name], value), name
    assert log[0].startswith("layer   0 *") and log[2].startswith("layer   2 *")


def test_unsupported_sources_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported source model type 'gpt2'"):
        convert_to_hybrid(gpt2, "*-GDN")
    base = transformers.LlamaModel(make_source().config)
    with pytest.raises(ValueError, match="expected a LlamaForCausalLM"):
        convert_to_hybrid(base, "*-GDN-*-*")


# -- model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_attention_pattern_reproduces_source_exactly(family):
    src = make_source(family)
    hybrid, _ = convert_to_hybrid(src, "*-*-*-*")
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.equal(hybrid(x).logits, src(x).logits)
        assert torch.equal(hybrid(x, attention_mask=mask).logits, src(x, attention_mask=mask).logits)


def _greedy(model, x, new, use_cache, mask=None):
    with torch.no_grad():
        return model.generate(x, attention_mask=mask if mask is not None else torch.ones_like(x),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache,
                              pad_token_id=0)


@pytest.mark.parametrize("family,pattern", [
    ("llama", "GKA-*-GDN-M2"), ("qwen2", "*-GDN-*-GDN"), ("qwen3", "*-M2-GKA-*"),
    ("mistral", "GDN-*-*-M2"), ("qwen3_moe", "*-GDN-GKA-*"), ("llama", "GDN-GDN-GDN-GDN"),
])
def test_cached_decoding_equals_full_forward(family, pattern):
    src = make_source(family)
    hybrid, _ = convert_to_hybrid(src, pattern, ssm_config={"GKA": {"num_iter": 8}} if "GKA" in pattern else None)
    x = ids(2, 14)
    with torch.no_grad():
        full = hybrid(x, use_cache=False).logits
        cache = hybrid.new_cache()
        out = hybrid(x[:, :9], cache=cache, use_cache=True)
        steps = [out.logits]
        for t in range(9, 14):
            steps.append(hybrid(x[:, t:t + 1], cache=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1)
    err = (inc - full).norm() / full.norm()
    assert err < 1e-5, f"incremental vs full forward: relative error {err:.2e}"
    assert cache.get_seq_length() == 14
    g_cache = _greedy(hybrid, x, 6, True)
    g_plain = _greedy(hybrid, x, 6, False)
    assert torch.equal(g_cache, g_plain)
    assert isinstance(cache, HybridCache)


def test_cache_reorder_and_beam_search():
    src = make_source("llama")
    hybrid, _ = convert_to_hybrid(src, "*-GDN-M2-GKA", ssm_config={"GKA": {"num_iter": 8}})
    x = ids(3, 9)
    perm = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = hybrid.new_cache()
        hybrid(x[:, :8], cache=cache, use_cache=True)
        cache.reorder_cache(perm)
        step = hybrid(x[perm, 8:], cache=cache, use_cache=True).logits
        ref = hybrid(x[perm]).logits[:, -1:]
    assert (step - ref).abs().max() < 1e-5
    beams = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = hybrid.generate(x, attention_mask=torch.ones_like(x), use_cache=True, **beams)
        b = hybrid.generate(x, attention_mask=torch.ones_like(x), use_cache=False, **beams)
    assert torch.equal(a, b)


def test_left_padding_matches_unpadded_rows():
    src = make_source("llama")
    hybrid, _ = convert_to_hybrid(src, "*-GDN-M2-GKA", ssm_config={"GKA": {"num_iter": 8}})
    a, b = ids(1, 10, seed=3), ids(1, 7, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = hybrid(batch, attention_mask=mask).logits
        la, lb = hybrid(a).logits, hybrid(b).logits
    assert (padded[0] - la[0]).abs().max() < 1e-5
    assert (padded[1, 3:] - lb[0]).abs().max() < 1e-5
    gen_batch = _greedy(hybrid, batch, 4, True, mask)
    gen_b = _greedy(hybrid, b, 4, True)
    assert torch.equal(gen_batch[1, 3:], gen_b[0])


def test_save_load_round_trip(tmp_path):
    src = make_source("qwen3")
    hybrid, _ = convert_to_hybrid(src, "GKA-*-GDN-M2", ssm_config={"GKA": {"num_iter": 7}})
    hybrid.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gka_hybrid" and cfg["hybrid_override_pattern"] == "GKA-*-GDN-M2"
    assert cfg["text_config"]["model_type"] == "qwen3"
    loaded = HybridForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert type(auto) is HybridForCausalLM
    assert loaded.mixers()[0].num_iter == 7
    for name, value in hybrid.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, hybrid(x).logits)
        assert torch.equal(auto(x).logits, hybrid(x).logits)


def assert_same_buffers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every buffer, saved or not (RoPE ``inv_freq`` is not), has the same dtype and values."""
    bufs = dict(b.named_buffers())
    assert dict(a.named_buffers()).keys() == bufs.keys()
    for name, value in a.named_buffers():
        assert value.dtype == bufs[name].dtype and torch.equal(value, bufs[name]), name


def test_bf16_conversion_keeps_float32_rope_like_from_pretrained(tmp_path):
    """Converting a bfloat16 source casts parameters, not the unsaved RoPE ``inv_freq`` (float32, as
    ``from_pretrained(dtype=bfloat16)`` keeps it): otherwise a saved-and-reloaded hybrid rotates
    queries/keys differently from the converted one (bfloat16 ``inv_freq`` is off by up to 2^-9
    relative, i.e. ~0.1 rad at position 64 for the fastest frequency)."""
    src = make_source("llama").to(torch.bfloat16)
    hybrid, _ = convert_to_hybrid(src, "*-GDN-*-M2")
    assert {p.dtype for p in hybrid.parameters()} == {torch.bfloat16}
    assert hybrid.model.rotary_emb.inv_freq.dtype == torch.float32
    hybrid.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.bfloat16)
    for name, value in hybrid.state_dict().items():
        assert value.dtype == loaded.state_dict()[name].dtype and torch.equal(loaded.state_dict()[name], value)
    assert_same_buffers(loaded, hybrid)


def test_cache_grows_only_with_attention_layers():
    src = make_source("llama")
    hybrid, _ = convert_to_hybrid(src, "*-GDN-GDN-M2")
    per_token = cache_bytes_per_token(hybrid.config, torch.float32)
    assert per_token == 1 * 2 * 2 * 8 * 4  # one attention layer, HKV=2, D=8, fp32
    sizes = []
    for length in (5, 20):
        cache = hybrid.new_cache()
        with torch.no_grad():
            hybrid(ids(1, length), cache=cache, use_cache=True)
        sizes.append(cache.memory_bytes())
    assert sizes[1]["attention"] - sizes[0]["attention"] == 15 * per_token
    assert sizes[0]["ssm"] == sizes[1]["ssm"] > 0
    src_cache = transformers.DynamicCache(config=src.config)
    with torch.no_grad():
        src(ids(1, 20), cache=src_cache, use_cache=True)
    src_bytes = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in src_cache.layers)
    assert src_bytes == 4 * sizes[1]["attention"]  # the source keeps KV in all four layers


# -- layer selection ------------------------------------------------------------------------------

def test_sliding_window_mask_and_attention():
    m = sliding_window_mask(6, 6, 3, torch.device("cpu"))
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == (i - 3 < j <= i)
    tail = sliding_window_mask(2, 6, 3, torch.device("cpu"))
    assert torch.equal(tail, m[4:])
    for impl in ("sdpa", "eager"):
        src = make_source("llama", attn_implementation=impl)
        x = ids(2, 16)
        with torch.no_grad():
            full = src(x).logits
            attn = src.model.layers[1].self_attn
            src.model.layers[1].self_attn = SlidingWindowAttention(attn, 16)
            wide = src(x).logits
            src.model.layers[1].self_attn = SlidingWindowAttention(attn, 4)
            narrow = src(x).logits
            src.model.layers[1].self_attn = attn
        assert (wide - full).abs().max() < 1e-5, impl
        assert torch.equal(narrow[:, :4], full[:, :4]) or (narrow[:, :4] - full[:, :4]).abs().max() < 1e-5
        assert (narrow[:, 4:] - full[:, 4:]).abs().max() > 1e-4


def test_swa_scoring_and_selection():
    src = make_source("llama")
    windows = ids(4, 24, seed=5)
    base, scores = score_layers_swa(src, windows, window=3)
    assert len(scores) == 4 and all(s.layer == i for i, s in enumerate(scores))
    for s in scores:
        assert math.isclose(s.quality_kept, base / s.swa_perplexity)
    chosen = select_layers_swa(scores, 2)
    best = sorted(scores, key=lambda s: -s.quality_kept)[:2]
    assert chosen == sorted(s.layer for s in best)
    _, wide = score_layers_swa(src, windows, window=24)
    assert all(abs(s.quality_kept - 1.0) < 1e-5 for s in wide)


# -- alignment ------------------------------------------------------------------------------------

def _aligner(tmp, steps, checkpoint_every=100, seed=0):
    src = make_source("llama")
    torch.manual_seed(seed)
    hybrid, _ = convert_to_hybrid(src, "*-GDN-*-M2")
    tokens = torch.randint(3, VOCAB, (600,), generator=torch.Generator().manual_seed(7))
    cfg = AlignConfig(steps=steps, batch_size=2, seq_len=16, lr=5e-3, warmup=2, checkpoint_every=checkpoint_every)
    return Aligner(hybrid, src, tokens, cfg, tmp, progress=False), src


def test_alignment_trains_only_ssm_parameters(tmp_path):
    aligner, src = _aligner(tmp_path, steps=6)
    before = {n: p.detach().clone() for n, p in aligner.hybrid.named_parameters()}
    result = aligner.run()
    assert result.steps_done == 6 and not result.interrupted
    assert result.losses[-1] < result.losses[0]
    trained = trainable_parameters(aligner.hybrid)
    assert trained and all(".self_attn.mixer." in n for n in trained)
    for n, p in aligner.hybrid.named_parameters():
        if n not in trained:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    for n, p in src.state_dict().items():  # the teacher never changes
        assert torch.equal(p, make_source("llama").state_dict()[n])


def test_per_layer_alignment_target_is_the_source_attention():
    from gka_kernels.hybrid.align import alignment_loss, teacher_attention_output

    src = make_source("qwen3")
    hybrid, _ = convert_to_hybrid(src, "*-GDN-*-*")
    x = ids(2, 16)
    seen = {}
    hook = src.model.layers[1].self_attn.register_forward_hook(
        lambda m, a, kw, out: seen.update(inp=kw["hidden_states"], out=out[0]), with_kwargs=True)
    with torch.no_grad():
        src(x, use_cache=False)
    hook.remove()
    # layer 0 is attention in both models, so the student's input to layer 1 is the teacher's
    with torch.no_grad():
        ref = teacher_attention_output(src, 1, seen["inp"])
        assert (ref - seen["out"]).abs().max() < 1e-6
        base = alignment_loss(hybrid, src, x)
        both = alignment_loss(hybrid, src, x, layer_loss_weight=2.0)
        mixer_out = hybrid.model.layers[1].self_attn(hidden_states=seen["inp"])[0]
    expected = base + 2.0 * torch.nn.functional.mse_loss(mixer_out, seen["out"])
    assert torch.allclose(both, expected, rtol=1e-5)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    full, _ = _aligner(tmp_path / "full", steps=5)
    full_result = full.run()

    first, _ = _aligner(tmp_path / "split", steps=5)
    stop_at = 2

    def interrupt(a):
        if a.step == stop_at:
            a.request_stop()

    r1 = first.run(on_step=interrupt)
    assert r1.interrupted and r1.steps_done == stop_at
    # a fresh process: new objects with a different initialization, restored from the checkpoint
    second, _ = _aligner(tmp_path / "split", steps=5, seed=123)
    r2 = second.run(resume=True)
    assert r2.steps_done == 5 and not r2.interrupted
    assert r2.losses == full_result.losses
    for (n, p), (m, q) in zip(full.hybrid.named_parameters(), second.hybrid.named_parameters()):
        assert n == m and torch.equal(p, q), n
    assert second.stream.position == full.stream.position


# -- command line and embedded model ---------------------------------------------------------------

def test_embedded_model_is_small_and_better_than_unigram():
    from gka_kernels.hybrid.embedded import EMBEDDED_DIR, load_embedded_model

    size = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir())
    assert size < 5 * 2**20
    report = json.loads((EMBEDDED_DIR / "train_report.json").read_text())
    assert report["heldout_perplexity"] < 0.5 * report["unigram_heldout_perplexity"]
    model = load_embedded_model()
    assert model.config.vocab_size == 259 and model.config.model_type == "llama"
    from gka_kernels.hybrid.data import eval_windows, stdlib_text
    from gka_kernels.hybrid.evaluate import perplexity, unigram_perplexity
    from gka_kernels.hybrid.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    heldout = eval_windows(torch.tensor(tok.encode(stdlib_text("heldout", max_bytes=4 * 256))), 256)
    train = torch.tensor(tok.encode(stdlib_text("train", max_bytes=2_000_000)))
    ppl, uni = perplexity(model, heldout), unigram_perplexity(train, heldout, tok.vocab_size)
    assert ppl < 0.5 * uni, f"embedded model perplexity {ppl:.2f} vs unigram {uni:.2f}"


def test_cli_end_to_end_on_embedded_model(tmp_path, capsys):
    from gka_kernels.hybrid import prime

    out = tmp_path / "run"
    argv = ["--out", str(out), "--align-steps", "2", "--batch-size", "1", "--seq-len", "32",
            "--eval-windows", "1", "--decode-tokens", "2", "--checkpoint-every", "1", "--quiet"]
    prime.main(argv)
    text = capsys.readouterr().out
    for piece in ("layer selection (swa", "weight transfer", "teacher (source)", "hybrid, stage 0",
                  "hybrid, aligned", "cache B/token", "decode tok/s"):
        assert piece in text, piece
    report = json.loads((out / "prime_report.json").read_text())
    assert report["align_steps"] == 2 and parse_pattern(report["pattern"]).count("GDN") == 2
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["hybrid, aligned"]["cache_bytes_per_token"] * 2 == rows["teacher (source)"]["cache_bytes_per_token"]
    hybrid = HybridForCausalLM.from_pretrained(out, local_files_only=True)
    assert hybrid.config.hybrid_override_pattern == report["pattern"]
    # extending the finished run resumes from its checkpoint
    prime.main(argv[:2] + ["--align-steps", "3"] + argv[4:] + ["--resume"])
    report2 = json.loads((out / "prime_report.json").read_text())
    assert report2["align_steps"] == 3 and report2["align_losses"][:2] == report["align_losses"]


def test_cli_refuses_unsupported_source(tmp_path):
    from gka_kernels.hybrid import prime

    src = tmp_path / "gpt2"
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(src)
    with pytest.raises(SystemExit, match="unsupported source model type 'gpt2'"):
        prime.main([str(src), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="local model directory"):
        prime.main(["no/such/dir", "--out", str(tmp_path / "o")])


def test_sigint_during_alignment_stops_with_a_checkpoint(tmp_path):
    import os
    import signal

    from gka_kernels.hybrid import prime

    aligner, _ = _aligner(tmp_path, steps=4)
    previous = prime._install_stop_handlers(aligner)
    try:
        result = aligner.run(on_step=lambda a: os.kill(os.getpid(), signal.SIGINT) if a.step == 1 else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert result.interrupted and result.steps_done == 1
    state = torch.load(aligner.checkpoint_path, weights_only=False)
    assert state["step"] == 1 and state["data"]["position"] == 2 * 16


def test_bench_e2e_smoke(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench import bench_e2e

    result = bench_e2e.main(["--smoke", "--ssm", "gdn", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    assert saved["pattern"] == result["pattern"] == "*-GDN-*-GDN"
    src, hyb = saved["models"]["source"], saved["models"]["hybrid gdn"]
    assert [r["context"] for r in src] == [16, 64] and all(r["decode_tokens_per_s"] > 0 for r in src + hyb)
    # KV grows in 4 layers for the source, in 2 for the hybrid (plus a fixed SSM state)
    grow_src = src[1]["cache_bytes_after_prefill"] - src[0]["cache_bytes_after_prefill"]
    grow_hyb = hyb[1]["cache_bytes_after_prefill"] - hyb[0]["cache_bytes_after_prefill"]
    assert grow_src == 2 * grow_hyb > 0


# -- GPU (run with `pytest -m gpu`) ----------------------------------------------------------------

def _gpu_pair(pattern, dtype):
    """The same converted hybrid with Triton/CUDA mixers and with the PyTorch reference mixers."""
    src = make_source("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      intermediate_size=512, max_position_embeddings=512).to("cuda", dtype)
    fast, _ = convert_to_hybrid(src, pattern)
    ref, _ = convert_to_hybrid(src, pattern, mixer_backend="torch")
    ref.load_state_dict(fast.state_dict())
    return src, fast, ref


@pytest.mark.gpu
@pytest.mark.parametrize("token,tol", [("GDN", 5e-3), ("M2", 5e-3), ("GKA", 1e-2)])
def test_gpu_hybrid_kernels_match_reference_backend(token, tol):
    _, fast, ref = _gpu_pair(f"*-{token}-{token}-*", torch.float32)
    x = ids(2, 200).cuda()
    mask = torch.ones_like(x)
    mask[1, :37] = 0
    with torch.no_grad():
        for m in (None, mask):
            a, b = fast(x, attention_mask=m).logits, ref(x, attention_mask=m).logits
            err = ((a - b).norm() / b.norm()).item()
            assert err <= tol, f"{token}: Triton vs reference logits rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("token,tol", [("GDN", 5e-3), ("M2", 5e-3), ("GKA", 1e-2)])
def test_gpu_cached_decode_matches_full_forward(token, tol):
    _, fast, _ = _gpu_pair(f"{token}-*-{token}-*", torch.float32)
    x = ids(3, 90).cuda()
    with torch.no_grad():
        full = fast(x, use_cache=False).logits
        cache = fast.new_cache()
        steps = [fast(x[:, :70], cache=cache, use_cache=True).logits]
        for t in range(70, 90):
            steps.append(fast(x[:, t:t + 1], cache=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1)
    err = ((inc - full).norm() / full.norm()).item()
    assert err <= tol, f"{token}: decode loop vs full forward rel err {err:.2e}"


@pytest.mark.gpu
def test_gpu_bf16_generate_and_round_trip(tmp_path):
    src, fast, _ = _gpu_pair("*-GKA-GDN-M2", torch.bfloat16)
    x = ids(2, 64).cuda()
    out = _greedy(fast, x, 8, True)
    assert out.shape == (2, 72)
    fast.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.bfloat16).cuda()
    for name, value in fast.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert_same_buffers(loaded, fast)
    with torch.no_grad():
        a, b = loaded(x).logits.float(), fast(x).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 1e-3  # same weights and kernels: equal up to atomics order
