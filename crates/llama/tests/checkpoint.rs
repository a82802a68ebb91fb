//! Import/export of Hugging Face checkpoints, and the errors a user sees for bad input.

mod common;

use std::path::Path;

use common::*;
use llama::{LlamaConfig, SaveDtype, SaveOptions};
use test_support::{copy_tree, golden_dir, root, tiny_test_config};

#[test]
fn llama2_parameter_counts_are_exact() {
    let configs = root().join("configs");
    for (file, expected) in [
        ("llama2-7b.toml", 6_738_415_616u64),
        ("llama2-13b.toml", 13_015_864_320),
        ("llama2-70b.toml", 68_976_648_192),
    ] {
        let config = llama::load_config(&configs.join(file)).unwrap();
        assert_eq!(config.parameter_count(), expected, "{file}");
    }
}

/// Llama 2 7B by hand: 32 layers of 4 * 4096^2 attention and 3 * 4096 * 11008 MLP weights,
/// plus the 32000 x 4096 head, give 6,607,077,376 matrix weights; attention over 4096 positions
/// adds 12 * 32 * 4096 * 4096 = 6,442,450,944 FLOPs per token.
#[test]
fn training_flops_per_token_follow_palm_accounting() {
    let config = llama::load_config(&root().join("configs/llama2-7b.toml")).unwrap();
    let full = 6.0 * 6_607_077_376.0 + 6_442_450_944.0;
    let frozen = 4.0 * 6_607_077_376.0 + 6_442_450_944.0;
    assert_eq!(config.training_flops_per_token(4096, true), full);
    assert_eq!(config.training_flops_per_token(4096, false), frozen);
}

#[test]
fn parameter_count_matches_built_model() {
    let device = test_device();
    for name in ["tiny-gqa", "tiny-odd"] {
        let (config, model) = llama::load_pretrained(&golden_dir(name), &device).unwrap();
        let built: usize = llama::weights::hf_params(&model)
            .iter()
            .map(|(_, p)| p.hf_shape().iter().product::<usize>())
            .sum();
        assert_eq!(built as u64, config.parameter_count(), "{name}");
    }
}

#[test]
fn export_round_trips_exactly_and_shards() {
    let device = test_device();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-gqa", "tiny-odd"] {
        let (config, model) = llama::load_pretrained(&golden_dir(name), &device).unwrap();
        let out = tmp.path().join(name);
        let options = SaveOptions {
            dtype: SaveDtype::F32,
            max_shard_bytes: 100_000,
            extra_files: vec![golden_dir(name).join("tokenizer.json")],
            overwrite: false,
            ..SaveOptions::default()
        };
        llama::save_pretrained(&model, &config, &out, &options).unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let mut shards: Vec<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        shards.sort();
        shards.dedup();
        assert!(
            shards.len() > 1,
            "{name}: expected several shards, got {shards:?}"
        );
        let last = format!(
            "model-{:05}-of-{:05}.safetensors",
            shards.len(),
            shards.len()
        );
        assert_eq!(shards.last().copied(), Some(last.as_str()));
        assert!(shards.iter().all(|s| out.join(s).exists()));
        assert!(!out.join("model.safetensors").exists());
        assert!(out.join("tokenizer.json").exists());
        assert!(out.join("generation_config.json").exists());
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(written["architectures"][0], "LlamaForCausalLM");
        assert_eq!(written["torch_dtype"], "float32");
        assert_eq!(written["tie_word_embeddings"], config.tie_word_embeddings);

        let (reloaded_config, reloaded) = llama::load_pretrained(&out, &device).unwrap();
        assert_eq!(reloaded_config, config);
        let golden = load_golden(name);
        let seq = &golden.sequences[0];
        let a = rows(&model.logits(std::slice::from_ref(seq)), 0, 0..seq.len());
        let b = rows(&reloaded.logits(std::slice::from_ref(seq)), 0, 0..seq.len());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}: f32 export is lossless");
        // No temporary directories are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

