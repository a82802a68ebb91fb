//! The training session every trainer runs in, as torchtune's recipes do it: setup, then one
//! loop. [`Session::open`] claims the output directory, reads the checkpoint being resumed and
//! loads the tokenizer; the method loads its data ([`Session::data`]) and the model it trains
//! ([`Session::model`]); [`Session::start`] restores the step and the optimizer and writes the
//! run's directory, and the returned [`Run`] is the loop's companion: its optimizer steps,
//! metrics, checkpoints and last words. What applies to every trained model (its device, how
//! it is loaded and resumed, its optimizer) lives here once; frozen models a method needs
//! besides (PPO's reference and reward models) it loads itself.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::{GradientsAccumulator, ModuleOptimizer};
use burn::prelude::Device;
use burn::tensor::FloatDType;
use data::Tokenizer;
use llama::{Head, Llama, LlamaConfig};

use crate::checkpoint::{self, TrainerState};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::MetricsLogger;
use crate::output::OutputLock;
use crate::recipe::Precision;
use crate::step::{due, optimizer_step, EpochBatches, Stepped};
use crate::Recipe;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an output directory that holds another run.
    pub overwrite: bool,
    /// Continue from a checkpoint directory, or `latest` in the output directory.
    pub resume: Option<String>,
}

/// What a finished run reports; `E` is the method's evaluation (SFT: the eval loss).
#[derive(Debug, Clone)]
pub struct Summary<E> {
    pub steps: usize,
    pub final_loss: f64,
    pub eval: Option<E>,
    pub checkpoint: PathBuf,
}

impl<E> Summary<E> {
    /// The report of a resumed run that had already finished: nothing was trained.
    pub fn finished(session: &Session, items: usize) -> Self {
        Self {
            steps: total_steps(session.recipe, items),
            final_loss: f64::NAN,
            eval: None,
            checkpoint: session.resume.clone().unwrap_or_default(),
        }
    }
}

/// A run being set up. Nothing on disk changes before [`Session::start`] (partial checkpoints
/// of a killed save aside), so a failure during setup leaves the output directory as it was.
pub struct Session<'r> {
    pub recipe: &'r Recipe,
    /// The device models with gradients live on (autodiff).
    pub device: Device,
    pub tokenizer: Tokenizer,
    /// The checkpoint being resumed.
    pub resume: Option<PathBuf>,
    /// Its trainer state.
    pub state: Option<TrainerState>,
    /// What the loop counts, for messages: "step" (PPO: "iteration").
    pub unit: &'static str,
    lock: OutputLock,
}

impl<'r> Session<'r> {
    /// The device and tokenizer; the output directory locked for this run, `--resume`
    /// resolved, and a directory holding another run refused unless `--overwrite` (and then
    /// only a run of ours).
    pub fn open(recipe: &'r Recipe, options: &RunOptions) -> Result<Self> {
        let device = training_device(recipe)?;
        check_quantization(recipe)?;
        let tokenizer = Tokenizer::from_file(&recipe.model.tokenizer)?;
        let out = &recipe.output.dir;
        let lock = OutputLock::acquire(out)?;
        let resume = match &options.resume {
            Some(which) => Some(checkpoint::find_checkpoint(out, which)?),
            None => None,
        };
        if resume.is_none() {
            lock.check_replaceable(options.overwrite, "use --overwrite to replace it")?;
        }
        let state = resume.as_deref().map(checkpoint::read_state).transpose()?;
        lock.remove_stale_partials()?;
        Ok(Self {
            recipe,
            device,
            tokenizer,
            resume,
            state,
            unit: "step",
            lock,
        })
    }

    /// The device without autodiff, for frozen models (reference policy, reward models).
    pub fn inference_device(&self) -> Device {
        self.device.clone().inner()
    }

