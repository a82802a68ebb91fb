use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Dialog(String),
    /// The cause is in the message, not a `source`: `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A problem with one record: file, line (1-based; the element number for JSON arrays)
    /// and, where known, the field.
    #[error("{}", record_message(path, *line, field.as_deref(), message))]
    Record {
        path: PathBuf,
        line: usize,
        field: Option<String>,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn record_message(
    path: &std::path::Path,
    line: usize,
    field: Option<&str>,
    message: &str,
) -> String {
    match field {
        Some(field) => format!("{}:{line}: field `{field}`: {message}", path.display()),
        None => format!("{}:{line}: {message}", path.display()),
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |error| DataError::Io { path, error }
}
