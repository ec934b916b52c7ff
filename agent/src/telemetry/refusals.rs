//! Refusal summaries. The kernel writes no log record per refused connect (a pod refused in a loop would flood the
//! log and rotate the audit trail away); it counts refusals per cgroup and reason instead. This turns successive
//! readings of those counts into few lines: a cgroup's first refusal at once, then at most one summary per cgroup
//! per interval, whatever the rate. Memory is bounded by an LRU of cgroups, and no refusal is lost from the lines:
//! a cgroup pushed out of the LRU gets its summary on the way out.

use std::num::NonZeroUsize;

use lru::LruCache;

/// Why a line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// The first refusals seen of this cgroup: logged at once.
    First,
    /// The refusals since its previous line: logged once per interval, or when the cgroup leaves the LRU.
    Summary,
}

/// One log line's worth: `by_reason[i]` refusals of reason `i` that no earlier line reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line<const N: usize> {
    pub kind: LineKind,
    pub cgroup_id: u64,
    pub by_reason: [u64; N],
}

impl<const N: usize> Line<N> {
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum()
    }
}

/// What is known of one cgroup.
struct Seen<const N: usize> {
    /// The kernel's counts at the last reading.
    kernel: [u64; N],
    /// Refusals not yet reported.
    pending: [u64; N],
}

/// Turns readings of the kernel's per-cgroup refusal counts (cumulative, `N` reasons) into log lines.
pub struct RefusalSummaries<const N: usize> {
    cgroups: LruCache<u64, Seen<N>>,
}

impl<const N: usize> RefusalSummaries<N> {
    /// Remembers at most `capacity` cgroups. Make it at least the kernel map's size, so that a cgroup the kernel
    /// still counts is not forgotten here (it would be reported as new again, with everything it ever had refused).
    pub fn new(capacity: NonZeroUsize) -> Self {
        RefusalSummaries {
            cgroups: LruCache::new(capacity),
        }
    }

    /// Cgroups currently remembered.
    pub fn len(&self) -> usize {
        self.cgroups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cgroups.is_empty()
    }

    /// Takes one reading of cgroup `cgroup_id`'s counts (cumulative since the kernel first refused it). Returns the
    /// lines due at once: its first refusals, and the summary of a cgroup pushed out to make room for it.
    pub fn observe(&mut self, cgroup_id: u64, kernel: [u64; N]) -> Vec<Line<N>> {
        if let Some(seen) = self.cgroups.get_mut(&cgroup_id) {
            for ((pending, last), now) in seen.pending.iter_mut().zip(&mut seen.kernel).zip(kernel)
            {
                // Lower than last time: the kernel forgot the cgroup and counts again from zero.
                *pending += if now >= *last { now - *last } else { now };
                *last = now;
            }
            return Vec::new();
        }
        if kernel.iter().all(|&n| n == 0) {
            return Vec::new();
        }
        let seen = Seen {
            kernel,
            pending: [0; N],
        };
        let mut lines = vec![Line {
            kind: LineKind::First,
            cgroup_id,
            by_reason: kernel,
        }];
        if let Some((evicted, old)) = self.cgroups.push(cgroup_id, seen)
            && old.pending.iter().any(|&n| n > 0)
        {
            // Room for the newcomer costs the evicted cgroup its rate limit, never its count.
            lines.push(Line {
                kind: LineKind::Summary,
                cgroup_id: evicted,
                by_reason: old.pending,
            });
        }
        lines
    }

    /// The summaries of every cgroup with refusals not yet reported; call once per interval.
    pub fn flush(&mut self) -> Vec<Line<N>> {
        let mut lines = Vec::new();
        for (&cgroup_id, seen) in self.cgroups.iter_mut() {
            if seen.pending.iter().any(|&n| n > 0) {
                lines.push(Line {
                    kind: LineKind::Summary,
                    cgroup_id,
                    by_reason: std::mem::replace(&mut seen.pending, [0; N]),
                });
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests;
