//! Linearizability checker for simulation histories: decides, key by key, whether the results
//! clients saw could come from one register per key that changes atomically at some instant
//! inside each op's call/return interval. A Wing–Gong search with Lowe's memoization (as in
//! Porcupine), plus prunings that keep failing searches of busy histories tractable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use crate::history::{Op, OpKind, OpResult};

/// Search steps allowed per key by [`check`]. A step is one iteration of the search: placing,
/// trying or undoing one op.
pub const DEFAULT_BUDGET_STEPS: u64 = 2_000_000;
/// Minimizing a failure stops after this many trial searches, or after this many budgets'
/// worth of steps in total.
const MINIMIZE_MAX_TRIALS: usize = 2_000;
const MINIMIZE_BUDGETS: u64 = 4;
/// Explaining first tries a search without the fast prunings, as they blur which op is stuck.
const EXPLAIN_PLAIN_STEPS: u64 = 100_000;
/// At most this many possible states are named in an explanation.
const MAX_REPORTED_STATES: usize = 8;
/// Return time of a write whose outcome is unknown: it may take effect any time after its call.
const NEVER_RETURNED_US: u64 = u64::MAX;
/// Register state "the key does not exist"; other states are interned value ids.
const ABSENT: u32 = 0;
/// One state for all values no op reads or compares against: they are indistinguishable, and
/// merging them lets the memo recognise more configurations.
const UNREAD: u32 = u32::MAX;
const NIL: usize = usize::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinReport {
    pub keys_checked: usize,
    /// Per-key operations checked, summed (a range read counts once per key it covers).
    pub ops_checked: usize,
    pub failure: Option<LinFailure>,
    /// Keys whose search hit the step budget: neither passed nor failed.
    pub inconclusive: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinFailure {
    pub key: String,
    /// The smallest failing sub-history found for that key (a subset of the key's ops, by
    /// original op), sorted by call time.
    pub ops: Vec<Op>,
    /// A few lines: what could not be linearized.
    pub explanation: String,
}

pub fn check(history: &[Op]) -> LinReport {
    check_with_budget(history, DEFAULT_BUDGET_STEPS)
}

/// Same with an explicit budget of search steps per key. Only the first failing key (in key
/// order) is minimized (within a few budgets more) and explained; other failing keys are named.
pub fn check_with_budget(history: &[Op], budget: u64) -> LinReport {
    let mut values = Values::default();
    let per_key = project(history, &mut values);
    let mut report = LinReport {
        keys_checked: per_key.len(),
        ops_checked: per_key.values().map(Vec::len).sum(),
        failure: None,
        inconclusive: Vec::new(),
    };
    let mut other_failing_keys = Vec::new();
    for (key, key_ops) in &per_key {
        match search(key_ops, budget, true).verdict {
            Verdict::Linearizable => {}
            Verdict::Inconclusive => report.inconclusive.push(key.clone()),
            Verdict::Violation(_) if report.failure.is_none() => {
                report.failure = Some(explain(history, key, key_ops, budget, &values));
            }
            Verdict::Violation(_) => other_failing_keys.push(key.as_str()),
        }
    }
    if let (Some(failure), false) = (report.failure.as_mut(), other_failing_keys.is_empty()) {
        failure.explanation +=
            &format!("\nalso not linearizable: {}", other_failing_keys.join(", "));
    }
    report
}

/// What one op does to one key's register, with the result it claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// A get, or a linearizable range projected onto one key.
    Read {
        observed: u32,
    },
    Put {
        value: u32,
    },
    /// `None`: outcome unknown, any count is accepted.
    Delete {
        deleted: Option<i64>,
    },
    /// `succeeded == None`: outcome unknown, it swaps iff the state matches.
    Cas {
        expect: u32,
        value: u32,
        succeeded: Option<bool>,
    },
}

impl Action {
    /// The state after this action, or `None` if its claimed result is impossible from `state`.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Action::Read { observed } => (observed == state).then_some(state),
            Action::Put { value } => Some(value),
            Action::Delete { deleted: None } => Some(ABSENT),
            Action::Delete { deleted: Some(n) } => {
                (n == i64::from(state != ABSENT)).then_some(ABSENT)
            }
            Action::Cas {
                expect,
                value,
                succeeded,
            } => match succeeded {
                Some(claimed) if claimed != (state == expect) => None,
                _ => Some(if state == expect { value } else { state }),
            },
        }
    }

    /// The value it may write.
    fn written(self) -> Option<u32> {
        match self {
            Action::Put { value } => Some(value),
            Action::Cas {
                value, succeeded, ..
            } if succeeded != Some(false) => Some(value),
            _ => None,
        }
    }

    /// The state it may leave behind, whatever the state before.
    fn produces(self) -> Option<u32> {
        match self {
            Action::Delete { deleted } => (deleted != Some(0)).then_some(ABSENT),
            _ => self.written(),
        }
    }

    /// The state its definite result says it found, if that pins one down.
    fn needs(self) -> Option<u32> {
        match self {
            Action::Read { observed } => Some(observed),
            Action::Cas {
                expect,
                succeeded: Some(true),
                ..
            } => Some(expect),
            Action::Delete { deleted: Some(0) } => Some(ABSENT),
            _ => None,
        }
    }

    /// Does it leave the state unchanged whenever its result is possible?
    fn keeps_state(self) -> bool {
        matches!(
            self,
            Action::Read { .. }
                | Action::Cas {
                    succeeded: Some(false),
                    ..
                }
                | Action::Delete { deleted: Some(0) }
        )
    }
}

/// One op as seen by one key.
#[derive(Clone, Copy, Debug)]
struct KeyOp {
    /// Index into the checked history slice.
    op_index: usize,
    action: Action,
    call_us: u64,
    /// [`NEVER_RETURNED_US`] for writes with an unknown outcome.
    return_us: u64,
}

impl KeyOp {
    fn is_unknown(&self) -> bool {
        self.return_us == NEVER_RETURNED_US
    }
}

