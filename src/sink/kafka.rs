//! Producing to Kafka: alerts to the alerts topic (keyed by entity, the
//! alert id in a header), and routed events for `riskd route`.
//!
//! Messages are queued as they come and acknowledged in [`KafkaProducer::flush`],
//! which the job calls before it commits the state that produced them: an
//! alert the broker has not acknowledged keeps its event's offset from
//! being committed. While the broker is away the flush waits (riskd slows
//! down, reporting not-ready); only a message the broker refuses for good
//! fails it, and the job stops without committing.

use crate::alert::Alert;
use crate::config::KafkaConfig;
use crate::kafka::{producer_config, Context, KafkaFailure, Watch, ALERT_ID_HEADER};
use crate::shutdown::Shutdown;
use crate::telemetry::metrics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts deliveries the broker refused for good.
struct Deliveries {
    kind: &'static str,
    failed: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl Watch for Deliveries {}

impl ProducerContext for Context<Deliveries> {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let d = &self.watch;
        let outcome = match result {
            Ok(_) => "ok",
            Err((e, _)) => {
                d.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = d.last_failure.lock() {
                    *last = Some(e.to_string());
                }
                "error"
            }
        };
        metrics().kafka_produced.with_label_values(&[d.kind, outcome]).inc();
    }
}

/// An idempotent producer whose flush says whether everything sent was acknowledged.
pub struct KafkaProducer {
    producer: BaseProducer<Context<Deliveries>>,
    drain_timeout: Duration,
}

impl KafkaProducer {
    /// A producer of `kind` messages (`alert`, `routed`: the metric label).
    pub fn new(k: &KafkaConfig, kind: &'static str) -> Result<Self, KafkaFailure> {
        let context = Context { watch: Deliveries { kind, failed: AtomicU64::new(0), last_failure: Mutex::new(None) } };
        let producer =
            producer_config(k).create_with_context(context).map_err(|e| KafkaFailure::new("creating a producer", e))?;
        Ok(Self { producer, drain_timeout: k.drain_timeout })
    }

    /// Queues a message; waits while the local queue is full.
    pub fn send(&self, topic: &str, key: &str, payload: &[u8], headers: OwnedHeaders) -> Result<(), KafkaFailure> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(KafkaFailure::new(format!("producing to {topic}"), e)),
            }
        }
    }

    /// Waits until the broker has acknowledged every message sent. While it
    /// does not answer, `waiting` hears why (and `None` once it does); once
    /// `shutdown` is triggered the wait lasts the drain timeout at most.
    /// Fails if a message was refused for good.
    pub fn flush(&self, shutdown: &Shutdown, waiting: &dyn Fn(Option<String>)) -> Result<(), KafkaFailure> {
        let mut stopping_since: Option<Instant> = None;
        let mut waited = false;
        loop {
            match self.producer.flush(Duration::from_secs(1)) {
                Ok(()) => break,
                Err(e) => {
                    let queued = self.producer.in_flight_count();
                    waiting(Some(format!("{queued} messages not acknowledged by the broker yet ({e})")));
                    waited = true;
                    if shutdown.is_triggered() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.drain_timeout {
                            return Err(KafkaFailure::new(
                                "shutting down",
                                format!("{queued} messages still not acknowledged after the drain timeout"),
                            ));
                        }
                    }
                }
            }
        }
        if waited {
            waiting(None);
        }
        let failed = self.producer.context().watch.failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let last =
                self.producer.context().watch.last_failure.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
            return Err(KafkaFailure::new(
                "producing",
                format!("the broker refused {failed} messages (last: {last}); their events are not committed"),
            ));
        }
        Ok(())
    }
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
        let payload = serde_json::to_vec(alert).map_err(|e| KafkaFailure::new("encoding an alert", e))?;
        let headers = OwnedHeaders::new().insert(Header { key: ALERT_ID_HEADER, value: Some(alert.alert_id.as_str()) });
        self.inner.send(&self.topic, &alert.entity.id, &payload, headers)
    }

    /// See [`KafkaProducer::flush`].
    pub fn flush(&self, shutdown: &Shutdown, waiting: &dyn Fn(Option<String>)) -> Result<(), KafkaFailure> {
        self.inner.flush(shutdown, waiting)
    }
}
