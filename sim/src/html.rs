//! One simulated run as a single self-contained HTML page.
//!
//! A failing seed is much easier to understand from a picture than from a few thousand lines
//! of timeline: who led when, which nodes were cut off or down, when faults hit, and which
//! client operations were slow, failed or left in doubt. `render` draws all of that on one
//! shared time axis (inline SVG, inline CSS, a little optional JS for zooming; no external
//! resources, so the file can be attached to a bug and opened offline), followed by the event
//! timeline as a table and, for a failing run, the checkers' findings and the repro command.
//! Operations are drawn only as SVG segments (never as table rows), which keeps a run with
//! thousands of operations well under two megabytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::history::{Op, OpKind, OpResult};
use crate::trace::{Event, EventKind, Role};

/// Everything the picture shows about one run.
pub struct RunPicture<'a> {
    /// e.g. "seed 42 · 5 nodes · scenario leader-isolated".
    pub title: String,
    /// Member ids in display order (may include members added later).
    pub nodes: Vec<u64>,
    /// End of the run, simulated microseconds.
    pub end_us: u64,
    pub events: &'a [Event],
    pub ops: &'a [Op],
    /// "PASS ..." or "FAIL ..." line.
    pub verdict: String,
    /// The command that reproduces a failure.
    pub repro: Option<String>,
}

/// Writing to a `String` cannot fail, so the `fmt::Result` is dropped here once.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

const VW: f64 = 1360.0; // SVG user units across
const LM: f64 = 64.0; // left margin for lane labels
const PW: f64 = VW - LM - 14.0; // plot width
const LANE_H: f64 = 22.0;
const LAT_H: f64 = 110.0;

// Role styles: (css class, colour, legend label); indices below.
const ROLES: [(&str, &str, &str); 6] = [
    ("rl", "#f59e0b", "leader"),
    ("rf", "#a9c9ee", "follower"),
    ("rc", "#a855f7", "candidate"),
    ("rp", "#dcc4fb", "pre-candidate"),
    ("rd", "#3f3f46", "down"),
    ("rz", "#a8a29e", "paused"),
];
const LEADER: usize = 0;
const FOLLOWER: usize = 1;
const DOWN: usize = 4;
const PAUSED: usize = 5;

// Operation kinds: (css class prefix, colour, legend label).
const KINDS: [(&str, &str, &str); 4] = [
    ("r", "#2563eb", "read"),
    ("w", "#16a34a", "put"),
    ("c", "#9333ea", "cas"),
    ("d", "#ea580c", "delete"),
];

fn role_style(role: Role) -> usize {
    match role {
        Role::Leader => LEADER,
        Role::Follower => FOLLOWER,
        Role::Candidate => 2,
        Role::PreCandidate => 3,
        Role::Down => DOWN,
    }
}

fn kind_class(op: &Op) -> &'static str {
    match op.kind {
        OpKind::Get { .. } | OpKind::Range { .. } => "r",
        OpKind::Put { .. } => "w",
        OpKind::Cas { .. } => "c",
        OpKind::Delete { .. } => "d",
    }
}

/// 0 ok, 1 failed (surely no effect), 2 unknown, 3 pending at the end.
fn outcome(op: &Op) -> u8 {
    match (&op.result, op.return_us) {
        (_, None) => 3,
        (OpResult::Failed(_), _) => 1,
        (OpResult::Unknown(_), _) => 2,
        _ => 0,
    }
}

/// HTML/XML escaping for text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// At most `n` characters, with an ellipsis when cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn secs(us: u64) -> String {
    format!("{:.3}s", us as f64 / 1e6)
}

/// A 1/2/5 step giving about a dozen ticks over `span` seconds (mirrored in the JS).
fn tick_step(span: f64) -> f64 {
    let raw = (span / 12.0).max(1e-6);
    let m = 10f64.powf(raw.log10().floor());
    [m, 2.0 * m, 5.0 * m]
        .into_iter()
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * m)
}

fn event_node(kind: &EventKind) -> Option<u64> {
    match kind {
        EventKind::Role { node, .. }
        | EventKind::Crash { node, .. }
        | EventKind::Restart { node }
        | EventKind::Pause { node }
        | EventKind::Resume { node } => Some(*node),
        _ => None,
    }
}

/// The given members in order, then any other node the trace mentions.
fn all_nodes(p: &RunPicture) -> Vec<u64> {
    let mut nodes: Vec<u64> = Vec::new();
    let mut extra = BTreeSet::new();
    for e in p.events {
        extra.extend(event_node(&e.kind));
        if let EventKind::Partition { blocked, .. } = &e.kind {
            extra.extend(blocked.iter().flat_map(|&(a, b)| [a, b]));
        }
    }
    for n in p.nodes.iter().copied().chain(extra) {
        if !nodes.contains(&n) {
            nodes.push(n);
        }
    }
    nodes
}

/// Consecutive `(from, to, state)` spans from state changes `(at, state)`; the last one lasts
/// until `end`, and empty ones are dropped.
fn spans<T>(starts: Vec<(u64, T)>, end: u64) -> Vec<(u64, u64, T)> {
    let ends: Vec<u64> = starts.iter().skip(1).map(|s| s.0).chain([end]).collect();
    let all = starts
        .into_iter()
        .zip(ends)
        .map(|((from, v), to)| (from, to, v));
    all.filter(|s| s.1 > s.0).collect()
}

