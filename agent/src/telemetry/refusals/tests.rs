use std::num::NonZeroUsize;

use super::{Line, LineKind, RefusalSummaries};

const N: usize = 3;

fn summaries(capacity: usize) -> RefusalSummaries<N> {
    RefusalSummaries::new(NonZeroUsize::new(capacity).expect("capacity > 0"))
}

fn total(lines: &[Line<N>]) -> u64 {
    lines.iter().map(Line::total).sum()
}

#[test]
fn a_cgroups_first_refusal_is_a_line_at_once_and_a_flood_is_one_summary_per_interval() {
    let mut s = summaries(16);
    let first = s.observe(7, [0, 1, 0]);
    assert_eq!(
        first,
        [Line {
            kind: LineKind::First,
            cgroup_id: 7,
            by_reason: [0, 1, 0]
        }]
    );
    // 4,999 more refusals over many readings: no line until the interval ends.
    let mut lines = Vec::new();
    for n in 2..=5_000 {
        lines.extend(s.observe(7, [0, n, n / 1_000]));
    }
    assert!(lines.is_empty(), "lines between summaries: {lines:?}");
    let summary = s.flush();
    assert_eq!(
        summary,
        [Line {
            kind: LineKind::Summary,
            cgroup_id: 7,
            by_reason: [0, 4_999, 5]
        }]
    );
    // Nothing new, nothing to say.
    assert!(s.flush().is_empty());
    s.observe(7, [0, 5_000, 5]);
    assert!(s.flush().is_empty());
    // The next interval reports only its own refusals.
    s.observe(7, [2, 5_003, 5]);
    assert_eq!(s.flush()[0].by_reason, [2, 3, 0]);
}

#[test]
fn cgroups_without_refusals_make_no_lines_and_take_no_room() {
    let mut s = summaries(4);
    assert!(s.observe(1, [0; N]).is_empty());
    assert!(s.is_empty());
    assert!(s.flush().is_empty());
}

#[test]
fn memory_stays_bounded_whatever_the_number_of_cgroups() {
    const CAPACITY: usize = 8;
    let mut s = summaries(CAPACITY);
    let mut kernel = std::collections::HashMap::<u64, [u64; N]>::new();
    let mut lines = Vec::new();
    let mut reported_by_kernel = 0;
    // 1,000 cgroups refused round after round, more than the LRU holds: each is forgotten before it comes back.
    for round in 0..5u64 {
        for cgroup in 0..1_000u64 {
            let counts = kernel.entry(cgroup).or_default();
            counts[(cgroup % N as u64) as usize] += round + 1;
            // A cgroup seen anew reports what the kernel has counted for it so far.
            reported_by_kernel += counts.iter().sum::<u64>();
            lines.extend(s.observe(cgroup, *counts));
            assert!(s.len() <= CAPACITY, "{} cgroups remembered", s.len());
        }
        lines.extend(s.flush());
    }
    assert!(lines.iter().all(|l| l.kind == LineKind::First), "{lines:?}");
    assert_eq!(lines.len(), 5 * 1_000);
    assert_eq!(total(&lines), reported_by_kernel);
}

#[test]
fn with_room_for_every_cgroup_the_lines_add_up_to_the_refusals_exactly() {
    let mut s = summaries(1_000);
    let mut lines = Vec::new();
    let mut counts = [[0u64; N]; 1_000];
    let mut refused = 0;
    for round in 0..20u64 {
        for (cgroup, c) in counts.iter_mut().enumerate() {
            if (cgroup as u64 + round).is_multiple_of(3) {
                continue;
            }
            c[(round % N as u64) as usize] += 7;
            refused += 7;
            lines.extend(s.observe(cgroup as u64, *c));
        }
        if round % 5 == 4 {
            lines.extend(s.flush());
        }
    }
    lines.extend(s.flush());
    assert_eq!(total(&lines), refused);
    for cgroup in 0..1_000u64 {
        let of = |kind| {
            lines
                .iter()
                .filter(|l| l.cgroup_id == cgroup && l.kind == kind)
                .count()
        };
        assert_eq!(of(LineKind::First), 1, "cgroup {cgroup}");
        // Four intervals, so at most four summaries, however many refusals.
        assert!(of(LineKind::Summary) <= 4, "cgroup {cgroup}");
    }
}

#[test]
fn a_cgroup_the_kernel_forgot_and_counts_again_is_not_lost() {
    let mut s = summaries(4);
    s.observe(3, [10, 0, 0]);
    s.observe(3, [12, 0, 0]);
    // Evicted from the kernel's LRU and refused again: its count restarts below the last reading.
    s.observe(3, [1, 0, 0]);
    assert_eq!(s.flush()[0].by_reason, [3, 0, 0]);
}

#[test]
fn a_cgroup_pushed_out_with_unreported_refusals_gets_its_summary_on_the_way_out() {
    let mut s = summaries(1);
    s.observe(1, [1, 0, 0]);
    s.observe(1, [4, 0, 0]);
    let lines = s.observe(2, [0, 1, 0]);
    assert_eq!(
        lines,
        [
            Line {
                kind: LineKind::First,
                cgroup_id: 2,
                by_reason: [0, 1, 0]
            },
            Line {
                kind: LineKind::Summary,
                cgroup_id: 1,
                by_reason: [3, 0, 0]
            }
        ]
    );
    assert_eq!(s.len(), 1);
}
