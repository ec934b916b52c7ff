use super::*;

#[test]
fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
    assert_eq!(median(&[4.0, 1.0, 3.0]), 3.0);
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    assert!(median(&[]).is_nan());
}

#[test]
fn a_percentile_is_the_nearest_rank_of_the_sorted_values() {
    let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(pct(&sorted, 0.50), 50.0);
    assert_eq!(pct(&sorted, 0.99), 99.0);
    assert_eq!(pct(&[7.0], 0.99), 7.0);
    assert!(pct(&[], 0.5).is_nan());
}
