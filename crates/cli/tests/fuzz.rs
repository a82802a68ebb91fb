//! Fuzzing the readers of user files: the shipped recipes, architecture configs, Hugging Face
//! config.json files and example data, randomly truncated, overwritten with random bytes and
//! stripped of random keys. Every outcome must be `Ok` or a one-line error: no panic, and no
//! hang (the whole run has a deadline). Seeded, so a failure reproduces; bounded by a fixed
//! number of cases.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{load_recipe, recipe_files as files};
use data::{load_source, LengthPolicy, OnError, SourceConfig, Tokenizer, Truncation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{fixture_tokenizer_path, golden_dir};

const CASES_PER_FILE: usize = 60;
/// Far above what the cases need (seconds): reaching it means a reader hangs.
const DEADLINE: Duration = Duration::from_secs(300);

/// One mutation of `bytes`: a truncation, random bytes written over it, or (for TOML and JSON
/// text) a random key removed.
fn mutate(bytes: &[u8], kind: &str, rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..3) {
        0 => bytes[..rng.random_range(0..=bytes.len())].to_vec(),
        1 => {
            let mut out = bytes.to_vec();
            for _ in 0..rng.random_range(1..8) {
                if out.is_empty() {
                    break;
                }
                let at = rng.random_range(0..out.len());
                out[at] = rng.random();
            }
            out
        }
        _ => remove_a_key(bytes, kind, rng).unwrap_or_else(|| bytes.to_vec()),
    }
}

fn remove_a_key(bytes: &[u8], kind: &str, rng: &mut StdRng) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    match kind {
        "toml" => {
            let mut table: toml::Table = text.parse().ok()?;
            remove_from_toml(&mut table, rng);
            Some(toml::to_string(&table).ok()?.into_bytes())
        }
        "json" => {
            let mut value: serde_json::Value = serde_json::from_str(text).ok()?;
            remove_from_json(&mut value, rng);
            Some(value.to_string().into_bytes())
        }
        "jsonl" => {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.is_empty() {
                return None;
            }
            let at = rng.random_range(0..lines.len());
            let mut value: serde_json::Value = serde_json::from_str(&lines[at]).ok()?;
            remove_from_json(&mut value, rng);
            lines[at] = value.to_string();
            Some((lines.join("\n") + "\n").into_bytes())
        }
        _ => None,
    }
}

fn remove_from_toml(table: &mut toml::Table, rng: &mut StdRng) {
    let keys: Vec<String> = table.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let key = &keys[rng.random_range(0..keys.len())];
    match table.get_mut(key) {
        Some(toml::Value::Table(inner)) if rng.random_bool(0.7) => remove_from_toml(inner, rng),
        _ => {
            table.remove(key);
        }
    }
}

fn remove_from_json(value: &mut serde_json::Value, rng: &mut StdRng) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            match map.get_mut(key) {
                Some(inner @ (serde_json::Value::Object(_) | serde_json::Value::Array(_)))
                    if rng.random_bool(0.5) =>
                {
                    remove_from_json(inner, rng)
                }
                _ => {
                    map.remove(key);
                }
            }
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            let at = rng.random_range(0..items.len());
            remove_from_json(&mut items[at], rng);
        }
        _ => {}
    }
}

/// Runs `read` on the case, which must not panic, and checks its error is one line.
fn check(case: &str, read: impl FnOnce() -> Result<(), String>) {
    match catch_unwind(AssertUnwindSafe(read)) {
        Ok(Ok(())) => {}
        Ok(Err(message)) => assert!(
            !message.trim().is_empty() && !message.trim().contains('\n'),
            "{case}: not a one-line error: {message:?}"
        ),
        Err(_) => panic!("{case}: panicked"),
    }
}

fn fuzz_all(current: Arc<Mutex<String>>) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = Tokenizer::from_file(&fixture_tokenizer_path()).expect("fixture tokenizer");
    let policy = LengthPolicy {
        max_seq_len: 128,
        truncation: Truncation::TruncatePrompt,
        train_on_inputs: false,
    };
    let mut rng = StdRng::seed_from_u64(12);
    let mut cases = 0;
    let mut inputs: Vec<(PathBuf, &str)> = Vec::new();
    for dir in ["recipes", "tests/fixtures/recipes"] {
        inputs.extend(files(dir, &[".toml"]).into_iter().map(|p| (p, "recipe")));
    }
    inputs.extend(
        files("configs", &[".toml"])
            .into_iter()
            .map(|p| (p, "config")),
    );
    for dir in ["tiny-odd", "golden-tf5/tiny-odd"] {
        inputs.push((golden_dir(dir).join("config.json"), "config"));
    }
    inputs.extend(
        files("datasets", &[".jsonl", ".json", ".jsonl.gz"])
            .into_iter()
            .map(|p| (p, "data")),
    );
    for (path, what) in inputs {
        let original = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let kind = if name.ends_with(".toml") {
            "toml"
        } else if name.ends_with(".jsonl") {
            "jsonl"
        } else if name.ends_with(".json") {
            "json"
        } else {
            "binary"
        };
        for i in 0..CASES_PER_FILE {
            let bytes = mutate(&original, kind, &mut rng);
            let file = tmp.path().join(&name);
            std::fs::write(&file, &bytes).unwrap();
            let case = format!("{name} case {i} ({} bytes)", bytes.len());
            *current.lock().unwrap() = case.clone();
            match what {
                // Read as every command reads recipes: the core alone, and with each
                // method's section.
                "recipe" => {
                    check(&case, || load_recipe::<trainer::recipe::NoSection>(&file));
                    check(&case, || load_recipe::<reward::RewardSection>(&file));
                    check(&case, || load_recipe::<ppo::PpoSection>(&file));
                    check(&case, || {
                        load_recipe::<sampling::rejection_sampling::RsSection>(&file)
                    });
                    check(&case, || {
                        load_recipe::<sampling::distill::DistillSection>(&file)
                    });
                }
                "config" => check(&case, || {
                    llama::load_config(&file)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }),
                _ => {
                    for on_error in [OnError::Stop, OnError::Skip] {
                        check(&case, || {
                            let source = SourceConfig::file(&file, None);
                            load_source(&source, &tokenizer, &policy, on_error)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        });
                    }
                }
            }
            cases += 1;
        }
    }
    cases
}

#[test]
fn readers_never_panic_or_hang_on_mutated_files() {
    let current = Arc::new(Mutex::new(String::from("starting")));
    let (done, finished) = mpsc::channel();
    let shared = Arc::clone(&current);
    std::thread::spawn(move || {
        let result = catch_unwind(AssertUnwindSafe(|| fuzz_all(shared)));
        let _ = done.send(result);
    });
    match finished.recv_timeout(DEADLINE) {
        Ok(Ok(cases)) => assert!(cases > 1000, "only {cases} cases ran"),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!(
            "no answer after {DEADLINE:?}: a reader hangs on {}",
            current.lock().unwrap()
        ),
    }
}
