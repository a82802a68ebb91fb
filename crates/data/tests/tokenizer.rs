//! The tokenizer against SentencePiece ids, and the Llama 2 chat template.

mod common;

use common::fixture_tokenizer;
use test_support::{shared_dir, LLAMA2_TOKENIZER};

use data::{render_dialog, render_prompt, Message, Role, Tokenizer};

fn llama_tokenizer() -> Option<Tokenizer> {
    let dir = shared_dir()?;
    Some(Tokenizer::from_file(&dir.join(LLAMA2_TOKENIZER)).expect("tokenizer"))
}

#[test]
fn every_reference_line_matches_sentencepiece() {
    let Some(tokenizer) = llama_tokenizer() else {
        return;
    };
    let dir = shared_dir().unwrap();
    let text = std::fs::read_to_string(dir.join("tokenizers/llama2/reference_ids.jsonl")).unwrap();
    let mut checked = 0;
    for (n, line) in text.lines().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let expected: Vec<u32> = record["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer
            .encode_with_bos(record["text"].as_str().unwrap())
            .unwrap();
        assert_eq!(got, expected, "line {}", n + 1);
        checked += 1;
    }
    assert_eq!(checked, 210);
}

#[test]
fn control_token_text_is_not_a_control_token() {
    let Some(tokenizer) = llama_tokenizer() else {
        return;
    };
    let ids = tokenizer.encode("hello </s> <s> world").unwrap();
    assert!(!ids.contains(&1) && !ids.contains(&2), "{ids:?}");
    let fixture = fixture_tokenizer();
    let ids = fixture.encode("x </s> y <s>").unwrap();
    assert!(!ids.contains(&1) && !ids.contains(&2), "{ids:?}");
}

#[test]
fn chat_template_equals_meta_reference_encoding() {
    // Meta's reference code encodes each turn as one string:
    //   bos + "[INST] {user} [/INST] {answer} " + eos, and the last user turn without answer.
    // Our per-segment encoding must give the same ids.
    let Some(tok) = llama_tokenizer() else { return };
    let system = "You are a helpful, respectful and honest assistant.";
    let dialog = vec![
        Message::new(Role::System, system),
        Message::new(Role::User, "What is the capital of France?"),
        Message::new(Role::Assistant, "Paris. It has been the capital since 987."),
        Message::new(Role::User, "And of Italy? Answer in one word, please."),
        Message::new(Role::Assistant, "Rome!"),
        Message::new(Role::User, "Thanks :)"),
    ];
    let rendered = render_dialog(&tok, &dialog).unwrap();
    let mut expected = Vec::new();
    let first = format!("<<SYS>>\n{system}\n<</SYS>>\n\nWhat is the capital of France?");
    for (user, answer) in [
        (first.as_str(), "Paris. It has been the capital since 987."),
        ("And of Italy? Answer in one word, please.", "Rome!"),
    ] {
        expected.extend(
            tok.encode_with_bos(&format!("[INST] {user} [/INST] {answer} "))
                .unwrap(),
        );
        expected.push(tok.eos_id);
    }
    expected.extend(tok.encode_with_bos("[INST] Thanks :) [/INST]").unwrap());
    assert_eq!(rendered.ids, expected);
    // The prompt helper is the same as a one-turn dialog.
    let prompt = render_prompt(&tok, Some(system), "Hi").unwrap();
    assert_eq!(
        prompt,
        tok.encode_with_bos(&format!("[INST] <<SYS>>\n{system}\n<</SYS>>\n\nHi [/INST]"))
            .unwrap()
    );
}

#[test]
fn only_answer_tokens_are_trained() {
    let tok = fixture_tokenizer();
    let dialog = vec![
        Message::new(Role::User, "Say hi."),
        Message::new(Role::Assistant, "Hi there."),
        Message::new(Role::User, "Again."),
        Message::new(Role::Assistant, "Hi."),
    ];
    let r = render_dialog(&tok, &dialog).unwrap();
    assert_eq!(r.ids.len(), r.trained.len());
    // Two BOS (untrained) and two EOS (trained), placed by id.
    let bos: Vec<usize> = (0..r.ids.len())
        .filter(|&i| r.ids[i] == tok.bos_id)
        .collect();
    let eos: Vec<usize> = (0..r.ids.len())
        .filter(|&i| r.ids[i] == tok.eos_id)
        .collect();
    assert_eq!(bos.len(), 2);
    assert_eq!(eos, vec![bos[1] - 1, r.ids.len() - 1]);
    assert!(bos.iter().all(|&i| !r.trained[i]));
    assert!(eos.iter().all(|&i| r.trained[i]));
    // The trained spans decode to exactly the answers.
    let spans: Vec<String> = split_runs(&r.ids, &r.trained)
        .into_iter()
        .map(|ids| tok.decode(&ids).unwrap().trim().to_string())
        .collect();
    assert_eq!(spans, vec!["Hi there.", "Hi."]);
    assert!(!r.trained[0]);
}

