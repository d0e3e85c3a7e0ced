//! LoRA golden tests: the CPU engine against peft 0.21 (fixtures made by
//! scripts/fixtures/make_fixtures.py: four adapters of ranks 8/16/64/16 (rsLoRA with rank and alpha
//! patterns), different target sets, stored as f32/bf16/f16/f32). Every position's logits within 1e-4
//! relative error of peft, greedy tokens identical, and peft's own mixed batch (`adapter_names`)
//! reproduced by one batch holding the base model and all four adapters.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, rel_err, subset, Golden};
use lorax_engine::engine::RawSeq;
use lorax_engine::kv_cache::BlockAllocator;
use lorax_engine::lora::{AdapterLayout, HostAdapter};
use lorax_engine::weights::DType;
use lorax_engine::{Batch, CacheConfig, CpuBackend, Engine, EngineError, NewSequence, SamplingParams};

const ADAPTERS: [&str; 4] = ["lora-r8", "lora-r16-all", "lora-r64-regex", "rslora-r16-patterns"];
const N_PROMPTS: usize = 4;
const N_NEW: usize = 32;
const TOL: f64 = 1e-4;
const BLOCK: usize = 4;
const MAX_RANK: usize = 128;

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

/// The llama fixture with every adapter loaded under its own name.
fn engine() -> Engine<CpuBackend> {
    let mut e = Engine::load(
        CpuBackend,
        &fixtures().join("models/llama"),
        CacheConfig {
            num_blocks: 1024,
            block_size: BLOCK,
        },
    )
    .unwrap();
    for name in ADAPTERS {
        let host = HostAdapter::load(&adapter_dir(name), e.config(), MAX_RANK).unwrap();
        e.load_adapter(name, &host).unwrap();
    }
    e
}

fn golden() -> Golden {
    Golden::open(fixtures().join("adapters/golden_lora.safetensors"))
}

fn scattered_blocks(alloc: &mut BlockAllocator, tokens: usize) -> Vec<u32> {
    let mut b = alloc.allocate(tokens).unwrap();
    b.reverse();
    b
}

/// Each adapter alone: every prompt position and 32 teacher-forced decode steps against peft.
#[test]
fn each_adapter_matches_peft_at_every_position() {
    let mut e = engine();
    let g = golden();
    let sub = g.ids("vocab_subset");
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    for name in ADAPTERS {
        let mut worst = 0f64;
        for p in 0..N_PROMPTS {
            let ids = g.ids(&format!("{name}.p{p}.ids"));
            let greedy = g.ids(&format!("{name}.p{p}.greedy"));
            let key = format!("{name}.p{p}.logits_sub");
            let table = scattered_blocks(&mut alloc, ids.len() + N_NEW);
            let rows = e
                .logits_with_adapters(&[(&ids, 0, &table, Some(name))], &[true])
                .unwrap();
            for (pos, row) in rows.iter().enumerate() {
                worst = worst.max(rel_err(&subset(row, &sub), g.row(&key, pos)));
            }
            for (j, &tok) in greedy.iter().enumerate() {
                let pos = ids.len() + j;
                let row = e
                    .logits_with_adapters(&[(&[tok], pos, &table, Some(name))], &[false])
                    .unwrap()
                    .remove(0);
                worst = worst.max(rel_err(&subset(&row, &sub), g.row(&key, pos)));
            }
            alloc.free(&table);
        }
        assert!(worst < TOL, "{name}: worst per-position rel err {worst:e}");
    }
}

