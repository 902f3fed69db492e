//! The `classifier` family: a ResNet forward graph plus a functional SGD train-step graph
//! (models/README-classifier.md is the contract).
//!
//! The train state (parameters, momentum buffers, BN running stats) lives in Rust between steps:
//! step k's `new.*` outputs become step k+1's inputs. A trained forward model is the unchanged
//! `model.onnx` plus a copy of `model.onnx.data` with the state's tensors written at the offsets
//! recorded in `[[config.initializers]]`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, ArrayView2, ArrayView4, IxDyn};
use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use crate::runtime::{Family, ModelDir, RuntimeError, SessionConfig};

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is missing; the train state needs every name listed in config.params, config.momentum_buffers and config.states")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` must be float32 (found {dtype})")]
    WrongDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{dir}: initializer `{name}` takes {length} bytes at offset {offset}, but its source `{source_name}` has {actual} bytes (or the offset is past the end of {file})")]
    InitializerSize {
        dir: PathBuf,
        file: String,
        name: String,
        source_name: String,
        offset: u64,
        length: u64,
        actual: u64,
    },
    #[error("{dir}: initializer `{name}` takes its values from `{source_name}`, which is not part of the train state")]
    UnknownSource {
        dir: PathBuf,
        name: String,
        source_name: String,
    },
    #[error("ONNX Runtime failed running `{role}` of {dir}: {message}")]
    Run {
        dir: PathBuf,
        role: String,
        message: String,
    },
    #[error("batch of {batch} images cannot train: BatchNorm in train mode needs at least {min} (config.min_train_batch)")]
    BatchTooSmall { batch: usize, min: usize },
}

/// The `[config]` table of a classifier model directory.
#[derive(Debug, Clone, Deserialize)]
pub struct ClassifierConfig {
    pub arch: String,
    pub num_classes: usize,
    pub image_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub min_train_batch: usize,
    pub train_state: String,
    pub params: Vec<String>,
    pub momentum_buffers: Vec<String>,
    pub states: Vec<String>,
    pub output_prefix: String,
    pub weights_file: String,
    pub initializers: Vec<Initializer>,
}

/// One external initializer of `model.onnx`.
#[derive(Debug, Clone, Deserialize)]
pub struct Initializer {
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub source: String,
}

/// SGD hyper-parameters of one step (the train-step graph's scalar inputs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub label_smoothing: f32,
}

/// Parameters, momentum buffers and BN running stats, in train-step input order.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    pub tensors: Vec<(String, ArrayD<f32>)>,
}

impl TrainState {
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Reads the tensors named `names` from a safetensors file, each looked up as `prefix + name`
    /// (`new.` for a train-step output file).
    pub fn read(
        path: &Path,
        names: &[String],
        prefix: &str,
    ) -> Result<TrainState, ClassifierError> {
        let bytes = std::fs::read(path).map_err(|source| ClassifierError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tensors = read_tensors(path, &bytes, names, prefix)?;
        Ok(TrainState {
            tensors: names.iter().cloned().zip(tensors).collect(),
        })
    }

    /// Serialises to safetensors bytes; the layout depends only on the tensors, so equal states
    /// give equal files.
    pub fn to_bytes(
        &self,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>, ClassifierError> {
        let raw: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let data: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), data, t.shape().to_vec())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
            .iter()
            .map(|(name, data, shape)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .expect("shape matches data by construction");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, metadata).map_err(|e| ClassifierError::Safetensors {
            path: PathBuf::from("<train state>"),
            message: e.to_string(),
        })
    }
}

