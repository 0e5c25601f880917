//! Task kinds this agent executes. Deploy, migration, backup and health kinds
//! arrive with their capabilities; `noop` and `echo` exist for tests and for
//! checking an agent end to end.

use std::time::Duration;

use cutover_shared::domain::{TaskResult, TaskSpec, now_unix_ms};
use cutover_shared::task::{TaskError, TaskKind, TaskParams};

/// Kinds this build can execute.
pub const KINDS: &[TaskKind] = &[TaskKind::Noop, TaskKind::Echo];

/// Longest `delay_ms` an echo task accepts.
const MAX_DELAY_MS: u64 = 600_000;

/// Runs a task, reporting progress through `progress`.
pub async fn execute(spec: &TaskSpec, progress: impl Fn(String)) -> TaskResult {
    let done = |success: bool, message: String, outputs: Vec<(String, String)>| TaskResult {
        task_id: spec.task_id.clone(),
        success,
        message,
        outputs: outputs.into_iter().collect(),
        replayed: false,
        finished_at_unix_ms: now_unix_ms(),
    };
    let params = match TaskParams::from_wire(&spec.kind, &spec.params) {
        Ok(p) => p,
        Err(TaskError::UnknownKind(k)) => {
            let runs: Vec<&str> = KINDS.iter().map(|k| k.as_str()).collect();
            return done(
                false,
                format!("unknown task kind {k:?}; this agent runs {}", runs.join(", ")),
                vec![],
            );
        }
        Err(TaskError::Invalid { key: "delay_ms", .. }) => {
            return done(false, format!("delay_ms must be an integer 0..={MAX_DELAY_MS}"), vec![]);
        }
        Err(e) => return done(false, e.to_string(), vec![]),
    };
    match params {
        TaskParams::Noop => done(true, "nothing to do".into(), vec![]),
        TaskParams::Echo(e) => {
            if e.delay_ms > MAX_DELAY_MS {
                return done(false, format!("delay_ms must be an integer 0..={MAX_DELAY_MS}"), vec![]);
            }
            progress(format!("echo started, replying in {} ms", e.delay_ms));
            tokio::time::sleep(Duration::from_millis(e.delay_ms)).await;
            if e.fail {
                return done(false, format!("failed on request: {}", e.message), vec![]);
            }
            done(true, e.message.clone(), vec![("message".into(), e.message)])
        }
        other => done(false, format!("{} is not a diagnostic task", other.kind()), vec![]),
    }
}
