//! A host model of `det_select_winners` (kernels/detection.cu), the one-block radix
//! select behind both the query selection (`det_topk_select`, keys from
//! `det_order_key`) and the detections' top-k (`det_topk_detections`, sigmoid keys),
//! step for step: threads own contiguous chunks, warp 0 picks each pass's bin lane by
//! lane, an ordered compaction, the rank among the K taken. Checked against a sort on
//! ties, infinities, NaN and both zeros, so the algorithm's edge cases are tested
//! without a GPU; the kernels themselves are checked against a host sort by
//! `aperture check-dfine`.

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

/// The selection kernel step by step on the host (threads own contiguous chunks;
/// warp 0 picks bins lane by lane), returning (key, index) best first.
pub(super) fn simulate(keys: &[u32], k: usize, threads: usize) -> Vec<(u32, usize)> {
    let n = keys.len();
    let chunk = n.div_ceil(threads);
    let (mut prefix, mut mask, mut need) = (0u32, 0u32, k as i64);
    for shift in [24u32, 16, 8, 0] {
        let mut hist = [0i64; 256];
        for &key in keys.iter().filter(|&&key| key & mask == prefix) {
            hist[((key >> shift) & 0xff) as usize] += 1;
        }
        // det_pick_bin: lane l sums bins 255 - 8l - j; inclusive scan over lanes.
        let mut incl = 0i64;
        let mut picked = None;
        for lane in 0..32usize {
            let c: Vec<i64> = (0..8).map(|j| hist[255 - 8 * lane - j]).collect();
            let sum: i64 = c.iter().sum();
            let mut above = incl;
            incl += sum;
            if above < need && need <= incl {
                for (j, &cj) in c.iter().enumerate() {
                    if above + cj >= need {
                        assert!(picked.is_none(), "two lanes picked a bin");
                        picked = Some(((255 - 8 * lane - j) as u32, need - above));
                        break;
                    }
                    above += cj;
                }
            }
        }
        let (digit, left) = picked.expect("a bin holds the k-th key");
        prefix |= digit << shift;
        mask |= 0xff << shift;
        need = left;
    }
    let kth = prefix;
    let gt_total = k - need as usize;
    // Ordered compaction: exclusive prefix of per-thread counts in thread order.
    let own = |t: usize| (t * chunk).min(n)..((t + 1) * chunk).min(n);
    let (mut g, mut e) = (0usize, 0usize);
    let mut cand = vec![(u32::MAX, usize::MAX); k];
    for t in 0..threads {
        for i in own(t) {
            if keys[i] > kth {
                cand[g] = (keys[i], i);
                g += 1;
            } else if keys[i] == kth {
                if e < need as usize {
                    cand[gt_total + e] = (keys[i], i);
                }
                e += 1;
            }
        }
    }
    assert_eq!(g, gt_total, "keys above the k-th");
    let mut out = vec![(0u32, usize::MAX); k];
    for &(kj, ij) in &cand {
        let rank = cand
            .iter()
            .filter(|&&(km, im)| km > kj || (km == kj && im < ij))
            .count();
        out[rank] = (kj, ij);
    }
    out
}

/// The query selection on one image: its order keys through the model above.
fn select(scores: &[f32], k: usize, threads: usize) -> Vec<usize> {
    let keys: Vec<u32> = scores.iter().map(|&v| order_key(v)).collect();
    simulate(&keys, k, threads)
        .into_iter()
        .map(|(_, i)| i)
        .collect()
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
