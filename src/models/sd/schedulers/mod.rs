//! Stable Diffusion schedulers: ports of diffusers 0.42's PNDM, DDIM, DPM-Solver++ 2M, Euler and
//! Euler ancestral, configured from a diffusers `scheduler/scheduler_config.json`.
//!
//! Parity: every scheduler follows diffusers' arithmetic step by step (float32 tensor maths where
//! diffusers uses torch, float64 where it uses numpy, the same casts in between), and the tests
//! replay trajectories recorded from diffusers (`tests/fixtures/reference/schedulers/`).
//!
//! Tensors are flat `f32` slices in row-major order (NCHW latents). Scheduler maths is element-wise,
//! so the shape matters only to the noise of the ancestral scheduler: one generator draws all of
//! it, or several generators (one per batch item) draw equal shares, as diffusers does with a list
//! of generators.
//!
//! Steps are addressed by index into [`Scheduler::timesteps`], and must be taken in order
//! (0, 1, 2, ...) after [`Scheduler::set_timesteps`]; the multistep schedulers keep history
//! between steps, as diffusers' do.
//!
//! Configuration follows diffusers' `from_config`: keys missing from the file take the target
//! scheduler's own default (so `timestep_spacing` is "leading" for PNDM and DDIM but "linspace"
//! for the others), keys the scheduler does not know are ignored, and the kind may force some
//! values (see [`SchedulerKind`]). Options diffusers has but cip does not implement are errors,
//! never silently ignored.
//!
//! Known differences from diffusers, all within the tests' bounds:
//! - torch's float32 `sqrt` (MKL) is not correctly rounded: about a fifth of its results are one
//!   ulp off, and which ones depends on the CPU. cip's is correctly rounded, so a training sigma
//!   or a step coefficient can differ by one ulp. Rarely that moves a rounded Karras timestep
//!   across .5 (one schedule in 14 436 checked: DPM++ 2M Karras with 854 steps, 28 instead of 29).
//! - diffusers finds its first step by timestep value, which picks the second match when the
//!   first timestep repeats (Karras sigmas on the cosine schedule start 998, 998, ...) and then
//!   runs past the end; cip steps by index and runs such schedules to the end.
//!
//! ```
//! use cip::models::sd::noise::TorchGenerator;
//! use cip::models::sd::schedulers::{build, SchedulerConfig, SchedulerKind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Normally SchedulerConfig::from_file("<model>/scheduler/scheduler_config.json").
//! let config = SchedulerConfig::from_json_str(
//!     r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
//! )?;
//! let mut scheduler = build("euler-a".parse::<SchedulerKind>()?, &config)?;
//! scheduler.set_timesteps(20)?;
//! // One generator per image, seeded as torch.Generator().manual_seed(seed).
//! let mut generators = [TorchGenerator::new(42)];
//! let noise = generators[0].randn(&[1, 4, 8, 8]);
//! let mut latents: Vec<f32> = noise.iter().map(|x| x * scheduler.init_noise_sigma()).collect();
//! for step in 0..scheduler.model_calls() {
//!     let _timestep = scheduler.timesteps()[step];
//!     let model_input = scheduler.scale_model_input(&latents, step)?;
//!     // The UNet would predict the noise from `model_input` at `_timestep`.
//!     let predicted_noise = vec![0.0f32; model_input.len()];
//!     latents = scheduler.step(&predicted_noise, step, &latents, &mut generators)?;
//! }
//! # Ok(())
//! # }
//! ```

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod pndm;
mod schedules;

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::noise::{NoiseError, TorchGenerator};

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use pndm::PndmScheduler;

/// A diffusion sampler driven one model evaluation per step.
pub trait Scheduler: Send + fmt::Debug {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// Chooses the timesteps for `num_inference_steps` denoising steps and resets the history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError>;

    /// The timestep fed to the denoising model at each step; one entry per step (and per model
    /// call). PNDM repeats its second timestep, so it makes one more call than steps asked for.
    fn timesteps(&self) -> &[f32];

    /// The noise levels of the sigma-based schedulers (one more than timesteps, ending at the
    /// final sigma), `None` for the others.
    fn sigmas(&self) -> Option<&[f32]>;

