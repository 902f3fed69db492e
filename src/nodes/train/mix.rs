//! Mixing several training sources (a real split plus generated images) with a ratio.
//!
//! Semantics of `mix = { "<data reference>" = fraction, ... }`:
//! - an epoch keeps the unmixed size: as many samples as there are images in all sources together;
//! - a named source supplies `fraction` of each epoch's samples; the sources not named share the
//!   rest in proportion to their sizes; quotas are rounded by largest remainder so they add up to
//!   the epoch size exactly;
//! - a source draws its quota from its own shuffle for (seed, epoch); a quota larger than the
//!   source walks further reshuffled passes, so an image repeats only after all others were drawn;
//! - every sample gets an augmentation id `image + pass * total images`: a repeated image gets a
//!   different crop each time, and everything is a pure function of (seed, epoch), so resuming
//!   after a kill draws the same samples.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One training source: images `start..start + len` of the concatenated image list.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub start: usize,
    pub len: usize,
}

/// Samples per source for an epoch of `total` samples. `fractions[i]` is source i's fraction
/// when named; the unnamed ones share what is left by size.
pub fn quotas(sources: &[Source], fractions: &[Option<f64>]) -> Vec<usize> {
    let total: usize = sources.iter().map(|s| s.len).sum();
    let named: f64 = fractions.iter().flatten().sum();
    let rest = (1.0 - named).max(0.0);
    let unnamed_size: usize = sources
        .iter()
        .zip(fractions)
        .filter(|(_, f)| f.is_none())
        .map(|(s, _)| s.len)
        .sum();
    let exact: Vec<f64> = sources
        .iter()
        .zip(fractions)
        .map(|(s, f)| {
            let share = match f {
                Some(f) => *f,
                None if unnamed_size > 0 => rest * s.len as f64 / unnamed_size as f64,
                None => 0.0,
            };
            share * total as f64
        })
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    // Largest remainder; ties go to the earlier source, so the result is deterministic.
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// The epoch's samples, shuffled: (image index, augmentation id).
pub fn epoch_samples(
    sources: &[Source],
    quotas: &[usize],
    seed: u64,
    epoch: u32,
) -> Vec<(usize, u64)> {
    let total: usize = sources.iter().map(|s| s.len).sum();
    let mut samples = Vec::with_capacity(quotas.iter().sum());
    for (si, (source, &quota)) in sources.iter().zip(quotas).enumerate() {
        if source.len == 0 {
            continue;
        }
        let mut drawn = 0;
        let mut pass = 0u64;
        while drawn < quota {
            let mut order: Vec<usize> = (source.start..source.start + source.len).collect();
            order.shuffle(&mut source_rng(seed, epoch, si as u64, pass));
            for &image in order.iter().take(quota - drawn) {
                samples.push((image, image as u64 + pass * total as u64));
            }
            drawn += source.len.min(quota - drawn);
            pass += 1;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(epoch));
    samples.shuffle(&mut rng);
    samples
}

fn source_rng(seed: u64, epoch: u32, source: u64, pass: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_7800_0000_0000);
    // Distinct streams per (epoch, source, pass): 32 bits of epoch, 16 of source, 16 of pass.
    rng.set_stream((u64::from(epoch) << 32) | (source << 16) | (pass & 0xffff));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(lens: &[usize]) -> Vec<Source> {
        let mut start = 0;
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let s = Source {
                    name: format!("s{i}"),
                    start,
                    len,
                };
                start += len;
                s
            })
            .collect()
    }

    #[test]
    fn quotas_follow_the_fractions_and_fill_the_epoch() {
        // 18 real + 6 synthetic = 24 per epoch; real at 0.25 -> 6, synthetic the other 18.
        let s = sources(&[18, 6]);
        assert_eq!(quotas(&s, &[Some(0.25), None]), vec![6, 18]);
        // Unnamed sources split the rest by size: 0.5 of 40 = 20 to s0, 20 split 10:10 by size 10:10.
        let s = sources(&[20, 10, 10]);
        assert_eq!(quotas(&s, &[Some(0.5), None, None]), vec![20, 10, 10]);
        // 1/3 of 10 = 3.33 each: the one left over goes to the first source.
        let s = sources(&[4, 3, 3]);
        let q = quotas(&s, &[Some(1.0 / 3.0), Some(1.0 / 3.0), Some(1.0 / 3.0)]);
        assert_eq!(q, vec![4, 3, 3]);
    }

    #[test]
    fn samples_are_deterministic_and_oversampled_sources_cycle() {
        let s = sources(&[18, 6]);
        let q = quotas(&s, &[Some(0.25), None]);
        let a = epoch_samples(&s, &q, 7, 3);
        assert_eq!(a, epoch_samples(&s, &q, 7, 3));
        assert_ne!(a, epoch_samples(&s, &q, 7, 4));
        assert_eq!(a.len(), 24);
        let real: Vec<usize> = a.iter().map(|x| x.0).filter(|&i| i < 18).collect();
        let mut distinct = real.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            (real.len(), distinct.len()),
            (6, 6),
            "no repeats below the size"
        );
        // Synthetic: 18 samples of 6 images, each exactly 3 times with 3 different augmentations.
        for image in 18..24 {
            let mut ids: Vec<u64> = a.iter().filter(|x| x.0 == image).map(|x| x.1).collect();
            ids.sort();
            assert_eq!(
                ids,
                vec![image as u64, image as u64 + 24, image as u64 + 48]
            );
        }
    }
}