    /// The recipe's `[data]`, tokenized; examples truncated, dropped or skipped are counted on
    /// stderr.
    pub fn data(&self) -> Result<data::LoadedData> {
        let recipe = self.recipe;
        let data = data::load_data(
            &recipe.data,
            Path::new(""),
            &self.tokenizer,
            recipe.train.seed,
        )?;
        let count = |f: fn(&data::SourceStats) -> usize| data.sources.iter().map(f).sum::<usize>();
        let (truncated, dropped) = (count(|s| s.truncated), count(|s| s.dropped));
        if truncated + dropped + data.errors() > 0 {
            eprintln!(
                "data: {} training and {} evaluation examples kept; {truncated} truncated and \
                 {dropped} dropped at max_seq_len {}; {} malformed records skipped",
                data.train.len(),
                data.eval.len(),
                recipe.data.max_seq_len,
                data.errors()
            );
        }
        Ok(data)
    }

    /// Refuses training data smaller than one global batch; `what` names the items
    /// ("sequences", "pairs", "prompts").
    pub fn check_one_batch(&self, items: usize, what: &str) -> Result<()> {
        if items < self.recipe.train.batch_size {
            return Err(TrainError::Invalid(format!(
                "the training data has {items} {what}, fewer than one batch of {}",
                self.recipe.train.batch_size
            )));
        }
        Ok(())
    }

    /// The model to train with `head`: from the checkpoint being resumed (with the parameter
    /// ids its optimizer state refers to; it must have been trained with this tokenizer), or
    /// as `[model]` names it. Its vocabulary must hold the tokenizer's and its context
    /// `data.max_seq_len`.
    pub fn model(&mut self, head: Head) -> Result<(LlamaConfig, Llama)> {
        let (config, model) = match (&self.resume, &self.state) {
            (Some(dir), Some(state)) => {
                check_resumed_tokenizer(&self.tokenizer, dir)?;
                check_resumed_quantization(self.recipe, dir, state)?;
                let loaded = resume_model(self.recipe, dir, &self.device, head, &state.param_ids)?;
                if loaded.1.head() != head {
                    return Err(TrainError::Invalid(format!(
                        "{}: the checkpoint has a {:?} head, this trainer needs a {head:?} head",
                        dir.display(),
                        loaded.1.head()
                    )));
                }
                loaded
            }
            _ => {
                let (config, model) = load_model(self.recipe, &self.device, head)?;
                (config, adapt(self.recipe, model, self.recipe.train.seed)?)
            }
        };
        let model = with_precision(self.recipe, model);
        check_vocab(&self.tokenizer, &config, &self.recipe.model.tokenizer)?;
        let max_seq_len = self.recipe.data.max_seq_len;
        if max_seq_len > config.context_length() {
            return Err(TrainError::Invalid(format!(
                "data.max_seq_len {max_seq_len} exceeds the model's context of {} tokens \
                 (max_position_embeddings, stretched by dynamic RoPE scaling)",
                config.context_length()
            )));
        }
        Ok((config, model))
    }

    /// Says the run's memory plan (one line on stderr) and refuses it when it exceeds the
    /// memory the device has (CPU devices: available RAM; CUDA devices: the GPU's free memory,
    /// from `nvidia-smi`; not checked where neither can be read).
    pub fn check_memory(&self, plan: &crate::MemoryPlan) -> Result<()> {
        eprintln!("{}", plan.summary());
        let available = llama::memory_available(&self.recipe.runtime.device, &self.device);
        plan.check(available, &self.recipe.runtime.device)
    }

    /// AdamW as the recipe says, with the state saved in the resumed checkpoint's `subdir`
    /// (`""`: the checkpoint itself).
    pub fn optimizer(&self, subdir: &str) -> Result<ModuleOptimizer> {
        let dir = self.resume.as_ref().map(|d| d.join(subdir));
        checkpoint::optimizer(self.recipe, dir.as_deref())
    }

