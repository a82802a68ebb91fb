//! `tokenizer.model` (a SentencePiece `ModelProto`) to a Hugging Face `tokenizer.json` that
//! encodes as SentencePiece does, for BPE models such as Llama 2's: the pieces as the BPE
//! vocabulary, merges derived from the pieces (a merge for every way a piece splits into two
//! pieces, ranked by the merged piece's score, as SentencePiece's BPE applies them), byte
//! fallback, and the dummy-prefix space as a normalizer.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{DataError, Result};

/// One vocabulary entry of a SentencePiece model.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// The parts of a `ModelProto` the conversion needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
    /// `NormalizerSpec.name` and `remove_extra_whitespaces`: the conversion reproduces only
    /// the identity normalizer that keeps whitespace (Llama's).
    pub normalizer: String,
    pub remove_extra_whitespaces: bool,
}

impl SentencePieceModel {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(&bytes).map_err(|message| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("not a SentencePiece model: {message}"),
        })
    }

    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            // proto2 defaults.
            model_type: 1,
            byte_fallback: false,
            add_dummy_prefix: true,
            normalizer: "nmt_nfkc".into(),
            remove_extra_whitespaces: true,
        };
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(piece)) => model.pieces.push(parse_piece(piece)?),
                (2, Value::Bytes(trainer)) => {
                    for field in Fields::new(trainer) {
                        match field? {
                            (3, Value::Varint(v)) => model.model_type = v,
                            (35, Value::Varint(v)) => model.byte_fallback = v != 0,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(normalizer)) => {
                    for field in Fields::new(normalizer) {
                        match field? {
                            (1, Value::Bytes(name)) => {
                                model.normalizer = String::from_utf8_lossy(name).into_owned()
                            }
                            (3, Value::Varint(v)) => model.add_dummy_prefix = v != 0,
                            (4, Value::Varint(v)) => model.remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces".into());
        }
        Ok(model)
    }

    /// The `tokenizer.json` of this model (BPE models only).
    pub fn to_tokenizer_json(&self) -> std::result::Result<serde_json::Value, String> {
        if self.model_type != 2 {
            return Err(format!(
                "model type {} is not BPE (2); only BPE models such as Llama's convert",
                self.model_type
            ));
        }
        if self.normalizer != "identity" || self.remove_extra_whitespaces {
            return Err(format!(
                "normalizer `{}`{}: only the identity normalizer that keeps whitespace (Llama's) \
                 converts exactly",
                self.normalizer,
                if self.remove_extra_whitespaces {
                    " removing extra whitespace"
                } else {
                    ""
                }
            ));
        }
        if let Some(piece) = self
            .pieces
            .iter()
            .find(|p| p.kind == PieceKind::UserDefined)
        {
            return Err(format!(
                "user-defined piece `{}`: models with user-defined pieces are not supported",
                piece.text
            ));
        }
        let vocab: HashMap<&str, usize> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.text.as_str(), id))
            .collect();
        if vocab.len() != self.pieces.len() {
            return Err("two pieces have the same text".into());
        }
        // Every split of a normal piece into two pieces is a merge; SentencePiece merges the
        // pair whose result scores highest first, so that is the rank (ties: lower ids first,
        // then the shorter left part first).
        let mut merges: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
        for (id, piece) in self.pieces.iter().enumerate() {
            if piece.kind != PieceKind::Normal {
                continue;
            }
            for (split, _) in piece.text.char_indices().skip(1) {
                let (left, right) = piece.text.split_at(split);
                if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                    merges.push((piece.score, id, split, l, r));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges: Vec<[&str; 2]> = merges
            .iter()
            .map(|&(_, _, _, l, r)| [self.pieces[l].text.as_str(), self.pieces[r].text.as_str()])
            .collect();
        let vocab_json: serde_json::Map<String, serde_json::Value> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.text.clone(), id.into()))
            .collect();
        let unk = self
            .pieces
            .iter()
            .find(|p| p.kind == PieceKind::Unknown)
            .map(|p| p.text.clone());
        let added: Vec<serde_json::Value> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.kind, PieceKind::Unknown | PieceKind::Control))
            .map(|(id, p)| {
                serde_json::json!({
                    "id": id, "content": p.text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true,
                })
            })
            .collect();
        let bos = vocab.get("<s>").copied();
        let mut normalizers = Vec::new();
        if self.add_dummy_prefix {
            normalizers.push(serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers.push(serde_json::json!({
            "type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}",
        }));
        let mut decoders = vec![
            serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            serde_json::json!({"type": "ByteFallback"}),
            serde_json::json!({"type": "Fuse"}),
        ];
        if self.add_dummy_prefix {
            decoders
                .push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        // Encoding with special tokens adds BOS, as SentencePiece with `add_bos`.
        let post_processor = bos.map(|id| {
            serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [id], "tokens": ["<s>"]}},
            })
        });
        Ok(serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": post_processor,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": self.byte_fallback,
                "ignore_merges": false,
                "vocab": vocab_json,
                "merges": merges,
            },
        }))
    }
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<Piece, String> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceKind::Normal,
    };
    for field in Fields::new(bytes) {
        match field? {
            (1, Value::Bytes(text)) => {
                piece.text = String::from_utf8(text.to_vec())
                    .map_err(|_| "a piece is not UTF-8".to_string())?
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(kind)) => {
                piece.kind = match kind {
                    1 => PieceKind::Normal,
                    2 => PieceKind::Unknown,
                    3 => PieceKind::Control,
                    4 => PieceKind::UserDefined,
                    5 => PieceKind::Unused,
                    6 => PieceKind::Byte,
                    other => return Err(format!("unknown piece type {other}")),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// A protobuf field's value by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The fields of one protobuf message, in order.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            at: 0,
            failed: false,
        }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or("truncated varint")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, len: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("truncated field")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn field(&mut self) -> std::result::Result<(u64, Value<'a>), String> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "field too long")?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        Ok((key >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = std::result::Result<(u64, Value<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.bytes.len() {
            return None;
        }
        let field = self.field();
        self.failed = field.is_err();
        Some(field)
    }
}