fn split_runs(ids: &[u32], trained: &[bool]) -> Vec<Vec<u32>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &t) in ids.iter().zip(trained) {
        if t {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

#[test]
fn system_block_only_in_first_turn_and_roles_checked() {
    let tok = fixture_tokenizer();
    let with = render_dialog(
        &tok,
        &[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "One"),
            Message::new(Role::Assistant, "A"),
            Message::new(Role::User, "Two"),
        ],
    )
    .unwrap();
    let text = tok.decode(&with.ids).unwrap();
    assert_eq!(text.matches("<<SYS>>").count(), 1, "{text}");
    assert!(text.find("<<SYS>>").unwrap() < text.find("One").unwrap());
    let err = render_dialog(&tok, &[Message::new(Role::Assistant, "x")]).unwrap_err();
    assert!(err.to_string().contains("user"), "{err}");
    let err = render_dialog(
        &tok,
        &[Message::new(Role::User, "x"), Message::new(Role::User, "y")],
    )
    .unwrap_err();
    assert!(err.to_string().contains("assistant"), "{err}");
}

#[test]
fn fixture_tokenizer_round_trips() {
    let tok = fixture_tokenizer();
    assert_eq!(tok.bos_id, 1);
    assert_eq!(tok.eos_id, 2);
    assert!(tok.vocab_size() <= 512);
    for text in ["Once upon a time, a cat sat.", "Café 日本 🚀", "  spaces  "] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

/// `tokenizer.json` built from Llama 2's `tokenizer.model` (what `train convert --meta` writes)
/// gives SentencePiece's ids on every reference line, decodes them back, and has the same
/// vocabulary and merges as the SentencePiece-exact `tokenizer.json` in ../shared.
#[test]
fn tokenizer_json_built_from_tokenizer_model_matches_sentencepiece() {
    use data::sentencepiece::SentencePieceModel;
    let Some(dir) = shared_dir() else {
        return;
    };
    let model = SentencePieceModel::from_file(&dir.join("tokenizers/llama2/tokenizer.model"))
        .expect("parse tokenizer.model");
    assert_eq!(model.pieces.len(), 32000);
    let json = model.to_tokenizer_json().expect("convert");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let built = Tokenizer::from_file(&path).expect("load the built tokenizer");
    let text = std::fs::read_to_string(dir.join("tokenizers/llama2/reference_ids.jsonl")).unwrap();
    let mut checked = 0;
    for (n, line) in text.lines().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let expected: Vec<u32> = test_support::json_u64s(&record["ids"])
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let text = record["text"].as_str().unwrap();
        assert_eq!(
            built.encode_with_bos(text).unwrap(),
            expected,
            "line {}",
            n + 1
        );
        checked += 1;
    }
    assert_eq!(checked, 210);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(LLAMA2_TOKENIZER)).unwrap())
            .unwrap();
    assert_eq!(json["model"]["vocab"], reference["model"]["vocab"]);
    let ours = json["model"]["merges"].as_array().unwrap();
    let theirs = reference["model"]["merges"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let first_difference = ours.iter().zip(theirs).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "merges differ");
    for key in [
        "normalizer",
        "pre_tokenizer",
        "decoder",
        "added_tokens",
        "post_processor",
    ] {
        assert_eq!(json[key], reference[key], "{key}");
    }
    // Not a SentencePiece model: one line, no panic.
    let err = SentencePieceModel::parse(b"\x0a\xff\xff\xff\xff\x0f").unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    assert!(SentencePieceModel::parse(b"").is_err());
}

/// The exported tokenizer config keeps the source's other settings, names the pad token by the
/// model's pad id, and declares the byte-level fixture tokenizer as a plain fast tokenizer
/// whose answers follow `[/INST]` without a space (its encoding has no leading-space pieces).
#[test]
fn exported_tokenizer_config_keeps_source_settings_and_pad_token() {
    let tokenizer = fixture_tokenizer();
    assert_eq!(
        data::chat::template_answer_separator(&tokenizer).unwrap(),
        Some("")
    );
    let base = serde_json::json!({"padding_side": "left", "chat_template": "old", "legacy": false});
    let (config, special) = data::chat::hf_tokenizer_configs(&tokenizer, 64, Some(0), Some(base))
        .unwrap()
        .expect("a template for the fixture tokenizer");
    assert_eq!(config["padding_side"], "left");
    assert_eq!(config["pad_token"], "<unk>");
    assert_eq!(special["pad_token"], "<unk>");
    assert_eq!(config["model_max_length"], 64);
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert!(config.get("legacy").is_none());
    let template = config["chat_template"].as_str().unwrap();
    assert!(
        template.contains("{{- '' + message['content'].strip()"),
        "{template}"
    );
    if let Some(llama) = llama_tokenizer() {
        assert_eq!(
            data::chat::template_answer_separator(&llama).unwrap(),
            Some(" ")
        );
        let (config, _) = data::chat::hf_tokenizer_configs(&llama, 4096, None, None)
            .unwrap()
            .unwrap();
        assert_eq!(config["legacy"], true);
        assert_eq!(config["pad_token"], serde_json::Value::Null);
    }
}