/// peft's mixed batch (one row per prompt × {base, each adapter}) in one prefill: last-position logits
/// over the whole vocabulary and every prompt position on the subset; then all 20 sequences decode
/// together and each one's greedy tokens equal peft's for its adapter (base: transformers').
#[test]
fn mixed_batch_matches_peft_adapter_names() {
    let mut e = engine();
    let g = golden();
    let base = Golden::open(fixtures().join("models/llama/golden.safetensors"));
    let sub = g.ids("vocab_subset");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("adapters/mixed_rows.json")).unwrap()).unwrap();
    let rows: Vec<(usize, Option<String>)> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = r["adapter"].as_str().unwrap();
            (
                r["prompt"].as_u64().unwrap() as usize,
                (name != "__base__").then(|| name.to_string()),
            )
        })
        .collect();
    assert_eq!(rows.len(), 20);
    assert_eq!(g.ids("mixed.prompt_index").len(), rows.len());
    let prompts: Vec<Vec<u32>> = (0..N_PROMPTS).map(|p| base.ids(&format!("p{p}.ids"))).collect();
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let news: Vec<NewSequence> = rows
        .iter()
        .enumerate()
        .map(|(r, (p, adapter))| NewSequence {
            id: r as u64,
            input_ids: prompts[*p].clone(),
            block_table: scattered_blocks(&mut alloc, prompts[*p].len() + N_NEW),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: adapter.clone(),
        })
        .collect();

    // Logits of the whole mixed batch in one forward pass (a throwaway copy of the block tables).
    let raw: Vec<RawSeq<'_>> = news
        .iter()
        .map(|s| {
            (
                s.input_ids.as_slice(),
                0,
                s.block_table.as_slice(),
                s.adapter.as_deref(),
            )
        })
        .collect();
    let all = vec![true; raw.len()];
    let logits = e.logits_with_adapters(&raw, &all).unwrap();
    let (shape, _) = g.f("mixed.logits_sub");
    let (lmax, nsub) = (shape[1], shape[2]);
    let flat_sub = &g.f("mixed.logits_sub").1;
    let mut row_at = 0;
    for (r, (p, adapter)) in rows.iter().enumerate() {
        let len = prompts[*p].len();
        let mine = &logits[row_at..row_at + len];
        row_at += len;
        let err = rel_err(&mine[len - 1], g.row("mixed.last_logits", r));
        assert!(err < TOL, "row {r} ({adapter:?}, p{p}): last logits rel err {err:e}");
        for (pos, row) in mine.iter().enumerate() {
            let want = &flat_sub[(r * lmax + pos) * nsub..(r * lmax + pos + 1) * nsub];
            let err = rel_err(&subset(row, &sub), want);
            assert!(err < TOL, "row {r} ({adapter:?}, p{p}) pos {pos}: rel err {err:e}");
        }
    }
    assert_eq!(row_at, logits.len());

    // Greedy decoding of the whole mixed batch.
    let mut batch = Batch::default();
    let mut got: Vec<Vec<u32>> = vec![vec![]; rows.len()];
    for gen in e.prefill(&mut batch, news).unwrap() {
        got[gen.id as usize].push(gen.choice.token);
    }
    while got[0].len() < N_NEW {
        for gen in e.decode(&mut batch).unwrap() {
            got[gen.id as usize].push(gen.choice.token);
        }
    }
    for (r, (p, adapter)) in rows.iter().enumerate() {
        let expect = match adapter {
            Some(name) => g.ids(&format!("{name}.p{p}.greedy")),
            None => base.ids(&format!("p{p}.greedy")),
        };
        assert_eq!(got[r], expect, "row {r} ({adapter:?}, p{p}) greedy in the mixed batch");
    }
}

/// The adapters really change the output (else the tests above would prove nothing), and an adapter
/// offloaded is refused, while one a running sequence uses cannot be offloaded.
#[test]
fn adapters_change_output_and_offload_rules_hold() {
    let mut e = engine();
    let g = golden();
    let ids = g.ids("lora-r8.p1.ids");
    let mut alloc = BlockAllocator::new(1024, BLOCK);
    let table = alloc.allocate(ids.len() + 1).unwrap();
    let base = e.logits(&[(&ids, 0, &table)], &[false]).unwrap().remove(0);
    for name in ADAPTERS {
        let with = e
            .logits_with_adapters(&[(&ids, 0, &table, Some(name))], &[false])
            .unwrap()
            .remove(0);
        assert!(rel_err(&with, &base) > 1e-2, "{name} does not change the logits");
    }
    let mut batch = Batch::default();
    e.prefill(
        &mut batch,
        vec![NewSequence {
            id: 1,
            input_ids: ids.clone(),
            block_table: table.clone(),
            params: SamplingParams::default(),
            prefill_logprobs: false,
            prefill_top_n: 0,
            adapter: Some("lora-r8".into()),
        }],
    )
    .unwrap();
    assert!(e.offload_adapter("lora-r8", &batch).is_err(), "offloaded while in use");
    batch.filter(&[]);
    assert!(e.offload_adapter("lora-r8", &batch).unwrap());
    let err = e
        .logits_with_adapters(&[(&ids, 0, &table, Some("lora-r8"))], &[false])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::AdapterNotLoaded(ref k) if k == "lora-r8"),
        "{err}"
    );
}

