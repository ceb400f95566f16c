//! The exactly-once stage loop: consume a batch, process it, then produce every output and
//! commit the consumed offsets in one Kafka transaction (read_committed in, transactional out).
//!
//! - A batch is finished (committed, or aborted and rewound) before the batch after the
//!   next is collected. A plain stage finishes it before polling the consumer again. A
//!   *pipelined* stage (`StageSettings::pipelined`, the router's) commits batch N on a task
//!   of its own while it collects and processes batch N+1; N+1 is committed only after N,
//!   in its own transaction, and when N's transaction fails N+1 is dropped and rewound too,
//!   so both are read again in order. N's transaction carries the group metadata of when it
//!   started: if the group rebalanced meanwhile, the coordinator refuses N's offsets, N
//!   aborts and the new owner reads it again. A batch being filled when the assignment
//!   changes is dropped whole and its partitions that are still ours are rewound; the
//!   others' new owners read them again from the committed offsets. A batch that holds a
//!   partition is never overlapped (the next batch would read past the held record).
//! - A retryable processing error or an abortable transaction error aborts the transaction
//!   and rewinds the batch's partitions; the batch is processed again after a backoff.
//!   Side effects outside Kafka must therefore be idempotent (the router's are).
//! - A processor may *hold* a partition at an offset until a time: the offset is committed
//!   up to (not including) the held record, the partition is paused and resumed when due.
//!   The delay topic uses this instead of sleeping a worker.
//! - The transactional id is stable per replica (`<group>-<instance>`), so a restarted
//!   replica fences its dead predecessor and aborts its open transaction immediately.
//! - A broker outage is waited out, never a process exit. Consume errors are logged and
//!   polled past; a retriable `send_offsets` / `commit_transaction` is called again; any
//!   other transaction error aborts (or, when the producer is in a fatal state or the abort
//!   fails, replaces the producer and initialises transactions again, which fences the old
//!   one); then each partition of the batch is sought to its committed offset, read from
//!   the group coordinator, so a commit whose answer was lost is neither lost nor repeated.
//!   `init_transactions` is retried until the coordinator answers ("coordinator load in
//!   progress" at start included). The `herald_waiting{dependency="kafka"}` gauge is 1
//!   meanwhile. Only a misconfiguration (a client config librdkafka refuses, a fatal
//!   processor error) stops the stage.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{client_config, BusError};
use crate::config::KafkaConfig;
use crate::telemetry::events;

/// One record to produce inside the batch's transaction.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub topic: String,
    /// An explicit partition (the delay topic partitions by due hour); `None` = by key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// The original record (key, bytes, headers) for the DLQ, plus why and where from
    /// (the contract is in [`super::headers`]).
    pub fn dead_letter(msg: &OwnedMessage, dlq: &str, reason: String) -> Output {
        let mut headers: Vec<(String, Vec<u8>)> =
            msg.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
        headers.retain(|(k, _)| k != super::headers::DLQ_REASON && k != super::headers::DLQ_SOURCE);
        headers.push((super::headers::DLQ_REASON.into(), reason.into_bytes()));
        headers.push((super::headers::DLQ_SOURCE.into(), super::headers::Position::of(msg).to_string().into_bytes()));
        Output { topic: dlq.to_string(), partition: None, key: msg.key().map(<[u8]>::to_vec), payload: msg.payload().map(<[u8]>::to_vec), headers }
    }
}

/// Stop a partition at `offset` (not processed, not committed) until `until_ms` (epoch ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub until_ms: i64,
}

/// What processing a batch produced.
#[derive(Debug, Default)]
pub struct BatchResult {
    pub outputs: Vec<Output>,
    pub holds: Vec<Hold>,
}

/// Why a batch could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Try the same batch again later (a dependency is unavailable).
    #[error("retryable: {0}")]
    Retryable(String),
    /// The stage cannot go on (misconfiguration, a bug); the process should exit.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl StageError {
    /// A boundary error as a stage error: retry the batch when the error says it may
    /// succeed later, otherwise stop the stage.
    pub fn classify<E: crate::error::Classify + std::fmt::Display>(e: E) -> StageError {
        if e.is_retryable() {
            StageError::Retryable(e.to_string())
        } else {
            StageError::Fatal(e.to_string())
        }
    }
}

