//! Integration tests of the `flashattn` command: the built binary is run as a user would.

/// The CLI's safetensors encoding, to write input files and compare outputs byte for byte.
#[path = "../src/encode.rs"]
mod encode;

use flashattn::{AttnOptions, BackwardInputs, CacheSeqlens, DType, KvCache, Rotary, Tensor, VarLen};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flashattn"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the flashattn binary runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashattn-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn randn(shape: &[usize], dtype: DType, rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_f32(&v, shape, dtype).unwrap()
}

fn write(path: &Path, tensors: &[(&str, &Tensor)]) {
    std::fs::write(path, encode::serialize(tensors).unwrap()).unwrap();
}

/// Writes the safetensors file `name` (in [`tmp`]) whose q, k and v are one random f32 tensor of `shape` drawn
/// from `seed`.
fn one_tensor_input(name: &str, shape: &[usize], seed: u64) -> PathBuf {
    let q = randn(shape, DType::F32, &mut StdRng::seed_from_u64(seed));
    let path = tmp(name);
    write(&path, &[("q", &q), ("k", &q), ("v", &q)]);
    path
}

/// Reads every tensor of a safetensors file as (dtype, shape, bytes).
fn read(path: &Path) -> Vec<(String, StDtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts that each of the file's tensors `name` is bit-identical to its `t`.
fn assert_same(file: &[(String, StDtype, Vec<usize>, Vec<u8>)], expected: &[(&str, &Tensor)]) {
    for &(name, t) in expected {
        let (_, dt, shape, bytes) =
            file.iter().find(|x| x.0 == name).unwrap_or_else(|| panic!("output has no `{name}`"));
        let (want_dt, want) = encode::to_bytes(t);
        assert_eq!((*dt, shape.as_slice()), (want_dt, t.shape()), "dtype/shape of `{name}`");
        assert!(bytes == &want, "`{name}` differs from the library's result");
    }
}

fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "flashattn {args:?} failed: {:?}\nstdout:\n{out}\nstderr:\n{err}", o.status);
    out
}

/// `flashattn run --device cpu` with `flags` over `tensors` (written to `<name>_in.safetensors`); the entries of
/// the output file it writes.
fn run_cpu(name: &str, tensors: &[(&str, &Tensor)], flags: &[&str]) -> Vec<(String, StDtype, Vec<usize>, Vec<u8>)> {
    let (input, output) = (tmp(&format!("{name}_in.safetensors")), tmp(&format!("{name}_out.safetensors")));
    write(&input, tensors);
    let mut args =
        vec!["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--device", "cpu"];
    args.extend_from_slice(flags);
    run_ok(&args);
    read(&output)
}

