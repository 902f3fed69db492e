//! diffusers' `PNDMScheduler` (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"),
//! SD-1.5's default scheduler.
//!
//! With `skip_prk_steps` (SD-1.5) it runs pseudo linear multistep (PLMS) steps only. Its second
//! model call repeats the first step's target timestep: diffusers' schedule for 50 steps reads
//! 981, 961, 961, 941, ..., 1 (51 calls). The first call takes an Euler-like step to 961; the
//! second evaluates the model there and redoes the step from the starting sample at 981 with the
//! average of both outputs; later steps use the 2nd, 3rd and 4th order Adams–Bashforth
//! combinations of the stored outputs. Without `skip_prk_steps` the first 12 calls are the
//! paper's Runge–Kutta warm-up.

use std::borrow::Cow;

use super::schedules::{check_len, np_arange, np_linspace, NoiseSchedule};
use super::{
    check_step_count, check_step_index, PredictionType, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerKind, TimestepSpacing,
};
use crate::models::sd::noise::TorchGenerator;

const KIND: SchedulerKind = SchedulerKind::Pndm;

/// PNDM / PLMS. See the module documentation.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    skip_prk_steps: bool,
    alphas_cumprod: Vec<f32>,
    /// The "previous" alpha product of the last step.
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// The Runge–Kutta part of `timesteps` (empty with `skip_prk_steps`).
    prk_timesteps: Vec<i64>,
    /// Steps taken since `set_timesteps` (diffusers' `counter`).
    counter: usize,
    /// Past model outputs used by the multistep formulas (diffusers' `ets`).
    ets: Vec<Vec<f32>>,
    /// Runge–Kutta accumulator (diffusers' `cur_model_output`; `None` is its 0).
    rk_accumulator: Option<Vec<f32>>,
    /// The sample a multi-call step starts from (diffusers' `cur_sample`).
    cur_sample: Option<Vec<f32>>,
}

