//! Choosing the backend at run time from a device string.

use burn::prelude::Device;

use crate::error::{LlamaError, Result};

/// The device names users write: `flex` (pure-Rust CPU, the default), `cuda:N` (burn's CubeCL
/// CUDA backend, the `cuda` feature), `tch:cpu` and `tch:cuda:N` (libtorch, the `tch` feature).
pub const DEVICE_HELP: &str = "flex | cuda:N | tch:cpu | tch:cuda:N";

pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "flex" || name == "cpu" {
        return Ok(Device::flex());
    }
    let (tch, rest) = match name.strip_prefix("tch:") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    match (tch, rest, cuda_index(name)) {
        (true, "cpu", _) => libtorch_cpu(),
        (true, _, Some(index)) => libtorch_cuda(index),
        (false, _, Some(index)) => cubecl_cuda(index),
        _ => Err(LlamaError::Invalid(format!(
            "unknown device `{name}` (expected {DEVICE_HELP})"
        ))),
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream; kept for users who have libtorch
fn libtorch_cpu() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn libtorch_cuda(index: usize) -> Result<Device> {
    // libtorch only fails at the first operation on a missing GPU, inside a panic: ask first.
    let gpus = Device::enumerate(burn::tensor::DeviceType::LibTorch).len();
    if index >= gpus {
        let hint = if gpus == 0 {
            " (no NVIDIA GPU or driver?)"
        } else {
            ""
        };
        return Err(LlamaError::Invalid(format!(
            "device `tch:cuda:{index}`: libtorch sees {gpus} CUDA device(s){hint}"
        )));
    }
    Ok(Device::libtorch_cuda(index))
}

#[cfg(not(feature = "tch"))]
fn libtorch_cpu() -> Result<Device> {
    Err(not_built("tch:cpu", "tch", "libtorch"))
}

#[cfg(not(feature = "tch"))]
fn libtorch_cuda(index: usize) -> Result<Device> {
    Err(not_built(&format!("tch:cuda:{index}"), "tch", "libtorch"))
}

#[cfg(feature = "cuda")]
fn cubecl_cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cubecl_cuda(index: usize) -> Result<Device> {
    Err(not_built(
        &format!("cuda:{index}"),
        "cuda",
        "burn's CUDA backend",
    ))
}

#[allow(dead_code)] // unused when every backend is built
fn not_built(name: &str, feature: &str, what: &str) -> LlamaError {
    LlamaError::Invalid(format!(
        "device `{name}` needs {what}: rebuild with `--features cli/{feature}` (see README, \"Backends\")"
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

    /// `cuda:N` is burn's CUDA backend and `tch:*` libtorch; a backend not built is refused in
    /// one line naming its feature, and unknown names list the valid ones.
    #[test]
    fn device_names_pick_their_backend_or_name_the_missing_feature() {
        let message = |name: &str| parse_device(name).err().map(|e| e.to_string());
        assert!(parse_device("flex").is_ok());
        if cfg!(not(feature = "cuda")) {
            let error = message("cuda:1").unwrap();
            assert!(
                error.contains("`cuda:1`") && error.contains("--features cli/cuda"),
                "{error}"
            );
        }
        if cfg!(not(feature = "tch")) {
            let error = message("tch:cuda:0").unwrap();
            assert!(
                error.contains("`tch:cuda:0`") && error.contains("cli/tch"),
                "{error}"
            );
        } else {
            assert!(parse_device("tch:cpu").is_ok());
            // A GPU libtorch cannot see is refused up front, not by a panic at the first use.
            let error = message("tch:cuda:99").unwrap();
            assert!(error.contains("libtorch sees"), "{error}");
        }
        for bad in ["gpu", "cuda:x", "tch:gpu", "tch:cuda:-1"] {
            let error = message(bad).unwrap();
            assert!(error.contains(DEVICE_HELP), "{bad}: {error}");
        }
    }

    #[test]
    fn nvidia_smi_free_memory_is_read_in_mib() {
        assert_eq!(free_mib_to_bytes("81037\n"), Some(81037 << 20));
        assert_eq!(free_mib_to_bytes("[N/A]\n"), None);
        assert_eq!(free_mib_to_bytes(""), None);
    }
}
