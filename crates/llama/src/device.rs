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

/// The memory a run on the device named `name` (`runtime.device`) can still use: for CUDA
/// devices (`cuda:N`, `tch:cuda:N`) the GPU's free memory as `nvidia-smi` reports it, for CPU
/// devices available RAM; `None` when it cannot be read.
pub fn memory_available(name: &str, device: &Device) -> Option<u64> {
    match cuda_index(name) {
        Some(index) => gpu_free_memory(index),
        None => host_memory_available(device),
    }
}

/// The GPU index of a CUDA device name (`cuda`, `cuda:1`, `tch:cuda:0`).
fn cuda_index(name: &str) -> Option<usize> {
    let name = name.trim();
    let rest = name
        .strip_prefix("tch:")
        .unwrap_or(name)
        .strip_prefix("cuda")?;
    match rest.strip_prefix(':').unwrap_or(rest) {
        "" => Some(0),
        index => index.parse().ok(),
    }
}

/// Free memory of GPU `index` in bytes, from `nvidia-smi` (present wherever NVIDIA's driver is).
fn gpu_free_memory(index: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &index.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    free_mib_to_bytes(&String::from_utf8_lossy(&out.stdout))
}

/// `nvidia-smi`'s `memory.free` (MiB, no units) in bytes.
fn free_mib_to_bytes(text: &str) -> Option<u64> {
    let mib: u64 = text.lines().next()?.trim().parse().ok()?;
    mib.checked_mul(1 << 20)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_names_give_their_index() {
        assert_eq!(cuda_index("cuda"), Some(0));
        assert_eq!(cuda_index("cuda:3"), Some(3));
        assert_eq!(cuda_index("tch:cuda:1"), Some(1));
        assert_eq!(cuda_index("tch:cpu"), None);
        assert_eq!(cuda_index("flex"), None);
        assert_eq!(cuda_index("cuda:x"), None);
    }

    #[test]
    fn nvidia_smi_free_memory_is_read_in_mib() {
        assert_eq!(free_mib_to_bytes("81037\n"), Some(81037 << 20));
        assert_eq!(free_mib_to_bytes("[N/A]\n"), None);
        assert_eq!(free_mib_to_bytes(""), None);
    }
}
