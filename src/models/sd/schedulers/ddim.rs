//! diffusers' `DDIMScheduler` (Song et al. 2021) with eta = 0: deterministic, one model call per
//! step.

use std::borrow::Cow;

use super::schedules::{check_len, np_arange, np_linspace, NoiseSchedule};
use super::{
    check_step_count, check_step_index, PredictionType, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerKind, TimestepSpacing,
};
use crate::models::sd::noise::TorchGenerator;

const KIND: SchedulerKind = SchedulerKind::Ddim;

/// DDIM, eta = 0. See the module documentation.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    /// `Some(range)`: clamp the predicted clean sample to ±range.
    clip_sample_range: Option<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    next_step: usize,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let schedule = NoiseSchedule::new(config, config.rescale_betas_zero_snr, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            num_train_timesteps: config.num_train_timesteps,
            prediction_type: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            clip_sample_range: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            next_step: 0,
        })
    }

    /// `alphas_cumprod[t]` with Python's indexing (trailing spacing can produce timestep -1).
    fn alpha_cumprod_at(&self, t: i64) -> Result<f32, SchedulerError> {
        let len = self.alphas_cumprod.len() as i64;
        let index = if t < 0 { t + len } else { t };
        if !(0..len).contains(&index) {
            return Err(SchedulerError::StepIndexOutOfRange {
                kind: KIND,
                index: t.unsigned_abs() as usize,
                steps: len as usize,
            });
        }
        Ok(self.alphas_cumprod[index as usize])
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_step_count(KIND, num_inference_steps, self.num_train_timesteps)?;
        let train = self.num_train_timesteps;
        self.timesteps = match self.spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, num_inference_steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (train / num_inference_steps) as i64;
                (0..num_inference_steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / num_inference_steps as f64;
                np_arange(train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        self.timesteps_f32 = self.timesteps.iter().map(|&t| t as f32).collect();
        self.num_inference_steps = num_inference_steps;
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input<'a>(
        &self,
        sample: &'a [f32],
        _step_index: usize,
    ) -> Result<Cow<'a, [f32]>, SchedulerError> {
        Ok(Cow::Borrowed(sample))
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _generators: &mut [TorchGenerator],
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_index(KIND, step_index, self.next_step, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let timestep = self.timesteps[step_index];
        let prev_timestep = timestep - (self.num_train_timesteps / self.num_inference_steps) as i64;

        let alpha_prod_t = self.alpha_cumprod_at(timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.alpha_cumprod_at(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        // With eta = 0 the noise term vanishes: std_dev_t = 0 * sqrt(variance) = 0.
        let direction_coeff = (1.0 - alpha_prod_t_prev - 0.0f32).sqrt();
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt();
        let clip = self.clip_sample_range;

        let prev = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let (mut x0, epsilon) = match self.prediction_type {
                    PredictionType::Epsilon => ((x - sqrt_beta * m) / sqrt_alpha, m),
                    PredictionType::Sample => (m, (x - sqrt_alpha * m) / sqrt_beta),
                    PredictionType::VPrediction => (
                        sqrt_alpha * x - sqrt_beta * m,
                        sqrt_alpha * m + sqrt_beta * x,
                    ),
                };
                if let Some(range) = clip {
                    // torch.clamp: NaN passes through.
                    if x0 < -range {
                        x0 = -range;
                    } else if x0 > range {
                        x0 = range;
                    }
                }
                sqrt_alpha_prev * x0 + direction_coeff * epsilon
            })
            .collect();
        self.next_step += 1;
        Ok(prev)
    }
}
