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
    let again: Recipe = toml::from_str(&recipe.to_toml().unwrap()).unwrap();
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
    // A key or value given with --set is blamed on that --set, not on the file.
    let e = error(MINIMAL, &["train.lrr=1"]);
    assert!(
        e.starts_with("--set train.lrr=1: ") && e.contains("lrr"),
        "{e}"
    );
    let e = error(MINIMAL, &["train.lr=fast"]);
    assert!(
        e.starts_with("--set train.lr=fast: ") && e.contains("invalid type"),
        "{e}"
    );
    let e = error(&MINIMAL.replace("lr = 2e-5", "lrr = 2e-5"), &[]);
    assert!(e.contains("recipe.toml") && e.contains("lrr"), "{e}");
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

#[test]
fn optimizer_values_are_range_checked_and_blamed_on_set() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), MINIMAL);
    let err = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        Recipe::load(&path, &set).unwrap_err().to_string()
    };
    for (set, needle) in [
        (
            "train.grad_clip=-1",
            "--set train.grad_clip=-1: [train] `grad_clip` must be >= 0",
        ),
        ("train.grad_clip=nan", "`grad_clip` must be >= 0"),
        (
            "train.betas=[0.9, 1.0]",
            "--set train.betas=[0.9, 1.0]: [train] `betas`",
        ),
        (
            "train.eps=0.0",
            "--set train.eps=0.0: [train] `eps` must be a positive number",
        ),
        ("train.weight_decay=-0.1", "`weight_decay` must be >= 0"),
        (
            "train.max_steps=0",
            "--set train.max_steps=0: [train] `max_steps` must be >= 1",
        ),
        ("train.lr=\"fast\"", "--set train.lr=\"fast\": invalid type"),
        (
            "data.format=\"bogus\"",
            "--set data.format=\"bogus\": [data] `format`: unknown format",
        ),
    ] {
        let e = err(&[set]);
        assert!(e.contains(needle), "{set}: {e}");
    }
    let e = err(&["data.eval=\"e.jsonl\"", "data.eval_fraction=0.1"]);
    assert!(
        e.starts_with("--set data.eval=") && e.contains("give `eval` or `eval_fraction`, not both"),
        "{e}"
    );
    // grad_clip = 0 is allowed: it turns clipping off.
    let zero = Recipe::load(&path, &["train.grad_clip=0".to_string()]);
    assert!(zero.is_ok(), "{:?}", zero.err());
    // A value that is wrong in the file itself is blamed on the file.
    let bad = write(
        tmp.path(),
        &MINIMAL.replace("lr = 2e-5", "lr = 2e-5\neps = 0.0"),
    );
    let e = Recipe::load(&bad, &[]).unwrap_err().to_string();
    assert!(
        e.starts_with(&bad.display().to_string()) && e.contains("`eps`"),
        "{e}"
    );
}

#[test]
fn output_lock_excludes_other_runs_and_guards_foreign_directories() {
    use trainer::output::OutputLock;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let held = OutputLock::acquire(&dir).unwrap();
    let err = OutputLock::acquire(&dir).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "in use by another run (pid {})",
            std::process::id()
        )),
        "{err}"
    );
    // Unmarked and empty: replaceable; with a user's file and no marker: never.
    held.check_replaceable(false, "").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    assert!(held
        .check_replaceable(false, "hint")
        .unwrap_err()
        .to_string()
        .contains("holds another run (hint)"));
    assert!(held
        .clear()
        .unwrap_err()
        .to_string()
        .contains("no run of `train`"));
    assert!(dir.join("notes.txt").exists());
    held.mark().unwrap();
    held.clear().unwrap();
    assert!(!dir.join("notes.txt").exists() && dir.join(".lock").exists());
    // Partial checkpoints of killed saves go; finished checkpoints stay.
    for name in [
        ".checkpoint-4.partial",
        "..checkpoint-4.partial.partial-99",
        "checkpoint-2",
    ] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
    }
    assert_eq!(held.remove_stale_partials().unwrap(), 2);
    assert!(dir.join("checkpoint-2").exists());
    drop(held);
    // Released on drop; a directory created by a run that never started is removed again.
    let fresh = tmp.path().join("fresh");
    drop(OutputLock::acquire(&fresh).unwrap());
    assert!(!fresh.exists());
    let again = OutputLock::acquire(&dir).unwrap();
    drop(again);
    assert!(
        dir.join("checkpoint-2").exists(),
        "an existing run directory stays"
    );
}

/// A method's section as the core carries it: read after `--set`, paths resolved, checked,
/// blamed on the `--set` that broke it, and written back into `recipe.toml`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSection {
    model: std::path::PathBuf,
    #[serde(default)]
    rate: f64,
}

impl trainer::Section for TestSection {
    const NAME: &'static str = "method";

    fn resolve_paths(&mut self, resolve: &mut dyn FnMut(&mut std::path::PathBuf)) {
        resolve(&mut self.model);
    }

    fn validate(&self) -> Result<(), String> {
        if self.rate < 0.0 {
            return Err("[method] `rate` must be >= 0".into());
        }
        Ok(())
    }
}

#[test]
fn a_method_section_is_carried_checked_and_blamed() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!("{MINIMAL}\n[method]\nmodel = \"../models/rm\"\nrate = 0.5\n");
    let path = write(tmp.path(), &text);
    let (recipe, section) = Recipe::load_with::<TestSection>(&path, &[]).unwrap();
    let section = section.unwrap();
    // Relative to the recipe, with `..` resolved.
    let parent = tmp.path().parent().unwrap();
    assert_eq!(section.model, parent.join("models/rm"));
    assert_eq!(recipe.output.dir, tmp.path().join("runs/x"));
    // recipe.toml holds the section with its resolved path, and reads back the same.
    let saved = tmp.path().join("saved.toml");
    std::fs::write(&saved, recipe.to_toml().unwrap()).unwrap();
    let (again, again_section) = Recipe::load_with::<TestSection>(&saved, &[]).unwrap();
    assert_eq!((again, again_section.unwrap()), (recipe, section));

    let err = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        Recipe::load_with::<TestSection>(&path, &set)
            .unwrap_err()
            .to_string()
    };
    let e = err(&["method.rate=-1.0"]);
    assert!(
        e.starts_with("--set method.rate=-1.0: [method] `rate`"),
        "{e}"
    );
    let e = err(&["method.speed=2"]);
    assert!(
        e.starts_with("--set method.speed=2: [method]") && e.contains("speed"),
        "{e}"
    );
    // Without the method, the section is an unknown one; a recipe may also lack it.
    let e = Recipe::load(&path, &[]).unwrap_err().to_string();
    assert!(e.contains("method"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let plain = write(other.path(), MINIMAL);
    assert!(Recipe::load_with::<TestSection>(&plain, &[])
        .unwrap()
        .1
        .is_none());
    assert!(Recipe::load_any(&path, &[]).is_ok());
}
