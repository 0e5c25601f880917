//! Traffic drivers: how a failover moves an app's traffic from one region
//! to another (`traffic.move` tasks), on the agent that has `[traffic]`.
//!
//! Two drivers, chosen by `[traffic] driver`:
//! - `front-door`: the built-in front door. One [`Router`] per app, in this
//!   agent's process, sends the app's requests to one region's address.
//!   During a failover it holds new requests (at most `max_hold_ms`) and
//!   releases them to the new region once the primary moved, so a planned
//!   failover fails no request.
//! - `route53`: Amazon Route 53 weighted records. One record set per region
//!   (set identifier = region), the serving region weighted 100 and every
//!   other 0; a move waits until Route 53 reports the change `INSYNC`. DNS
//!   cannot hold requests, so a hold there is a no-op that says so.
//!
//! Every task carries the app's primary epoch. The driver records, per app,
//! the region it last sent traffic to and for which epoch
//! (`<data_dir>/traffic.json`, replaced atomically): a task for an older
//! epoch is refused, so a superseded failover cannot send traffic back to
//! a fenced region. After a restart the front door starts where that record
//! says, else at the app's configured `primary`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_shared::config::{Route53Config, TrafficApp, TrafficConfig, TrafficDriverKind};
use cutover_shared::domain::{TaskResult, TaskSpec};
use cutover_shared::proto::{self, ConnectRequest, connect_request};
use cutover_shared::task::outputs::TrafficOutputs;
use cutover_shared::task::{TaskKind, TaskParams, TrafficAction, TrafficParams};
use serde::{Deserialize, Serialize};

use crate::router::Router;

/// Kinds [`TrafficRuntime`] executes (only with `[traffic]` configured).
pub const KINDS: &[TaskKind] = &[TaskKind::TrafficMove];

/// How long a Route 53 change may take to reach `INSYNC`.
const INSYNC_TIMEOUT: Duration = Duration::from_secs(180);

/// Where an app's traffic goes, and under which epoch it was sent there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Route {
    region: String,
    epoch: u64,
}

/// The traffic driver of an agent with `[traffic]`.
pub struct TrafficRuntime {
    cfg: Option<TrafficConfig>,
    path: PathBuf,
    /// The recorded routes. Held only to read them, or to write and save
    /// them, never across a driver's wait.
    routes: Mutex<BTreeMap<String, Route>>,
    /// One lock per managed app: an app's tasks run one at a time, while a
    /// hold that drains one app (or a Route 53 change waiting for
    /// `INSYNC`) never delays another app's failover.
    serial: HashMap<String, tokio::sync::Mutex<()>>,
    /// The front door's routers, by app, once [`TrafficRuntime::start`]
    /// bound them.
    doors: Mutex<HashMap<String, Arc<Router>>>,
}