/// Interns values so a register state is a `u32` ([`ABSENT`], or 1 + index into `names`).
#[derive(Default)]
struct Values {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Values {
    fn id(&mut self, value: &str) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        self.names.push(value.to_string());
        let id = u32::try_from(self.names.len()).unwrap_or(UNREAD - 1);
        self.ids.insert(value.to_string(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        match id {
            ABSENT => "<absent>",
            UNREAD => "<a value no op reads>",
            _ => self.names.get(id as usize - 1).map_or("?", String::as_str),
        }
    }
}

/// Splits the history into per-key ops for every key any op mentions or any range returned,
/// dropping what the model does not constrain: serializable reads, failed ops, reads without
/// a definite result. A write whose result is missing or of the wrong kind may or may not
/// have taken effect.
fn project(history: &[Op], values: &mut Values) -> BTreeMap<String, Vec<KeyOp>> {
    let mut universe = BTreeSet::new();
    for op in history {
        if let OpKind::Put { key, .. }
        | OpKind::Get { key, .. }
        | OpKind::Delete { key }
        | OpKind::Cas { key, .. } = &op.kind
        {
            universe.insert(key.clone());
        }
        if let OpResult::Range { kvs, .. } = &op.result {
            universe.extend(kvs.iter().map(|kv| kv.key.clone()));
        }
    }
    let mut per_key: BTreeMap<String, Vec<KeyOp>> = universe
        .iter()
        .map(|key| (key.clone(), Vec::new()))
        .collect();
    for (op_index, op) in history.iter().enumerate() {
        if op.is_serializable_read() || matches!(op.result, OpResult::Failed(_)) {
            continue;
        }
        // Clamped so that even a malformed op returns after its call.
        let returned_us = op
            .return_us
            .filter(|_| !matches!(op.result, OpResult::Unknown(_)))
            .map(|ret| ret.max(op.call_us).min(NEVER_RETURNED_US - 1));
        let mut add = |key: &str, action: Action, definite: bool| {
            let return_us = returned_us
                .filter(|_| definite)
                .unwrap_or(NEVER_RETURNED_US);
            if let Some(ops) = per_key.get_mut(key) {
                ops.push(KeyOp {
                    op_index,
                    action,
                    call_us: op.call_us,
                    return_us,
                });
            }
        };
        let returned = returned_us.is_some();
        match (&op.kind, &op.result) {
            (OpKind::Get { key, .. }, OpResult::Get { kv, .. }) if returned => {
                let observed = kv.as_ref().map_or(ABSENT, |kv| values.id(&kv.value));
                add(key, Action::Read { observed }, true);
            }
            (OpKind::Range { start, end, .. }, OpResult::Range { kvs, .. })
                if returned && start < end =>
            {
                let bounds = (
                    Bound::Included(start.as_str()),
                    Bound::Excluded(end.as_str()),
                );
                for key in universe.range::<str, _>(bounds) {
                    let found = kvs.iter().find(|kv| &kv.key == key);
                    let observed = found.map_or(ABSENT, |kv| values.id(&kv.value));
                    add(key, Action::Read { observed }, true);
                }
            }
            (OpKind::Get { .. } | OpKind::Range { .. }, _) => {}
            (OpKind::Put { key, value }, result) => {
                let definite = returned && matches!(result, OpResult::Put { .. });
                add(
                    key,
                    Action::Put {
                        value: values.id(value),
                    },
                    definite,
                );
            }
            (OpKind::Delete { key }, result) => {
                let deleted = match result {
                    OpResult::Delete { deleted, .. } if returned => Some(*deleted),
                    _ => None,
                };
                add(key, Action::Delete { deleted }, deleted.is_some());
            }
            (OpKind::Cas { key, expect, value }, result) => {
                let succeeded = match result {
                    OpResult::Cas { succeeded, .. } if returned => Some(*succeeded),
                    _ => None,
                };
                let expect = expect.as_deref().map_or(ABSENT, |v| values.id(v));
                let action = Action::Cas {
                    expect,
                    value: values.id(value),
                    succeeded,
                };
                add(key, action, succeeded.is_some());
            }
        }
    }
    per_key
}

enum Verdict {
    Linearizable,
    Violation(Stuck),
    Inconclusive,
}

/// Where a failed search got furthest: the op whose return it could not get past.
struct Stuck {
    key_op: KeyOp,
    /// States the register was in, in the orders explored, when that op had to take effect.
    states: Vec<u32>,
}

struct SearchResult {
    verdict: Verdict,
    steps: u64,
}

/// The call and return events of one key's ops in time order, as a doubly linked list from
/// which an op's two events can be unlinked ("lifted") and relinked in LIFO order.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per node (0 is the head sentinel): the op it belongs to and whether it is the call.
    op_of: Vec<usize>,
    is_call: Vec<bool>,
    return_node: Vec<usize>,
}

impl EventList {
    fn new(ops: &[KeyOp]) -> Self {
        // At equal times calls sort before returns: equal timestamps are concurrent.
        let mut events: Vec<(u64, bool, usize)> = ops
            .iter()
            .enumerate()
            .flat_map(|(i, op)| [(op.call_us, false, i), (op.return_us, true, i)])
            .collect();
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = EventList {
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes)
                .map(|n| n.checked_sub(1).unwrap_or(NIL))
                .collect(),
            op_of: vec![NIL; nodes],
            is_call: vec![false; nodes],
            return_node: vec![NIL; ops.len()],
        };
        for (node, &(_, is_return, op)) in (1..).zip(&events) {
            list.op_of[node] = op;
            list.is_call[node] = !is_return;
            if is_return {
                list.return_node[op] = node;
            }
        }
        list
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    fn lift(&mut self, call_node: usize) {
        self.unlink(call_node);
        self.unlink(self.return_node[self.op_of[call_node]]);
    }

