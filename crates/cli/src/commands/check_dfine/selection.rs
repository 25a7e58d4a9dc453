//! The device query selection (`select_rows`: top-k over row maxima, then gathers) on
//! scores built to be hard for it: long runs of equal values, NaN, both zeros, infinities,
//! and more rows than the kernel's block. Each row carries its own index as payload, so
//! the check compares the picked indices exactly with a sort on the host.

use std::cmp::Ordering;

use anyhow::ensure;
use aperture_cuda::CudaBackend;
use aperture_engine::{Backend, HostTensor, Precision};

use super::ops::random;

/// Score levels exact in fp16 and bf16, so the expected order does not depend on the
/// storage type.
const LEVELS: [f32; 11] = [-4.0, -1.5, -0.25, -0.0, 0.0, 0.25, 0.5, 1.75, 2.0, 3.5, 4.0];

/// Rows of one image by score, larger first, ties by lower index. A row's score is the
/// maximum over its channels, which skips NaN (the CPU backend's `f32::max`): with one
/// channel a NaN row scores -inf.
fn expected(scores: &[f32], k: usize) -> Vec<usize> {
    let score = |i: usize| {
        if scores[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&i, &j| {
        score(j)
            .partial_cmp(&score(i))
            .unwrap_or(Ordering::Equal)
            .then(i.cmp(&j))
    });
    idx.truncate(k);
    idx
}

/// Image `b` of `l` rows: 0 many ties among a few levels with rare NaN and infinities,
/// 1 distinct values, 2 all zeros of both signs.
fn image_scores(b: usize, l: usize) -> Vec<f32> {
    let r = random(70 + b as u64, l, 0.0, 1.0);
    (0..l)
        .map(|j| match b % 3 {
            0 => match j % 1009 {
                17 | 400 => f32::NAN,
                3 => f32::INFINITY,
                5 => f32::NEG_INFINITY,
                _ => LEVELS[(r[j] * LEVELS.len() as f32) as usize % LEVELS.len()],
            },
            // Multiples of 1/64 below 64: exact in fp16; bf16 rounds some together,
            // which the expectation below follows by reading the stored values back.
            1 => (r[j] * 4096.0).floor() / 64.0,
            _ => {
                if j % 2 == 0 {
                    0.0
                } else {
                    -0.0
                }
            }
        })
        .collect()
}

/// Checks `select_rows` on `be` for `(images, rows, k)` cases; returns one line per case.
pub fn check(be: &CudaBackend, p: Precision) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (images, l, k) in [(3, 8400, 300), (3, 37, 37), (4, 1500, 1), (2, 3000, 2048)] {
        let scores: Vec<f32> = (0..images).flat_map(|b| image_scores(b, l)).collect();
        // Payload: the row index as (index / 64, index % 64), exact in every storage type.
        let payload: Vec<f32> = (0..images)
            .flat_map(|_| (0..l).flat_map(|j| [(j / 64) as f32, (j % 64) as f32]))
            .collect();
        let s = be.upload_nhwc(&HostTensor::from_f32(vec![images, 1, l, 1], scores)?)?;
        let stored = be.download_nhwc(&s)?.to_f32_vec();
        let rows = be.upload_nhwc(&HostTensor::from_f32(vec![images, 1, l, 2], payload)?)?;
        let picked = be.select_rows(&s, k, &[&rows])?;
        let got = be
            .download_nhwc(picked.first().ok_or_else(|| anyhow::anyhow!("no rows"))?)?
            .to_f32_vec();
        for b in 0..images {
            let want = expected(&stored[b * l..(b + 1) * l], k);
            let got_b: Vec<usize> = got[b * k * 2..(b + 1) * k * 2]
                .chunks(2)
                .map(|v| v[0] as usize * 64 + v[1] as usize)
                .collect();
            let first_diff = want.iter().zip(&got_b).position(|(w, g)| w != g);
            ensure!(
                first_diff.is_none(),
                "{p} select_rows {l} rows, top {k}, image {b}: rank {} is row {} (want {})",
                first_diff.unwrap_or(0),
                first_diff.map(|i| got_b[i]).unwrap_or(0),
                first_diff.map(|i| want[i]).unwrap_or(0),
            );
        }
        lines.push(format!(
            "{p:>5} select_rows {images} x {l} rows, top {k}: indices identical to a host sort ok"
        ));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_order_ranks_nan_as_minus_infinity_and_keeps_ties_in_index_order() {
        let s = [
            0.5,
            f32::NAN,
            -0.0,
            0.5,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        assert_eq!(expected(&s, 7), vec![5, 0, 3, 2, 4, 1, 6]);
        assert_eq!(expected(&s, 2), vec![5, 0]);
    }

    #[test]
    fn crafted_images_have_ties_nan_and_both_zeros() {
        let tied = image_scores(0, 8400);
        assert_eq!(tied.iter().filter(|v| v.is_nan()).count(), 17);
        let top = tied.iter().filter(|&&v| v == 4.0).count();
        assert!(top > 300, "the top level must be tied beyond k: {top}");
        let zeros = image_scores(2, 10);
        assert!(zeros.iter().all(|&v| v == 0.0));
        assert!(zeros.iter().any(|v| v.is_sign_negative()));
    }
}
