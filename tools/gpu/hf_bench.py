"""A Llama-style model through Hugging Face transformers with flashattn against "sdpa" and "eager": training
tokens/s and greedy-decode tokens/s, in one process (the drop-ins issue's model benchmark).

Model: random weights from a config (no download), 8 layers, hidden 2048, 16 query / 4 KV heads (head dim 128),
MLP 5632, vocabulary 32000, bf16 on one GPU.
- Training: one step = forward, cross-entropy loss, backward (no optimiser: its time does not depend on the
  attention); batch 1 at sequence 4k and 8k; median of timed steps after warm-up; tokens/s = batch x seq / step.
- Decode: greedy `generate` after a 4k-token prompt at batch 1 and 32 (static shapes: every sequence the same
  length, no padding); decode tokens/s = batch x (N - 1) / (t(N new tokens) - t(1 new token)), which removes
  the prefill.

    python3 tools/gpu/hf_bench.py [--json FILE] [--quick]
    python3 tools/gpu/hf_bench.py --smoke   # tiny sizes on CPU tensors: checks the script itself
"""

import argparse
import json
import statistics
import time

import torch

import flashattn
import flashattn.hf

DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def model_for(impl: str, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=32000,
        max_position_embeddings=16384,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=DEV, dtype=torch.bfloat16)


def timed(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_tokens_per_s(model, seq: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=DEV)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    return seq / timed(step, reps)


def decode_tokens_per_s(model, batch: int, prompt: int, new: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEV)
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip

    t_full = timed(lambda: gen(new), reps, warmup=1)
    t_one = timed(lambda: gen(1), reps, warmup=1)
    return batch * (new - 1) / (t_full - t_one)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="2 layers, short runs (a smoke test)")
    ap.add_argument("--smoke", action="store_true", help="1 layer, sequences of 128/256, CPU tensors")
    ap.add_argument("--impls", default="fattn,sdpa,eager")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV, args.quick = "cpu", True
    ours = flashattn.hf.register()
    layers = 1 if args.smoke else 2 if args.quick else 8
    new = 16 if args.quick else 64
    seqs, prompt = ((128, 256), 128) if args.smoke else ((4096, 8192), 4096)
    batches = (1, 2) if args.smoke else (1, 32)
    rows = []
    for impl in args.impls.split(","):
        impl = ours if impl == "fattn" else impl
        model = model_for(impl, layers)
        for seq in seqs:
            try:
                tps = train_tokens_per_s(model, seq, reps=3 if args.quick else 5)
            except torch.OutOfMemoryError:
                tps = None
            rows.append(dict(impl=impl, kind="train", batch=1, seq=seq, tokens_per_s=tps))
            print(rows[-1], flush=True)
        model.eval()
        for batch in batches:
            try:
                tps = decode_tokens_per_s(model, batch, prompt, new, reps=1 if args.quick else 3)
            except torch.OutOfMemoryError:
                tps = None
            rows.append(dict(impl=impl, kind="decode", batch=batch, seq=prompt, tokens_per_s=tps))
            print(rows[-1], flush=True)
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    sdpa = {(r["kind"], r["batch"], r["seq"]): r["tokens_per_s"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        base = sdpa.get((r["kind"], r["batch"], r["seq"]))
        if r["impl"] == ours and base and r["tokens_per_s"]:
            print(f"{ours}/sdpa {r['kind']} b{r['batch']} s{r['seq']}: {r['tokens_per_s'] / base:.3f}")
    if args.json:
        gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
        meta = dict(gpu=gpu, torch=torch.__version__, flashattn=flashattn.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