    fn unlift(&mut self, call_node: usize) {
        self.relink(self.return_node[self.op_of[call_node]]);
        self.relink(call_node);
    }
}

fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Lowe's memo of configurations already explored (hence failed): the set of linearized ops
/// with a definite result, the state, and the set of linearized unknown-outcome ops.
#[derive(Default)]
struct Memo {
    buckets: HashMap<(u64, u32), Vec<SeenSets>>,
}

/// The definite and the unknown linearized sets of one configuration seen.
type SeenSets = (Box<[u64]>, Box<[u64]>);

impl Memo {
    /// Records a configuration; false if it, or one with the same definite set and state but
    /// fewer unknown ops placed, was seen. Unknown ops can always go last instead, so having
    /// placed more of them never helps: this one fails too.
    fn insert(&mut self, hash: u64, definite: &[u64], state: u32, unknown: &[u64]) -> bool {
        let bucket = self.buckets.entry((hash, state)).or_default();
        let seen = bucket.iter().any(|(seen_definite, seen_unknown)| {
            **seen_definite == *definite
                && seen_unknown
                    .iter()
                    .zip(unknown)
                    .all(|(seen, now)| seen & !now == 0)
        });
        if !seen {
            bucket.push((definite.into(), unknown.into()));
        }
        !seen
    }
}

/// One key's ops prepared for a search.
struct Prepared {
    ops: Vec<KeyOp>,
    /// For unknown-outcome ops with identical actions (e.g. unknown deletes): (class, rank by
    /// call time). Such twins are interchangeable, so only the earliest unused one of a class
    /// may take effect; otherwise every subset of them would be searched.
    twins: Vec<Option<(usize, usize)>>,
    classes: usize,
    /// Per state: the ops that need to find it, by return time, and the ops that may produce
    /// it, by call time (empty unless searching fast).
    needers: HashMap<u32, Vec<usize>>,
    producers: HashMap<u32, Vec<usize>>,
    /// An op that needs a value nothing produces before it returns.
    hopeless: Option<usize>,
}

fn prepare(key_ops: &[KeyOp], fast: bool) -> Prepared {
    let mut ops = key_ops.to_vec();
    if fast {
        let looked_at: HashSet<u32> = (ops.iter())
            .filter_map(|op| match op.action {
                Action::Read { observed } => Some(observed),
                Action::Cas { expect, .. } => Some(expect),
                _ => None,
            })
            .collect();
        for op in &mut ops {
            if let Action::Put { value } | Action::Cas { value, .. } = &mut op.action {
                if !looked_at.contains(value) {
                    *value = UNREAD;
                }
            }
        }
    }
    let mut by_call: Vec<usize> = (0..ops.len()).collect();
    by_call.sort_by_key(|&i| (ops[i].call_us, i));
    let mut twins = vec![None; ops.len()];
    let mut classes: HashMap<Action, (usize, usize)> = HashMap::new();
    for &i in by_call.iter().filter(|&&i| ops[i].is_unknown()) {
        let next_class = classes.len();
        let (class, next_rank) = classes.entry(ops[i].action).or_insert((next_class, 0));
        twins[i] = Some((*class, *next_rank));
        *next_rank += 1;
    }
    let (mut needers, mut producers) = (HashMap::new(), HashMap::new());
    for &i in &by_call {
        if let Some(state) = ops[i].action.produces() {
            producers.entry(state).or_insert_with(Vec::new).push(i);
        }
    }
    let mut by_return = by_call;
    by_return.sort_by_key(|&i| (ops[i].return_us, i));
    for &i in &by_return {
        if let Some(state) = ops[i].action.needs() {
            needers.entry(state).or_insert_with(Vec::new).push(i);
        }
    }
    let hopeless = by_return
        .into_iter()
        .find(|&i| match ops[i].action.needs() {
            Some(ABSENT) | None => false,
            Some(value) => !producers.get(&value).is_some_and(|p: &Vec<usize>| {
                p.iter().any(|&w| ops[w].call_us <= ops[i].return_us)
            }),
        });
    if !fast {
        (needers, producers) = (HashMap::new(), HashMap::new());
    }
    Prepared {
        ops,
        twins,
        classes: classes.len(),
        needers,
        producers,
        hopeless,
    }
}

/// The mutable state of one search: which ops are linearized, in what order, the state after.
struct Search<'a> {
    ops: &'a [KeyOp],
    twins: &'a [Option<(usize, usize)>],
    needers: &'a HashMap<u32, Vec<usize>>,
    producers: &'a HashMap<u32, Vec<usize>>,
    list: EventList,
    /// Linearized ops with a definite result (and a hash of that set), and unknown ones.
    definite: Vec<u64>,
    definite_hash: u64,
    unknown: Vec<u64>,
    memo: Memo,
    /// Per linearized op: its call node, the state before it, whether it was forced.
    stack: Vec<(usize, u32, bool)>,
    twins_used: Vec<usize>,
    state: u32,
    /// Definite ops not linearized yet; unknown ones may all take effect last.
    definite_left: usize,
}

enum Mode {
    /// At a new configuration: place an op that keeps the state, if one is possible.
    Enter,
    /// Trying the callable ops from this event node on.
    Branch(usize),
    /// Undoing the last placement.
    Backtrack,
}

impl Search<'_> {
    fn is_linearized(&self, op: usize) -> bool {
        let set = if self.ops[op].is_unknown() {
            &self.unknown
        } else {
            &self.definite
        };
        set[op / 64] & (1 << (op % 64)) != 0
    }

    /// Toggles whether `op` counts as linearized.
    fn mark(&mut self, op: usize) {
        match self.twins[op] {
            Some((class, rank)) if self.twins_used[class] == rank => self.twins_used[class] += 1,
            Some((class, _)) => self.twins_used[class] -= 1,
            None => {}
        }
        if self.ops[op].is_unknown() {
            self.unknown[op / 64] ^= 1 << (op % 64);
        } else {
            self.definite[op / 64] ^= 1 << (op % 64);
            self.definite_hash ^= mix64(op as u64 + 1);
            if self.is_linearized(op) {
                self.definite_left -= 1;
            } else {
                self.definite_left += 1;
            }
        }
    }

    /// Places the op whose call node is `node`, unless the configuration reached was seen.
    fn linearize(&mut self, node: usize, next_state: u32, forced: bool) -> bool {
        let op = self.list.op_of[node];
        self.mark(op);
        if !self.memo.insert(
            self.definite_hash,
            &self.definite,
            next_state,
            &self.unknown,
        ) {
            self.mark(op);
            return false;
        }
        self.stack.push((node, self.state, forced));
        self.state = next_state;
        self.list.lift(node);
        true
    }

    /// Undoes the last placement: its call node and whether it was forced.
    fn undo(&mut self) -> Option<(usize, bool)> {
        let (node, previous_state, forced) = self.stack.pop()?;
        self.mark(self.list.op_of[node]);
        self.state = previous_state;
        self.list.unlift(node);
        Some((node, forced))
    }

    /// The first call node, among the ops that may be linearized next (those called before
    /// the first return still in the list), whose op satisfies `wanted`.
    fn find_callable(&self, wanted: impl Fn(usize, Action) -> bool) -> Option<usize> {
        let mut node = self.list.next[0];
        while node != NIL && self.list.is_call[node] {
            if wanted(node, self.ops[self.list.op_of[node]].action) {
                return Some(node);
            }
            node = self.list.next[node];
        }
        None
    }

    /// Must the current state stay until an unplaced op other than `op` has seen it? True if
    /// the first such op to return has nothing left that could bring the state back in time.
    fn needed_later(&self, op: usize) -> bool {
        let Some(needers) = self.needers.get(&self.state) else {
            return false;
        };
        let Some(&needer) = needers.iter().find(|&&n| n != op && !self.is_linearized(n)) else {
            return false;
        };
        let deadline_us = self.ops[needer].return_us;
        let producers = self
            .producers
            .get(&self.state)
            .map_or(&[][..], Vec::as_slice);
        !(producers.iter())
            .take_while(|&&p| self.ops[p].call_us <= deadline_us)
            .any(|&p| p != op && !self.is_linearized(p))
    }

    /// The state after the (not state-keeping) op at `node`, if the search should try it now.
    fn branch_state(&self, node: usize) -> Option<u32> {
        let op = self.list.op_of[node];
        let action = self.ops[op].action;
        if action.keeps_state() {
            return None; // `Enter` found it impossible in this same state.
        }
        if let Some((class, rank)) = self.twins[op] {
            if self.twins_used[class] != rank {
                return None;
            }
        }
        let next_state = action.apply(self.state)?;
        if next_state != self.state && self.needed_later(op) {
            return None;
        }
        // An unknown write placed right before a put or an unknown delete changes nothing
        // anyone sees: it could as well go last. So it is only tried when something that may
        // come next accepts the state it leaves.
        let useful = !self.ops[op].is_unknown()
            || (self.find_callable(|other, follower| {
                other != node
                    && !matches!(
                        follower,
                        Action::Put { .. } | Action::Delete { deleted: None }
                    )
                    && follower.apply(next_state).is_some()
            }))
            .is_some();
        useful.then_some(next_state)
    }
}

