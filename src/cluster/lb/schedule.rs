//! A weighted round-robin schedule computed once, walked with one atomic counter, so the
//! request path never takes a lock.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;

#[derive(Debug)]
pub struct WeightedSchedule {
    order: Vec<u32>,
    next: AtomicUsize,
}

impl WeightedSchedule {
    /// Interleaves indices by weight (smooth weighted round robin, as nginx does), so a
    /// host of weight 3 next to one of weight 1 is picked as a,a,b,a rather than a,a,a,b.
    pub fn new(weights: &[u32], start: usize) -> Self {
        let mut weights: Vec<u64> = weights.iter().map(|w| u64::from(*w).max(1)).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        for w in &mut weights {
            *w /= g;
        }
        let sum: u64 = weights.iter().sum();
        if sum > MAX_SCHEDULE {
            for w in &mut weights {
                *w = (*w * MAX_SCHEDULE / sum).max(1);
            }
        }
        let sum: i64 = weights.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += *w as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            order.push(best as u32);
        }
        WeightedSchedule {
            next: AtomicUsize::new(if order.is_empty() {
                0
            } else {
                start % order.len()
            }),
            order,
        }
    }

    pub fn pick(&self) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.order.len();
        Some(self.order[i] as usize)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributes_by_weight_and_interleaves() {
        let s = WeightedSchedule::new(&[3, 1], 0);
        let picks: Vec<_> = (0..8).map(|_| s.pick().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2);
        assert_ne!(&picks[..4], &[0, 0, 0, 1], "smooth, not bursty");
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let s = WeightedSchedule::new(&[5, 5, 5], 0);
        assert_eq!(s.len(), 3);
        let picks: Vec<_> = (0..6).map(|_| s.pick().unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let s = WeightedSchedule::new(&[u32::MAX, 1], 0);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 1);
    }
}
