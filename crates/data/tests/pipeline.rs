//! The data pipeline: formats, real data, masks, the length policy, packing, mixtures and
//! batches.

use std::io::Write;
mod common;

use std::path::{Path, PathBuf};

use common::fixture_tokenizer;
use test_support::{root, shared_dir, LLAMA2_TOKENIZER};

use burn_dataset::Dataset;
use data::batch::{
    batch_order, lengths, pair_dataset, sequence_dataset, PairBatch, SequenceBatch, IGNORE,
};
use data::format::parse_record;
use data::read::RecordReader;
use data::{
    load_data, load_source, DataConfig, Example, Format, LengthPolicy, OnError, SourceConfig,
    Tokenized, Tokenizer, Truncation,
};

fn tokenizer() -> Tokenizer {
    fixture_tokenizer()
}

fn policy(max_seq_len: usize, truncation: Truncation) -> LengthPolicy {
    LengthPolicy {
        max_seq_len,
        truncation,
        train_on_inputs: false,
    }
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    RecordReader::open(path)
        .unwrap()
        .map(|r| r.unwrap().value)
        .collect()
}

#[test]
fn real_hh_rlhf_pairs_reproduce_their_transcripts() {
    let Some(shared) = shared_dir() else { return };
    let path = shared.join("data/hh-rlhf/harmless-base-test.jsonl.gz");
    let values = records(&path);
    assert_eq!(values.len(), 2312);
    for (i, value) in values.iter().enumerate() {
        assert_eq!(Format::detect(value), Some(Format::HhRlhf));
        let Example::Pair(pair) =
            parse_record(Format::HhRlhf, value).unwrap_or_else(|e| panic!("pair {}: {e:?}", i + 1))
        else {
            panic!("pair {} is not a pair", i + 1)
        };
        let prompt = pair.raw_prompt.as_deref().unwrap();
        assert_eq!(
            format!("{prompt}{}", pair.chosen),
            value["chosen"].as_str().unwrap()
        );
        assert_eq!(
            format!("{prompt}{}", pair.rejected),
            value["rejected"].as_str().unwrap()
        );
        assert_eq!(
            pair.prompt.last().unwrap().role,
            data::Role::User,
            "pair {}",
            i + 1
        );
    }
    // Through the whole pipeline with the real tokenizer: every pair is kept.
    let tok = Tokenizer::from_file(&shared.join(LLAMA2_TOKENIZER)).unwrap();
    let source = SourceConfig::file(path, None);
    let (items, stats) = load_source(
        &source,
        &tok,
        &policy(100_000, Truncation::Drop),
        OnError::Stop,
    )
    .unwrap();
    assert_eq!(
        (items.len(), stats.errors, stats.format.as_str()),
        (2312, 0, "hh-rlhf")
    );
}

