//! Startup over real sockets: the endpoints answer while the repository loads (live,
//! not ready), and readiness follows once the load has finished, whatever its outcome.

mod common;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_server::{
    ArchitectureRegistry, BuildError, ModelConfig, ModelSource, Repository, ServeOptions, Server,
};
use common::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Status code and body of `method path` with `body`, or `None` while nothing listens.
async fn request(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The status code of `GET path`, or `None` while nothing listens.
async fn status(port: u16, path: &str) -> Option<u16> {
    request(port, "GET", path, "").await.map(|(code, _)| code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_while_models_load_ready_once_they_have() {
    // A model whose build waits for the test's signal (as a first GPU start waits for
    // NVRTC), then fails: readiness must follow the load, not its success.
    let (release, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let mut registry = ArchitectureRegistry::with_builtins();
    registry.register("gated", move |_| -> Result<_, BuildError> {
        if let Ok(g) = gate.lock() {
            let _ = g.recv_timeout(Duration::from_secs(10));
        }
        Err("the gated model refuses to build".into())
    });
    let repo = Repository::new(None, Arc::new(registry));
    repo.add_source(
        "slow",
        ModelSource::Inline {
            config: Box::new(ModelConfig::with_architecture("gated")),
            dir: ".".into(),
        },
    );
    let port = free_port();
    let options = ServeOptions {
        http_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        grpc_addr: None,
        metrics_addr: None,
        ..ServeOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Server::new(options, repo).run(async {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        if let Some(code) = status(port, "/v2/health/live").await {
            break code;
        }
        assert!(Instant::now() < deadline, "the HTTP port never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(live, 200);
    // Not ready: 400, as Triton answers; the model shows as LOADING, and a request for
    // it is told to come back (503), not that the model does not exist.
    assert_eq!(status(port, "/v2/health/ready").await, Some(400));
    let (code, index) = request(port, "POST", "/v2/repository/index", "{}")
        .await
        .expect("index");
    assert_eq!(code, 200, "{index}");
    assert!(
        index.contains(r#""name":"slow""#) && index.contains(r#""state":"LOADING""#),
        "{index}"
    );
    let (code, answer) = request(port, "POST", "/v2/models/slow/infer", "{\"inputs\": []}")
        .await
        .expect("infer");
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("'slow' is loading"), "{answer}");

    release.send(()).expect("the builder is waiting");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(port, "/v2/health/ready").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready after the load finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(port, "/v2/models/slow/ready").await, Some(400));
    let (_, index) = request(port, "POST", "/v2/repository/index", "{}")
        .await
        .expect("index");
    assert!(
        index.contains(r#""state":"UNAVAILABLE""#) && index.contains("refuses to build"),
        "{index}"
    );

    let _ = stop.send(());
    let ran = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the server stops");
    assert!(matches!(ran, Ok(Ok(()))), "{ran:?}");
}
