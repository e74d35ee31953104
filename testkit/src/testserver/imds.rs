//! An EC2 instance metadata (IMDSv2) and ECS credentials test server on
//! `127.0.0.1:0`: `PUT /latest/api/token` hands out a session token; the
//! role name and the role's keys are only given to a GET that carries it
//! (401 otherwise, as IMDSv2 with tokens required). `GET /ecs/creds` is the
//! ECS task-role endpoint (it checks the Authorization header); `POST /sts`
//! answers STS `AssumeRoleWithWebIdentity` for the token [`WEB_IDENTITY_TOKEN`]. The keys it
//! issues go into the S3 test server's [`KeyRing`]; [`ImdsServer::rotate`]
//! revokes the current ones and issues new ones. `hop_limited` makes the
//! token PUT never answer, as a hop limit of 1 does one network hop away.
//!
//! Crash guarantees: all state is in memory; nothing survives the process.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::s3::KeyRing;

/// The role name the server reports.
pub const ROLE: &str = "deploy-agent-host";
/// The Authorization value the ECS endpoint wants.
pub const ECS_TOKEN: &str = "ecs-test-authorization";

/// The web identity token `POST /sts` accepts (an EKS projected token).
pub const WEB_IDENTITY_TOKEN: &str = "eyJ-test-projected-service-account-token";

/// One issued key set.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_key_id: String,
    pub secret: String,
    pub token: String,
}

#[derive(Debug)]
struct State {
    keys: Arc<KeyRing>,
    current: Mutex<Issued>,
    generation: AtomicU64,
    lifetime: Mutex<Duration>,
    tokens: Mutex<Vec<String>>,
    hop_limited: AtomicBool,
    token_puts: AtomicU64,
    credential_gets: AtomicU64,
}

/// The running server; stopped on drop.
#[derive(Debug)]
pub struct ImdsServer {
    addr: std::net::SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
}

fn issue(keys: &KeyRing, generation: u64) -> Issued {
    let issued = Issued {
        access_key_id: format!("ASIATESTROLE{generation:08}"),
        secret: format!("role-secret-{generation}-{:016x}", rand::random::<u64>()),
        token: format!(
            "role-session-token-{generation}-{:016x}",
            rand::random::<u64>()
        ),
    };
    keys.add(&issued.access_key_id, &issued.secret);
    issued
}

impl ImdsServer {
    /// Starts with one key set issued into `keys`, each valid for `lifetime`
    /// as the Expiration field says.
    pub async fn start(keys: Arc<KeyRing>, lifetime: Duration) -> io::Result<ImdsServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            current: Mutex::new(issue(&keys, 1)),
            keys,
            generation: AtomicU64::new(1),
            lifetime: Mutex::new(lifetime),
            tokens: Mutex::new(Vec::new()),
            hop_limited: AtomicBool::new(false),
            token_puts: AtomicU64::new(0),
            credential_gets: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown.clone()));
        Ok(ImdsServer {
            addr,
            state,
            shutdown,
        })
    }

    /// `http://127.0.0.1:port` (AWS_EC2_METADATA_SERVICE_ENDPOINT).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The keys handed out now.
    pub fn current(&self) -> Issued {
        self.state
            .current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Revokes the current keys at the store (it answers ExpiredToken)
    /// and hands out new ones.
    pub fn rotate(&self) -> Issued {
        let generation = self.state.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let next = issue(&self.state.keys, generation);
        if let Ok(mut c) = self.state.current.lock() {
            self.state.keys.revoke(&c.access_key_id);
            *c = next.clone();
        }
        next
    }

    /// Token PUTs get no answer (a hop limit of 1, one hop away).
    pub fn set_hop_limited(&self, on: bool) {
        self.state.hop_limited.store(on, Ordering::SeqCst);
    }

    pub fn token_puts(&self) -> u64 {
        self.state.token_puts.load(Ordering::SeqCst)
    }

    /// GETs of the role's keys (IMDS and ECS).
    pub fn credential_gets(&self) -> u64 {
        self.state.credential_gets.load(Ordering::SeqCst)
    }
}