#[test]
fn check_passes_and_reports_differences_times_and_memory() {
    let out = run_ok(&["check", "--device", "cpu", "--seqlen", "64", "--dim", "32", "--heads", "4"]);
    for line in [
        "flashattn check: b=2 sq=64 sk=64 h=4 hk=4 d=32 f16",
        "device: cpu (requested)",
        "peak extra mem",
        "naive",
        "flash (cpu)",
        "max |flash - naive|",
        "max |flash - oracle|",
        "o    max err",
        "lse  max err",
        "PASS",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
}

#[test]
fn check_with_masks_gqa_and_backward() {
    let out = run_ok(&[
        "check",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seqlen",
        "40",
        "--seqlen-k",
        "70",
        "--heads",
        "4",
        "--heads-k",
        "2",
        "--dim",
        "24",
        "--dtype",
        "bf16",
        "--causal",
        "--window",
        "-1,8",
        "--alibi",
        "--softcap",
        "30",
        "--backward",
    ]);
    assert!(out.contains("causal, window (-1,8), softcap 30, alibi"), "{out}");
    assert!(out.contains("3 x |naive - f64|"), "alibi/softcap use factor 3:\n{out}");
    for g in ["dq   max err", "dk   max err", "dv   max err", "PASS"] {
        assert!(out.contains(g), "missing `{g}` in:\n{out}");
    }
}

#[test]
fn check_auto_device_says_why_and_bad_flags_exit_2() {
    let out = run_ok(&["check", "--seqlen", "16", "--dim", "16", "--heads", "2", "--dtype", "f32"]);
    assert!(out.contains("device: "), "{out}");
    assert!(out.contains("(auto"), "auto says why:\n{out}");
    assert!(out.contains("accuracy rule (f32)"), "{out}");
    let o = run(&["check", "--dtype", "i32"]);
    assert_eq!(o.status.code(), Some(2));
    // h % hk != 0 is a library validation error: exit 2 with the argument named.
    let o = run(&["check", "--device", "cpu", "--heads", "3", "--heads-k", "2", "--seqlen", "8", "--dim", "8"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("error:"), "{err}");
}

#[test]
fn tiny_bench_writes_json_and_plot() {
    let json = tmp("bench.json");
    let svg = tmp("bench.svg");
    let out = run_ok(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "1,2,48,16",
        "--causal",
        "0,1",
        "--modes",
        "fwd,fwd_bwd",
        "--naive",
        "--warmup",
        "0",
        "--reps",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.contains("TFLOP/s") && out.contains("peak extra"), "{out}");
    assert!(out.contains("flash vs naive"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "2 causal x 2 modes x 2 backends");
    for r in rows {
        assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["tflops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_extra_bytes"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["sq"], 48);
    }
    let causal = rows.iter().find(|r| r["causal"] == true && r["mode"] == "fwd").unwrap();
    let flops = 4.0 * 2.0 * 48.0 * 48.0 * 16.0 / 2.0;
    let want = flops / causal["ms"].as_f64().unwrap() / 1e9;
    assert!((causal["tflops"].as_f64().unwrap() - want).abs() <= 1e-9 * want.max(1.0));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("<circle"), "one marker per point");
    assert!(plot.contains("naive d=16 causal=1 fwd_bwd"), "legend names each line");
}

#[test]
fn bench_decode_grid_reports_kv_bandwidth() {
    let json = tmp("decode.json");
    let out = run_ok(&[
        "bench",
        "--device",
        "cpu",
        "--grid",
        "decode",
        "--seqlens",
        "256",
        "--heads",
        "4",
        "--heads-k",
        "2",
        "--dims",
        "32",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.contains("KV GB/s"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "b = 1, 8, 32");
    for r in rows {
        assert_eq!(r["sq"], 1);
        assert_eq!(r["mode"], "fwd");
        let kv = 2.0 * r["b"].as_f64().unwrap() * 256.0 * 2.0 * 32.0 * 2.0;
        let want = kv / r["ms"].as_f64().unwrap() / 1e6;
        assert!((r["kv_gbps"].as_f64().unwrap() - want).abs() <= 1e-9 * want.max(1.0), "{r}");
    }
}

/// `--dv`: a value head dim other than `--dim`, forward and backward against the oracle (GQA, causal).
#[test]
fn check_with_a_different_value_head_dim() {
    for (d, dv) in [("48", "24"), ("16", "40")] {
        let out = run_ok(&[
            "check",
            "--device",
            "cpu",
            "-b",
            "1",
            "-s",
            "33",
            "--seqlen-k",
            "50",
            "--heads",
            "4",
            "--heads-k",
            "2",
            "--dim",
            d,
            "--dv",
            dv,
            "--dtype",
            "f16",
            "--causal",
            "--backward",
        ]);
        assert!(out.contains(&format!("d={d} dv={dv} f16")), "{out}");
        for g in ["dq   max err", "dv   max err", "PASS"] {
            assert!(out.contains(g), "missing `{g}` in:\n{out}");
        }
    }
}

/// `run` takes v's head dim from the file: o, dout and dv have it, q, k, dq and dk have `d`.
#[test]
fn run_with_a_different_value_head_dim() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, sq, sk, h, hk, d, dv) = (1, 9, 21, 4, 2, 32, 16);
    let q = randn(&[b, sq, h, d], DType::F16, &mut rng);
    let k = randn(&[b, sk, hk, d], DType::F16, &mut rng);
    let v = randn(&[b, sk, hk, dv], DType::F16, &mut rng);
    let dout = randn(&[b, sq, h, dv], DType::F16, &mut rng);
    let file = run_cpu("dv", &[("q", &q), ("k", &k), ("v", &v), ("do", &dout)], &[]);
    let opts = AttnOptions::default();
    let f = flashattn::forward(&q, &k, &v, &opts).unwrap();
    let g =
        flashattn::backward(&BackwardInputs { q: &q, k: &k, v: &v, o: &f.o, lse: &f.lse, dout: &dout }, &opts).unwrap();
    assert_eq!(f.o.shape(), &[b, sq, h, dv]);
    assert_same(&file, &[("o", &f.o), ("dq", &g.dq), ("dv", &g.dv)]);
}

#[test]
fn run_forward_and_backward_match_the_library() {
    let mut rng = StdRng::seed_from_u64(1);
    let (b, sq, sk, h, hk, d) = (2, 33, 47, 4, 2, 40);
    let q = randn(&[b, sq, h, d], DType::BF16, &mut rng);
    let k = randn(&[b, sk, hk, d], DType::BF16, &mut rng);
    let v = randn(&[b, sk, hk, d], DType::BF16, &mut rng);
    let dout = randn(&[b, sq, h, d], DType::BF16, &mut rng);
    let slopes = Tensor::from_f32(&[0.1, 0.2, 0.05, 0.3], &[h], DType::F32).unwrap();
    let file = run_cpu(
        "fwd",
        &[("q", &q), ("k", &k), ("v", &v), ("do", &dout), ("alibi_slopes", &slopes)],
        &["--causal", "--softcap", "20", "--scale", "0.2", "--deterministic"],
    );
    let opts = AttnOptions::default().causal().softcap(20.0).scale(0.2).alibi(slopes.clone()).deterministic();
    let f = flashattn::forward(&q, &k, &v, &opts).unwrap();
    let g =
        flashattn::backward(&BackwardInputs { q: &q, k: &k, v: &v, o: &f.o, lse: &f.lse, dout: &dout }, &opts).unwrap();
    assert_eq!(file.len(), 5);
    assert_same(&file, &[("o", &f.o), ("lse", &f.lse), ("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)]);
}

#[test]
fn run_varlen_matches_the_library() {
    let mut rng = StdRng::seed_from_u64(2);
    let (h, d) = (2, 16);
    let (cu_q, cu_k) = (vec![0, 5, 12, 20], vec![0, 9, 9, 30]);
    let q = randn(&[20, h, d], DType::F16, &mut rng);
    let k = randn(&[30, h, d], DType::F16, &mut rng);
    let v = randn(&[30, h, d], DType::F16, &mut rng);
    let cq = Tensor::from_i32(cu_q.clone(), &[4]).unwrap();
    let ck = Tensor::from_i32(cu_k.clone(), &[4]).unwrap();
    let used = Tensor::from_i32(vec![7, 0, 15], &[3]).unwrap();
    let file = run_cpu(
        "varlen",
        &[("q", &q), ("k", &k), ("v", &v), ("cu_seqlens_q", &cq), ("cu_seqlens_k", &ck), ("seqused_k", &used)],
        &["--window", "4,2"],
    );
    let opts = AttnOptions::default().window(4, 2).varlen(VarLen {
        cu_seqlens_q: cu_q,
        cu_seqlens_k: cu_k,
        seqused_k: Some(vec![7, 0, 15]),
    });
    let f = flashattn::forward(&q, &k, &v, &opts).unwrap();
    assert_eq!(file.len(), 2, "no `do`: forward only");
    assert_same(&file, &[("o", &f.o), ("lse", &f.lse)]);
}

#[test]
fn run_kvcache_matches_the_library() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, sq, h, hk, d, s_cache, s_new, rot) = (2, 3, 4, 2, 32, 40, 3, 16);
    let q = randn(&[b, sq, h, d], DType::F16, &mut rng);
    let k_cache = randn(&[b, s_cache, hk, d], DType::F16, &mut rng);
    let v_cache = randn(&[b, s_cache, hk, d], DType::F16, &mut rng);
    let k_new = randn(&[b, s_new, hk, d], DType::F16, &mut rng);
    let v_new = randn(&[b, s_new, hk, d], DType::F16, &mut rng);
    let angles: Vec<f32> = (0..s_cache * rot / 2).map(|i| i as f32 * 0.37).collect();
    let cos =
        Tensor::from_f32(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), &[s_cache, rot / 2], DType::F32).unwrap();
    let sin =
        Tensor::from_f32(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), &[s_cache, rot / 2], DType::F32).unwrap();
    let seqlens = Tensor::from_i32(vec![10, 25], &[b]).unwrap();
    let leftpad = Tensor::from_i32(vec![0, 4], &[b]).unwrap();
    let file = run_cpu(
        "kv",
        &[
            ("q", &q),
            ("k_cache", &k_cache),
            ("v_cache", &v_cache),
            ("k_new", &k_new),
            ("v_new", &v_new),
            ("cache_seqlens", &seqlens),
            ("rotary_cos", &cos),
            ("rotary_sin", &sin),
            ("cache_leftpad", &leftpad),
        ],
        &["--kvcache", "--causal", "--rotary-interleaved"],
    );
    let (mut kc, mut vc) = (k_cache.clone(), v_cache.clone());
    let f = {
        let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::PerSeq(vec![10, 25]));
        cache.k_new = Some(k_new.view());
        cache.v_new = Some(v_new.view());
        cache.rotary = Some(Rotary { cos: cos.view(), sin: sin.view(), interleaved: true });
        cache.cache_leftpad = Some(vec![0, 4]);
        flashattn::kvcache_forward(&q.view(), &mut cache, &AttnOptions::default().causal()).unwrap()
    };
    assert_ne!(kc, k_cache, "the append changed the cache");
    assert_eq!(file.len(), 4);
    assert_same(&file, &[("o", &f.o), ("lse", &f.lse), ("k_cache", &kc), ("v_cache", &vc)]);
}

