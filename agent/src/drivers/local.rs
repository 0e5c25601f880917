//! The `local` platform driver: each color is one OS process on a loopback
//! port, and two built-in [`Router`]s move traffic: the service router on
//! `listen` forwards to the active color, the preview router on
//! `preview_listen` to the inactive one (while it runs).
//!
//! State lives in `<data_dir>/apps/<app>/state.json` (written atomically);
//! each color's output is appended to `<color>.log` next to it. Processes
//! run in their own process group with stdin closed, so they outlive the
//! agent: a restarted agent re-adopts the processes that are still alive
//! (same pid and same start time) and rebinds its routers to the recorded
//! active color.
//!
//! A drill's scratch color is a third process on its own loopback port that
//! no router sends traffic to, recorded in the state like the colors so
//! that nothing outlives a crash unmanaged.
//!
//! Maintenance (for a restore onto the app's database) is a flag in the
//! state that both routers honour: they answer 503 and forward nothing,
//! while the processes keep running, so ending it is instant.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cutover_shared::app::{AppClusterStatus, Color, ColorStatus, LocalSpec};
use cutover_shared::domain::{now_unix_ms, validate_name};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

use super::{DriverContext, DriverError, PlatformDriver, Progress};
use crate::router::Router;

/// How long a new process has to answer HTTP at `/`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process has to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Time limit of the TCP connect behind a color's readiness in `status`.
const STATUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Lines of a color's log quoted in a failed deploy's diagnostics.
const LOG_TAIL_LINES: usize = 20;

const COLORS: [Color; 2] = [Color::Blue, Color::Green];

/// `state.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    active: Option<Color>,
    #[serde(default)]
    colors: BTreeMap<Color, ColorState>,
    #[serde(default)]
    last_switch_unix_ms: Option<i64>,
    /// Both routers answer 503 (see [`PlatformDriver::maintenance`]).
    #[serde(default)]
    maintenance: bool,
    /// A drill's scratch color, while it runs.
    #[serde(default)]
    scratch: Option<ColorState>,
    /// A canary: this percent of the service router's new requests go to
    /// the inactive color.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    canary: Option<Canary>,
}

/// A canary's split, kept across agent restarts like the active color.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Canary {
    color: Color,
    weight: u32,
}

/// The scratch color's name: its log file and its `CUTOVER_COLOR`.
const SCRATCH: &str = "drill";

/// One color's process, as last started.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ColorState {
    image: String,
    pid: Option<u32>,
    upstream: SocketAddr,
    started_at_unix_ms: i64,
    /// Should be running (false after a scale-down or a failed deploy).
    running: bool,
    /// The process's start time (`/proc/<pid>/stat` field 22), so that a
    /// reused pid is not mistaken for ours.
    #[serde(default)]
    start_ticks: Option<u64>,
}

impl ColorState {
    fn process(&self) -> Option<(u32, Option<u64>)> {
        if self.running {
            self.pid.map(|p| (p, self.start_ticks))
        } else {
            None
        }
    }
}

/// The routers, guarded by the operation lock: only deploy, switch and
/// scale-down change them.
#[derive(Default)]
struct Routers {
    service: Option<Router>,
    preview: Option<Router>,
}

/// Runs an app's two colors as local processes behind two routers.
pub struct LocalDriver {
    app: String,
    /// Where the app runs, passed to its processes as CUTOVER_REGION and
    /// CUTOVER_CLUSTER.
    cluster: cutover_shared::domain::ClusterRef,
    spec: LocalSpec,
    dir: PathBuf,
    listen: SocketAddr,
    preview_listen: SocketAddr,
    drain: Duration,
    /// Serialises deploy, switch and scale-down; owns the routers.
    op: tokio::sync::Mutex<Routers>,
    /// The state and the processes this driver started (for reaping). Never
    /// held across an await.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    state: State,
    /// By color name (`blue`, `green`, [`SCRATCH`]).
    children: HashMap<&'static str, Child>,
}

impl std::fmt::Debug for LocalDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDriver")
            .field("app", &self.app)
            .field("dir", &self.dir)
            .field("listen", &self.listen)
            .field("preview_listen", &self.preview_listen)
            .finish_non_exhaustive()
    }
}

fn err(message: impl Into<String>) -> DriverError {
    DriverError::new(message)
}

