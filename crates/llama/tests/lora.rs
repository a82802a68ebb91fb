//! LoRA on the decoder: which weights get adapters, what is trained, the PEFT adapter layout on
//! disk and its merge, against weights composed by hand on the host.

mod common;

use std::collections::HashMap;

use common::*;
use llama::lora::{self, BaseQuant, Factors, LoraSpec};
use llama::model::to_host;
use llama::{Head, SaveOptions};
use test_support::tiny_test_config;

fn spec(targets: &[&str], quantize: BaseQuant) -> LoraSpec {
    LoraSpec {
        rank: 3,
        alpha: 6.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        quantize,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const TOKENS: [u32; 7] = [1, 17, 300, 42, 9, 480, 5];

fn logits(model: &llama::Llama) -> Vec<f32> {
    to_host(model.logits(&[TOKENS.to_vec()]))
}

/// Safetensors bytes of f32 tensors.
fn write_safetensors(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn fresh_adapters_start_at_the_base_and_train_only_the_factors() {
    let device = test_device();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let base = llama::init_random(&config, &device, 7).unwrap();
    let adapted = lora::attach(
        base.clone(),
        &spec(&["q_proj", "v_proj"], BaseQuant::None),
        Factors::Fresh(1),
        None,
    )
    .unwrap();
    // B starts at zero: the adapted model is its base, exactly.
    assert_eq!(logits(&adapted), logits(&base));
    let layer = &adapted.layers[0];
    assert!(layer.self_attn.q_proj.weight.adapter().is_some());
    assert!(layer.self_attn.v_proj.weight.adapter().is_some());
    assert!(layer.self_attn.k_proj.weight.adapter().is_none());
    assert!(layer.mlp.down_proj.weight.adapter().is_none());
    // Factors: per layer q (64 -> 64) and v (64 -> 32), rank 3.
    let d = config.hidden_size;
    let kv = config.kv_dim();
    let per_layer = 3 * (d + d) + 3 * (d + kv);
    assert_eq!(
        lora::trainable_parameters(&adapted),
        config.num_hidden_layers * per_layer
    );
    // The same seed draws the same factors.
    let again = lora::attach(
        base.clone(),
        &spec(&["q_proj", "v_proj"], BaseQuant::None),
        Factors::Fresh(1),
        None,
    )
    .unwrap();
    let a = |m: &llama::Llama| {
        to_host(
            m.layers[1]
                .self_attn
                .q_proj
                .weight
                .adapter()
                .unwrap()
                .a
                .val(),
        )
    };
    assert_eq!(a(&adapted), a(&again));

    // Under autodiff only the factors get gradients.
    let trained = lora::attach(
        llama::init_random(&config, &device.clone().autodiff(), 7).unwrap(),
        &spec(&["q_proj"], BaseQuant::None),
        Factors::Fresh(1),
        None,
    )
    .unwrap();
    let grads = trained.logits(&[TOKENS.to_vec()]).sum().backward();
    let q = &trained.layers[0].self_attn.q_proj.weight;
    let adapter = q.adapter().unwrap();
    assert!(adapter.a.val().grad(&grads).is_some());
    assert!(adapter.b.val().grad(&grads).is_some());
    assert!(q.base().grad(&grads).is_none());
    assert!(trained.embed_tokens.weight.val().grad(&grads).is_none());
    assert!(trained.layers[0]
        .input_layernorm
        .gamma
        .val()
        .grad(&grads)
        .is_none());
}

#[test]
fn saved_adapters_load_merge_and_round_trip_in_peft_layout() {
    let device = test_device();
    let tmp = tempfile::tempdir().unwrap();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let base = llama::init_random(&config, &device, 3).unwrap();
    let base_dir = tmp.path().join("base");
    llama::save_pretrained(&base, &config, &base_dir, &SaveOptions::default()).unwrap();

    // Hand-made adapters in PEFT's layout: lora_A [rank, in], lora_B [out, rank].
    let (d, kv, rank) = (config.hidden_size, config.kv_dim(), 3);
    let values = |n: usize, k: f32| {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + k).sin()) * 0.1)
            .collect::<Vec<f32>>()
    };
    let mut tensors = Vec::new();
    for layer in 0..config.num_hidden_layers {
        for (module, d_out) in [("q_proj", d), ("k_proj", kv)] {
            let name = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            tensors.push((
                format!("{name}.lora_A.weight"),
                vec![rank, d],
                values(rank * d, layer as f32),
            ));
            tensors.push((
                format!("{name}.lora_B.weight"),
                vec![d_out, rank],
                values(d_out * rank, 1.0),
            ));
        }
    }
    let adapter_dir = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    write_safetensors(&adapter_dir.join(lora::ADAPTER_WEIGHTS), &tensors);
    let lora_spec = spec(&["q_proj", "k_proj"], BaseQuant::None);
    let info = lora::AdapterInfo {
        spec: &lora_spec,
        dropout: 0.0,
        base: &base_dir,
    };
    // Our adapter_config.json, from adapters of the same shape (the weights are the hand-made ones).
    let placeholder = lora::attach(base.clone(), &lora_spec, Factors::Fresh(0), None).unwrap();
    std::fs::create_dir_all(tmp.path().join("unused")).unwrap();
    lora::write_adapter(&placeholder, &info, &tmp.path().join("unused")).unwrap();
    std::fs::copy(
        tmp.path().join("unused").join(lora::ADAPTER_CONFIG),
        adapter_dir.join(lora::ADAPTER_CONFIG),
    )
    .unwrap();

    let (_, adapted) =
        llama::checkpoint::load_adapter_dir(&adapter_dir, &device, None, None, 0, BaseQuant::None)
            .unwrap();
    // The effective q_proj of layer 1, composed by hand: W^T + (alpha / rank) * (B A), in
    // burn's [in, out] layout.
    let scale = 6.0 / 3.0;
    let a = &tensors[4].2; // layer 1 q_proj lora_A [rank, d]
    let b = &tensors[5].2; // layer 1 q_proj lora_B [d, rank]
    let w = to_host(base.layers[1].self_attn.q_proj.weight.val()); // [in, out]
    let mut expected = w.clone();
    for i in 0..d {
        for o in 0..d {
            let delta: f32 = (0..rank).map(|r| b[o * rank + r] * a[r * d + i]).sum();
            expected[i * d + o] += scale * delta;
        }
    }
    let got = to_host(adapted.layers[1].self_attn.q_proj.weight.val());
    assert!(max_diff(&got, &expected) < 1e-6);

    // Merged on load (what generate and export read) is the same model.
    let (_, merged) = llama::load_pretrained(&adapter_dir, &device).unwrap();
    assert!(!lora::has_adapters(&merged));
    assert!(max_diff(&logits(&merged), &logits(&adapted)) < 1e-5);
    assert!(
        max_diff(&logits(&merged), &logits(&base)) > 1e-3,
        "the adapters changed nothing"
    );
    // Without its adapters, the model is its base again.
    assert_eq!(logits(&lora::without_adapters(&adapted)), logits(&base));

    // Written back, the factors are the same numbers under the same names, with ids kept.
    let again = tmp.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    lora::write_adapter(&adapted, &info, &again).unwrap();
    let written =
        llama::shards::SafetensorsDir::open_file(&again.join(lora::ADAPTER_WEIGHTS)).unwrap();
    for (name, shape, values) in &tensors {
        assert_eq!(&written.read_f32(name, shape).unwrap(), values, "{name}");
    }
    // What the configuration does not account for is refused, not dropped.
    let extra = tmp.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::copy(
        adapter_dir.join(lora::ADAPTER_CONFIG),
        extra.join(lora::ADAPTER_CONFIG),
    )
    .unwrap();
    let mut more = tensors.clone();
    more.push((
        "base_model.model.lm_head.weight".into(),
        vec![2, 2],
        vec![0.0; 4],
    ));
    write_safetensors(&extra.join(lora::ADAPTER_WEIGHTS), &more);
    let err = llama::load_pretrained(&extra, &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected tensor `base_model.model.lm_head.weight`"),
        "{err}"
    );
    test_support::edit_json(&extra.join(lora::ADAPTER_CONFIG), |c| {
        c["alpha_pattern"] = serde_json::json!({"q_proj": 32});
    });
    let err = llama::load_pretrained(&extra, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("alpha_pattern"), "{err}");

    let ids: HashMap<String, u64> = lora::adapter_ids(&adapted);
    assert_eq!(ids.len(), 2 * 2 * config.num_hidden_layers);
    let (_, resumed) = llama::checkpoint::load_adapter_dir(
        &again,
        &device,
        Some(Head::Lm),
        Some(&ids),
        0,
        BaseQuant::None,
    )
    .unwrap();
    assert_eq!(lora::adapter_ids(&resumed), ids);
}

#[test]
fn quantized_bases_stay_close_to_the_base() {
    if test_support::test_device_name().starts_with("tch") {
        eprintln!("skipped: libtorch has no quantised tensors");
        return;
    }
    let device = test_device();
    let config = llama::load_config(&tiny_test_config()).unwrap();
    let base = llama::init_random(&config, &device, 5).unwrap();
    let reference = logits(&base);
    for (quant, tolerance) in [(BaseQuant::Q8, 0.02), (BaseQuant::Q4, 0.3)] {
        let adapted = lora::attach(
            base.clone(),
            &spec(&lora::TARGETS, quant),
            Factors::Fresh(0),
            None,
        )
        .unwrap();
        let diff = max_diff(&logits(&adapted), &reference);
        assert!(diff > 0.0 && diff < tolerance, "{quant:?}: {diff}");
    }
}