/// Spans of one sort of event, each lasting until the next.
fn periods<'e, T>(
    evs: &[&'e Event],
    end: u64,
    pick: impl Fn(&'e EventKind) -> Option<T>,
) -> Vec<(u64, u64, T)> {
    spans(
        evs.iter()
            .filter_map(|e| Some((e.at_us, pick(&e.kind)?)))
            .collect(),
        end,
    )
}

/// A role bar: `(from, to, (style, term))`.
type Seg = (u64, u64, (usize, u64));

/// One node's displayed state over time (a crash or pause overrides the raft role), and its
/// crash/restart markers `(time, is_crash, text)`.
fn node_lane(evs: &[&Event], node: u64, end: u64) -> (Vec<Seg>, Vec<(u64, bool, String)>) {
    let (mut starts, mut marks) = (Vec::new(), Vec::new());
    let (mut base, mut term, mut crashed, mut paused) = (None, 0, false, false);
    for e in evs.iter().filter(|e| event_node(&e.kind) == Some(node)) {
        match &e.kind {
            EventKind::Role { term: t, role, .. } => (base, term) = (Some(role_style(*role)), *t),
            EventKind::Crash { detail, .. } => {
                (crashed, base) = (true, Some(DOWN));
                marks.push((e.at_us, true, format!("n{node} crashed: {detail}")));
            }
            EventKind::Restart { .. } => {
                (crashed, paused) = (false, false);
                base = base.filter(|&b| b != DOWN).or(Some(FOLLOWER));
                marks.push((e.at_us, false, format!("n{node} restarted")));
            }
            EventKind::Pause { .. } => paused = true,
            EventKind::Resume { .. } => paused = false,
            _ => {}
        }
        let shown = match (crashed, paused) {
            (true, _) => Some(DOWN),
            (_, true) => Some(PAUSED),
            _ => base,
        };
        let now = shown.map(|s| (s, term));
        if starts.last().map(|s: &(u64, _)| s.1) != Some(now) {
            starts.push((e.at_us, now));
        }
    }
    let segs = spans(starts, end)
        .into_iter()
        .filter_map(|(f, t, s)| Some((f, t, s?)))
        .collect();
    (segs, marks)
}

/// Groups of nodes that can talk both ways (transitively), for the partition label.
fn groups(nodes: &[u64], blocked: &[(u64, u64)]) -> Vec<Vec<u64>> {
    let open = |a: u64, b: u64| !blocked.contains(&(a, b)) && !blocked.contains(&(b, a));
    let mut out: Vec<Vec<u64>> = Vec::new();
    let mut seen = BTreeSet::new();
    for &n in nodes {
        if !seen.insert(n) {
            continue;
        }
        let mut group = vec![n];
        let mut i = 0;
        while i < group.len() {
            for &m in nodes {
                if open(group[i], m) && seen.insert(m) {
                    group.push(m);
                }
            }
            i += 1;
        }
        group.sort_unstable();
        out.push(group);
    }
    out
}

/// Assigns each interval (sorted by start) a row, reusing the first free one; beyond `cap`
/// rows the one that frees first is shared. Returns the rows and how many were used.
fn pack(spans: &[(u64, u64)], cap: usize) -> (Vec<usize>, usize) {
    let mut ends: Vec<u64> = Vec::new();
    let mut rows = Vec::with_capacity(spans.len());
    for &(from, to) in spans {
        let row = match ends.iter().position(|&e| e <= from) {
            Some(r) => r,
            None if ends.len() < cap => {
                ends.push(0);
                ends.len() - 1
            }
            None => (0..ends.len()).min_by_key(|&r| ends[r]).unwrap_or(0),
        };
        ends[row] = ends[row].max(to.max(from + 1));
        rows.push(row);
    }
    (rows, ends.len().max(1))
}

fn event_text(kind: &EventKind) -> (String, &'static str) {
    match kind {
        EventKind::Role { term, role, .. } => (format!("{} (term {term})", role_name(*role)), ""),
        EventKind::Crash { detail, .. } => (format!("crashed: {detail}"), "crash"),
        EventKind::Restart { .. } => ("restarted".into(), "crash"),
        EventKind::Pause { .. } => ("paused".into(), ""),
        EventKind::Resume { .. } => ("resumed".into(), ""),
        EventKind::Partition {
            description: d,
            blocked: b,
        } if b.is_empty() => (format!("network healed: {d}"), "net"),
        EventKind::Partition {
            description: d,
            blocked: b,
        } => {
            let links: Vec<String> = b.iter().map(|(x, y)| format!("{x}→{y}")).collect();
            (
                format!("partition: {d} (blocked {})", links.join(" ")),
                "net",
            )
        }
        EventKind::Fault { description: d } => (format!("fault: {d}"), "net"),
        EventKind::Membership { description: d } => (format!("membership: {d}"), ""),
        EventKind::Phase { name } => (format!("phase {name}"), "phase"),
        EventKind::Check {
            name,
            ok: true,
            detail: d,
        } => (format!("check {name}: ok {d}"), ""),
        EventKind::Check {
            name, detail: d, ..
        } => (format!("check {name}: FAILED {d}"), "bad"),
    }
}

fn role_name(role: Role) -> &'static str {
    ROLES[role_style(role)].2
}

