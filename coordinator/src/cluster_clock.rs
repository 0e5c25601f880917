//! The cluster clock: how much real time has passed, as the leaders'
//! monotonic clocks measured it, kept in the replicated state so a new
//! leader can tell how long ago something happened without trusting that
//! its wall clock agrees with the one that stamped it.
//!
//! Wall-clock stamps from two coordinators cannot be compared: a leader
//! whose clock runs an hour ahead reads a failover of a minute ago as one
//! past a one-hour cooldown. The cluster clock never counts more time than
//! has passed. Each leader, once per term and whenever it needs a reading
//! pinned (a new failover epoch), commits a `Tick` with how long it has led
//! by its monotonic clock. Applying a tick adds the time since the previous
//! tick of the same term (one clock, so the difference is real time), or,
//! for the first tick of a term, the time that leader has led: its
//! leadership began after every entry of the earlier terms was proposed,
//! so that span is disjoint from the time already counted. What passes
//! between one leader's last tick and the next leader's takeover (an
//! election) is not counted: the clock runs slow, by that much, never fast.
//!
//! A time is pinned by the first tick applied after it that names it (a
//! failover epoch's reading is that tick's): the leader reads its
//! monotonic clock after the epochs it names were applied, so an epoch
//! committed while a tick was on its way is left to the next tick, and the
//! time since an epoch is counted from a point after it: a wait measured on
//! this clock is never shorter than asked.
//! Bounded: one reading per app's current epoch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use cutover_shared::dr::DrEpoch;

/// The replicated clock (`State::clock`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterClock {
    /// The Raft term of the last tick applied (0: never ticked, a cluster
    /// that has not run a release with the clock).
    pub term: u64,
    /// That tick's reading: how long its leader had led, by its monotonic
    /// clock.
    pub led_ms: u64,
    /// The clock at that tick: real time counted since the first tick.
    pub elapsed_ms: i64,
    /// App → (its failover epoch, the clock at the first tick applied after
    /// that epoch was committed).
    pub epochs: BTreeMap<String, (u64, i64)>,
}

impl ClusterClock {
    /// Applies a tick of the leader of `term` that had led for `led_ms`,
    /// and pins those of the apps' current `epochs` that have no reading
    /// yet and that the tick names in `pins` (app → epoch: what its leader
    /// had applied before reading `led_ms`).
    pub fn tick<'a>(
        &mut self,
        term: u64,
        led_ms: u64,
        pins: &BTreeMap<String, u64>,
        epochs: impl IntoIterator<Item = (&'a String, &'a DrEpoch)>,
    ) {
        let gained = if term == self.term {
            led_ms.saturating_sub(self.led_ms)
        } else if term > self.term {
            led_ms
        } else {
            // A log never holds an older term after a newer one; nothing
            // to count from a tick that claims one.
            return;
        };
        if term > self.term || led_ms > self.led_ms {
            self.led_ms = led_ms;
        }
        self.term = term;
        self.elapsed_ms = self
            .elapsed_ms
            .saturating_add(i64::try_from(gained).unwrap_or(i64::MAX));
        let mut pinned = BTreeMap::new();
        for (app, e) in epochs {
            let reading = match self.epochs.get(app) {
                Some(&(epoch, at)) if epoch == e.epoch => at,
                _ if pins.get(app) == Some(&e.epoch) => self.elapsed_ms,
                // Committed after this tick's reading was taken.
                _ => continue,
            };
            pinned.insert(app.clone(), (e.epoch, reading));
        }
        self.epochs = pinned;
    }

    /// The clock now, for the leader of `term` that has led for `led_ms`:
    /// `None` until a tick of that term was applied (before it, what this
    /// leader's monotonic clock says cannot be placed on the cluster's).
    pub fn now(&self, term: u64, led_ms: u64) -> Option<i64> {
        (term == self.term && term != 0).then(|| {
            self.elapsed_ms
                .saturating_add(i64::try_from(led_ms.saturating_sub(self.led_ms)).unwrap_or(i64::MAX))
        })
    }

    /// The reading pinned for `app`'s epoch `epoch`, if a tick was applied
    /// since it was committed.
    pub fn epoch(&self, app: &str, epoch: u64) -> Option<i64> {
        self.epochs.get(app).filter(|(e, _)| *e == epoch).map(|(_, at)| *at)
    }

    /// The epochs a tick should name: each app's current one.
    pub fn pins<'a>(epochs: impl Iterator<Item = (&'a String, &'a DrEpoch)>) -> BTreeMap<String, u64> {
        epochs.map(|(app, e)| (app.clone(), e.epoch)).collect()
    }

    /// Whether a tick is wanted: none yet in `term`, or an epoch not pinned.
    pub fn wants_tick<'a>(&self, term: u64, mut epochs: impl Iterator<Item = (&'a String, &'a DrEpoch)>) -> bool {
        self.term != term || epochs.any(|(app, e)| self.epoch(app, e.epoch).is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(n: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("shop".to_string(), n)])
    }

    fn epochs(n: u64) -> BTreeMap<String, DrEpoch> {
        BTreeMap::from([(
            "shop".to_string(),
            DrEpoch {
                epoch: n,
                ..DrEpoch::default()
            },
        )])
    }

    #[test]
    fn counts_each_leaders_time_once_and_never_the_elections() {
        let mut c = ClusterClock::default();
        assert_eq!(c.now(1, 5_000), None, "no tick yet");
        c.tick(1, 1_000, &pins(0), &epochs(0));
        // The first tick of a term counts the time its leader had led.
        assert_eq!(c.elapsed_ms, 1_000);
        assert_eq!(c.now(1, 4_000), Some(4_000));
        c.tick(1, 4_000, &pins(1), &epochs(1));
        assert_eq!(c.elapsed_ms, 4_000);
        assert_eq!(c.epoch("shop", 1), Some(4_000), "pinned by the first tick after it");
        // An epoch committed after a tick's reading was taken (the tick
        // does not name it) waits for the next tick.
        let mut late = c.clone();
        late.tick(1, 4_100, &pins(1), &epochs(2));
        assert_eq!(late.epoch("shop", 2), None);
        assert!(late.wants_tick(1, epochs(2).iter()));
        // A new leader (term 3) that has led 500 ms: the election between
        // is not counted, and the old term's leader can no longer read.
        c.tick(3, 500, &pins(1), &epochs(1));
        assert_eq!(c.elapsed_ms, 4_500);
        assert_eq!(c.now(1, 60_000), None);
        assert_eq!(c.now(3, 10_500), Some(14_500));
        assert_eq!(c.epoch("shop", 1), Some(4_000), "a pinned reading stays");
        // A leader that restarted its count within its term (a process
        // restart that took the leadership back in the same term) counts
        // nothing until it passes its last reading.
        c.tick(3, 200, &pins(1), &epochs(1));
        assert_eq!(c.elapsed_ms, 4_500);
        // A tick that claims an older term changes nothing.
        c.tick(2, 99_000, &pins(2), &epochs(2));
        assert_eq!((c.term, c.elapsed_ms, c.epoch("shop", 2)), (3, 4_500, None));
        assert!(c.wants_tick(3, epochs(2).iter()));
        assert!(!c.wants_tick(3, epochs(1).iter()));
        assert!(c.wants_tick(4, epochs(1).iter()));
    }
}