/// Searches for a linearization of one key's ops within `budget` steps. `fast` merges values
/// nobody looks at into one state and refuses to move away from a state some op still needs
/// to find: the verdict is the same either way, but without them the op reported stuck is
/// more telling.
fn search(key_ops: &[KeyOp], budget: u64, fast: bool) -> SearchResult {
    let Prepared {
        ops,
        twins,
        classes,
        needers,
        producers,
        hopeless,
    } = prepare(key_ops, fast);
    if let Some(op) = hopeless {
        let stuck = Stuck {
            key_op: ops[op],
            states: Vec::new(),
        };
        return SearchResult {
            verdict: Verdict::Violation(stuck),
            steps: 0,
        };
    }
    let mut search = Search {
        ops: &ops,
        twins: &twins,
        needers: &needers,
        producers: &producers,
        list: EventList::new(&ops),
        definite: vec![0; ops.len().div_ceil(64)],
        definite_hash: 0,
        unknown: vec![0; ops.len().div_ceil(64)],
        memo: Memo::default(),
        stack: Vec::new(),
        twins_used: vec![0; classes],
        state: ABSENT,
        definite_left: ops.iter().filter(|op| !op.is_unknown()).count(),
    };
    let mut deepest: Option<(usize, usize)> = None; // (linearized count, op)
    let mut stuck_states: Vec<Vec<u32>> = vec![Vec::new(); ops.len()];
    let mut steps = 0u64;
    let mut mode = Mode::Enter;
    loop {
        if search.definite_left == 0 {
            return SearchResult {
                verdict: Verdict::Linearizable,
                steps,
            };
        }
        if steps >= budget {
            return SearchResult {
                verdict: Verdict::Inconclusive,
                steps,
            };
        }
        steps += 1;
        mode = match mode {
            Mode::Enter => {
                // An op that keeps the state (a read, a failed CAS, a delete of nothing) and is
                // possible now may as well come now: no other order needs trying.
                let state = search.state;
                let keeper = search.find_callable(|_, action| {
                    action.keeps_state() && action.apply(state).is_some()
                });
                match keeper {
                    Some(node) if search.linearize(node, state, true) => Mode::Enter,
                    Some(_) => Mode::Backtrack,
                    None => Mode::Branch(search.list.next[0]),
                }
            }
            Mode::Branch(node) if node != NIL && search.list.is_call[node] => {
                match search.branch_state(node) {
                    Some(next_state) if search.linearize(node, next_state, false) => Mode::Enter,
                    _ => Mode::Branch(search.list.next[node]),
                }
            }
            Mode::Branch(node) => {
                // A return: the op it ends cannot be linearized after what is placed so far.
                if node != NIL {
                    let (op, depth) = (search.list.op_of[node], search.stack.len());
                    if deepest.is_none_or(|(deepest_depth, _)| depth > deepest_depth) {
                        deepest = Some((depth, op));
                    }
                    let states = &mut stuck_states[op];
                    if states.len() < MAX_REPORTED_STATES && !states.contains(&search.state) {
                        states.push(search.state);
                    }
                }
                Mode::Backtrack
            }
            Mode::Backtrack => match search.undo() {
                Some((_, true)) => Mode::Backtrack,
                Some((node, false)) => Mode::Branch(search.list.next[node]),
                None => {
                    let verdict = match deepest {
                        Some((_, op)) => Verdict::Violation(Stuck {
                            key_op: ops[op],
                            states: std::mem::take(&mut stuck_states[op]),
                        }),
                        None => Verdict::Inconclusive,
                    };
                    return SearchResult { verdict, steps };
                }
            },
        };
    }
}

/// Per op, the ops its definite result may rely on: the write of a value it reads or compares
/// against, and each change (of the kind it needs) that could be the last one before it in
/// some order, i.e. was called before it returned and did not return before a definite
/// overwrite that itself returned before the op was called. Minimizing keeps these with the
/// op, which makes it sound: if such a closed sub-history cannot be linearized, neither can the
/// whole history, as dropping an unkept change alters only states no kept definite op sees.
fn reliance_graph(key_ops: &[KeyOp]) -> Vec<Vec<usize>> {
    let overwrites: Vec<&KeyOp> = (key_ops.iter())
        .filter(|op| {
            let overwrite = matches!(
                op.action,
                Action::Put { .. }
                    | Action::Delete { .. }
                    | Action::Cas {
                        succeeded: Some(true),
                        ..
                    }
            );
            overwrite && !op.is_unknown()
        })
        .collect();
    let relies = |op: &KeyOp, other: &KeyOp| {
        let horizon_us = (overwrites.iter())
            .filter(|o| o.return_us < op.call_us)
            .map(|o| o.call_us)
            .max()
            .unwrap_or(0);
        let may_be_last = other.call_us <= op.return_us && other.return_us >= horizon_us;
        let deletes = matches!(other.action, Action::Delete { .. });
        match op.action {
            // Needs the key absent: on the last delete.
            Action::Read { observed: ABSENT }
            | Action::Delete { deleted: Some(0) }
            | Action::Cas {
                expect: ABSENT,
                succeeded: None | Some(true),
                ..
            } => deletes && may_be_last,
            // Needs the key present, or not holding some value: on the last change.
            Action::Delete { deleted: Some(_) }
            | Action::Cas {
                succeeded: Some(false),
                ..
            } => (deletes || other.action.written().is_some()) && may_be_last,
            Action::Read { observed: value } | Action::Cas { expect: value, .. } => {
                other.action.written() == Some(value)
            }
            Action::Put { .. } | Action::Delete { deleted: None } => false,
        }
    };
    let others = |op: usize| (0..key_ops.len()).filter(move |&other| other != op);
    (0..key_ops.len())
        .map(|op| {
            others(op)
                .filter(|&other| relies(&key_ops[op], &key_ops[other]))
                .collect()
        })
        .collect()
}

