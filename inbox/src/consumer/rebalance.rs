//! The rebalance callbacks: positioning assigned partitions at the offsets
//! stored in the database, stopping the workers of revoked ones.

use super::*;

/// How long one read of the stored offsets may take.
const STORED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct State {
    pub(super) assigned: HashSet<Tp>,
    pub(super) workers: HashMap<Tp, Worker>,
    /// Messages waiting for room in a full worker queue (their partition
    /// is paused meanwhile).
    pub(super) pending: HashMap<Tp, VecDeque<Received>>,
    /// Found in a rebalance callback; ends `run`.
    pub(super) fatal: Option<ConsumerError>,
}

pub(super) struct Ctx {
    pub(super) offsets: super::OffsetReader,
    pub(super) group: String,
    pub(super) topics: Vec<String>,
    pub(super) handle: Handle,
    pub(super) shutdown_timeout: Duration,
    pub(super) shutdown: CancellationToken,
    pub(super) state: Mutex<State>,
}

impl Ctx {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets each partition of `tpl` to the offset stored in the database.
    /// Partitions without a stored offset keep Kafka's committed offset
    /// (or `auto.offset.reset`).
    ///
    /// Waits, retrying with backoff, until the database answers: starting
    /// anywhere else could re-apply effects whose dedup records retention
    /// has removed (Kafka's committed offset may be missing or behind).
    /// Polling stops meanwhile; the workers of other partitions go on.
    /// Returns `false` when shutdown came first (nothing positioned).
    pub(super) fn position_at_stored_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> bool {
        let mut delays =
            consign_outbox::backoff::delays(Duration::from_millis(200), Duration::from_secs(5));
        let mut failures = 0_u32;
        let stored = loop {
            // Bounded, and left at shutdown: a database gone silent must not
            // hold the poll thread.
            let read = self.handle.block_on(async {
                tokio::select! {
                    read = tokio::time::timeout(
                        STORED_OFFSETS_TIMEOUT,
                        (self.offsets)(self.group.clone(), self.topics.clone()),
                    ) => Some(read),
                    () = self.shutdown.cancelled() => None,
                }
            });
            let read = match read {
                None => return false,
                Some(Ok(read)) => read.map_err(|error| error.to_string()),
                Some(Err(_)) => Err(format!("no answer within {STORED_OFFSETS_TIMEOUT:?}")),
            };
            match read {
                Ok(stored) => break stored,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(
                        %error, failures,
                        "cannot read stored offsets; the assigned partitions wait until the database answers"
                    );
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    let stopped = self.handle.block_on(async {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => false,
                            () = self.shutdown.cancelled() => true,
                        }
                    });
                    if stopped {
                        return false;
                    }
                }
            }
        };
        if failures > 0 {
            tracing::info!(
                failures,
                "stored offsets read; the assigned partitions start"
            );
        }
        let stored: HashMap<(&str, i32), i64> = stored
            .iter()
            .map(|(t, p, o)| ((t.as_str(), *p), *o))
            .collect();
        let assigned: Vec<Tp> = tp_list(tpl);
        for (topic, partition) in assigned {
            if let Some(&offset) = stored.get(&(topic.as_str(), partition)) {
                if let Some(end) = Self::end_before(consumer, &topic, partition, offset) {
                    tracing::error!(
                        topic,
                        partition,
                        stored = offset,
                        end,
                        "the stored offset is past the partition's end; stopping"
                    );
                    self.state().fatal = Some(ConsumerError::StoredOffsetPastEnd {
                        group: self.group.clone(),
                        topic,
                        partition,
                        stored: offset,
                        end,
                    });
                    return false;
                }
                if let Err(error) =
                    tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                {
                    tracing::error!(%error, topic, partition, "cannot set the start offset");
                }
                tracing::info!(
                    topic,
                    partition,
                    offset,
                    "assigned; resuming at the stored offset"
                );
            } else {
                tracing::info!(topic, partition, "assigned; no stored offset");
            }
        }
        true
    }

    /// The partition's end (high watermark) when `stored` lies past it:
    /// the topic was created again or its log truncated, since an offset
    /// is stored only after its record was read. `None` when it does not,
    /// or when the broker cannot say (logged; consumption goes on).
    fn end_before(
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        stored: i64,
    ) -> Option<i64> {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, end)) => (stored > end).then_some(end),
            Err(error) => {
                tracing::warn!(
                    %error, topic, partition,
                    "cannot read the partition's end to check the stored offset against it"
                );
                None
            }
        }
    }

    /// Stops the workers of `partitions`: each finishes its batch in flight
    /// (up to the shutdown timeout), then is aborted.
    pub(super) fn stop_workers(&self, partitions: &[Tp]) {
        let workers: Vec<(Tp, Worker)> = {
            let mut state = self.state();
            partitions
                .iter()
                .filter_map(|tp| {
                    state.pending.remove(tp);
                    state.assigned.remove(tp);
                    state.workers.remove_entry(tp)
                })
                .collect()
        };
        if workers.is_empty() {
            return;
        }
        for (_, worker) in &workers {
            worker.stop.cancel();
        }
        if Handle::try_current().is_ok() {
            // Called on a runtime thread (the consumer dropped in a task):
            // cannot block here, so abandon the batches in flight.
            for (_, worker) in &workers {
                worker.abort.cancel();
            }
            return;
        }
        let timeout = self.shutdown_timeout;
        self.handle.block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            for ((topic, partition), mut worker) in workers {
                if tokio::time::timeout_at(deadline, &mut worker.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        topic,
                        partition,
                        "batch in flight abandoned at revocation/shutdown"
                    );
                    worker.abort.cancel();
                    let _ = worker.task.await;
                }
            }
        });
    }
}

pub(super) fn tp_list(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let positioned = self.position_at_stored_offsets(consumer, tpl);
                self.state().assigned.extend(tp_list(tpl));
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if positioned {
                    // librdkafka keeps a partition's pause across a
                    // revocation: one paused for backpressure (its queue
                    // full), revoked and assigned back to this member would
                    // stay paused for good. Its waiting messages went with
                    // the revocation; start it afresh.
                    assigned.and_then(|()| consumer.resume(tpl))
                } else {
                    // Shutting down, or stopping on a stored offset past the
                    // end: consume nothing from an unknown position.
                    assigned.and_then(|()| consumer.pause(tpl))
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = tp_list(tpl);
                tracing::info!(?revoked, "partitions revoked");
                self.stop_workers(&revoked);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let all: Vec<Tp> = self.state().assigned.iter().cloned().collect();
                self.stop_workers(&all);
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "applying the rebalance failed");
        }
    }
}
