//! Producing to Kafka: alerts to the alerts topic (keyed by entity, the
//! alert id in a header), and routed events for `riskd route`.
//!
//! Messages are queued as they come and acknowledged in [`KafkaProducer::flush`],
//! which the job calls before it commits the state that produced them: an
//! alert the broker has not acknowledged keeps its event's offset from
//! being committed. While the broker is away the flush waits (riskd slows
//! down, reporting not-ready); a message the client gives up on for a
//! reason a retry may mend is sent again; only a message the broker refuses
//! for good, or a fatal producer error, fails it, and the job stops without
//! committing.

use crate::alert::Alert;
use crate::config::KafkaConfig;
use crate::kafka::{code_is_permanent, producer_config, Context, KafkaFailure, Watch, ALERT_ID_HEADER};
use crate::shutdown::Shutdown;
use crate::telemetry::metrics;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A message sent and not acknowledged yet: kept until the broker has it,
/// so that one the client gave up on for a reason a retry may mend (a
/// refusal outlasting `message.timeout.ms`, when set; a producer identity
/// the broker no longer takes) is sent again rather than lost.
struct Pending {
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: OwnedHeaders,
}

/// Deliveries since the last flush: what is still unacknowledged, what the
/// client gave up on for a reason a retry may mend, what the broker refused
/// for good.
#[derive(Default)]
struct Ledger {
    next: usize,
    pending: BTreeMap<usize, Pending>,
    /// Messages to send again, by send order.
    resend: Vec<usize>,
    /// The last transient failure: the reason given while waiting.
    last_transient: Option<String>,
    /// The broker no longer takes this producer's identity (fenced, epoch
    /// or sequence out of step) without the client failing for good: a new
    /// producer sends the messages again.
    renew: Option<String>,
    /// Messages refused for good, and the last refusal.
    refused: u64,
    last_refusal: Option<(RDKafkaErrorCode, String)>,
}

/// Refusals of the producer's identity rather than of the message: a new
/// producer (a new producer id) is taken.
fn identity_refused(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
    )
}

struct Deliveries {
    kind: &'static str,
    ledger: Arc<Mutex<Ledger>>,
}

impl Watch for Deliveries {}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ProducerContext for Context<Deliveries> {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let d = &self.watch;
        let mut ledger = lock(&d.ledger);
        let outcome = match result {
            Ok(_) => {
                ledger.pending.remove(&id);
                "ok"
            }
            Err((e, _)) => {
                let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                if identity_refused(code) {
                    ledger.resend.push(id);
                    ledger.renew = Some(e.to_string());
                } else if code_is_permanent(code) {
                    ledger.pending.remove(&id);
                    ledger.refused += 1;
                    ledger.last_refusal = Some((code, e.to_string()));
                } else {
                    ledger.resend.push(id);
                    ledger.last_transient = Some(e.to_string());
                }
                "error"
            }
        };
        metrics().kafka_produced.with_label_values(&[d.kind, outcome]).inc();
    }
}

type Client = BaseProducer<Context<Deliveries>>;

/// An idempotent producer whose flush returns once the broker has
/// acknowledged everything sent, and fails only when a message was refused
/// for good or the producer itself failed for good (a fatal error).
pub struct KafkaProducer {
    /// Replaced by a new one when the broker no longer takes its identity.
    producer: Mutex<Client>,
    config: ClientConfig,
    kind: &'static str,
    ledger: Arc<Mutex<Ledger>>,
    drain_timeout: Duration,
}

impl KafkaProducer {
    /// A producer of `kind` messages (`alert`, `routed`: the metric label).
    pub fn new(k: &KafkaConfig, kind: &'static str) -> Result<Self, KafkaFailure> {
        let config = producer_config(k);
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let producer = Mutex::new(client(&config, kind, &ledger)?);
        Ok(Self { producer, config, kind, ledger, drain_timeout: k.drain_timeout })
    }

    fn producer(&self) -> MutexGuard<'_, Client> {
        self.producer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a message; waits while the local queue is full. Kept until
    /// acknowledged.
    pub fn send(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), KafkaFailure> {
        let id = {
            let mut ledger = lock(&self.ledger);
            let id = ledger.next;
            ledger.next += 1;
            let copy = Pending { topic: topic.into(), key: key.into(), payload: payload.to_vec(), headers };
            ledger.pending.insert(id, copy);
            id
        };
        let sent = self.enqueue(id);
        if sent.is_err() {
            lock(&self.ledger).pending.remove(&id);
        }
        sent
    }

