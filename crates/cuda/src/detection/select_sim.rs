//! A host model of `det_topk_select` (kernels/detection.cu), step for step: the order
//! key, the radix passes over eight-bit digits, the selection of keys above the
//! threshold and of the first keys equal to it in blockDim-sized chunks, and the rank
//! among the K taken. Checked against a sort on ties, infinities, NaN and both zeros, so
//! the algorithm's edge cases are tested without a GPU; the kernel itself is checked
//! against a host sort by `aperture check-dfine`.

use super::boxes::rank;

/// The kernel's `det_order_key`.
fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    let v = if v == 0.0 { 0.0 } else { v };
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The kernel on one image of `scores` with `block` threads.
fn select(scores: &[f32], k: usize, block: usize) -> Vec<usize> {
    let keys: Vec<u32> = scores.iter().map(|&v| order_key(v)).collect();
    // 1. Radix passes.
    let (mut prefix, mut mask, mut need) = (0u32, 0u32, k as u32);
    for shift in [24u32, 16, 8, 0] {
        let mut hist = [0u32; 256];
        for &key in &keys {
            if key & mask == prefix {
                hist[((key >> shift) & 255) as usize] += 1;
            }
        }
        let (mut above, mut d) = (0u32, 255usize);
        while d > 0 && above + hist[d] < need {
            above += hist[d];
            d -= 1;
        }
        prefix |= (d as u32) << shift;
        need -= above;
        mask |= 255 << shift;
    }
    // 2. Keys above the threshold (order does not matter), then equal ones by index.
    let mut taken: Vec<(u32, usize)> = vec![(0, usize::MAX); k];
    let mut at = 0;
    for (j, &key) in keys.iter().enumerate() {
        if key > prefix {
            taken[at] = (key, j);
            at += 1;
        }
    }
    let first_equal = k - need as usize;
    assert_eq!(at, first_equal, "keys above the threshold");
    let mut seen = 0usize;
    let mut j0 = 0;
    while j0 < keys.len() && seen < need as usize {
        let chunk = j0..(j0 + block).min(keys.len());
        for j in chunk.clone() {
            let before = seen
                + chunk
                    .clone()
                    .filter(|&i| i < j && keys[i] == prefix)
                    .count();
            if keys[j] == prefix && before < need as usize {
                taken[first_equal + before] = (prefix, j);
            }
        }
        seen += chunk.filter(|&i| keys[i] == prefix).count();
        j0 += block;
    }
    // 3. Rank among the taken.
    let mut out = vec![usize::MAX; k];
    for &(kt, it) in &taken {
        let r = taken
            .iter()
            .filter(|&&(ku, iu)| ku > kt || (ku == kt && iu < it))
            .count();
        out[r] = it;
    }
    out
}

#[test]
fn order_keys_follow_the_scores() {
    let values = [
        f32::NEG_INFINITY,
        -3.5,
        -1e-30,
        -0.0,
        0.0,
        1e-30,
        0.25,
        7.0,
        f32::INFINITY,
    ];
    for w in values.windows(2) {
        let (a, b) = (order_key(w[0]), order_key(w[1]));
        if w[0] == w[1] {
            assert_eq!(a, b, "{} and {} must tie", w[0], w[1]);
        } else {
            assert!(a < b, "{} before {}", w[1], w[0]);
        }
    }
    assert!(order_key(f32::NAN) > order_key(f32::INFINITY));
    assert_eq!(order_key(f32::NAN), order_key(-f32::NAN));
}

#[test]
fn radix_select_matches_a_sort_on_ties_zeros_and_infinities() {
    let levels = [-4.0, -0.0, 0.0, 0.5, 2.0, f32::INFINITY, f32::NEG_INFINITY];
    for (case, (l, k, block)) in [
        (8400, 300, 1024),
        (37, 37, 1024),
        (1500, 1, 1024),
        (3000, 2048, 1024),
        (2500, 700, 64),
        (5, 5, 32),
    ]
    .into_iter()
    .enumerate()
    {
        let r = crate::test_uniform(l, case as u64 + 1);
        let tied: Vec<f32> = r
            .iter()
            .map(|&v| levels[(v * levels.len() as f32) as usize % levels.len()])
            .collect();
        let distinct: Vec<f32> = r.iter().map(|&v| v * 8.0 - 4.0).collect();
        let coarse: Vec<f32> = r.iter().map(|&v| (v * 64.0).floor() / 64.0).collect();
        for (name, scores) in [("tied", tied), ("distinct", distinct), ("coarse", coarse)] {
            assert_eq!(
                select(&scores, k, block),
                rank(&scores, k),
                "{name} scores, {l} rows, top {k}, {block} threads"
            );
        }
    }
}

#[test]
fn all_equal_scores_come_back_in_index_order() {
    let scores = vec![1.0f32; 3000];
    assert_eq!(select(&scores, 2048, 1024), (0..2048).collect::<Vec<_>>());
}
