//! The parts of an optimizer step every trainer's loop shares: the epoch's batch order, a loss
//! summed on the device (read once per step), and the step itself (global-norm clipping, the
//! divergence check, the schedule, AdamW).

use std::path::Path;

use burn::optim::{GradientsAccumulator, ModuleOptimizer};
use burn::prelude::*;
use data::batch::batch_order;
use llama::Llama;

use crate::error::{Result, TrainError};
use crate::optim::clip_grad_norm;
use crate::schedule::{learning_rate, warmup_steps};
use crate::Recipe;

/// The batches of each epoch, in the order `batch_order` gives for the seed and epoch, so a
/// resumed run sees the same batches.
pub struct EpochBatches {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    bucket: bool,
    epoch: Option<usize>,
    order: Vec<Vec<usize>>,
}

impl EpochBatches {
    pub fn new(lengths: Vec<usize>, recipe: &Recipe) -> Self {
        Self {
            lengths,
            batch_size: recipe.train.batch_size,
            seed: recipe.train.seed,
            bucket: recipe.data.bucket_by_length,
            epoch: None,
            order: Vec::new(),
        }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.batch_size)
    }

    /// The epoch of optimizer step `step` (0-based) and the item indices of its batch.
    pub fn batch(&mut self, step: usize) -> (usize, Vec<usize>) {
        let per_epoch = self.steps_per_epoch().max(1);
        let epoch = step / per_epoch;
        if self.epoch != Some(epoch) {
            self.order = batch_order(
                &self.lengths,
                self.batch_size,
                self.seed,
                epoch as u64,
                self.bucket,
            );
            self.epoch = Some(epoch);
        }
        (epoch, self.order[step % per_epoch].clone())
    }
}

/// A sum kept on the device: micro-batch losses are added without a host read.
#[derive(Default)]
pub struct DeviceSum(Option<Tensor<1>>);

impl DeviceSum {
    pub fn add(&mut self, value: Tensor<1>) {
        self.0 = Some(match self.0.take() {
            Some(sum) => sum + value.detach(),
            None => value.detach(),
        });
    }

    /// Reads the sum (one host sync); 0 when nothing was added.
    pub fn read(self) -> f64 {
        self.0.map_or(0.0, |t| t.into_scalar::<f32>() as f64)
    }
}

/// What one optimizer step did.
pub struct Stepped {
    pub model: Llama,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
}

/// Clips the accumulated gradients by their global norm, stops on a non-finite loss or norm
/// (the last checkpoint in the output directory stays), and applies AdamW at the schedule's learning rate for
/// `step` (0-based).
pub fn optimizer_step(
    recipe: &Recipe,
    optimizer: &mut ModuleOptimizer,
    model: Llama,
    mut accumulator: GradientsAccumulator<Llama>,
    step: usize,
    total_steps: usize,
    loss: f64,
) -> Result<Stepped> {
    let train = &recipe.train;
    let mut grads = accumulator.grads();
    let grad_norm = clip_grad_norm(&model, &mut grads, train.grad_clip);
    if !loss.is_finite() || !grad_norm.is_finite() {
        return Err(diverged(step + 1, loss, grad_norm, &recipe.output.dir));
    }
    let warmup = warmup_steps(train.warmup_steps, train.warmup_ratio, total_steps);
    let lr = learning_rate(
        train.schedule,
        train.lr,
        train.min_lr_ratio,
        warmup,
        step,
        total_steps,
    );
    let model = optimizer.step(lr, model, grads);
    Ok(Stepped {
        model,
        lr,
        grad_norm,
    })
}

fn diverged(step: usize, loss: f64, grad_norm: f64, out: &Path) -> TrainError {
    let kept = match crate::checkpoint::find_checkpoint(out, "latest") {
        Ok(dir) => format!("the last checkpoint, {}, is kept", dir.display()),
        Err(_) => "no checkpoint had been saved yet".to_string(),
    };
    TrainError::Invalid(format!(
        "step {step}: loss {loss}, gradient norm {grad_norm}: training diverged; {kept}"
    ))
}

/// Whether step `done` (1-based) logs, evaluates or saves: every `every` steps (0: never) and
/// at the last step.
pub fn due(done: usize, every: usize, total_steps: usize) -> bool {
    done == total_steps || (every > 0 && done.is_multiple_of(every))
}

/// A benchmark's optimizer step: global-norm clipping and AdamW at the recipe's peak rate (no
/// schedule or checks), then one parameter read back, which waits for the step to finish on
/// asynchronous backends.
pub fn bench_step(
    recipe: &Recipe,
    optimizer: &mut ModuleOptimizer,
    model: Llama,
    mut accumulator: GradientsAccumulator<Llama>,
) -> Llama {
    let train = &recipe.train;
    let mut grads = accumulator.grads();
    clip_grad_norm(&model, &mut grads, train.grad_clip);
    let model = optimizer.step(train.lr, model, grads);
    let _ = llama::model::to_host(model.norm.gamma.val());
    // GPU backends queue work asynchronously: wait for the whole step before it is timed.
    let _ = model.norm.gamma.val().device().sync();
    model
}
