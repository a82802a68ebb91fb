//! One batch of 8 and four micro-batches of 2 give the same gradients, and so does the loss
//! taken in chunks of positions.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use data::batch::{sequence_dataset, SequenceBatch, SequenceDataset};
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenized, Tokenizer, Truncation};
use llama::weights::hf_params;
use sft::loss::{sft_eval_loss, sft_loss_and_grads};
use trainer::chunked::GradPlan;

fn grads_by_name(model: &llama::Llama, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (name, param) in hf_params(model) {
        let values = match param {
            llama::weights::ParamRef::Linear(l) => {
                grads.get::<2>(l.weight.id).map(llama::model::to_host)
            }
            llama::weights::ParamRef::Norm(n) => {
                grads.get::<1>(n.gamma.id).map(llama::model::to_host)
            }
            llama::weights::ParamRef::Embedding(e) => {
                grads.get::<2>(e.weight.id).map(llama::model::to_host)
            }
        };
        out.push((name, values.expect("every parameter has a gradient")));
    }
    out
}

/// The largest difference between two gradient sets, relative to each tensor's largest value.
fn assert_same_grads(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-6);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= tolerance * scale + 1e-7,
            "{name}: gradients differ by {diff} (scale {scale})"
        );
    }
}

/// Eight examples of the chat data as SFT items.
fn eight_items() -> Vec<data::batch::SequenceItem> {
    let tokenizer = Tokenizer::from_file(&test_support::fixture_tokenizer_path()).unwrap();
    let source = SourceConfig::file(test_support::root().join("datasets/chat-tiny.jsonl"), None);
    let policy = LengthPolicy {
        max_seq_len: 256,
        truncation: Truncation::TruncatePrompt,
        train_on_inputs: false,
    };
    let (items, _) = load_source(&source, &tokenizer, &policy, OnError::Stop).unwrap();
    let examples: Vec<Tokenized> = items.into_iter().take(8).map(|i| i.tokens).collect();
    let dataset = sequence_dataset(&examples, 256, false);
    (0..8).map(|i| burn_dataset_get(&dataset, i)).collect()
}

#[test]
fn the_chunked_loss_gives_the_same_loss_and_gradients() {
    let device = llama::parse_device(&test_support::test_device_name())
        .unwrap()
        .autodiff();
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    // Tied and untied heads: the embedding gets gradients from the head and the lookup.
    for tied in [true, false] {
        let mut config = config.clone();
        config.tie_word_embeddings = tied;
        let model = llama::init_random(&config, &device, 11).unwrap();
        let batch = SequenceBatch::new(&eight_items(), 0);
        let total = batch.trained_tokens();
        let width = batch.tokens[0].len();
        let plan = |chunk: usize, layerwise: bool| GradPlan {
            chunk,
            layerwise,
            ..GradPlan::default()
        };
        let (whole, grads) = sft_loss_and_grads(&model, &batch, total, plan(0, false));
        let whole = whole.into_scalar::<f32>();
        let reference = grads_by_name(&model, &grads);
        // Chunks that divide the width, that do not, and a single position; and each with
        // every layer recomputed in the backward pass (activation checkpointing).
        for chunk in [width / 4, 37, 1, 0] {
            for layerwise in [false, true] {
                let (loss, grads) =
                    sft_loss_and_grads(&model, &batch, total, plan(chunk, layerwise));
                let loss = loss.into_scalar::<f32>();
                assert!(
                    (loss - whole).abs() <= 1e-5,
                    "chunk {chunk}, layerwise {layerwise}: {loss} vs {whole}"
                );
                assert_same_grads(&reference, &grads_by_name(&model, &grads), 1e-5);
            }
            let eval = sft_eval_loss(&model.valid(), &batch, total, chunk) as f32;
            assert!((eval - whole).abs() <= 1e-5, "eval chunk {chunk}: {eval}");
        }
    }
}

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let device = Device::flex().autodiff();
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    let model = llama::init_random(&config, &device, 11).unwrap();
    let all = eight_items();

    let full = SequenceBatch::new(&all, 0);
    let total = full.trained_tokens();
    let (full_loss, grads) = sft_loss_and_grads(&model, &full, total, GradPlan::default());
    let full_loss = full_loss.into_scalar::<f32>();
    let reference = grads_by_name(&model, &grads);

    let mut accumulator = GradientsAccumulator::<llama::Llama>::new();
    let mut loss_sum = 0.0f32;
    for chunk in all.chunks(2) {
        let micro = SequenceBatch::new(chunk, 0);
        let (loss, grads) = sft_loss_and_grads(&model, &micro, total, GradPlan::default());
        loss_sum += loss.into_scalar::<f32>();
        accumulator.accumulate(&model, grads);
    }
    let accumulated = grads_by_name(&model, &accumulator.grads());
    assert!(
        (loss_sum - full_loss).abs() < 1e-5,
        "{loss_sum} vs {full_loss}"
    );
    assert_same_grads(&reference, &accumulated, 1e-4);
    // The loss is the mean over trained tokens: ln(vocab) order of magnitude at init.
    assert!(
        full_loss > 1.0 && full_loss < 2.0 * (config.vocab_size as f32).ln(),
        "{full_loss}"
    );
}