    /// The factor the initial Gaussian noise is multiplied by.
    fn init_noise_sigma(&self) -> f32;

    /// The denoising model's input at `step_index` (borrowed when the scheduler does not scale).
    fn scale_model_input<'a>(
        &self,
        sample: &'a [f32],
        step_index: usize,
    ) -> Result<Cow<'a, [f32]>, SchedulerError>;

    /// One denoising step: from `sample` at `step_index` and the model's output for it, the
    /// sample at the next timestep. Schedulers that add noise draw it from `generators` (one for
    /// the whole sample, or one per batch item); the others ignore them.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generators: &mut [TorchGenerator],
    ) -> Result<Vec<f32>, SchedulerError>;

    /// diffusers' `scheduler.order`: model evaluations per step (1 for all schedulers here).
    fn order(&self) -> usize {
        1
    }

    /// Model evaluations in a full run: one per timestep.
    fn model_calls(&self) -> usize {
        self.timesteps().len() * self.order()
    }
}

/// The schedulers cip offers, by their command-line / experiment-file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `pndm`: diffusers' `PNDMScheduler`, SD-1.5's default (PLMS when `skip_prk_steps`).
    Pndm,
    /// `ddim`: `DDIMScheduler`, deterministic (eta = 0).
    Ddim,
    /// `dpm++2m`: `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` and
    /// `solver_order = 2` forced.
    DpmPp2m,
    /// `dpm++2m-karras`: as `dpm++2m`, with `use_karras_sigmas = true` forced.
    DpmPp2mKarras,
    /// `euler`: `EulerDiscreteScheduler`.
    Euler,
    /// `euler-a`: `EulerAncestralDiscreteScheduler`, which adds fresh noise at every step.
    EulerAncestral,
}

impl SchedulerKind {
    /// Every kind, in the order the valid names are listed.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
    ];

    /// The name used on the command line and in experiment files.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::DpmPp2mKarras => "dpm++2m-karras",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
        }
    }

    fn valid_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if let Some(kind) = Self::ALL.into_iter().find(|k| k.name() == name) {
            return Ok(kind);
        }
        let suggestion = Self::ALL
            .into_iter()
            .map(|k| (strsim::levenshtein(name, k.name()), k))
            .filter(|(distance, _)| *distance <= 3)
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, k)| k.name());
        Err(SchedulerError::UnknownKind {
            name: name.to_owned(),
            suggestion: suggestion
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default(),
            valid: Self::valid_names(),
        })
    }
}

impl Serialize for SchedulerKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for SchedulerKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// diffusers' `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// diffusers' `prediction_type`: what the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The clean sample (Euler also calls it `original_sample`).
    #[serde(alias = "original_sample")]
    Sample,
}

/// diffusers' `timestep_spacing` (Table 2 of "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// DPM-Solver's `solver_type` for the second-order update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// diffusers maps the UniPC/DEIS names `logrho`, `bh1` and `bh2` to midpoint as well.
    #[serde(alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    Heun,
}

