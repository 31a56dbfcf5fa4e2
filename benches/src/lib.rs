//! `sidemesh-bench`: shared pieces of the load harnesses in `src/bin/`. Each harness drives
//! real binaries on loopback with bounded loops and prints its results; the scripts beside
//! this crate (`benches/*.sh`) run them and `docs/benchmarks.md` records the figures.

pub mod http_backend;

/// Percentile (0..=100) of sorted samples; `None` when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(51.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
