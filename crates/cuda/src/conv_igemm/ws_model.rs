//! Host model of the warp-specialised `wgmma` kernels' stage hand-over (conv_wgmma.cu,
//! `wg_conv_ws`): one copying agent and eight math warps, `full` / `empty` mbarriers per
//! stage with the hardware's parity wait, copies that land only when the copier waits for
//! them, and `wgmma` groups that retire one chunk late (`wgmma.wait_group 1`). Random
//! interleavings check that a math warp only multiplies a stage holding its chunk, landed;
//! that the copier never overwrites a stage a warp may still read; and that nothing
//! deadlocks, for every chunk count from 1 to 24 and each stage count the kernels use.

/// An mbarrier: arrivals per phase and completed phases.
#[derive(Clone, Copy)]
struct Barrier {
    expected: u32,
    pending: u32,
    completed: u32,
}

impl Barrier {
    fn new(expected: u32) -> Self {
        Self {
            expected,
            pending: expected,
            completed: 0,
        }
    }
    fn arrive(&mut self) {
        self.pending -= 1;
        if self.pending == 0 {
            self.completed += 1;
            self.pending = self.expected;
        }
    }
    /// `mbarrier.try_wait.parity`: true once the phase of that parity has completed, as
    /// the hardware sees it (only the current phase's parity is known).
    fn try_wait(&self, parity: u32) -> bool {
        self.completed & 1 != parity
    }
}

/// What a stage of shared memory holds.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Stage {
    Empty,
    /// Chunk `c`'s copies issued, not landed.
    Copying(usize),
    Landed(usize),
}

/// The copier's program counter: the chunk whose step comes next.
struct Copier {
    c: usize,
    /// Chunks copied but not handed over yet (oldest first).
    in_flight: Vec<usize>,
    done: bool,
}

struct MathWarp {
    kt: usize,
    /// The chunk whose wgmma may still read its stage (retires at the next wait).
    reading: Option<usize>,
    done: bool,
}

/// xorshift64*: a reproducible stream for the interleavings.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

const AHEAD: usize = 2;
const WARPS: usize = 8;