const CSS: &str = "body{font:13px/1.45 system-ui,sans-serif;margin:16px 20px;color:#111827}
h1{font-size:18px;margin:0 0 8px}h2{font-size:15px;margin:22px 0 6px}
.verdict{font-weight:600;padding:3px 10px;border-radius:4px;display:inline-block}
.pass{background:#dcfce7;color:#166534}.fail{background:#fee2e2;color:#991b1b}
code.repro{display:block;margin:8px 0;background:#111827;color:#e5e7eb;padding:7px 10px;border-radius:4px;
user-select:all;white-space:pre-wrap;word-break:break-all;font:12px ui-monospace,monospace}
.meta{color:#4b5563;margin:6px 0}.legend{margin:6px 0;color:#374151}.legend b{margin-left:14px}
.sw{display:inline-block;width:13px;height:10px;margin:0 3px 0 9px;vertical-align:-1px;border-radius:2px}
svg{width:100%;height:auto;display:block;user-select:none}svg text{font:11px system-ui,sans-serif}
.hint{color:#6b7280;font-size:12px;margin:2px 0 0}
table{border-collapse:collapse;font:12px ui-monospace,monospace}
td,th{padding:1px 10px 1px 0;border-bottom:1px solid #f1f1f1;vertical-align:top;text-align:left}
td:last-child{white-space:pre-wrap}tr.crash td{color:#b91c1c}tr.net td{color:#92400e}
tr.bad td{background:#fee2e2;color:#991b1b}tr.phase td{font-weight:700;background:#f3f4f6}
pre{background:#f9fafb;border:1px solid #e5e7eb;padding:8px;white-space:pre-wrap;font-size:12px}
.ln{fill:#f3f4f6}.g{stroke:#e5e7eb}.pb{stroke:#6b7280;stroke-dasharray:4 3}.tk{fill:#6b7280;text-anchor:middle;font-size:10px}
.lb{fill:#374151;font-weight:600}.sm{fill:#6b7280;font-size:10px}.tm{fill:#451a03;font-size:10px;pointer-events:none}
.pt{fill:#fee2e2;stroke:#ef4444}.ptl{fill:#991b1b;font-size:10px;pointer-events:none}.cut{fill:url(#hatch)}
.fl{stroke:#d97706;stroke-width:3}.mb{fill:#7c3aed}.ck{fill:#16a34a}.ckf{fill:#dc2626}
.ps{fill:#dbeafe}.pl{fill:#dcfce7}.pc{fill:#fef3c7}.po{fill:#e5e7eb}.ra{text-anchor:end}
.cr{fill:#dc2626;stroke:#fff}.rs{fill:#16a34a;stroke:#fff}.fr{fill:none;stroke:#d1d5db}
";

/// SVG being written, with the run's time scale.
struct Pen {
    out: String,
    end: u64,
}

impl Pen {
    fn new(end: u64) -> Pen {
        Pen {
            out: String::new(),
            end,
        }
    }

    /// Time to SVG x.
    fn x(&self, t: u64) -> f64 {
        LM + PW * t.min(self.end) as f64 / self.end as f64
    }

    /// A bar over `[from, to]` with hover text.
    fn bar(&mut self, class: &str, (from, to): (u64, u64), y: f64, h: f64, hover: &str) {
        let (x, width) = (self.x(from), (self.x(to) - self.x(from)).max(1.2));
        let hover = esc(hover);
        w!(self.out, "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{width:.1}\" height=\"{h:.1}\"><title>{hover}</title></rect>");
    }

    fn dot(&mut self, class: &str, t: u64, y: f64, r: f64, hover: &str) {
        let (x, hover) = (self.x(t), esc(hover));
        w!(self.out, "<circle class=\"{class}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{r}\"><title>{hover}</title></circle>");
    }

    fn text(&mut self, class: &str, x: f64, y: f64, text: &str) {
        w!(
            self.out,
            "<text class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\">{}</text>",
            esc(text)
        );
    }

    /// A line; `hover` may be empty.
    fn line(&mut self, class: &str, (x1, x2): (f64, f64), (y1, y2): (f64, f64), hover: &str) {
        w!(
            self.out,
            "<line class=\"{class}\" x1=\"{x1:.1}\" x2=\"{x2:.1}\" y1=\"{y1:.1}\" y2=\"{y2:.1}\""
        );
        match hover {
            "" => w!(self.out, "/>"),
            _ => w!(self.out, "><title>{}</title></line>", esc(hover)),
        }
    }
}

/// A client lane: its label, its ops with their sub-row, and its first row overall.
type Lane<'a> = (String, Vec<(&'a Op, usize)>, usize);

/// Client lanes: one per client (with sub-rows where its ops overlap), or one packed lane
/// for everybody when there are many clients; and the number of rows in all.
fn client_lanes(ops: &[Op], end: u64) -> (Vec<Lane<'_>>, usize) {
    let mut by_client: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_client.entry(op.client).or_default().push(op);
    }
    let mut groups: Vec<(String, Vec<&Op>)> = by_client
        .into_iter()
        .map(|(c, v)| (format!("c{c}"), v))
        .collect();
    let cap = if groups.len() > 24 {
        groups = vec![(
            "all".to_string(),
            groups.into_iter().flat_map(|g| g.1).collect(),
        )];
        60
    } else {
        6
    };
    let (mut lanes, mut total) = (Vec::new(), 0);
    for (name, mut ops) in groups {
        ops.sort_by_key(|o| (o.call_us, o.id));
        let spans: Vec<_> = ops
            .iter()
            .map(|o| (o.call_us, o.return_us.unwrap_or(end)))
            .collect();
        let (rows, n) = pack(&spans, cap);
        lanes.push((name, ops.into_iter().zip(rows).collect(), total));
        total += n;
    }
    (lanes, total)
}

/// The page for one run.
pub fn render(p: &RunPicture) -> String {
    let mut evs: Vec<&Event> = p.events.iter().collect();
    evs.sort_by_key(|e| e.at_us);
    let last_op = p
        .ops
        .iter()
        .map(|o| o.return_us.unwrap_or(o.call_us))
        .max()
        .unwrap_or(0);
    let end = p
        .end_us
        .max(evs.last().map_or(0, |e| e.at_us))
        .max(last_op)
        .max(1);
    let nodes = all_nodes(p);
    let (lanes, total_rows) = client_lanes(p.ops, end);
    let row_h = (260.0 / total_rows.max(1) as f64).clamp(3.0, 10.0);
    let gap = if lanes.len() > 1 { 3.0 } else { 0.0 };

    // Vertical layout, top to bottom.
    let (phase_y, axis_y, grid_top) = (4.0, 34.0, 38.0);
    let part_y = grid_top + LANE_H * nodes.len() as f64 + 4.0;
    let fault_y = part_y + 22.0;
    let ops_y = fault_y + 34.0;
    let lat_y = ops_y + total_rows as f64 * row_h + lanes.len() as f64 * gap + 14.0;
    let (grid_bot, bot_axis_y) = (lat_y + LAT_H, lat_y + LAT_H + 13.0);
    let height = bot_axis_y + 5.0;

    let mut fixed = Pen::new(end); // backgrounds and labels, outside the zoom group
    let mut z = Pen::new(end); // time-dependent shapes, inside the zoom group
    let (mut tails, mut dots) = (Pen::new(end), Pen::new(end)); // under and over the ops

    // Phase bands.
    fixed.text("sm", 4.0, phase_y + 12.0, "phase");
    let phases = periods(&evs, end, |k| match k {
        EventKind::Phase { name } => Some(name.as_str()),
        _ => None,
    });
    for (from, to, name) in phases {
        let class = match name {
            "safety" => "ps",
            "liveness" => "pl",
            "check" => "pc",
            _ => "po",
        };
        let (x0, x1) = (z.x(from), z.x(to));
        z.bar(
            class,
            (from, to),
            phase_y,
            16.0,
            &format!("phase {name} {}–{}", secs(from), secs(to)),
        );
        if x1 - x0 > 30.0 {
            z.text(
                "sm",
                x0 + 4.0,
                phase_y + 12.0,
                &clip(name, ((x1 - x0) / 6.0) as usize),
            );
        }
        if from > 0 {
            z.line("pb", (x0, x0), (grid_top, grid_bot), "");
        }
    }

    // Node lanes: role bars, partition hatching, crash/restart markers.
    let quorum = nodes.len() / 2 + 1;
    let cuts = periods(&evs, end, |k| match k {
        EventKind::Partition {
            description: d,
            blocked: b,
        } => Some((d.as_str(), b.as_slice())),
        _ => None,
    });
    let cuts: Vec<_> = cuts.into_iter().filter(|c| !c.2 .1.is_empty()).collect();
    for (i, &node) in nodes.iter().enumerate() {
        let y = grid_top + LANE_H * i as f64;
        let (bar_y, bar_h) = (y + 3.0, LANE_H - 6.0);
        w!(
            fixed.out,
            "<rect class=\"ln\" x=\"{LM}\" y=\"{}\" width=\"{PW}\" height=\"{}\"/>",
            y + 2.0,
            LANE_H - 4.0
        );
        fixed.text("lb", 4.0, y + 15.0, &format!("n{node}"));
        let (segs, marks) = node_lane(&evs, node, end);
        for (from, to, (style, term)) in segs {
            let (class, _, name) = ROLES[style];
            let hover = format!("n{node} {name}, term {term} · {}–{}", secs(from), secs(to));
            z.bar(class, (from, to), bar_y, bar_h, &hover);
            let label = format!("t{term}");
            if style == LEADER && z.x(to) - z.x(from) > 8.0 + 6.0 * label.len() as f64 {
                z.text("tm", z.x(from) + 3.0, y + 15.0, &label);
            }
        }
        for &(from, to, (desc, blocked)) in &cuts {
            let open =
                |m: &&u64| !blocked.contains(&(node, **m)) && !blocked.contains(&(**m, node));
            let (reach, n) = (nodes.iter().filter(open).count(), nodes.len());
            if reach < quorum {
                let hover = format!(
                    "n{node} cut off (reaches {reach} of {n} nodes, needs {quorum}): {desc}"
                );
                z.bar("cut", (from, to), bar_y, bar_h, &hover);
            }
        }
        for (t, crash, text) in marks {
            z.dot(
                if crash { "cr" } else { "rs" },
                t,
                bar_y,
                4.5,
                &format!("{} {text}", secs(t)),
            );
        }
    }

    // Partition lane: who can talk to whom.
    fixed.text("sm", 4.0, part_y + 12.0, "network");
    for &(from, to, (desc, blocked)) in &cuts {
        let gs = groups(&nodes, blocked);
        let named = |g: &Vec<u64>| {
            g.iter()
                .map(|n| format!("n{n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let text = match gs.len() {
            1 => desc.to_string(),
            _ => gs.iter().map(named).collect::<Vec<_>>().join(" | "),
        };
        let links: Vec<String> = blocked.iter().map(|(a, b)| format!("{a}→{b}")).collect();
        let (t0, t1, links) = (secs(from), secs(to), links.join(" "));
        z.bar(
            "pt",
            (from, to),
            part_y,
            16.0,
            &format!("{t0}–{t1} {desc}\ngroups: {text}\nblocked: {links}"),
        );
        let width = z.x(to) - z.x(from);
        if width > 24.0 {
            z.text(
                "ptl",
                z.x(from) + 3.0,
                part_y + 12.0,
                &clip(&text, ((width - 6.0) / 5.6) as usize),
            );
        }
    }

    // Faults (ticks), membership changes and checks (dots).
    fixed.text("sm", 4.0, fault_y + 12.0, "faults");
    for e in &evs {
        let t = secs(e.at_us);
        let (class, hover) = match &e.kind {
            EventKind::Fault { description: d } => ("fl", format!("{t} fault: {d}")),
            EventKind::Membership { description: d } => ("mb", format!("{t} membership: {d}")),
            EventKind::Check {
                name,
                ok: true,
                detail: d,
            } => ("ck", format!("{t} check {name}: ok {d}")),
            EventKind::Check {
                name, detail: d, ..
            } => ("ckf", format!("{t} check {name}: FAILED {d}")),
            _ => continue,
        };
        let (x, hover) = (z.x(e.at_us), clip(&hover, 400));
        match class {
            "fl" => z.line(class, (x, x), (fault_y, fault_y + 16.0), &hover),
            _ => z.dot(class, e.at_us, fault_y + 8.0, 4.0, &hover),
        }
    }

    // Client operations, then their latencies on a log scale (at most six decades).
    let lat_ms = |o: &Op| Some((o.return_us?.saturating_sub(o.call_us) as f64 / 1e3).max(1e-3));
    let lats: Vec<f64> = p.ops.iter().filter_map(lat_ms).collect();
    let hi_dec = lats.iter().fold(1f64, |a, &b| a.max(b)).log10().ceil() as i32;
    let lo_dec = lats.iter().fold(1e9f64, |a, &b| a.min(b)).log10().floor() as i32;
    let lo_dec = lo_dec.clamp(hi_dec - 6, hi_dec - 1);
    let lat_yof = |ms: f64| {
        let f = ((ms.log10() - lo_dec as f64) / (hi_dec - lo_dec) as f64).clamp(0.0, 1.0);
        lat_y + LAT_H - 4.0 - f * (LAT_H - 8.0)
    };
    // Hover text shrinks as ops multiply, to keep big runs small.
    let hover_len = (600_000 / p.ops.len().max(1)).clamp(100, 240);
    fixed.text("sm", 4.0, ops_y - 6.0, "clients");
    for (li, (name, ops, first)) in lanes.iter().enumerate() {
        let top = ops_y + *first as f64 * row_h + li as f64 * gap;
        if row_h >= 5.0 {
            fixed.text("sm ra", LM - 4.0, top + row_h.min(9.0), name);
        }
        for &(op, row) in ops {
            let (kind, outcome) = (kind_class(op), outcome(op));
            let class = format!("{kind}{outcome}");
            let (y, h) = (top + row as f64 * row_h, (row_h - 1.0).max(2.0));
            let ret = op.return_us.unwrap_or(end);
            z.bar(
                &class,
                (op.call_us, ret),
                y + 0.5,
                h,
                &clip(&op.describe(), hover_len),
            );
            if outcome == 2 && ret < end {
                tails.line(
                    &format!("t{kind}"),
                    (z.x(ret), z.x(end)),
                    (y + h, y + h),
                    "",
                );
            }
            if let Some(ms) = lat_ms(op) {
                dots.dot(
                    &class,
                    op.call_us,
                    lat_yof(ms),
                    2.0,
                    &format!("#{} {ms:.2} ms", op.id),
                );
            }
        }
    }
    w!(
        fixed.out,
        "<rect class=\"fr\" x=\"{LM}\" y=\"{lat_y}\" width=\"{PW}\" height=\"{LAT_H}\"/>"
    );
    fixed.text("sm", 4.0, lat_y + 12.0, "latency");
    for d in lo_dec..=hi_dec {
        let y = lat_yof(10f64.powi(d));
        let text = match d {
            3.. => format!("{}s", 10u64.pow(d.unsigned_abs() - 3)),
            0.. => format!("{}ms", 10u64.pow(d.unsigned_abs())),
            _ => format!("{}ms", 1.0 / 10f64.powi(-d)),
        };
        fixed.line("g", (LM, LM + PW), (y, y), "");
        fixed.text("sm ra", LM - 4.0, y + 3.0, &text);
    }

    // Time grid and tick labels (the JS redraws these when zooming).
    let mut ticks = Pen::new(end);
    let (end_s, step) = (end as f64 / 1e6, tick_step(end as f64 / 1e6));
    let decimals = (-step.log10() - 1e-9).ceil().max(0.0) as usize;
    for i in 0..=((end_s / step + 1e-9).floor() as u64) {
        let t = i as f64 * step;
        let (x, text) = (LM + t / end_s * PW, format!("{t:.decimals$}s"));
        ticks.line("g", (x, x), (grid_top, grid_bot), "");
        ticks.text("tk", x, axis_y, &text);
        ticks.text("tk", x, bot_axis_y, &text);
    }

    // The page: header, legend, picture, failure, timeline.
    let mut out = String::with_capacity(z.out.len() + dots.out.len() + 32_768);
    let (title, verdict) = (esc(&p.title), esc(&p.verdict));
    w!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    );
    w!(out, "<title>quorumkv · {title}</title>\n<style>\n{CSS}");
    for (class, color, _) in ROLES {
        w!(out, ".{class}{{fill:{color}}}");
    }
    for (k, c, _) in KINDS {
        w!(
            out,
            "\n.{k}0{{fill:{c}}}.{k}1{{fill:{c};fill-opacity:.25;stroke:#dc2626;stroke-width:.8}}"
        );
        w!(out, ".{k}2{{fill:{c};fill-opacity:.5}}.{k}3{{fill:{c};fill-opacity:.15;stroke:{c};stroke-dasharray:3 2}}");
        w!(out, ".t{k}{{stroke:{c};stroke-dasharray:2 3;opacity:.45}}");
    }
    let class = if p.verdict.starts_with("PASS") {
        "pass"
    } else {
        "fail"
    };
    w!(out, "\n</style>\n</head>\n<body>\n<h1>{title}</h1>\n<div class=\"verdict {class}\">{verdict}</div>\n");
    if let Some(r) = &p.repro {
        w!(
            out,
            "<code class=\"repro\" title=\"click to select\">{}</code>\n",
            esc(r)
        );
    }
    let count = |o: u8| p.ops.iter().filter(|op| outcome(op) == o).count();
    let (n_ev, n_ops, ok, failed) = (p.events.len(), p.ops.len(), count(0), count(1));
    let (unknown, pending) = (count(2), count(3));
    w!(out, "<div class=\"meta\">{end_s:.3} s simulated · {n_ev} events · {n_ops} ops: {ok} ok, {failed} failed, {unknown} unknown, {pending} pending</div>\n");
    legend(&mut out);
    w!(out, "<svg id=\"run\" viewBox=\"0 0 {VW} {height:.0}\" data-l=\"{LM}\" data-w=\"{PW}\" data-t=\"{end_s}\" data-gt=\"{grid_top}\" data-gb=\"{grid_bot}\" data-ay=\"{axis_y}\" data-by=\"{bot_axis_y}\" xmlns=\"http://www.w3.org/2000/svg\">\n");
    w!(out, "<defs><clipPath id=\"clip\"><rect x=\"{}\" y=\"0\" width=\"{}\" height=\"{height:.0}\"/></clipPath>", LM - 3.0, PW + 6.0);
    w!(out, "<pattern id=\"hatch\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><rect width=\"2.5\" height=\"6\" fill=\"#dc2626\" fill-opacity=\".7\"/></pattern></defs>\n");
    let (fixed, ticks, tails, z, dots) = (fixed.out, ticks.out, tails.out, z.out, dots.out);
    w!(out, "{fixed}\n<g id=\"ticks\">{ticks}</g>\n<g class=\"z\" clip-path=\"url(#clip)\">\n{tails}\n{z}\n{dots}\n</g>\n</svg>\n");
    w!(out, "<p class=\"hint\">Hover for details. Mouse wheel over a time axis (or shift+wheel anywhere) zooms, drag pans, double-click resets.</p>\n");

    if p.verdict.starts_with("FAIL") {
        w!(
            out,
            "<h2>Failure</h2>\n<p class=\"verdict fail\">{verdict}</p>\n"
        );
        let checks = evs.iter().filter_map(|e| match &e.kind {
            EventKind::Check {
                name,
                ok: false,
                detail,
            } => Some((e.at_us, name, detail)),
            _ => None,
        });
        let mut any = false;
        for (at, name, detail) in checks {
            w!(
                out,
                "<h3>{} at {}</h3>\n<pre>{}</pre>\n",
                esc(name),
                secs(at),
                esc(detail)
            );
            any = true;
        }
        if !any {
            w!(out, "<p>No failing checker event in the trace.</p>\n");
        }
        if let Some(r) = &p.repro {
            w!(
                out,
                "<p>Reproduce with:</p><code class=\"repro\">{}</code>\n",
                esc(r)
            );
        }
    }

    w!(
        out,
        "<h2>Timeline</h2>\n<table>\n<tr><th>time (s)</th><th>node</th><th>event</th></tr>\n"
    );
    for e in &evs {
        let (text, class) = event_text(&e.kind);
        let node = event_node(&e.kind).map_or(String::new(), |n| format!("n{n}"));
        let (t, text) = (e.at_us as f64 / 1e6, esc(&text));
        w!(
            out,
            "<tr class=\"{class}\"><td>{t:.6}</td><td>{node}</td><td>{text}</td></tr>\n"
        );
    }
    w!(out, "</table>\n<script>\n{JS}</script>\n</body>\n</html>\n");
    out
}

/// The legend, in order: (swatch style, text); "<..." is written as is, and "roles" and
/// "kinds" stand for the role and operation colours.
const LEGEND: [(&str, &str); 17] = [
    ("<b>roles</b>", ""),
    ("roles", ""),
    (
        "background:repeating-linear-gradient(45deg,#dc2626 0 2px,#fff 2px 5px)",
        "cut off from a quorum",
    ),
    ("border-radius:50%;width:10px;background:#dc2626", "crash"),
    ("border-radius:50%;width:10px;background:#16a34a", "restart"),
    ("<br><b>ops</b>", ""),
    ("kinds", ""),
    ("<b>outcome</b>", ""),
    ("background:#16a34a", "ok"),
    ("background:#16a34a40;outline:1px solid #dc2626", "failed"),
    (
        "background:#16a34a80",
        "unknown (dotted: may take effect until the end)",
    ),
    ("background:#16a34a26;outline:1px dashed #16a34a", "pending"),
    ("<b>events</b>", ""),
    ("background:#d97706;width:3px", "fault"),
    (
        "border-radius:50%;width:10px;background:#7c3aed",
        "membership",
    ),
    (
        "border-radius:50%;width:10px;background:#16a34a",
        "check ok",
    ),
    (
        "border-radius:50%;width:10px;background:#dc2626",
        "check failed",
    ),
];

/// The key to colours and markers, as HTML above the picture.
fn legend(out: &mut String) {
    let swatch = |out: &mut String, style: &str, text: &str| {
        w!(out, "<span class=\"sw\" style=\"{style}\"></span>{text}");
    };
    w!(out, "<div class=\"legend\">");
    for (style, text) in LEGEND {
        match style {
            "roles" => ROLES
                .iter()
                .for_each(|r| swatch(out, &format!("background:{}", r.1), r.2)),
            "kinds" => KINDS
                .iter()
                .for_each(|k| swatch(out, &format!("background:{}", k.1), k.2)),
            s if s.starts_with('<') => w!(out, "{s}"),
            s => swatch(out, s, text),
        }
    }
    w!(out, "</div>\n");
}

/// Optional zoom: rewrites the x coordinates of everything in `g.z` for a visible window
/// `[a, b]` of the original plot, and redraws the ticks. The static page needs none of it.
const JS: &str = r#"(function(){
var svg=document.getElementById('run');if(!svg||!svg.getBoundingClientRect)return;
function d(n){return +svg.getAttribute('data-'+n);}
var L=d('l'),W=d('w'),T=d('t'),GT=d('gt'),GB=d('gb'),AY=d('ay'),BY=d('by'),VW=svg.viewBox.baseVal.width;
var NS='http://www.w3.org/2000/svg',A=['x','x1','x2','cx'],a=0,b=W,drag=null,queued=false;
var els=[].slice.call(svg.querySelectorAll('g.z > *')).map(function(e){var o={e:e};
 A.concat(['width']).forEach(function(n){var v=e.getAttribute(n);if(v!==null)o[n]=+v;});return o;});
function pt(ev){var r=svg.getBoundingClientRect(),k=VW/r.width;return [(ev.clientX-r.left)*k,(ev.clientY-r.top)*k];}
function clamp(){var n=b-a;if(a<0){a=0;b=n;}if(b>W){b=W;a=W-n;}if(a<0)a=0;}
function el(tag,at,txt){var e=document.createElementNS(NS,tag);for(var k in at)e.setAttribute(k,at[k]);if(txt)e.textContent=txt;return e;}
function ticks(){var g=document.getElementById('ticks');while(g.firstChild)g.removeChild(g.firstChild);
 var t0=a/W*T,t1=b/W*T,raw=Math.max((t1-t0)/12,1e-6),m=Math.pow(10,Math.floor(Math.log10(raw)));
 var st=[1,2,5,10].map(function(f){return f*m;}).filter(function(s){return s>=raw;})[0];
 var dec=Math.max(0,Math.ceil(-Math.log10(st)-1e-9));
 for(var i=Math.ceil(t0/st-1e-9);i*st<=t1+1e-9;i++){var t=i*st,x=(L+(t-t0)/(t1-t0)*W).toFixed(1),s=t.toFixed(dec)+'s';
  g.appendChild(el('line',{'class':'g',x1:x,x2:x,y1:GT,y2:GB}));
  g.appendChild(el('text',{'class':'tk',x:x,y:AY},s));g.appendChild(el('text',{'class':'tk',x:x,y:BY},s));}}
function draw(){queued=false;var k=W/(b-a);els.forEach(function(o){
 A.forEach(function(n){if(n in o)o.e.setAttribute(n,(L+(o[n]-L-a)*k).toFixed(1));});
 if('width' in o)o.e.setAttribute('width',(o.width*k).toFixed(1));});ticks();}
function later(){if(!queued){queued=true;requestAnimationFrame(draw);}}
svg.addEventListener('wheel',function(ev){var p=pt(ev),x=p[0]-L,dy=ev.deltaY||ev.deltaX;
 if(!(ev.shiftKey||ev.ctrlKey||p[1]<GT||p[1]>GB)||x<0||x>W||!dy)return;ev.preventDefault();
 var at=a+x/W*(b-a),n=Math.min(W,Math.max(W/5000,(b-a)*(dy<0?0.8:1.25)));a=at-x/W*n;b=a+n;clamp();later();},{passive:false});
svg.addEventListener('mousedown',function(ev){if(ev.button===0&&b-a<W){drag={x:pt(ev)[0],a:a,b:b};ev.preventDefault();}});
window.addEventListener('mousemove',function(ev){if(!drag)return;var dx=(pt(ev)[0]-drag.x)*(drag.b-drag.a)/W;
 a=drag.a-dx;b=drag.b-dx;clamp();later();});
window.addEventListener('mouseup',function(){drag=null;});
svg.addEventListener('dblclick',function(){a=0;b=W;later();});
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::ReadKv;

    /// Events from a compact script: `ms verb args` separated by newlines or ';'. Verbs: F P C L
    /// (role: node term), crash (node detail), restart/pause/resume (node), isolate (node
    /// description), heal, fault/member/phase (text), ok/bad (name|detail).
    fn script(text: &str) -> Vec<Event> {
        let event = |line: &str| -> Option<Event> {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at_us = words.first()?.parse::<u64>().ok()? * 1000;
            let num = |i: usize| words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0);
            let tail = |i: usize| words.get(i..).map_or(String::new(), |w| w.join(" "));
            let (node, term) = (num(2), num(3));
            let role = |role| Some(EventKind::Role { node, term, role });
            let kind = match *words.get(1)? {
                "F" => role(Role::Follower),
                "P" => role(Role::PreCandidate),
                "C" => role(Role::Candidate),
                "L" => role(Role::Leader),
                "crash" => Some(EventKind::Crash {
                    node,
                    detail: tail(3),
                }),
                "restart" => Some(EventKind::Restart { node }),
                "pause" => Some(EventKind::Pause { node }),
                "resume" => Some(EventKind::Resume { node }),
                "isolate" => {
                    let blocked = (1..=5)
                        .filter(|&m| m != node)
                        .flat_map(|m| [(node, m), (m, node)]);
                    Some(EventKind::Partition {
                        description: tail(3),
                        blocked: blocked.collect(),
                    })
                }
                "heal" => Some(EventKind::Partition {
                    description: "heal".into(),
                    blocked: vec![],
                }),
                "fault" => Some(EventKind::Fault {
                    description: tail(2),
                }),
                "member" => Some(EventKind::Membership {
                    description: tail(2),
                }),
                "phase" => Some(EventKind::Phase { name: tail(2) }),
                verb => {
                    let text = tail(2).replace("\\n", "\n");
                    let (name, detail) = text.split_once('|')?;
                    let (name, detail, ok) = (name.to_string(), detail.to_string(), verb == "ok");
                    Some(EventKind::Check { name, ok, detail })
                }
            };
            Some(Event { at_us, kind: kind? })
        };
        text.split(['\n', ';']).filter_map(event).collect()
    }

    /// Five nodes: an election, the leader isolated and replaced, a pause, a crash and
    /// restart, other faults, a leader transfer, the three phases and a failed check.
    const RUN: &str = "0 phase safety; 0 F 1 1; 0 F 2 1; 0 F 3 1; 0 F 4 1; 0 F 5 1
        300 P 1 1; 310 C 1 2; 330 L 1 2; 335 F 2 2; 335 F 3 2; 335 F 4 2; 335 F 5 2
        5000 isolate 1 isolate leader n1
        5600 P 3 2; 5610 C 3 3; 5650 L 3 3; 5660 F 2 3; 5660 F 4 3; 5660 F 5 3
        6300 F 1 2; 6400 P 1 2; 7000 fault drop 10% of messages <all links>
        9000 heal; 9050 F 1 3; 10000 pause 4; 11000 resume 4
        12000 crash 3 power loss, unsynced WAL tail lost
        12400 P 2 3; 12410 C 2 4; 12450 L 2 4; 14000 restart 3; 14000 F 3 4
        15000 fault clock skew n5 +50ms; 16000 member transfer leadership to n5
        16020 L 5 5; 16020 F 2 5; 16030 member transfer to n5 done
        17000 phase liveness; 19500 phase check; 19800 ok election safety|one leader per term
        19900 bad linearizability|get k3 -> v17@12 is stale:\\n  put k3=v40 returned at 6.002s";

    /// A deterministic pseudo-random history: `n` ops spread over 20 s, 8 clients; ops sent to
    /// n1 while it is isolated (5 s to 9 s) time out or fail.
    fn synthetic_ops(n: u64) -> Vec<Op> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut clock = [0u64; 8];
        let mut ops = Vec::new();
        for id in 0..n as usize {
            let (client, node, key) = (rnd(8), 1 + rnd(5), format!("k{}", rnd(6)));
            let call_us = clock[client as usize].max(id as u64 * 19_900_000 / n) + rnd(1_000);
            let mut lat = 500 + rnd(4_000) + if rnd(10) == 0 { rnd(200_000) } else { 0 };
            let (value, revision) = (format!("v{id}"), id as i64);
            let (kind, mut result) = match rnd(4) {
                0 => {
                    let kv = ReadKv {
                        key: key.clone(),
                        value,
                        mod_revision: revision,
                    };
                    let get = OpKind::Get {
                        key,
                        serializable: false,
                    };
                    (
                        get,
                        OpResult::Get {
                            kv: Some(kv),
                            revision,
                        },
                    )
                }
                1 => (OpKind::Put { key, value }, OpResult::Put { revision }),
                2 => {
                    let succeeded = rnd(2) == 0;
                    let cas = OpKind::Cas {
                        key,
                        expect: None,
                        value,
                    };
                    (
                        cas,
                        OpResult::Cas {
                            succeeded,
                            revision,
                        },
                    )
                }
                _ => (
                    OpKind::Delete { key },
                    OpResult::Delete {
                        deleted: 1,
                        revision,
                    },
                ),
            };
            if node == 1 && (5_000_000..9_000_000).contains(&call_us) {
                lat = 1_000_000;
                result = match rnd(2) {
                    0 => OpResult::Unknown("timeout".into()),
                    _ => OpResult::Failed("not leader".into()),
                };
            }
            let return_us = Some(call_us + lat).filter(|&r| r <= 20_000_000);
            clock[client as usize] = call_us + lat;
            ops.push(Op {
                id,
                client,
                node,
                kind,
                call_us,
                return_us,
                result,
            });
        }
        ops
    }

    fn picture<'a>(events: &'a [Event], ops: &'a [Op], verdict: &str) -> RunPicture<'a> {
        let (title, repro) = ("seed 7 · 3 nodes".into(), Some("sim --seed 7 <x>".into()));
        let (nodes, verdict) = (vec![1, 2, 3], verdict.into());
        RunPicture {
            title,
            nodes,
            end_us: 10_000_000,
            events,
            ops,
            verdict,
            repro,
        }
    }

    #[test]
    fn output_is_a_complete_html_document() {
        let (events, ops) = (script(RUN), synthetic_ops(50));
        let html = render(&picture(&events, &ops, "PASS all checks"));
        assert!(html.starts_with("<!DOCTYPE html>\n<html") && html.ends_with("</html>\n"));
        for tag in [
            "<head>", "</head>", "<body>", "<svg", "</svg>", "<table>", "</table>", "</body>",
        ] {
            assert_eq!(html.matches(tag).count(), 1, "{tag}");
        }
        assert!(html.contains("class=\"verdict pass\"") && !html.contains("<h2>Failure</h2>"));
        // Self-contained: nothing is loaded from elsewhere.
        let svg_ns = |(i, _): (usize, &str)| html[i..].starts_with("http://www.w3.org/2000/svg");
        assert!(html.match_indices("http").all(svg_ns));
        assert!(!html.contains(" src=") && !html.contains("href=") && !html.contains("@import"));
    }

    #[test]
    fn text_is_escaped() {
        let mut ops = synthetic_ops(3);
        ops[0].kind = OpKind::Put {
            key: "<script>".into(),
            value: "a&b\"'".into(),
        };
        let events = script("1 fault <img src=x onerror=alert(1)>");
        let mut pic = picture(&events, &ops, "FAIL <b>bad</b>");
        pic.title = "</title><script>".into();
        let html = render(&pic);
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only our own script tag"
        );
        assert!(!html.contains("<img") && !html.contains("<b>bad") && !html.contains("</title><s"));
        assert!(html.contains("put &lt;script&gt;=a&amp;b&quot;&#39;"));
        assert!(
            html.contains("FAIL &lt;b&gt;bad&lt;/b&gt;") && html.contains("sim --seed 7 &lt;x&gt;")
        );
    }

    #[test]
    fn every_node_gets_a_lane() {
        // n9 is not a listed member but has events: it gets a lane too.
        let events = script("5 L 9 1");
        let html = render(&picture(&events, &[], "PASS"));
        for n in ["n1", "n2", "n3", "n9"] {
            assert_eq!(html.matches(&format!("\">{n}</text>")).count(), 1, "{n}");
        }
        assert_eq!(html.matches("<rect class=\"ln\"").count(), 4);
    }

    #[test]
    fn a_crash_produces_a_down_segment() {
        let events = script("0 F 2 1; 2000 crash 2 kill -9; 4000 restart 2");
        let html = render(&picture(&events, &[], "PASS"));
        assert!(html.contains("<rect class=\"rd\" x=\""));
        assert!(html.contains("<title>n2 down, term 1 · 2.000s–4.000s</title>"));
        assert!(html.contains("<title>n2 follower, term 1 · 4.000s–10.000s</title>"));
        assert!(html.contains("<circle class=\"cr\"") && html.contains("n2 crashed: kill -9"));
        let (segs, marks) = node_lane(&events.iter().collect::<Vec<_>>(), 2, 10_000_000);
        let segs: Vec<_> = segs
            .iter()
            .map(|&(from, to, (style, _))| (from / 1_000_000, to / 1_000_000, style))
            .collect();
        assert_eq!(segs, [(0, 2, FOLLOWER), (2, 4, DOWN), (4, 10, FOLLOWER)]);
        assert_eq!(marks.len(), 2);
    }

    #[test]
    fn a_partition_marks_the_minority_cut_off() {
        let events = script(RUN);
        let pic = RunPicture {
            nodes: vec![1, 2, 3, 4, 5],
            end_us: 20_000_000,
            ..picture(&events, &[], "PASS")
        };
        let html = render(&pic);
        assert!(html.contains(">n1 | n2,n3,n4,n5</text>"));
        assert_eq!(html.matches("<rect class=\"cut\"").count(), 1);
        assert!(html.contains("n1 cut off (reaches 1 of 5 nodes, needs 3)"));
    }

    #[test]
    fn rendering_is_deterministic() {
        let (events, ops) = (script(RUN), synthetic_ops(300));
        let a = render(&picture(&events, &ops, "FAIL x"));
        let b = render(&picture(&script(RUN), &synthetic_ops(300), "FAIL x"));
        assert_eq!(a, b);
    }

    #[test]
    fn five_thousand_ops_stay_under_two_megabytes() {
        let (events, ops) = (script(RUN), synthetic_ops(5000));
        let html = render(&picture(&events, &ops, "PASS"));
        assert!(
            html.matches("<rect class=\"").count() > 5000,
            "every op drawn"
        );
        assert!(html.len() < 2_000_000, "{} bytes", html.len());
    }

    /// The realistic example; written to `$QUORUMKV_HTML_EXAMPLE` when that is set.
    #[test]
    fn realistic_example_renders() {
        let (events, ops) = (script(RUN), synthetic_ops(300));
        assert_eq!(events.len(), 42, "the script parses");
        let html = render(&RunPicture {
            title: "seed 42 · 5 nodes · scenario leader-isolated".into(),
            nodes: vec![1, 2, 3, 4, 5],
            end_us: 20_000_000,
            events: &events,
            ops: &ops,
            verdict: "FAIL linearizability: get k3 returned a stale value".into(),
            repro: Some(
                "cargo run -p sim -- --seed 42 --nodes 5 --scenario leader-isolated".into(),
            ),
        });
        assert!(html.contains("<h2>Failure</h2>") && html.contains("is stale"));
        if let Ok(path) = std::env::var("QUORUMKV_HTML_EXAMPLE") {
            if let Err(e) = std::fs::write(&path, &html) {
                panic!("writing {path}: {e}");
            }
        }
    }
}