impl Drop for ImdsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (state, shutdown) = (Arc::clone(&state), shutdown.clone());
        tokio::spawn(async move {
            let inner = shutdown.clone();
            let service = hyper::service::service_fn(move |req| {
                let (state, shutdown) = (Arc::clone(&state), inner.clone());
                async move { Ok::<_, Infallible>(respond(&state, req, &shutdown).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn header<'a>(req: &'a Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn respond(
    state: &State,
    req: Request<hyper::body::Incoming>,
    shutdown: &CancellationToken,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let base = "/latest/meta-data/iam/security-credentials/";
    match (req.method().clone(), path.as_str()) {
        (Method::PUT, "/latest/api/token") => {
            state.token_puts.fetch_add(1, Ordering::SeqCst);
            if state.hop_limited.load(Ordering::SeqCst) {
                // The answer never arrives: wait until the server stops.
                shutdown.cancelled().await;
            }
            if header(&req, "x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                return answer(StatusCode::BAD_REQUEST, String::new());
            }
            let token = format!("imds-token-{:016x}", rand::random::<u64>());
            if let Ok(mut t) = state.tokens.lock() {
                t.push(token.clone());
            }
            answer(StatusCode::OK, token)
        }
        (Method::GET, p) if p.starts_with(base) => {
            let token = header(&req, "x-aws-ec2-metadata-token").unwrap_or("");
            let known = state
                .tokens
                .lock()
                .map(|t| t.iter().any(|x| x == token))
                .unwrap_or(false);
            if !known {
                return answer(StatusCode::UNAUTHORIZED, String::new());
            }
            match &p[base.len()..] {
                "" => answer(StatusCode::OK, format!("{ROLE}\n")),
                ROLE => keys_json(state),
                _ => answer(StatusCode::NOT_FOUND, String::new()),
            }
        }
        (Method::POST, "/sts") => sts(state, req).await,
        (Method::GET, "/ecs/creds") => {
            if header(&req, "authorization") != Some(ECS_TOKEN) {
                return answer(StatusCode::UNAUTHORIZED, String::new());
            }
            keys_json(state)
        }
        _ => answer(StatusCode::NOT_FOUND, String::new()),
    }
}

/// STS `AssumeRoleWithWebIdentity`: the form must carry the action, a
/// role ARN and [`WEB_IDENTITY_TOKEN`]; the answer is STS's XML.
async fn sts(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => return answer(StatusCode::BAD_REQUEST, String::new()),
    };
    let form: Vec<&str> = body.split('&').collect();
    let ok = form.contains(&"Action=AssumeRoleWithWebIdentity")
        && form.iter().any(|p| p.starts_with("RoleArn=arn"))
        && form.contains(&format!("WebIdentityToken={WEB_IDENTITY_TOKEN}").as_str());
    if !ok {
        return answer(
            StatusCode::FORBIDDEN,
            "<ErrorResponse><Error><Code>InvalidIdentityToken</Code></Error></ErrorResponse>"
                .into(),
        );
    }
    let (issued, expires) = issue_now(state);
    answer(
        StatusCode::OK,
        format!(
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
             <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
             <SessionToken>{}</SessionToken><Expiration>{expires}</Expiration>\
             </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
            issued.access_key_id, issued.secret, issued.token
        ),
    )
}

/// The current keys and their expiry as the answers write it; counted.
fn issue_now(state: &State) -> (Issued, String) {
    state.credential_gets.fetch_add(1, Ordering::SeqCst);
    let lifetime = state.lifetime.lock().map(|l| *l).unwrap_or_default();
    let issued = match state.current.lock() {
        Ok(c) => c.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + lifetime).to_string();
    (issued, expires)
}

fn keys_json(state: &State) -> Response<Full<Bytes>> {
    let (issued, expires) = issue_now(state);
    let body = serde_json::json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": issued.access_key_id,
        "SecretAccessKey": issued.secret,
        "Token": issued.token,
        "Expiration": expires,
    });
    answer(StatusCode::OK, body.to_string())
}
