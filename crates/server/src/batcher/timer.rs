//! A wake-up thread with sub-millisecond precision for the batcher task.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::Instant;

use tokio::sync::mpsc::WeakUnboundedSender;

use super::Msg;

/// Starts the timer: send it `Some(deadline)` to (re)arm, `None` to disarm; it answers
/// with [`Msg::Tick`]. It holds the batcher's channel weakly, so it never keeps the
/// batcher alive, and exits when the batcher drops its sender.
pub(super) fn spawn(batcher: WeakUnboundedSender<Msg>) -> Option<Sender<Option<Instant>>> {
    let (tx, rx) = channel::<Option<Instant>>();
    let spawned = std::thread::Builder::new()
        .name("aperture-batch-timer".into())
        .spawn(move || {
            let mut deadline: Option<Instant> = None;
            loop {
                let got = match deadline {
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                };
                match got {
                    Ok(d) => deadline = d,
                    Err(RecvTimeoutError::Timeout) => {
                        deadline = None;
                        match batcher.upgrade() {
                            Some(b) if b.send(Msg::Tick).is_ok() => {}
                            _ => break,
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no batch timer thread; batch delays round up to 1 ms");
            None
        }
    }
}