/// A stage's per-batch logic.
pub trait Processor: Send + Sync {
    fn process(&self, batch: &[OwnedMessage]) -> impl Future<Output = Result<BatchResult, StageError>> + Send;

    /// The transaction carrying `batch`'s outputs and offsets committed.
    fn committed(&self, _batch: &[OwnedMessage]) {}

    /// The consumer's assignment changed (noticed before the next batch is processed):
    /// state kept for the partitions this stage owned may be another replica's now.
    fn assignment_changed(&self) {}
}

/// How a stage consumes and commits.
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// Metric label and client id suffix, e.g. `router`.
    pub role: &'static str,
    pub group_id: String,
    pub topics: Vec<String>,
    /// Stable per replica; see the module docs.
    pub transactional_id: String,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub transaction_timeout: Duration,
    /// Collect and process the next batch while this one commits (see the module docs).
    /// The processor must then not need batch N committed to process batch N+1: its
    /// `committed(N)` comes after `process(N+1)`.
    pub pipelined: bool,
}

/// Whether the assignment changed since the loop last looked.
#[derive(Default)]
struct Revocations {
    rebalanced: bool,
    /// For [`Processor::assignment_changed`]: set with `rebalanced`, taken separately.
    changed: bool,
}

struct StageContext {
    role: &'static str,
    state: Arc<Mutex<Revocations>>,
    /// librdkafka repeats a broker outage's errors every few hundred milliseconds.
    errors: super::Throttle,
}

