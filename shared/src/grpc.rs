//! Server-side gRPC plumbing shared by every port: the access guard (identity
//! from the client certificate, role check per method, RPC metrics), standard
//! health checking and server reflection (v1 and v1alpha).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::identity::{Identity, Role};
use crate::tls::peer_identity;

/// Which roles may call a method, by full gRPC path (`/pkg.Service/Method`).
/// `None` means the method is unknown: it is refused.
pub type Policy = Arc<dyn Fn(&str) -> Option<&'static [Role]> + Send + Sync>;

/// Every role: for health checks and reflection, which reveal nothing beyond
/// the public API.
pub const ANY_ROLE: &[Role] = &[Role::Coordinator, Role::Agent, Role::Operator, Role::Viewer];

fn builtin(path: &str) -> Option<&'static [Role]> {
    if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        Some(ANY_ROLE)
    } else {
        None
    }
}

/// Checks the caller of every request before it reaches a service. The
/// verified `Identity` is put into the request's extensions for handlers.
#[derive(Clone)]
pub struct GuardLayer {
    policy: Policy,
    trust_domain: Arc<str>,
}

impl GuardLayer {
    /// Callers must be in `trust_domain` and hold a role `policy` allows.
    pub fn new(policy: Policy, trust_domain: &str) -> Self {
        Self {
            policy,
            trust_domain: trust_domain.into(),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            policy: self.policy.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// The service produced by [`GuardLayer`].
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    policy: Policy,
    trust_domain: Arc<str>,
}

fn method_label(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

fn record(method: &str, code: &str, start: Instant) {
    metrics::counter!("cutover_rpc_requests_total", "method" => method.to_owned(), "code" => code.to_owned())
        .increment(1);
    metrics::histogram!("cutover_rpc_duration_seconds", "method" => method.to_owned())
        .record(start.elapsed().as_secs_f64());
}

/// Decides whether the caller may invoke `path`.
pub fn authorize(policy: &Policy, trust_domain: &str, path: &str, ext: &http::Extensions) -> Result<Identity, Status> {
    let identity = peer_identity(ext, trust_domain).map_err(|e| Status::unauthenticated(e.to_string()))?;
    let allowed = builtin(path)
        .or_else(|| policy(path))
        .ok_or_else(|| Status::unimplemented(format!("unknown method {path}")))?;
    if !allowed.contains(&identity.role) {
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        return Err(Status::permission_denied(format!(
            "{identity} may not call {}: requires role {}",
            method_label(path),
            names.join(" or ")
        )));
    }
    Ok(identity)
}

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let method = method_label(req.uri().path());
        match authorize(&self.policy, &self.trust_domain, req.uri().path(), req.extensions()) {
            Err(status) => {
                tracing::warn!(method = %method, code = ?status.code(), "refused: {}", status.message());
                record(&method, &format!("{:?}", status.code()), start);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
            Ok(identity) => {
                req.extensions_mut().insert(identity);
                // Take the service that was driven to readiness, leave a clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let resp = inner.call(req).await?;
                    // Errors are answered trailers-only, so the status is in
                    // the headers; streamed successes carry it in trailers.
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                        .unwrap_or_else(|| "Ok".to_owned());
                    record(&method, &code, start);
                    Ok(resp)
                })
            }
        }
    }
}

/// The caller's identity, as put there by [`Guard`].
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified caller identity"))
}

/// Reflection services (v1 and v1alpha) over every cutover proto plus health.
pub fn reflection_services() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptor sets are valid");
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("embedded descriptor sets are valid");
    (v1, v1alpha)
}
