//! Offset planning for a captured forward pass: the allocation sequence of an eager
//! pass is replayed onto one preallocated block, each buffer at the lowest offset not
//! used by a buffer alive at the same time (first fit). The graph then owns exactly
//! one allocation, about the size of the pass's largest live set.

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
}

pub(crate) fn plan(events: &[AllocEvent]) -> Plan {
    // Live buffers sorted by offset: (offset, size, id).
    let mut live: Vec<(usize, usize, u64)> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let (mut sizes, mut offsets, mut total) = (Vec::new(), Vec::new(), 0usize);
    for ev in events {
        match *ev {
            AllocEvent::Alloc { id, size } => {
                let mut at = 0usize;
                let mut pos = live.len();
                for (i, &(off, sz, _)) in live.iter().enumerate() {
                    if off >= at + size {
                        pos = i;
                        break;
                    }
                    at = at.max(off + sz);
                }
                live.insert(pos, (at, size, id));
                index.insert(id, at);
                sizes.push(size);
                offsets.push(at);
                total = total.max(at + size);
            }
            AllocEvent::Free { id } => {
                if let Some(off) = index.remove(&id) {
                    live.retain(|&(o, _, i)| !(o == off && i == id));
                }
            }
        }
    }
    Plan {
        sizes,
        offsets,
        total,
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
}