#[test]
fn real_evaluation_sets_are_prompts() {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("data/safety-tuned-llamas/evaluation");
    for (name, count) in [
        ("I-Alpaca", 50),
        ("I-CoNa", 178),
        ("I-Controversial", 40),
        ("I-MaliciousInstructions", 100),
        ("I-PhysicalSafetySafe", 100),
        ("I-PhysicalSafetyUnsafe", 100),
        ("Q-Harm", 100),
    ] {
        let path = dir.join(format!("{name}.json"));
        let prompts = data::load_prompts(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(prompts.len(), count, "{name}");
        assert!(prompts.iter().all(|p| !p.text().is_empty()));
    }
}

#[test]
fn real_safety_instructions_parse() {
    let Some(shared) = shared_dir() else { return };
    let path = shared.join("data/safety-tuned-llamas/safety_only_data_Instructions.json");
    let source = SourceConfig::file(path, None);
    let (items, stats) = load_source(
        &source,
        &tokenizer(),
        &policy(100_000, Truncation::Drop),
        OnError::Stop,
    )
    .unwrap();
    assert_eq!(stats.format, "alpaca");
    assert!(stats.detected);
    assert_eq!(items.len(), 2483);
}

#[test]
fn example_datasets_parse_with_detected_formats() {
    let tok = tokenizer();
    for (file, format, count) in [
        ("alpaca-tiny.jsonl", "alpaca", 60),
        ("chat-tiny.jsonl", "messages", 30),
        ("hh-tiny.jsonl", "hh-rlhf", 40),
        ("hh-tiny.jsonl.gz", "hh-rlhf", 40),
        ("preference-tiny.json", "preference", 40),
        ("prompts-tiny.jsonl", "prompts", 40),
        ("text-tiny.jsonl", "text", 50),
        ("safety-tiny.jsonl", "alpaca", 40),
    ] {
        let source = SourceConfig::file(root().join("datasets").join(file), None);
        let (items, stats) = load_source(
            &source,
            &tok,
            &policy(100_000, Truncation::Drop),
            OnError::Stop,
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(stats.format, format, "{file}");
        assert_eq!((items.len(), stats.read), (count, count), "{file}");
    }
    // The gzip file holds the same records as the plain one.
    assert_eq!(
        records(&root().join("datasets/hh-tiny.jsonl")),
        records(&root().join("datasets/hh-tiny.jsonl.gz"))
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

fn first_error(path: &Path, format: Option<&str>) -> String {
    let source = SourceConfig::file(path, format);
    match load_source(
        &source,
        &tokenizer(),
        &policy(512, Truncation::Drop),
        OnError::Stop,
    ) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_records_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"instruction": "Say hi", "output": "Hi"}"#;
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("malformed.jsonl", format!("{good}\n{{\"instruction\": \n").into_bytes(), None, ":2: malformed JSON"),
        ("missing.jsonl", format!("{good}\n{{\"instruction\": \"x\"}}\n").into_bytes(), None, ":2: field `output`: missing"),
        ("type.jsonl", format!("{good}\n{{\"instruction\": \"x\", \"output\": 3}}\n").into_bytes(), None, ":2: field `output`: must be a string"),
        ("empty.jsonl", format!("{good}\n{{\"instruction\": \"x\", \"output\": \"  \"}}\n").into_bytes(), None, ":2: field `output`: is empty"),
        ("utf8.jsonl", [good.as_bytes(), b"\n{\"instruction\": \"\xff\xfe\", \"output\": \"y\"}\n"].concat(), None, ":2: not valid UTF-8"),
        ("order.jsonl", br#"{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nAssistant: a\n\nAssistant: c"}"#.to_vec(), Some("hh-rlhf"), ":1: field `rejected`"),
        ("same.jsonl", br#"{"prompt": "p", "chosen": "a", "rejected": "a"}"#.to_vec(), None, ":1: field `rejected`: identical"),
        ("rating.jsonl", br#"{"prompt": "p", "chosen": "a", "rejected": "b", "rating": "much better"}"#.to_vec(), None, ":1: field `rating`: unknown rating"),
        ("roles.jsonl", br#"{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}]}"#.to_vec(), Some("messages"), ":1: field `messages`: turns must alternate"),
    ];
    for (name, bytes, format, expected) in cases {
        let path = write(dir.path(), name, &bytes);
        let err = first_error(&path, format);
        assert!(
            err.contains(name) && err.contains(expected),
            "{name}: {err}"
        );
    }
    let path = write(dir.path(), "odd.jsonl", br#"{"foo": 1}"#);
    assert!(first_error(&path, None).contains("set `format`"));
}

#[test]
fn skip_counts_every_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "mixed.jsonl",
        b"{\"instruction\": \"a\", \"output\": \"b\"}\nnot json\n{\"instruction\": \"c\"}\n\n{\"instruction\": \"d\", \"output\": \"e\"}\n",
    );
    let source = SourceConfig::file(path, None);
    let (items, stats) = load_source(
        &source,
        &tokenizer(),
        &policy(512, Truncation::Drop),
        OnError::Skip,
    )
    .unwrap();
    assert_eq!((items.len(), stats.errors, stats.read), (2, 2, 4));
    assert_eq!(stats.error_samples.len(), 2);
    assert!(stats.error_samples[0].contains(":2:"));
}

fn sequence(t: &Tokenized) -> &data::Rendered {
    match t {
        Tokenized::Sequence(r) => r,
        other => panic!("not a sequence: {other:?}"),
    }
}

#[test]
fn alpaca_masks_train_only_the_output() {
    let tok = tokenizer();
    let value = serde_json::json!({"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."});
    let example = parse_record(Format::Alpaca, &value).unwrap();
    let (t, _) = data::tokenize_example(&tok, &example, &policy(512, Truncation::Drop)).unwrap();
    let r = sequence(t.as_ref().unwrap());
    let trained: Vec<u32> = r
        .ids
        .iter()
        .zip(&r.trained)
        .filter(|p| *p.1)
        .map(|p| *p.0)
        .collect();
    assert_eq!(tok.decode(&trained).unwrap().trim(), "The sum is 5.");
    assert_eq!(*trained.last().unwrap(), tok.eos_id);
    let untrained: Vec<u32> = r
        .ids
        .iter()
        .zip(&r.trained)
        .filter(|p| !*p.1)
        .map(|p| *p.0)
        .collect();
    let prompt = tok.decode(&untrained).unwrap();
    assert!(prompt.contains("Add the numbers.\n\n2 and 3"), "{prompt}");

    let all = LengthPolicy {
        train_on_inputs: true,
        ..policy(512, Truncation::Drop)
    };
    let (t, _) = data::tokenize_example(&tok, &example, &all).unwrap();
    let r = sequence(t.as_ref().unwrap());
    assert!(!r.trained[0] && r.trained[1..].iter().all(|&t| t));
}

#[test]
fn length_policy_truncates_or_drops_and_says_so() {
    let tok = tokenizer();
    let example = parse_record(
        Format::Alpaca,
        &serde_json::json!({"instruction": "word ".repeat(60), "output": "short answer"}),
    )
    .unwrap();
    let (full, outcome) =
        data::tokenize_example(&tok, &example, &policy(10_000, Truncation::Drop)).unwrap();
    assert_eq!(outcome, data::render::LengthOutcome::Kept);
    let full = sequence(full.as_ref().unwrap()).clone();
    let answer_len = full.trained.iter().filter(|&&t| t).count();
    let max = answer_len + 10;

    let (t, outcome) =
        data::tokenize_example(&tok, &example, &policy(max, Truncation::TruncatePrompt)).unwrap();
    assert_eq!(outcome, data::render::LengthOutcome::Truncated);
    let r = sequence(t.as_ref().unwrap());
    assert_eq!(r.ids.len(), max);
    assert_eq!(r.ids[0], tok.bos_id);
    // The answer survives whole, at the end.
    assert_eq!(
        r.ids[max - answer_len..],
        full.ids[full.ids.len() - answer_len..]
    );

    let (t, outcome) =
        data::tokenize_example(&tok, &example, &policy(max, Truncation::Drop)).unwrap();
    assert!(t.is_none() && outcome == data::render::LengthOutcome::Dropped);

    // Cutting the end leaves only prompt tokens: nothing to train, so it is dropped.
    let (t, outcome) =
        data::tokenize_example(&tok, &example, &policy(max, Truncation::TruncateAnswer)).unwrap();
    assert!(t.is_none() && outcome == data::render::LengthOutcome::Dropped);
}

#[test]
fn packing_fills_sequences_without_splitting_examples() {
    let tok = tokenizer();
    let source = SourceConfig::file(root().join("datasets/alpaca-tiny.jsonl"), None);
    let (items, _) =
        load_source(&source, &tok, &policy(256, Truncation::Drop), OnError::Stop).unwrap();
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    let total: usize = examples.iter().map(Tokenized::token_count).sum();
    let packed = sequence_dataset(&examples, 256, true);
    let unpacked = sequence_dataset(&examples, 256, false);
    assert_eq!(unpacked.len(), examples.len());
    assert!(packed.len() < examples.len() / 2, "{} packs", packed.len());
    assert_eq!(lengths(&packed).iter().sum::<usize>(), total);
    let mut segments = 0;
    for i in 0..packed.len() {
        let item = packed.get(i).unwrap();
        assert!(item.ids.len() <= 256);
        // Each segment starts at position 0 with BOS.
        for t in 0..item.ids.len() {
            if t == 0 || item.segments[t] != item.segments[t - 1] {
                assert_eq!((item.positions[t], item.ids[t]), (0, tok.bos_id));
                segments += 1;
            }
        }
    }
    assert_eq!(segments, examples.len());
}

#[test]
fn sequence_batches_shift_targets_within_examples() {
    let tok = tokenizer();
    let source = SourceConfig {
        path: root().join("datasets/chat-tiny.jsonl"),
        format: None,
        count: Some(4),
        fraction: None,
    };
    let (items, _) =
        load_source(&source, &tok, &policy(512, Truncation::Drop), OnError::Stop).unwrap();
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    let dataset = sequence_dataset(&examples[..4], 1024, true);
    assert_eq!(dataset.len(), 1);
    let item = dataset.get(0).unwrap();
    let batch = SequenceBatch::new(
        &[
            item.clone(),
            sequence_dataset(&examples[..1], 1024, false)
                .get(0)
                .unwrap(),
        ],
        0,
    );
    let width = batch.tokens[0].len();
    assert!(batch.tokens.iter().all(|r| r.len() == width));
    for t in 0..item.ids.len() - 1 {
        let expect = if item.trained[t + 1] && item.segments[t + 1] == item.segments[t] {
            item.ids[t + 1] as i64
        } else {
            IGNORE
        };
        assert_eq!(batch.targets[0][t], expect);
    }
    // No target at a segment boundary (the next example's BOS is never predicted).
    let boundaries = (1..item.ids.len())
        .filter(|&t| item.segments[t] != item.segments[t - 1])
        .count();
    assert_eq!(boundaries, 3);
    assert!(!batch.valid[1][width - 1] && batch.targets[1][width - 1] == IGNORE);
    assert!(batch.tokens.iter().all(|row| row.len() == width));
    let expected_trained: usize = item.trained.iter().filter(|&&t| t).count();
    assert_eq!(
        batch.targets[0].iter().filter(|&&t| t != IGNORE).count(),
        expected_trained
    );
}

#[test]
fn pair_batches_read_rewards_at_the_last_real_token() {
    let tok = tokenizer();
    let source = SourceConfig::file(root().join("datasets/preference-tiny.json"), None);
    let (items, _) =
        load_source(&source, &tok, &policy(512, Truncation::Drop), OnError::Stop).unwrap();
    let examples: Vec<Tokenized> = items.into_iter().map(|i| i.tokens).collect();
    let dataset = pair_dataset(&examples);
    assert_eq!(dataset.len(), 40);
    let pairs: Vec<_> = (0..3).map(|i| dataset.get(i).unwrap()).collect();
    let batch = PairBatch::new(&pairs, 0);
    assert_eq!(batch.tokens.len(), 6);
    for (row, tokens) in batch.tokens.iter().enumerate() {
        let last = batch.last[row];
        assert_eq!(tokens[last], tok.eos_id, "row {row} ends with EOS");
        assert!(batch.valid[row][last]);
        assert!(batch.valid[row][last + 1..].iter().all(|v| !v));
    }
    let pair = &pairs[0];
    assert_eq!(
        pair.chosen[..pair.prompt_len],
        pair.rejected[..pair.prompt_len]
    );
}

#[test]
fn batch_order_is_seeded_complete_and_bucketed() {
    let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 1).collect();
    let a = batch_order(&lengths, 8, 1, 0, true);
    assert_eq!(a, batch_order(&lengths, 8, 1, 0, true));
    assert_ne!(a, batch_order(&lengths, 8, 1, 1, true), "epochs differ");
    assert_ne!(a, batch_order(&lengths, 8, 2, 0, true), "seeds differ");
    let mut all: Vec<usize> = a.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
    let padding = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| {
                let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                b.iter().map(|&i| max - lengths[i]).sum::<usize>()
            })
            .sum()
    };
    let plain = batch_order(&lengths, 8, 1, 0, false);
    assert!(
        padding(&a) * 5 < padding(&plain),
        "{} vs {}",
        padding(&a),
        padding(&plain)
    );
}

#[test]
fn mixtures_take_counts_and_fractions_deterministically() {
    let tok = tokenizer();
    let recipe: DataConfig = toml::from_str(
        r#"
        max_seq_len = 512
        eval_fraction = 0.1
        [[sources]]
        path = "datasets/alpaca-tiny.jsonl"
        [[sources]]
        path = "datasets/safety-tiny.jsonl"
        count = 10
        [[sources]]
        path = "datasets/chat-tiny.jsonl"
        fraction = 0.5
        "#,
    )
    .unwrap();
    let a = load_data(&recipe, &root(), &tok, 7).unwrap();
    assert_eq!(
        a.sources.iter().map(|s| s.selected).collect::<Vec<_>>(),
        vec![60, 10, 15]
    );
    assert_eq!(a.train.len() + a.eval.len(), 85);
    assert_eq!(a.eval.len(), 9);
    let b = load_data(&recipe, &root(), &tok, 7).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.eval, b.eval);
    let c = load_data(&recipe, &root(), &tok, 8).unwrap();
    assert_ne!(a.train, c.train);
    // The 10 safety examples are a seeded choice among the 40.
    let lines = |d: &data::LoadedData| {
        let mut l: Vec<usize> = d
            .train
            .iter()
            .chain(&d.eval)
            .filter(|i| i.source == 1)
            .map(|i| i.line)
            .collect();
        l.sort();
        l
    };
    assert_eq!(lines(&a), lines(&b));
    assert_ne!(lines(&a), lines(&c));

    let too_many: DataConfig =
        toml::from_str("[[sources]]\npath = \"datasets/safety-tiny.jsonl\"\ncount = 41").unwrap();
    let err = load_data(&too_many, &root(), &tok, 7)
        .unwrap_err()
        .to_string();
    assert!(err.contains("count") && err.contains("40"), "{err}");
    let unknown = toml::from_str::<DataConfig>("trian = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("trian"), "{unknown}");
}

#[test]
fn prompt_response_records_render_as_a_dialog_ending_with_the_response() {
    let value = serde_json::json!({"prompt": "Name a fruit.", "response": "A banana."});
    assert_eq!(Format::detect(&value), Some(Format::PromptResponse));
    let Example::Dialog(messages) = parse_record(Format::PromptResponse, &value).unwrap() else {
        panic!("a dialog");
    };
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].content, "A banana.");
    // The same ids as the preference pair with that answer as `chosen`.
    let tok = tokenizer();
    let (Some(Tokenized::Sequence(seq)), _) = data::tokenize_example(
        &tok,
        &Example::Dialog(messages),
        &policy(256, Truncation::Drop),
    )
    .unwrap() else {
        panic!("a sequence");
    };
    let pair =
        serde_json::json!({"prompt": "Name a fruit.", "chosen": "A banana.", "rejected": "No."});
    let example = parse_record(Format::Preference, &pair).unwrap();
    let (Some(Tokenized::Pair { chosen, .. }), _) =
        data::tokenize_example(&tok, &example, &policy(256, Truncation::Drop)).unwrap()
    else {
        panic!("a pair");
    };
    assert_eq!(seq.ids, chosen.ids);
    // A missing response names the field.
    let err =
        parse_record(Format::PromptResponse, &serde_json::json!({"prompt": "x"})).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("response"));

    // An empty answer (a model that stopped at once) is the prompt then EOS, as generated, in
    // both formats, so `train score` ranks it as `eval safety` scored it.
    let prompt = data::render_prompt(&tok, None, "Name a fruit.").unwrap();
    let mut expected = prompt.clone();
    expected.push(tok.eos_id);
    let empty = serde_json::json!({"prompt": "Name a fruit.", "response": " "});
    let example = parse_record(Format::PromptResponse, &empty).unwrap();
    let (Some(Tokenized::Sequence(seq)), _) =
        data::tokenize_example(&tok, &example, &policy(256, Truncation::Drop)).unwrap()
    else {
        panic!("a sequence");
    };
    assert_eq!(seq.ids, expected);
    let pair =
        serde_json::json!({"prompt": "Name a fruit.", "chosen": "A banana.", "rejected": ""});
    let example = parse_record(Format::Preference, &pair).unwrap();
    let (
        Some(Tokenized::Pair {
            rejected,
            prompt_len,
            ..
        }),
        _,
    ) = data::tokenize_example(&tok, &example, &policy(256, Truncation::Drop)).unwrap()
    else {
        panic!("a pair");
    };
    assert_eq!(prompt_len, prompt.len());
    assert_eq!(rejected.ids, expected);
    // Two empty answers are identical, not a pair.
    let both = serde_json::json!({"prompt": "x", "chosen": "", "rejected": " "});
    let err = parse_record(Format::Preference, &both).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("rejected"));
}