/// A copy of an adapter directory that a test may damage.
fn copy_adapter(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_dir(name).join(f), dst.join(f)).unwrap();
    }
}

/// The whole load's error; a streamed load's first step (the config and the weights' header) must fail
/// the same way when it fails, so that a broken adapter gets one answer whichever way it is loaded.
fn load_err(dir: &Path, max_rank: usize) -> EngineError {
    let cfg = lorax_engine::ModelConfig::from_file(&fixtures().join("models/llama/config.json")).unwrap();
    let e = match HostAdapter::load(dir, &cfg, max_rank) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    };
    if let Err(layout) = AdapterLayout::read(dir, &cfg, max_rank) {
        assert_eq!(layout.to_string(), e.to_string(), "{}", dir.display());
    }
    e
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites the adapter's safetensors through `f` (name → (shape, f32 values)).
fn edit_weights(dir: &Path, f: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(
                v.dtype(),
                safetensors::Dtype::F32,
                "edit_weights reads f32 adapters only"
            );
            let t = lorax_engine::weights::HostTensor {
                name: n.clone(),
                dtype: lorax_engine::weights::DType::F32,
                shape: v.shape().to_vec(),
                data: v.data().into(),
            };
            (n, v.shape().to_vec(), t.to_f32())
        })
        .collect();
    f(&mut tensors);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |n: &str| {
        let d = tmp.path().join(n);
        copy_adapter("lora-r8", &d);
        d
    };

    // Missing directory or files: an I/O error naming the file.
    let e = load_err(&tmp.path().join("nope"), MAX_RANK);
    assert!(matches!(e, EngineError::Io { .. }), "{e}");

    // Pickle only: refused, saying how to convert.
    let d = case("pickle");
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"not loaded").unwrap();
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("pickle") && e.contains("safe_serialization"), "{e}");

    // An invalid config and no weights: the config decides (invalid, not "not found").
    let d = case("config-only");
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_config.json"), b"{not json").unwrap();
    let e = load_err(&d, MAX_RANK);
    assert!(
        matches!(e, EngineError::InvalidAdapter(_)) && e.to_string().contains("adapter_config.json"),
        "{e}"
    );

    // Corrupt safetensors.
    let d = case("corrupt");
    std::fs::write(
        d.join("adapter_model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    )
    .unwrap();
    let e = load_err(&d, MAX_RANK);
    assert!(matches!(e, EngineError::CorruptWeights { .. }), "{e}");

    // Rank above the maximum.
    let e = load_err(&case("rank"), 4).to_string();
    assert!(e.contains("rank 8") && e.contains("maximum LoRA rank 4"), "{e}");

    // Weights of another rank than the config says: named as such.
    let d = case("config-rank");
    edit_config(&d, |c| c["r"] = serde_json::json!(4));
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("have rank 8 where adapter_config.json says 4"), "{e}");

    // Shapes that do not fit the base model (an adapter made for a wider model).
    let d = case("shape");
    edit_weights(&d, |ts| {
        for (n, s, v) in ts.iter_mut() {
            if n.ends_with("layers.0.self_attn.q_proj.lora_A.weight") {
                s[1] += 8;
                v.resize(s[0] * s[1], 0.5);
            }
        }
    });
    let e = load_err(&d, MAX_RANK);
    assert!(matches!(e, EngineError::InvalidAdapter(_)), "{e}");
    let e = lorax_engine::lora::strip_dir(&e.to_string(), &d);
    assert!(
        e.contains(
            "model.layers.0.self_attn.q_proj: lora_A is [8, 40] and lora_B [64, 8], where this model takes [8, 32]"
        ) && !e.contains("the adapter"),
        "{e}"
    );

    // Layers the base model does not have.
    let d = case("layers");
    edit_weights(&d, |ts| {
        let extra: Vec<_> = ts
            .iter()
            .filter(|(n, _, _)| n.contains("layers.0.self_attn.q_proj"))
            .map(|(n, s, v)| (n.replace("layers.0.", "layers.9."), s.clone(), v.clone()))
            .collect();
        ts.extend(extra);
    });
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("layer 9 does not exist"), "{e}");

    // A target this server does not apply LoRA to.
    let d = case("lm_head");
    edit_weights(&d, |ts| {
        ts.push((
            "base_model.model.lm_head.lora_A.weight".into(),
            vec![8, 32],
            vec![0.1; 256],
        ));
    });
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("lm_head"), "{e}");

    // A lora_A without its lora_B.
    let d = case("half");
    edit_weights(&d, |ts| {
        ts.retain(|(n, _, _)| !n.ends_with("layers.1.self_attn.v_proj.lora_B.weight"))
    });
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("no matching lora_B"), "{e}");

    // Weights that are NaN or infinite (a diverged training run): refused, naming the tensor.
    for (n, bad) in [("nan", f32::NAN), ("inf", f32::NEG_INFINITY)] {
        let d = case(n);
        edit_weights(&d, |ts| {
            for (name, _, v) in ts.iter_mut() {
                if name.ends_with("layers.1.self_attn.v_proj.lora_B.weight") {
                    v[5] = bad;
                }
            }
        });
        let e = load_err(&d, MAX_RANK);
        assert!(matches!(e, EngineError::InvalidAdapter(_)), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("layers.1.self_attn.v_proj.lora_B.weight") && e.contains("NaN or infinite"),
            "{e}"
        );
    }

    // A weight past f16's range (stored here in f32): parsed, but refused for a model served in f16,
    // which would turn it into an infinity; kept for one served in bf16 or f32.
    let d = case("wide");
    edit_weights(&d, |ts| {
        for (name, _, v) in ts.iter_mut() {
            if name.ends_with("layers.1.self_attn.v_proj.lora_B.weight") {
                v[5] = -70000.0;
            }
        }
    });
    let cfg = lorax_engine::ModelConfig::from_file(&fixtures().join("models/llama/config.json")).unwrap();
    let host = HostAdapter::load(&d, &cfg, MAX_RANK).unwrap();
    let e = host.check_storage(DType::F16).unwrap_err();
    assert!(matches!(e, EngineError::InvalidAdapter(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("layers.1.self_attn.v_proj.lora_B.weight") && e.contains("float16"),
        "{e}"
    );
    host.check_storage(DType::BF16).unwrap();
    host.check_storage(DType::F32).unwrap();

    // A lora_alpha whose scale is past f32's range.
    let d = case("alpha");
    edit_config(&d, |v| v["lora_alpha"] = serde_json::json!(1e40));
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("not a finite number"), "{e}");

    // Unsupported PEFT features.
    for (field, value, expect) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("bias", serde_json::json!("all"), "bias"),
        ("peft_type", serde_json::json!("IA3"), "IA3"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save"),
    ] {
        let d = case(&format!("feature-{field}"));
        edit_config(&d, |v| v[field] = value);
        let e = load_err(&d, MAX_RANK).to_string();
        assert!(e.contains(expect), "{field}: {e}");
    }

    // Weights for a module target_modules does not name.
    let d = case("untargeted");
    edit_config(&d, |v| v["target_modules"] = serde_json::json!(["q_proj"]));
    let e = load_err(&d, MAX_RANK).to_string();
    assert!(e.contains("v_proj") && e.contains("target_modules"), "{e}");
}

