//! The tokenizer: a Hugging Face `tokenizer.json` loaded with the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub path: PathBuf,
    /// Bytes of the longest vocabulary entry: no token covers more text than this.
    max_token_bytes: usize,
}

impl Tokenizer {
    /// Loads `tokenizer.json`. Control tokens (`<s>`, `</s>`) written in user text are encoded
    /// as plain text, as SentencePiece does: only our code inserts BOS/EOS, by id.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        Self::from_inner(inner, path)
    }

    /// A `tokenizer.json` held in memory; `path` names it in errors.
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        Self::from_inner(inner, path)
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, path: &Path) -> Result<Self> {
        inner.set_encode_special_tokens(true);
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| DataError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("vocabulary has no `{token}` token"),
                })
        };
        let bos_id = id("<s>")?;
        let eos_id = id("</s>")?;
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            path: path.to_path_buf(),
            max_token_bytes,
        })
    }

    /// Bytes of the longest vocabulary entry (its text as stored, e.g. `▁` as 3 bytes): an
    /// upper bound on the input bytes one token covers.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Whether two tokenizers map the same strings to the same ids (so one model's token ids
    /// mean the same to the other).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.bos_id == other.bos_id
            && self.eos_id == other.eos_id
            && self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// Number of ids the tokenizer can produce (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text without adding any special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(&self.inner, text)
    }

    /// Encodes text as `transformers` encodes a rendered chat template: `<s>`, `</s>` (and any
    /// other special token) written in the text are the special tokens, not text.
    pub fn encode_parsing_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut inner = self.inner.clone();
        inner.set_encode_special_tokens(false);
        self.encode_with(&inner, text)
    }

    fn encode_with(&self, inner: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
        let encoding = inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: format!("encoding failed: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of token `id` if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of `token` if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// BOS followed by the text's ids: what SentencePiece gives with `add_bos=True`.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: format!("decoding failed: {e}"),
            })
    }
}
