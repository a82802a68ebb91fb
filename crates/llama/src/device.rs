//! Choosing the backend at run time from a device string.

use burn::prelude::Device;

use crate::error::{LlamaError, Result};

/// The device names users write: `flex` (pure-Rust CPU, the default), `tch:cpu`,
/// `tch:cuda:N`, and `cuda:N` (libtorch CUDA).
pub const DEVICE_HELP: &str = "flex | tch:cpu | tch:cuda:N | cuda:N";

pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "flex" || name == "cpu" {
        return Ok(Device::flex());
    }
    let (tch, rest) = match name.strip_prefix("tch:") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let cuda_index = rest
        .strip_prefix("cuda")
        .map(|i| i.strip_prefix(':').unwrap_or(i))
        .map(|i| {
            if i.is_empty() {
                Ok(0)
            } else {
                i.parse::<usize>()
            }
        });
    match (tch, rest, cuda_index) {
        (true, "cpu", _) => libtorch_cpu(),
        (_, _, Some(Ok(index))) => libtorch_cuda(index),
        _ => Err(LlamaError::Invalid(format!(
            "unknown device `{name}` (expected {DEVICE_HELP})"
        ))),
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream but is our libtorch/CUDA path
fn libtorch_cpu() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn libtorch_cuda(index: usize) -> Result<Device> {
    Ok(Device::libtorch_cuda(index))
}

#[cfg(not(feature = "tch"))]
fn libtorch_cpu() -> Result<Device> {
    Err(not_built("tch:cpu"))
}

#[cfg(not(feature = "tch"))]
fn libtorch_cuda(index: usize) -> Result<Device> {
    Err(not_built(&format!("cuda:{index}")))
}

#[cfg(not(feature = "tch"))]
fn not_built(name: &str) -> LlamaError {
    LlamaError::Invalid(format!(
        "device `{name}` needs libtorch: rebuild with `--features tch` (see README, \"Backends\")"
    ))
}

/// The memory a CPU device can still use (`MemAvailable` of /proc/meminfo, in bytes); `None`
/// for GPU devices and where it cannot be read.
pub fn host_memory_available(device: &Device) -> Option<u64> {
    // burn's device is opaque; its debug form names the backend (`Flex`, `LibTorch(Cpu)`).
    let name = format!("{device:?}");
    if !(name.contains("Flex") || name.contains("Cpu")) {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
