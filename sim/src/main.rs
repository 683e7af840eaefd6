//! `quorumkv-sim`: run one seed, sweep many, check determinism, prove the checkers catch
//! planted bugs. Use it through `ci/sim`, which builds it with `--cfg madsim`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorumkv::hooks::Bug;
use quorumkv_sim::html::{render, RunPicture};
use quorumkv_sim::run::{run, RunOptions, RunReport};
use quorumkv_sim::scenario::{self, SCENARIOS};
use quorumkv_sim::schedule::Schedule;

const USAGE: &str = "usage:
  ci/sim run --seed N [--scenario NAME] [--nodes 3|5] [--proxies P] [--inject-bug NAME] [--html FILE] [--quiet]
  ci/sim sweep --seeds A..B [--nodes 3|5] [--scenario NAME] [--proxies P] [--inject-bug NAME] [--jobs J]
      --proxies P: clients also watch and read through P gRPC proxies (1-4), which crash now and then
  ci/sim determinism --seeds A..B      (each seed twice: the trace hashes must match)
  ci/sim bugs --seeds A..B             (every planted bug must be caught within the seeds)
  ci/sim schedule --file FILE [--html FILE] [--quiet]   (replay a fuzzed fault schedule)
  ci/sim list";

/// Simulated length of the safety phase of a random-fault run.
const SAFETY_PHASE: Duration = Duration::from_secs(12);

struct Args {
    command: String,
    flags: BTreeMap<String, String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or("no command")?;
    let mut flags = BTreeMap::new();
    while let Some(flag) = args.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}"))?
            .to_string();
        if name == "quiet" {
            flags.insert(name, String::new());
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("--{name} needs a value"))?;
        flags.insert(name, value);
    }
    Ok(Args { command, flags })
}

impl Args {
    fn number(&self, name: &str) -> Result<Option<u64>, String> {
        self.flags
            .get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("--{name}: not a number: {v:?}"))
            })
            .transpose()
    }

    fn seeds(&self) -> Result<std::ops::RangeInclusive<u64>, String> {
        let spec = self.flags.get("seeds").ok_or("--seeds A..B is required")?;
        let (a, b) = spec
            .split_once("..")
            .ok_or_else(|| format!("--seeds: expected A..B, got {spec:?}"))?;
        let a: u64 = a.parse().map_err(|_| format!("--seeds: bad start {a:?}"))?;
        let b: u64 = b.parse().map_err(|_| format!("--seeds: bad end {b:?}"))?;
        if b < a {
            return Err(format!("--seeds: empty range {spec}"));
        }
        Ok(a..=b)
    }

    /// Options for `seed`; without --nodes, sweeps alternate 3 and 5 nodes.
    fn options(&self, seed: u64) -> Result<RunOptions, String> {
        let nodes = match self.number("nodes")? {
            Some(n @ 3..=5) => n as usize,
            Some(n) => return Err(format!("--nodes: 3, 4 or 5, not {n}")),
            None if self.command == "run" => 3,
            None => {
                if seed.is_multiple_of(2) {
                    3
                } else {
                    5
                }
            }
        };
        let scenario = match self.flags.get("scenario") {
            Some(name) => Some(
                scenario::find(name)
                    .ok_or_else(|| format!("unknown scenario {name:?} (ci/sim list shows them)"))?,
            ),
            None => None,
        };
        let bug = match self.flags.get("inject-bug") {
            Some(name) => Some(
                Bug::from_name(name)
                    .ok_or_else(|| format!("unknown bug {name:?} (ci/sim list shows them)"))?,
            ),
            None => None,
        };
        Ok(RunOptions {
            seed,
            nodes,
            scenario,
            bug,
            safety: SAFETY_PHASE,
            schedule: None,
            proxies: self.number("proxies")?.unwrap_or(0).min(4) as usize,
        })
    }
}

/// Cluster events and client operations, in time order.
fn timeline(report: &RunReport) -> Vec<String> {
    let mut lines: Vec<(u64, usize, String)> = Vec::new();
    for (i, event) in report.events.iter().enumerate() {
        lines.push((event.at_us, i, event.describe()));
    }
    for op in &report.ops {
        lines.push((
            op.call_us,
            usize::MAX,
            format!(
                "{:>9.3}s  client {}",
                op.call_us as f64 / 1e6,
                op.describe()
            ),
        ));
    }
    lines.sort_by_key(|(at, order, _)| (*at, *order));
    lines.into_iter().map(|(_, _, line)| line).collect()
}

fn print_report(report: &RunReport, show_timeline: bool) {
    println!("seed {}: faults: {}", report.options.seed, report.faults);
    if show_timeline {
        for line in timeline(report) {
            println!("{line}");
        }
    }
    println!("{}", report.stats);
    for verdict in &report.verdicts {
        println!(
            "check {:<16} {}  {}",
            verdict.name,
            if verdict.ok { "ok    " } else { "FAILED" },
            verdict.detail.replace('\n', "\n    ")
        );
    }
}

