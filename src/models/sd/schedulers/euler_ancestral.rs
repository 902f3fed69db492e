//! diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then fresh
//! Gaussian noise of scale `sigma_up` (k-diffusion's `sample_euler_ancestral`). The noise comes
//! from the caller's generator(s), so a seeded run continues the stream that drew the initial
//! latents, as diffusers' pipelines do.

use std::borrow::Cow;

use super::schedules::{
    check_len, euler_init_noise_sigma, euler_timesteps, np_interp_index, scale_by_sigma,
    sigma_input_scale, NoiseSchedule,
};
use super::{
    check_step_count, check_step_index, PredictionType, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerKind, TimestepSpacing,
};
use crate::models::sd::noise::{randn_split, TorchGenerator};

const KIND: SchedulerKind = SchedulerKind::EulerAncestral;

/// Euler ancestral. See the module documentation.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    /// Training sigmas, ascending with t.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    next_step: usize,
}

impl EulerAncestralDiscreteScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        if config.prediction_type == PredictionType::Sample {
            return Err(config.unsupported(
                KIND,
                "prediction_type",
                "\"sample\"".to_owned(),
                "epsilon, v_prediction",
            ));
        }
        let schedule = NoiseSchedule::new(config, config.rescale_betas_zero_snr, true)?;
        let train_sigmas = schedule.sigmas();
        let train = config.num_train_timesteps;
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(Self {
            num_train_timesteps: train,
            prediction_type: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            train_sigmas,
            timesteps: euler_timesteps(TimestepSpacing::Linspace, train, train, 0),
            sigmas,
            next_step: 0,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_step_count(KIND, num_inference_steps, self.num_train_timesteps)?;
        self.timesteps = euler_timesteps(
            self.spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        );
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| np_interp_index(f64::from(t), &self.train_sigmas) as f32)
            .chain(std::iter::once(0.0))
            .collect();
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        euler_init_noise_sigma(&self.sigmas, self.spacing)
    }

    fn scale_model_input<'a>(
        &self,
        sample: &'a [f32],
        step_index: usize,
    ) -> Result<Cow<'a, [f32]>, SchedulerError> {
        let steps = self.timesteps.len();
        scale_by_sigma(KIND, &self.sigmas, steps, sample, step_index).map(Cow::Owned)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generators: &mut [TorchGenerator],
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_index(KIND, step_index, self.next_step, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        let sigma = sigma_from;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let v_output_coeff = -sigma / sigma_input_scale(sigma);
        let v_sample_divisor = sigma * sigma + 1.0;

        // diffusers draws the noise even on the last step, where sigma_up is 0: the generator
        // advances the same way.
        let noise = randn_split(generators, sample.len())
            .map_err(|source| SchedulerError::Noise { kind: KIND, source })?;
        let prev = sample
            .iter()
            .zip(model_output)
            .zip(&noise)
            .map(|((&x, &m), &n)| {
                let x0 = match self.prediction_type {
                    PredictionType::VPrediction => m * v_output_coeff + x / v_sample_divisor,
                    _ => x - sigma * m,
                };
                let derivative = (x - x0) / sigma;
                let stepped = x + derivative * dt;
                stepped + n * sigma_up
            })
            .collect();
        self.next_step += 1;
        Ok(prev)
    }
}
