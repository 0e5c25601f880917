//! Task kinds this agent executes. Deploy, migration, backup and health kinds
//! arrive with their capabilities; `noop` and `echo` exist for tests and for
//! checking an agent end to end.

use std::time::Duration;

use cutover_shared::domain::{TaskResult, TaskSpec, now_unix_ms};

/// Kinds this build can execute.
pub const KINDS: &[&str] = &["noop", "echo"];

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
    match spec.kind.as_str() {
        "noop" => done(true, "nothing to do".into(), vec![]),
        "echo" => {
            let delay = match spec.params.get("delay_ms").map(|v| v.parse::<u64>()) {
                None => 0,
                Some(Ok(ms)) if ms <= MAX_DELAY_MS => ms,
                Some(_) => return done(false, format!("delay_ms must be an integer 0..={MAX_DELAY_MS}"), vec![]),
            };
            progress(format!("echo started, replying in {delay} ms"));
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let message = spec.params.get("message").cloned().unwrap_or_default();
            if spec.params.get("fail").is_some_and(|v| v == "true") {
                return done(false, format!("failed on request: {message}"), vec![]);
            }
            done(true, message.clone(), vec![("message".into(), message)])
        }
        other => done(
            false,
            format!("unknown task kind {other:?}; this agent runs {}", KINDS.join(", ")),
            vec![],
        ),
    }
}
