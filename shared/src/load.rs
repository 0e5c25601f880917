//! Steady HTTP load for zero-downtime checks: keep-alive HTTP/1.1
//! connections, each sending `GET /` at a fixed pace, counting answers and
//! keeping each request's start and latency, and what answered it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

/// A running load; `stop` ends it and returns (ok, failed).
pub struct SteadyLoad {
    stop: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    samples: Samples,
    answers: Answers,
    workers: Vec<JoinHandle<()>>,
}

/// One answer: when its request started (ms since the epoch, comparable
/// with an operation's recorded times), its status (0: no answer) and its
/// body's first line (the sample app names its version there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub started_unix_ms: i64,
    pub status: u16,
    pub body: String,
}

type Answers = Arc<Mutex<Vec<Answer>>>;

/// Each request's start and how long its answer took (failures included).
type Samples = Arc<Mutex<Vec<(Instant, Duration)>>>;

impl SteadyLoad {
    /// `connections` workers against `addr`, one request per `pace` each.
    pub fn start(addr: &str, connections: usize, pace: Duration) -> SteadyLoad {
        let (stop, ok, failed) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let samples = Samples::default();
        let answers = Answers::default();
        let workers = (0..connections)
            .map(|_| {
                let counters = (stop.clone(), ok.clone(), failed.clone(), samples.clone());
                tokio::spawn(worker(addr.to_owned(), counters, answers.clone(), pace))
            })
            .collect();
        SteadyLoad {
            stop,
            ok,
            failed,
            samples,
            answers,
            workers,
        }
    }

    /// The answers to the requests that started in `[from_ms, to_ms]`
    /// (ms since the epoch), in no particular order.
    pub fn answers_between(&self, from_ms: i64, to_ms: i64) -> Vec<Answer> {
        self.answers
            .lock()
            .expect("answers")
            .iter()
            .filter(|a| (from_ms..=to_ms).contains(&a.started_unix_ms))
            .cloned()
            .collect()
    }

    /// The latencies of the requests that started in `[from, to]`, sorted.
    pub fn latencies_started_between(&self, from: Instant, to: Instant) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        v
    }

    /// Requests answered 200 and failed so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    pub async fn stop(mut self) -> (u64, u64) {
        self.stop.store(1, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            let _ = w.await;
        }
        self.counts()
    }
}

/// Keep-alive HTTP/1.1 client loop: GET / until `stop`, counting answers.
async fn worker(
    addr: String,
    (stop, ok, failed, samples): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>, Samples),
    answers: Answers,
    pace: Duration,
) {
    let mut conn: Option<BufReader<tokio::net::TcpStream>> = None;
    let mut ticker = tokio::time::interval(pace);
    while stop.load(Ordering::Relaxed) == 0 {
        ticker.tick().await;
        let started = Instant::now();
        let started_unix_ms = crate::domain::now_unix_ms();
        if conn.is_none() {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(s) => conn = Some(BufReader::new(s)),
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let res: std::io::Result<(u16, String)> = async {
            c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            let mut status = String::new();
            c.read_line(&mut status).await?;
            let code: u16 = status
                .split_whitespace()
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                c.read_line(&mut line).await?;
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            c.read_exact(&mut body).await?;
            let first = String::from_utf8_lossy(&body)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            Ok((code, first))
        }
        .await;
        samples.lock().expect("samples").push((started, started.elapsed()));
        let (status, body) = res.as_ref().map_or((0, String::new()), |(s, b)| (*s, b.clone()));
        answers.lock().expect("answers").push(Answer {
            started_unix_ms,
            status,
            body,
        });
        match res.map(|(s, _)| s) {
            Ok(200) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}
