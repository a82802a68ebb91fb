//! `train bench ppo`: PPO iterations timed on a recipe's shapes with random models.

use rand::{Rng, SeedableRng};
use reward::RewardModel;
use trainer::session::{attach_adapters, bench_model, load_model, with_precision};
use trainer::{Recipe, Result};

use crate::iteration::{IterationReport, Models, Ppo, Prompt};
use crate::section::PpoSection;

/// Times PPO iterations on the recipe's shapes with random models: a policy from `[model]`,
/// and a reward model and value model of the same architecture with fresh scalar heads;
/// `train.batch_size` random prompts of `data.max_seq_len` tokens. Returns one report per
/// timed iteration (after one warm-up iteration). A benchmark, not a test.
pub fn bench(
    recipe: &Recipe,
    settings: &PpoSection,
    iterations: usize,
) -> Result<Vec<IterationReport>> {
    let mut settings = settings.clone();
    settings.samples = 0;
    let train = &recipe.train;
    let device = trainer::session::training_device(recipe)?;
    let inner = device.clone().inner();
    let tokenizer = data::Tokenizer::from_file(&recipe.model.tokenizer)?;
    let (config, policy) = bench_model(recipe, &device, llama::Head::Lm)?;
    let reference = match &recipe.lora {
        Some(_) => llama::lora::without_adapters(&burn::module::Module::valid(&policy)),
        None => with_precision(recipe, load_model(recipe, &inner, llama::Head::Lm)?.1),
    };
    let rm = llama::init_random_with_head(&config, &inner, llama::Head::Score, train.seed + 1)?;
    let value = match settings.has_value_model() {
        true => {
            let value =
                llama::init_random_with_head(&config, &device, llama::Head::Score, train.seed + 2)?;
            Some(with_precision(
                recipe,
                attach_adapters(recipe, value, train.seed + 2)?,
            ))
        }
        false => None,
    };
    let models = Models {
        policy,
        value,
        reference,
        helpfulness: Some(RewardModel::new(rm, config.clone())),
        safety: None,
    };
    let mut ppo = Ppo::new(models, &config, train, recipe.micro_batch_size(), settings);
    let mut rng = rand::rngs::StdRng::seed_from_u64(train.seed);
    let prompts: Vec<Prompt> = (0..train.batch_size)
        .map(|_| {
            let mut ids = vec![config.bos_token_id];
            ids.extend(
                (1..recipe.data.max_seq_len).map(|_| rng.random_range(3..config.vocab_size as u32)),
            );
            Prompt {
                ids,
                category: None,
            }
        })
        .collect();
    let mut reports = Vec::new();
    for iteration in 0..=iterations {
        let report = ppo.iteration(&prompts, iteration, &tokenizer)?;
        if iteration > 0 {
            reports.push(report);
        }
    }
    Ok(reports)
}