    /// Starts the loop over `items` training items: the total steps (`max_steps`, or `epochs`
    /// passes in batches of `batch_size`), the step to start at, and the trained model's AdamW
    /// (its state restored when resuming). `None` when the resumed checkpoint already finished
    /// the run (said on stderr; nothing on disk has changed). Otherwise the output directory is
    /// emptied (fresh runs), marked as ours, given the resolved `recipe.toml`, and metrics are
    /// opened.
    pub fn start(self, items: usize) -> Result<Option<(Run<'r>, ModuleOptimizer)>> {
        if self.finished_before(items) {
            return Ok(None);
        }
        let recipe = self.recipe;
        let total = total_steps(recipe, items);
        let start = self.state.as_ref().map_or(0, |s| s.step);
        // Before anything is written: a state that does not load leaves the directory as it was.
        let optimizer = self.optimizer("")?;
        self.lock.begin(recipe, self.resume.is_none())?;
        let out = &recipe.output.dir;
        let metrics = MetricsLogger::open(out, start, total).map_err(io_err(out))?;
        if let Some(dir) = &self.resume {
            eprintln!("resuming from {} at {} {start}", dir.display(), self.unit);
        }
        let run = Run {
            recipe,
            tokenizer: self.tokenizer,
            unit: self.unit,
            start,
            total,
            metrics,
            metrics_path: out.join(crate::metrics::METRICS_FILE),
            started: Instant::now(),
            window: Window::default(),
            _lock: self.lock,
        };
        Ok(Some((run, optimizer)))
    }
}

impl Session<'_> {
    /// Whether the checkpoint being resumed already finished the run over `items` (said on
    /// stderr): there is nothing to train. A method with more state to restore than
    /// [`Session::start`] does asks this first, so a finished run exits before reading it.
    pub fn finished_before(&self, items: usize) -> bool {
        let total = total_steps(self.recipe, items);
        match (&self.resume, &self.state) {
            (Some(dir), Some(state)) if state.step >= total => {
                eprintln!(
                    "{} is at {} {} of {total}: the run is finished, nothing to do \
                     (raise train.max_steps or train.epochs to train further)",
                    dir.display(),
                    self.unit,
                    state.step
                );
                true
            }
            _ => false,
        }
    }
}

/// A run's loop: steps `start..total`, with the optimizer step, metrics and checkpoints every
/// method shares. Holds the output directory's lock until dropped.
pub struct Run<'r> {
    pub recipe: &'r Recipe,
    pub tokenizer: Tokenizer,
    unit: &'static str,
    pub start: usize,
    pub total: usize,
    metrics: MetricsLogger,
    metrics_path: PathBuf,
    started: Instant,
    window: Window,
    _lock: OutputLock,
}

/// What went through the model since the last logged step, for throughput.
struct Window {
    tokens: usize,
    items: usize,
    start: Instant,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            tokens: 0,
            items: 0,
            start: Instant::now(),
        }
    }
}

