#!/usr/bin/env python3
"""Writes the seed inputs of the `cli_run` fuzz target into fuzz/seeds/cli_run/.

Each seed is one flag byte (see fuzz_targets/cli_run.rs) followed by a small safetensors file for
`flashattn run`: dense, varlen, backward, ALiBi and KV-cache (dense, paged, rotary, leftpad) inputs.
Standard library only; deterministic.
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_run")
FMT = {"F32": "<f", "F16": "<e", "I32": "<i", "I64": "<q"}


def numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def tensor(dtype, shape, vals=None):
    n = numel(shape)
    if vals is None:
        vals = [((i * 37) % 17) / 8.0 - 1.0 for i in range(n)]
    if dtype == "BF16":
        data = b"".join(struct.pack("<f", v)[2:] for v in vals)
    else:
        data = b"".join(struct.pack(FMT[dtype], v) for v in vals)
    return dtype, shape, data


def safetensors(tensors):
    header, blobs, off = {}, [], 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def main():
    os.makedirs(OUT, exist_ok=True)
    b, s, h, d = 2, 5, 2, 4
    qkv = lambda dt, sq=s, sk=s, hk=h: {  # noqa: E731
        "q": tensor(dt, [b, sq, h, d]),
        "k": tensor(dt, [b, sk, hk, d]),
        "v": tensor(dt, [b, sk, hk, d]),
    }
    seeds = {
        "dense_f32": (0, qkv("F32")),
        "dense_f16_causal": (1, qkv("F16", sq=7, sk=3)),
        "dense_bf16_gqa_window": (2 | (1 << 5), qkv("BF16", hk=1)),
        "dense_backward": (16, {**qkv("F32"), "do": tensor("F32", [b, s, h, d])}),
        "dense_alibi_softcap": (4, {**qkv("F16"), "alibi_slopes": tensor("F32", [h], [0.25, 0.5])}),
        "varlen": (
            8,
            {
                "q": tensor("F32", [7, h, d]),
                "k": tensor("F32", [9, h, d]),
                "v": tensor("F32", [9, h, d]),
                "cu_seqlens_q": tensor("I32", [3], [0, 3, 7]),
                "cu_seqlens_k": tensor("I64", [3], [0, 5, 9]),
                "seqused_k": tensor("I32", [2], [4, 4]),
            },
        ),
        "kv_dense": (
            128 | 1,
            {
                "q": tensor("F16", [b, 2, h, d]),
                "k_cache": tensor("F16", [b, 8, h, d]),
                "v_cache": tensor("F16", [b, 8, h, d]),
                "k_new": tensor("F16", [b, 2, h, d]),
                "v_new": tensor("F16", [b, 2, h, d]),
                "cache_seqlens": tensor("I32", [b], [3, 5]),
                "cache_leftpad": tensor("I32", [b], [0, 1]),
            },
        ),
        "kv_paged_rotary": (
            128 | 32 | 1,
            {
                "q": tensor("F32", [b, 1, h, d]),
                "k_cache": tensor("F32", [4, 4, h, d]),
                "v_cache": tensor("F32", [4, 4, h, d]),
                "k_new": tensor("F32", [b, 1, h, d]),
                "v_new": tensor("F32", [b, 1, h, d]),
                "cache_seqlens": tensor("I64", [], [2]),
                "block_table": tensor("I32", [b, 2], [0, 1, 2, 3]),
                "rotary_cos": tensor("F32", [8, 2]),
                "rotary_sin": tensor("F32", [8, 2]),
            },
        ),
        "kv_whole_cache": (
            128,
            {
                "q": tensor("BF16", [1, 3, h, d]),
                "k_cache": tensor("BF16", [1, 6, h, d]),
                "v_cache": tensor("BF16", [1, 6, h, d]),
                "cache_batch_idx": tensor("I32", [1], [0]),
            },
        ),
    }
    for name, (flags, ts) in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(bytes([flags]) + safetensors(ts))


if __name__ == "__main__":
    main()
