//! A linearizability checker for histories recorded by concurrent clients,
//! in the style of Knossos and Porcupine: the Wing–Gong–Lowe search with
//! Lowe's memoisation of (linearized set, model state).
//!
//! A history is a list of operations, each with the time its call was made
//! and the time its answer arrived. An operation whose answer never came
//! (a timeout, a connection cut by a partition) may have taken effect or
//! not: it is *indeterminate*, its return is at infinity, and the search
//! may linearize it anywhere after its call, or leave it out. An operation
//! that failed cleanly (refused, so it changed nothing) belongs in no
//! history.
//!
//! The history is linearizable when some total order of its operations
//! (every determinate one, and any of the indeterminate ones) respects
//! real time (an operation answered before another was called comes first)
//! and replays on the sequential [`Model`] with the answers observed.
//! Histories of independent keys are checked one key at a time
//! (linearizability is compositional), which keeps each search small.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;
    fn init(&self) -> Self::State;
    /// The state after `input` applied to `state` answered `output`, or
    /// `None` when the model cannot answer so. `output` is `None` for an
    /// indeterminate operation (its answer was never seen).
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;
}

/// One operation of a history.
#[derive(Clone, Debug)]
pub struct Op<I, O> {
    /// When the call was made (any monotonic unit: nanoseconds from the
    /// start of the run here).
    pub call: u64,
    /// When the answer arrived; `None`: never (indeterminate).
    pub ret: Option<u64>,
    pub input: I,
    /// The answer; `None` with `ret: None`.
    pub output: Option<O>,
}

/// A register holding an optional value: written by `Write(v)`, read by
/// `Read` which answers the value (`None`: absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct Register;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterInput {
    Write(u64),
    Read,
}

impl Model for Register {
    type State = Option<u64>;
    type Input = RegisterInput;
    /// What a read answered; a write answers `None`.
    type Output = Option<u64>;

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(&self, state: &Option<u64>, input: &RegisterInput, output: Option<&Option<u64>>) -> Option<Option<u64>> {
        match input {
            RegisterInput::Write(v) => Some(Some(*v)),
            RegisterInput::Read => match output {
                Some(seen) if seen == state => Some(*state),
                // A read that never answered observed nothing.
                None => Some(*state),
                Some(_) => None,
            },
        }
    }
}

/// One event of the doubly linked list the search walks: a call or a
/// return of operation `op`.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    matched: usize,
    prev: usize,
    next: usize,
}

/// The outcome of a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order exists. `stuck_at` is the operation whose return the
    /// deepest attempt could not get past: the first one that has to
    /// observe something no order allows.
    Anomaly {
        stuck_at: usize,
    },
}