impl PndmScheduler {
    /// `PNDMScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        if config.prediction_type == PredictionType::Sample {
            return Err(config.unsupported(
                KIND,
                "prediction_type",
                "\"sample\"".to_owned(),
                "epsilon, v_prediction",
            ));
        }
        // PNDMScheduler has no `rescale_betas_zero_snr` parameter: from_config ignores the key.
        let schedule = NoiseSchedule::new(config, false, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            num_train_timesteps: config.num_train_timesteps,
            prediction_type: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            skip_prk_steps: config.skip_prk_steps,
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            prk_timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            rk_accumulator: None,
            cur_sample: None,
        })
    }

    /// The ascending base schedule (diffusers' `_timesteps`).
    fn base_timesteps(&self, steps: usize) -> Vec<i64> {
        let train = self.num_train_timesteps;
        match self.spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (train / steps) as i64;
                (0..steps as i64)
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                let mut ts: Vec<i64> = np_arange(train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect();
                ts.reverse();
                ts
            }
        }
    }

    /// `alphas_cumprod[t]` with Python's indexing: diffusers' trailing spacing can produce
    /// timestep -1 (e.g. 61 of 1000 steps), which Python reads as the last entry.
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

    /// diffusers' `_get_prev_sample`, formula (9) of the PNDM paper, in float32.
    fn prev_sample(
        &self,
        sample: &[f32],
        timestep: i64,
        prev_timestep: i64,
        model_output: &[f32],
    ) -> Result<Vec<f32>, SchedulerError> {
        let alpha_prod_t = self.alpha_cumprod_at(timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.alpha_cumprod_at(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let epsilon: Cow<'_, [f32]> = match self.prediction_type {
            PredictionType::VPrediction => {
                let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
                model_output
                    .iter()
                    .zip(sample)
                    .map(|(&v, &x)| sa * v + sb * x)
                    .collect::<Vec<f32>>()
                    .into()
            }
            _ => Cow::Borrowed(model_output),
        };

        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denominator = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let alpha_diff = alpha_prod_t_prev - alpha_prod_t;
        Ok(sample
            .iter()
            .zip(epsilon.iter())
            .map(|(&x, &e)| sample_coeff * x - alpha_diff * e / denominator)
            .collect())
    }

    /// diffusers' `step_prk`: one call of the 4-call Runge–Kutta warm-up.
    fn step_prk(
        &mut self,
        model_output: &[f32],
        timestep: i64,
        sample: &[f32],
    ) -> Result<Vec<f32>, SchedulerError> {
        let half_ratio = (self.num_train_timesteps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half_ratio };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];

        let mut combined: Option<Vec<f32>> = None;
        match self.counter % 4 {
            0 => {
                // `0 + 1/6 * m`: adding zero leaves the product unchanged.
                self.rk_accumulator = Some(scaled(model_output, (1.0f64 / 6.0) as f32));
                self.ets.push(model_output.to_vec());
                self.cur_sample = Some(sample.to_vec());
            }
            1 | 2 => {
                let third = (1.0f64 / 3.0) as f32;
                match self.rk_accumulator.as_mut() {
                    Some(acc) => {
                        for (a, &m) in acc.iter_mut().zip(model_output) {
                            *a += third * m;
                        }
                    }
                    None => self.rk_accumulator = Some(scaled(model_output, third)),
                }
            }
            _ => {
                let sixth = (1.0f64 / 6.0) as f32;
                let acc = self.rk_accumulator.take();
                combined = Some(match acc {
                    Some(acc) => acc
                        .iter()
                        .zip(model_output)
                        .map(|(&a, &m)| a + sixth * m)
                        .collect(),
                    None => scaled(model_output, sixth),
                });
            }
        }
        let model_output = combined.as_deref().unwrap_or(model_output);
        let start = self.cur_sample.as_deref().unwrap_or(sample);
        self.prev_sample(start, timestep, prev_timestep, model_output)
    }

    /// diffusers' `step_plms`: one linear multistep call.
    fn step_plms(
        &mut self,
        model_output: &[f32],
        mut timestep: i64,
        sample: &[f32],
    ) -> Result<Vec<f32>, SchedulerError> {
        let ratio = (self.num_train_timesteps / self.num_inference_steps) as i64;
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.to_vec());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }

        let n = self.ets.len();
        let mut start: Cow<'_, [f32]> = Cow::Borrowed(sample);
        let combined: Vec<f32> = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_vec());
            model_output.to_vec()
        } else if n == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                start = Cow::Owned(cur);
            }
            let e1 = &self.ets[0];
            model_output
                .iter()
                .zip(e1)
                .map(|(&m, &e)| (m + e) / 2.0)
                .collect()
        } else if n == 2 {
            let (e1, e2) = (&self.ets[1], &self.ets[0]);
            e1.iter()
                .zip(e2)
                .map(|(&a, &b)| (3.0 * a - b) / 2.0)
                .collect()
        } else if n == 3 {
            let (e1, e2, e3) = (&self.ets[2], &self.ets[1], &self.ets[0]);
            (0..e1.len())
                .map(|i| (23.0 * e1[i] - 16.0 * e2[i] + 5.0 * e3[i]) / 12.0)
                .collect()
        } else {
            let (e1, e2, e3, e4) = (&self.ets[3], &self.ets[2], &self.ets[1], &self.ets[0]);
            let a24 = (1.0f64 / 24.0) as f32;
            (0..e1.len())
                .map(|i| a24 * (55.0 * e1[i] - 59.0 * e2[i] + 37.0 * e3[i] - 9.0 * e4[i]))
                .collect()
        };
        self.prev_sample(&start, timestep, prev_timestep, &combined)
    }
}

/// `factor * values` in float32.
fn scaled(values: &[f32], factor: f32) -> Vec<f32> {
    values.iter().map(|&v| factor * v).collect()
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        KIND
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_step_count(KIND, num_inference_steps, self.num_train_timesteps)?;
        let base = self.base_timesteps(num_inference_steps);
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(SchedulerError::TooFewStepsForWarmUp {
                    steps: num_inference_steps,
                });
            }
            let half_ratio = (self.num_train_timesteps / num_inference_steps / 2) as i64;
            // [t, t + h] for each of the last 4 timesteps, all but the last value doubled,
            // the first and last of those dropped, reversed.
            let pairs: Vec<i64> = base[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half_ratio])
                .collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk: Vec<i64> = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.num_inference_steps = num_inference_steps;
        self.timesteps = prk.iter().chain(&plms).copied().collect();
        self.timesteps_f32 = self.timesteps.iter().map(|&t| t as f32).collect();
        self.prk_timesteps = prk;
        self.counter = 0;
        self.ets.clear();
        self.rk_accumulator = None;
        self.cur_sample = None;
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
        check_step_index(KIND, step_index, self.counter, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let timestep = self.timesteps[step_index];
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)?
        } else {
            self.step_plms(model_output, timestep, sample)?
        };
        self.counter += 1;
        Ok(prev)
    }
}
