//! diffusers' `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma
//! (Karras et al. 2022, Algorithm 2 without churn), optionally on Karras sigmas.

use std::borrow::Cow;

use super::schedules::{
    check_len, euler_init_noise_sigma, euler_timesteps, karras_sigmas, np_interp_index,
    numpy_log_f32, scale_by_sigma, sigma_input_scale, sigma_to_t, NoiseSchedule,
};
use super::{
    check_step_count, check_step_index, FinalSigmasType, PredictionType, Scheduler,
    SchedulerConfig, SchedulerError, SchedulerKind, TimestepSpacing,
};
use crate::models::sd::noise::TorchGenerator;

const KIND: SchedulerKind = SchedulerKind::Euler;

/// Euler (discrete). See the module documentation.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigmas_type: FinalSigmasType,
    alphas_cumprod: Vec<f32>,
    /// Training sigmas, ascending with t.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    next_step: usize,
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        if config.interpolation_type != "linear" {
            return Err(config.unsupported(
                KIND,
                "interpolation_type",
                format!("\"{}\"", config.interpolation_type),
                "linear",
            ));
        }
        match (config.timestep_type.as_str(), config.prediction_type) {
            ("discrete", _) => {}
            // diffusers' continuous timesteps differ only for v-prediction.
            ("continuous", p) if p != PredictionType::VPrediction => {}
            (other, _) => {
                return Err(config.unsupported(
                    KIND,
                    "timestep_type",
                    format!("\"{other}\""),
                    "discrete (continuous only without v_prediction)",
                ))
            }
        }
        let schedule = NoiseSchedule::new(config, config.rescale_betas_zero_snr, true)?;
        let train_sigmas = schedule.sigmas();
        let train = config.num_train_timesteps;
        // Before set_timesteps: every training timestep, descending.
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        let timesteps = euler_timesteps(TimestepSpacing::Linspace, train, train, 0);
        Ok(Self {
            num_train_timesteps: train,
            prediction_type: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            use_karras_sigmas: config.use_karras_sigmas,
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigmas_type: config.final_sigmas_type,
            alphas_cumprod: schedule.alphas_cumprod,
            train_sigmas,
            timesteps,
            sigmas,
            next_step: 0,
        })
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_step_count(KIND, num_inference_steps, self.num_train_timesteps)?;
        let mut timesteps = euler_timesteps(
            self.spacing,
            self.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        );
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| np_interp_index(f64::from(t), &self.train_sigmas))
            .collect();
        if self.use_karras_sigmas {
            let log_sigmas: Vec<f32> = self
                .train_sigmas
                .iter()
                .map(|&s| numpy_log_f32(s))
                .collect();
            let sigma_min = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|&sigma| sigma_to_t(sigma, &log_sigmas) as f32)
                .collect();
        }
        sigmas.push(match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a = self.alphas_cumprod[0];
                f64::from(((1.0 - a) / a).sqrt())
            }
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = timesteps;
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
        _generators: &mut [TorchGenerator],
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_index(KIND, step_index, self.next_step, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        // No churn (s_churn = 0): sigma_hat = sigma * (0 + 1).
        let sigma = self.sigmas[step_index];
        let sigma_hat = sigma * 1.0;
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        let v_output_coeff = -sigma / sigma_input_scale(sigma);
        let v_sample_divisor = sigma * sigma + 1.0;
        let prev = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let x0 = match self.prediction_type {
                    PredictionType::Epsilon => x - sigma_hat * m,
                    PredictionType::Sample => m,
                    PredictionType::VPrediction => m * v_output_coeff + x / v_sample_divisor,
                };
                let derivative = (x - x0) / sigma_hat;
                x + derivative * dt
            })
            .collect();
        self.next_step += 1;
        Ok(prev)
    }
}
