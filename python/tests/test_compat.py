"""The `flash_attn` drop-in: modules resolve to ours, the padding and rotary helpers are right, unpadded varlen
attention equals padded attention, a script that imports flash_attn runs unchanged, a real flash_attn is not
replaced."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
import torch
from ref import attention, check, rotate

import flashattn
from flashattn import compat


@pytest.fixture
def installed():
    compat.uninstall()
    yield compat.install()
    compat.uninstall()


def test_modules_resolve_to_ours(installed):
    import flash_attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from flash_attn.bert_padding import pad_input, unpad_input
    from flash_attn.flash_attn_interface import flash_attn_qkvpacked_func
    from flash_attn.layers.rotary import apply_rotary_emb

    assert flash_attn is installed and flash_attn.__version__ == compat.FLASH_ATTN_API_VERSION
    assert flash_attn_func is flashattn.flash_attn_func
    assert flash_attn_varlen_func is flashattn.flash_attn_varlen_func
    assert flash_attn_with_kvcache is flashattn.flash_attn_with_kvcache
    assert flash_attn_qkvpacked_func is flashattn.flash_attn_qkvpacked_func
    assert pad_input is compat.pad_input and unpad_input is compat.unpad_input
    assert apply_rotary_emb is compat.apply_rotary_emb
    assert compat.install() is installed  # idempotent


def test_refuses_a_real_flash_attn():
    compat.uninstall()
    fake = types.ModuleType("flash_attn")
    fake.__file__ = "/elsewhere/flash_attn/__init__.py"
    sys.modules["flash_attn"] = fake
    try:
        with pytest.raises(RuntimeError, match="real flash_attn is already imported"):
            compat.install()
        assert sys.modules["flash_attn"] is fake
    finally:
        del sys.modules["flash_attn"]


def test_unpad_pad_round_trip_and_varlen_equals_padded(device):
    dtype = torch.bfloat16
    b, s, h, d = 3, 37, 4, 64
    lengths = [37, 5, 20]
    mask = torch.zeros(b, s, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    x = torch.randn(b, s, h, d, device=device, dtype=dtype)
    packed, indices, cu, max_s, used = compat.unpad_input(x, mask)
    assert packed.shape == (sum(lengths), h, d) and max_s == 37
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 37, 42, 62] and used.tolist() == lengths
    back = compat.pad_input(packed, indices, b, s)
    assert torch.equal(back, x * mask[:, :, None, None])
    # Varlen attention on the packed rows equals attention of each sequence alone.
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    qp, kp, vp = (compat.unpad_input(t, mask)[0] for t in (q, k, v))
    out = flashattn.flash_attn_varlen_func(qp, kp, vp, cu, cu, max_s, max_s, causal=True)
    out = compat.pad_input(out, indices, b, s)
    for i, n in enumerate(lengths):
        one = (q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
        ref = attention(*(t.double() for t in one), causal=True)[0]
        base = attention(*one, causal=True, baseline=True)[0]
        check(f"unpadded sequence {i}", out[i : i + 1, :n].cpu(), base.cpu(), ref.cpu())
        assert torch.equal(out[i, n:].cpu(), torch.zeros(s - n, h, d, dtype=dtype))


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb(device, interleaved):
    b, s, h, d, rot = 2, 9, 3, 64, 32
    x = torch.randn(b, s, h, d, device=device)
    ang = torch.rand(40, rot // 2, device=device) * 6
    cos, sin = ang.cos(), ang.sin()
    offsets = torch.tensor([0, 7], device=device)
    out = compat.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    for i in range(b):
        pos = torch.arange(s, device=device) + int(offsets[i])
        want = rotate(x[i], cos[pos][:, None], sin[pos][:, None], interleaved)
        torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-5)
    # The varlen form over the same rows, and in place.
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32, device=device)
    flat = x.reshape(b * s, h, d).clone()
    got = compat.apply_rotary_emb(
        flat, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=s, inplace=True
    )
    assert got is flat
    torch.testing.assert_close(flat.reshape(b, s, h, d), out)


def test_script_runs_unchanged(tmp_path, device):
    script = tmp_path / "fa2_script.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch
        from flash_attn import flash_attn_func
        from flash_attn.bert_padding import unpad_input
        q = torch.randn(2, 16, 4, 32, dtype=torch.float16, device="{device}")
        out = flash_attn_func(q, q, q, causal=True)
        print("ran", tuple(out.shape))
    """)
    )
    r = subprocess.run(
        [sys.executable, "-m", "flashattn.compat", str(script)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ran (2, 16, 4, 32)" in r.stdout