/// Runs one interleaving; `Err` names the first broken rule.
fn run(chunks: usize, stages: usize, seed: u64) -> Result<(), String> {
    let mut full = vec![Barrier::new(1); stages];
    let mut empty = vec![Barrier::new(WARPS as u32); stages];
    let mut smem = vec![Stage::Empty; stages];
    let mut copier = Copier {
        c: 0,
        in_flight: Vec::new(),
        done: false,
    };
    let mut warps: Vec<MathWarp> = (0..WARPS)
        .map(|_| MathWarp {
            kt: 0,
            reading: None,
            done: false,
        })
        .collect();
    let mut rng = Rng(seed | 1);
    let hand_over = |smem: &mut Vec<Stage>, full: &mut Vec<Barrier>, c: usize| {
        let s = c % stages;
        if smem[s] != Stage::Copying(c) {
            return Err(format!("chunk {c} handed over from {:?}", smem[s]));
        }
        smem[s] = Stage::Landed(c);
        full[s].arrive();
        Ok(())
    };
    for _ in 0..100_000 {
        let runnable: Vec<usize> = (0..=WARPS)
            .filter(|&a| {
                if a == WARPS {
                    return !copier.done
                        && (copier.c >= chunks
                            || copier.c < stages
                            || empty[copier.c % stages]
                                .try_wait(((copier.c / stages - 1) & 1) as u32));
                }
                let w = &warps[a];
                !w.done
                    && (w.kt >= chunks
                        || full[w.kt % stages].try_wait(((w.kt / stages) & 1) as u32))
            })
            .collect();
        if runnable.is_empty() {
            return if copier.done && warps.iter().all(|w| w.done) {
                Ok(())
            } else {
                Err(format!(
                    "deadlock: copier at {}, warps at {:?}",
                    copier.c,
                    warps.iter().map(|w| w.kt).collect::<Vec<_>>()
                ))
            };
        }
        let a = runnable[rng.below(runnable.len())];
        if a == WARPS {
            // One copier step: a chunk's copies (then the hand-over of the one AHEAD
            // back), or the final drain.
            if copier.c < chunks {
                let c = copier.c;
                let s = c % stages;
                if let Some(w) = warps
                    .iter()
                    .find(|w| w.reading.is_some_and(|r| r % stages == s))
                {
                    return Err(format!(
                        "chunk {c} overwrites stage {s} while chunk {:?} may be read",
                        w.reading
                    ));
                }
                if let Some(w) = warps.iter().find(|w| w.kt + stages <= c) {
                    return Err(format!(
                        "chunk {c} overwrites chunk {} before it was read",
                        w.kt
                    ));
                }
                smem[s] = Stage::Copying(c);
                copier.in_flight.push(c);
                if copier.in_flight.len() > AHEAD {
                    let old = copier.in_flight.remove(0);
                    hand_over(&mut smem, &mut full, old)?;
                }
                copier.c += 1;
            } else {
                for old in std::mem::take(&mut copier.in_flight) {
                    hand_over(&mut smem, &mut full, old)?;
                }
                copier.done = true;
            }
            continue;
        }
        let w = &mut warps[a];
        if w.kt == chunks {
            // wgmma.wait_group 0, then the epilogue.
            w.reading = None;
            w.done = true;
            continue;
        }
        let s = w.kt % stages;
        if smem[s] != Stage::Landed(w.kt) {
            return Err(format!(
                "warp {a} multiplies chunk {} from {:?}",
                w.kt, smem[s]
            ));
        }
        // wgmma of kt issued; wait_group 1 retires kt - 1, whose stage is released.
        let previous = w.reading.replace(w.kt);
        if EARLY.with(|e| e.get()) {
            empty[s].arrive();
        } else if let Some(p) = previous {
            empty[p % stages].arrive();
        }
        w.kt += 1;
    }
    Err("no end within the step budget".into())
}

#[test]
fn stages_pass_between_copier_and_math_warps_without_overlap_or_deadlock() {
    for stages in [4, 5] {
        for chunks in 1..=24 {
            for seed in 0..200u64 {
                let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (chunks * 31 + stages) as u64;
                if let Err(e) = run(chunks, stages, seed) {
                    panic!("{chunks} chunks, {stages} stages, seed {seed}: {e}");
                }
            }
        }
    }
}

#[test]
fn the_model_catches_a_stage_released_too_early() {
    // Releasing a stage as soon as its wgmma is issued (no wait for it to retire) must
    // be caught: the copier may then refill a stage that is still being read.
    let stages = 4;
    let mut caught = false;
    for seed in 0..500u64 {
        if run_releasing_early(12, stages, seed).is_err() {
            caught = true;
            break;
        }
    }
    assert!(caught, "an early release went unnoticed");
}

/// [`run`] with the bug the test above looks for: `reading` is cleared at issue.
fn run_releasing_early(chunks: usize, stages: usize, seed: u64) -> Result<(), String> {
    EARLY.with(|e| e.set(true));
    let r = run(chunks, stages, seed);
    EARLY.with(|e| e.set(false));
    r
}

thread_local! {
    static EARLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[test]
fn the_model_has_the_kernels_constants() {
    let source = super::WGMMA_SOURCE;
    let ahead = crate::kernels::source_define(source, "conv_wgmma.cu", "WG_WS_AHEAD");
    assert_eq!(ahead, AHEAD);
    // 128 copying threads arrive on `full`, each of the eight math warps on `empty`.
    assert!(source.contains("wg_mbar_init(full + 8 * s, 128);"));
    assert!(source.contains(&format!("wg_mbar_init(empty + 8 * s, {WARPS});")));
    assert!(source.contains("if (kt > 0 && (tid & 31) == 0) wg_mbar_arrive(empty"));
}