/// Parsed adapters report their size and rank; rank and alpha patterns give per-module scales.
#[test]
fn patterns_give_per_module_rank_and_scale() {
    let cfg = lorax_engine::ModelConfig::from_file(&fixtures().join("models/llama/config.json")).unwrap();
    let a = HostAdapter::load(&adapter_dir("rslora-r16-patterns"), &cfg, MAX_RANK).unwrap();
    assert_eq!(a.max_rank, 16);
    assert_eq!(a.base_model.as_deref(), Some("lorax-tests/tiny-llama"));
    let q0 = a.layers[0][0].as_ref().unwrap();
    let q1 = a.layers[1][0].as_ref().unwrap();
    let up1 = a.layers[1][5].as_ref().unwrap();
    // rsLoRA: alpha / sqrt(r); alpha_pattern gives layer 0's q_proj alpha 64, rank_pattern layer 1's up_proj r 4.
    assert!((q0.scale - 64.0 / 4.0).abs() < 1e-6, "{}", q0.scale);
    assert!((q1.scale - 16.0 / 4.0).abs() < 1e-6, "{}", q1.scale);
    assert!((up1.scale - 16.0 / 2.0).abs() < 1e-6, "{}", up1.scale);
    assert_eq!(up1.a.shape[0], 4);
    let on_disk = std::fs::metadata(adapter_dir("rslora-r16-patterns").join("adapter_model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        a.bytes <= on_disk && a.bytes > on_disk / 2,
        "{} vs file {on_disk}",
        a.bytes
    );
}
