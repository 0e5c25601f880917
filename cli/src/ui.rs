//! `cutover ui`: the web console, like `kubectl argo rollouts dashboard`.
//!
//! A small HTTP server on loopback serves one embedded page (`cli/ui/`: no
//! build step, no CDN) and a JSON API that calls the coordinators' gRPC API
//! with the user's own certificate. The console therefore adds no credential
//! and no port on the coordinators, and can do exactly what the certificate
//! may: a viewer's page has no buttons, and the coordinators refuse a
//! viewer's writes whatever a page sends.
//!
//! Every API call carries a random token that `cutover ui` prints in the
//! URL's fragment (a fragment is never sent in a request, so it is in no
//! log). Without it, another local user, or a web page open in the same
//! browser (a cross-site request, a DNS-rebound name), could act with the
//! user's certificate through the console's port.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cutover_shared::identity::{Identity, Role, identity_from_pem_file};
use cutover_shared::proto as pb;
use pb::control_service_client::ControlServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::client::{self, ConnOpts, Failure};
use crate::verbs;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/console.js");
const STYLE: &str = include_str!("../ui/console.css");

/// The page may load only its own script and style, and talk only to this
/// server; no other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The header that carries the console token (the event stream, which a
/// browser opens without custom headers, carries it as `?token=`).
const TOKEN_HEADER: &str = "x-cutover-token";

type Client = ControlServiceClient<Channel>;

/// What every request of the console works with.
pub struct Console {
    clients: Vec<(String, Client)>,
    identity: Identity,
    token: String,
}

impl Console {
    /// A console acting as the identity in `conn`'s certificate, which must
    /// be an operator's or a viewer's.
    pub fn new(conn: &ConnOpts) -> Result<Console> {
        let tls = conn.tls()?;
        let identity = identity_from_pem_file(&tls.cert, &conn.trust_domain)
            .with_context(|| format!("reading the identity in {}", tls.cert.display()))?;
        if !matches!(identity.role, Role::Operator | Role::Viewer) {
            bail!(
                "{} is a {} certificate; the console needs an operator's or a viewer's",
                tls.cert.display(),
                identity.role.as_str()
            );
        }
        Ok(Console {
            clients: conn.clients()?,
            identity,
            token: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// The URL that opens the console served at `addr`.
    pub fn url(&self, addr: SocketAddr) -> String {
        format!("http://{addr}/#token={}", self.token)
    }

    async fn rpc<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        client::call_each(&self.clients, f)
            .await
            .map_err(|f| ApiError(Box::new(failure(f))))
    }
}

/// `cutover ui`: serves the console on `listen` (loopback only) until Ctrl-C.
pub async fn run(listen: &str, conn: ConnOpts) -> Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?}: expected ip:port, e.g. 127.0.0.1:8480"))?;
    if !addr.ip().is_loopback() {
        bail!("--listen {listen}: the console acts with your certificate, so it listens on a loopback address only");
    }
    let console = Console::new(&conn)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    println!(
        "cutover console for {}/{} ({}): {}",
        console.identity.role.as_str(),
        console.identity.name,
        if console.identity.role == Role::Operator {
            "may act"
        } else {
            "read-only"
        },
        console.url(bound)
    );
    println!("Ctrl-C stops it");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    serve(listener, Arc::new(console), crate::shutdown_signal()).await
}

/// Serves the console on an already-bound listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(console))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/api/whoami", get(whoami))
        .route("/api/overview", get(overview))
        .route("/api/apps", get(apps))
        .route("/api/operations", get(operations))
        .route("/api/operations/{id}", get(operation))
        .route("/api/operations/{id}/events", get(events))
        .route("/api/operations/{id}/{action}", post(steer))
        .route("/api/apps/{app}/rollback", post(rollback))
        .route("/api/releases", get(releases))
        .route("/api/audit", get(audit))
        .route("/api/dr", get(dr))
        .route_layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console);
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .merge(api)
        .layer(middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Lets through only requests that carry the console's token.
async fn guard(State(c): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let in_header = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) == Some(c.token.as_str());
    // Only the event stream may carry it in the URL: a browser's
    // EventSource cannot set headers.
    let in_query = req.method() == axum::http::Method::GET
        && req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.strip_prefix("token=") == Some(c.token.as_str()))
        });
    if in_header || in_query {
        next.run(req).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong console token: open the URL that `cutover ui` printed",
        )
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, json_body(&json!({ "error": message.into() }))).into_response()
}

