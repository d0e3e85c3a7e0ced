//! Decode steps much slower than the steps before them, logged with how they ran (a graph replayed,
//! captured, or an eager step for a new shape), so that a stall in a serving run can be told from the log
//! alone (session 27: the last steps of a benchmark run took 2-3 times the usual).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lorax_engine::StepCounts;

/// Steps of a row bucket observed before its typical time judges others (it needs a few).
const WARM_STEPS: u64 = 16;
/// Weight of each step in the typical time (an exponential average).
const ALPHA: f64 = 1.0 / 32.0;
/// A slow step takes at least this many times the typical one...
const FACTOR: f64 = 2.0;
/// ...and at least this much longer.
const MARGIN: Duration = Duration::from_millis(2);
/// Slow steps logged per second at most; the others are counted and reported with the next one logged.
const PER_SECOND: u32 = 10;

/// Rows per bucket of the typical times.
const BUCKET: usize = 8;

/// The typical decode step time by rows (buckets of [`BUCKET`]), and the slow steps' log. A step is judged
/// against the fastest typical time of its own bucket or a larger one: a batch that grows gets slower
/// steps (not judged until its bucket has a typical time), one that shrinks should not.
#[derive(Debug, Default)]
pub struct StepWatch {
    /// By bucket: steps seen and their typical time in seconds.
    typical: BTreeMap<usize, (u64, f64)>,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// A slow step: its time, the typical time before it, and the slow steps not logged since the last one.
#[derive(Debug, PartialEq)]
pub struct Slow {
    pub took: Duration,
    pub typical: Duration,
    pub unlogged_before: u64,
}

impl StepWatch {
    /// Counts a step of `rows` rows that took `took`, at `now`: `Some` when it is slow and should be logged.
    pub fn observe(&mut self, rows: usize, took: Duration, now: Instant) -> Option<Slow> {
        let s = took.as_secs_f64();
        let bucket = rows.div_ceil(BUCKET);
        let typical = self
            .typical
            .range(bucket..)
            .filter(|(_, &(n, _))| n >= WARM_STEPS)
            .map(|(_, &(_, t))| t)
            .min_by(f64::total_cmp);
        let (n, t) = self.typical.entry(bucket).or_insert((0, s));
        // A slow step moves the average as far as a step of twice the typical time would.
        *t += ALPHA * (s.min(FACTOR * *t) - *t);
        *n += 1;
        let typical = typical?;
        if s <= FACTOR * typical || took <= Duration::from_secs_f64(typical) + MARGIN {
            return None;
        }
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window = Some(now);
                self.logged = 0;
            }
        }
        if self.logged >= PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.logged += 1;
        Some(Slow {
            took,
            typical: Duration::from_secs_f64(typical),
            unlogged_before: std::mem::take(&mut self.suppressed),
        })
    }
}

/// Logs a slow decode step of `rows` rows, run ahead of the router's call or not, whose backend counts
/// moved from `before` to `after`.
pub fn log(slow: &Slow, rows: usize, ahead: bool, before: &StepCounts, after: &StepCounts) {
    tracing::info!(
        rows,
        ms = format!("{:.1}", slow.took.as_secs_f64() * 1e3),
        typical_ms = format!("{:.1}", slow.typical.as_secs_f64() * 1e3),
        how = after.how_since(before),
        ahead,
        unlogged_before = slow.unlogged_before,
        "slow decode step"
    );
}

#[cfg(test)]
mod tests {
    use super::{StepWatch, BUCKET, PER_SECOND, WARM_STEPS};
    use lorax_engine::StepCounts;
    use std::time::{Duration, Instant};

    #[test]
    fn a_step_is_named_by_the_counts_it_moved() {
        let before = StepCounts {
            replays: 10,
            ahead_replays: 8,
            fed_replays: 5,
            captures: 2,
            uncaptured: 2,
        };
        let with = |f: fn(&mut StepCounts)| {
            let mut c = before;
            f(&mut c);
            c.how_since(&before)
        };
        // A capture replays the new graph too; a replay recorded ahead is a replay.
        assert_eq!(with(|c| (c.captures, c.replays) = (3, 11)), "captured a graph");
        assert_eq!(with(|c| c.uncaptured = 3), "eager, a new shape");
        assert_eq!(
            with(|c| (c.ahead_replays, c.replays) = (9, 11)),
            "replayed, recorded ahead"
        );
        // A fed replay is launched during the step before its own (which is served by the one it launched).
        assert_eq!(
            with(|c| (c.fed_replays, c.replays) = (6, 11)),
            "launched the next step with its tokens"
        );
        assert_eq!(with(|c| c.replays = 11), "replayed");
        assert_eq!(with(|_| ()), "eager");
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn steps_well_over_the_typical_time_are_slow_and_the_log_is_bounded() {
        let mut w = StepWatch::default();
        let t0 = Instant::now();
        // Nothing is judged while the typical time forms, however slow.
        assert!(w.observe(128, ms(10), t0).is_none());
        for _ in 1..WARM_STEPS {
            assert!(w.observe(128, ms(100), t0).is_none());
        }
        let mut w = StepWatch::default();
        for _ in 0..WARM_STEPS + 10 {
            assert!(w.observe(128, ms(10), t0).is_none());
        }
        // Within twice the typical time, or less than 2 ms over it: not slow.
        assert!(w.observe(128, ms(19), t0).is_none());
        let slow = w.observe(128, ms(25), t0).expect("2.5x the typical step");
        assert_eq!(slow.took, ms(25));
        assert!((slow.typical.as_secs_f64() - 0.01).abs() < 0.0005, "{:?}", slow.typical);
        let mut fast = StepWatch::default();
        for _ in 0..WARM_STEPS + 10 {
            fast.observe(1, Duration::from_micros(500), t0);
        }
        assert!(
            fast.observe(1, Duration::from_micros(1500), t0).is_none(),
            "3x but only 1 ms over"
        );
        // A run of slow steps: PER_SECOND logged in a second, the rest counted and reported with the next.
        let logged = (0..PER_SECOND + 5)
            .filter(|_| w.observe(128, ms(40), t0).is_some())
            .count();
        assert_eq!(
            logged,
            PER_SECOND as usize - 1,
            "one was logged above, in the same second"
        );
        let next = w.observe(128, ms(40), t0 + ms(1500)).expect("a new second");
        assert_eq!(next.unlogged_before, 6);
        // Slow steps move the typical time only as far as twice it.
        assert!(next.typical < ms(20), "{:?}", next.typical);
    }

    #[test]
    fn a_growing_batch_is_not_slow_and_a_shrinking_one_is_judged_by_larger_ones() {
        let mut w = StepWatch::default();
        let t0 = Instant::now();
        for _ in 0..WARM_STEPS {
            assert!(w.observe(8, ms(5), t0).is_none());
        }
        // 128 rows take three times as long as 8: a new bucket, not judged by the smaller one.
        for _ in 0..WARM_STEPS {
            assert!(w.observe(128, ms(15), t0).is_none());
        }
        // Fewer rows than any bucket seen: judged by the fastest larger bucket (here the 8-row one).
        assert!(w.observe(3, ms(12), t0).is_some(), "12 ms against 5 for 8 rows");
        // 100 rows, a bucket never seen: judged by the 128-row bucket alone.
        assert!(w.observe(100, ms(25), t0).is_none(), "under twice 15 ms");
        assert!(w.observe(100 + BUCKET, ms(40), t0).is_some());
    }
}
