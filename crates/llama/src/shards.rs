//! The safetensors files of a checkpoint directory (one file, or shards listed in
//! `model.safetensors.index.json`), read tensor by tensor as f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::error::{io_err, LlamaError, Result};

/// Tensors some exporters leave in checkpoints that carry no learned weights.
pub(crate) fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// The safetensors files of a checkpoint directory, memory-mapped so a 13 GB model is read from
/// the page cache instead of being copied into memory first.
pub struct SafetensorsDir {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LlamaError::Config {
                    path: index_path.clone(),
                    message: format!("not valid JSON: {e}"),
                })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LlamaError::Config {
                    path: index_path.clone(),
                    message: "missing object field `weight_map`".into(),
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(LlamaError::Config {
                path: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json in this directory"
                    .into(),
            });
        };
        Self::from_paths(paths)
    }

    /// One safetensors file (an adapter's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(LlamaError::Config {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        Self::from_paths(vec![path.to_path_buf()])
    }

    fn from_paths(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the file is opened read-only; a checkpoint modified while we read it is
            // a user error that at worst yields wrong numbers, as with any reader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| LlamaError::Safetensors {
                path: path.clone(),
                message: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
            for name in tensors.names() {
                index.insert(name.to_string(), i);
            }
            drop(tensors);
            files.push((path, mmap));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's shape, if the directory holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (_, mmap) = &self.files[*self.index.get(name)?];
        let tensors = SafeTensors::deserialize(mmap).ok()?;
        tensors.tensor(name).ok().map(|view| view.shape().to_vec())
    }

    /// The file a tensor would be read from (or the directory's first file), for messages.
    pub(crate) fn file_for(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.files[i].0
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(&i) = self.index.get(name) else {
            return Err(LlamaError::MissingTensor {
                path: self.file_for(name).to_path_buf(),
                name: name.to_string(),
            });
        };
        let (path, mmap) = &self.files[i];
        let tensors = SafeTensors::deserialize(mmap).map_err(|e| LlamaError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = tensors.tensor(name).map_err(|e| LlamaError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(LlamaError::Shape {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        decode_f32(view.dtype(), view.data()).ok_or_else(|| LlamaError::Safetensors {
            path: path.clone(),
            message: format!(
                "tensor `{name}` has dtype {:?}; only F32, F16 and BF16 are supported",
                view.dtype()
            ),
        })
    }
}

fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let pairs = || bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => pairs()
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::BF16 => pairs()
            .map(|b| half::bf16::from_le_bytes(b).to_f32())
            .collect(),
        _ => return None,
    })
}