impl LocalDriver {
    /// Opens the driver for `app`: reads its state, re-adopts processes that
    /// are still alive and starts routing to the recorded colors.
    pub async fn open(app: &str, spec: LocalSpec, ctx: &DriverContext) -> Result<LocalDriver, DriverError> {
        validate_name("app", app).map_err(|e| err(e.to_string()))?;
        if spec.command.is_empty() {
            return Err(err("local.command must not be empty"));
        }
        let parse = |field: &str, a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| err(format!("local.{field} {a:?}: {e}")))
        };
        let listen = parse("listen", &spec.listen)?;
        let preview_listen = parse("preview_listen", &spec.preview_listen)?;
        let dir = ctx.data_dir.join("apps").join(app);
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let state = read_state(&dir.join("state.json"))?;
        for (color, c) in &state.colors {
            if let Some((pid, ticks)) = c.process() {
                if process_alive(pid, ticks) {
                    tracing::info!(app, %color, pid, image = %c.image, "re-adopted running process");
                } else {
                    tracing::warn!(app, %color, pid, image = %c.image, "recorded process is gone");
                }
            }
        }
        let driver = LocalDriver {
            cluster: ctx.cluster.clone(),
            app: app.to_owned(),
            drain: Duration::from_millis(spec.drain_timeout_ms),
            spec,
            dir,
            listen,
            preview_listen,
            op: tokio::sync::Mutex::new(Routers::default()),
            inner: Mutex::new(Inner {
                state,
                children: HashMap::new(),
            }),
        };
        {
            let mut routers = driver.op.lock().await;
            driver.route(&mut routers).await?;
        }
        Ok(driver)
    }

    fn state(&self) -> State {
        self.inner.lock().expect("local driver state").state.clone()
    }

    /// Replaces the state, durably first.
    fn save(&self, state: State) -> Result<(), DriverError> {
        write_state(&self.dir.join("state.json"), &state)?;
        self.inner.lock().expect("local driver state").state = state;
        Ok(())
    }

    /// Collects exited children so they do not linger as zombies.
    fn reap(&self) {
        let mut inner = self.inner.lock().expect("local driver state");
        inner.children.retain(|color, child| match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::info!(app = %self.app, %color, "process exited: {status}");
                false
            }
            Err(_) => false,
        });
    }

    fn alive(&self, c: &ColorState) -> bool {
        self.reap();
        c.process().is_some_and(|(pid, ticks)| process_alive(pid, ticks))
    }

    /// Points the routers at the state's colors: the service router at the
    /// active color, the preview router at the other one while it runs.
    async fn route(&self, routers: &mut Routers) -> Result<(), DriverError> {
        let state = self.state();
        let Some(active) = state.active else { return Ok(()) };
        if let Some(c) = state.colors.get(&active) {
            set_route(&mut routers.service, self.listen, c.upstream, self.drain).await?;
        }
        // The canary's share goes to its color only while that color is
        // the inactive one and meant to run.
        let split = state
            .canary
            .filter(|c| c.color != active && c.weight > 0)
            .and_then(|c| {
                state
                    .colors
                    .get(&c.color)
                    .filter(|s| s.running)
                    .map(|s| (s.upstream, c.weight))
            });
        if let Some(r) = &routers.service {
            r.set_split(split);
        }
        match state.colors.get(&active.other()).filter(|c| c.running) {
            Some(c) => set_route(&mut routers.preview, self.preview_listen, c.upstream, self.drain).await?,
            None => {
                if let Some(r) = routers.preview.take() {
                    r.shutdown().await;
                }
            }
        }
        for r in [&routers.service, &routers.preview].into_iter().flatten() {
            r.set_maintenance(state.maintenance);
        }
        Ok(())
    }

    /// Stops `color`'s process, if it runs: waits for the router that sends
    /// it traffic to drain, then SIGTERM, then SIGKILL after [`STOP_GRACE`].
    async fn stop_color(&self, color: Color, routers: &Routers, progress: Progress<'_>) -> Result<(), DriverError> {
        let state = self.state();
        let Some(c) = state.colors.get(&color) else {
            return Ok(());
        };
        if let Some((pid, ticks)) = c.process()
            && self.alive(c)
        {
            for r in [&routers.service, &routers.preview].into_iter().flatten() {
                if r.in_flight(c.upstream) > 0 && !r.drain(c.upstream, self.drain).await {
                    progress(format!(
                        "{color}: requests still in flight after {} ms; stopping anyway",
                        self.drain.as_millis()
                    ));
                }
            }
            progress(format!("{color}: stopping pid {pid} (image {})", c.image));
            self.kill_process(pid, ticks).await?;
        }
        let mut next = state.clone();
        if let Some(c) = next.colors.get_mut(&color) {
            c.running = false;
            c.pid = None;
            c.start_ticks = None;
        }
        self.save(next)
    }

    async fn kill_process(&self, pid: u32, ticks: Option<u64>) -> Result<(), DriverError> {
        signal_group(pid, "TERM").await;
        if self.wait_gone(pid, ticks, STOP_GRACE).await {
            return Ok(());
        }
        tracing::warn!(app = %self.app, pid, "no exit {} s after SIGTERM; sending SIGKILL", STOP_GRACE.as_secs());
        signal_group(pid, "KILL").await;
        if self.wait_gone(pid, ticks, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(err(format!("process {pid} survived SIGKILL")))
        }
    }

    async fn wait_gone(&self, pid: u32, ticks: Option<u64>, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            self.reap();
            if !process_alive(pid, ticks) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The command line for `color` running `image` on `listen`.
    fn command_line(&self, color: &str, image: &str, listen: SocketAddr) -> Vec<String> {
        let listen = listen.to_string();
        self.spec
            .command
            .iter()
            .map(|a| {
                a.replace("{image}", image)
                    .replace("{listen}", &listen)
                    .replace("{color}", color)
            })
            .collect()
    }

    fn log_path(&self, color: &str) -> PathBuf {
        self.dir.join(format!("{color}.log"))
    }

    fn spawn(&self, color: &str, image: &str, listen: SocketAddr) -> Result<Child, DriverError> {
        let argv = self.command_line(color, image, listen);
        let path = self.log_path(color);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| err(format!("opening {}: {e}", path.display())))?;
        let _ = writeln!(
            log,
            "--- cutover: {} starting {color} image {image} on {listen}: {argv:?}",
            now_unix_ms()
        );
        let stderr = log.try_clone().map_err(|e| err(format!("{}: {e}", path.display())))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .env("CUTOVER_APP", &self.app)
            .env("CUTOVER_REGION", &self.cluster.region)
            .env("CUTOVER_CLUSTER", &self.cluster.cluster)
            .env("CUTOVER_COLOR", color)
            .env("CUTOVER_LISTEN", listen.to_string())
            .env("CUTOVER_IMAGE", image)
            // Its own process group: outlives the agent, escapes the
            // terminal's Ctrl-C, and is stopped as a group.
            .process_group(0);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        cmd.spawn().map_err(|e| err(format!("starting {:?}: {e}", argv[0])))
    }

    /// Waits until the process answers HTTP on `addr`, fails early if it exits.
    async fn wait_ready(&self, color: &'static str, pid: u32, addr: SocketAddr) -> Result<Duration, DriverError> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        loop {
            let exited = {
                let mut inner = self.inner.lock().expect("local driver state");
                match inner.children.get_mut(color).map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => {
                        inner.children.remove(color);
                        Some(status.to_string())
                    }
                    Some(Ok(None)) => None,
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("not running".into()),
                }
            };
            if let Some(status) = exited {
                return Err(self.with_log(
                    color,
                    err(format!("{color}: pid {pid} exited before it was ready ({status})")),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.with_log(
                    color,
                    err(format!(
                        "{color}: pid {pid} did not answer HTTP on {addr} within {} s",
                        READY_TIMEOUT.as_secs()
                    )),
                ));
            }
            if answers_http(addr, left.min(Duration::from_secs(5))).await {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }

    /// Adds the tail of `color`'s log to an error.
    fn with_log(&self, color: &str, mut e: DriverError) -> DriverError {
        let path = self.log_path(color);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            e.diagnostics.push(format!("last lines of {}:", path.display()));
            e.diagnostics.extend(lines[from..].iter().map(|l| l.to_string()));
        }
        e
    }

    /// Starts `image` as `color` on a free loopback port: its record (not
    /// yet saved), pid, start time and address.
    fn start_process(
        &self,
        color: &'static str,
        image: &str,
    ) -> Result<(ColorState, u32, Option<u64>, SocketAddr), DriverError> {
        // Below the ephemeral range: a `bind(0)` port, released, can be
        // taken by an outgoing connection before the app binds it.
        let port = cutover_shared::net::free_loopback_port().map_err(|e| err(format!("no free loopback port: {e}")))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = self.spawn(color, image, addr)?;
        let pid = child
            .id()
            .ok_or_else(|| err(format!("{color}: process exited at once")))?;
        let ticks = process_start_ticks(pid);
        self.inner
            .lock()
            .expect("local driver state")
            .children
            .insert(color, child);
        let record = ColorState {
            image: image.to_owned(),
            pid: Some(pid),
            upstream: addr,
            started_at_unix_ms: now_unix_ms(),
            running: true,
            start_ticks: ticks,
        };
        Ok((record, pid, ticks, addr))
    }

    /// Stops the scratch color's process, if it runs, and forgets it.
    async fn stop_scratch_process(&self) -> Result<(), DriverError> {
        let state = self.state();
        let Some(c) = &state.scratch else { return Ok(()) };
        if let Some((pid, ticks)) = c.process()
            && self.alive(c)
        {
            self.kill_process(pid, ticks).await?;
        }
        let mut next = state.clone();
        next.scratch = None;
        self.save(next)
    }

    /// Stops both colors and both routers (the app is removed from this
    /// cluster). The state keeps the images; nothing runs afterwards.
    pub async fn stop_all(&self) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        for r in [routers.service.take(), routers.preview.take()].into_iter().flatten() {
            r.shutdown().await;
        }
        let quiet = |_: String| {};
        for color in COLORS {
            self.stop_color(color, &routers, &quiet).await?;
        }
        self.stop_scratch_process().await?;
        let mut next = self.state();
        next.active = None;
        self.save(next)
    }
}

