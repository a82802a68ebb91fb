//! The training core on its own: finding checkpoints, the step arithmetic every loop shares,
//! and a session's setup, start, save and resume, on the tiny test architecture.

use std::path::{Path, PathBuf};

use llama::Head;
use test_support::{fixture_tokenizer_path, root, tiny_test_config};
use trainer::checkpoint::{find_checkpoint, STATE_FILE};
use trainer::session::total_steps;
use trainer::step::{due, EpochBatches};
use trainer::{Recipe, RunOptions, Session};

/// A recipe in `dir` training the tiny architecture on the example SFT data.
fn recipe(dir: &Path, extra: &str) -> Recipe {
    let text = format!(
        r#"
[model]
config = "{config}"
tokenizer = "{tokenizer}"

[data]
train = "{data}"
max_seq_len = 64

[train]
batch_size = 4
lr = 1e-3
{extra}

[output]
dir = "{out}"
"#,
        config = tiny_test_config().display(),
        tokenizer = fixture_tokenizer_path().display(),
        data = root().join("datasets/alpaca-tiny.jsonl").display(),
        out = dir.join("run").display(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    Recipe::load(&path, &[]).unwrap()
}

fn fake_checkpoint(out: &Path, name: &str, with_state: bool) -> PathBuf {
    let dir = out.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    if with_state {
        std::fs::write(dir.join(STATE_FILE), "{}").unwrap();
    }
    dir
}

#[test]
fn latest_checkpoint_is_the_highest_complete_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let e = find_checkpoint(out, "latest").unwrap_err().to_string();
    assert!(e.contains("no checkpoint to resume from"), "{e}");
    fake_checkpoint(out, "checkpoint-2", true);
    fake_checkpoint(out, "checkpoint-10", true);
    // Numeric order (10 > 9 > 2), and only complete checkpoints count.
    fake_checkpoint(out, "checkpoint-9", true);
    fake_checkpoint(out, "checkpoint-12", false);
    fake_checkpoint(out, ".checkpoint-14.partial", true);
    fake_checkpoint(out, "checkpoint-x", true);
    assert_eq!(
        find_checkpoint(out, "latest").unwrap(),
        out.join("checkpoint-10")
    );
    // A named directory must be a checkpoint.
    let named = out.join("checkpoint-2");
    assert_eq!(
        find_checkpoint(out, named.to_str().unwrap()).unwrap(),
        named
    );
    let e = find_checkpoint(out, out.join("checkpoint-12").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a training checkpoint"), "{e}");
}

#[test]
fn steps_epochs_and_batches_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = recipe(tmp.path(), "epochs = 3");
    // 10 items in batches of 4: 3 batches per epoch (the last one short), 3 epochs.
    assert_eq!(total_steps(&r, 10), 9);
    r.train.max_steps = Some(5);
    assert_eq!(total_steps(&r, 10), 5);

    let lengths: Vec<usize> = (0..10).collect();
    let mut batches = EpochBatches::new(lengths.clone(), &r);
    assert_eq!(batches.steps_per_epoch(), 3);
    for epoch in 0..3 {
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|i| {
                let (e, items) = batches.batch(epoch * 3 + i);
                assert_eq!(e, epoch);
                items
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, lengths, "every item once in epoch {epoch}");
    }
    // A resumed run (a fresh order object) sees the same batch at the same step, and the
    // epochs are shuffled differently.
    let mut again = EpochBatches::new(lengths, &r);
    assert_eq!(again.batch(7), batches.batch(7));
    assert_ne!(batches.batch(0).1, batches.batch(3).1);

    // Logging, evaluation and saving: every `every` steps and always at the last.
    let steps: Vec<usize> = (1..=10).filter(|&d| due(d, 4, 10)).collect();
    assert_eq!(steps, vec![4, 8, 10]);
    let only_last: Vec<usize> = (1..=10).filter(|&d| due(d, 0, 10)).collect();
    assert_eq!(only_last, vec![10]);
}

#[test]
fn a_session_starts_saves_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "max_steps = 2\nkeep_last = 1");
    let out = r.output.dir.clone();

    // Setup changes nothing on disk but the lock.
    let mut session = Session::open(&r, &RunOptions::default()).unwrap();
    let data = session.data().unwrap();
    assert!(data.train.len() >= 4);
    session
        .check_one_batch(data.train.len(), "sequences")
        .unwrap();
    let e = session
        .check_one_batch(3, "sequences")
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 sequences, fewer than one batch of 4"), "{e}");
    let (config, model) = session.model(Head::Lm).unwrap();
    assert!(!out.join("recipe.toml").exists());

    let (mut run, optimizer) = session.start(data.train.len()).unwrap().unwrap();
    assert_eq!((run.start, run.total), (0, 2));
    assert!(out.join("recipe.toml").exists() && out.join(".train-run").exists());
    run.log("train", 1, &[("loss", 1.5)]).unwrap();
    let first = run
        .save(1, &model, &config, &optimizer, |_, _| Ok(()))
        .unwrap();
    let second = run
        .save(2, &model, &config, &optimizer, |dir, state| {
            state.extra = serde_json::json!({"note": "kept"});
            std::fs::write(dir.join("more.txt"), "x").map_err(trainer::io_err(dir))
        })
        .unwrap();
    // keep_last = 1 removed the first.
    assert!(!first.exists() && second.join("more.txt").exists());
    run.finish(&second);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");

    // Resuming the finished run: its state is read back, and there is nothing to do.
    let resume = RunOptions {
        overwrite: false,
        resume: Some("latest".into()),
    };
    let mut session = Session::open(&r, &resume).unwrap();
    assert_eq!(session.resume.as_deref(), Some(second.as_path()));
    session.model(Head::Lm).unwrap();
    let state = session.state.clone().unwrap();
    assert_eq!((state.step, state.total_steps), (2, 2));
    assert_eq!(state.extra["note"], "kept");
    assert!(session.start(data.train.len()).unwrap().is_none());

    // Raised to 3 steps, the run starts at step 2 and keeps its metrics up to there.
    let mut longer = r.clone();
    longer.train.max_steps = Some(3);
    let mut session = Session::open(&longer, &resume).unwrap();
    session.model(Head::Lm).unwrap();
    let (run, _) = session.start(data.train.len()).unwrap().unwrap();
    assert_eq!((run.start, run.total), (2, 3));
    drop(run);

    // A second run on a directory in use is refused; a fresh one needs --overwrite.
    let held = Session::open(&r, &RunOptions::default());
    let e = held.err().unwrap().to_string();
    assert!(e.contains("use --overwrite"), "{e}");
    let _lock = Session::open(
        &r,
        &RunOptions {
            overwrite: true,
            resume: None,
        },
    )
    .unwrap();
    let e = Session::open(&r, &resume).err().unwrap().to_string();
    assert!(e.contains("in use by another run"), "{e}");
}