impl Run<'_> {
    /// The order of every epoch's batches of items with these lengths.
    pub fn batches(&self, lengths: Vec<usize>) -> EpochBatches {
        EpochBatches::new(lengths, self.recipe)
    }

    /// Whether step `done` (1-based) does what happens `every` steps (0: only at the end).
    pub fn due(&self, done: usize, every: usize) -> bool {
        due(done, every, self.total)
    }

    /// Clips the accumulated gradients, stops on divergence, and applies AdamW at the
    /// schedule's rate for `step` (0-based).
    pub fn optimizer_step(
        &self,
        optimizer: &mut ModuleOptimizer,
        model: Llama,
        accumulator: GradientsAccumulator<Llama>,
        step: usize,
        loss: f64,
    ) -> Result<Stepped> {
        optimizer_step(
            self.recipe,
            optimizer,
            model,
            accumulator,
            step,
            self.total,
            loss,
        )
    }

    /// Counts `tokens` (padding included) in `items` sequences or pairs through the model, for
    /// the throughput of the next logged step.
    pub fn count(&mut self, tokens: usize, items: usize) {
        self.window.tokens += tokens;
        self.window.items += items;
    }

    /// After optimizer step `step` (0-based) with loss `loss`: moves the progress bar and, at
    /// logging steps, writes `loss`, `lr`, `grad_norm`, `tokens_per_sec`, the method's `values`
    /// and, when `items_per_sec` names it, the items/s since the last logged step.
    pub fn log_step(
        &mut self,
        step: usize,
        loss: f64,
        stepped: &Stepped,
        values: &[(&str, f64)],
        items_per_sec: Option<&str>,
    ) -> Result<()> {
        let done = step + 1;
        self.progress(done);
        if !self.due(done, self.recipe.train.log_every.max(1)) {
            return Ok(());
        }
        let seconds = self.window.start.elapsed().as_secs_f64().max(1e-9);
        let mut line = vec![
            ("loss", loss),
            ("lr", stepped.lr),
            ("grad_norm", stepped.grad_norm),
            ("tokens_per_sec", self.window.tokens as f64 / seconds),
        ];
        if let Some(name) = items_per_sec {
            line.push((name, self.window.items as f64 / seconds));
        }
        line.extend_from_slice(values);
        self.window = Window::default();
        self.log("train", done, &line)
    }

    /// Moves the progress bar to step `done`.
    pub fn progress(&mut self, done: usize) {
        self.metrics.progress(done);
    }

    /// One line of `metrics.jsonl` (and TensorBoard scalars) in `group` for step `done`.
    pub fn log(&mut self, group: &str, done: usize, values: &[(&str, f64)]) -> Result<()> {
        self.metrics
            .log(group, done, values)
            .map_err(io_err(&self.metrics_path))
    }

    /// A TensorBoard text summary (PPO's samples).
    pub fn text(&mut self, tag: &str, done: usize, markdown: &str) {
        self.metrics.text(tag, done, markdown);
    }

    /// Writes `checkpoint-<step>`: `model` as a Hugging Face directory with the recipe's
    /// tokenizer, `optimizer`'s state and `trainer_state.json`; `more` may write further files
    /// into the directory and add to the state before it is written.
    pub fn save(
        &self,
        step: usize,
        model: &Llama,
        config: &LlamaConfig,
        optimizer: &ModuleOptimizer,
        more: impl FnOnce(&Path, &mut TrainerState) -> Result<()>,
    ) -> Result<PathBuf> {
        checkpoint::save_checkpoint(self.recipe, step, |dir| {
            let base = self.recipe.model.checkpoint.as_deref();
            checkpoint::write_model(model, config, self.recipe, base, dir)?;
            let mut state = TrainerState {
                step,
                total_steps: self.total,
                seed: self.recipe.train.seed,
                param_ids: llama::weights::param_ids(model),
                extra: serde_json::Value::Null,
                quantize_base: self.recipe.lora.as_ref().map(|lora| lora.quantize_base),
            };
            more(dir, &mut state)?;
            checkpoint::write_training_state(dir, optimizer, &state)
        })
    }

    /// Closes the metrics and says where the run ended.
    pub fn finish(mut self, checkpoint: &Path) {
        self.metrics.finish();
        eprintln!(
            "finished {} {}s in {:.1} s; checkpoint {}",
            self.total,
            self.unit,
            self.started.elapsed().as_secs_f64(),
            checkpoint.display()
        );
    }
}

/// The device models with gradients train on: `runtime.device` with autodiff. (Activation
/// checkpointing is ours, per decoder layer: `trainer::chunked::model_grads`.)
pub fn training_device(recipe: &Recipe) -> Result<Device> {
    Ok(llama::parse_device(&recipe.runtime.device)?.autodiff())
}

/// Refuses a quantised LoRA base on a backend without quantised tensors (libtorch), which
/// would otherwise stop at the first quantisation with a panic.
fn check_quantization(recipe: &Recipe) -> Result<()> {
    let Some(lora) = &recipe.lora else {
        return Ok(());
    };
    let quantized = lora.quantize_base != llama::lora::BaseQuant::None;
    if quantized && recipe.runtime.device.starts_with("tch") {
        return Err(TrainError::Invalid(format!(
            "[lora] `quantize_base` needs quantised tensors, which the libtorch backend ({}) \
             does not have: use flex or cuda, or quantize_base = \"none\"",
            recipe.runtime.device
        )));
    }
    Ok(())
}

/// Steps of a run: `max_steps`, or `epochs` passes over `items` in batches of `batch_size`.
pub fn total_steps(recipe: &Recipe, items: usize) -> usize {
    let steps_per_epoch = items.div_ceil(recipe.train.batch_size);
    recipe
        .train
        .max_steps
        .unwrap_or(recipe.train.epochs * steps_per_epoch)
}