impl ClientContext for StageContext {
    /// Global client errors (all brokers down, transport failures): logged at warn, at most
    /// every 10 s; the client reconnects by itself and the loop waits.
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(suppressed) = self.errors.allow() {
            tracing::warn!(role = self.role, %error, reason, suppressed, "Kafka client error (retrying)");
        }
    }

    /// librdkafka statistics (every 5 s, delivered while the consumer is polled): consumer
    /// lag per assigned partition, i.e. the queue depth.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Offsets are committed by the producer's transaction, which the consumer never
                // sees; the loop stores them locally after each commit for this figure.
                let lag = if p.consumer_lag_stored >= 0 { p.consumer_lag_stored } else { p.consumer_lag };
                if *partition >= 0 && lag >= 0 {
                    events::consumer_lag(self.role, topic, *partition, lag);
                }
            }
        }
    }
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut s = self.state.lock().unwrap();
        s.rebalanced = true;
        s.changed = true;
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// Runs the stage until `shutdown` is cancelled (finishing the batch in hand) or a fatal error.
pub async fn run<P: Processor>(cfg: &KafkaConfig, settings: &StageSettings, processor: &P, shutdown: CancellationToken) -> Result<(), BusError> {
    let state = Arc::new(Mutex::new(Revocations::default()));
    let consumer: StreamConsumer<StageContext> = client_config(cfg, settings.role)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        .create_with_context(StageContext { role: settings.role, state: state.clone(), errors: super::Throttle::default() })
        .map_err(|e| BusError::Config(e.to_string()))?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|source| BusError::Op { op: "subscribe", source })?;
    let timeout = cfg.request_timeout().max(settings.transaction_timeout);
    let Some(mut producer) = transactional_producer(cfg, settings, timeout, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, txid = %settings.transactional_id, "stage started");

    let mut paused: HashMap<(String, i32), i64> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    // A batch processed while the one before it committed (pipelined stages), not yet
    // committed itself.
    let mut ahead: Option<(Vec<OwnedMessage>, BatchResult)> = None;
    while !shutdown.is_cancelled() {
        let (batch, result) = match ahead.take() {
            Some(processed) => processed,
            None => match next_batch(&consumer, settings, processor, &shutdown, &state, &mut paused).await? {
                Next::Processed(b, r) => (b, r),
                Next::Idle => continue,
                Next::Failed(b, why) => {
                    retry_later(&consumer, &b, &why, &mut backoff).await;
                    continue;
                }
            },
        };
        // Commit this batch on its own task; a pipelined stage collects and processes the
        // next batch meanwhile. Not while this one holds a partition: the next would read
        // past the held record.
        let overlap = settings.pipelined && result.holds.is_empty();
        let BatchResult { outputs, holds } = result;
        let produced = outputs.len();
        let committing = std::time::Instant::now();
        let commit = start_commit(&consumer, &producer, &batch, &holds, outputs, timeout, settings.role, &shutdown);
        let (committed, following) = if overlap {
            tokio::join!(commit, next_batch(&consumer, settings, processor, &shutdown, &state, &mut paused))
        } else {
            (commit.await, Ok(Next::Idle))
        };
        match committed {
            Ok(()) => {
                tracing::debug!(
                    records = batch.len(),
                    outputs = produced,
                    commit_ms = committing.elapsed().as_millis() as u64,
                    overlapped = overlap,
                    "batch committed"
                );
                events::waiting(settings.role, "kafka", false);
                backoff = Duration::from_millis(100);
                processor.committed(&batch);
                // Local only (auto-commit is off): lets librdkafka report lag from them.
                if let Ok(offsets) = next_offsets(&batch, &holds) {
                    let _ = consumer.store_offsets(&offsets);
                }
                events::consumed(settings.role, "batch", batch.len() as u64);
                events::produced(settings.role, "batch", produced as u64);
                for h in &holds {
                    hold(&consumer, h);
                    paused.insert((h.topic.clone(), h.partition), h.until_ms);
                }
                match following? {
                    Next::Processed(b, r) => ahead = Some((b, r)),
                    Next::Idle => {}
                    Next::Failed(b, why) => retry_later(&consumer, &b, &why, &mut backoff).await,
                }
            }
            Err(e) => {
                events::waiting(settings.role, "kafka", true);
                // The batch processed meanwhile came after this one: it is dropped and read
                // again after it (its store effects are idempotent, like any retried batch).
                if let Ok(Next::Processed(b, _) | Next::Failed(b, _)) = &following {
                    tracing::info!(records = b.len(), "the batch after it is dropped and read again");
                    rewind(&consumer, b);
                }
                following?;
                tracing::warn!(error = %e, records = batch.len(), "transaction failed; aborting and reading the batch again from the committed offsets");
                producer = match recover(producer, &e, cfg, settings, timeout, &shutdown).await? {
                    Some(p) => p,
                    None => {
                        // Shut down while waiting for the broker (nothing is processed ahead).
                        tracing::info!(group = %settings.group_id, "stage stopped");
                        return Ok(());
                    }
                };
                rewind_to_committed(&consumer, &batch, &shutdown).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    if let Some((batch, result)) = ahead {
        // Shutting down with a batch processed ahead: commit it rather than redo it.
        let BatchResult { outputs, holds } = result;
        match start_commit(&consumer, &producer, &batch, &holds, outputs, timeout, settings.role, &CancellationToken::new()).await {
            Ok(()) => processor.committed(&batch),
            Err(e) => {
                tracing::warn!(error = %e, records = batch.len(), "the last batch did not commit; the next owner reads it again");
                let _ = blocking(|| producer.abort_transaction(STEP_TIMEOUT));
            }
        }
    }
    tracing::info!(group = %settings.group_id, "stage stopped");
    Ok(())
}

/// What the loop got when it asked for the next batch.
enum Next {
    /// Nothing to do (no records, shutdown, a rebalance dropped the batch).
    Idle,
    Processed(Vec<OwnedMessage>, BatchResult),
    /// Processing failed retryably: the batch is to be read again after a backoff.
    Failed(Vec<OwnedMessage>, String),
}

/// Collects a batch and processes it; a fatal processing error stops the stage.
async fn next_batch<P: Processor>(
    consumer: &StreamConsumer<StageContext>,
    settings: &StageSettings,
    processor: &P,
    shutdown: &CancellationToken,
    state: &Mutex<Revocations>,
    paused: &mut HashMap<(String, i32), i64>,
) -> Result<Next, BusError> {
    resume_due(consumer, paused);
    let batch = collect(consumer, settings, shutdown, state, paused).await;
    if std::mem::take(&mut state.lock().unwrap().changed) {
        processor.assignment_changed();
    }
    let Some(batch) = batch else { return Ok(Next::Idle) };
    match processor.process(&batch).await {
        Ok(r) => Ok(Next::Processed(batch, r)),
        Err(StageError::Retryable(why)) => Ok(Next::Failed(batch, why)),
        Err(StageError::Fatal(why)) => Err(BusError::Config(format!("stage {} stopped: {why}", settings.role))),
    }
}

/// A batch whose processing failed retryably: rewound, read again after a growing backoff.
async fn retry_later(consumer: &StreamConsumer<StageContext>, batch: &[OwnedMessage], why: &str, backoff: &mut Duration) {
    tracing::warn!(%why, records = batch.len(), ?backoff, "batch failed, rewinding to retry");
    rewind(consumer, batch);
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// Starts the batch's transaction (its outputs, then its offsets with the group metadata
/// of now) on a task of its own, so the loop's task can go on with the next batch.
#[allow(clippy::too_many_arguments)]
fn start_commit(
    consumer: &StreamConsumer<StageContext>,
    producer: &FutureProducer,
    batch: &[OwnedMessage],
    holds: &[Hold],
    outputs: Vec<Output>,
    timeout: Duration,
    role: &'static str,
    shutdown: &CancellationToken,
) -> impl Future<Output = Result<(), KafkaError>> {
    let offsets = next_offsets(batch, holds);
    let metadata = consumer.group_metadata().ok_or(KafkaError::MessageConsumption(RDKafkaErrorCode::InvalidGroupId));
    let (producer, shutdown) = (producer.clone(), shutdown.clone());
    let task = tokio::spawn(async move { commit_batch(&producer, &outputs, offsets?, metadata?, timeout, role, &shutdown).await });
    async move {
        match task.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// A transactional producer with transactions initialised, retried until the broker's
/// transaction coordinator answers; `None` if `shutdown` came first.
async fn transactional_producer(
    cfg: &KafkaConfig,
    settings: &StageSettings,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<FutureProducer>, BusError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let producer: FutureProducer = client_config(cfg, settings.role)
            .set("transactional.id", &settings.transactional_id)
            .set("transaction.timeout.ms", settings.transaction_timeout.as_millis().to_string())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()
            .map_err(|e| BusError::Config(e.to_string()))?;
        loop {
            match blocking(|| producer.init_transactions(timeout)) {
                Ok(()) => {
                    events::waiting(settings.role, "kafka", false);
                    return Ok(Some(producer));
                }
                Err(e) => {
                    events::waiting(settings.role, "kafka", true);
                    let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
                    tracing::warn!(error = %e, fatal, ?backoff, "init transactions failed; waiting for the broker");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if fatal {
                        break; // this producer is done for: a new one
                    }
                }
            }
        }
    }
}

/// After a failed transaction: aborts it, or replaces the producer when the failure is
/// fatal or the abort does not go through.
async fn recover(
    producer: FutureProducer,
    error: &KafkaError,
    cfg: &KafkaConfig,
    settings: &StageSettings,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<FutureProducer>, BusError> {
    let fatal = matches!(error, KafkaError::Transaction(t) if t.is_fatal());
    if !fatal {
        match retrying(settings.role, || producer.abort_transaction(timeout.min(STEP_TIMEOUT)), timeout * 2, shutdown).await {
            Ok(()) => return Ok(Some(producer)),
            Err(e) => tracing::warn!(error = %e, "abort failed; replacing the producer (initialising transactions fences the old one)"),
        }
    }
    drop(producer);
    transactional_producer(cfg, settings, timeout, shutdown).await
}

/// How long one call of a transaction step may block before it is made again.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls a blocking transaction step again while it fails with a retriable error, for at
/// most `within` (or until shutdown).
async fn retrying(
    role: &str,
    mut f: impl FnMut() -> Result<(), KafkaError>,
    within: Duration,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    let started = std::time::Instant::now();
    loop {
        match blocking(&mut f) {
            Err(KafkaError::Transaction(t)) if t.is_retriable() && started.elapsed() < within && !shutdown.is_cancelled() => {
                events::waiting(role, "kafka", true);
                tracing::debug!(error = %t, "transaction step failed (retriable); calling it again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Seeks every partition of the batch to its committed offset (asking the group
/// coordinator until it answers): the start of the batch when its transaction did not
/// commit, past it when it did.
async fn rewind_to_committed(consumer: &StreamConsumer<StageContext>, batch: &[OwnedMessage], shutdown: &CancellationToken) {
    let mut first: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = first.entry((m.topic(), m.partition())).or_insert(m.offset());
        *e = (*e).min(m.offset());
    }
    let mut tpl = TopicPartitionList::new();
    for (t, p) in first.keys() {
        tpl.add_partition(t, *p);
    }
    let mut backoff = Duration::from_millis(200);
    let asking = std::time::Instant::now();
    let committed = loop {
        // Short asks, again and again: a long one can sit out a whole group rejoin.
        match blocking(|| consumer.committed_offsets(tpl.clone(), Duration::from_secs(3))) {
            Ok(c) => {
                tracing::info!(ms = asking.elapsed().as_millis() as u64, "read the committed offsets after a failed transaction");
                break c;
            }
            Err(e) if !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, ?backoff, "cannot read committed offsets; waiting for the broker");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(_) => return,
        }
    };
    for ((t, p), batch_first) in first {
        let to = match committed.find_partition(t, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            // Nothing committed yet: the batch is the first this group read.
            _ => batch_first,
        };
        if to != batch_first {
            tracing::info!(
                topic = t,
                partition = p,
                batch_first,
                committed = to,
                "the failed transaction had committed; not reading the batch again"
            );
        }
        if let Err(e) = consumer.seek(t, p, Offset::Offset(to), Duration::from_secs(5)) {
            tracing::debug!(topic = t, partition = p, error = %e, "rewind skipped");
        }
    }
}

/// Waits for a first record (or shutdown), then fills the batch for at most `batch_wait`.
/// Drops records of partitions we hold paused, and the whole batch (rewound) when the
/// assignment changed meanwhile. A consume error (the broker is away) is logged and the
/// batch so far kept: librdkafka reconnects by itself.
async fn collect(
    consumer: &StreamConsumer<StageContext>,
    settings: &StageSettings,
    shutdown: &CancellationToken,
    state: &Mutex<Revocations>,
    paused: &mut HashMap<(String, i32), i64>,
) -> Option<Vec<OwnedMessage>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        m = consumer.recv() => m,
        _ = tokio::time::sleep(Duration::from_millis(500)) => return None,
    };
    let mut batch = match first {
        Ok(m) => vec![m.detach()],
        Err(e) => {
            // No sleep: errors queued during an outage are drained at once when it ends.
            consume_error(settings, &e);
            return None;
        }
    };
    let deadline = tokio::time::Instant::now() + settings.batch_wait;
    while batch.len() < settings.batch_max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => {
                consume_error(settings, &e);
                break;
            }
            Err(_) => break,
        }
    }
    if std::mem::take(&mut state.lock().unwrap().rebalanced) {
        // A new assignment starts unpaused from the committed offsets.
        paused.clear();
        // The batch may mix records fetched before the rebalance (of partitions since
        // revoked, perhaps given straight back) with records fetched after it from the
        // committed offsets. Dropping only a revoked partition's records would lose those
        // fetched after its reassignment (the position is already past them), so the whole
        // batch goes, and each partition still ours is read again from its first record.
        tracing::info!(records = batch.len(), "rebalance while collecting: reading the batch again");
        rewind(consumer, &batch);
        return None;
    }
    batch.retain(|m| !paused.contains_key(&(m.topic().to_string(), m.partition())));
    if batch.is_empty() {
        None
    } else {
        Some(batch)
    }
}

/// A consume error: the broker is away (librdkafka keeps reconnecting) or a record could
/// not be fetched; logged (at most every 10 s), the loop goes on.
fn consume_error(settings: &StageSettings, e: &KafkaError) {
    static LOG: super::Throttle = super::Throttle::new();
    events::waiting(settings.role, "kafka", true);
    if let Some(suppressed) = LOG.allow() {
        tracing::warn!(role = settings.role, error = %e, suppressed, "consume failed; waiting for the broker");
    }
}

/// Produces the outputs and commits the offsets, all in one transaction.
async fn commit_batch(
    producer: &FutureProducer,
    outputs: &[Output],
    offsets: TopicPartitionList,
    metadata: rdkafka::consumer::ConsumerGroupMetadata,
    timeout: Duration,
    role: &str,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    producer.begin_transaction()?;
    for o in outputs {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in &o.headers {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let mut record: FutureRecord<'_, Vec<u8>, Vec<u8>> = FutureRecord::to(&o.topic).headers(headers);
        if let Some(k) = &o.key {
            record = record.key(k);
        }
        if let Some(p) = &o.payload {
            record = record.payload(p);
        }
        if let Some(p) = o.partition {
            record = record.partition(p);
        }
        loop {
            match producer.send_result(record) {
                Ok(_delivery) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    // A retriable error here (the broker is away, a request timed out) leaves the
    // transaction open: the same call is made again until it goes through or gives up.
    // Short calls, made again: a call that waits out a whole outage says nothing meanwhile.
    let step = timeout.min(STEP_TIMEOUT);
    retrying(role, || producer.send_offsets_to_transaction(&offsets, &metadata, step), timeout * 2, shutdown).await?;
    retrying(role, || producer.commit_transaction(step), timeout * 2, shutdown).await
}

/// Per partition in the batch: the offset to commit (after the last record, or the held one).
fn next_offsets(batch: &[OwnedMessage], holds: &[Hold]) -> Result<TopicPartitionList, KafkaError> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(m.offset() + 1);
        *e = (*e).max(m.offset() + 1);
    }
    for h in holds {
        next.insert((h.topic.as_str(), h.partition), h.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        tpl.add_partition_offset(t, p, Offset::Offset(o))?;
    }
    Ok(tpl)
}

/// Seeks every partition of the batch back to its first record.
fn rewind(consumer: &StreamConsumer<StageContext>, batch: &[OwnedMessage]) {
    let mut first: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = first.entry((m.topic(), m.partition())).or_insert(m.offset());
        *e = (*e).min(m.offset());
    }
    for ((t, p), o) in first {
        if let Err(e) = consumer.seek(t, p, Offset::Offset(o), Duration::from_secs(5)) {
            // Not ours any more (revoked): the new owner starts from the committed offset.
            tracing::debug!(topic = t, partition = p, error = %e, "rewind skipped");
        }
    }
}

fn hold(consumer: &StreamConsumer<StageContext>, h: &Hold) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&h.topic, h.partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(topic = %h.topic, partition = h.partition, error = %e, "pause failed");
    }
    if let Err(e) = consumer.seek(&h.topic, h.partition, Offset::Offset(h.offset), Duration::from_secs(5)) {
        tracing::debug!(topic = %h.topic, partition = h.partition, error = %e, "seek for hold skipped");
    }
    tracing::debug!(topic = %h.topic, partition = h.partition, offset = h.offset, until_ms = h.until_ms, "partition held");
}

fn resume_due(consumer: &StreamConsumer<StageContext>, paused: &mut HashMap<(String, i32), i64>) {
    let now = crate::model::now_ms();
    paused.retain(|(t, p), until| {
        if *until > now {
            return true;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(t, *p);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(topic = %t, partition = p, error = %e, "resume failed");
        }
        false
    });
}

/// Runs a blocking librdkafka transaction call without stalling the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