fn json_body(v: &Value) -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string())
}

fn ok(v: Value) -> Result<Response, ApiError> {
    Ok(json_body(&v).into_response())
}

/// A coordinator's refusal keeps its meaning for the page: a viewer's
/// write is a 403, an unknown operation a 404, a gate that is not waiting
/// a 409.
fn failure(f: Failure) -> Response {
    match f {
        Failure::Status(s) => {
            let status = match s.code() {
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
                tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists | tonic::Code::Aborted => {
                    StatusCode::CONFLICT
                }
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::BAD_GATEWAY,
            };
            error(status, format!("{}: {}", client::code_name(s.code()), s.message()))
        }
        Failure::Unreachable(last) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no coordinator reachable ({last})"),
        ),
    }
}

type ApiResult = Result<Response, ApiError>;

/// An API error, boxed: a `Response` is large, and every handler's `Err`
/// would carry its size.
struct ApiError(Box<Response>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

async fn whoami(State(c): State<Arc<Console>>) -> ApiResult {
    ok(json!({
        "identity": format!("{}/{}", c.identity.role.as_str(), c.identity.name),
        "role": c.identity.role.as_str(),
        "can_act": c.identity.role == Role::Operator,
        "coordinators": c.clients.iter().map(|(a, _)| a).collect::<Vec<_>>(),
    }))
}

async fn overview(State(c): State<Arc<Console>>) -> ApiResult {
    let cluster = c
        .rpc(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await?;
    let agents = client::list_all_agents(&c.clients)
        .await
        .map_err(|f| ApiError(Box::new(failure(f))))?;
    ok(json!({
        "cluster": verbs::cluster_status_json(&cluster),
        "agents": agents.iter().map(verbs::agent_json).collect::<Vec<_>>(),
    }))
}

/// The app names, in the coordinators' order.
async fn app_list(c: &Console) -> Result<Vec<pb::App>, ApiError> {
    Ok(c.rpc(|mut c| async move { c.list_apps(pb::ListAppsRequest {}).await })
        .await?
        .apps)
}

async fn apps(State(c): State<Arc<Console>>) -> ApiResult {
    let mut out = Vec::new();
    for app in app_list(&c).await? {
        let name = app.name.clone();
        let status = c
            .rpc(|mut c| {
                let app = name.clone();
                async move {
                    c.get_status(pb::GetStatusRequest {
                        app,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let spec = verbs::app_json(app).unwrap_or(Value::Null);
        out.push(json!({"name": name, "spec": spec, "status": verbs::status_json(&status)}));
    }
    ok(json!(out))
}

async fn operations(State(c): State<Arc<Console>>) -> ApiResult {
    let r = c
        .rpc(|mut c| async move { c.list_operations(pb::ListOperationsRequest { limit: 100 }).await })
        .await?;
    ok(json!(
        r.operations.iter().map(verbs::operation_json).collect::<Vec<_>>()
    ))
}

async fn get_operation(c: &Console, id: &str) -> Result<pb::Operation, ApiError> {
    c.rpc(|mut c| {
        let operation_id = id.to_owned();
        async move { c.get_operation(pb::GetOperationRequest { operation_id }).await }
    })
    .await?
    .operation
    .ok_or_else(|| {
        ApiError(Box::new(error(
            StatusCode::BAD_GATEWAY,
            "the coordinator returned no operation",
        )))
    })
}

async fn operation(State(c): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    ok(verbs::operation_json(&get_operation(&c, &id).await?))
}

/// The operation as server-sent events: `operation` with the whole
/// operation at each change (from `WatchOperation`), then `end` once it
/// finished, or `failure` if the stream broke (the browser then reconnects).
async fn events(State(c): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    let mut stream = c
        .rpc(|mut c| {
            let operation_id = id.clone();
            async move { c.watch_operation(pb::WatchOperationRequest { operation_id }).await }
        })
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(16);
    tokio::spawn(async move {
        let last = loop {
            let event = match stream.message().await {
                Ok(Some(m)) => match m.operation {
                    Some(op) => Event::default()
                        .event("operation")
                        .data(verbs::operation_json(&op).to_string()),
                    None => continue,
                },
                Ok(None) => break Event::default().event("end").data("{}"),
                Err(s) => {
                    break Event::default()
                        .event("failure")
                        .data(json!({"error": s.message()}).to_string());
                }
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        };
        let _ = tx.send(Ok(last)).await;
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Promote (the gate the operation waits at), pause, resume or abort.
async fn steer(State(c): State<Arc<Console>>, Path((id, action)): Path<(String, String)>) -> ApiResult {
    if !matches!(action.as_str(), "promote" | "pause" | "resume" | "abort") {
        return Err(ApiError(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}: promote, pause, resume or abort"),
        ))));
    }
    let op = c
        .rpc(|mut c| {
            let operation_id = id.clone();
            let action = action.clone();
            async move {
                let op = match action.as_str() {
                    "promote" => {
                        let req = pb::PromoteOperationRequest { operation_id, gate: 0 };
                        c.promote_operation(req).await?.into_inner().operation
                    }
                    "pause" => {
                        let req = pb::PauseOperationRequest { operation_id };
                        c.pause_operation(req).await?.into_inner().operation
                    }
                    "resume" => {
                        let req = pb::ResumeOperationRequest { operation_id };
                        c.resume_operation(req).await?.into_inner().operation
                    }
                    _ => {
                        let req = pb::AbortOperationRequest { operation_id };
                        c.abort_operation(req).await?.into_inner().operation
                    }
                };
                Ok(tonic::Response::new(op))
            }
        })
        .await?;
    ok(op.as_ref().map_or(Value::Null, verbs::operation_json))
}

/// Rolls the app back to its previous color (`?region=R` for one region).
async fn rollback(State(c): State<Arc<Console>>, Path(app): Path<String>, RawQuery(q): RawQuery) -> ApiResult {
    let region = q
        .iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("region="))
        .unwrap_or_default()
        .to_owned();
    let r = c
        .rpc(|mut c| {
            let req = pb::RollbackRequest {
                app: app.clone(),
                region: region.clone(),
            };
            async move { c.rollback(req).await }
        })
        .await?;
    ok(json!({ "operation_id": r.operation_id }))
}

/// Each app's releases, each with the attestations of its image.
async fn releases(State(c): State<Arc<Console>>) -> ApiResult {
    let mut out = Vec::new();
    for app in app_list(&c).await? {
        let r = c
            .rpc(|mut c| {
                let app = app.name.clone();
                async move { c.list_releases(pb::ListReleasesRequest { app }).await }
            })
            .await?;
        let mut releases = Vec::new();
        for rel in &r.releases {
            let att = c
                .rpc(|mut c| {
                    let image = rel.image.clone();
                    async move { c.list_attestations(pb::ListAttestationsRequest { image }).await }
                })
                .await?;
            let mut v = crate::migrate::release_json(rel);
            v["attestations"] =
                json!(att.attestations.iter().map(|a| json!({
                "check": a.check, "value": a.value, "attested_by": a.attested_by, "at_unix_ms": a.at_unix_ms,
            })).collect::<Vec<_>>());
            releases.push(v);
        }
        out.push(json!({"app": app.name, "releases": releases}));
    }
    ok(json!(out))
}

async fn audit(State(c): State<Arc<Console>>) -> ApiResult {
    let r = c
        .rpc(|mut c| async move {
            c.list_audit_events(pb::ListAuditEventsRequest {
                limit: 200,
                since_unix_ms: 0,
            })
            .await
        })
        .await?;
    ok(json!(r.events.iter().map(verbs::audit_json).collect::<Vec<_>>()))
}

/// Backups, and each app's drills (RTO and RPO over time) and schedule.
async fn dr(State(c): State<Arc<Console>>) -> ApiResult {
    let backups = c
        .rpc(|mut c| async move {
            c.list_backups(pb::ListBackupsRequest {
                limit: 200,
                ..Default::default()
            })
            .await
        })
        .await?;
    let mut drills = Vec::new();
    for app in app_list(&c).await? {
        let r = c
            .rpc(|mut c| {
                let app = app.name.clone();
                async move { c.list_drills(pb::ListDrillsRequest { app, limit: 100 }).await }
            })
            .await?;
        drills.push(json!({
            "app": app.name,
            "drills": r.drills.iter().map(crate::dr::drill_json).collect::<Vec<_>>(),
            "schedule": r.schedule.as_ref().map(|s| json!({"cron": s.cron, "next_slot_unix_ms": s.next_slot_unix_ms})),
        }));
    }
    ok(json!({
        "backups": backups.backups.iter().map(crate::backup::backup_json).collect::<Vec<_>>(),
        "drills": drills,
    }))
}
