"""flashattn.hf with Hugging Face transformers 5.x: tiny random-weight models built from configs (no downloads).

Each model runs three ways: attn_implementation=flashattn's name, the same-precision baseline ("sdpa"; "eager"
for Gemma2, whose softcap sdpa refuses) and a float64 run of a plain math attention over transformers' own 4D
boolean masks (registered here) as the reference. The spec's
rule decides: float32 within 1e-4 of the reference relative to its largest magnitude; bfloat16 within twice the
baseline's own error (+1e-5). On the CPU everywhere; the logits and training tests on CUDA too (bfloat16 only:
the CUDA kernels take no float32).
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (>=5) is not installed")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"flashattn.hf targets transformers 5.x; found {transformers.__version__}", allow_module_level=True)

import flashattn.hf as hf  # noqa: E402

NAME = hf.register()
VOCAB = 96


def _llama():
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=256,
    )


def _qwen3():
    return transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,  # MQA
        head_dim=24,
        max_position_embeddings=256,
    )


def _gemma2():
    return transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,  # sliding, full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # scaling 24**-0.5, not 16**-0.5
        attn_logit_softcapping=1.0,  # small enough to bend the random model's scores
        final_logit_softcapping=30.0,
        sliding_window=7,
        max_position_embeddings=256,
    )


def _mistral():
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        max_position_embeddings=256,
    )


CONFIGS = {"llama": _llama, "qwen3": _qwen3, "gemma2": _gemma2, "mistral": _mistral}
# sdpa refuses softcap, so Gemma2's same-precision baseline is eager.
BASELINE = {"gemma2": "eager"}
REF = "test_math"


def _math_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """The reference: plain softmax attention over transformers' own boolean 4D mask, in the input precision
    (float64 here). Fully masked (padding) rows give zeros, not NaN, so they cannot spread through the
    layers (eager's additive float64-min mask overflows to -inf there)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    s = query @ k.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~attention_mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).contiguous(), None


def _math_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # always the explicit 4D boolean mask
    return sdpa_mask(*args, **kwargs)


transformers.AttentionInterface.register(REF, _math_attention)
transformers.masking_utils.AttentionMaskInterface.register(REF, _math_mask)


def _math64_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, s_aux=None, **kwargs):
    """The reference attention computed in float64 inside a model that runs in float32 (for models whose other
    layers have no float64 kernels, e.g. gpt-oss's experts), with attention sinks (`s_aux`) as one extra
    logit per head in each row's softmax."""
    q, k, v = query.double(), key.double(), value.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~attention_mask, float("-inf"))
    if s_aux is not None:
        s = torch.cat([s, s_aux.double()[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)[..., : k.shape[2]]
    return (p @ v).transpose(1, 2).contiguous().to(query.dtype), None


REF64 = "test_math64"
transformers.AttentionInterface.register(REF64, _math64_attention)
transformers.masking_utils.AttentionMaskInterface.register(REF64, _math_mask)


def _model(kind, dtype=torch.float32, device="cpu"):
    cfg = CONFIGS[kind]()
    model = getattr(transformers, type(cfg).__name__.replace("Config", "ForCausalLM"))(cfg)
    model.init_weights()
    return model.to(device=device, dtype=dtype).eval()


def _inputs(batch=3, seq=20, device="cpu"):
    ids = torch.randint(1, VOCAB, (batch, seq)).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if batch > 1:
        mask[1, :7] = 0  # left padding
    if batch > 2:
        mask[2, :1] = 0
    return ids, mask


def _run(model, impl, fn):
    model.set_attn_implementation(impl)
    return fn(model)


def _check(name, out, base, ref, keep=None):
    if keep is not None:
        out, base, ref = out[keep], base[keep], ref[keep]
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    e = (out.double() - ref).abs().max().item()
    eb = (base.double() - ref).abs().max().item()
    if out.dtype == torch.float32:
        bound = 1e-4 * max(ref.abs().max().item(), 1.0)
    else:
        bound = 2 * eb + 1e-5
    assert e <= bound, f"{name}: max error {e:.3g} > bound {bound:.3g} (baseline error {eb:.3g})"
    return e, eb


def _three_ways(kind, dtype, fn, device="cpu"):
    """fn(model) with ours, the baseline, and the float64 reference, on the same weights."""
    model = _model(kind, dtype, device)
    ours = _run(model, NAME, fn)
    base = _run(model, BASELINE.get(kind, "sdpa"), fn)
    ref = _run(model.double(), REF, fn)
    return ours, base, ref


def test_register():
    assert NAME == hf.ATTN_IMPLEMENTATION and "flash" not in NAME
    assert NAME in transformers.AttentionInterface._global_mapping
    from transformers.masking_utils import AttentionMaskInterface

    assert NAME in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="flash"):
        hf.register("flashattn")


def test_from_pretrained_and_set(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert loaded.config._attn_implementation == NAME
    loaded.set_attn_implementation("sdpa")
    loaded.set_attn_implementation(NAME)
    assert loaded.config._attn_implementation == NAME


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_logits(device, kind, dtype, padded):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take f16/bf16")
    ids, mask = _inputs(device=device)
    if not padded:
        mask = torch.ones_like(mask)

    def fn(m):
        with torch.no_grad():
            return m(ids, attention_mask=mask).logits

    ours, base, ref = _three_ways(kind, dtype, fn, device)
    _check(f"{kind} logits", ours, base, ref, keep=mask.bool())


def _tie_gap(model, seq, mask):
    """The float64 gap between the two best next-token logits after `seq` (1D, with its 2D `mask` row)."""
    with torch.no_grad():
        logits = model(seq[None], attention_mask=mask[None]).logits[0, -1]
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_generate(kind, cache):
    """Greedy 32 tokens (a left-padded batch of 2, and one unpadded sequence) match the baseline's. The only
    difference allowed is at a near-tie of the two best logits (gap < 1e-4 in float64, where float32 rounding
    may pick either), checked at the first differing token."""
    ids, mask = _inputs(batch=2, seq=12)
    model = _model(kind)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    base_impl = BASELINE.get(kind, "sdpa")
    runs = []
    with torch.no_grad():
        # the unpadded run has no mask: with a static cache, the empty slots come from the mask function
        for x, m in ((ids, mask), (ids[:1], None)):
            ours = _run(model, NAME, lambda mod, x=x, m=m: mod.generate(x, attention_mask=m, **kw))
            base = _run(model, base_impl, lambda mod, x=x, m=m: mod.generate(x, attention_mask=m, **kw))
            assert ours.shape == base.shape == (x.shape[0], 12 + 32)
            runs.append((ours, base, torch.ones_like(x) if m is None else m))
    model.double().set_attn_implementation(REF)
    for ours, base, m in runs:
        for r in range(ours.shape[0]):
            diff = (ours[r] != base[r]).nonzero()
            if len(diff):
                j = int(diff[0])
                full = torch.cat([m[r], torch.ones(32, dtype=m.dtype)])
                gap = _tie_gap(model, base[r, :j], full[:j])
                assert gap < 1e-4, f"{kind}/{cache}: token {j} differs from {base_impl} at no tie (gap {gap:.3g})"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_training_step(device, kind):
    """One training step (train mode, padded batch, labels): every parameter's gradient within the rule (float32
    on the CPU, bfloat16 on CUDA)."""
    ids, mask = _inputs(batch=2, seq=16, device=device)
    labels = ids.masked_fill(mask == 0, -100)

    def fn(m):
        m.train()
        m.zero_grad(set_to_none=True)
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        m.eval()
        return torch.cat([p.grad.flatten() for p in m.parameters()]), loss.detach()

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    (g, loss), (gb, lossb), (gr, lossr) = _three_ways(kind, dtype, fn, device)
    _check(f"{kind} loss", loss[None], lossb[None], lossr[None])
    _check(f"{kind} grads", g, gb, gr)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_packed(kind):
    """Sequences packed into one row, through position_ids and through cu_seq_lens_* kwargs, match each
    sequence run on its own (the float64 reference)."""
    lens = [9, 5, 12]
    seqs = [torch.randint(1, VOCAB, (n,)) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    model = _model(kind)
    with torch.no_grad():
        model.set_attn_implementation(NAME)
        by_pos = model(ids, position_ids=pos).logits[0]
        by_cu = model(
            ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens)
        ).logits[0]
        model.double().set_attn_implementation(REF)
        ref = torch.cat([model(s[None]).logits[0] for s in seqs])
    for name, out in (("position_ids", by_pos), ("cu_seq_lens", by_cu)):
        e = (out.double() - ref).abs().max().item()
        assert e <= 1e-4 * max(ref.abs().max().item(), 1.0), f"{kind} packed via {name}: error {e:.3g}"


def _call(**kw):
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    return hf.attention_forward(module, q, k, k.clone(), kw.pop("attention_mask", None), **kw)


def test_gpt_oss_sinks_match_eager():
    """gpt-oss (attention sinks as ``s_aux``, sliding and full layers, GQA): logits and one training step's sink
    gradients on flashattn's CPU path, against eager (the float32 baseline) and the float64 attention
    reference inside the float32 model (gpt-oss's experts have no float64 kernels)."""
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        max_position_embeddings=256,
    )
    model = transformers.GptOssForCausalLM(cfg)
    model.init_weights()
    with torch.no_grad():
        for layer in model.model.layers:  # random sinks, large enough to matter
            layer.self_attn.sinks.normal_(0.0, 2.0)
    model = model.float().eval()
    ids = torch.randint(1, VOCAB, (2, 19))

    def logits_and_grads(m):
        m.train()
        m.zero_grad(set_to_none=True)
        out = m(ids, labels=ids)
        out.loss.backward()
        m.eval()
        sinks = torch.cat([layer.self_attn.sinks.grad.flatten() for layer in m.model.layers])
        return out.logits.detach(), sinks

    ours = _run(model, NAME, logits_and_grads)
    base = _run(model, "eager", logits_and_grads)
    ref = _run(model, REF64, logits_and_grads)
    _check("gpt-oss logits", ours[0], base[0], ref[0])
    _check("gpt-oss dsinks", ours[1], base[1], ref[1])


def test_dropout_refused():
    with pytest.raises(NotImplementedError, match="dropout"):
        _call(dropout=0.1)


def test_4d_mask_refused():
    with pytest.raises(NotImplementedError, match="2D padding mask"):
        _call(attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_custom_mask_function_refused():
    with pytest.raises(NotImplementedError, match="custom mask function"):
        hf.attention_mask(1, 4, 4, use_vmap=True)


@pytest.mark.parametrize("window", [1, 3, 5, 8])
def test_sliding_window_semantics(window):
    """transformers' sliding_window=W (key j visible to query i when i - j < W) against its own sdpa path with
    the sliding-window mask it builds, one layer, float32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    m4 = sdpa_mask(
        batch_size=2,
        q_length=10,
        kv_length=10,
        mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
    )
    want, _ = sdpa_attention_forward(module, q, k, v, m4, scaling=1 / math.sqrt(16))
    got, _ = hf.attention_forward(module, q, k, v, None, scaling=1 / math.sqrt(16), sliding_window=window)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dv", [8, 24])
def test_value_head_dim_on_cpu(dv):
    """A value head dim other than the query's (MLA-style models): on CPU tensors it runs as given, narrower or
    wider, against the float64 reference."""
    from ref import attention, check

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, dv)
    out, _ = hf.attention_forward(module, q, k, v, None)
    assert out.shape == (2, 7, 4, dv)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = attention(t(q).double(), t(k).double(), t(v).double(), causal=True)[0]
    check(f"hf dv={dv}", out, ref.float(), ref)
