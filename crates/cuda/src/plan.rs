//! Offset planning for a captured forward pass: the allocation sequence of a recorded
//! pass gives every buffer a lifetime, and each buffer gets an offset in one
//! preallocated block that no buffer alive at the same time uses. Two placements are
//! tried (allocation order, first fit; largest first) and the smaller block is kept.
//! The graph then owns exactly one allocation, close to the pass's largest live set.

use std::collections::HashMap;

/// One event of a recorded pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AllocEvent {
    Alloc { id: u64, size: usize },
    Free { id: u64 },
}

/// Offsets for each allocation in order, and the total size of the block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub sizes: Vec<usize>,
    pub offsets: Vec<usize>,
    pub total: usize,
    /// The most bytes alive at any one time: no placement can use less than this.
    pub live_peak: usize,
}

/// One buffer's size and lifetime in event positions: alive over `start..end`.
#[derive(Clone, Copy, Debug)]
struct Lifetime {
    size: usize,
    start: usize,
    end: usize,
}

impl Lifetime {
    fn overlaps(&self, other: &Lifetime) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Lifetimes in allocation order; buffers never freed live to the end.
fn lifetimes(events: &[AllocEvent]) -> Vec<Lifetime> {
    let mut out: Vec<Lifetime> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for (at, ev) in events.iter().enumerate() {
        match *ev {
            AllocEvent::Alloc { id, size } => {
                index.insert(id, out.len());
                out.push(Lifetime {
                    size,
                    start: at,
                    end: events.len() + 1,
                });
            }
            AllocEvent::Free { id } => {
                if let Some(i) = index.remove(&id) {
                    out[i].end = at;
                }
            }
        }
    }
    out
}

/// The lowest offset where `size` bytes fit between `taken` ranges (sorted by offset).
fn lowest_gap(taken: &[(usize, usize)], size: usize) -> usize {
    let mut at = 0usize;
    for &(off, sz) in taken {
        if off >= at + size {
            break;
        }
        at = at.max(off + sz);
    }
    at
}

/// Places buffers in allocation order, each at the lowest free offset (first fit).
fn first_fit(life: &[Lifetime]) -> Vec<usize> {
    let mut offsets = vec![0usize; life.len()];
    for i in 0..life.len() {
        let mut taken: Vec<(usize, usize)> = (0..i)
            .filter(|&j| life[j].overlaps(&life[i]))
            .map(|j| (offsets[j], life[j].size))
            .collect();
        taken.sort_unstable();
        offsets[i] = lowest_gap(&taken, life[i].size);
    }
    offsets
}

/// Places the largest buffers first, each at the lowest offset free for its whole
/// lifetime. Large activations then stack without small ones splitting the space
/// between them, which first fit does when a small buffer outlives its neighbours.
fn greedy_by_size(life: &[Lifetime]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..life.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(life[i].size), life[i].start));
    let mut offsets = vec![0usize; life.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(life.len());
    for i in order {
        let mut taken: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| life[j].overlaps(&life[i]))
            .map(|&j| (offsets[j], life[j].size))
            .collect();
        taken.sort_unstable();
        offsets[i] = lowest_gap(&taken, life[i].size);
        placed.push(i);
    }
    offsets
}

fn extent(life: &[Lifetime], offsets: &[usize]) -> usize {
    life.iter()
        .zip(offsets)
        .map(|(l, o)| o + l.size)
        .max()
        .unwrap_or(0)
}

fn live_peak(events: &[AllocEvent]) -> usize {
    let mut sizes: HashMap<u64, usize> = HashMap::new();
    let (mut now, mut peak) = (0usize, 0usize);
    for ev in events {
        match *ev {
            AllocEvent::Alloc { id, size } => {
                sizes.insert(id, size);
                now += size;
                peak = peak.max(now);
            }
            AllocEvent::Free { id } => now -= sizes.remove(&id).unwrap_or(0),
        }
    }
    peak
}

