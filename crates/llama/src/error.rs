use std::path::PathBuf;

/// Everything that can go wrong while reading, building or writing a Llama model.
/// Each variant names the file (and tensor or field) so a user can find the problem.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The cause is in the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported config field `{field}`: {message}")]
    Unsupported {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// NaN or infinity came out of the model: corrupt weights or an overflow. Generation and
    /// scoring stop rather than print or use garbage.
    #[error("the model computed NaN or infinite {0}; are its weights corrupt?")]
    NonFinite(&'static str),
}

pub type Result<T> = std::result::Result<T, LlamaError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LlamaError {
    let path = path.into();
    move |error| LlamaError::Io { path, error }
}