#[test]
fn run_paged_kvcache_matches_the_library() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, h, d, pages, page) = (2, 2, 16, 6, 8);
    let q = randn(&[b, 1, h, d], DType::BF16, &mut rng);
    let k_cache = randn(&[pages, page, h, d], DType::BF16, &mut rng);
    let v_cache = randn(&[pages, page, h, d], DType::BF16, &mut rng);
    let table = Tensor::from_i32(vec![5, 0, 2, 1, 3, 4], &[b, 3]).unwrap();
    let input = tmp("paged_in.safetensors");
    let output = tmp("paged_out.safetensors");
    // No cache_seqlens and nothing to append: the whole cache is attended.
    write(&input, &[("q", &q), ("k_cache", &k_cache), ("v_cache", &v_cache), ("block_table", &table)]);
    run_ok(&["run", "--kvcache", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--device", "cpu"]);
    let (mut kc, mut vc) = (k_cache.clone(), v_cache.clone());
    let f = {
        let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(24));
        cache.block_table = Some(table.clone());
        flashattn::kvcache_forward(&q.view(), &mut cache, &AttnOptions::default()).unwrap()
    };
    let file = read(&output);
    assert_same(&file, &[("o", &f.o), ("lse", &f.lse), ("k_cache", &kc)]);
}

