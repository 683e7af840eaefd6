//! `replication`: the input is a fault schedule (see `quorumkv_sim::schedule`) for a simulated
//! cluster of real members; the run must pass every checker of the simulator: Raft safety
//! (checked after every step as well), durability, linearizability, leases, watches, locks and
//! liveness once the schedule is over. A failing input replays with
//! `ci/sim schedule --file FILE`, with a timeline and `--html` picture.

use std::sync::Arc;

use quorumkv_sim::run::{run as run_one, RunOptions};
use quorumkv_sim::schedule::Schedule;

pub fn run(data: &[u8]) {
    let schedule = Schedule::decode(data);
    let options = RunOptions {
        seed: schedule.seed,
        nodes: schedule.nodes,
        scenario: None,
        bug: None,
        safety: quorumkv_sim::schedule::MAX_SAFETY,
        schedule: Some(Arc::new(schedule)),
        proxies: 0,
    };
    let report = run_one(&options);
    if !report.passed {
        let failed: Vec<String> = report
            .verdicts
            .iter()
            .filter(|v| !v.ok)
            .map(|v| format!("{}: {}", v.name, v.detail))
            .collect();
        panic!(
            "{}\n{}\nreplay: ci/sim schedule --file <this input>",
            report.last_line(),
            failed.join("\n")
        );
    }
}