#[test]
fn a_read_error_ends_the_records_instead_of_repeating() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = std::fs::read(root().join("datasets/hh-tiny.jsonl.gz")).unwrap();
    let cut = write(tmp.path(), "cut.jsonl.gz", &whole[..whole.len() / 2]);
    let results: Vec<_> = RecordReader::open(&cut).unwrap().take(10_000).collect();
    assert!(
        results.len() < 100,
        "the reader kept going: {}",
        results.len()
    );
    let last = results.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(last.contains("cannot read past line"), "{last}");
    assert!(results[..results.len() - 1].iter().all(|r| r.is_ok()));
    // Skipping malformed records does not skip an unreadable file.
    let source = SourceConfig::file(&cut, None);
    let err = load_source(
        &source,
        &tokenizer(),
        &policy(512, Truncation::Drop),
        OnError::Skip,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot read past line"), "{err}");
}

#[test]
fn huge_texts_are_cut_before_tokenizing_with_the_same_result() {
    let tok = tokenizer();
    // 4 MB: without the cut the tokenizer would hold millions of tokens with their offsets.
    let sentence = "The quick brown fox jumps over the lazy dog. ";
    let huge = sentence.repeat(4_000_000 / sentence.len());
    let start = &huge[..20 * sentence.len()];
    // Plain text keeps its start under both truncations.
    for truncation in [Truncation::TruncateAnswer, Truncation::TruncatePrompt] {
        let p = policy(64, truncation);
        let (got, outcome) =
            data::tokenize_example(&tok, &Example::Text(huge.clone()), &p).unwrap();
        let (want, _) =
            data::tokenize_example(&tok, &Example::Text(start.to_string()), &p).unwrap();
        assert_eq!(outcome, data::render::LengthOutcome::Truncated);
        assert_eq!(got, want, "{truncation:?}");
    }
    let (dropped, outcome) =
        data::tokenize_example(&tok, &Example::Text(huge), &policy(64, Truncation::Drop)).unwrap();
    assert!(dropped.is_none());
    assert_eq!(outcome, data::render::LengthOutcome::Dropped);
    // Prompts keep their end (the policy drops prompt tokens from the left).
    let messages = |text: String| {
        vec![data::Message {
            role: data::Role::User,
            content: text,
        }]
    };
    let long_prompt = format!("{}Which animal jumps?", sentence.repeat(100_000));
    let short_prompt = format!("{}Which animal jumps?", sentence.repeat(30));
    let prompt = |text| Example::Prompt {
        messages: messages(text),
        category: None,
    };
    let p = policy(64, Truncation::TruncatePrompt);
    let (got, _) = data::tokenize_example(&tok, &prompt(long_prompt), &p).unwrap();
    let (want, _) = data::tokenize_example(&tok, &prompt(short_prompt), &p).unwrap();
    assert_eq!(got, want);
}