/// Shrinks a failing key history by trial searches on closed sub-histories: an op is only
/// dropped together with every kept op that relies on it.
struct Minimizer<'a> {
    key_ops: &'a [KeyOp],
    relied_on_by: Vec<Vec<usize>>,
    budget: u64,
    trials_left: usize,
    steps_left: u64,
}

impl Minimizer<'_> {
    fn new(key_ops: &[KeyOp], budget: u64) -> Minimizer<'_> {
        let mut relied_on_by = vec![Vec::new(); key_ops.len()];
        for (op, relied_on) in reliance_graph(key_ops).into_iter().enumerate() {
            for other in relied_on {
                relied_on_by[other].push(op);
            }
        }
        let (trials_left, steps_left) =
            (MINIMIZE_MAX_TRIALS, budget.saturating_mul(MINIMIZE_BUDGETS));
        Minimizer {
            key_ops,
            relied_on_by,
            budget,
            trials_left,
            steps_left,
        }
    }

    /// Drops `dropped`, and whatever relies on them, from `keep` if the rest still fails
    /// (running out of trials or steps counts as "no").
    fn try_drop(&mut self, keep: &mut Vec<bool>, dropped: &[usize]) -> bool {
        let mut candidate = keep.clone();
        let mut pending = dropped.to_vec();
        while let Some(i) = pending.pop() {
            if std::mem::replace(&mut candidate[i], false) {
                pending.extend(&self.relied_on_by[i]);
            }
        }
        if candidate == *keep || self.trials_left == 0 || self.steps_left == 0 {
            return false;
        }
        self.trials_left -= 1;
        let result = search(
            &selected(self.key_ops, &candidate),
            self.budget.min(self.steps_left),
            true,
        );
        self.steps_left = self.steps_left.saturating_sub(result.steps);
        let fails = matches!(result.verdict, Verdict::Violation(_));
        if fails {
            *keep = candidate;
        }
        fails
    }

    /// Drops the longest run from the front of `order` that keeps the failure, by bisection
    /// (failing is not monotone in the run's length, but every result is checked).
    fn drop_run(&mut self, keep: &mut Vec<bool>, order: &[usize]) {
        let (mut fails_len, mut passes_len) = (0, order.len());
        while passes_len - fails_len > 1 {
            let mid = fails_len + (passes_len - fails_len) / 2;
            if self.try_drop(keep, &order[fails_len..mid]) {
                fails_len = mid;
            } else {
                passes_len = mid;
            }
        }
    }

    /// Earlier returns first (cutting the start makes later trials cheap), then later calls,
    /// then ever smaller groups: ops with a definite result other than puts before the rest,
    /// later ops first.
    fn run(mut self) -> Vec<bool> {
        let ops = self.key_ops;
        let mut keep = vec![true; ops.len()];
        let mut order: Vec<usize> = (0..ops.len()).collect();
        order.sort_by_key(|&i| (ops[i].return_us, i));
        self.drop_run(&mut keep, &order);
        order.retain(|&i| keep[i]);
        order.sort_by_key(|&i| std::cmp::Reverse((ops[i].call_us, i)));
        self.drop_run(&mut keep, &order);
        order.retain(|&i| keep[i]);
        let writes = |op: &KeyOp| op.is_unknown() || matches!(op.action, Action::Put { .. });
        order.sort_by_key(|&i| (writes(&ops[i]), std::cmp::Reverse((ops[i].call_us, i))));
        let mut group_len = (order.len() / 2).max(1);
        loop {
            order.retain(|&i| keep[i]);
            let mut changed = false;
            for group in order.chunks(group_len) {
                changed |= self.try_drop(&mut keep, group);
            }
            if group_len == 1 && !changed {
                return keep;
            }
            group_len = (group_len / 2).max(1);
        }
    }
}

fn selected(key_ops: &[KeyOp], keep: &[bool]) -> Vec<KeyOp> {
    key_ops
        .iter()
        .zip(keep)
        .filter(|(_, &kept)| kept)
        .map(|(op, _)| *op)
        .collect()
}

fn explain(
    history: &[Op],
    key: &str,
    key_ops: &[KeyOp],
    budget: u64,
    values: &Values,
) -> LinFailure {
    let subset = selected(key_ops, &Minimizer::new(key_ops, budget).run());
    let mut ops: Vec<Op> = subset
        .iter()
        .filter_map(|k| history.get(k.op_index).cloned())
        .collect();
    ops.sort_by_key(|op| (op.call_us, op.id));
    let plain = search(&subset, budget.min(EXPLAIN_PLAIN_STEPS), false).verdict;
    let verdict = match plain {
        Verdict::Violation(_) => plain,
        _ => search(&subset, budget, true).verdict,
    };
    let explanation = match verdict {
        Verdict::Violation(stuck) => describe_stuck(history, key_ops, &stuck, values),
        _ => "no order of these ops fits both real time and one register".to_string(),
    };
    LinFailure {
        key: key.to_string(),
        ops,
        explanation,
    }
}