fn burn_dataset_get(d: &SequenceDataset, i: usize) -> data::batch::SequenceItem {
    use data::batch::Dataset;
    d.get(i).unwrap()
}

/// The LoRA factors' gradients by name.
fn factor_grads(model: &llama::Llama, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, linear) in [
            ("q", &layer.self_attn.q_proj),
            ("gate", &layer.mlp.gate_proj),
        ] {
            let adapter = linear.weight.adapter().expect("an adapted projection");
            for (factor, param) in [("a", &adapter.a), ("b", &adapter.b)] {
                let grad = grads.get::<2>(param.id).expect("factors have gradients");
                out.push((format!("{i}.{name}.{factor}"), llama::model::to_host(grad)));
            }
        }
    }
    out
}

#[test]
fn lora_dropout_draws_the_same_masks_when_layers_are_recomputed() {
    let device = llama::parse_device(&test_support::test_device_name())
        .unwrap()
        .autodiff();
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    let spec = llama::lora::LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "gate_proj".into()],
        quantize: llama::lora::BaseQuant::None,
    };
    let base = llama::init_random(&config, &device, 11).unwrap();
    let model = llama::lora::attach(base, &spec, llama::lora::Factors::Fresh(3), None).unwrap();
    let batch = SequenceBatch::new(&eight_items(), 0);
    let total = batch.trained_tokens();
    let plan = |dropout: f64, layerwise: bool, chunk: usize| {
        GradPlan {
            chunk,
            layerwise,
            dropout,
            pass_seed: 5,
        }
        .at(&[7, 1])
    };
    let grads = |plan: GradPlan| {
        let (loss, grads) = sft_loss_and_grads(&model, &batch, total, plan);
        (loss.into_scalar::<f32>(), factor_grads(&model, &grads))
    };
    let (loss, plain) = grads(plan(0.3, false, 0));
    for (layerwise, chunk) in [(true, 0), (true, 37), (false, 37)] {
        let (again, recomputed) = grads(plan(0.3, layerwise, chunk));
        assert!((again - loss).abs() <= 1e-5, "{again} vs {loss}");
        assert_same_grads(&plain, &recomputed, 1e-5);
    }
    // Dropout changes what the factors learn from (B starts at zero, so not the loss yet), and
    // another pass draws other masks.
    let (_, without) = grads(plan(0.0, false, 0));
    let (_, other_pass) = grads(GradPlan {
        pass_seed: 6,
        ..plan(0.3, false, 0)
    });
    let differs = |x: &[(String, Vec<f32>)], y: &[(String, Vec<f32>)]| {
        x.iter()
            .zip(y)
            .any(|((_, a), (_, b))| a.iter().zip(b).any(|(p, q)| (p - q).abs() > 1e-4))
    };
    assert!(differs(&plain, &without), "dropout changed no gradient");
    assert!(
        differs(&plain, &other_pass),
        "two passes drew the same masks"
    );
}