/// Loads the model the recipe names, with `head`: a checkpoint, or a fresh model of an
/// architecture.
pub fn load_model(recipe: &Recipe, device: &Device, head: Head) -> Result<(LlamaConfig, Llama)> {
    match (&recipe.model.checkpoint, &recipe.model.config) {
        (Some(dir), _) => Ok(llama::load_pretrained_as(
            dir,
            device,
            head,
            recipe.train.seed,
        )?),
        (None, Some(config)) => {
            let config = llama::load_config(config)?;
            let model = llama::init_random_with_head(&config, device, head, recipe.train.seed)?;
            Ok((config, model))
        }
        (None, None) => Err(TrainError::Invalid(
            "[model] needs `config` or `checkpoint`".into(),
        )),
    }
}

/// A loaded model (f32) as the recipe's `runtime.dtype` runs it: `bf16` stores every float
/// parameter in bf16 (so its gradients and AdamW moments are bf16 too); `bf16-mixed` keeps f32
/// master weights and computes in bf16.
///
/// With LoRA, both bf16 modes store the frozen base in bf16 and keep what trains (the adapter
/// factors, a scalar head) in f32, computing in bf16: a frozen weight needs no f32 master copy.
pub fn with_precision(recipe: &Recipe, model: Llama) -> Llama {
    let bf16 = Some(FloatDType::BF16);
    match (recipe.runtime.precision(), &recipe.lora) {
        (Precision::F32, _) => model,
        (_, Some(_)) if llama::lora::has_adapters(&model) => Llama {
            compute_dtype: bf16,
            ..llama::model::cast_frozen_weights(model, FloatDType::BF16)
        },
        (Precision::Bf16, _) => llama::model::cast_weights(model, FloatDType::BF16),
        (Precision::Bf16Mixed, _) => Llama {
            compute_dtype: bf16,
            ..model
        },
    }
}

/// The model to train, as loaded: with the recipe's `[lora]`, fresh adapters (drawn from
/// `seed`) on its target projections and everything else frozen; without, unchanged.
pub fn adapt(recipe: &Recipe, model: Llama, seed: u64) -> Result<Llama> {
    if recipe.lora.is_some() && recipe.model.checkpoint.is_none() {
        // Its checkpoints would point at a base that exists nowhere.
        return Err(TrainError::Invalid(
            "[lora] adapts a pretrained model: set model.checkpoint (a fresh random model is \
             trained in full, without [lora])"
                .into(),
        ));
    }
    attach_adapters(recipe, model, seed)
}

/// The model a benchmark times, as a run of `recipe` would train it: loaded as `[model]` says
/// (a fresh random model may carry LoRA adapters here, where nothing is saved), with the
/// recipe's adapters and dtype.
pub fn bench_model(recipe: &Recipe, device: &Device, head: Head) -> Result<(LlamaConfig, Llama)> {
    let (config, model) = load_model(recipe, device, head)?;
    let model = attach_adapters(recipe, model, recipe.train.seed)?;
    Ok((config, with_precision(recipe, model)))
}

/// `model` with the recipe's `[lora]` adapters drawn fresh from `seed` (none without one).
pub fn attach_adapters(recipe: &Recipe, model: Llama, seed: u64) -> Result<Llama> {
    match &recipe.lora {
        Some(lora) => Ok(llama::lora::attach(
            model,
            &lora.spec(),
            llama::lora::Factors::Fresh(seed),
            None,
        )?),
        None => Ok(model),
    }
}