/// Two lines: the op that could not be placed, what it needed and what the search found.
fn describe_stuck(history: &[Op], key_ops: &[KeyOp], stuck: &Stuck, values: &Values) -> String {
    let needs = match stuck.key_op.action {
        Action::Cas {
            expect,
            succeeded: Some(false),
            ..
        } => {
            format!("a value other than {}", values.name(expect))
        }
        Action::Delete { deleted: Some(n) } if n != 0 => format!("the key present (deleted={n})"),
        action => match action.needs() {
            Some(ABSENT) => "the key absent".to_string(),
            Some(value) => {
                let writer = key_ops.iter().find(|op| match op.action {
                    Action::Put { value: v } | Action::Cas { value: v, .. } => v == value,
                    _ => false,
                });
                let note = match writer {
                    None => " (no op writes it)".to_string(),
                    Some(
                        op @ KeyOp {
                            action:
                                Action::Cas {
                                    succeeded: Some(false),
                                    ..
                                },
                            ..
                        },
                    ) => {
                        let id = history.get(op.op_index).map_or(op.op_index, |op| op.id);
                        format!(" (only #{id} writes it, a CAS that reported no swap)")
                    }
                    Some(_) => String::new(),
                };
                format!("the value {}{note}", values.name(value))
            }
            None => "a place where the ops after it still fit".to_string(),
        },
    };
    let mut states: Vec<&str> = stuck.states.iter().map(|&s| values.name(s)).collect();
    if states.len() >= MAX_REPORTED_STATES {
        states.push("...");
    }
    let found = if states.is_empty() {
        "nothing that could produce it was called before it returned".to_string()
    } else {
        format!(
            "every order explored left the key at {} before it returned",
            states.join(" or ")
        )
    };
    let described = history
        .get(stuck.key_op.op_index)
        .map_or_else(String::new, Op::describe);
    format!("cannot place {described}\n  it needs {needs}, but {found}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::ReadKv;

    /// Builds histories; each op gets its own client and the next id.
    #[derive(Default)]
    struct Hist(Vec<Op>);

    impl Hist {
        fn op(&mut self, kind: OpKind, result: OpResult, call_us: u64, ret: Option<u64>) -> usize {
            let id = self.0.len();
            let client = id as u64;
            self.0.push(Op {
                id,
                client,
                node: 1,
                kind,
                call_us,
                return_us: ret,
                result,
            });
            id
        }
        fn put(&mut self, key: &str, value: &str, call_us: u64, return_us: u64) -> usize {
            let kind = OpKind::Put {
                key: key.into(),
                value: value.into(),
            };
            self.op(
                kind,
                OpResult::Put { revision: 1 },
                call_us,
                Some(return_us),
            )
        }
        fn unknown_put(&mut self, key: &str, value: &str, call_us: u64) -> usize {
            let kind = OpKind::Put {
                key: key.into(),
                value: value.into(),
            };
            self.op(kind, OpResult::Unknown("timeout".into()), call_us, None)
        }
        fn get(&mut self, key: &str, seen: Option<&str>, call_us: u64, return_us: u64) -> usize {
            let kind = OpKind::Get {
                key: key.into(),
                serializable: false,
            };
            let kv = seen.map(|v| kv(key, v));
            self.op(
                kind,
                OpResult::Get { kv, revision: 1 },
                call_us,
                Some(return_us),
            )
        }
        fn delete(&mut self, key: &str, deleted: i64, call_us: u64, return_us: u64) -> usize {
            let kind = OpKind::Delete { key: key.into() };
            self.op(
                kind,
                OpResult::Delete {
                    deleted,
                    revision: 1,
                },
                call_us,
                Some(return_us),
            )
        }
        fn cas(&mut self, key: &str, expect: Option<&str>, value: &str, ok: bool, at: [u64; 2]) {
            let kind = OpKind::Cas {
                key: key.into(),
                expect: expect.map(Into::into),
                value: value.into(),
            };
            let result = OpResult::Cas {
                succeeded: ok,
                revision: 1,
            };
            self.op(kind, result, at[0], Some(at[1]));
        }
        fn range(&mut self, [start, end]: [&str; 2], kvs: &[(&str, &str)], at: [u64; 2]) {
            let kind = OpKind::Range {
                start: start.into(),
                end: end.into(),
                serializable: false,
            };
            let kvs = kvs.iter().map(|(k, v)| kv(k, v)).collect();
            self.op(
                kind,
                OpResult::Range { kvs, revision: 1 },
                at[0],
                Some(at[1]),
            );
        }
        fn check(&self) -> LinReport {
            check(&self.0)
        }
        fn passes(&self) -> bool {
            let report = self.check();
            assert!(report.inconclusive.is_empty(), "inconclusive: {report:?}");
            report.failure.is_none()
        }
    }

    fn kv(key: &str, value: &str) -> ReadKv {
        ReadKv {
            key: key.into(),
            value: value.into(),
            mod_revision: 1,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = Hist::default();
        h.get("k", None, 0, 10);
        h.put("k", "a", 20, 30);
        h.get("k", Some("a"), 40, 50);
        h.put("k", "b", 60, 70);
        h.get("k", Some("b"), 80, 90);
        h.delete("k", 1, 100, 110);
        h.get("k", None, 120, 130);
        let report = h.check();
        assert_eq!(report.failure, None);
        assert!(report.inconclusive.is_empty());
        assert_eq!((report.keys_checked, report.ops_checked), (1, 7));
    }

    #[test]
    fn stale_read_after_completed_write_is_detected() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.put("k", "b", 20, 30);
        h.get("k", Some("a"), 40, 50);
        let failure = h.check().failure.expect("stale read must fail");
        assert_eq!(failure.key, "k");
        assert_eq!(
            failure.ops.iter().map(|op| op.id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(
            failure.explanation.contains("get k"),
            "{}",
            failure.explanation
        );
        assert!(
            failure.explanation.contains("key at b"),
            "{}",
            failure.explanation
        );
    }

    #[test]
    fn concurrent_write_and_read_are_accepted_in_either_order() {
        for seen in [None, Some("a")] {
            let mut h = Hist::default();
            h.put("k", "a", 0, 100);
            h.get("k", seen, 10, 20);
            assert!(h.passes(), "read {seen:?} during the put");
        }
        // Equal timestamps are concurrent; one microsecond later the put has surely happened.
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.get("k", None, 10, 20);
        assert!(h.passes());
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.get("k", None, 11, 20);
        assert!(!h.passes());
    }

    #[test]
    fn unknown_put_observed_later_is_accepted() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.unknown_put("k", "b", 20);
        h.get("k", Some("a"), 30, 40);
        h.get("k", Some("b"), 1_000, 1_010);
        assert!(h.passes());
        // But not before it was called.
        let mut h = Hist::default();
        h.get("k", Some("b"), 0, 10);
        h.unknown_put("k", "b", 20);
        assert!(!h.passes());
    }

    #[test]
    fn unknown_put_never_observed_is_accepted() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.unknown_put("k", "b", 5);
        h.get("k", Some("a"), 20, 30);
        h.get("k", Some("a"), 40, 50);
        assert!(h.passes());
        // A delete that found the key turns off the shortcut that drops the unobserved put.
        h.delete("k", 1, 60, 70);
        assert!(h.passes());
    }

    #[test]
    fn read_of_a_value_nobody_wrote_is_detected() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.get("k", Some("zzz"), 20, 30);
        let failure = h.check().failure.expect("phantom read must fail");
        assert!(
            failure.explanation.contains("no op writes it"),
            "{}",
            failure.explanation
        );
    }

    #[test]
    fn cas_follows_register_semantics() {
        let mut h = Hist::default();
        h.cas("k", None, "a", true, [0, 10]);
        h.cas("k", Some("a"), "b", true, [20, 30]);
        h.cas("k", Some("a"), "c", false, [40, 50]);
        h.get("k", Some("b"), 60, 70);
        assert!(h.passes());
        // Claims success though the value surely was b, not a.
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.put("k", "b", 20, 30);
        h.cas("k", Some("a"), "c", true, [40, 50]);
        assert!(!h.passes());
        // Claims failure though the value surely was a.
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.cas("k", Some("a"), "c", false, [20, 30]);
        assert!(!h.passes());
    }

    #[test]
    fn delete_count_must_match_presence() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.delete("k", 1, 20, 30);
        h.delete("k", 0, 40, 50);
        assert!(h.passes());
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.delete("k", 0, 20, 30);
        assert!(!h.passes());
        let mut h = Hist::default();
        h.delete("k", 1, 0, 10);
        assert!(!h.passes());
    }

    #[test]
    fn linearizable_range_is_projected_per_key() {
        let mut h = Hist::default();
        h.put("a", "1", 0, 10);
        h.put("b", "2", 0, 10);
        h.put("c", "3", 100, 110);
        h.range(["a", "c"], &[("a", "1"), ("b", "2")], [20, 30]);
        h.range(
            ["a", "z"],
            &[("a", "1"), ("b", "2"), ("c", "3")],
            [120, 130],
        );
        let report = h.check();
        assert_eq!(report.failure, None);
        assert_eq!((report.keys_checked, report.ops_checked), (3, 8));
        // A range that misses a completed write of a key inside it.
        h.range(["a", "c"], &[("b", "2")], [140, 150]);
        let failure = h.check().failure.expect("range missing a must fail");
        assert_eq!(failure.key, "a");
        assert!(failure.ops.iter().any(|op| op.id == 5));
    }

    #[test]
    fn serializable_reads_are_ignored() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        let kind = OpKind::Get {
            key: "k".into(),
            serializable: true,
        };
        h.op(
            kind,
            OpResult::Get {
                kv: None,
                revision: 1,
            },
            20,
            Some(30),
        );
        let kind = OpKind::Range {
            start: "a".into(),
            end: "z".into(),
            serializable: true,
        };
        h.op(
            kind,
            OpResult::Range {
                kvs: vec![],
                revision: 1,
            },
            20,
            Some(30),
        );
        assert!(h.passes());
        assert_eq!(h.check().ops_checked, 1);
        h.get("k", None, 20, 30);
        assert!(!h.passes());
    }

    /// xorshift64*: deterministic randomness for generated histories.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound.max(1)
        }
    }

    /// A history of one key from a register that really is linearizable: each op takes effect
    /// at a random instant inside its interval. `unknown_writes` writes time out (every other
    /// one still takes effect); `mixed` adds CAS and delete to puts and gets.
    fn generated(
        seed: u64,
        total: usize,
        clients: u64,
        unknown_writes: usize,
        mixed: bool,
    ) -> Vec<Op> {
        let mut rng = Rng(seed | 1);
        let mut next_call_us: Vec<u64> = (0..clients).map(|_| rng.below(50)).collect();
        // (op, instant it takes effect, times out)
        let mut planned: Vec<(Op, u64, bool)> = Vec::new();
        for id in 0..total {
            let client = (0..clients)
                .min_by_key(|&c| (next_call_us[c as usize], c))
                .unwrap_or(0);
            let call_us = next_call_us[client as usize] + rng.below(30);
            let duration_us = 20 + rng.below(300);
            next_call_us[client as usize] = call_us + duration_us;
            let key = "k".to_string();
            let kind = match rng.below(100) {
                0..=39 => OpKind::Put {
                    key,
                    value: format!("v{id}"),
                },
                40..=89 if mixed => OpKind::Get {
                    key,
                    serializable: false,
                },
                40..=94 if !mixed => OpKind::Get {
                    key,
                    serializable: false,
                },
                90..=96 if mixed => OpKind::Cas {
                    key,
                    expect: None,
                    value: format!("v{id}"),
                },
                90..=99 if mixed => OpKind::Delete { key },
                _ => OpKind::Put {
                    key,
                    value: format!("v{id}"),
                },
            };
            let (return_us, result) =
                (Some(call_us + duration_us), OpResult::Failed(String::new()));
            let op = Op {
                id,
                client,
                node: 1,
                kind,
                call_us,
                return_us,
                result,
            };
            planned.push((op, call_us + rng.below(duration_us + 1), false));
        }
        let writes: Vec<usize> = (0..total).filter(|&i| !planned[i].0.is_read()).collect();
        assert!(
            writes.len() >= unknown_writes * 2,
            "too few writes for {unknown_writes} unknown"
        );
        for slot in 0..unknown_writes {
            planned[writes[slot * writes.len() / unknown_writes]].2 = true;
        }
        planned.sort_by_key(|(op, effect_us, _)| (*effect_us, op.id));
        let mut state: Option<String> = None;
        let mut written: Vec<String> = Vec::new();
        for (n, (op, _, times_out)) in planned.iter_mut().enumerate() {
            let state_before = state.clone();
            op.result = match &mut op.kind {
                OpKind::Put { value, .. } => {
                    written.push(value.clone());
                    state = Some(value.clone());
                    OpResult::Put { revision: 1 }
                }
                OpKind::Get { key, .. } => {
                    let kv = state.as_ref().map(|v| kv(key, v));
                    OpResult::Get { kv, revision: 1 }
                }
                OpKind::Delete { .. } => {
                    let deleted = i64::from(state.take().is_some());
                    OpResult::Delete {
                        deleted,
                        revision: 1,
                    }
                }
                OpKind::Cas { expect, value, .. } => {
                    // Usually expect the current value so that some swaps succeed.
                    if rng.below(3) > 0 {
                        *expect = state.clone();
                    } else if !written.is_empty() {
                        *expect = Some(written[rng.below(written.len() as u64) as usize].clone());
                    }
                    let succeeded = *expect == state;
                    if succeeded {
                        state = Some(value.clone());
                    }
                    OpResult::Cas {
                        succeeded,
                        revision: 1,
                    }
                }
                OpKind::Range { .. } => OpResult::Failed(String::new()),
            };
            // A timed-out write: every other one still takes effect.
            if *times_out {
                op.return_us = None;
                op.result = OpResult::Unknown("timeout".into());
                if n % 2 == 1 {
                    state = state_before;
                }
            }
        }
        let mut history: Vec<Op> = planned.into_iter().map(|(op, _, _)| op).collect();
        history.sort_by_key(|op| op.id);
        history
    }

    /// 49 generated ops (4 clients) and a read, after everything returned, of the first
    /// value written.
    fn planted_stale_read() -> Vec<Op> {
        let mut history = generated(7, 49, 4, 0, false);
        let first_put = history
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Put { value, .. } => Some((op.call_us, value.clone())),
                _ => None,
            })
            .min();
        let (_, stale) = first_put.expect("some put");
        let end_us = history
            .iter()
            .filter_map(|op| op.return_us)
            .max()
            .unwrap_or(0);
        let kind = OpKind::Get {
            key: "k".into(),
            serializable: false,
        };
        let result = OpResult::Get {
            kv: Some(kv("k", &stale)),
            revision: 1,
        };
        let (id, call_us, return_us) = (history.len(), end_us + 10, Some(end_us + 20));
        history.push(Op {
            id,
            client: 99,
            node: 1,
            kind,
            call_us,
            return_us,
            result,
        });
        history
    }

    #[test]
    fn generated_histories_are_linearizable() {
        for seed in 1..20 {
            let clients = [3, 6, 16][seed as usize % 3];
            let history = generated(seed, 150, clients, 8, seed % 2 == 0);
            let report = check(&history);
            assert_eq!(report.failure, None, "seed {seed}");
            assert!(report.inconclusive.is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn minimized_stale_read_is_small_and_still_fails() {
        let history = planted_stale_read();
        assert_eq!(history.len(), 50);
        let failure = check(&history)
            .failure
            .expect("planted stale read must fail");
        assert!(failure.ops.len() <= 4, "{:#?}", failure.ops);
        assert!(
            failure.ops.iter().any(|op| op.id == 49),
            "the stale read is kept"
        );
        assert!(failure.ops.windows(2).all(|w| w[0].call_us <= w[1].call_us));
        let again = check(&failure.ops)
            .failure
            .expect("the sub-history fails on its own");
        assert_eq!(again.ops.len(), failure.ops.len());
    }

    #[test]
    fn stale_read_in_a_busy_history_is_found_and_minimized() {
        // 16 clients, CAS, deletes, 30 unknown writes; then a get in the middle is made to
        // return a value overwritten by a put that completed before the get was called.
        let mut history = generated(11, 400, 16, 30, true);
        let definite_put = |op: &Op| match (&op.kind, &op.result) {
            (OpKind::Put { value, .. }, OpResult::Put { .. }) => Some(value.clone()),
            _ => None,
        };
        let is_get = |op: &Op| matches!(op.result, OpResult::Get { .. });
        let get = (200..).find(|&i| is_get(&history[i])).expect("a get");
        let before = |i: usize, j: usize| history[i].return_us < Some(history[j].call_us);
        let newer = (0..get)
            .rev()
            .find(|&i| definite_put(&history[i]).is_some() && before(i, get));
        let newer = newer.expect("a put before the get");
        let older = (0..newer)
            .rev()
            .find(|&i| definite_put(&history[i]).is_some() && before(i, newer));
        let stale = older
            .and_then(|i| definite_put(&history[i]))
            .expect("an older put");
        history[get].result = OpResult::Get {
            kv: Some(kv("k", &stale)),
            revision: 1,
        };

        let failure = check(&history).failure.expect("the stale read must fail");
        assert!(failure.ops.len() <= 4, "{:#?}", failure.ops);
        assert!(
            failure.ops.iter().any(|op| op.id == get),
            "{}",
            failure.explanation
        );
        assert!(
            check(&failure.ops).failure.is_some(),
            "the sub-history fails on its own"
        );
    }

    #[test]
    fn minimizing_keeps_the_changes_a_kept_result_may_rely_on() {
        let mut h = Hist::default();
        h.put("k", "a", 0, 10);
        h.delete("k", 1, 20, 30);
        h.put("k", "b", 40, 50);
        h.delete("k", 1, 60, 70);
        h.get("k", None, 80, 90);
        h.get("k", Some("b"), 45, 55);
        let mut values = Values::default();
        let key_ops = &project(&h.0, &mut values)["k"];
        let relies = reliance_graph(key_ops);
        // The absent read can only follow the last delete; the earlier one was overwritten by
        // put b, which returned before the read was called.
        assert_eq!(relies[4], [3]);
        assert_eq!(relies[5], [2], "a read relies on the write of its value");
        assert_eq!(
            relies[3],
            [2],
            "a delete that found the key relies on the last change"
        );
        assert!(relies[0].is_empty() && relies[2].is_empty());
    }

    #[test]
    fn exhausted_budget_is_inconclusive_not_failure() {
        let report = check_with_budget(&planted_stale_read(), 5);
        assert_eq!(report.failure, None);
        assert_eq!(report.inconclusive, ["k"]);
        let report = check_with_budget(&generated(3, 100, 4, 0, true), 5);
        assert_eq!(report.inconclusive, ["k"]);
    }

    #[test]
    fn malformed_history_does_not_panic() {
        let mut h = Hist::default();
        h.range(["z", "a"], &[("q", "1")], [0, 10]); // start > end, result outside the range
        h.put("k", "a", 50, 40); // returns before its call
        let kind = OpKind::Put {
            key: "k".into(),
            value: "b".into(),
        };
        h.op(
            kind,
            OpResult::Get {
                kv: None,
                revision: 1,
            },
            60,
            Some(70),
        ); // wrong result kind
        h.get("k", Some("b"), 80, 90);
        let report = h.check();
        assert_eq!(report.failure, None);
        assert_eq!(report.keys_checked, 2);
        assert_eq!(
            check(&[]),
            LinReport {
                keys_checked: 0,
                ops_checked: 0,
                failure: None,
                inconclusive: vec![]
            }
        );
    }

    #[test]
    fn checks_400_ops_8_clients_20_unknown_writes_within_default_budget() {
        let history = generated(42, 400, 8, 20, true);
        let started = std::time::Instant::now();
        let report = check(&history);
        let elapsed = started.elapsed();
        println!("400 ops, 8 clients, 20 unknown writes: checked in {elapsed:?}");
        assert!(
            report.inconclusive.is_empty(),
            "inconclusive within the default budget"
        );
        assert_eq!(report.failure, None);
        assert_eq!(report.ops_checked, 400);
    }
}
