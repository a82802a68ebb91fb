//! The recipes the repository ships (`recipes/`, `experiments/`, the test fixtures): each loads
//! for the command its method section names, and is refused by the others.

mod common;

use std::path::Path;

use common::{load_recipe, recipe_files as files};
use test_support::root;

/// Reads a recipe as one command does.
type Loader = fn(&Path) -> Result<(), String>;

/// Every recipe shipped in `recipes/`, `experiments/` and the test fixtures loads (unmutated)
/// for the command its method section names, and is refused by the others.
#[test]
fn shipped_recipes_load_for_their_command() {
    let mut recipes = Vec::new();
    for dir in ["recipes", "tests/fixtures/recipes"] {
        recipes.extend(files(dir, &[".toml"]));
    }
    for entry in std::fs::read_dir(root().join("experiments")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.is_dir() {
            let relative = dir
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            recipes.extend(files(&relative, &[".toml"]));
        }
    }
    assert!(recipes.len() >= 15, "{recipes:?}");
    for path in recipes {
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let loaders: [(&str, Loader); 6] = [
            ("", load_recipe::<trainer::recipe::NoSection>),
            ("reward", load_recipe::<reward::RewardSection>),
            ("dpo", load_recipe::<dpo::DpoSection>),
            ("ppo", load_recipe::<ppo::PpoSection>),
            ("rs", load_recipe::<sampling::rejection_sampling::RsSection>),
            ("distill", load_recipe::<sampling::distill::DistillSection>),
        ];
        let own = loaders
            .iter()
            .map(|(name, _)| *name)
            .find(|name| table.contains_key(*name))
            .unwrap_or("");
        for (name, load) in loaders {
            let result = load(&path);
            if name == own {
                assert!(result.is_ok(), "{}: {result:?}", path.display());
            } else if !own.is_empty() {
                assert!(result.is_err(), "{} loaded as [{name}]", path.display());
            }
        }
    }
}
