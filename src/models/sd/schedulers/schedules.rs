//! Numeric pieces shared by the schedulers. Each one reproduces the arithmetic of the torch or
//! numpy call diffusers makes (dtype, order of operations, fused multiply-adds), because the
//! schedulers are compared against diffusers to about 1e-6.

use super::{BetaSchedule, SchedulerConfig, SchedulerError, SchedulerKind, TimestepSpacing};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: the step is computed in
/// f32, the first half counts up from `start`, the second half down from `end`, each value one
/// fused multiply-add (torch's AVX2 kernel is built with FMA contraction).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps as f32 - 1.0);
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on the CPU: the running product is kept in f64.
pub(crate) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&v| {
            product *= f64::from(v);
            product as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last value set to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut out: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i * delta` with `delta = (start + step) - start`, as numpy's fill does.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let length = ((stop - start) / step).ceil();
    // An empty range, or a NaN length from a zero step.
    if length.is_nan() || length <= 0.0 {
        return Vec::new();
    }
    let length = length as usize;
    let delta = (start + step) - start;
    (0..length)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one point, in float64 as numpy computes it.
pub(crate) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    if x < 0.0 {
        return f64::from(fp[0]);
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if xj == x {
        return f64::from(fp[j]);
    }
    let (yj, yk) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (yk - yj) / ((j + 1) as f64 - xj);
    let value = slope * (x - xj) + yj;
    if value.is_nan() {
        let value = slope * (x - (j + 1) as f64) + yk;
        if value.is_nan() && yj == yk {
            return yj;
        }
        return value;
    }
    value
}

/// diffusers' `betas_for_alpha_bar` (cosine), computed in Python floats, stored as float32.
fn betas_for_alpha_bar(steps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..steps)
        .map(|i| {
            let t1 = i as f64 / steps as f64;
            let t2 = (i + 1) as f64 / steps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 tensor arithmetic.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let alphas_cumprod = torch_cumprod_f32(&alphas);
    let mut sqrt_bar: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for value in sqrt_bar.iter_mut() {
        *value = (*value - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut rescaled = Vec::with_capacity(bar.len());
    rescaled.push(1.0 - bar[0]);
    for pair in bar.windows(2) {
        rescaled.push(1.0 - pair[1] / pair[0]);
    }
    rescaled
}

/// The training noise schedule every scheduler starts from.
#[derive(Debug, Clone)]
pub(crate) struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Betas from the config (`trained_betas` first, then `beta_schedule`), optionally rescaled
    /// to zero terminal SNR, and their cumulative alpha products. `pin_last_alpha` is set by the
    /// schedulers that, after the rescale, replace the last product (zero) with 2^-24.
    pub fn new(
        config: &SchedulerConfig,
        rescale_to_zero_snr: bool,
        pin_last_alpha: bool,
    ) -> Result<Self, SchedulerError> {
        let steps = config.num_train_timesteps;
        if steps < 2 {
            return Err(config.invalid(
                "num_train_timesteps",
                steps.to_string(),
                "it must be at least 2",
            ));
        }
        let mut betas = match &config.trained_betas {
            Some(trained) => {
                if trained.len() != steps {
                    return Err(config.invalid(
                        "trained_betas",
                        format!("{} values", trained.len()),
                        &format!("it must hold num_train_timesteps = {steps} values"),
                    ));
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            None => match config.beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(config.beta_start, config.beta_end, steps)
                }
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), steps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(steps),
            },
        };
        if rescale_to_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = torch_cumprod_f32(&alphas);
        if rescale_to_zero_snr && pin_last_alpha {
            *alphas_cumprod.last_mut().expect("at least 2 steps") = 2f32.powi(-24);
        }
        Ok(Self { alphas_cumprod })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `np.log` of a float32 array, as numpy computes it on x86-64 with AVX2/AVX-512: not libm's
/// `logf`, but a rational minimax approximation evaluated with fused multiply-adds (about a fifth
/// of its results differ from the correctly rounded logarithm). Only the positive normal inputs
/// the schedulers pass are handled.
#[allow(clippy::excessive_precision)]
pub(crate) fn numpy_log_f32(x: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999_999_999_999_998_702_752e-1,
        2.112_677_543_073_053_063_722,
        1.480_000_633_576_506_585_156,
        3.808_837_741_388_407_920_751e-1,
        2.589_979_117_907_922_693_523e-2,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612_677_543_073_109_236_779,
        2.453_006_071_784_736_363_091,
        9.864_942_958_519_418_960_339e-1,
        1.546_476_374_983_906_719_538e-1,
        5.875_095_403_124_574_342_950e-3,
    ];
    // Mantissa in [0.5, 1) and its exponent; below sqrt(1/2) the mantissa is doubled.
    let bits = x.to_bits();
    let mut exponent = ((bits >> 23) as i32 - 126) as f32;
    let mut mantissa = f32::from_bits((bits & 0x007f_ffff) | (126 << 23));
    if mantissa <= std::f32::consts::FRAC_1_SQRT_2 {
        mantissa += mantissa;
        exponent -= 1.0;
    }
    let y = mantissa - 1.0;
    let numerator = P[..5].iter().rev().fold(P[5], |acc, &p| acc.mul_add(y, p));
    let denominator = Q[..5].iter().rev().fold(Q[5], |acc, &q| acc.mul_add(y, q));
    exponent.mul_add(std::f32::consts::LN_2, numerator / denominator)
}

/// Karras et al. (2022) sigmas, `rho = 7`, as diffusers' `_convert_to_karras` computes them.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches, by linear
/// interpolation between the two neighbouring training log-sigmas (`log_sigmas` ascending, f32).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(): the first index where the running count peaks.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `(sigma ** 2 + 1) ** 0.5` in float32, the input scaling of the sigma-based schedulers.
pub(crate) fn sigma_input_scale(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// Checks a flat tensor's length against the expected one.
pub(crate) fn check_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), SchedulerError> {
    if got == expected {
        Ok(())
    } else {
        Err(SchedulerError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// The float32 timesteps of diffusers' Euler schedulers for a spacing, descending.
pub(crate) fn euler_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train_steps - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            np_arange(train_steps as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| t.round_ties_even() as f32 - 1.0)
                .collect()
        }
    }
}

/// Euler-family `init_noise_sigma`: the largest sigma, scaled as a model input for "leading"
/// spacing (diffusers' rule, shared by Euler and Euler ancestral).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => sigma_input_scale(max_sigma),
    }
}

/// Euler-family `scale_model_input`: divides the sample by sqrt(sigma^2 + 1) of this step.
pub(crate) fn scale_by_sigma(
    kind: SchedulerKind,
    sigmas: &[f32],
    steps: usize,
    sample: &[f32],
    step_index: usize,
) -> Result<Vec<f32>, SchedulerError> {
    let sigma = *sigmas
        .get(step_index)
        .ok_or(SchedulerError::StepIndexOutOfRange {
            kind,
            index: step_index,
            steps,
        })?;
    let scale = sigma_input_scale(sigma);
    Ok(sample.iter().map(|&x| x / scale).collect())
}