/// A model a run of `recipe` saved in `dir` (a checkpoint, or a model directory inside one),
/// loaded to train on with the parameter ids its optimizer state refers to: with `[lora]`, the
/// adapters on their base, not merged. A checkpoint saved with LoRA and a recipe without (or
/// the other way round, or with other adapter settings) is refused.
pub fn resume_model(
    recipe: &Recipe,
    dir: &Path,
    device: &Device,
    head: Head,
    ids: &std::collections::HashMap<String, u64>,
) -> Result<(LlamaConfig, Llama)> {
    let is_adapter =
        dir.join(llama::lora::ADAPTER_CONFIG).is_file() && !dir.join("config.json").is_file();
    match (&recipe.lora, is_adapter) {
        (None, false) => Ok(llama::load_pretrained_with_ids(dir, device, Some(ids))?),
        (Some(lora), true) => {
            let saved = llama::lora::read_adapter_config(dir)?;
            let mut targets = saved.target_modules.clone();
            let mut wanted = lora.targets.clone();
            targets.sort();
            wanted.sort();
            if saved.r != lora.rank || saved.lora_alpha != lora.alpha() || targets != wanted {
                return Err(TrainError::Invalid(format!(
                    "{}: the checkpoint's adapters have rank {}, alpha {} and targets {:?}; the \
                     recipe's [lora] has rank {}, alpha {} and targets {:?}: resume with the \
                     settings it was trained with",
                    dir.display(),
                    saved.r,
                    saved.lora_alpha,
                    saved.target_modules,
                    lora.rank,
                    lora.alpha(),
                    lora.targets
                )));
            }
            Ok(llama::checkpoint::load_adapter_dir(
                dir,
                device,
                Some(head),
                Some(ids),
                recipe.train.seed,
                lora.quantize_base,
            )?)
        }
        (Some(_), false) => Err(TrainError::Invalid(format!(
            "{}: this checkpoint holds a fully trained model, not LoRA adapters: resume it with \
             a recipe without [lora]",
            dir.display()
        ))),
        (None, true) => Err(TrainError::Invalid(format!(
            "{}: this checkpoint holds LoRA adapters: resume it with the [lora] section it was \
             trained with",
            dir.display()
        ))),
    }
}

/// Refuses to resume a LoRA checkpoint with another `quantize_base` than it was trained with:
/// the adapters were fitted to that base's rounding.
fn check_resumed_quantization(
    recipe: &Recipe,
    checkpoint: &Path,
    state: &TrainerState,
) -> Result<()> {
    let (Some(trained), Some(lora)) = (state.quantize_base, recipe.lora.as_ref()) else {
        return Ok(());
    };
    if trained != lora.quantize_base {
        return Err(TrainError::Invalid(format!(
            "{}: trained with lora.quantize_base = {}, the recipe says {}; resume with the \
             setting it was trained with",
            checkpoint.display(),
            quant_name(trained),
            quant_name(lora.quantize_base)
        )));
    }
    Ok(())
}

fn quant_name(quant: llama::lora::BaseQuant) -> &'static str {
    match quant {
        llama::lora::BaseQuant::None => "\"none\"",
        llama::lora::BaseQuant::Q8 => "\"q8\"",
        llama::lora::BaseQuant::Q4 => "\"q4\"",
    }
}

/// Refuses to resume a checkpoint with another tokenizer than the one it was trained with
/// (saved beside its weights), which would also be written into the new checkpoints.
fn check_resumed_tokenizer(tokenizer: &Tokenizer, checkpoint: &Path) -> Result<()> {
    let saved = [
        Some(checkpoint.join("tokenizer.json")),
        tokenizer.path.file_name().map(|name| checkpoint.join(name)),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file());
    let Some(saved) = saved else {
        return Ok(());
    };
    if !Tokenizer::from_file(&saved)?.same_vocabulary(tokenizer) {
        return Err(TrainError::Invalid(format!(
            "{}: the recipe's tokenizer differs from the one this checkpoint was trained with \
             ({}); resume with model.tokenizer = that file",
            tokenizer.path.display(),
            saved.display()
        )));
    }
    Ok(())
}

/// Refuses a tokenizer with more tokens than the model's vocabulary (`path`: the model).
pub fn check_vocab(tokenizer: &Tokenizer, config: &LlamaConfig, path: &Path) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(TrainError::Invalid(format!(
            "{}: tokenizer has {} tokens but the model's vocabulary is {}",
            path.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(())
}

/// [`check_vocab`] for a model that generates: an embedding padded past its tokenizer is
/// legitimate, and said once here; generation never picks the ids the tokenizer lacks.
pub fn check_generation_vocab(
    tokenizer: &Tokenizer,
    config: &LlamaConfig,
    path: &Path,
) -> Result<()> {
    check_vocab(tokenizer, config, path)?;
    if tokenizer.vocab_size() < config.vocab_size {
        eprintln!(
            "note: {} has {} tokens and the model's vocabulary {}; ids {} to {} are embedding \
             padding and are never generated",
            path.display(),
            tokenizer.vocab_size(),
            config.vocab_size,
            tokenizer.vocab_size(),
            config.vocab_size - 1
        );
    }
    Ok(())
}
