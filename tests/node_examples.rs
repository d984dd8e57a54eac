//! The Node.js examples (examples/node/), each run with the command its
//! README documents (`target/release/shmcluster run -w 4 -- node
//! examples/node/<name>.js`, the command read from the README, with this
//! test's build of `shmcluster` in its place): the master must exit 0 on
//! its own (the example stops the cluster when done) after a clean
//! shutdown, leave no process behind, and the output must show what the
//! example claims.
//!
//! Builds the addon first (`node scripts/build.js`, as `npm install` in
//! node/). `harness = false`: each example runs in this binary re-executed
//! (`common::run_suite`) under a watchdog; the master dies with it
//! (`PR_SET_PDEATHSIG`), its workers with the master.

use std::time::Duration;

#[macro_use]
mod common;
#[path = "common/node.rs"]
mod node;
use common::python::root;
use common::Check;
use node::{build_addon, Master};

/// What checks an example's stdout lines.
type OutputCheck = fn(&[String]) -> Check;

/// The examples, each with the check of its output.
const EXAMPLES: &[(&str, OutputCheck)] = &[
    ("broadcast", broadcast),
    ("consume", consume),
    ("map", map),
    ("ipchannel", ipchannel),
];

const SCENARIOS: &[(&str, Duration)] = &[
    // The first one may build the addon (release).
    ("broadcast", Duration::from_secs(600)),
    ("consume", Duration::from_secs(120)),
    ("map", Duration::from_secs(120)),
    ("ipchannel", Duration::from_secs(120)),
];

fn main() {
    if let Ok(name) = std::env::var("SHMC_SCENARIO") {
        common::exit_scenario(&name, run_example(&name));
    }
    let (ran, failed) = common::run_suite("node_examples", SCENARIOS);
    common::finish_suite(ran, &failed);
}

/// The arguments of the README's command for `name`: the line
/// `target/release/shmcluster run ... -- node examples/node/<name>.js`.
fn documented_args(name: &str) -> Result<Vec<String>, String> {
    let readme = root().join("examples/node/README.md");
    let text = std::fs::read_to_string(&readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let script = format!("examples/node/{name}.js");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("target/release/shmcluster run ") && l.split_whitespace().last() == Some(&script)
        })
        .ok_or(format!("no command for {script} in {}", readme.display()))?;
    Ok(line.split_whitespace().skip(1).map(str::to_owned).collect())
}

fn run_example(name: &str) -> Check {
    let (_, check) = EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or(format!("no example {name}"))?;
    build_addon()?;
    let args = documented_args(name)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut master = Master::start(&args, &[])?;
    let status = master.wait_exit(Duration::from_secs(60))?;
    let left = master.nothing_left();
    let events = master.stderr();
    ensure!(
        status.success() && events.contains("clean shutdown (0 restarts, 0 killed)"),
        "the master ended with {status}\n{}",
        master.transcript()
    );
    left?;
    check(master.stdout()).map_err(|e| format!("{e}\n{}", master.transcript()))
}

/// How many lines are exactly `line`.
fn count(out: &[String], line: &str) -> usize {
    out.iter().filter(|l| *l == line).count()
}

fn position(out: &[String], line: &str) -> Result<usize, String> {
    out.iter()
        .position(|l| l == line)
        .ok_or(format!("no line {line:?}"))
}

fn broadcast(out: &[String]) -> Check {
    ensure!(
        count(out, "worker 0: broadcast test to 4 workers") == 1,
        "the broadcast"
    );
    for k in 0..4 {
        let line = format!(r#"worker {k}: test {{"hello":"world"}} from worker 0"#);
        ensure!(count(out, &line) == 1, "{line:?} not exactly once");
    }
    ensure!(
        count(out, "worker 0: each worker got it 0:1 1:1 2:1 3:1") == 1,
        "the map of counts"
    );
    ensure!(out.len() == 6, "{} lines", out.len());
    Ok(())
}

fn consume(out: &[String]) -> Check {
    for job in 1..=6 {
        // "worker K: consumeEvent {"job":J} (delivery D)", exactly once.
        let prefix = format!(r#"consumeEvent {{"job":{job}}} (delivery "#);
        let ran: Vec<&String> = out.iter().filter(|l| l.contains(&prefix)).collect();
        ensure!(ran.len() == 1, "job {job} ran {} times", ran.len());
        let (worker, rest) = ran[0]
            .strip_prefix("worker ")
            .and_then(|l| l.split_once(": "))
            .ok_or(format!("line {:?}", ran[0]))?;
        let delivery = rest
            .strip_prefix(&prefix)
            .and_then(|d| d.strip_suffix(')'))
            .ok_or(format!("line {:?}", ran[0]))?;
        ensure!(
            delivery.parse::<u64>().is_ok_and(|d| d > 0),
            "delivery id {delivery:?}"
        );
        // The caller was told where it ran, with the same delivery id.
        let told = format!("worker 0: job {job} ran on worker {worker} (delivery {delivery}, attempt 1)");
        ensure!(count(out, &told) == 1, "no {told:?}");
    }
    ensure!(out.len() == 12, "{} lines", out.len());
    Ok(())
}

fn map(out: &[String]) -> Check {
    ensure!(out.len() == 4, "{} lines", out.len());
    for (k, line) in out.iter().enumerate() {
        let value = line
            .strip_prefix(&format!("worker 0: map entry of worker {k}: "))
            .ok_or(format!("line {k}: {line:?}"))?;
        let v: f64 = value.parse().map_err(|e| format!("{line:?}: {e}"))?;
        ensure!((0.0..1.0).contains(&v), "{line:?}: not Math.random()");
    }
    Ok(())
}

fn ipchannel(out: &[String]) -> Check {
    // Sent while worker 3 was starting, handled once it was up.
    let sent = position(out, "worker 0: to(3).send while worker 3 is starting")?;
    let up = position(out, "worker 3: up after 1 s")?;
    let got = position(
        out,
        r#"worker 3: message "sent before you were up" from worker 0"#,
    )?;
    ensure!(
        sent < up && up < got,
        "order: sent {sent}, up {up}, handled {got}"
    );
    for line in [
        r#"worker 1: message "hi" from worker 0"#,
        r#"worker 1: custom-event "hello" from worker 0"#,
    ] {
        ensure!(count(out, line) == 1, "{line:?} not exactly once");
    }
    for k in 0..4 {
        let line = format!(r#"worker {k}: message "all attention" from worker 0"#);
        ensure!(count(out, &line) == 1, "{line:?} not exactly once");
    }
    for line in [
        r#"worker 0: worker 0 got ["all attention"]"#,
        r#"worker 0: worker 1 got ["hi","hello","all attention"]"#,
        r#"worker 0: worker 2 got ["all attention"]"#,
        r#"worker 0: worker 3 got ["sent before you were up","all attention"]"#,
    ] {
        ensure!(count(out, line) == 1, "no {line:?}");
    }
    ensure!(out.len() == 13, "{} lines", out.len());
    Ok(())
}