/// The sigma the sigma-based schedulers end on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// A diffusers `scheduler_config.json`, with diffusers' constructor defaults for missing keys.
///
/// Keys whose default differs between diffusers' scheduler classes are `Option`s (`None`: the
/// built scheduler's own default). Unknown keys, and keys of other schedulers, are ignored, as
/// diffusers' `from_config` ignores them. Fields are public so that callers can override them
/// before [`build`], like the keyword arguments of `from_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// "leading" for PNDM and DDIM, "linspace" for the others.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: i64,
    /// PNDM and DDIM: the "previous" alpha product of the last step is 1 instead of
    /// `alphas_cumprod[0]`. Default false for PNDM, true for DDIM.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: PLMS steps only (SD-1.5), instead of 12 Runge–Kutta warm-up evaluations.
    pub skip_prk_steps: bool,
    /// DDIM: clamp the predicted clean sample to ±`clip_sample_range`. Default true for DDIM.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// Dynamic thresholding (Imagen). Not implemented: `true` is an error.
    pub thresholding: bool,
    /// DDIM, DPM-Solver, Euler, Euler ancestral (PNDM has no such option and ignores it).
    pub rescale_betas_zero_snr: bool,
    /// DPM-Solver and Euler.
    pub use_karras_sigmas: bool,
    /// Not implemented: `true` is an error.
    pub use_exponential_sigmas: bool,
    /// Not implemented: `true` is an error.
    pub use_beta_sigmas: bool,
    /// Not implemented: `true` is an error.
    pub use_lu_lambdas: bool,
    /// Not implemented: `true` is an error.
    pub use_flow_sigmas: bool,
    /// Euler with Karras sigmas: overrides the smallest / largest sigma.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler: only "linear" is implemented.
    pub interpolation_type: String,
    /// Euler: only "discrete" is implemented.
    pub timestep_type: String,
    /// DPM-Solver and Euler.
    pub final_sigmas_type: FinalSigmasType,
    /// DPM-Solver.
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// DPM-Solver: clips the schedule where `lambda(t)` falls below this (diffusers writes
    /// `-Infinity`, which is read here too).
    #[serde(deserialize_with = "deserialize_float_or_special")]
    pub lambda_min_clipped: f64,
    /// DPM-Solver: "learned" / "learned_range" (a model that also predicts variances) is not
    /// implemented: anything but null is an error.
    pub variance_type: Option<String>,
    /// The file this config was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            skip_prk_steps: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            interpolation_type: "linear".to_owned(),
            timestep_type: "discrete".to_owned(),
            final_sigmas_type: FinalSigmasType::Zero,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            source: None,
        }
    }
}

fn deserialize_float_or_special<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum FloatOrName {
        Float(f64),
        Name(String),
    }
    // serde_json writes non-finite floats as null: read null back as the default, -inf.
    match Option::<FloatOrName>::deserialize(deserializer)? {
        None => Ok(f64::NEG_INFINITY),
        Some(FloatOrName::Float(value)) => Ok(value),
        Some(FloatOrName::Name(name)) => match name.as_str() {
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, -Infinity, Infinity or NaN, got \"{other}\""
            ))),
        },
    }
}

