//! diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (Lu et al. 2022): the data
//! prediction (`algorithm_type = "dpmsolver++"`) multistep solver of order 2, optionally on Karras
//! et al.'s sigma schedule.
//!
//! The first step is first order (no history yet); the last step is first order too whenever
//! `final_sigmas_type` is "zero" (the default), `euler_at_final` is set, or
//! `lower_order_final` is set and there are fewer than 15 steps.

use std::borrow::Cow;

use super::schedules::{
    check_len, karras_sigmas, np_arange, np_interp_index, np_linspace, numpy_log_f32, sigma_to_t,
    NoiseSchedule,
};
use super::{
    check_step_count, check_step_index, BetaSchedule, FinalSigmasType, PredictionType, Scheduler,
    SchedulerConfig, SchedulerError, SchedulerKind, SolverType, TimestepSpacing,
};
use crate::models::sd::noise::TorchGenerator;

/// DPM-Solver++(2M). See the module documentation.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    kind: SchedulerKind,
    use_karras_sigmas: bool,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_type: FinalSigmasType,
    lambda_min_clipped: f64,
    round_karras_timesteps: bool,
    alphas_cumprod: Vec<f32>,
    /// Training sigmas `((1 - ᾱ) / ᾱ) ** 0.5`, ascending with t.
    train_sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    sigmas: Vec<f32>,
    /// Converted model outputs (data predictions) of the previous and the current step.
    model_outputs: [Option<Vec<f32>>; 2],
    lower_order_nums: usize,
    next_step: usize,
}

/// `(alpha_t, sigma_t)` of a sigma, in float32: `alpha = 1 / sqrt(sigma² + 1)`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha) - log(sigma)`, the half log-SNR.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
    /// solver_order=2)`, plus `use_karras_sigmas=True` when `karras`.
    pub fn new(config: &SchedulerConfig, karras: bool) -> Result<Self, SchedulerError> {
        let kind = if karras {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        };
        if let Some(variance_type) = &config.variance_type {
            return Err(config.unsupported(
                kind,
                "variance_type",
                format!("\"{variance_type}\""),
                "null",
            ));
        }
        let schedule = NoiseSchedule::new(config, config.rescale_betas_zero_snr, true)?;
        let train_sigmas = schedule.sigmas();
        Ok(Self {
            kind,
            use_karras_sigmas: karras || config.use_karras_sigmas,
            num_train_timesteps: config.num_train_timesteps,
            prediction_type: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            solver_type: config.solver_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigmas_type: config.final_sigmas_type,
            lambda_min_clipped: config.lambda_min_clipped,
            round_karras_timesteps: config.beta_schedule != BetaSchedule::SquaredcosCapV2,
            alphas_cumprod: schedule.alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: [None, None],
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// The timestep after which lambda(t) falls below `lambda_min_clipped` (diffusers'
    /// `num_train_timesteps - searchsorted(flip(lambda_t), lambda_min_clipped)`).
    fn last_timestep(&self) -> usize {
        let below = self
            .alphas_cumprod
            .iter()
            .map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()))
            .filter(|&l| f64::from(l) < self.lambda_min_clipped)
            .count();
        self.num_train_timesteps - below
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the predicted clean sample.
    fn data_prediction(&self, model_output: &[f32], sample: &[f32], step_index: usize) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        match self.prediction_type {
            PredictionType::Epsilon => sample
                .iter()
                .zip(model_output)
                .map(|(&x, &m)| (x - sigma_t * m) / alpha_t)
                .collect(),
            PredictionType::Sample => model_output.to_vec(),
            PredictionType::VPrediction => sample
                .iter()
                .zip(model_output)
                .map(|(&x, &m)| alpha_t * x - sigma_t * m)
                .collect(),
        }
    }

    fn first_order_update(&self, x0: &[f32], sample: &[f32], step_index: usize) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step_index]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let sample_coeff = sigma_t / sigma_s;
        let x0_coeff = alpha_t * ((-h).exp() - 1.0);
        sample
            .iter()
            .zip(x0)
            .map(|(&x, &d)| sample_coeff * x - x0_coeff * d)
            .collect()
    }

    fn second_order_update(&self, sample: &[f32], step_index: usize) -> Vec<f32> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step_index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step_index - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let m0 = self.model_outputs[1]
            .as_deref()
            .expect("current output stored");
        let m1 = self.model_outputs[0]
            .as_deref()
            .expect("previous output stored");
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d1_coeff = 1.0 / r0;
        let sample_coeff = sigma_t / sigma_s0;
        let x0_coeff = alpha_t * ((-h).exp() - 1.0);
        // midpoint: `- 0.5 * (alpha_t * (exp(-h) - 1)) * D1`;
        // heun: `+ (alpha_t * ((exp(-h) - 1) / h + 1)) * D1`.
        let midpoint_coeff = 0.5 * x0_coeff;
        let heun_coeff = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
        sample
            .iter()
            .zip(m0.iter().zip(m1))
            .map(|(&x, (&d0, &prev))| {
                let d1 = d1_coeff * (d0 - prev);
                let partial = sample_coeff * x - x0_coeff * d0;
                match self.solver_type {
                    SolverType::Midpoint => partial - midpoint_coeff * d1,
                    SolverType::Heun => partial + heun_coeff * d1,
                }
            })
            .collect()
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        self.kind
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_step_count(self.kind, num_inference_steps, self.num_train_timesteps)?;
        let train = self.num_train_timesteps;
        let last = self.last_timestep();
        let mut timesteps: Vec<i64> = match self.spacing {
            TimestepSpacing::Linspace => {
                let mut ts = np_linspace(0.0, last as f64 - 1.0, num_inference_steps + 1);
                ts.reverse();
                ts.pop();
                ts.into_iter().map(|t| t.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (last / (num_inference_steps + 1)) as i64;
                (1..=num_inference_steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / num_inference_steps as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };

        let mut sigmas: Vec<f64> = if self.use_karras_sigmas {
            let log_sigmas: Vec<f32> = self
                .train_sigmas
                .iter()
                .map(|&s| numpy_log_f32(s))
                .collect();
            let sigma_min = f64::from(self.train_sigmas[0]);
            let sigma_max = f64::from(self.train_sigmas[train - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|&sigma| {
                    let t = sigma_to_t(sigma, &log_sigmas);
                    // Cast to int64 truncates; the schedules other than cosine round first.
                    if self.round_karras_timesteps {
                        t.round_ties_even() as i64
                    } else {
                        t as i64
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| np_interp_index(t as f64, &self.train_sigmas))
                .collect()
        };
        sigmas.push(match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a = self.alphas_cumprod[0];
                f64::from(((1.0 - a) / a).sqrt())
            }
        });

        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps_f32 = timesteps.iter().map(|&t| t as f32).collect();
        self.timesteps = timesteps;
        self.model_outputs = [None, None];
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
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
        let steps = self.timesteps.len();
        check_step_index(self.kind, step_index, self.next_step, steps)?;
        check_len("model_output", model_output.len(), sample.len())?;
        let lower_order_final = step_index == steps - 1
            && (self.euler_at_final
                || (self.lower_order_final && steps < 15)
                || self.final_sigmas_type == FinalSigmasType::Zero);

        let x0 = self.data_prediction(model_output, sample, step_index);
        self.model_outputs.swap(0, 1);
        self.model_outputs[1] = Some(x0);

        let prev = if self.lower_order_nums < 1 || lower_order_final {
            let x0 = self.model_outputs[1].as_deref().expect("just stored");
            self.first_order_update(x0, sample, step_index)
        } else {
            self.second_order_update(sample, step_index)
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(prev)
    }
}
