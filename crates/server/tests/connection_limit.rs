//! `max_connections` over real sockets: past the bound a new HTTP client is served only
//! once an open connection closes, the metrics endpoint (not bounded) reports the open
//! and maximum counts, and without a bound nothing is reported.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_server::{ArchitectureRegistry, Repository, ServeOptions};
use common::{free_port, loopback, spawn_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An empty-repository server with HTTP and metrics on the returned ports.
fn start(max_connections: Option<usize>) -> (u16, u16, tokio::sync::oneshot::Sender<()>) {
    let repo = Repository::new(None, Arc::new(ArchitectureRegistry::with_builtins()));
    let (http, metrics) = (free_port(), free_port());
    let options = ServeOptions {
        http_addr: loopback(http),
        grpc_addr: None,
        metrics_addr: Some(loopback(metrics)),
        max_connections,
        ..ServeOptions::default()
    };
    (http, metrics, spawn_server(options, repo))
}

/// The full answer to `GET path` on a new connection (closed by the server afterwards).
async fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some(text)
}

async fn wait_until_up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(port, "/v2/health/live").await.is_none() {
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_bound_waits_for_a_close() {
    let (http, metrics, _stop) = start(Some(1));
    wait_until_up(http).await;
    // One idle connection takes the only permit.
    let idle = TcpStream::connect(("127.0.0.1", http))
        .await
        .expect("first connection");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = get(metrics, "/metrics").await.unwrap_or_default();
        if text.contains("aperture_open_connections 1") {
            assert!(text.contains("aperture_max_connections 1"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle connection was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = tokio::spawn(get(http, "/v2/health/live"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "a second connection was served past the bound"
    );
    drop(idle);
    let answer = waiting
        .await
        .expect("client task")
        .expect("served after the close");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_servers_report_no_connection_gauges() {
    let (http, metrics, _stop) = start(None);
    wait_until_up(http).await;
    let text = get(metrics, "/metrics").await.expect("metrics answer");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("aperture_open_connections"), "{text}");
}
