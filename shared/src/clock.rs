//! The clock every timestamp and every "for how long" decision reads: the
//! wall clock, with its jumps taken out.
//!
//! Coordinators compare a reading of their clock with timestamps the
//! replicated state holds (an agent down since, a step started at, the last
//! backup slot), so a wall clock that jumps (an NTP step, a VM resumed, an
//! operator's `date -s`) would make an outage look an hour long, or a
//! schedule fire twice. Like the kernel's `CLOCK_MONOTONIC`, this clock
//! advances with elapsed (monotonic) time; like the wall clock, it reads
//! milliseconds since the Unix epoch: it starts at the wall clock and then
//! moves toward it by at most 1% of the elapsed time, so a jump of the wall
//! clock is absorbed slowly (an hour over a hundred hours) while its normal
//! corrections (NTP slews at most 0.05%) keep the two equal. It never goes
//! backwards. Each process has its own.

use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How fast the clock may move toward a wall clock that jumped, as a
/// fraction of the elapsed time.
const SLEW: f64 = 0.01;

/// The last reading: (ms since the epoch, as a fraction; when, monotonic).
static LAST: Mutex<Option<(f64, Instant)>> = Mutex::new(None);

/// The next reading after `last`, `elapsed_ms` (monotonic) later, when the
/// wall clock says `wall_ms`.
pub fn advance(last: f64, elapsed_ms: f64, wall_ms: f64) -> f64 {
    let expected = last + elapsed_ms;
    let slew = elapsed_ms * SLEW;
    expected + (wall_ms - expected).clamp(-slew, slew)
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Milliseconds since the Unix epoch, jumps taken out (see the module).
pub fn now_unix_ms() -> i64 {
    let mono = Instant::now();
    let wall = wall_ms();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let next = match *last {
        None => wall,
        Some((at, then)) => advance(at, mono.saturating_duration_since(then).as_secs_f64() * 1000.0, wall),
    };
    *last = Some((next, mono));
    next as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings every 100 ms for `secs`, the wall clock offset by
    /// `jump(t)` at second t.
    fn run(secs: u32, jump: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        let start = 1_700_000_000_000.0;
        let mut clock = start;
        (1..=secs * 10)
            .map(|i| {
                let t = f64::from(i) * 100.0;
                let wall = start + t + jump(t / 1000.0);
                clock = advance(clock, 100.0, wall);
                (wall, clock)
            })
            .collect()
    }

    #[test]
    fn follows_a_steady_wall_clock_exactly() {
        for (wall, clock) in run(60, |_| 0.0) {
            assert_eq!(wall, clock);
        }
    }

    #[test]
    fn takes_the_jumps_of_the_wall_clock_out() {
        // An hour forward at 10 s: from just before it to a minute later, the clock has moved by
        // the minute and 1% of it, not by the hour.
        let r = run(70, |t| if t >= 10.0 { 3_600_000.0 } else { 0.0 });
        let (w0, c0) = r[98];
        let (w1, c1) = r[698];
        assert_eq!(w1 - w0, 60_000.0 + 3_600_000.0);
        assert!((c1 - c0 - 60_600.0).abs() < 1e-3, "{}", c1 - c0);
        // An hour back: it keeps going, 1% slower.
        let r = run(70, |t| if t >= 10.0 { -3_600_000.0 } else { 0.0 });
        let (_, c0) = r[98];
        let (_, c1) = r[698];
        assert!((c1 - c0 - 59_400.0).abs() < 1e-3, "{}", c1 - c0);
        assert!(r.windows(2).all(|w| w[1].1 > w[0].1), "it went backwards");
    }

    #[test]
    fn catches_up_with_a_small_correction() {
        // NTP steps the wall clock 200 ms ahead at 5 s: 20 s later the
        // two agree again.
        let r = run(30, |t| if t >= 5.0 { 200.0 } else { 0.0 });
        let (wall, clock) = r[r.len() - 1];
        assert!((wall - clock).abs() < 1e-3, "{}", wall - clock);
    }

    #[test]
    fn reads_near_the_wall_clock_and_never_backwards() {
        let a = now_unix_ms();
        let b = now_unix_ms();
        assert!(b >= a);
        assert!((a as f64 - wall_ms()).abs() < 1000.0);
    }
}