    /// Hands message `id` (kept in the ledger) to the client.
    fn enqueue(&self, id: usize) -> Result<(), KafkaFailure> {
        let producer = self.producer();
        loop {
            let sent = {
                let ledger = lock(&self.ledger);
                let Some(m) = ledger.pending.get(&id) else { return Ok(()) };
                let record = BaseRecord::with_opaque_to(&m.topic, id)
                    .key(m.key.as_str())
                    .payload(m.payload.as_slice())
                    .headers(m.headers.clone());
                producer.send(record).map_err(|(e, _)| (e, m.topic.clone()))
            };
            match sent {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(100));
                }
                Err((e, topic)) => {
                    return Err(match fatal(&producer) {
                        Some(f) => f,
                        None => KafkaFailure::of(format!("producing to {topic}"), &e),
                    })
                }
            }
        }
    }

    /// Replaces the producer by a new one (a new producer id). The old one's
    /// messages not acknowledged are purged, and sent again by the new one.
    fn renew(&self, why: &str) -> Result<(), KafkaFailure> {
        tracing::warn!(reason = why, "the broker no longer takes this producer's identity: starting a new producer");
        let fresh = client(&self.config, self.kind, &self.ledger)?;
        let old = std::mem::replace(&mut *self.producer(), fresh);
        // Dropping it purges what it still holds: those come back as
        // messages to send again.
        drop(old);
        Ok(())
    }

    /// Waits until the broker has acknowledged every message sent. While it
    /// does not answer, `waiting` hears why (and `None` once it does); once
    /// `shutdown` is triggered the wait lasts the drain timeout at most.
    /// A message the client gave up on for a reason a retry may mend is
    /// sent again (by a new producer when the broker no longer takes this
    /// one's identity). Fails if a message was refused for good, or the
    /// producer failed for good (a fatal error: riskd stops without
    /// committing, and a restart replays).
    pub fn flush(&self, shutdown: &Shutdown, waiting: &dyn Fn(Option<String>)) -> Result<(), KafkaFailure> {
        let mut stopping_since: Option<Instant> = None;
        let mut waited = false;
        loop {
            let done = {
                let producer = self.producer();
                let done = producer.flush(Duration::from_secs(1));
                if let Some(f) = fatal(&producer) {
                    return Err(f);
                }
                done
            };
            let renew = lock(&self.ledger).renew.take();
            if let Some(why) = &renew {
                self.renew(why)?;
            }
            let (mut resend, refused, last) = {
                let mut ledger = lock(&self.ledger);
                (std::mem::take(&mut ledger.resend), ledger.refused, ledger.last_transient.clone().or(renew))
            };
            if refused > 0 {
                break;
            }
            if done.is_ok() && resend.is_empty() {
                break;
            }
            resend.sort_unstable();
            resend.dedup();
            let unacked = lock(&self.ledger).pending.len();
            let why = match (&done, &last) {
                (_, Some(last)) if !resend.is_empty() => format!("the broker refused them for now: {last}"),
                (Err(e), _) => e.to_string(),
                (Ok(()), _) => "sending them again".into(),
            };
            waiting(Some(format!("{unacked} messages not acknowledged by the broker yet ({why})")));
            waited = true;
            if !resend.is_empty() {
                tracing::warn!(messages = resend.len(), reason = ?last, "messages not acknowledged are sent again");
                if !shutdown.sleep(Duration::from_secs(1)) {
                    stopping_since.get_or_insert_with(Instant::now);
                }
                for id in resend {
                    self.enqueue(id)?;
                }
            }
            if shutdown.is_triggered() {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.drain_timeout {
                    return Err(KafkaFailure::transient(
                        "shutting down",
                        "Unacknowledged",
                        format!("{unacked} messages still not acknowledged after the drain timeout"),
                    ));
                }
            }
        }
        if waited {
            waiting(None);
        }
        let mut ledger = lock(&self.ledger);
        let refused = std::mem::take(&mut ledger.refused);
        ledger.pending.clear();
        ledger.resend.clear();
        if refused > 0 {
            let (code, last) = ledger.last_refusal.take().unwrap_or((RDKafkaErrorCode::Fail, String::new()));
            return Err(KafkaFailure::permanent(
                "producing",
                format!("{code:?}"),
                format!(
                    "the broker refused {refused} messages for good (last: {last}); their events are not \
                     committed: fix the cause (topic, permissions, message size), then restart riskd, which \
                     replays them"
                ),
            ));
        }
        Ok(())
    }
}

/// A producer client whose deliveries go to `ledger`.
fn client(config: &ClientConfig, kind: &'static str, ledger: &Arc<Mutex<Ledger>>) -> Result<Client, KafkaFailure> {
    let context = Context { watch: Deliveries { kind, ledger: Arc::clone(ledger) } };
    config.create_with_context(context).map_err(|e| KafkaFailure::of("creating a producer", &e))
}

/// The producer's fatal error, if it had one: it is unusable, and what it
/// did not deliver may be out of order or lost. riskd stops without
/// committing; a restart replays from the last commit.
fn fatal(producer: &Client) -> Option<KafkaFailure> {
    let (code, reason) = producer.client().fatal_error()?;
    Some(KafkaFailure::permanent(
        "producing",
        "Fatal",
        format!(
            "the idempotent producer failed for good ({code:?}: {reason}); the events since the last commit are \
             not committed: restart riskd, which replays them"
        ),
    ))
}

/// Alerts to a topic: keyed by entity id, the alert id in a header.
pub struct AlertProducer {
    inner: KafkaProducer,
    topic: String,
}

impl AlertProducer {
    /// A producer for `k.alerts_topic`.
    pub fn new(k: &KafkaConfig, topic: &str) -> Result<Self, KafkaFailure> {
        Ok(Self { inner: KafkaProducer::new(k, "alert")?, topic: topic.to_string() })
    }

    /// Queues one alert.
    pub fn send(&self, alert: &Alert) -> Result<(), KafkaFailure> {
        let payload =
            serde_json::to_vec(alert).map_err(|e| KafkaFailure::permanent("encoding an alert", "encode", e))?;
        let headers = OwnedHeaders::new().insert(Header { key: ALERT_ID_HEADER, value: Some(alert.alert_id.as_str()) });
        self.inner.send(&self.topic, &alert.entity.id, &payload, headers)
    }

    /// See [`KafkaProducer::flush`].
    pub fn flush(&self, shutdown: &Shutdown, waiting: &dyn Fn(Option<String>)) -> Result<(), KafkaFailure> {
        self.inner.flush(shutdown, waiting)
    }
}