/// Python's `json` writes the non-finite floats `-Infinity`, `Infinity` and `NaN`, which are not
/// JSON: quote them (outside strings) so that they parse, as strings.
fn quote_non_finite_literals(text: &str) -> Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let escaped: String = rest.chars().take(2).collect();
                out.push_str(&escaped);
                rest = &rest[escaped.len()..];
                continue;
            }
            if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(literal) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|literal| rest.starts_with(literal))
        {
            out.push('"');
            out.push_str(literal);
            out.push('"');
            rest = &rest[literal.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, &format!(" {}", path.display()))?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses the text of a diffusers `scheduler_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        Self::parse(text, "")
    }

    /// Builds a config from a JSON object, e.g. a config merged with overrides.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, SchedulerError> {
        Self::parse(&value.to_string(), "")
    }

    fn parse(text: &str, origin: &str) -> Result<Self, SchedulerError> {
        serde_json::from_str(&quote_non_finite_literals(text)).map_err(|source| {
            SchedulerError::ParseConfig {
                origin: origin.to_owned(),
                source,
            }
        })
    }

    /// " <path>" when read from a file, for "scheduler config <path>: ..." messages.
    fn origin(&self) -> String {
        self.source
            .as_ref()
            .map_or_else(String::new, |p| format!(" {}", p.display()))
    }

    pub(crate) fn invalid(&self, key: &'static str, value: String, reason: &str) -> SchedulerError {
        SchedulerError::InvalidConfig {
            origin: self.origin(),
            key,
            value,
            reason: reason.to_owned(),
        }
    }

    pub(crate) fn unsupported(
        &self,
        kind: SchedulerKind,
        key: &'static str,
        value: String,
        supported: &str,
    ) -> SchedulerError {
        SchedulerError::Unsupported {
            origin: self.origin(),
            kind,
            key,
            value,
            supported: supported.to_owned(),
        }
    }

    /// Rejects the diffusers options that none of cip's schedulers implement.
    fn check_common(&self, kind: SchedulerKind) -> Result<(), SchedulerError> {
        let flags = [
            ("thresholding", self.thresholding),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        for (key, set) in flags {
            if set {
                return Err(self.unsupported(kind, key, "true".to_owned(), "false"));
            }
        }
        Ok(())
    }
}

/// Errors of scheduler configuration and stepping.
#[derive(Debug, Error)]
pub enum SchedulerError {
    #[error("unknown scheduler `{name}`{suggestion}; valid names: {valid}")]
    UnknownKind {
        name: String,
        suggestion: String,
        valid: String,
    },
    #[error("cannot read scheduler config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scheduler config{origin}: {source}")]
    ParseConfig {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid scheduler config{origin}: `{key}` = {value}: {reason}")]
    InvalidConfig {
        origin: String,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "scheduler config{origin}: `{key}` = {value} is not supported by cip's `{kind}` \
         scheduler; supported: {supported}"
    )]
    Unsupported {
        origin: String,
        kind: SchedulerKind,
        key: &'static str,
        value: String,
        supported: String,
    },
    #[error(
        "`{kind}`: cannot run {steps} inference steps with {train_steps} training timesteps; \
         choose 1 to {train_steps}"
    )]
    InvalidStepCount {
        kind: SchedulerKind,
        steps: usize,
        train_steps: usize,
    },
    #[error(
        "`pndm`: the Runge-Kutta warm-up (skip_prk_steps = false) needs at least 4 inference \
         steps, got {steps}"
    )]
    TooFewStepsForWarmUp { steps: usize },
    #[error("`{kind}`: call set_timesteps before stepping")]
    TimestepsNotSet { kind: SchedulerKind },
    #[error("`{kind}`: step {got} was asked for, but the next step is {expected}; steps run in order from 0 after set_timesteps")]
    StepOutOfOrder {
        kind: SchedulerKind,
        expected: usize,
        got: usize,
    },
    #[error("`{kind}`: step index {index} is past the last of {steps} timesteps")]
    StepIndexOutOfRange {
        kind: SchedulerKind,
        index: usize,
        steps: usize,
    },
    #[error("{what} has {got} values, expected {expected} (the sample's length)")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("`{kind}` adds noise at every step: {source}")]
    Noise {
        kind: SchedulerKind,
        #[source]
        source: NoiseError,
    },
}

/// Builds the scheduler `kind` from a config, like diffusers' `XScheduler.from_config(config)`
/// with the overrides the kind implies.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    config.check_common(kind)?;
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::new(config, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistepScheduler::new(config, true)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
    })
}

/// The step count check shared by the schedulers.
fn check_step_count(
    kind: SchedulerKind,
    steps: usize,
    train_steps: usize,
) -> Result<(), SchedulerError> {
    if steps == 0 || steps > train_steps {
        return Err(SchedulerError::InvalidStepCount {
            kind,
            steps,
            train_steps,
        });
    }
    Ok(())
}

/// The in-order stepping check shared by the schedulers.
fn check_step_index(
    kind: SchedulerKind,
    step_index: usize,
    expected: usize,
    steps: usize,
) -> Result<(), SchedulerError> {
    if steps == 0 {
        return Err(SchedulerError::TimestepsNotSet { kind });
    }
    if step_index >= steps {
        return Err(SchedulerError::StepIndexOutOfRange {
            kind,
            index: step_index,
            steps,
        });
    }
    if step_index != expected {
        return Err(SchedulerError::StepOutOfOrder {
            kind,
            expected,
            got: step_index,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        }
    }

    #[test]
    fn non_finite_literals_are_quoted_outside_strings_only() {
        let text = r#"{"a": -Infinity, "b": "NaN -Infinity \" Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            quote_non_finite_literals(text),
            r#"{"a": "-Infinity", "b": "NaN -Infinity \" Infinity", "c": ["NaN", "Infinity"]}"#
        );
        let config =
            SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -Infinity}"#).unwrap();
        assert_eq!(config.lambda_min_clipped, f64::NEG_INFINITY);
        let config = SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        assert_eq!(config.lambda_min_clipped, -5.1);
    }

    #[test]
    fn config_survives_a_json_round_trip() {
        let config =
            SchedulerConfig::from_json_str(r#"{"beta_schedule": "scaled_linear"}"#).unwrap();
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(SchedulerConfig::from_json_str(&text).unwrap(), config);
    }
}