/// Offsets for a recorded pass: the smaller of first fit and largest-first placement.
pub(crate) fn plan(events: &[AllocEvent]) -> Plan {
    let life = lifetimes(events);
    let by_order = first_fit(&life);
    let by_size = greedy_by_size(&life);
    let (a, b) = (extent(&life, &by_order), extent(&life, &by_size));
    let (offsets, total) = if b < a { (by_size, b) } else { (by_order, a) };
    Plan {
        sizes: life.iter().map(|l| l.size).collect(),
        offsets,
        total,
        live_peak: live_peak(events),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AllocEvent::*;

    fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn freed_space_is_reused_and_live_buffers_never_overlap() {
        let ev = [
            Alloc { id: 1, size: 100 },
            Alloc { id: 2, size: 50 },
            Free { id: 1 },
            Alloc { id: 3, size: 80 },  // fits where 1 was
            Alloc { id: 4, size: 200 }, // after 2
            Free { id: 2 },
            Free { id: 3 },
            Alloc { id: 5, size: 150 }, // the gap 0..150 is free again
        ];
        let p = plan(&ev);
        assert_eq!(p.offsets, vec![0, 100, 0, 150, 0]);
        assert_eq!(p.total, 350);
        // Buffers alive together: (2,3), (2,4), (3,4), (4,5).
        let iv = |i: usize| (p.offsets[i], p.sizes[i]);
        for (a, b) in [(1, 2), (1, 3), (2, 3), (3, 4)] {
            assert!(!overlaps(iv(a), iv(b)), "{a} {b}");
        }
    }

    #[test]
    fn total_is_the_live_peak_for_a_chain() {
        // x -> y -> z, each freed after the next exists: never more than two alive.
        let mut ev = vec![Alloc { id: 0, size: 10 }];
        for i in 1..20u64 {
            ev.push(Alloc { id: i, size: 10 });
            ev.push(Free { id: i - 1 });
        }
        assert_eq!(plan(&ev).total, 20);
    }

    /// Every pair of buffers alive at the same time must sit in disjoint ranges.
    fn assert_valid(ev: &[AllocEvent], p: &Plan) {
        let life = lifetimes(ev);
        for i in 0..life.len() {
            assert!(p.offsets[i] + p.sizes[i] <= p.total);
            for j in 0..i {
                if life[i].overlaps(&life[j]) {
                    assert!(
                        !overlaps((p.offsets[i], p.sizes[i]), (p.offsets[j], p.sizes[j])),
                        "buffers {j} and {i} share memory while both alive"
                    );
                }
            }
        }
    }

    #[test]
    fn random_passes_are_valid_and_never_worse_than_first_fit() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % m
        };
        for _ in 0..200 {
            let mut ev = Vec::new();
            let mut live: Vec<u64> = Vec::new();
            for id in 0..60u64 {
                ev.push(Alloc {
                    id,
                    size: 512 * (1 + next(64) as usize),
                });
                live.push(id);
                while !live.is_empty() && next(3) == 0 {
                    let k = next(live.len() as u64) as usize;
                    ev.push(Free { id: live.remove(k) });
                }
            }
            let p = plan(&ev);
            assert_valid(&ev, &p);
            let life = lifetimes(&ev);
            assert!(p.total <= extent(&life, &first_fit(&life)));
            assert!(p.total >= p.live_peak);
        }
    }

    #[test]
    fn largest_first_beats_first_fit_when_a_survivor_splits_the_block() {
        // B outlives A, so first fit cannot put C in A's place (too small) and stacks
        // it above B; placing C first leaves A and B room around it.
        let ev = [
            Alloc { id: 1, size: 10 },
            Alloc { id: 2, size: 10 },
            Free { id: 1 },
            Alloc { id: 3, size: 20 },
        ];
        let life = lifetimes(&ev);
        assert_eq!(extent(&life, &first_fit(&life)), 40);
        let p = plan(&ev);
        assert_valid(&ev, &p);
        assert_eq!(p.live_peak, 30);
        assert_eq!(p.total, 30);
    }
}
