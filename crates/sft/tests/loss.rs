//! One batch of 8 and four micro-batches of 2 give the same gradients.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use data::batch::{sequence_dataset, SequenceBatch, SequenceDataset};
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenized, Tokenizer, Truncation};
use llama::weights::hf_params;
use sft::loss::sft_loss;

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

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let device = Device::flex().autodiff();
    let config = llama::load_config(&test_support::tiny_test_config()).unwrap();
    let model = llama::init_random(&config, &device, 11).unwrap();
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
    let all: Vec<_> = (0..8).map(|i| burn_dataset_get(&dataset, i)).collect();

    let full = SequenceBatch::new(&all, 0);
    let total = full.trained_tokens();
    let loss = sft_loss(&model, &full, total);
    let reference = grads_by_name(
        &model,
        &GradientsParams::from_grads(loss.backward(), &model),
    );

    let mut accumulator = GradientsAccumulator::<llama::Llama>::new();
    let mut loss_sum = 0.0f32;
    for chunk in all.chunks(2) {
        let micro = SequenceBatch::new(chunk, 0);
        let loss = sft_loss(&model, &micro, total);
        loss_sum += loss.clone().into_scalar::<f32>();
        accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
    }
    let accumulated = grads_by_name(&model, &accumulator.grads());
    let full_loss = sft_loss(&model, &full, total).into_scalar::<f32>();
    assert!(
        (loss_sum - full_loss).abs() < 1e-5,
        "{loss_sum} vs {full_loss}"
    );
    for ((name, a), (_, b)) in reference.iter().zip(&accumulated) {
        let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-6);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-4 * scale + 1e-7,
            "{name}: gradients differ by {diff} (scale {scale})"
        );
    }
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