#[test]
fn export_refuses_existing_directory_unless_overwrite() {
    let device = test_device();
    let (config, model) = llama::load_pretrained(&golden_dir("tiny-gqa"), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user data").unwrap();
    let mut options = SaveOptions::default();
    let err = llama::save_pretrained(&model, &config, &out, &options).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(out.join("keep.txt").exists());
    // --overwrite replaces a model directory, never a directory of other things.
    options.overwrite = true;
    let err = llama::save_pretrained(&model, &config, &out, &options).unwrap_err();
    assert!(
        err.to_string().contains("holds files but no model"),
        "{err}"
    );
    assert!(out.join("keep.txt").exists());
    std::fs::write(out.join("config.json"), "{}").unwrap();
    llama::save_pretrained(&model, &config, &out, &options).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn bf16_export_loads_with_bf16_precision() {
    let device = test_device();
    let (config, model) = llama::load_pretrained(&golden_dir("tiny-gqa"), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let options = SaveOptions {
        dtype: SaveDtype::BF16,
        ..SaveOptions::default()
    };
    llama::save_pretrained(&model, &config, &out, &options).unwrap();
    let size = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let params = config.parameter_count();
    assert!(
        size < params * 2 + 100_000,
        "bf16 file is 2 bytes per parameter: {size}"
    );
    let (_, reloaded) = llama::load_pretrained(&out, &device).unwrap();
    // The same weights rounded to bf16 are what the bf16 golden model holds.
    let golden = load_golden("tiny-gqa-bf16-sharded");
    let seq = &golden.sequences[0];
    let got = rows(&reloaded.logits(std::slice::from_ref(seq)), 0, 0..seq.len());
    assert!(max_abs_diff(&got, &golden.logits[0]) <= 1e-4);
}

fn load_err(dir: &Path) -> String {
    match llama::load_pretrained(dir, &test_device()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("config.json"), "{err}");
    let err = load_err(&tmp.path().join("nope"));
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&golden_dir("tiny-gqa"), tmp.path());
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&golden_dir("tiny-gqa"), tmp.path());
    // A config that claims an untied head: lm_head.weight is missing from the file.
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("missing tensor `lm_head.weight`"), "{err}");

    config["tie_word_embeddings"] = true.into();
    config["intermediate_size"] = 100.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn unsupported_config_fields_are_refused_by_name() {
    let p = Path::new("config.json");
    let base = r#""vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let ok = LlamaConfig::from_hf_json(&format!("{{{base}}}"), p).unwrap();
    assert_eq!(ok.num_key_value_heads, 2);
    for (extra, field) in [
        (
            r#""rope_scaling": {"type": "yarn", "factor": 2.0}"#,
            "rope_scaling.rope_type",
        ),
        (
            r#""rope_scaling": {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}"#,
            "rope_scaling.low_freq_factor",
        ),
        (r#""hidden_act": "gelu""#, "hidden_act"),
        (r#""sliding_window": 4096"#, "sliding_window"),
        (r#""model_type": "mistral""#, "model_type"),
        (r#""architectures": ["GPT2LMHeadModel"]"#, "architectures"),
    ] {
        let err = LlamaConfig::from_hf_json(&format!("{{{base}, {extra}}}"), p).unwrap_err();
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
    let err = LlamaConfig::from_hf_json(r#"{"vocab_size": 32}"#, p).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let err = LlamaConfig::from_hf_json(
        &format!("{{{base}, \"num_key_value_heads\": 3}}")
            .replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 4"),
        p,
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
}

#[test]
fn both_transformers_config_layouts_read_alike() {
    // The committed config.json of tiny-odd as transformers 4.57.1 and 5.x wrote it: rope_theta
    // 50000 is at the top level in one, inside `rope_parameters` in the other.
    let old = llama::load_config(&golden_dir("tiny-odd")).unwrap();
    let new = llama::load_config(&golden_dir("golden-tf5/tiny-odd")).unwrap();
    assert_eq!(old, new);
    assert_eq!(new.rope_theta, 50000.0);
    assert_eq!(new.rms_norm_eps, 1e-6);
    let text = std::fs::read_to_string(golden_dir("golden-tf5/tiny-odd/config.json")).unwrap();
    assert!(text.contains("rope_parameters") && !text.contains("torch_dtype"));

    let p = Path::new("config.json");
    let base = r#""vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let read = |extra: &str| LlamaConfig::from_hf_json(&format!("{{{base}, {extra}}}"), p);
    // What transformers 5.x writes besides the shape.
    let v5 = read(
        r#""rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}, "dtype": "bfloat16",
        "chunk_size_feed_forward": 0, "is_encoder_decoder": false, "output_hidden_states": false,
        "return_dict": true, "problem_type": null"#,
    )
    .unwrap();
    assert_eq!(v5.rope_theta, 500.0);
    // Sparse configs take transformers' defaults, not Llama 2's.
    let sparse = LlamaConfig::from_hf_json(&format!("{{{base}}}"), p).unwrap();
    assert_eq!(sparse.rms_norm_eps, 1e-6);
    assert_eq!(sparse.max_position_embeddings, 2048);
    for (extra, field) in [
        (
            r#""rope_parameters": {"rope_theta": 1.0, "rope_type": "llama3", "factor": 8.0}"#,
            "rope_parameters.rope_type",
        ),
        (
            r#""rope_parameters": {"rope_theta": 1.0, "partial_rotary_factor": 0.5}"#,
            "rope_parameters.partial_rotary_factor",
        ),
        (r#""is_encoder_decoder": true"#, "is_encoder_decoder"),
        (
            r#""chunk_size_feed_forward": 0, "use_bidirectional_attention": true"#,
            "use_bidirectional_attention",
        ),
    ] {
        let err = read(extra).unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{extra}: {err}");
    }
    let err = read(r#""rope_theta": 10.0, "rope_parameters": {"rope_theta": 20.0}"#).unwrap_err();
    assert!(err.to_string().contains("disagree"), "{err}");
}

#[test]
fn rope_scaling_reads_in_both_layouts_and_is_checked() {
    use llama::RopeScaling;
    for kind in ["linear", "dynamic"] {
        let old = llama::load_config(&golden_dir(&format!("tiny-rope-{kind}"))).unwrap();
        let new = llama::load_config(&golden_dir(&format!("golden-tf5/tiny-rope-{kind}"))).unwrap();
        assert_eq!(old, new, "{kind}");
        let expected = match kind {
            "linear" => RopeScaling::Linear { factor: 4.0 },
            _ => RopeScaling::Dynamic { factor: 2.0 },
        };
        assert_eq!(old.rope_scaling, Some(expected));
        // Dynamic scaling exists to run past max_position_embeddings (8 here).
        let context = if kind == "linear" { 128 } else { 16 };
        assert_eq!(old.context_length(), context, "{kind}");
        // What we write is read back as the same scaling.
        let json = old.to_hf_json("LlamaForCausalLM", "float32").to_string();
        let again = LlamaConfig::from_hf_json(&json, Path::new("config.json")).unwrap();
        assert_eq!(again, old);
        // Our TOML files take it as an inline table.
        let toml = format!(
            "vocab_size = 32\nhidden_size = 8\nintermediate_size = 16\nnum_hidden_layers = 1\n\
             num_attention_heads = 2\nnum_key_value_heads = 2\nmax_position_embeddings = 64\n\
             rope_scaling = {{ type = \"{kind}\", factor = 3.0 }}\n"
        );
        let parsed: LlamaConfig = toml::from_str(&toml).unwrap();
        assert_eq!(parsed.rope_scaling.map(|s| s.kind()), Some(kind));
    }
    let p = Path::new("config.json");
    let base = r#""vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let read = |extra: &str| LlamaConfig::from_hf_json(&format!("{{{base}, {extra}}}"), p);
    for (extra, needle) in [
        (r#""rope_scaling": {"type": "linear"}"#, "needs a `factor`"),
        (
            r#""rope_scaling": {"type": "linear", "factor": 0.5}"#,
            "factor",
        ),
        (
            r#""rope_scaling": {"type": "dynamic", "factor": "2"}"#,
            "must be a number",
        ),
        (
            r#""rope_scaling": {"type": "linear", "rope_type": "dynamic", "factor": 2.0}"#,
            "disagree",
        ),
        (
            r#""rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}"#,
            "different RoPE scalings",
        ),
        (
            r#""rope_parameters": {"rope_type": "longrope", "factor": 2.0}"#,
            "longrope",
        ),
    ] {
        let err = read(extra).unwrap_err().to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }
}

#[test]
fn config_values_are_range_checked() {
    let p = Path::new("config.json");
    let base = r#""vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    let read = |extra: &str| LlamaConfig::from_hf_json(&format!("{{{base}, {extra}}}"), p);
    for (extra, needle) in [
        (
            r#""pad_token_id": 99999"#,
            "`pad_token_id` 99999 is outside the vocabulary",
        ),
        (r#""eos_token_id": [32, 2]"#, "`eos_token_id` 32 is outside"),
        (
            r#""bos_token_id": 4294967296"#,
            "`bos_token_id` must be a token id",
        ),
    ] {
        let err = read(extra).unwrap_err().to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }
    // Sizes whose parameter count would overflow are refused, not wrapped.
    let huge = r#"{"vocab_size": 32, "hidden_size": 4294967296, "intermediate_size": 16,
        "num_hidden_layers": 4294967296, "num_attention_heads": 2}"#;
    let err = LlamaConfig::from_hf_json(huge, p).unwrap_err().to_string();
    assert!(err.contains("parameters"), "{err}");
}

#[test]
fn toml_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, "vocab_size = 32\nhidden_size = \"big\"\n").unwrap();
    let err = llama::load_config(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad.toml") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn random_init_is_seeded() {
    let device = test_device();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let a = llama::init_random(&config, &device, 3).unwrap();
    let b = llama::init_random(&config, &device, 3).unwrap();
    let c = llama::init_random(&config, &device, 4).unwrap();
    let seq = vec![vec![1u32, 5, 9, 200]];
    let la = rows(&a.logits(&seq), 0, 0..4);
    assert_eq!(la, rows(&b.logits(&seq), 0, 0..4));
    assert_ne!(la, rows(&c.logits(&seq), 0, 0..4));
}
