//! A partition's worker: its messages in order, in batches, through the
//! service.

use super::*;

/// A partition's task.
pub(super) struct Worker {
    pub(super) sender: mpsc::Sender<Received>,
    /// Finish the batch in flight, then stop.
    pub(super) stop: CancellationToken,
    /// Stop now, abandoning the batch in flight.
    pub(super) abort: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

pub(super) async fn partition_worker<S>(
    (topic, partition): Tp,
    mut queue: mpsc::Receiver<Received>,
    mut service: S,
    max_batch: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    commits: std::sync::mpsc::Sender<(String, i32, i64)>,
) where
    S: Service<Vec<Received>> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            message = queue.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let next_offset = batch.last().map_or(0, |m| m.offset + 1);
        let mut delays = consign_outbox::backoff::outage();
        loop {
            let attempt = async {
                let ready = ServiceExt::<Vec<Received>>::ready(&mut service)
                    .await
                    .map_err(Into::into)?;
                ready
                    .call(batch.clone())
                    .await
                    .map(|_| ())
                    .map_err(Into::<BoxError>::into)
            };
            let result = tokio::select! {
                biased;
                () = abort.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(_) => {
                    let _ = commits.send((topic.clone(), partition, next_offset));
                    break;
                }
                Err(error) => {
                    tracing::warn!(
                        topic, partition, %error,
                        "the inbox could not settle a batch; retrying it"
                    );
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