/// Sets a router's upstream, binding it first if it does not run.
async fn set_route(
    slot: &mut Option<Router>,
    listen: SocketAddr,
    upstream: SocketAddr,
    drain: Duration,
) -> Result<(), DriverError> {
    match slot {
        Some(r) => r.set_upstream(upstream),
        None => {
            let r = Router::bind(listen, upstream).await.map_err(|e| err(e.to_string()))?;
            r.set_drain_timeout(drain);
            *slot = Some(r);
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl PlatformDriver for LocalDriver {
    async fn status(&self) -> Result<AppClusterStatus, DriverError> {
        let state = self.state();
        let mut colors = Vec::with_capacity(2);
        for color in COLORS {
            let s = match state.colors.get(&color) {
                None => ColorStatus {
                    color,
                    image: String::new(),
                    replicas_ready: 0,
                    replicas_desired: 0,
                    healthy: false,
                },
                Some(c) => {
                    let desired = u32::from(c.running);
                    let ready = c.running && self.alive(c) && connects(c.upstream).await;
                    ColorStatus {
                        color,
                        image: c.image.clone(),
                        replicas_ready: u32::from(ready),
                        replicas_desired: desired,
                        healthy: ready,
                    }
                }
            };
            colors.push(s);
        }
        Ok(AppClusterStatus {
            active: state.active,
            colors,
            last_switch_unix_ms: state.last_switch_unix_ms,
            maintenance: state.maintenance,
            canary_weight: state
                .canary
                .filter(|c| Some(c.color) != state.active)
                .map_or(0, |c| c.weight),
        })
    }

    async fn deploy(&self, color: Color, image: &str, progress: Progress<'_>) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        let state = self.state();
        if state.active == Some(color) {
            return Err(err(format!(
                "{color} is the active color of {}; deploy to {}",
                self.app,
                color.other()
            )));
        }
        if state.canary.is_some() {
            // A canary's share leaves the color before it is replaced.
            let mut next = state.clone();
            next.canary = None;
            self.save(next)?;
            self.route(&mut routers).await?;
        }
        self.stop_color(color, &routers, progress).await?;

        let (started, pid, ticks, addr) = self.start_process(color.as_str(), image)?;
        let mut next = self.state();
        next.colors.insert(color, started);
        if let Err(e) = self.save(next) {
            // Unrecorded, it would outlive us unmanaged.
            let _ = self.kill_process(pid, ticks).await;
            return Err(e);
        }
        progress(format!(
            "{color}: started image {image} as pid {pid} on {addr}; waiting for HTTP"
        ));

        match self.wait_ready(color.as_str(), pid, addr).await {
            Ok(took) => progress(format!("{color}: ready after {} ms", took.as_millis())),
            Err(e) => {
                progress(format!("{color}: {}; stopping it", e.message));
                let _ = self.kill_process(pid, ticks).await;
                let mut next = self.state();
                if let Some(c) = next.colors.get_mut(&color) {
                    c.running = false;
                    c.pid = None;
                    c.start_ticks = None;
                }
                self.save(next)?;
                return Err(e);
            }
        }

        let mut next = self.state();
        if next.active.is_none() {
            next.active = Some(color);
            self.save(next)?;
            progress(format!(
                "{color}: first deploy, now active; routing {} to it",
                self.listen
            ));
        } else {
            progress(format!("{color}: preview on {}", self.preview_listen));
        }
        self.route(&mut routers).await
    }

    async fn switch(&self, to: Color) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        let state = self.state();
        let target = state.colors.get(&to).filter(|c| self.alive(c)).ok_or_else(|| {
            err(format!(
                "cannot switch {} to {to}: no {to} process is running",
                self.app
            ))
        })?;
        tracing::info!(app = %self.app, %to, upstream = %target.upstream, "switching");
        let mut next = state.clone();
        if state.active != Some(to) || state.canary.is_some() {
            if state.active != Some(to) {
                next.active = Some(to);
                next.last_switch_unix_ms = Some(now_unix_ms());
            }
            // A switch ends any canary: all traffic goes to `to`.
            next.canary = None;
            // Durable first: after a crash the routers follow the file.
            self.save(next)?;
        }
        self.route(&mut routers).await
    }

    async fn set_canary(&self, color: Color, weight: u32) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        let state = self.state();
        if weight > 0 {
            if state.active == Some(color) || state.active.is_none() {
                return Err(err(format!(
                    "{color} is not the inactive color of {}; a canary sends traffic to the inactive one",
                    self.app
                )));
            }
            if !state.colors.get(&color).is_some_and(|c| self.alive(c)) {
                return Err(err(format!(
                    "cannot send {weight}% of {} to {color}: no {color} process is running",
                    self.app
                )));
            }
        }
        let canary = (weight > 0).then_some(Canary { color, weight });
        if state.canary != canary {
            let mut next = state;
            next.canary = canary;
            self.save(next)?;
        }
        self.route(&mut routers).await
    }

    async fn scale_down(&self, color: Color) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        let state = self.state();
        if state.active == Some(color) {
            return Err(err(format!(
                "{color} is the active color of {}; switch away from it first",
                self.app
            )));
        }
        // Preview traffic to the color drains before it stops.
        if let Some(c) = state.colors.get(&color)
            && let Some(r) = routers.preview.take()
        {
            if r.upstream() == c.upstream {
                r.shutdown().await;
            } else {
                routers.preview = Some(r);
            }
        }
        let app = self.app.clone();
        let log = move |m: String| tracing::info!(app = %app, "{m}");
        self.stop_color(color, &routers, &log).await
    }

    async fn preview_address(&self) -> Result<String, DriverError> {
        Ok(self.spec.preview_listen.clone())
    }

    async fn maintenance(&self, on: bool, progress: Progress<'_>) -> Result<(), DriverError> {
        let mut routers = self.op.lock().await;
        let mut next = self.state();
        if next.maintenance != on {
            next.maintenance = on;
            // Durable first: a restarted agent's routers follow the file.
            self.save(next.clone())?;
        }
        self.route(&mut routers).await?;
        if on {
            // Requests forwarded before the flag was set finish first, so
            // nothing the app was doing overlaps the restore.
            for c in next.colors.values() {
                for r in [&routers.service, &routers.preview].into_iter().flatten() {
                    if r.in_flight(c.upstream) > 0 && !r.drain(c.upstream, self.drain).await {
                        return Err(err(format!(
                            "requests to {} still in flight after {} ms",
                            c.upstream,
                            self.drain.as_millis()
                        )));
                    }
                }
            }
            progress(format!(
                "in maintenance: {} and {} answer 503",
                self.listen, self.preview_listen
            ));
        } else {
            progress(format!("out of maintenance: {} serves again", self.listen));
        }
        Ok(())
    }

    async fn start_scratch(&self, image: &str, progress: Progress<'_>) -> Result<String, DriverError> {
        // Serialised with deploys and switches, which also start processes.
        let _routers = self.op.lock().await;
        self.stop_scratch_process().await?;
        let (started, pid, ticks, addr) = self.start_process(SCRATCH, image)?;
        let mut next = self.state();
        next.scratch = Some(started);
        if let Err(e) = self.save(next) {
            let _ = self.kill_process(pid, ticks).await;
            return Err(e);
        }
        progress(format!(
            "scratch color: started image {image} as pid {pid} on {addr}, taking no traffic; waiting for HTTP"
        ));
        match self.wait_ready(SCRATCH, pid, addr).await {
            Ok(took) => {
                progress(format!("scratch color: ready after {} ms", took.as_millis()));
                Ok(addr.to_string())
            }
            Err(e) => {
                let _ = self.stop_scratch_process().await;
                Err(e)
            }
        }
    }

    async fn stop_scratch(&self) -> Result<(), DriverError> {
        let _routers = self.op.lock().await;
        self.stop_scratch_process().await
    }

    async fn close(&self) {
        let mut routers = self.op.lock().await;
        for r in [routers.service.take(), routers.preview.take()].into_iter().flatten() {
            r.shutdown().await;
        }
    }

    async fn service_address(&self) -> Result<String, DriverError> {
        Ok(self.spec.listen.clone())
    }
}

