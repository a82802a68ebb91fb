//! The recipe contract: sections, overrides, path resolution and errors.

use std::path::Path;

use trainer::Recipe;

const MINIMAL: &str = r#"
[model]
config = "configs/tiny.toml"
tokenizer = "tok/tokenizer.json"

[data]
train = "data/train.jsonl"
max_seq_len = 128

[train]
batch_size = 8
micro_batch_size = 2
lr = 2e-5

[output]
dir = "runs/x"
"#;

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn error(text: &str, overrides: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), text);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::load(&path, &overrides).unwrap_err().to_string()
}

#[test]
fn paths_resolve_against_the_recipe_and_defaults_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), MINIMAL);
    let recipe = Recipe::load(&path, &[]).unwrap();
    assert_eq!(
        recipe.model.config.as_deref(),
        Some(tmp.path().join("configs/tiny.toml").as_path())
    );
    assert_eq!(
        recipe.data.train.as_deref(),
        Some(tmp.path().join("data/train.jsonl").as_path())
    );
    assert_eq!(recipe.output.dir, tmp.path().join("runs/x"));
    assert_eq!(recipe.micro_batch_size(), 2);
    assert_eq!(recipe.runtime.device, "flex");
    assert_eq!(recipe.train.epochs, 1);
    // The resolved recipe round-trips through TOML.
    let again: Recipe = toml::from_str(&recipe.to_toml()).unwrap();
    assert_eq!(again, recipe);
}

#[test]
fn overrides_set_any_value_with_its_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), MINIMAL);
    let sets: Vec<String> = [
        "train.lr=1e-5",
        "train.betas=[0.9, 0.95]",
        "runtime.device=tch:cpu",
        "data.packing=true",
        "train.max_steps = 7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let recipe = Recipe::load(&path, &sets).unwrap();
    assert_eq!(recipe.train.lr, 1e-5);
    assert_eq!(recipe.train.betas, [0.9, 0.95]);
    assert_eq!(recipe.runtime.device, "tch:cpu");
    assert!(recipe.data.packing);
    assert_eq!(recipe.train.max_steps, Some(7));
}

#[test]
fn bad_recipes_name_the_key_and_file() {
    let e = error(MINIMAL, &["train.lrr=1"]);
    assert!(e.contains("recipe.toml") && e.contains("lrr"), "{e}");
    let e = error(MINIMAL, &["train.lr=fast"]);
    assert!(e.contains("recipe.toml") && e.contains("lr"), "{e}");
    let e = error(MINIMAL, &["lr=1"]);
    assert!(e.contains("section.key"), "{e}");
    let e = error(&MINIMAL.replace("batch_size = 8", "batch_size = 7"), &[]);
    assert!(e.contains("not divisible"), "{e}");
    let e = error(&MINIMAL.replace("[output]", "[output\n"), &[]);
    assert!(e.contains("recipe.toml") && e.contains("line"), "{e}");
    let e = error(&MINIMAL.replace("config = \"configs/tiny.toml\"", ""), &[]);
    assert!(e.contains("`config` or `checkpoint`"), "{e}");
    let e = error(&format!("{MINIMAL}\n[extra]\nx = 1\n"), &[]);
    assert!(e.contains("extra"), "{e}");
}