/// Reads f32 tensors `prefix + name` for each name.
pub fn read_tensors(
    path: &Path,
    bytes: &[u8],
    names: &[String],
    prefix: &str,
) -> Result<Vec<ArrayD<f32>>, ClassifierError> {
    let file =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| ClassifierError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    names
        .iter()
        .map(|name| {
            let full = format!("{prefix}{name}");
            let view = file
                .tensor(&full)
                .map_err(|_| ClassifierError::MissingTensor {
                    path: path.to_path_buf(),
                    name: full.clone(),
                })?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(ClassifierError::WrongDtype {
                    path: path.to_path_buf(),
                    name: full,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(ArrayD::from_shape_vec(IxDyn(view.shape()), values)
                .expect("safetensors checked the shape"))
        })
        .collect()
}

/// The symbolic batch dimension of the exported train-step graph.
const TRAIN_BATCH_DIM: &str = "batch";
/// The train step in torchvision's layout (Conv and ConvTranspose: cuDNN on a GPU).
const TRAIN_STEP_ROLE: &str = "train_step";
/// The same step with every convolution and its gradients as batch-wide GEMMs over [C, H, W, B]
/// activations, for ONNX Runtime's CPU kernels (exports from before it lack it).
const TRAIN_STEP_GEMM_ROLE: &str = "train_step_gemm";

/// An opened classifier model directory.
pub struct Classifier {
    pub dir: ModelDir,
    pub config: ClassifierConfig,
    session_config: SessionConfig,
    /// Train-step sessions by batch size: each has its batch dimension fixed (static shapes are
    /// much faster on the CPU). An epoch needs at most two: the batch size and the remainder.
    train: Vec<(usize, Session)>,
    /// The train-step graph these sessions run (`train_role`).
    train_role: &'static str,
    forward: Option<Session>,
}

impl Classifier {
    pub fn open(dir: &Path, session_config: SessionConfig) -> Result<Classifier, ClassifierError> {
        let dir = ModelDir::open(dir, Some(Family::Classifier))?;
        let config: ClassifierConfig = dir.config_as()?;
        // The GEMM form on the CPU when the export has it, else the convolution form.
        let cpu = session_config.provider == crate::runtime::Provider::Cpu;
        let train_role = if cpu && dir.graph(TRAIN_STEP_GEMM_ROLE).is_ok() {
            TRAIN_STEP_GEMM_ROLE
        } else {
            TRAIN_STEP_ROLE
        };
        Ok(Classifier {
            dir,
            config,
            session_config,
            train: Vec::new(),
            train_role,
            forward: None,
        })
    }

    /// Names of the train-state tensors in input order.
    pub fn state_names(&self) -> Vec<String> {
        let c = &self.config;
        c.params
            .iter()
            .chain(&c.momentum_buffers)
            .chain(&c.states)
            .cloned()
            .collect()
    }

    /// The initial train state of the directory (`state.safetensors`).
    pub fn initial_state(&self) -> Result<TrainState, ClassifierError> {
        TrainState::read(
            &self.dir.path(&self.config.train_state),
            &self.state_names(),
            "",
        )
    }

    /// The train-step graph for the session's provider: the GEMM form on the CPU when the export
    /// has it, else the convolution form (or what `use_train_graph` chose).
    pub fn train_role(&self) -> &'static str {
        self.train_role
    }

    /// Runs the convolution form (`gemm = false`) or the GEMM form of the train step whatever the
    /// provider; an export without the GEMM form refuses it.
    pub fn use_train_graph(&mut self, gemm: bool) -> Result<(), ClassifierError> {
        let role = if gemm {
            TRAIN_STEP_GEMM_ROLE
        } else {
            TRAIN_STEP_ROLE
        };
        self.dir.graph(role)?;
        self.train_role = role;
        self.train.clear();
        Ok(())
    }

    /// One SGD step: updates `state` in place and returns the loss.
    pub fn train_step(
        &mut self,
        state: &mut TrainState,
        images: ArrayView4<'_, f32>,
        labels: &[i64],
        scalars: StepScalars,
    ) -> Result<f32, ClassifierError> {
        if images.shape()[0] < self.config.min_train_batch {
            return Err(ClassifierError::BatchTooSmall {
                batch: images.shape()[0],
                min: self.config.min_train_batch,
            });
        }
        let batch = images.shape()[0];
        if !self.train.iter().any(|(b, _)| *b == batch) {
            let config = SessionConfig {
                fixed_dims: vec![(TRAIN_BATCH_DIM.to_string(), batch as i64)],
                ..self.session_config.clone()
            };
            let session = self.dir.session(self.train_role, &config)?;
            // A third size (rare: only when the batch size changes) replaces the oldest.
            if self.train.len() >= 2 {
                self.train.remove(0);
            }
            self.train.push((batch, session));
        }
        let fail = |message: String| ClassifierError::Run {
            dir: self.dir.root().to_path_buf(),
            role: self.train_role.into(),
            message,
        };
        let run_error = |e: ort::Error| fail(e.message().to_string());
        let labels = ndarray::Array1::from_vec(labels.to_vec());
        let scalar = |v: f32| ndarray::arr0(v).into_dyn();
        let scalar_values = [
            ("lr", scalar(scalars.lr)),
            ("momentum", scalar(scalars.momentum)),
            ("weight_decay", scalar(scalars.weight_decay)),
            ("nesterov", scalar(if scalars.nesterov { 1.0 } else { 0.0 })),
            ("label_smoothing", scalar(scalars.label_smoothing)),
        ];
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
        for (name, tensor) in &state.tensors {
            inputs.push((
                name.clone(),
                TensorRef::from_array_view(tensor.view())
                    .map_err(run_error)?
                    .into(),
            ));
        }
        inputs.push((
            "images".into(),
            TensorRef::from_array_view(images)
                .map_err(run_error)?
                .into(),
        ));
        inputs.push((
            "labels".into(),
            TensorRef::from_array_view(labels.view())
                .map_err(run_error)?
                .into(),
        ));
        for (name, value) in &scalar_values {
            inputs.push((
                name.to_string(),
                TensorRef::from_array_view(value.view())
                    .map_err(run_error)?
                    .into(),
            ));
        }
        let session = &mut self
            .train
            .iter_mut()
            .find(|(b, _)| *b == batch)
            .expect("opened above")
            .1;
        let started = std::time::Instant::now();
        let outputs = session.run(inputs).map_err(run_error)?;
        let ran = started.elapsed();
        let prefix = &self.config.output_prefix;
        // Check every output before overwriting anything: a failed step leaves `state` as it was.
        let mut updated = Vec::with_capacity(state.tensors.len());
        for (name, tensor) in &state.tensors {
            let value = outputs[format!("{prefix}{name}").as_str()]
                .try_extract_array::<f32>()
                .map_err(run_error)?;
            if value.shape() != tensor.shape() {
                return Err(fail(format!(
                    "output {prefix}{name} has shape {:?}, the state tensor {:?}",
                    value.shape(),
                    tensor.shape()
                )));
            }
            updated.push(value);
        }
        let loss = outputs["loss"]
            .try_extract_array::<f32>()
            .map_err(run_error)?
            .iter()
            .copied()
            .next()
            .unwrap_or(f32::NAN);
        // Copied into the state's own (warm) buffers: fresh arrays each step would cost the kernel
        // zeroing ~100-200 MB of new pages per step.
        for ((_, tensor), value) in state.tensors.iter_mut().zip(updated) {
            tensor.assign(&value);
        }
        drop(outputs);
        tracing::debug!(
            "train_step: session.run {:.3} s, state copy-out {:.3} s",
            ran.as_secs_f64(),
            (started.elapsed() - ran).as_secs_f64()
        );
        Ok(loss)
    }

    /// Eval-mode logits of the directory's own forward graph.
    pub fn forward(
        &mut self,
        images: ArrayView4<'_, f32>,
    ) -> Result<ndarray::Array2<f32>, ClassifierError> {
        if self.forward.is_none() {
            self.forward = Some(self.dir.session("forward", &self.session_config)?);
        }
        forward_logits(
            self.forward.as_mut().expect("opened above"),
            self.dir.root(),
            images,
        )
    }

    /// Writes a standalone forward model holding `state`'s weights into `out` (which must exist):
    /// `model.onnx` copied unchanged, `model.onnx.data` copied with each initializer overwritten.
    pub fn write_forward_model(
        &self,
        state: &TrainState,
        out: &Path,
    ) -> Result<(), ClassifierError> {
        let forward = self.dir.graph("forward")?;
        let copy = |from: &Path, to: &Path| {
            std::fs::copy(from, to).map_err(|source| ClassifierError::Io {
                path: to.to_path_buf(),
                source,
            })
        };
        copy(&self.dir.path(&forward.path), &out.join(&forward.path))?;
        let data_path = self.dir.path(&self.config.weights_file);
        let mut data = std::fs::read(&data_path).map_err(|source| ClassifierError::Io {
            path: data_path.clone(),
            source,
        })?;
        let by_name: BTreeMap<&str, &ArrayD<f32>> =
            state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for init in &self.config.initializers {
            let tensor = by_name.get(init.source.as_str()).ok_or_else(|| {
                ClassifierError::UnknownSource {
                    dir: self.dir.root().to_path_buf(),
                    name: init.name.clone(),
                    source_name: init.source.clone(),
                }
            })?;
            let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
            let start = init.offset as usize;
            let end = start + init.length as usize;
            if bytes.len() as u64 != init.length || end > data.len() {
                return Err(ClassifierError::InitializerSize {
                    dir: self.dir.root().to_path_buf(),
                    file: self.config.weights_file.clone(),
                    name: init.name.clone(),
                    source_name: init.source.clone(),
                    offset: init.offset,
                    length: init.length,
                    actual: bytes.len() as u64,
                });
            }
            data[start..end].copy_from_slice(&bytes);
        }
        let target = out.join(&self.config.weights_file);
        std::fs::write(&target, data).map_err(|source| ClassifierError::Io {
            path: target,
            source,
        })
    }
}

/// Runs a forward session (`images` -> `logits`).
pub fn forward_logits(
    session: &mut Session,
    dir: &Path,
    images: ArrayView4<'_, f32>,
) -> Result<ndarray::Array2<f32>, ClassifierError> {
    let run_error = |e: ort::Error| ClassifierError::Run {
        dir: dir.to_path_buf(),
        role: "forward".into(),
        message: e.message().to_string(),
    };
    let outputs = session
        .run(ort::inputs!["images" => TensorRef::from_array_view(images).map_err(run_error)?])
        .map_err(run_error)?;
    let logits = outputs["logits"]
        .try_extract_array::<f32>()
        .map_err(run_error)?;
    let logits: ArrayView2<'_, f32> =
        logits
            .into_dimensionality()
            .map_err(|e| ClassifierError::Run {
                dir: dir.to_path_buf(),
                role: "forward".into(),
                message: format!("logits are not 2-D: {e}"),
            })?;
    Ok(logits.to_owned())
}