fn read_state(path: &Path) -> Result<State, DriverError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(err(format!("reading {}: {e}", path.display()))),
    }
}

/// Writes `state` to a temporary file, syncs it, and renames it into place.
fn write_state(path: &Path, state: &State) -> Result<(), DriverError> {
    let tmp = path.with_extension("json.tmp");
    let fail = |e: std::io::Error| err(format!("writing {}: {e}", path.display()));
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| err(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(&bytes).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name (state first).
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field 22, the start time in clock ticks after boot.
fn process_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` exists, is not a zombie and (if known) started at `ticks`.
fn process_alive(pid: u32, ticks: Option<u64>) -> bool {
    let Some(fields) = proc_stat(pid) else { return false };
    if matches!(fields.first().map(String::as_str), Some("Z" | "X" | "x")) {
        return false;
    }
    match ticks {
        Some(t) => fields.get(19).and_then(|f| f.parse::<u64>().ok()) == Some(t),
        None => true,
    }
}

/// Sends SIGTERM or SIGKILL to `pid`'s process group (to `pid` alone if that
/// fails). No `unsafe`: the `kill` utility does it.
async fn signal_group(pid: u32, signal: &str) {
    let run = |target: String| async move {
        tokio::process::Command::new("kill")
            .args(["-s", signal, "--", &target])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if !run(format!("-{pid}")).await && !run(pid.to_string()).await {
        tracing::debug!(pid, signal, "kill found no such process");
    }
}

async fn connects(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(STATUS_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Whether something on `addr` answers an HTTP request at `/` (any status).
async fn answers_http(addr: SocketAddr, within: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cutover-agent\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1."))
    };
    matches!(tokio::time::timeout(within, attempt).await, Ok(Some(true)))
}

/// Kills (SIGKILL, whole process group) every app process recorded as
/// running under an agent's data directory. For `cutover dev` and test
/// harnesses, whose app processes must not outlive them, unlike an agent's
/// (which outlive agent restarts by design). Synchronous, so it can run in a
/// `Drop`.
pub fn kill_all_under(data_dir: &Path) {
    let Ok(apps) = std::fs::read_dir(data_dir.join("apps")) else {
        return;
    };
    for app in apps.flatten() {
        let Ok(text) = std::fs::read_to_string(app.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<State>(&text) else {
            continue;
        };
        for c in state.colors.values().chain(state.scratch.as_ref()) {
            if let Some((pid, ticks)) = c.process()
                && process_alive(pid, ticks)
            {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_with_color_keys() {
        let mut s = State {
            active: Some(Color::Green),
            last_switch_unix_ms: Some(5),
            ..State::default()
        };
        s.colors.insert(
            Color::Green,
            ColorState {
                image: "v1".into(),
                pid: Some(42),
                upstream: "127.0.0.1:9".parse().unwrap(),
                started_at_unix_ms: 1,
                running: true,
                start_ticks: Some(7),
            },
        );
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"green\":{"), "{text}");
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back.active, Some(Color::Green));
        assert_eq!(back.colors[&Color::Green].pid, Some(42));
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let ticks = process_start_ticks(me);
        assert!(ticks.is_some());
        assert!(process_alive(me, ticks));
        assert!(!process_alive(me, ticks.map(|t| t + 1)));
        assert!(!process_alive(u32::MAX - 1, None));
    }
}