fn run_err(input: &Path, extra: &[&str]) -> String {
    let output = tmp("never_written.safetensors");
    let mut args = vec!["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(&args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn malformed_inputs_exit_2_with_a_message_naming_the_problem() {
    let mut rng = StdRng::seed_from_u64(5);
    let q = randn(&[1, 8, 2, 16], DType::F16, &mut rng);
    let k = randn(&[1, 8, 2, 16], DType::F16, &mut rng);

    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file").unwrap();
    assert!(run_err(&garbage, &["--device", "cpu"]).contains("not a valid safetensors file"));

    let truncated = tmp("truncated.safetensors");
    write(&truncated, &[("q", &q), ("k", &k), ("v", &k)]);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    assert!(run_err(&truncated, &["--device", "cpu"]).contains("not a valid safetensors file"));

    assert!(run_err(&tmp("does_not_exist.safetensors"), &[]).contains("cannot read"));

    let missing = tmp("missing.safetensors");
    write(&missing, &[("q", &q), ("k", &k)]);
    let err = run_err(&missing, &["--device", "cpu"]);
    assert!(err.contains("no tensor `v`") && err.contains("it has: k, q"), "{err}");

    let ints = tmp("ints.safetensors");
    let qi = Tensor::from_i32(vec![1; 16 * 2 * 8], &[1, 8, 2, 16]).unwrap();
    write(&ints, &[("q", &qi), ("k", &k), ("v", &k)]);
    let err = run_err(&ints, &["--device", "cpu"]);
    assert!(err.contains("tensor `q`") && err.contains("I32"), "{err}");

    let mixed = tmp("mixed.safetensors");
    write(&mixed, &[("q", &q), ("k", &k.to_dtype(DType::BF16)), ("v", &k)]);
    let err = run_err(&mixed, &["--device", "cpu"]);
    assert!(err.contains("`k`") && err.contains("dtype"), "{err}");

    let shapes = tmp("shapes.safetensors");
    // v's head dim may differ from k's (a value head dim of its own), its key count may not.
    let v_bad = randn(&[1, 7, 2, 16], DType::F16, &mut rng);
    write(&shapes, &[("q", &q), ("k", &k), ("v", &v_bad)]);
    assert!(run_err(&shapes, &["--device", "cpu"]).contains("`v`"));

    let bad_do = tmp("bad_do.safetensors");
    write(&bad_do, &[("q", &q), ("k", &k), ("v", &k), ("do", &k.to_dtype(DType::F32))]);
    assert!(run_err(&bad_do, &["--device", "cpu"]).contains("`do`"));

    let cu = tmp("cu.safetensors");
    let cq = Tensor::from_i32(vec![0, 8], &[2]).unwrap();
    write(&cu, &[("q", &q), ("k", &k), ("v", &k), ("cu_seqlens_q", &cq)]);
    assert!(run_err(&cu, &["--device", "cpu"]).contains("`cu_seqlens_k`"));

    let kv = tmp("kv_missing.safetensors");
    write(&kv, &[("q", &q), ("k_cache", &k)]);
    assert!(run_err(&kv, &["--kvcache", "--device", "cpu"]).contains("`v_cache`"));

    assert!(run_err(&missing, &["--window", "1"]).contains("--window"));
}

#[test]
fn bench_ranks_runs_the_ring_and_says_which_transport() {
    let out = run_ok(&[
        "bench",
        "--ranks",
        "3",
        "--device",
        "cpu",
        "--shape",
        "1,2,60,16",
        "--causal",
        "1",
        "--modes",
        "fwd,fwd_bwd",
        "--warmup",
        "0",
        "--reps",
        "1",
    ]);
    assert!(out.contains("3 simulated ranks") && out.contains("in-process channels"), "{out}");
    assert!(out.contains("NCCL transport:"), "{out}");
    assert!(out.contains("backward per rank"), "{out}");
    // 60 rows over 6 chunks of 10: every rank computes the same 610 visible pairs per head.
    assert_eq!(out.matches("max/min visible pairs = 610/610").count(), 3, "{out}");
    assert!(out.contains("o differs by at most"), "{out}");
    let o = run(&["bench", "--ranks", "0", "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(2));
}

// Issue 17: oversize requests, panics, lost output, false FAILs.

fn exit2(args: &[&str]) -> String {
    let o = run(args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: expected exit 2\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    err
}

#[test]
fn oversize_requests_are_refused_with_the_bytes_they_need() {
    for flag in [["--seqlen", "1000000000"], ["--batch", "1000000000"]] {
        let err = exit2(&["check", "--device", "cpu", flag[0], flag[1]]);
        assert!(err.contains("needs about") && err.contains("bytes"), "{flag:?}: {err}");
    }
    let err = exit2(&["check", "--device", "cpu", "--dim", "10000000"]);
    assert!(err.contains("`q`") && err.contains("head dim"), "{err}");
    let err = exit2(&["bench", "--device", "cpu", "--shape", "1,1,1000000000,64"]);
    assert!(err.contains("needs about") && err.contains("bytes"), "{err}");
    // An empty safetensors q with a huge batch: refused before per-sequence metadata is allocated.
    let empty = Tensor::from_f32(&[], &[(1 << 31) - 1, 0, 1, 64], DType::F16).unwrap();
    let input = tmp("empty_huge_batch.safetensors");
    write(&input, &[("q", &empty), ("k", &empty), ("v", &empty)]);
    let err = run_err(&input, &["--device", "cpu"]);
    assert!(err.contains("`q`") && err.contains("at most"), "{err}");
}

#[test]
fn check_skips_its_quadratic_oracle_above_the_cap() {
    let o = run(&["check", "--device", "cpu", "--seqlen", "24000", "--dim", "8", "-b", "1", "--heads", "1"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("oracle and naive baseline skipped") && out.contains("SKIPPED accuracy rule"), "{out}");
}

#[test]
fn bench_refuses_bad_flags_instead_of_panicking() {
    let err = exit2(&["bench", "--device", "cpu", "--grid", "quick", "--dims", "0"]);
    assert!(err.contains("--dims"), "{err}");
    let err = exit2(&["bench", "--device", "cpu", "--ranks", "20000"]);
    assert!(err.contains("--ranks") && err.contains("256"), "{err}");
    let err = exit2(&["bench", "--device", "cpu", "--grid", "decode", "--page-size", "0"]);
    assert!(err.contains("--page-size"), "{err}");
    let bad = tmp("baselines_not_json.txt");
    std::fs::write(&bad, "fa2 is fast\n").unwrap();
    let err = exit2(&["bench", "--device", "cpu", "--shape", "1,1,64,16", "--baselines", bad.to_str().unwrap()]);
    assert!(err.contains("--baselines") && err.contains("not a torch_baselines.py JSON"), "{err}");
}

#[test]
fn negative_scale_and_softcap_parse_and_reach_the_library() {
    let base = ["check", "--device", "cpu", "-b", "1", "-s", "32", "--heads", "2", "--dim", "16"];
    let o = run(&[&base[..], &["--scale", "-1"]].concat());
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let err = exit2(&[&base[..], &["--softcap", "-1"]].concat());
    assert!(err.contains("invalid argument `softcap`"), "{err}");
}

#[test]
fn check_at_large_logits_judges_lse_against_the_baseline() {
    for dtype in ["f16", "f32"] {
        let o = run(&["check", "--device", "cpu", "--scale", "1000", "--dtype", dtype, "-b", "1", "--heads", "2"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{dtype}\nstdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("PASS"), "{out}");
    }
}

#[test]
fn run_output_is_atomic_and_never_the_input() {
    let input = one_tensor_input("atomic_in.safetensors", &[1, 8, 2, 16], 11);
    let before = std::fs::read(&input).unwrap();
    // -o equal to -i, spelt differently: refused, the input untouched.
    let same = input.parent().unwrap().join(".").join(input.file_name().unwrap());
    let o = run(&["run", "--device", "cpu", "-i", input.to_str().unwrap(), "-o", same.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
    // A good run replaces an existing output whole and leaves no temporary file behind.
    let out = tmp("atomic_out.safetensors");
    std::fs::write(&out, b"old content").unwrap();
    run_ok(&["run", "--device", "cpu", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(read(&out).iter().any(|(n, ..)| n == "o"));
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An output in a folder that does not exist: an error, nothing written.
    let nowhere = tmp("no_such_dir").join("out.safetensors");
    let o = run(&["run", "--device", "cpu", "-i", input.to_str().unwrap(), "-o", nowhere.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!nowhere.exists());
}

#[test]
fn duplicate_tensor_names_in_a_header_are_refused() {
    let path = one_tensor_input("dup_names.safetensors", &[1, 4, 1, 8], 12);
    // Rename `k` to `q` in the header: same length, so the offsets stay valid.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let renamed = header.replacen("\"k\"", "\"q\"", 1);
    assert_ne!(header, renamed);
    bytes[8..8 + n].copy_from_slice(renamed.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = run_err(&path, &["--device", "cpu"]);
    assert!(err.contains("`q` is named twice"), "{err}");
}

/// FP8: `check --dtype e4m3` passes the FP8 rule (and `--backward` is refused with the library's typed error);
/// `run` reads F8_E4M3 q/k/v with f32 descales and writes what the library computes (bf16, or f16 on request),
/// and an F8_E4M3 KV cache with bf16 new rows and q.
#[test]
fn fp8_check_and_run() {
    let out = run_ok(&["check", "--device", "cpu", "--dtype", "e4m3", "--seqlen", "70", "--heads-k", "2", "--causal"]);
    assert!(out.contains("FP8 (e4m3) inputs") && out.contains("PASS"), "{out}");
    let o = run(&["check", "--device", "cpu", "--dtype", "e4m3", "--seqlen", "16", "--backward"]);
    let (out, err) = text(&o);
    assert!(!o.status.success() && (out + &err).contains("forward-only"), "{err}");

    let mut rng = StdRng::seed_from_u64(5);
    let (b, sq, sk, h, hk, d) = (2, 9, 13, 4, 2, 32);
    let (q, k, v) = (
        randn(&[b, sq, h, d], DType::E4M3, &mut rng),
        randn(&[b, sk, hk, d], DType::E4M3, &mut rng),
        randn(&[b, sk, hk, d], DType::E4M3, &mut rng),
    );
    let ds = |rng: &mut StdRng| {
        let x: Vec<f32> = (0..b * hk).map(|_| rng.gen_range(0.5f32..2.0)).collect();
        Tensor::from_f32(&x, &[b, hk], DType::F32).unwrap()
    };
    let (qd, kd, vd) = (ds(&mut rng), ds(&mut rng), ds(&mut rng));
    let input = tmp("fp8_in.safetensors");
    let output = tmp("fp8_out.safetensors");
    write(&input, &[("q", &q), ("k", &k), ("v", &v), ("q_descale", &qd), ("k_descale", &kd), ("v_descale", &vd)]);
    let args = ["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--device", "cpu"];
    run_ok(&[&args[..], &["--causal", "--out-dtype", "f16"]].concat());
    let opts =
        AttnOptions::default().causal().descale(Some(qd.clone()), Some(kd.clone()), Some(vd)).out_dtype(DType::F16);
    let f = flashattn::forward(&q, &k, &v, &opts).unwrap();
    assert_eq!(f.o.dtype(), DType::F16);
    let file = read(&output);
    assert_same(&file, &[("o", &f.o), ("lse", &f.lse)]);

    // An F8_E4M3 cache with bf16 q and new rows (quantized with the descales).
    let qb = randn(&[b, 2, h, d], DType::BF16, &mut rng);
    let (kc, vc) = (randn(&[b, 20, hk, d], DType::E4M3, &mut rng), randn(&[b, 20, hk, d], DType::E4M3, &mut rng));
    let kn = randn(&[b, 2, hk, d], DType::BF16, &mut rng);
    let seqlens = Tensor::from_i32(vec![3, 17], &[b]).unwrap();
    write(
        &input,
        &[
            ("q", &qb),
            ("k_cache", &kc),
            ("v_cache", &vc),
            ("k_new", &kn),
            ("v_new", &kn),
            ("cache_seqlens", &seqlens),
            ("k_descale", &kd),
        ],
    );
    run_ok(&[&args[..], &["--kvcache"]].concat());
    let (mut kc2, mut vc2) = (kc.clone(), vc.clone());
    let f = {
        let mut cache = KvCache::new(kc2.view_mut(), vc2.view_mut(), CacheSeqlens::PerSeq(vec![3, 17]));
        cache.k_new = Some(kn.view());
        cache.v_new = Some(kn.view());
        flashattn::kvcache_forward(&qb.view(), &mut cache, &AttnOptions::default().descale(None, Some(kd), None))
            .unwrap()
    };
    assert_eq!(f.o.dtype(), DType::BF16);
    assert_ne!(kc2, kc, "the append changed the cache");
    let file = read(&output);
    assert_same(&file, &[("o", &f.o), ("k_cache", &kc2), ("v_cache", &vc2)]);
}