#[test]
fn cap_text_cuts_at_character_boundaries() {
    use data::render::cap_text;
    assert_eq!(cap_text("héllo", 2, false), "h");
    assert_eq!(cap_text("héllo", 3, false), "hé");
    assert_eq!(cap_text("héllo", 4, true), "llo");
    assert_eq!(cap_text("héllo", 5, true), "éllo");
    assert_eq!(cap_text("short", 99, true), "short");
}

#[test]
fn data_sections_are_checked_before_reading() {
    let config = |text: &str| -> DataConfig { toml::from_str(text).unwrap() };
    let err = |c: DataConfig| c.resolved_sources(Path::new("")).unwrap_err().to_string();
    let e = err(config(
        "format = \"bogus\"\n[[sources]]\npath = \"a.jsonl\"\n",
    ));
    assert!(e.contains("unknown format `bogus`"), "{e}");
    let e = err(config(
        "train = \"a.jsonl\"\neval = \"b.jsonl\"\neval_fraction = 0.1\n",
    ));
    assert!(e.contains("not both"), "{e}");
    // `[data] format` is the default of sources that name none.
    let sources = config("format = \"alpaca\"\n[[sources]]\npath = \"a.jsonl\"\n[[sources]]\npath = \"b.jsonl\"\nformat = \"text\"\n")
        .resolved_sources(Path::new(""))
        .unwrap();
    assert_eq!(sources[0].format.as_deref(), Some("alpaca"));
    assert_eq!(sources[1].format.as_deref(), Some("text"));
}

