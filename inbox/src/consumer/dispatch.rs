//! Handing polled messages to partition workers, with backpressure, and
//! committing their offsets to Kafka.

use super::*;

/// ones; pauses the partition while the worker's queue is full.
pub(super) fn dispatch(
    consumer: &BaseConsumer<Ctx>,
    message: Received,
    spawn: &impl Fn(&Tp) -> Worker,
) -> Result<(), ConsumerError> {
    let tp = (message.topic.clone(), message.partition);
    let mut state = consumer.context().state();
    if !state.assigned.contains(&tp) {
        // Fetched before a revocation: the new owner reads it again.
        return Ok(());
    }
    if let Some(waiting) = state.pending.get_mut(&tp) {
        waiting.push_back(message);
        return Ok(());
    }
    let worker = state
        .workers
        .entry(tp.clone())
        .or_insert_with(|| spawn(&tp));
    match worker.sender.try_send(message) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(message)) => {
            state
                .pending
                .entry(tp.clone())
                .or_default()
                .push_back(message);
            drop(state);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.0, tp.1);
            consumer.pause(&tpl).map_err(ConsumerError::Kafka)
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(worker_gone(&tp)),
    }
}

/// A worker's queue closed although it was not stopped: its task ended.
pub(super) fn worker_gone((topic, partition): &Tp) -> ConsumerError {
    ConsumerError::Worker {
        topic: topic.clone(),
        partition: *partition,
        reason: "its task ended (a panic outside the handler?)".into(),
    }
}

/// Moves waiting messages into worker queues that have room again and
/// resumes their partitions.
pub(super) fn feed_pending(consumer: &BaseConsumer<Ctx>) -> Result<(), ConsumerError> {
    let mut resumed = TopicPartitionList::new();
    {
        let mut guard = consumer.context().state();
        let state = &mut *guard;
        let mut drained = Vec::new();
        for (tp, waiting) in &mut state.pending {
            let Some(worker) = state.workers.get(tp) else {
                drained.push(tp.clone());
                continue;
            };
            while let Some(message) = waiting.pop_front() {
                match worker.sender.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        waiting.push_front(message);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(worker_gone(tp)),
                }
            }
            if waiting.is_empty() {
                drained.push(tp.clone());
                resumed.add_partition(&tp.0, tp.1);
            }
        }
        for tp in drained {
            state.pending.remove(&tp);
        }
    }
    if resumed.count() > 0 {
        consumer.resume(&resumed)?;
    }
    Ok(())
}

pub(super) fn commit_offsets(
    consumer: &BaseConsumer<Ctx>,
    committed: &std::sync::mpsc::Receiver<(String, i32, i64)>,
    mode: CommitMode,
) {
    let mut latest: BTreeMap<Tp, i64> = BTreeMap::new();
    while let Ok((topic, partition, next)) = committed.try_recv() {
        let entry = latest.entry((topic, partition)).or_insert(next);
        *entry = (*entry).max(next);
    }
    if latest.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in &latest {
        if let Err(error) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::debug!(%error, "bad offset");
        }
    }
    // Only informational (the database holds the real position): a
    // failure here is logged, not fatal.
    if let Err(error) = consumer.commit(&tpl, mode)
        && !matches!(&error, KafkaError::ConsumerCommit(code) if *code == rdkafka::types::RDKafkaErrorCode::NoOffset)
    {
        tracing::debug!(%error, "committing offsets to Kafka failed");
    }
}
