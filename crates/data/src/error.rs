use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Dialog(String),
}

pub type Result<T> = std::result::Result<T, DataError>;
