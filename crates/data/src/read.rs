//! Reading records from JSON Lines or JSON array files, gzip-compressed or not. The layout is
//! recognised from the content, not the file name.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{io_err, DataError, Result};

/// One record and where it came from. `line` is 1-based: the line of a JSON Lines file, or the
/// element number of a JSON array.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub line: usize,
    pub value: serde_json::Value,
}

/// Records of a file, in order. Malformed records are returned as errors in place so the caller
/// can stop or skip and count them.
pub struct RecordReader {
    path: PathBuf,
    inner: Inner,
}

enum Inner {
    Lines {
        reader: Box<dyn BufRead>,
        line: usize,
    },
    Array(std::vec::IntoIter<serde_json::Value>, usize),
}

fn open_decoded(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    let file = File::open(path).map_err(io_err(path))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

impl RecordReader {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(DataError::File {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        let mut reader = open_decoded(path)?;
        // Peek at the first non-blank byte: `[` starts a JSON array.
        let first = loop {
            let buf = reader.fill_buf().map_err(|e| DataError::File {
                path: path.to_path_buf(),
                message: format!("cannot read (corrupt gzip?): {e}"),
            })?;
            if buf.is_empty() {
                break None;
            }
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => break Some(buf[i]),
                None => {
                    let len = buf.len();
                    reader.consume(len);
                }
            }
        };
        let inner = if first == Some(b'{') {
            match instructions(path)? {
                Some(values) => Inner::Array(values.into_iter(), 0),
                None => Inner::Lines {
                    reader: open_decoded(path)?,
                    line: 0,
                },
            }
        } else if first == Some(b'[') {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(io_err(path))?;
            let text = String::from_utf8(bytes).map_err(|e| DataError::File {
                path: path.to_path_buf(),
                message: format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
            })?;
            let values: Vec<serde_json::Value> =
                serde_json::from_str(&text).map_err(|e| DataError::Record {
                    path: path.to_path_buf(),
                    line: e.line(),
                    field: None,
                    message: format!("malformed JSON array: {e}"),
                })?;
            Inner::Array(values.into_iter(), 0)
        } else {
            // Reopen: the peek consumed leading blank lines, which would shift line numbers.
            Inner::Lines {
                reader: open_decoded(path)?,
                line: 0,
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The most of a file read whole to see whether it is one pretty-printed `instructions` object;
/// the evaluation sets are a few kilobytes, and a larger file is JSON Lines.
const INSTRUCTIONS_MAX_BYTES: u64 = 16 << 20;

/// A file holding one JSON object with an `instructions` list (the Safety-Tuned LLaMAs prompt
/// sets, on one line or pretty-printed; their other keys, `inputs` (always empty) and `tags`,
/// are not prompts), as `{"prompt": instruction}` records; `None` for anything else (JSON Lines,
/// read normally).
fn instructions(path: &Path) -> Result<Option<Vec<serde_json::Value>>> {
    let mut reader = open_decoded(path)?;
    let mut first_line = Vec::new();
    if reader.read_until(b'\n', &mut first_line).is_err() {
        // Reported by the line reader, with the line.
        return Ok(None);
    }
    let value = match serde_json::from_slice::<serde_json::Value>(&first_line) {
        Ok(value) => {
            if value.get("instructions").is_some() {
                // One object on its first line: nothing may follow.
                let mut rest = Vec::new();
                let read = (&mut reader)
                    .take(INSTRUCTIONS_MAX_BYTES)
                    .read_to_end(&mut rest);
                if read.is_err() || rest.iter().any(|b| !b.is_ascii_whitespace()) {
                    return Err(instructions_error(
                        path,
                        "holds more than its one JSON object",
                    ));
                }
            }
            value
        }
        Err(_) => {
            let mut whole = first_line;
            let read = (&mut reader)
                .take(INSTRUCTIONS_MAX_BYTES)
                .read_to_end(&mut whole);
            match read.ok().and_then(|_| serde_json::from_slice(&whole).ok()) {
                Some(value) => value,
                None => return Ok(None),
            }
        }
    };
    let Some(list) = value.get("instructions").and_then(|v| v.as_array()) else {
        return Ok(None);
    };
    let inputs = value.get("inputs").and_then(|v| v.as_array());
    if inputs.is_some_and(|inputs| inputs.iter().any(|i| i.as_str() != Some(""))) {
        return Err(instructions_error(
            path,
            "has non-empty `inputs`, which are not read (only `instructions` are prompts)",
        ));
    }
    Ok(Some(
        list.iter()
            // Trimmed as the sets are read everywhere; a non-string is left for the prompt
            // parser to name.
            .map(|v| serde_json::json!({ "prompt": v.as_str().map_or(v.clone(), |s| s.trim().into()) }))
            .collect(),
    ))
}

fn instructions_error(path: &Path, what: &str) -> DataError {
    DataError::File {
        path: path.to_path_buf(),
        message: format!("an `instructions` file {what}"),
    }
}

impl Iterator for RecordReader {
    type Item = Result<RawRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Array(values, index) => {
                let value = values.next()?;
                *index += 1;
                Some(Ok(RawRecord {
                    line: *index,
                    value,
                }))
            }
            Inner::Lines { reader, line } => loop {
                let mut bytes = Vec::new();
                match reader.read_until(b'\n', &mut bytes) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => {
                        // The stream cannot go on (a corrupt or truncated gzip keeps failing
                        // at the same place): end here, so a caller that skips bad records
                        // does not read the same error forever.
                        let message = format!(
                            "cannot read past line {line} (corrupt or truncated file?): {e}"
                        );
                        self.inner = Inner::Array(Vec::new().into_iter(), 0);
                        return Some(Err(DataError::File {
                            path: self.path.clone(),
                            message,
                        }));
                    }
                }
                *line += 1;
                let record_error = |message: String| DataError::Record {
                    path: self.path.clone(),
                    line: *line,
                    field: None,
                    message,
                };
                let text = match std::str::from_utf8(&bytes) {
                    Ok(text) => text,
                    Err(e) => {
                        return Some(Err(record_error(format!(
                            "not valid UTF-8 (at byte {} of the line)",
                            e.valid_up_to()
                        ))))
                    }
                };
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(text)
                        .map(|value| RawRecord { line: *line, value })
                        .map_err(|e| record_error(format!("malformed JSON: {e}"))),
                );
            },
        }
    }
}
