//! Decoding the traffic: produce requests recorded per transaction,
//! `EndTxn` answers, and broker addresses rewritten to tap listeners.

use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiKey, EndTxnRequest, EndTxnResponse, FindCoordinatorResponse, MetadataResponse,
        ProduceRequest, RequestHeader, ResponseHeader,
    },
    protocol::{Decodable, Encodable, StrBytes},
    records::RecordBatchDecoder,
};

use super::*;

pub(super) fn on_request(state: &Shared, pending: &Pending, frame: &Bytes) -> Result<()> {
    let mut body = frame.clone();
    if body.len() < 4 {
        bail!("request frame of {} bytes", body.len());
    }
    let (key, version) = (
        i16::from_be_bytes([body[0], body[1]]),
        i16::from_be_bytes([body[2], body[3]]),
    );
    let Ok(api) = ApiKey::try_from(key) else {
        bail!("unknown api key {key}");
    };
    let header = RequestHeader::decode(&mut body, api.request_header_version(version))?;
    let mut end_txn = None;
    match api {
        ApiKey::Produce => {
            let request = ProduceRequest::decode(&mut body, version)?;
            lock(state).produce_in_flight += 1;
            record_produce(state, &request)?;
        }
        ApiKey::EndTxn => {
            let request = EndTxnRequest::decode(&mut body, version)?;
            let mut state = lock(state);
            state.events.push(Event::EndTxn {
                transactional_id: request.transactional_id.0.to_string(),
                producer: (request.producer_id.0, request.producer_epoch),
                commit: request.committed,
                answer: None,
            });
            end_txn = Some(state.events.len() - 1);
        }
        _ => {}
    }
    lock(pending).insert(header.correlation_id, (key, version, end_txn));
    Ok(())
}

fn record_produce(state: &Shared, request: &ProduceRequest) -> Result<()> {
    let Some(transactional_id) = &request.transactional_id else {
        return Ok(());
    };
    let mut events = Vec::new();
    for topic in &request.topic_data {
        for data in &topic.partition_data {
            let Some(records) = &data.records else {
                continue;
            };
            let mut buffer = records.clone();
            let mut base_sequence = None;
            let mut producer = None;
            let mut received = Vec::new();
            for set in RecordBatchDecoder::decode_all(&mut buffer)? {
                for record in set.records {
                    base_sequence.get_or_insert(record.sequence);
                    producer.get_or_insert((record.producer_id, record.producer_epoch));
                    received.push(Received {
                        partition: data.index,
                        offset: -1,
                        key: record.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                        payload: record.value.map(|v| v.to_vec()).unwrap_or_default(),
                        headers: record
                            .headers
                            .into_iter()
                            .map(|(name, value)| {
                                (
                                    name.to_string(),
                                    value.map(|v| v.to_vec()).unwrap_or_default(),
                                )
                            })
                            .collect(),
                        timestamp: Some(record.timestamp),
                    });
                }
            }
            let (Some(base_sequence), Some(producer)) = (base_sequence, producer) else {
                continue;
            };
            events.push(Event::Produce {
                transactional_id: transactional_id.0.to_string(),
                producer,
                partition: (topic.name.0.to_string(), data.index),
                base_sequence,
                records: received,
            });
        }
    }
    lock(state).events.extend(events);
    Ok(())
}

/// Records `EndTxn` answers; rewrites broker addresses in `Metadata` and
/// `FindCoordinator` answers to tap listeners.
pub(super) fn on_answer(state: &Shared, pending: &Pending, frame: Bytes) -> Result<Bytes> {
    if frame.len() < 4 {
        bail!("answer frame of {} bytes", frame.len());
    }
    let correlation = (&frame[..4]).get_i32();
    let Some((key, version, end_txn)) = lock(pending).remove(&correlation) else {
        bail!("answer to unknown correlation id {correlation}");
    };
    let api = ApiKey::try_from(key).map_err(|()| anyhow::anyhow!("api key {key}"))?;
    let header_version = api.response_header_version(version);
    let mut body = frame.clone();
    let header = ResponseHeader::decode(&mut body, header_version)?;
    match api {
        ApiKey::Produce => {
            let mut state = lock(state);
            state.produce_in_flight = state.produce_in_flight.saturating_sub(1);
            Ok(frame)
        }
        ApiKey::EndTxn => {
            let answer = EndTxnResponse::decode(&mut body, version)?;
            if let Some(index) = end_txn
                && let Event::EndTxn { answer: slot, .. } = &mut lock(state).events[index]
            {
                *slot = Some(answer.error_code);
            }
            Ok(frame)
        }
        ApiKey::Metadata => {
            let mut answer = MetadataResponse::decode(&mut body, version)?;
            for broker in &mut answer.brokers {
                (broker.host, broker.port) = rewrite(state, &broker.host, broker.port)?;
            }
            encode(&header, header_version, &answer, version)
        }
        ApiKey::FindCoordinator => {
            let mut answer = FindCoordinatorResponse::decode(&mut body, version)?;
            if answer.port > 0 {
                (answer.host, answer.port) = rewrite(state, &answer.host, answer.port)?;
            }
            for coordinator in &mut answer.coordinators {
                if coordinator.port > 0 {
                    (coordinator.host, coordinator.port) =
                        rewrite(state, &coordinator.host, coordinator.port)?;
                }
            }
            encode(&header, header_version, &answer, version)
        }
        _ => Ok(frame),
    }
}

fn rewrite(state: &Shared, host: &StrBytes, port: i32) -> Result<(StrBytes, i32)> {
    let local = listener_for(state, &format!("{host}:{port}"))?;
    Ok((
        StrBytes::from_string(local.ip().to_string()),
        i32::from(local.port()),
    ))
}

fn encode(
    header: &ResponseHeader,
    header_version: i16,
    body: &impl Encodable,
    version: i16,
) -> Result<Bytes> {
    let mut frame = BytesMut::new();
    header
        .encode(&mut frame, header_version)
        .context("encode header")?;
    body.encode(&mut frame, version).context("encode body")?;
    Ok(frame.freeze())
}