fn command_run(args: &Args) -> Result<ExitCode, String> {
    let seed = args.number("seed")?.ok_or("--seed N is required")?;
    let options = args.options(seed)?;
    run_and_report(args, options)
}

/// Replays a fault schedule (a `replication` fuzz input, e.g. a crash file it wrote).
fn command_schedule(args: &Args) -> Result<ExitCode, String> {
    let path = args.flags.get("file").ok_or("--file FILE is required")?;
    let bytes = std::fs::read(path).map_err(|e| format!("--file {path}: {e}"))?;
    let schedule = Schedule::decode(&bytes);
    println!(
        "{path}: {} members, seed {}, {}",
        schedule.nodes,
        schedule.seed,
        schedule.describe()
    );
    for (i, step) in schedule.steps.iter().enumerate() {
        println!("  step {i:>2}: {step:?}");
    }
    let options = RunOptions {
        seed: schedule.seed,
        nodes: schedule.nodes,
        scenario: None,
        bug: None,
        safety: SAFETY_PHASE,
        schedule: Some(Arc::new(schedule)),
        proxies: 0,
    };
    run_and_report(args, options)
}

fn run_and_report(args: &Args, options: RunOptions) -> Result<ExitCode, String> {
    let seed = options.seed;
    let wall = Instant::now();
    let report = run(&options);
    let wall = wall.elapsed();
    print_report(&report, !args.flags.contains_key("quiet"));
    if let Some(path) = args.flags.get("html") {
        let title = match (options.scenario, &options.schedule) {
            (Some(s), _) => format!("seed {seed} · scenario {}", s.name),
            (None, Some(schedule)) => format!("seed {seed} · {}", schedule.describe()),
            (None, None) => format!("seed {seed} · {} nodes · {}", options.nodes, report.faults),
        };
        let picture = RunPicture {
            title,
            nodes: report.nodes.clone(),
            end_us: report.end_us,
            events: &report.events,
            ops: &report.ops,
            verdict: report.last_line(),
            repro: (!report.passed).then(|| options.repro()),
        };
        std::fs::write(path, render(&picture)).map_err(|e| format!("--html {path}: {e}"))?;
        println!("wrote {path}");
    }
    println!(
        "simulated {:.1}s in {:.2}s wall ({:.0}x)",
        report.end_us as f64 / 1e6,
        wall.as_secs_f64(),
        report.end_us as f64 / 1e6 / wall.as_secs_f64().max(1e-9)
    );
    println!("{}", report.last_line());
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One seed's outcome, from `run` in a process of its own: exactly what the repro command
/// does, so that no state a dependency keeps per process can make a sweep differ from a replay.
struct SeedOutcome {
    seed: u64,
    passed: bool,
    last_line: String,
    output: String,
    sim_secs: f64,
    images: u64,
    resends: u64,
}

impl SeedOutcome {
    fn field(&self, name: &str) -> Option<&str> {
        self.last_line
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
    }
}

fn run_seed_process(args: &Args, seed: u64) -> Result<SeedOutcome, String> {
    let options = args.options(seed)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut command = std::process::Command::new(exe);
    command.args(["run", "--quiet", "--seed", &seed.to_string()]);
    match options.scenario {
        Some(scenario) => command.args(["--scenario", scenario.name]),
        None => command.args(["--nodes", &options.nodes.to_string()]),
    };
    if let Some(bug) = options.bug {
        command.args(["--inject-bug", bug.name()]);
    }
    if options.proxies > 0 {
        command.args(["--proxies", &options.proxies.to_string()]);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run seed {seed}: {e}"))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    let last_line = output.lines().last().unwrap_or("").to_string();
    if !out.status.success() {
        output.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let mut outcome = SeedOutcome {
        seed,
        passed: out.status.success() && last_line.starts_with("PASS"),
        last_line,
        output,
        sim_secs: 0.0,
        images: 0,
        resends: 0,
    };
    outcome.images = outcome
        .field("images")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    outcome.resends = outcome
        .field("resends")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    outcome.sim_secs = outcome
        .field("sim")
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .unwrap_or(0.0);
    Ok(outcome)
}

/// What a sweep did, over the seeds it ran.
struct SweepTotals {
    ran: u64,
    sim_secs: f64,
    wall: Duration,
    /// Snapshot images received whole, and transfers resumed from an offset.
    images: u64,
    resends: u64,
}

/// Runs the seeds on `jobs` workers; stops at the first failure. Returns the failures (the
/// lowest seed first) and the totals.
fn sweep(
    args: &Args,
    seeds: std::ops::RangeInclusive<u64>,
    jobs: usize,
    label: &str,
) -> Result<(Vec<SeedOutcome>, SweepTotals), String> {
    let first = *seeds.start();
    let total = seeds.end() - seeds.start() + 1;
    for seed in seeds.clone() {
        args.options(seed)?;
    }
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let sim_ms = AtomicU64::new(0);
    let images = AtomicU64::new(0);
    let resends = AtomicU64::new(0);
    let terminal = std::io::stderr().is_terminal();
    let wall = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed > *seeds.end() {
                    return;
                }
                let outcome = match run_seed_process(args, seed) {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        return;
                    }
                };
                sim_ms.fetch_add((outcome.sim_secs * 1000.0) as u64, Ordering::Relaxed);
                images.fetch_add(outcome.images, Ordering::Relaxed);
                resends.fetch_add(outcome.resends, Ordering::Relaxed);
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if terminal {
                    let width = 40;
                    let filled = (finished * width / total) as usize;
                    eprint!(
                        "\r{label} [{}{}] {finished}/{total} seed {seed} {}",
                        "#".repeat(filled),
                        ".".repeat(width as usize - filled),
                        if outcome.passed { "ok  " } else { "FAIL" }
                    );
                    let _ = std::io::stderr().flush();
                }
                if !outcome.passed {
                    stop.store(true, Ordering::Relaxed);
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(outcome);
                }
            });
        }
    });
    if terminal {
        eprintln!();
    }
    if let Some(e) = errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .first()
    {
        return Err(e.clone());
    }
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort_by_key(|f| f.seed);
    Ok((
        failures,
        SweepTotals {
            ran: done.load(Ordering::Relaxed),
            sim_secs: sim_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            wall: wall.elapsed(),
            images: images.load(Ordering::Relaxed),
            resends: resends.load(Ordering::Relaxed),
        },
    ))
}