/// Checks `history` against `model`.
pub fn check<M: Model>(model: &M, history: &[Op<M::Input, M::Output>]) -> Verdict {
    let n = history.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events in time order; a return ties after calls at the same instant
    // (operations that touch in time are concurrent). Indeterminate
    // returns sort last, at infinity.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in history.iter().enumerate() {
        order.push((op.call, true, i));
        order.push((op.ret.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // Node 0 is the list's head sentinel; events are 1..=2n.
    const HEAD: usize = 0;
    let mut events = vec![
        Event {
            op: usize::MAX,
            is_call: false,
            matched: 0,
            prev: HEAD,
            next: HEAD,
        };
        2 * n + 1
    ];
    let mut ret_of = vec![0usize; n];
    for (k, &(_, is_call, i)) in order.iter().enumerate() {
        let at = k + 1;
        events[at] = Event {
            op: i,
            is_call,
            matched: 0,
            prev: at - 1,
            next: if at == 2 * n { HEAD } else { at + 1 },
        };
        if !is_call {
            ret_of[i] = at;
        }
    }
    events[HEAD].next = 1;
    events[HEAD].prev = 2 * n;
    for e in 1..=2 * n {
        if events[e].is_call {
            events[e].matched = ret_of[events[e].op];
        }
    }
    let determinate = |e: &Event| history[e.op].ret.is_some();

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = events[HEAD].next;
    let mut deepest = (0usize, usize::MAX);

    // Unlinks a call and its return; relinks them in reverse.
    fn lift(events: &mut [Event], call: usize) {
        let ret = events[call].matched;
        for e in [call, ret] {
            let (p, n) = (events[e].prev, events[e].next);
            events[p].next = n;
            events[n].prev = p;
        }
    }
    fn unlift(events: &mut [Event], call: usize) {
        let ret = events[call].matched;
        for e in [ret, call] {
            let (p, n) = (events[e].prev, events[e].next);
            events[p].next = e;
            events[n].prev = e;
        }
    }

    loop {
        if entry == HEAD || (!events[entry].is_call && !determinate(&events[entry])) {
            // Every determinate operation is linearized: what is left
            // (indeterminate ones) may simply not have happened.
            return Verdict::Linearizable;
        }
        let ev = events[entry];
        if ev.is_call {
            let op = &history[ev.op];
            if let Some(next) = model.step(&state, &op.input, op.output.as_ref()) {
                let mut with = linearized.clone();
                with[ev.op / 64] |= 1 << (ev.op % 64);
                if cache.insert((with.clone(), next.clone())) {
                    stack.push((entry, state));
                    state = next;
                    linearized = with;
                    lift(&mut events, entry);
                    entry = events[HEAD].next;
                    continue;
                }
            }
            entry = ev.next;
        } else {
            // A determinate return with its call still in the list: the
            // operation cannot go after anything tried so far. Backtrack.
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), ev.op);
            }
            let Some((call, previous)) = stack.pop() else {
                return Verdict::Anomaly { stuck_at: deepest.1 };
            };
            let op = events[call].op;
            state = previous;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut events, call);
            entry = events[call].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(call: u64, ret: u64, v: u64) -> Op<RegisterInput, Option<u64>> {
        Op {
            call,
            ret: Some(ret),
            input: RegisterInput::Write(v),
            output: Some(None),
        }
    }
    fn r(call: u64, ret: u64, seen: Option<u64>) -> Op<RegisterInput, Option<u64>> {
        Op {
            call,
            ret: Some(ret),
            input: RegisterInput::Read,
            output: Some(seen),
        }
    }
    fn lost(call: u64, v: u64) -> Op<RegisterInput, Option<u64>> {
        Op {
            call,
            ret: None,
            input: RegisterInput::Write(v),
            output: None,
        }
    }

    #[test]
    fn sequential_and_concurrent_histories_pass() {
        assert_eq!(check(&Register, &[]), Verdict::Linearizable);
        // Sequential.
        let h = [
            r(0, 1, None),
            w(2, 3, 1),
            r(4, 5, Some(1)),
            w(6, 7, 2),
            r(8, 9, Some(2)),
        ];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
        // A read concurrent with a write may see either value, and two
        // concurrent reads may disagree, as long as one order explains both.
        let h = [w(0, 10, 1), r(1, 2, None), r(3, 4, Some(1)), r(11, 12, Some(1))];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
        // Concurrent writes: the later read decides their order.
        let h = [w(0, 10, 1), w(0, 10, 2), r(11, 12, Some(1)), r(13, 14, Some(1))];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_an_anomaly() {
        // The write was acknowledged before the read was called, and the
        // read still saw the old value: what a partitioned node serving
        // its own state answers.
        let h = [w(0, 1, 1), w(2, 3, 2), r(4, 5, Some(1))];
        assert_eq!(check(&Register, &h), Verdict::Anomaly { stuck_at: 2 });
        // Values cannot flip back: once a read saw 2, a later one cannot
        // see 1.
        let h = [w(0, 10, 1), w(0, 10, 2), r(11, 12, Some(2)), r(13, 14, Some(1))];
        assert!(matches!(check(&Register, &h), Verdict::Anomaly { .. }));
        // A read of a value nobody wrote.
        let h = [w(0, 1, 1), r(2, 3, Some(7))];
        assert!(matches!(check(&Register, &h), Verdict::Anomaly { .. }));
    }

    #[test]
    fn an_indeterminate_write_may_have_happened_or_not() {
        // Its effect seen, long after its call: it happened.
        let h = [w(0, 1, 1), lost(2, 2), r(100, 101, Some(2))];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
        // Never seen: it did not.
        let h = [w(0, 1, 1), lost(2, 2), r(100, 101, Some(1))];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
        // Seen, then unseen by a later read: no order explains that.
        let h = [w(0, 1, 1), lost(2, 2), r(3, 4, Some(2)), r(5, 6, Some(1))];
        assert!(matches!(check(&Register, &h), Verdict::Anomaly { .. }));
        // It cannot take effect before its call.
        let h = [w(0, 1, 1), r(2, 3, Some(2)), lost(4, 2)];
        assert!(matches!(check(&Register, &h), Verdict::Anomaly { .. }));
    }

    #[test]
    fn a_long_history_checks_quickly() {
        // 3 clients, 600 operations, overlapping: the memoisation keeps
        // the search polynomial for a register with unique writes.
        let mut h = Vec::new();
        let mut value = None;
        for k in 0..200u64 {
            let t = k * 10;
            h.push(w(t, t + 15, k + 1));
            h.push(r(t + 1, t + 2, value));
            value = Some(k + 1);
            h.push(r(t + 16, t + 17, value));
        }
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
    }
}
