//! What the socket-level server tests share: free ports, a server on loopback, a gRPC
//! channel once the port answers.
#![allow(dead_code)] // each test file uses its own part

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use aperture_server::{ModelConfig, ModelSource, Repository, ServeOptions, Server};
use tonic::transport::Channel;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Adds Triton's "simple" model (add_sub over 16 values) to `repo`.
pub fn add_simple(repo: &Repository) {
    let mut cfg = ModelConfig::with_architecture("add_sub");
    cfg.input_size = Some(vec![16]);
    repo.add_source(
        "simple",
        ModelSource::Inline {
            config: Box::new(cfg),
            dir: ".".into(),
        },
    );
}

/// Runs `repo` behind `options` until the returned sender is dropped or used.
pub fn spawn_server(options: ServeOptions, repo: Repository) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Server::new(options, repo).run(async {
        let _ = stopped.await;
    }));
    stop
}

/// A channel to the gRPC port once it accepts connections.
pub async fn grpc_channel(port: u16) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoint =
            Channel::from_shared(format!("http://127.0.0.1:{port}")).expect("a valid endpoint");
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        assert!(Instant::now() < deadline, "the gRPC port never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