fn jobs(args: &Args) -> Result<usize, String> {
    Ok(args.number("jobs")?.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n.max(1) as usize,
    ))
}

fn command_sweep(args: &Args) -> Result<ExitCode, String> {
    let seeds = args.seeds()?;
    let total = seeds.end() - seeds.start() + 1;
    let (failures, totals) = sweep(args, seeds, jobs(args)?, "sweep")?;
    let SweepTotals {
        ran,
        sim_secs,
        wall,
        images,
        resends,
    } = totals;
    println!(
        "{ran} seeds: simulated {sim_secs:.0}s in {:.1}s wall: {:.0}x real time; {images} snapshot images received whole, {resends} transfers resumed from an offset",
        wall.as_secs_f64(),
        sim_secs / wall.as_secs_f64().max(1e-9)
    );
    match failures.first() {
        None => {
            println!("PASS {ran}/{total}");
            Ok(ExitCode::SUCCESS)
        }
        Some(failure) => {
            print!("{}", failure.output);
            let repro = failure
                .last_line
                .split_once("repro: ")
                .map_or(String::new(), |(_, r)| r.to_string());
            println!("FAIL seed={} repro: {repro}", failure.seed);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn command_determinism(args: &Args) -> Result<ExitCode, String> {
    let mut all_same = true;
    for seed in args.seeds()? {
        let first = run_seed_process(args, seed)?;
        let second = run_seed_process(args, seed)?;
        let (a, b) = (first.field("trace"), second.field("trace"));
        let same = a.is_some() && a == b;
        all_same &= same;
        println!(
            "seed {seed}: trace {} then {} {}",
            a.unwrap_or("-"),
            b.unwrap_or("-"),
            if same { "same" } else { "DIFFERENT" }
        );
    }
    println!(
        "{}",
        if all_same {
            "PASS deterministic"
        } else {
            "FAIL not deterministic"
        }
    );
    Ok(if all_same {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn command_bugs(args: &Args) -> Result<ExitCode, String> {
    let seeds = args.seeds()?;
    let mut all_caught = true;
    for bug in Bug::ALL {
        let mut bug_args = Args {
            command: "sweep".into(),
            flags: args.flags.clone(),
        };
        bug_args
            .flags
            .insert("inject-bug".into(), bug.name().to_string());
        let (failures, SweepTotals { ran, wall, .. }) =
            sweep(&bug_args, seeds.clone(), jobs(args)?, bug.name())?;
        match failures.first() {
            Some(failure) => {
                println!(
                    "{:<22} caught at seed {} by {} after {ran} seeds ({:.1}s): {}",
                    bug.name(),
                    failure.seed,
                    failure.field("failed").unwrap_or("?"),
                    wall.as_secs_f64(),
                    failure
                        .last_line
                        .split_once("repro: ")
                        .map_or("", |(_, r)| r)
                );
            }
            None => {
                all_caught = false;
                println!("{:<22} NOT caught in {ran} seeds", bug.name());
            }
        }
    }
    println!(
        "{}",
        if all_caught {
            "PASS every planted bug caught"
        } else {
            "FAIL a planted bug went unnoticed"
        }
    );
    Ok(if all_caught {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn command_list() -> ExitCode {
    println!("scenarios (ci/sim run --seed N --scenario NAME):");
    for s in SCENARIOS {
        println!("  {:<30} {} nodes: {}", s.name, s.nodes, s.description);
    }
    println!("bugs (ci/sim run|sweep ... --inject-bug NAME):");
    for bug in Bug::ALL {
        println!("  {:<30} {}", bug.name(), bug.describe());
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "run" => command_run(&args),
        "schedule" => command_schedule(&args),
        "sweep" => command_sweep(&args),
        "determinism" => command_determinism(&args),
        "bugs" => command_bugs(&args),
        "list" => Ok(command_list()),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
