//! The memory plan's arithmetic, from shapes alone.

use trainer::recipe::TrainSection;
use trainer::{MemoryPlan, Pass};

fn train(extra: serde_json::Value) -> TrainSection {
    let mut base = serde_json::json!({"batch_size": 8, "lr": 1e-4});
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(base).unwrap()
}

fn config() -> llama::LlamaConfig {
    llama::load_config(&test_support::root().join("configs/tiny-15m-untied.toml")).unwrap()
}

const PASS: Pass = Pass {
    rows: 8,
    positions: 256,
    lm_head: true,
};

#[test]
fn a_trained_model_holds_weights_gradients_and_two_moments() {
    let config = config();
    let params = config.parameter_count();
    let plan = MemoryPlan::trained(&config, PASS, &train(serde_json::json!({})));
    assert_eq!(plan.weights, 4 * params);
    assert_eq!(plan.gradients, 4 * params);
    assert_eq!(plan.optimizer, 8 * params);
    // Four f32 copies of [8, 256, 32000] logits.
    assert_eq!(plan.logits, 4 * 8 * 256 * 32000 * 4);
    assert_eq!(
        plan.total,
        plan.weights + plan.gradients + plan.optimizer + plan.activations + plan.logits
    );
    // Activations grow with the micro-batch (linearly) and the positions (faster: attention).
    let twice = MemoryPlan::trained(
        &config,
        Pass { rows: 16, ..PASS },
        &train(serde_json::json!({})),
    );
    assert_eq!(twice.activations, 2 * plan.activations);
    let longer = MemoryPlan::trained(
        &config,
        Pass {
            positions: 512,
            ..PASS
        },
        &train(serde_json::json!({})),
    );
    assert!(longer.activations > 2 * plan.activations);
}

#[test]
fn checkpointing_and_chunks_shrink_what_they_should() {
    let config = config();
    let plain = MemoryPlan::trained(&config, PASS, &train(serde_json::json!({})));
    let checkpointed = MemoryPlan::trained(
        &config,
        PASS,
        &train(serde_json::json!({"activation_checkpointing": true})),
    );
    assert!(checkpointed.activations < plain.activations);
    assert_eq!(checkpointed.logits, plain.logits);
    // Recomputing layers keeps every layer's input (d values per position) and one layer's
    // activations, instead of every layer's.
    let (rows, positions) = (PASS.rows as u64, PASS.positions as u64);
    let (d, layers) = (config.hidden_size as u64, config.num_hidden_layers as u64);
    let around = 4 * d * 4;
    let one_layer = (plain.activations / (rows * positions) - around) / layers;
    assert_eq!(
        checkpointed.activations,
        rows * positions * (layers * d * 4 + one_layer + around)
    );
    let chunked = MemoryPlan::trained(&config, PASS, &train(serde_json::json!({"loss_chunk": 64})));
    assert_eq!(chunked.logits * 4, plain.logits);
    assert_eq!(chunked.activations, plain.activations);
    // A chunk longer than the sequence is the whole sequence; a scalar head has no logits.
    let long_chunk = MemoryPlan::trained(
        &config,
        PASS,
        &train(serde_json::json!({"loss_chunk": 4096})),
    );
    assert_eq!(long_chunk.logits, plain.logits);
    let scalar = MemoryPlan::trained(
        &config,
        Pass {
            lm_head: false,
            ..PASS
        },
        &train(serde_json::json!({})),
    );
    assert_eq!(scalar.logits, 0);
}

#[test]
fn parts_add_up_and_a_plan_too_large_is_refused_by_name() {
    let config = config();
    let trained = MemoryPlan::trained(&config, PASS, &train(serde_json::json!({})));
    let frozen = MemoryPlan::frozen(&config);
    assert_eq!(frozen.total, frozen.weights);
    assert_eq!(frozen.weights, trained.weights);
    let both = trained.and(frozen).and(MemoryPlan::buffers(1000));
    assert_eq!(both.weights, 2 * trained.weights);
    assert_eq!(both.total, trained.total + frozen.total + 1000);

    assert!(both.check(None, "cuda:0").is_ok());
    assert!(both.check(Some(both.total), "flex").is_ok());
    let e = both
        .check(Some(both.total - 1), "flex")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("flex has")
            && e.contains("train.micro_batch_size")
            && e.contains("train.activation_checkpointing")
            && !e.contains('\n'),
        "{e}"
    );
}

fn lora(extra: serde_json::Value) -> trainer::recipe::LoraSection {
    let mut base = serde_json::json!({"rank": 8, "targets": ["q_proj", "v_proj", "down_proj"]});
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(base).unwrap()
}

#[test]
fn lora_trains_and_stores_only_the_factors() {
    let config = config();
    let (d, kv, f) = (
        config.hidden_size as u64,
        config.kv_dim() as u64,
        config.intermediate_size as u64,
    );
    let layers = config.num_hidden_layers as u64;
    let train = train(serde_json::json!({}));
    let full = MemoryPlan::trained(&config, PASS, &train);
    let plan = MemoryPlan::lora(&config, PASS, &train, &lora(serde_json::json!({})));
    // q: d -> d, v: d -> kv, down: f -> d; rank 8.
    let factors = layers * 8 * ((d + d) + (d + kv) + (f + d));
    assert_eq!(plan.gradients, 4 * factors);
    assert_eq!(plan.optimizer, 8 * factors);
    assert_eq!(plan.weights, full.weights + 4 * factors);
    // burn keeps each composed weight for the backward pass, and forms one weight-shaped
    // gradient at a time.
    let adapted = layers * (d * d + d * kv + f * d);
    assert_eq!(
        plan.activations,
        full.activations + 4 * (adapted + 2 * f * d)
    );
    assert_eq!(plan.logits, full.logits);

    // A scalar head is trained in full beside the factors.
    let scalar = Pass {
        lm_head: false,
        ..PASS
    };
    let reward = MemoryPlan::lora(&config, scalar, &train, &lora(serde_json::json!({})));
    assert_eq!(reward.gradients, 4 * (factors + d));

    // QLoRA: the adapted projections packed (4 bits and an f32 scale per 32 values).
    let q4 = MemoryPlan::lora(
        &config,
        PASS,
        &train,
        &lora(serde_json::json!({"quantize_base": "q4"})),
    );
    let packed = (adapted as f64 * (0.5 + 4.0 / 32.0)).ceil() as u64;
    assert_eq!(q4.weights, plan.weights - 4 * adapted + packed);
}

#[test]
fn bf16_halves_what_it_stores_and_mixed_keeps_f32_masters() {
    use trainer::recipe::Precision;
    let config = config();
    let params = config.parameter_count();
    let train = train(serde_json::json!({}));
    let f32_plan = MemoryPlan::trained(&config, PASS, &train);
    let bf16 = MemoryPlan::build(&config, PASS, &train, None, Precision::Bf16);
    assert_eq!(
        (bf16.weights, bf16.gradients, bf16.optimizer),
        (2 * params, 2 * params, 4 * params)
    );
    // Attention scores stay f32, everything else kept for backward is bf16.
    assert!(bf16.activations < f32_plan.activations && 2 * bf16.activations > f32_plan.activations);
    assert_eq!(bf16.logits, f32_plan.logits);
    let mixed = MemoryPlan::build(&config, PASS, &train, None, Precision::Bf16Mixed);
    assert_eq!(
        (mixed.weights, mixed.gradients, mixed.optimizer),
        (4 * params, 4 * params, 8 * params)
    );
    // The bf16 copies of the weights are kept for the backward pass.
    assert_eq!(mixed.activations, bf16.activations + 2 * params);
}
