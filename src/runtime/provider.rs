//! Execution providers: where a session runs. Experiments and the CLI name them as `cpu`,
//! `cuda:N` or `tensorrt:N`.
//!
//! A GPU provider that cannot be registered is an error, never a silent CPU run: ONNX Runtime's
//! default is to skip a provider that fails and fall back to the CPU, which would turn a GPU job
//! into one that is 100x slower without a word. Registration therefore uses `error_on_failure`,
//! after first checking that the loaded library was built with the provider at all (the CPU wheel
//! is not), so that the common mistake gets a message that names the fix.
//!
//! The provider changes speed, not results (up to floating-point noise), so it is not part of any
//! cache key.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};

use super::error::RuntimeError;

/// ONNX Runtime's own name of the CPU provider (always present).
pub const CPU_PROVIDER: &str = "CPUExecutionProvider";

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Provider {
    /// ONNX Runtime's CPU kernels.
    #[default]
    Cpu,
    /// The CUDA provider on GPU `N` (needs the `onnxruntime-gpu` wheel).
    Cuda(u32),
    /// TensorRT on GPU `N`, with CUDA on the same GPU for nodes TensorRT does not take.
    TensorRt(u32),
}

impl Provider {
    /// ONNX Runtime's names of the providers this choice registers, in registration order.
    pub fn ort_names(&self) -> &'static [&'static str] {
        match self {
            Provider::Cpu => &[CPU_PROVIDER],
            Provider::Cuda(_) => &[ep::CUDA::NAME],
            Provider::TensorRt(_) => &[ep::TensorRT::NAME, ep::CUDA::NAME],
        }
    }

    /// The GPU index, if this is a GPU provider.
    pub fn device(&self) -> Option<u32> {
        match self {
            Provider::Cpu => None,
            Provider::Cuda(n) | Provider::TensorRt(n) => Some(*n),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::Cpu => f.write_str("cpu"),
            Provider::Cuda(n) => write!(f, "cuda:{n}"),
            Provider::TensorRt(n) => write!(f, "tensorrt:{n}"),
        }
    }
}

impl FromStr for Provider {
    type Err = RuntimeError;

    /// Parses `cpu`, `cuda:N` or `tensorrt:N`; a bare `cuda` / `tensorrt` means GPU 0.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| RuntimeError::InvalidProvider {
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        let (kind, device) = match text.split_once(':') {
            Some((kind, device)) => (kind, Some(device)),
            None => (text, None),
        };
        let device = match device {
            None => 0,
            Some(device) => device.parse::<u32>().map_err(|_| {
                invalid(format!(
                    "the device after ':' must be a GPU index (0, 1, ...), got {device:?}"
                ))
            })?,
        };
        match kind {
            "cpu" if text.contains(':') => Err(invalid("cpu takes no device index".to_string())),
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda(device)),
            "tensorrt" => Ok(Provider::TensorRt(device)),
            other => Err(invalid(format!("unknown provider kind {other:?}"))),
        }
    }
}

impl serde::Serialize for Provider {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Provider {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// TensorRT settings; ignored by the other providers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// Let TensorRT pick fp16 kernels (faster; results differ slightly from fp32).
    pub fp16: bool,
    /// Where built engines are cached. Building an engine takes minutes for a UNet, so a run that
    /// opens the same graph again should reuse it; `None` disables the cache.
    pub engine_cache: Option<PathBuf>,
}

impl TensorRtOptions {
    /// Settings for one model: engines go to `<engine_root>/<model digest>` (an engine is built
    /// for one graph and one GPU, so models must not share a directory), and TensorRT uses fp16
    /// kernels exactly when the export is fp16 (on an fp32 export they would change results).
    pub fn for_model(engine_root: Option<&std::path::Path>, dir: &super::ModelDir) -> Self {
        let digest: String = dir.digest().chars().take(32).collect();
        TensorRtOptions {
            fp16: matches!(dir.manifest().dtype.as_str(), "fp16" | "float16"),
            engine_cache: engine_root.map(|root| root.join(digest)),
        }
    }
}

/// The dispatch list for a GPU provider (empty for the CPU, which ONNX Runtime always has).
pub(crate) fn execution_providers(
    provider: Provider,
    tensorrt: &TensorRtOptions,
) -> Vec<ExecutionProviderDispatch> {
    // TF32 off: ONNX Runtime's CUDA provider turns it on unless told (1.31, whatever the ort docs
    // say), and then an fp32 export's convolutions and matmuls round to 10-bit mantissas: on an H200
    // the classifier's logits moved 2.8e-4 from torch's and one SGD step 1.7e-4 (fp32: 3e-7, 1e-5).
    // fp16 exports are unaffected.
    let cuda = |device: u32| {
        ep::CUDA::default()
            .with_device_id(device as i32)
            .with_tf32(false)
            .build()
            .error_on_failure()
    };
    match provider {
        Provider::Cpu => Vec::new(),
        Provider::Cuda(device) => vec![cuda(device)],
        Provider::TensorRt(device) => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(device as i32)
                .with_fp16(tensorrt.fp16);
            if let Some(cache) = &tensorrt.engine_cache {
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(cache.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(cache.display());
            }
            vec![trt.build().error_on_failure(), cuda(device)]
        }
    }
}