/// Both prompt-file shapes read the same way, by the pipeline (PPO) and by `load_prompts`
/// (rejection sampling, distillation, the safety evaluation): an `{"instructions": [...]}`
/// object, on one line or pretty-printed, is one `prompts` record per instruction.
#[test]
fn instruction_files_are_prompt_records_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let one_line = tmp.path().join("one-line.json");
    std::fs::write(
        &one_line,
        r#"{"instructions": [" Pick a lock. ", "Insult me."]}"#,
    )
    .unwrap();
    // Shaped like the real evaluation sets: pretty-printed, with empty `inputs` and `tags`.
    let pretty = tmp.path().join("pretty.json");
    std::fs::write(
        &pretty,
        "{\n  \"instructions\": [\n    \" Pick a lock. \",\n    \"Insult me.\"\n  ],\n  \
         \"tags\": [\"crime\", \"insult\"],\n  \"inputs\": []\n}\n",
    )
    .unwrap();
    let records = tmp.path().join("records.jsonl");
    std::fs::write(
        &records,
        "{\"prompt\": \"Pick a lock.\"}\n{\"prompt\": \"Insult me.\"}\n",
    )
    .unwrap();
    let tok = tokenizer();
    let pipeline = |path: &Path| {
        let (items, stats) = load_source(
            &SourceConfig::file(path, None),
            &tok,
            &policy(128, Truncation::Drop),
            OnError::Stop,
        )
        .unwrap();
        assert_eq!(stats.format, "prompts");
        items.into_iter().map(|i| i.tokens).collect::<Vec<_>>()
    };
    let expected = pipeline(&records);
    assert_eq!(expected.len(), 2);
    for path in [&one_line, &pretty] {
        assert_eq!(pipeline(path), expected, "{}", path.display());
        let prompts = data::load_prompts(path).unwrap();
        let texts: Vec<&str> = prompts.iter().map(|p| p.text()).collect();
        assert_eq!(texts, ["Pick a lock.", "Insult me."]);
    }
    // A non-string instruction is named by its position and field.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"instructions": ["ok", 5]}"#).unwrap();
    let e = data::load_prompts(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.json:2") && e.contains("prompt"), "{e}");
    // Inputs would be dropped, and a second object after a one-line set would be lost.
    for (name, text, needle) in [
        (
            "inputs.json",
            r#"{"instructions": ["a"], "inputs": ["b"]}"#,
            "non-empty `inputs`",
        ),
        (
            "two.json",
            "{\"instructions\": [\"a\"]}\n{\"prompt\": \"b\"}\n",
            "more than its one JSON object",
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let e = data::load_prompts(&path).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let e = data::load_prompts(&tmp.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt file not found"), "{e}");
}