/// The routes recorded in `path`; none when the file does not exist. A
/// file that cannot be read or parsed is an error: starting from the
/// configured primaries would forget the epochs and may send traffic back
/// to a fenced region.
fn read_routes(path: &std::path::Path) -> Result<BTreeMap<String, Route>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl TrafficRuntime {
    /// Reads what traffic moves this agent recorded; refuses a record it
    /// cannot read.
    pub fn new(cfg: Option<TrafficConfig>, data_dir: &std::path::Path) -> Result<TrafficRuntime, String> {
        let path = data_dir.join("traffic.json");
        let mut routes = if cfg.is_some() {
            read_routes(&path)?
        } else {
            BTreeMap::new()
        };
        for a in cfg.iter().flat_map(|c| &c.apps) {
            routes.entry(a.app.clone()).or_insert_with(|| Route {
                region: a.primary.clone(),
                epoch: 0,
            });
        }
        let serial = cfg
            .iter()
            .flat_map(|c| &c.apps)
            .map(|a| (a.app.clone(), tokio::sync::Mutex::new(())))
            .collect();
        Ok(TrafficRuntime {
            cfg,
            path,
            routes: Mutex::new(routes),
            serial,
            doors: Mutex::new(HashMap::new()),
        })
    }

    pub fn configured(&self) -> bool {
        self.cfg.is_some()
    }

    /// The apps whose traffic this agent moves, as it registers them: for
    /// the front door only those whose listener is bound, so a failover
    /// never picks a door that is not there.
    pub fn apps(&self) -> Vec<String> {
        let Some(cfg) = &self.cfg else { return vec![] };
        let doors = self.doors.lock().expect("doors");
        cfg.apps
            .iter()
            .filter(|a| cfg.driver != TrafficDriverKind::FrontDoor || doors.contains_key(&a.app))
            .map(|a| a.app.clone())
            .collect()
    }

    /// Starts the front door's listeners, each sending to the region its
    /// route names; an app whose listener fails is reported and left out
    /// (the others start). Other drivers have nothing to start.
    pub async fn start(&self) -> Vec<String> {
        let Some(cfg) = &self.cfg else { return vec![] };
        if cfg.driver != TrafficDriverKind::FrontDoor {
            return vec![];
        }
        let routes = self.routes.lock().expect("routes").clone();
        let mut errors = Vec::new();
        for a in &cfg.apps {
            let region = routes.get(&a.app).map_or(a.primary.as_str(), |r| r.region.as_str());
            let bound = async {
                let listen: SocketAddr = parse_addr(a.listen.as_deref().unwrap_or_default())?;
                let upstream = upstream(a, region)?;
                Router::bind(listen, upstream).await.map_err(|e| e.to_string())
            };
            match bound.await {
                Ok(router) => {
                    // A lost region's requests wait for the failover as
                    // held ones do.
                    router.set_unreachable_wait(Duration::from_millis(cfg.max_hold_ms));
                    tracing::info!(app = %a.app, listen = %router.local_addr(), %region, "front door listening");
                    self.doors
                        .lock()
                        .expect("doors")
                        .insert(a.app.clone(), Arc::new(router));
                }
                Err(e) => errors.push(format!("front door for {}: {e}", a.app)),
            }
        }
        errors
    }

    /// The front door's address for `app`, once started.
    pub fn front_door(&self, app: &str) -> Option<SocketAddr> {
        self.doors.lock().expect("doors").get(app).map(|r| r.local_addr())
    }

    pub async fn execute(&self, task: &TaskSpec, progress: &(dyn Fn(String) + Send + Sync)) -> TaskResult {
        let mut out = TrafficOutputs::default();
        // The app's definition, when the coordinator attached it: a move
        // through the front door is verified with its health probes.
        let spec = cutover_shared::task::attached_spec(&task.params).ok();
        let ran = match TaskParams::from_wire(&task.kind, &task.params) {
            Ok(TaskParams::TrafficMove(p)) => self.run(&p, spec.as_ref(), progress, &mut out).await,
            Ok(other) => Err(format!("{} is not a traffic task", other.kind())),
            Err(e) => Err(e.to_string()),
        };
        let (success, message) = match ran {
            Ok(m) => (true, m),
            Err(e) => (false, e),
        };
        TaskResult::finished(&task.task_id, success, message, out.to_wire())
    }

    async fn run(
        &self,
        p: &TrafficParams,
        spec: Option<&cutover_shared::app::AppSpec>,
        progress: &(dyn Fn(String) + Send + Sync),
        out: &mut TrafficOutputs,
    ) -> Result<String, String> {
        let app = &p.app.app;
        let cfg = self.cfg.as_ref().ok_or("this agent has no [traffic] driver")?;
        let entry = cfg
            .app(app)
            .ok_or_else(|| format!("this agent's traffic driver does not manage {app} (no [[traffic.apps]] entry)"))?;
        out.driver = Some(cfg.driver.as_str().into());
        let _serial = self.serial.get(app).ok_or("no lock for a managed app")?.lock().await;
        let current = self
            .routes
            .lock()
            .expect("routes")
            .get(app)
            .cloned()
            .unwrap_or_default();
        if p.epoch < current.epoch {
            return Err(format!(
                "stale epoch {} for {app}: traffic was moved to {} for epoch {}; the task comes from a superseded failover",
                p.epoch, current.region, current.epoch
            ));
        }
        out.region = Some(current.region.clone());
        // A hold names where the failover will send traffic: a driver that
        // could not send it there says so now, before anything is fenced.
        if let Some(to) = &p.region {
            upstream_value(entry, to)?;
        }
        match (p.action, cfg.driver) {
            (TrafficAction::Hold, TrafficDriverKind::FrontDoor) => {
                let max = Duration::from_millis(cfg.max_hold_ms);
                let door = self.door(app)?;
                door.hold(max);
                // Requests that passed the door before the hold finish
                // before the old region stops taking traffic.
                let drained = door.drain_reached(door.upstream(), max).await;
                Ok(format!(
                    "front door holding {app}'s new requests (at most {} ms); requests in flight {}",
                    cfg.max_hold_ms,
                    if drained { "finished" } else { "still running" }
                ))
            }
            (TrafficAction::Hold, TrafficDriverKind::Route53) => {
                Ok("Route 53 cannot hold requests; traffic keeps its records until moved".into())
            }
            (TrafficAction::Release, TrafficDriverKind::FrontDoor) => {
                let stats = self.door(app)?.release();
                out.released = Some(stats.held);
                out.held_max_ms = Some(stats.longest_ms);
                Ok(format!(
                    "front door released {} held requests of {app} to {} (longest wait {} ms)",
                    stats.held, current.region, stats.longest_ms
                ))
            }
            (TrafficAction::Release, TrafficDriverKind::Route53) => Ok("nothing held".into()),
            (TrafficAction::Move, driver) => {
                let to = p.region.clone().ok_or("a move names its region")?;
                let target = upstream_value(entry, &to)?;
                let route = Route {
                    region: to.clone(),
                    epoch: p.epoch,
                };
                let record = || {
                    let mut routes = self.routes.lock().expect("routes");
                    if routes.get(app) == Some(&route) {
                        return Ok(());
                    }
                    let mut next = routes.clone();
                    next.insert(app.clone(), route.clone());
                    self.save(&next)
                        .map_err(|e| format!("cannot record {app}'s traffic moving to {to}: {e}"))?;
                    *routes = next;
                    Ok::<_, String>(())
                };
                let message = match driver {
                    TrafficDriverKind::FrontDoor => {
                        let addr = parse_addr(target)?;
                        let door = self.door(app)?;
                        // Durable first: a restarted door starts where
                        // traffic went, never where it was.
                        record()?;
                        door.set_upstream(addr);
                        let stats = door.release();
                        out.released = Some(stats.held);
                        out.held_max_ms = Some(stats.longest_ms);
                        let moved = format!(
                            "front door sends {app} to {to} ({addr}); released {} held requests (longest wait {} ms)",
                            stats.held, stats.longest_ms
                        );
                        // Verify: the app's health probes through the door,
                        // as its users reach it.
                        match spec {
                            Some(spec) if !spec.health.is_empty() => {
                                let through = door.local_addr().to_string();
                                let failed = crate::gates::failing_probes(spec, &through).await;
                                if !failed.is_empty() {
                                    let why: Vec<String> = failed
                                        .iter()
                                        .map(|f| format!("FAIL {}: {}", f.name, f.detail))
                                        .collect();
                                    return Err(format!("{moved}; through the front door: {}", why.join("; ")));
                                }
                                format!(
                                    "{moved}; verified through the front door: {} probes passed",
                                    spec.health.len()
                                )
                            }
                            _ => moved,
                        }
                    }
                    TrafficDriverKind::Route53 => {
                        let r53 = cfg.route53.as_ref().ok_or("[traffic.route53] is missing")?;
                        progress(format!("upserting {app}'s Route 53 weights: {to} 100, others 0"));
                        // Route 53 holds the state; a failed record here
                        // fails the task, and its re-run upserts again.
                        let m = route53::set_weights(r53, entry, &to, p.epoch).await?;
                        record()?;
                        m
                    }
                };
                out.region = Some(to);
                Ok(message)
            }
        }
    }

    /// The front door of `app` (cloned out: no lock is held while it is
    /// used).
    fn door(&self, app: &str) -> Result<Arc<Router>, String> {
        self.doors
            .lock()
            .expect("doors")
            .get(app)
            .cloned()
            .ok_or_else(|| format!("the front door for {app} is not listening (see the agent's log)"))
    }

    fn save(&self, routes: &BTreeMap<String, Route>) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(routes).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Probes every region of every front-door app each `probe_interval_ms`,
/// from this agent (outside those regions), and sends an app's regions
/// once each is known and again whenever one changes state. Ends when the
/// session's stream closes; a new session reports everything again.
pub async fn report_region_health(rt: Arc<TrafficRuntime>, tx: tokio::sync::mpsc::Sender<ConnectRequest>) {
    let Some(cfg) = rt.cfg.clone() else { return };
    if cfg.driver != TrafficDriverKind::FrontDoor {
        // Route 53's records name hosts, not addresses to probe; its own
        // health checks are the place for that.
        return;
    }
    let mut health = RegionHealth::default();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.probe_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for report in health.round(&cfg).await {
            let msg = ConnectRequest {
                message: Some(connect_request::Message::RegionHealth(report)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
}

/// Each (app, region)'s failures in a row and the state last reported.
#[derive(Default)]
struct RegionHealth {
    seen: BTreeMap<(String, String), (u32, Option<bool>, String)>,
}

impl RegionHealth {
    /// Probes every region once (all at once); the reports of the apps
    /// whose regions changed state. A region is up at its first pass and
    /// down after `probe_failures` failures in a row; until either, its
    /// app is not reported.
    async fn round(&mut self, cfg: &TrafficConfig) -> Vec<proto::RegionHealthReport> {
        let probes = cfg.apps.iter().flat_map(|a| {
            a.regions.iter().map(move |(region, addr)| async move {
                let failed = crate::gates::failing(&a.health, addr).await;
                let detail = failed
                    .iter()
                    .map(|f| format!("{}: {}", f.name, f.detail))
                    .collect::<Vec<_>>()
                    .join("; ");
                ((a.app.clone(), region.clone()), failed.is_empty(), detail)
            })
        });
        let mut changed = std::collections::BTreeSet::new();
        for (key, passed, detail) in futures::future::join_all(probes).await {
            let (fails, reported, last) = self.seen.entry(key.clone()).or_default();
            *fails = if passed { 0 } else { fails.saturating_add(1) };
            let now = if passed {
                Some(true)
            } else if *fails >= cfg.probe_failures {
                Some(false)
            } else {
                *reported
            };
            if now.is_some() && now != *reported {
                *reported = now;
                changed.insert(key.0.clone());
            }
            if !passed {
                *last = detail;
            }
        }
        changed
            .into_iter()
            .map(|app| proto::RegionHealthReport {
                regions: self
                    .seen
                    .iter()
                    .filter(|((a, _), _)| *a == app)
                    .filter_map(|((_, region), (_, reported, detail))| {
                        reported.map(|healthy| proto::RegionHealth {
                            region: region.clone(),
                            healthy,
                            detail: if healthy { String::new() } else { detail.clone() },
                        })
                    })
                    .collect(),
                app,
            })
            .collect()
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s:?} is not ip:port: {e}"))
}

fn upstream_value<'a>(a: &'a TrafficApp, region: &str) -> Result<&'a str, String> {
    a.regions.get(region).map(String::as_str).ok_or_else(|| {
        format!(
            "{}'s traffic config has no address for region {region} (it has {})",
            a.app,
            a.regions.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

fn upstream(a: &TrafficApp, region: &str) -> Result<SocketAddr, String> {
    parse_addr(upstream_value(a, region)?)
}

mod route53 {
    //! The Route 53 driver: weighted record sets, upserted in one change
    //! batch, then `GetChange` until `INSYNC`.

    use aws_sdk_route53::types::{
        Change, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord, ResourceRecordSet, RrType,
    };

    use super::*;

    fn error<E: std::error::Error>(what: &str, e: E) -> String {
        crate::aws::error_chain(&format!("Route 53 {what}"), &e)
    }

    async fn client(cfg: &Route53Config) -> aws_sdk_route53::Client {
        let shared = crate::aws::sdk_config(&cfg.region, cfg.credentials_file.as_deref()).await;
        let mut b = aws_sdk_route53::config::Builder::from(&shared);
        if let Some(e) = &cfg.endpoint {
            b = b.endpoint_url(e);
        }
        aws_sdk_route53::Client::from_conf(b.build())
    }

    /// Weights `to` 100 and every other region 0, and waits until the
    /// change is in sync.
    pub(super) async fn set_weights(
        cfg: &Route53Config,
        app: &TrafficApp,
        to: &str,
        epoch: u64,
    ) -> Result<String, String> {
        let name = app.record.as_deref().ok_or("Route 53 needs the app's record")?;
        let client = client(cfg).await;
        let mut changes = Vec::new();
        for (region, value) in &app.regions {
            let set = ResourceRecordSet::builder()
                .name(name)
                .r#type(RrType::from(app.record_type.as_str()))
                .set_identifier(region)
                .weight(if region == to { 100 } else { 0 })
                .ttl(app.ttl)
                .resource_records(
                    ResourceRecord::builder()
                        .value(value)
                        .build()
                        .map_err(|e| error("record", e))?,
                )
                .build()
                .map_err(|e| error("record set", e))?;
            changes.push(
                Change::builder()
                    .action(ChangeAction::Upsert)
                    .resource_record_set(set)
                    .build()
                    .map_err(|e| error("change", e))?,
            );
        }
        let batch = ChangeBatch::builder()
            .set_changes(Some(changes))
            .comment(format!("cutover: {} to {to} (epoch {epoch})", app.app))
            .build()
            .map_err(|e| error("change batch", e))?;
        let sent = client
            .change_resource_record_sets()
            .hosted_zone_id(&cfg.hosted_zone_id)
            .change_batch(batch)
            .send()
            .await
            .map_err(|e| error("ChangeResourceRecordSets", e))?;
        let mut info = sent.change_info.ok_or("Route 53 answered without change info")?;
        let deadline = tokio::time::Instant::now() + INSYNC_TIMEOUT;
        while info.status != ChangeStatus::Insync {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "Route 53 change {} not INSYNC after {} s",
                    info.id,
                    INSYNC_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            info = client
                .get_change()
                .id(&info.id)
                .send()
                .await
                .map_err(|e| error("GetChange", e))?
                .change_info
                .ok_or("Route 53 answered without change info")?;
        }
        Ok(format!(
            "Route 53 {name} weighted {to} 100, {} others 0; change {} INSYNC",
            app.regions.len() - 1,
            info.id
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_shared::domain::TaskSpec;
    use cutover_shared::task::AppRef;

    /// A sample app answering with `version` (a region's name here).
    async fn app(version: &str) -> crate::sample_app::TestApp {
        crate::sample_app::TestApp::start(version).await
    }

    async fn body(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn config(east: SocketAddr, west: SocketAddr) -> TrafficConfig {
        TrafficConfig {
            driver: TrafficDriverKind::FrontDoor,
            max_hold_ms: 10_000,
            route53: None,
            probe_interval_ms: 200,
            probe_failures: 2,
            apps: vec![TrafficApp {
                app: "shop".into(),
                regions: [
                    ("us-east".into(), east.to_string()),
                    ("eu-west".into(), west.to_string()),
                ]
                .into(),
                primary: "us-east".into(),
                listen: Some("127.0.0.1:0".into()),
                record: None,
                record_type: "CNAME".into(),
                ttl: 60,
                health: vec![cutover_shared::app::Probe::http("/health")],
            }],
        }
    }

    fn task(app: &str, action: TrafficAction, region: Option<&str>, epoch: u64) -> TaskSpec {
        let (kind, params) = TaskParams::TrafficMove(TrafficParams {
            app: AppRef {
                app: app.into(),
                spec_digest: String::new(),
            },
            action,
            region: region.map(str::to_owned),
            epoch,
            compensate: false,
        })
        .to_wire();
        TaskSpec {
            task_id: format!("t-{epoch}-{}", action.as_str()),
            kind,
            params,
            operation_id: "op".into(),
            target: cutover_shared::domain::ClusterRef::new("global", "edge").unwrap(),
        }
    }

    /// A move sends the front door's traffic to the new region and is
    /// recorded with its epoch: a move for an older epoch is refused and
    /// changes nothing, and a restarted front door starts where traffic
    /// was last sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moves_are_fenced_by_epoch_and_survive_a_restart() {
        let (east, west) = (app("us-east").await, app("eu-west").await);
        let dir = tempfile::tempdir().unwrap();
        let rt = TrafficRuntime::new(Some(config(east.addr, west.addr)), dir.path()).unwrap();
        assert!(rt.start().await.is_empty());
        assert_eq!(rt.apps(), ["shop"]);
        let door = rt.front_door("shop").unwrap();
        assert!(body(door).await.contains("us-east"));
        let quiet = |_: String| {};

        let r = rt
            .execute(&task("shop", TrafficAction::Move, Some("eu-west"), 2), &quiet)
            .await;
        assert!(r.success, "{}", r.message);
        assert_eq!(TrafficOutputs::from_wire(&r.outputs).region.as_deref(), Some("eu-west"));
        assert!(body(door).await.contains("eu-west"));

        let r = rt
            .execute(&task("shop", TrafficAction::Move, Some("us-east"), 1), &quiet)
            .await;
        assert!(!r.success);
        assert!(r.message.contains("stale epoch 1"), "{}", r.message);
        assert!(body(door).await.contains("eu-west"));

        let r = rt.execute(&task("cart", TrafficAction::Hold, None, 3), &quiet).await;
        assert!(!r.success);
        assert!(r.message.contains("does not manage cart"), "{}", r.message);

        let r = rt
            .execute(&task("shop", TrafficAction::Hold, Some("ap-south"), 3), &quiet)
            .await;
        assert!(!r.success);
        assert!(r.message.contains("no address for region ap-south"), "{}", r.message);

        drop(rt);
        let rt = TrafficRuntime::new(Some(config(east.addr, west.addr)), dir.path()).unwrap();
        assert!(rt.start().await.is_empty());
        assert!(body(rt.front_door("shop").unwrap()).await.contains("eu-west"));

        // A record it cannot read stops the driver: it would forget the
        // epochs and start at the configured primary.
        drop(rt);
        std::fs::write(dir.path().join("traffic.json"), "{not json").unwrap();
        let e = TrafficRuntime::new(Some(config(east.addr, west.addr)), dir.path())
            .err()
            .unwrap();
        assert!(e.contains("traffic.json"), "{e}");
    }

    /// A door that cannot listen is reported and not registered: no
    /// failover is handed to it.
    #[tokio::test]
    async fn a_door_that_cannot_listen_is_not_registered() {
        let (east, west) = (app("us-east").await, app("eu-west").await);
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = config(east.addr, west.addr);
        cfg.apps[0].listen = Some(taken.local_addr().unwrap().to_string());
        let dir = tempfile::tempdir().unwrap();
        let rt = TrafficRuntime::new(Some(cfg), dir.path()).unwrap();
        let errors = rt.start().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(rt.apps().is_empty());
    }

    /// A hold keeps new requests waiting; the move releases them to the new
    /// region and reports how many waited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_then_a_move_releases_the_held_requests_to_the_new_region() {
        let (east, west) = (app("us-east").await, app("eu-west").await);
        let dir = tempfile::tempdir().unwrap();
        let rt = TrafficRuntime::new(Some(config(east.addr, west.addr)), dir.path()).unwrap();
        assert!(rt.start().await.is_empty());
        let door = rt.front_door("shop").unwrap();
        let quiet = |_: String| {};
        let r = rt
            .execute(&task("shop", TrafficAction::Hold, Some("eu-west"), 1), &quiet)
            .await;
        assert!(r.success, "{}", r.message);
        let pending = tokio::spawn(body(door));
        while rt.door("shop").unwrap().held() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = rt
            .execute(&task("shop", TrafficAction::Move, Some("eu-west"), 1), &quiet)
            .await;
        assert!(r.success, "{}", r.message);
        assert_eq!(TrafficOutputs::from_wire(&r.outputs).released, Some(1));
        assert!(pending.await.unwrap().contains("eu-west"));
    }

    /// Each app's tasks are serialised, not every app's: a hold that waits
    /// for one app's request in flight does not delay another app's move.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_draining_one_app_does_not_delay_another_apps_move() {
        // shop's us-east accepts a request and never answers it.
        let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (east, west) = (app("us-east").await, app("eu-west").await);
        let mut cfg = config(stuck.local_addr().unwrap(), west.addr);
        cfg.max_hold_ms = 120_000;
        let mut cart = cfg.apps[0].clone();
        cart.app = "cart".into();
        cart.regions.insert("us-east".into(), east.addr.to_string());
        cfg.apps.push(cart);
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(TrafficRuntime::new(Some(cfg), dir.path()).unwrap());
        assert!(rt.start().await.is_empty());
        let shop = rt.door("shop").unwrap();
        let in_flight = tokio::spawn(body(shop.local_addr()));
        let (upstream_side, _) = stuck.accept().await.unwrap();
        while shop.in_flight(shop.upstream()) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let hold = tokio::spawn({
            let rt = rt.clone();
            async move {
                rt.execute(&task("shop", TrafficAction::Hold, Some("eu-west"), 1), &|_| {})
                    .await
            }
        });
        while !shop.holding() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let moved = tokio::time::timeout(
            Duration::from_secs(30),
            rt.execute(&task("cart", TrafficAction::Move, Some("eu-west"), 1), &|_| {}),
        )
        .await
        .expect("cart's move waited for shop's hold");
        assert!(moved.success, "{}", moved.message);
        assert!(body(rt.front_door("cart").unwrap()).await.contains("eu-west"));
        assert!(!hold.is_finished(), "shop's hold should still be draining");

        // The request ends: shop's hold finishes draining.
        drop(upstream_side);
        let held = hold.await.unwrap();
        assert!(held.success, "{}", held.message);
        assert!(held.message.contains("finished"), "{}", held.message);
        let _ = in_flight.await;
    }

    /// The front door's region probes: a region is reported up at its
    /// first pass and down only after `probe_failures` failures in a row,
    /// with what the probe saw; a report goes out only on a change, and it
    /// names every known region of the app.
    #[tokio::test]
    async fn regions_are_reported_down_after_failures_in_a_row_and_up_again() {
        let (east, west) = (app("us-east").await, app("eu-west").await);
        let cfg = config(east.addr, west.addr);
        let mut health = RegionHealth::default();
        let states = |reports: &[proto::RegionHealthReport]| -> Vec<(String, bool)> {
            reports
                .iter()
                .flat_map(|r| r.regions.iter().map(|h| (h.region.clone(), h.healthy)))
                .collect()
        };
        let first = health.round(&cfg).await;
        assert_eq!(
            states(&first),
            [("eu-west".to_owned(), true), ("us-east".to_owned(), true)]
        );
        assert!(health.round(&cfg).await.is_empty(), "nothing changed");

        let admin = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(east.addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        };
        admin("/admin/unhealthy").await;
        assert!(health.round(&cfg).await.is_empty(), "one failure is not down");
        let down = health.round(&cfg).await;
        assert_eq!(
            states(&down),
            [("eu-west".to_owned(), true), ("us-east".to_owned(), false)]
        );
        let detail = &down[0].regions.iter().find(|r| r.region == "us-east").unwrap().detail;
        assert!(detail.contains("503"), "{detail}");

        admin("/admin/healthy").await;
        let up = health.round(&cfg).await;
        assert_eq!(
            states(&up),
            [("eu-west".to_owned(), true), ("us-east".to_owned(), true)]
        );
    }
}
